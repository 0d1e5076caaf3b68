"""edgeattn validate: correct exports pass, broken ones fail naming the metric, bad folders exit 2,
golden mode runs without torch, reports (JSON, JUnit) are written as documented."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgeattn.cli import main
from edgeattn.convert import ConvertOptions, convert
from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens, default_calibration_text
from edgeattn.models import load
from edgeattn.rewrites import rewrite
from edgeattn.runtimes.golden import provider_comparisons, read_golden
from edgeattn.runtimes.manifest import file_hashes, read_manifest
from edgeattn.runtimes.thresholds import default_bounds
from edgeattn.spec import AttentionSpec

# Small lengths keep every validate run to a few seconds on the tiny models.
LENGTHS = ("--prefill", "8", "--steps", "16", "--greedy-tokens", "8")
SPEC = AttentionSpec(kv_heads=1, kv_cache="int8")  # calibrated GQA + calibrated KV scales: exercises the rebuild


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(converted) -> Path:
    return converted("tiny-llama", SPEC, max_length=64)[0]


@pytest.fixture(scope="module")
def window_folder(converted) -> Path:
    return converted("tiny-llama", AttentionSpec(window=12), max_length=96)[0]


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_graph(folder: Path, edit) -> None:
    """Load the folder's ONNX model with its weights, apply ``edit``, save it back in place, and record the new
    files' sha256 as a convert that exported this graph would have (so validate judges the numerics)."""
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    edit(model)
    (folder / "model.onnx.data").unlink()
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
    manifest = json.loads((folder / "edgeattn.json").read_text())
    manifest["sha256"] = file_hashes(folder)
    (folder / "edgeattn.json").write_text(json.dumps(manifest))


def _perturb_a_weight(model: onnx.ModelProto) -> None:
    """Add noise (10% of the mean magnitude) to the largest weight matrix (rotary tables excluded)."""
    candidates = [init for init in model.graph.initializer if len(init.dims) == 2
                  and init.data_type == onnx.TensorProto.FLOAT and not init.name.endswith(("cos_cache", "sin_cache"))]
    target = max(candidates, key=lambda init: int(np.prod(init.dims)))
    weight = onnx.numpy_helper.to_array(target)
    noisy = weight + 0.1 * np.abs(weight).mean() * np.random.default_rng(0).standard_normal(weight.shape)
    target.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(weight.dtype), target.name))


def test_help_has_examples_and_every_threshold_flag():
    result = run("validate", "--help")
    assert result.exit_code == 0 and "Example:" in result.output
    for flag in ("--max-kl", "--min-top1", "--max-ppl-delta", "--golden", "--junit-xml", "--provider"):
        assert flag in result.output


def test_convert_writes_golden_and_the_calibration_record(folder):
    manifest = read_manifest(folder)
    assert manifest.files.golden == "golden.npz"
    assert manifest.calibration.text == "packaged" and len(manifest.calibration.sha256) == 64
    golden = read_golden(folder, manifest)
    # Independent reference: the tiny model rewritten here, one plain causal pass per prompt.
    model = load("tiny-llama")
    rewrite(model.decoder, SPEC, calibration_ids(model.tokenizer, None, calibration_tokens(SPEC)))
    ids = model.tokenizer.encode(default_calibration_text()).ids
    length = golden.input_ids.shape[1]
    for prompt, row_logits, stream in zip(golden.input_ids, golden.logits, golden.greedy_tokens):
        assert prompt.tolist() in [ids[k:k + length] for k in range(0, len(ids), length)]
        with torch.no_grad():
            expected = model.decoder(torch.tensor([prompt[:-1].tolist()]))[0, golden.prefill - 1:].numpy()
            sequence = prompt[:golden.prefill].tolist()
            for _ in range(len(stream)):
                sequence.append(int(model.decoder(torch.tensor([sequence]))[0, -1].argmax()))
        np.testing.assert_allclose(row_logits, expected, atol=1e-5)
        assert stream.tolist() == sequence[golden.prefill:]


def test_correct_export_passes_and_writes_json_and_junit(folder, tmp_path):
    report_path, junit_path = tmp_path / "report.json", tmp_path / "report.xml"
    result = run("validate", folder, *LENGTHS, "--json", report_path, "--junit-xml", junit_path)
    assert result.exit_code == 0, result.output
    assert "validate: passed (exit 0" in result.stdout and "export:cpu" in result.stdout
    report = json.loads(report_path.read_text())
    assert (report["schema"], report["schema_version"], report["mode"]) == ("edgeattn.validate", 1, "pytorch")
    assert report["passed"] and report["exit_code"] == 0 and report["failures"] == []
    assert report["reference_check"]["passed"]  # the rebuilt calibrated rewrite matches golden.npz
    export, cost = report["comparisons"]
    assert (export["name"], cost["name"]) == ("export:cpu", "rewrite:cpu")
    assert export["metrics"]["rows"] == 2 * (16 + 1) and export["metrics"]["greedy_tokens"] == 8
    assert export["metrics"]["kl_mean"] < 1e-6
    assert {check["key"] for check in export["checks"]} == set(default_bounds("fp32", "int8", False, {}))
    assert cost["checks"] == []  # the rewrite cost is only gated by the user's bounds
    assert 10.0 < cost["metrics"]["kv_sqnr_db"] < 60.0  # int8 per-channel keys/values of a random model
    suites = ET.parse(junit_path).getroot()
    assert [suite.get("name") for suite in suites] == ["export:cpu", "rewrite:cpu"]
    cases = suites[0].findall("testcase")
    assert [case.get("name") for case in cases] == [k for k, v in export["metrics"].items() if not isinstance(v, list)]
    assert suites.get("failures") == "0"


def test_user_bounds_from_flags_and_recipe(folder, tmp_path, monkeypatch):
    report_path = tmp_path / "report.json"
    # the rewrite-cost comparison is gated once the user sets a bound: MQA + int8 KV changes the model
    result = run("validate", folder, *LENGTHS, "--min-top1", "1.0", "--json", report_path)
    assert result.exit_code == 1
    report = json.loads(report_path.read_text())
    assert report["failures"] and all(line.startswith("rewrite:cpu: top1_agreement = ") for line in report["failures"])
    assert "bound >= 1 (min_top1, user)" in report["failures"][0]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[validate]\nmin_top1 = 1.0\nsteps = 16\n")
    assert run("validate", folder, "--prefill", "8", "--greedy-tokens", "8", "--recipe", recipe).exit_code == 1
    flag_wins = run("validate", folder, "--prefill", "8", "--greedy-tokens", "8", "--recipe", recipe,
                    "--min-top1", "0.0", "--json", report_path)
    assert flag_wins.exit_code == 0, flag_wins.output
    assert json.loads(report_path.read_text())["settings"]["steps"] == 16  # the recipe's length


def test_perturbed_weight_fails_with_exit_1_and_names_the_metric(folder, tmp_path):
    broken = _copy(folder, tmp_path)
    _edit_graph(broken, _perturb_a_weight)
    report_path = tmp_path / "report.json"
    result = run("validate", broken, *LENGTHS, "--json", report_path)
    assert result.exit_code == 1
    failed = {check["metric"] for check in json.loads(report_path.read_text())["comparisons"][0]["checks"]
              if not check["passed"]}
    assert {"kl_mean", "top1_agreement"} <= failed  # measured: KL 4.4e-3 > 1e-3, top-1 0.85 < 0.9
    for metric in failed:
        assert f"FAIL export:cpu: {metric} = " in result.stdout
    golden = run("validate", broken, "--golden")  # the device-side check sees it too
    assert golden.exit_code == 1 and "FAIL golden:cpu: kl_mean = " in golden.stdout


def test_window_beyond_its_length_passes_and_a_wrong_window_fails(window_folder, tmp_path):
    lengths = ("--prefill", "8", "--steps", "40", "--greedy-tokens", "24")  # 48 tokens through a 12-token window
    assert run("validate", window_folder, *lengths).exit_code == 0

    def narrower_window(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.name == "local_window_size":
                    attribute.i = 6

    broken = _copy(window_folder, tmp_path)
    _edit_graph(broken, narrower_window)
    result = run("validate", broken, *lengths)
    assert result.exit_code == 1 and "FAIL export:cpu: top1_agreement = " in result.stdout


def _golden_without_torch(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``edgeattn validate --golden`` in a fresh interpreter where the conversion stack cannot be imported."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'onnxscript', 'jinja2', 'rich'):\n"
        "            raise ImportError(f'{name} is blocked: golden mode must not need it')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgeattn.cli import main\n"
        f"main(['validate', {str(folder)!r}, '--golden', *{list(args)!r}])\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def test_golden_mode_runs_without_torch(folder, tmp_path):
    report_path = tmp_path / "golden.json"
    result = _golden_without_torch(folder, "--json", str(report_path), "--junit-xml", str(tmp_path / "golden.xml"))
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(report_path.read_text())
    assert report["mode"] == "golden" and report["passed"]
    assert [c["name"] for c in report["comparisons"]] == ["golden:cpu"]
    assert report["comparisons"][0]["metrics"]["max_abs_error"] < 1e-4
    assert ET.parse(tmp_path / "golden.xml").getroot().get("failures") == "0"


@pytest.mark.parametrize(
    ("damage", "args", "message"),
    [
        ("missing folder", (), "no such folder"),
        ("garbage model", (), "model.onnx does not match the sha256 in the manifest"),
        ("garbage golden", ("--golden",), "unreadable golden file"),
        ("changed calibration", (), "changed since convert"),
        ("missing calibration", (), "is not available here"),
        ("other source weights", (), "is not the model this folder was converted from"),
        ("nothing", ("--provider", "cuda"), "is not available in this onnxruntime build"),
        ("nothing", ("--golden", "--steps", "4"), "--steps do not apply"),
        ("nothing", ("--steps", "1000"), "more than this folder runs"),
        ("nothing", ("--prompts", "1000"), "give a longer --text"),
        ("nothing", ("--calibration-text", "{tmp}/other.txt"), "differs from the one convert exported"),
    ],
)
def test_bad_input_exits_2_with_one_line(folder, tmp_path, damage, args, message):
    target = _copy(folder, tmp_path)
    manifest_path = target / "edgeattn.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "missing folder":
        target = tmp_path / "nope"
    elif damage == "garbage model":
        (target / "model.onnx").write_bytes(b"\x00garbage" * 10)
    elif damage == "garbage golden":
        (target / "golden.npz").write_bytes((target / "golden.npz").read_bytes()[:200])
    elif damage == "changed calibration":
        manifest["calibration"]["sha256"] = "0" * 64
    elif damage == "missing calibration":
        manifest["calibration"]["text"] = str(tmp_path / "gone.txt")
    elif damage == "other source weights":
        manifest["source"]["weights_sha256"] = "f" * 64
    if target.exists():
        manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "other.txt").write_text("A different calibration text gives a different calibrated rewrite. " * 40)
    if args[:2] == ("--provider", "cuda"):
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA is available here")
    lengths = () if "--golden" in args else LENGTHS
    result = run("validate", target, *lengths, *[arg.replace("{tmp}", str(tmp_path)) for arg in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_validate_recipe_keys_exit_2(folder, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[validate]\nmax_colour = 1\n")
    result = run("validate", folder, "--recipe", recipe)
    assert result.exit_code == 2 and "unknown [validate] keys: max_colour" in result.output
    recipe.write_text("[validate]\nmin_top1 = 'high'\n")
    result = run("validate", folder, "--recipe", recipe)
    assert result.exit_code == 2 and "[validate] min_top1 must be a number" in result.output


def test_providers_are_compared_pairwise():
    """Two providers' runs -> one providers:a-vs-b comparison with the metrics of their difference."""
    logits = np.zeros((1, 2, 2))  # every row (1/2, 1/2)
    shifted = logits.copy()
    shifted[0, 1] = [np.log(3.0), 0.0]  # second row (3/4, 1/4)
    runs = {"cpu": (logits, [[1, 2]]), "cuda": (shifted, [[1, 3]])}
    (result,) = provider_comparisons(runs, np.array([[0, 1]]), {"max_kl_peak": (0.1, "user")})
    assert result["name"] == "providers:cpu-vs-cuda" and result["candidate"] == "onnxruntime:cuda"
    assert result["metrics"]["kl_max"] == pytest.approx(0.5 * np.log(4.0 / 3.0), abs=1e-12)
    assert result["metrics"]["first_difference"] == [1]
    assert not result["passed"] and result["checks"][0]["metric"] == "kl_max"


@pytest.mark.real_model
def test_smollm2_int8_kv_validates_and_golden_agrees(tmp_path):
    out = tmp_path / "smollm2"
    convert(ConvertOptions("smollm2", out, AttentionSpec(kv_cache="int8"), max_length=256))
    report_path = tmp_path / "report.json"
    result = run("validate", out, "--json", report_path)
    assert result.exit_code == 0, result.output
    export, cost = json.loads(report_path.read_text())["comparisons"]
    assert export["metrics"]["kl_mean"] < 1e-3 and export["metrics"]["top1_agreement"] >= 0.9
    assert cost["metrics"]["kv_sqnr_db"] > 20.0  # int8 per-channel: about 35 dB measured
    assert _golden_without_torch(out).returncode == 0


def test_folders_from_before_the_recorded_distillation_window_rebuild_with_512_tokens():
    from types import SimpleNamespace

    from edgeattn.evaluation.validate import LEGACY_UPTRAIN_WINDOW, _recorded_spec

    old = SimpleNamespace(spec={"kv_heads": 1, "gqa_method": "calibrated", "uptrain_steps": 240})
    assert _recorded_spec(old).uptrain_window == LEGACY_UPTRAIN_WINDOW == 512
    new = SimpleNamespace(spec={**old.spec, "uptrain_window": 2048})
    assert _recorded_spec(new).uptrain_window == 2048
    assert _recorded_spec(SimpleNamespace(spec={"kv_heads": 1})).uptrain_window is None
