"""The on-device runtime: torch-free, folder-driven, clear errors on bad folders, sampling."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeattn.runtimes import EdgeLM, RuntimeLoadError, SamplingConfig, generate
from edgeattn.runtimes.generate import next_token
from edgeattn.runtimes.manifest import FORMAT_VERSION, ManifestError


@pytest.fixture(scope="module")
def folder(converted) -> Path:
    return converted("tiny-llama", max_length=64)[0]


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_runtime_imports_no_torch_transformers_or_onnxscript(folder):
    script = (
        "import sys\n"
        "from edgeattn.runtimes import EdgeLM, generate\n"
        f"lm = EdgeLM.load({str(folder)!r})\n"
        "text = generate(lm, 'hello', max_new_tokens=4).text\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnxscript', 'onnx', 'jinja2') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_folder_is_self_describing(folder):
    manifest = json.loads((folder / "edgeattn.json").read_text())
    assert manifest["format"] == "edgeattn" and manifest["format_version"] == FORMAT_VERSION
    for name in manifest["files"].values():
        assert (folder / name).is_file()
    assert manifest["kv_cache"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert manifest["numerics"]["passed"]


def test_missing_folder_and_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no such folder"):
        EdgeLM.load(tmp_path / "nope")
    with pytest.raises(ManifestError, match="not an edgeattn output folder"):
        EdgeLM.load(tmp_path)


def test_newer_manifest_version_is_refused(folder, tmp_path):
    copy = _copy(folder, tmp_path)
    manifest = json.loads((copy / "edgeattn.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "edgeattn.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="newer than this edgeattn understands"):
        EdgeLM.load(copy)


def test_missing_file_is_named(folder, tmp_path):
    copy = _copy(folder, tmp_path)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="tokenizer file tokenizer.json is missing"):
        EdgeLM.load(copy)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_model_file(folder, tmp_path, damage):
    copy = _copy(folder, tmp_path)
    model = copy / "model.onnx"
    model.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(RuntimeLoadError, match="onnxruntime cannot load the model"):
        EdgeLM.load(copy)


def test_prompt_longer_than_capacity(folder):
    from edgeattn.runtimes import ContextFullError

    lm = EdgeLM.load(folder)
    with pytest.raises(ContextFullError, match="capacity 64"):
        generate(lm, "x" * 80, max_new_tokens=2)


def test_long_input_runs_in_chunks_with_the_logits_of_token_by_token_decode(folder, monkeypatch):
    from edgeattn.runtimes import ContextFullError, session

    lm = EdgeLM.load(folder)
    ids = np.random.default_rng(3).integers(0, lm.manifest.model.vocab_size, size=(2, 40))
    lm.reset(2)
    for position in range(ids.shape[1]):  # the reference: one session run per token
        expected = lm.forward(ids[:, position:position + 1])
    runs = []
    original = EdgeLM._run
    monkeypatch.setattr(session, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(EdgeLM, "_run", lambda self, chunk: runs.append(chunk.shape[1]) or original(self, chunk))
    lm.reset(2)
    np.testing.assert_allclose(lm.forward(ids), expected, rtol=0, atol=1e-4)
    assert runs == [16, 16, 8] and lm.length == 40
    with pytest.raises(ContextFullError):
        lm.forward(ids)  # 80 > 64: refused before any chunk runs
    assert runs == [16, 16, 8] and lm.length == 40


def test_greedy_generation_is_deterministic_and_sampling_is_seeded(folder):
    lm = EdgeLM.load(folder)
    assert generate(lm, "hello", 8).tokens == generate(lm, "hello", 8).tokens
    config = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    first = generate(lm, "hello", 8, config).tokens
    assert generate(lm, "hello", 8, config).tokens == first


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    picks = {next_token(logits, SamplingConfig(temperature=1.0, top_k=2, seed=0), rng) for _ in range(200)}
    assert picks == {0, 1}
    # top_p 0.7: the smallest prefix of the sorted distribution reaching 0.7 is {0, 1} (0.5 + 0.3)
    picks = {next_token(logits, SamplingConfig(temperature=1.0, top_p=0.7, seed=0), rng) for _ in range(200)}
    assert picks == {0, 1}
    assert next_token(logits, SamplingConfig(), rng) == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0)])
def test_bad_sampling_options(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_stop_tokens_end_generation(folder):
    lm = EdgeLM.load(folder)
    first = generate(lm, "hello", 16).tokens
    stop_at = next((k for k in range(1, len(first)) if first[k] not in first[:k]), None)
    assert stop_at is not None, f"greedy output too repetitive to pick a stop token: {first}"
    lm.manifest = dataclasses.replace(lm.manifest, model=dataclasses.replace(lm.manifest.model,
                                                                            eos_token_ids=[first[stop_at]]))
    result = generate(lm, "hello", 16)
    assert result.tokens == first[:stop_at] and result.stop == "eos"


def test_cuda_request_falls_back_to_cpu_with_a_message(folder, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here; the fallback path does not apply")
    lm = EdgeLM.load(folder, provider="cuda")
    assert lm.provider == "cpu"
    assert "falling back to CPU" in caplog.text  # a warning of the edgeattn logger: the CLI shows it


def test_cuda_provider_matches_cpu(folder):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA execution provider on this machine (run on a GPU machine to test it)")
    ids = np.array([list(range(30, 50))])
    cpu, cuda = EdgeLM.load(folder), EdgeLM.load(folder, provider="cuda")
    cpu.reset(1)
    cuda.reset(1)
    assert np.abs(cpu.forward(ids) - cuda.forward(ids)).max() < 1e-3
