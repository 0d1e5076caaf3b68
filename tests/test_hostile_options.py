"""Hostile options, paths and texts: one line and exit 2 before any model loads; Ctrl-C exits 130.

Checks that happen before loading are proven by making every model loader fail the test
(``never_loads``): a check that ran after a load would end in that AssertionError instead.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeattn.cli import main

CAPACITY = 32
LENGTHS = ("--prefill", "8", "--steps", "4", "--greedy-tokens", "8")  # validate within CAPACITY
NOT_UTF8 = b"caf\xe9 au lait\n" * 20


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def one_line_exit_2(result, *needles: str) -> str:
    """The error line of a run that must fail with exit 2 and print nothing else."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def folder(converted) -> Path:
    return converted("tiny-llama", max_length=CAPACITY)[0]


@pytest.fixture
def never_loads(monkeypatch):
    """Every way a command loads a model or a folder fails the test."""
    import edgeattn.convert
    import edgeattn.evaluation.quality_report
    import edgeattn.evaluation.validate
    from edgeattn.runtimes import golden, profile
    from edgeattn.runtimes.session import EdgeLM

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    for module in (edgeattn.convert, edgeattn.evaluation.quality_report, edgeattn.evaluation.validate):
        monkeypatch.setattr(module, "load", loaded)
    monkeypatch.setattr(EdgeLM, "load", classmethod(loaded))
    monkeypatch.setattr(golden, "read_manifest", loaded)
    monkeypatch.setattr(edgeattn.evaluation.validate, "read_manifest", loaded)
    monkeypatch.setattr(profile, "read_manifest", loaded)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


# -- file-system errors: probed before loading, reported in one line while writing ----------

def test_output_under_a_file_is_refused_before_loading(never_loads, a_file):
    one_line_exit_2(run("convert", "tiny-llama", "-o", a_file / "sub" / "out"), "output folder", str(a_file),
                    "not a folder")


@pytest.mark.parametrize("flag", ["--json", "--junit-xml"])
def test_validate_report_under_a_file_is_refused_before_loading(never_loads, a_file, tmp_path, flag):
    one_line_exit_2(run("validate", tmp_path, flag, a_file / "report"), flag, "not a folder")
    one_line_exit_2(run("validate", tmp_path, "--golden", flag, a_file / "report"), flag, "not a folder")


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_profile_report_under_a_file_is_refused_before_loading(never_loads, a_file, tmp_path, flag):
    one_line_exit_2(run("profile", tmp_path, flag, a_file / "report"), flag, "not a folder")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_output_folder_is_refused_before_loading(never_loads, monkeypatch, tmp_path, code):
    """Root may write anywhere, so the refusal of the probe file is simulated."""
    real_mkstemp = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path:
            raise OSError(code, os.strerror(code), str(tmp_path))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    one_line_exit_2(run("convert", "tiny-llama", "-o", tmp_path / "new" / "out"), str(tmp_path), os.strerror(code))
    one_line_exit_2(run("validate", tmp_path, "--golden", "--json", tmp_path / "r.json"), os.strerror(code))
    assert list(tmp_path.iterdir()) == []


def test_probe_leaves_nothing_behind(tmp_path):
    from edgeattn.user_paths import check_writable

    check_writable(tmp_path / "deeper" / "out", "-o/--output")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_convert_is_one_line_and_publishes_nothing(monkeypatch, tmp_path):
    import edgeattn.convert as convert_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert_module, "write_manifest", full)
    out = tmp_path / "out"
    result = run("convert", "tiny-llama", "-o", out, "--max-length", CAPACITY, "--json")
    one_line_exit_2(result, f"cannot write {out}", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_a_report_leaves_no_partial_file(monkeypatch, folder, tmp_path):
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.parent == tmp_path:
            real_write_text(self, "half")  # as much as fitted
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    result = run("validate", folder, "--golden", "--json", tmp_path / "report.json")
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].endswith("No space left on device")
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# -- flags: checked before loading ------------------------------------------------------------

@pytest.mark.parametrize("size", ["0", "7", "8", "48", "512", "-32"])
def test_weights_block_size_must_be_one_matmulnbits_accepts(never_loads, tmp_path, size):
    one_line_exit_2(run("convert", "tiny-llama", "-o", tmp_path / "out", "--weights", "int4",
                        "--weights-block-size", size), "block_size", "16, 32, 64, 128, 256", size)


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--temperature", "nan", "temperature"), ("--temperature", "inf", "temperature"),
    ("--temperature", "-0.5", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
    ("--top-p", "nan", "top_p"), ("--top-k", "-1", "top_k"), ("--seed", "-1", "seed"),
    ("--max-new-tokens", "0", "--max-new-tokens"),
])
def test_sampling_flags_are_checked_before_loading(never_loads, tmp_path, flag, value, needle):
    one_line_exit_2(run("generate", tmp_path, "hello", flag, value), needle, value)


def test_top_k_above_the_vocabulary_is_refused_before_generating(folder):
    vocab = json.loads((folder / "edgeattn.json").read_text())["model"]["vocab_size"]
    one_line_exit_2(run("generate", folder, "hello", "--temperature", "1", "--top-k", vocab + 1),
                    "top_k", str(vocab + 1), f"vocabulary of {vocab}")
    assert run("generate", folder, "hello", "--temperature", "1", "--top-k", vocab, "--seed", "1",
               "--max-new-tokens", "2").exit_code == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.1"])
@pytest.mark.parametrize("golden", [False, True])
def test_thresholds_must_be_finite_and_not_negative(never_loads, tmp_path, value, golden):
    args = ["validate", tmp_path, "--max-kl", value] + (["--golden"] if golden else [])
    one_line_exit_2(run(*args), "max_kl", "finite")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_recipe_thresholds_must_be_finite_and_not_negative(never_loads, tmp_path, value):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[validate]\nmax_kl = {value}\n")
    one_line_exit_2(run("validate", tmp_path, "--recipe", recipe), str(recipe), "max_kl")


@pytest.mark.parametrize(("args", "needle"), [
    (("--context", "0"), "context"), (("--context", "-5"), "context"), (("--context", "1"), "context"),
    (("--max-windows", "0"), "max_windows"),
])
def test_quality_windows_are_checked_before_loading(never_loads, args, needle):
    one_line_exit_2(run("quality", "tiny-llama", *args), needle)


def test_quality_context_zero_through_the_api_is_one_error():
    import torch

    from edgeattn.errors import EdgeattnError
    from edgeattn.evaluation.perplexity import perplexity

    with pytest.raises(EdgeattnError, match="context"):
        perplexity(None, torch.arange(100), context=0)


@pytest.mark.parametrize("command", ["generate", "validate", "profile"])
@pytest.mark.parametrize("threads", ["0", "-2", str((os.cpu_count() or 1) + 1), "100000"])
def test_threads_between_one_and_the_core_count(never_loads, tmp_path, command, threads):
    args = [command, tmp_path] + (["hello"] if command == "generate" else []) + ["--threads", threads]
    one_line_exit_2(run(*args), "--threads", threads)


@pytest.mark.parametrize("flag", ["--contexts", "--prompt-lengths"])
@pytest.mark.parametrize("value", [",", "", " , "])
def test_profile_lists_that_name_nothing_are_refused(never_loads, tmp_path, flag, value):
    one_line_exit_2(run("profile", tmp_path, flag, value), flag)


# -- texts that are not UTF-8 -----------------------------------------------------------------

@pytest.mark.parametrize(("command", "flag"), [
    ("convert", "--calibration-text"), ("convert", "--recipe"), ("quality", "--text"),
    ("quality", "--calibration-text"), ("validate", "--text"), ("validate", "--calibration-text"),
    ("validate", "--recipe"),
])
def test_text_files_that_are_not_utf8_are_named_before_loading(never_loads, tmp_path, command, flag):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(NOT_UTF8)
    target = {"convert": ["tiny-llama", "-o", tmp_path / "out"], "quality": ["tiny-llama"],
              "validate": [tmp_path]}[command]
    one_line_exit_2(run(command, *target, flag, bad), flag, str(bad), "UTF-8")


def test_missing_text_file_is_named_before_loading(never_loads, tmp_path):
    one_line_exit_2(run("convert", "tiny-llama", "-o", tmp_path / "out", "--calibration-text", tmp_path / "nope.txt"),
                    "--calibration-text", "nope.txt", "does not exist")


def test_calibration_text_not_utf8_through_the_api(tmp_path):
    from edgeattn.errors import EdgeattnError
    from edgeattn.evaluation.calibration import read_text

    bad = tmp_path / "latin1.txt"
    bad.write_bytes(NOT_UTF8)
    with pytest.raises(EdgeattnError, match="latin1.txt.*UTF-8"):
        read_text(bad)


def test_prompt_that_is_not_utf8_is_one_line(folder):
    """A non-UTF-8 command-line argument reaches Python as lone surrogates (PEP 383)."""
    prompt = os.fsdecode(b"caf\xe9")
    one_line_exit_2(run("generate", folder, prompt), "prompt", "UTF-8")


@pytest.mark.parametrize(("args", "needle"), [
    (("--kv-residual", "8"), "kv_residual needs kv_cache int8 or int4 with kv_quant per-token"),
    (("--kv-residual", "8", "--kv-cache", "int4", "--kv-quant", "per-token", "--window", "64"), "full KV cache only"),
    (("--kv-residual", "8", "--kv-cache", "int4", "--kv-quant", "per-token", "--attention-op", "edgeattn"),
     "edgeattn: a residual window"),
    (("--kv-heads", "1", "--uptrain-minutes", "0"), "uptrain_minutes must be a finite number of minutes > 0"),
    (("--kv-heads", "1", "--uptrain-minutes", "nan"), "uptrain_minutes must be a finite"),
    (("--kv-heads", "1", "--uptrain-minutes", "5", "--uptrain-steps", "3"), "not both"),
    (("--uptrain-minutes", "5"), "uptrain_minutes needs kv_heads"),
    (("--kv-residual", "64", "--kv-cache", "int4", "--kv-quant", "per-token", "--max-length", "64"),
     "kv_residual 64 must be below max_length 64"),
])
def test_residual_and_distillation_budget_flags_are_checked_before_loading(never_loads, tmp_path, args, needle):
    one_line_exit_2(run("convert", "tiny-llama", "-o", tmp_path / "out", *args), needle)


# -- recipes ----------------------------------------------------------------------------------

def test_a_distillation_budget_flag_replaces_the_recipes_step_count(monkeypatch, tmp_path):
    import edgeattn.convert

    seen = {}

    def convert(options, progress=None):
        seen["spec"] = options.spec
        raise edgeattn.convert.InvalidOptionError("stop here")

    monkeypatch.setattr(edgeattn.convert, "convert", convert)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[spec]\nkv_heads = 1\nuptrain_steps = 240\n")
    one_line_exit_2(run("convert", "tiny-llama", "-o", tmp_path / "out", "--recipe", recipe,
                        "--uptrain-minutes", "5"), "stop here")
    assert seen["spec"].uptrain_minutes == 5 and seen["spec"].uptrain_steps == 0 and seen["spec"].kv_heads == 1


@pytest.mark.parametrize("body", [
    "[spec]\nwindow = true\n", "[spec]\nkv_heads = 1.5\n", "[spec]\nsinks = '4'\n", "[spec]\nblock_mass = 'x'\n",
    "[spec]\ngqa_method = 3\n", "[spec]\nuptrain_steps = false\n", "[convert]\nmax_length = \"big\"\n",
    "[spec]\nuptrain_minutes = 'ten'\n", "[spec]\nkv_residual = 1.5\n",
    "[convert]\nmax_length = true\n", "[convert]\nweights = 4\n", "[convert]\nblock_size = 32.0\n",
    "[convert]\ncalibration_text = 7\n", "[spec]\nwindow = [1, 2]\n", "[convert]\nweights = {a = 1}\n",
])
def test_recipe_values_of_the_wrong_type_are_named_before_loading(never_loads, tmp_path, body):
    recipe = tmp_path / "r.toml"
    recipe.write_text(body)
    key = body.split("\n")[1].split(" =")[0]
    one_line_exit_2(run("convert", "tiny-llama", "-o", tmp_path / "out", "--recipe", recipe), str(recipe), key)


@pytest.mark.parametrize(("body", "needle"), [
    ('[convert]\nweights = "int3"\n', "int3"), ('[convert]\nattention_op = "fast"\n', "fast"),
    ('[convert]\nprovider = "tpu"\n', "tpu"), ("[convert]\nblock_size = 7\n", "block_size"),
    ("[convert]\nmax_length = 1\n", "max_length"),
])
def test_recipe_values_out_of_range_are_refused_before_loading(never_loads, tmp_path, body, needle):
    recipe = tmp_path / "r.toml"
    recipe.write_text(body)
    one_line_exit_2(run("convert", "tiny-llama", "-o", tmp_path / "out", "--recipe", recipe), needle)


def test_convert_api_refuses_unknown_choices_before_loading(never_loads, tmp_path):
    from edgeattn.convert import ConvertOptions, convert
    from edgeattn.errors import EdgeattnError

    for bad in ({"weights": "int3"}, {"attention_op": "fast"}, {"provider": "tpu"}, {"weights_block_size": 7}):
        with pytest.raises(EdgeattnError):
            convert(ConvertOptions("tiny-llama", tmp_path / "out", **bad))


def test_recipe_lengths_with_golden_are_refused(never_loads, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[validate]\nsteps = 8\nmin_top1 = 0.9\n")
    one_line_exit_2(run("validate", tmp_path, "--golden", "--recipe", recipe), "golden.npz", "steps", str(recipe))


def test_recipe_thresholds_with_golden_still_apply(folder, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[validate]\nmin_top1 = 1.5\n")  # no agreement reaches 1.5: must fail
    result = run("validate", folder, "--golden", "--recipe", recipe, "--json", "-")
    assert result.exit_code == 1, result.output


# -- Ctrl-C: exit 130, one line, nothing at OUT -----------------------------------------------

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_convert_exits_130_and_leaves_nothing(monkeypatch, tmp_path):
    import edgeattn.convert as convert_module

    monkeypatch.setattr(convert_module, "check_graph", _interrupt)
    result = run("convert", "tiny-llama", "-o", tmp_path / "out", "--max-length", CAPACITY, "--json")
    assert result.exit_code == 130, result.output
    assert result.output.strip() == "edgeattn: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_quality_exits_130(monkeypatch):
    import edgeattn.evaluation.quality_report

    monkeypatch.setattr(edgeattn.evaluation.quality_report, "perplexity", _interrupt)
    result = run("quality", "tiny-llama", "--context", "64", "--json")
    assert result.exit_code == 130 and result.output.strip() == "edgeattn: interrupted", result.output


@pytest.mark.parametrize("golden", [True, False])
def test_ctrl_c_during_validate_exits_130_and_writes_no_report(monkeypatch, folder, tmp_path, golden):
    from edgeattn.runtimes import golden as golden_module

    monkeypatch.setattr(golden_module, "teacher_forced_logits", _interrupt)
    args = ["validate", folder, "--json", tmp_path / "r.json", *(["--golden"] if golden else LENGTHS)]
    result = run(*args)
    assert result.exit_code == 130, result.output
    assert result.output.splitlines()[-1] == "edgeattn: interrupted" and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_generate_prints_what_was_generated(monkeypatch, folder):
    from edgeattn.runtimes.session import EdgeLM

    real_forward, calls = EdgeLM.forward, []

    def interrupted_later(self, input_ids):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_forward(self, input_ids)

    monkeypatch.setattr(EdgeLM, "forward", interrupted_later)
    result = run("generate", folder, "hello", "--json", "--max-new-tokens", "10")
    assert result.exit_code == 130
    *body, last = result.output.strip().splitlines()
    generated = json.loads("\n".join(body))
    assert last == "edgeattn: interrupted"
    assert generated["stop"] == "interrupted" and generated["new_tokens"] == 3


# -- stops of generate ------------------------------------------------------------------------

def test_full_cache_stops_generate_with_json_and_a_reason(folder):
    result = run("generate", folder, "hello", "--json", "--max-new-tokens", "100")
    assert result.exit_code == 0, result.output
    generated = json.loads(result.output)
    assert generated["stop"] == "cache_full"
    assert generated["new_tokens"] == CAPACITY - len("hello") + 1  # byte tokenizer: one token per character
    assert len(generated["token_ids"]) == generated["new_tokens"]


def test_full_cache_stop_is_said_on_stderr_in_text_mode(folder):
    result = run("generate", folder, "hello", "--max-new-tokens", "100")
    assert result.exit_code == 0 and "KV cache full" in result.output.splitlines()[-1]


def test_every_stop_has_a_reason(folder):
    from edgeattn.runtimes import EdgeLM, generate

    lm = EdgeLM.load(folder)
    assert generate(lm, "hello", 3).to_dict()["stop"] == "max_new_tokens"
    first = generate(lm, "hello", 3).tokens[0]
    lm.manifest = dataclasses.replace(lm.manifest, model=dataclasses.replace(lm.manifest.model, eos_token_ids=[first]))
    stopped = generate(lm, "hello", 3)
    assert stopped.to_dict()["stop"] == "eos" and stopped.tokens == []


# -- what convert records and defaults --------------------------------------------------------

def test_manifest_records_the_calibration_text_by_name_and_hash(tmp_path):
    import hashlib

    text = tmp_path / "private" / "my-calibration.txt"
    text.parent.mkdir()
    text.write_text("The calibration text of this test. " * 80, encoding="utf-8")
    out = tmp_path / "out"
    assert run("convert", "tiny-llama", "-o", out, "--kv-heads", "1", "--max-length", CAPACITY,
               "--calibration-text", text, "--json").exit_code == 0
    raw = (out / "edgeattn.json").read_text()
    assert str(tmp_path) not in raw and "private" not in raw
    record = json.loads(raw)["calibration"]
    assert record["text"] == "my-calibration.txt"
    assert record["sha256"] == hashlib.sha256(text.read_text(encoding="utf-8").encode()).hexdigest()

    lengths = LENGTHS
    one_line_exit_2(run("validate", out, *lengths), "my-calibration.txt", "--calibration-text")
    wrong = tmp_path / "other.txt"
    wrong.write_text("Another text entirely, not the one convert used. " * 80, encoding="utf-8")
    one_line_exit_2(run("validate", out, *lengths, "--calibration-text", wrong), "sha256", "my-calibration.txt")
    passed = run("validate", out, *lengths, "--calibration-text", text, "--json", "-")
    assert passed.exit_code == 0, passed.output


def test_convert_tiny_gpt2_defaults_to_its_position_limit(tmp_path):
    out = tmp_path / "out"
    result = run("convert", "tiny-gpt2", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "edgeattn.json").read_text())
    assert manifest["model"]["max_length"] == 512  # tiny-gpt2 has 512 learned positions
    summary = json.loads(result.output)
    assert summary["max_length"] == 512 and summary["max_length_source"] == "the model's position limit"
    one_line_exit_2(run("convert", "tiny-gpt2", "-o", tmp_path / "again", "--max-length", "2048", "--json"),
                    "2048", "512 learned positions")


# -- errors from other libraries: one line ----------------------------------------------------

def test_multi_line_errors_are_condensed_to_one_line(monkeypatch, tmp_path):
    import edgeattn.evaluation.quality_report
    from edgeattn.models import ModelLoadError

    def failing(*args, **kwargs):
        raise ModelLoadError("model/config.json: cannot be read (Unrecognized model.\n\n  Should have a\n"
                             "`model_type` key\n)")

    monkeypatch.setattr(edgeattn.evaluation.quality_report, "load", failing)
    line = one_line_exit_2(run("quality", "tiny-llama", "--json"))
    assert "Unrecognized model. Should have a `model_type` key )" in line


def test_unknown_model_type_from_transformers_is_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-family"}')
    (model / "model.safetensors").write_bytes(b"")
    one_line_exit_2(run("quality", model, "--json"), str(model))


# -- docs/promises.md names only tests that exist ---------------------------------------------------

def test_every_promise_names_tests_that_exist():
    import ast
    import re

    root = Path(__file__).resolve().parent.parent
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (root / "docs" / "promises.md").read_text(encoding="utf-8"))
    assert len(cited) > 40
    missing = []
    for file, name in cited:
        tree = ast.parse((root / file).read_text(encoding="utf-8"))
        if name not in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}:
            missing.append(f"{file}::{name}")
    assert not missing, missing
