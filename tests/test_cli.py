"""The edgeattn command: help with examples, JSON output, exit codes, atomic outputs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeattn.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", ["models", "quality", "convert", "generate"])
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Example:" in result.output


def test_models_json():
    listing = json.loads(run("models", "--json").output)
    assert listing["families"] == ["gpt2", "llama", "mistral", "phi3", "qwen2"]
    assert "smollm2" in listing["builtin"] and "tiny-llama" in listing["builtin"]


def test_quality_json_on_a_tiny_model():
    result = run("quality", "tiny-llama", "--window", "32", "--sinks", "2", "--kv-cache", "int8",
                 "--context", "128", "--max-windows", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tokens"] == 2 * 127
    assert report["rewritten"]["kv_bytes_per_token"] == report["original"]["kv_bytes_per_token"] // 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("quality", "no-such-model"), "no model named"),
        (("quality", "tiny-llama", "--sinks", "4"), "sinks needs window"),
        (("quality", "tiny-llama", "--kv-heads", "3"), "must divide"),
        (("convert", "tiny-llama", "-o", "{tmp}/x", "--sinks", "2", "--window", "8", "--attention-op", "ort"),
         "attention sinks have no onnxruntime op"),
        (("generate", "{tmp}/missing", "hi"), "no such folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run(*[arg.replace("{tmp}", str(tmp_path)) for arg in args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_convert_json_generate_and_force(tmp_path):
    out = tmp_path / "out"
    result = run("convert", "tiny-qwen2", "-o", str(out), "--kv-heads", "1", "--max-length", "64", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["numerics"]["passed"] and summary["kv_bytes_per_token"] == 2 * 2 * 1 * 16 * 4
    generated = json.loads(run("generate", str(out), "hello", "--max-new-tokens", "4", "--json").output)
    assert generated["new_tokens"] <= 4 and "time_to_first_token_s" in generated

    again = run("convert", "tiny-qwen2", "-o", str(out), "--max-length", "64")
    assert again.exit_code == 2 and "already exists" in again.output
    assert json.loads((out / "edgeattn.json").read_text())["spec"]["kv_heads"] == 1  # untouched

    forced = run("convert", "tiny-qwen2", "-o", str(out), "--max-length", "64", "--force", "--json")
    assert forced.exit_code == 0
    assert json.loads((out / "edgeattn.json").read_text())["spec"]["kv_heads"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folders left behind


def test_recipe_sets_the_same_keys_and_flags_win(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[spec]\nkv_heads = 1\nkv_cache = "int8"\n\n[convert]\nmax_length = 48\nweights = "int8"\n')
    out = tmp_path / "out"
    result = run("convert", "tiny-llama", "-o", str(out), "--recipe", str(recipe), "--kv-cache", "int4", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "edgeattn.json").read_text())
    assert manifest["spec"]["kv_heads"] == 1 and manifest["spec"]["kv_cache"] == "int4"  # the flag wins
    assert manifest["model"]["max_length"] == 48 and manifest["weights"]["dtype"] == "int8"


def test_bad_recipe(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[spec]\ncolour = 'blue'\n")
    result = run("convert", "tiny-llama", "-o", str(tmp_path / "out"), "--recipe", str(recipe))
    assert result.exit_code == 2 and "unknown [spec] keys: colour" in result.output


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    import edgeattn.convert as convert_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "check_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(convert_module.ConvertOptions("tiny-llama", tmp_path / "out", max_length=32))
    assert list(tmp_path.iterdir()) == []


def test_failed_numerics_check_exits_1_and_publishes_nothing(tmp_path, monkeypatch):
    import edgeattn.convert as convert_module

    monkeypatch.setattr(convert_module, "FP32_LOGIT_TOLERANCE", 0.0)
    result = run("convert", "tiny-llama", "-o", str(tmp_path / "out"), "--max-length", "32")
    assert result.exit_code == 1 and "disagrees with PyTorch" in result.output
    assert list(tmp_path.iterdir()) == []


def test_quantized_weights_beyond_bounds_exit_1_and_publish_nothing(tmp_path, monkeypatch):
    import edgeattn.convert as convert_module

    monkeypatch.setitem(convert_module.WEIGHT_BOUNDS, "int8", {"max_kl": -1.0, "min_top1": 0.0})  # no KL is < 0
    result = run("convert", "tiny-llama", "-o", str(tmp_path / "out"), "--max-length", "32", "--weights", "int8")
    assert result.exit_code == 1 and "int8 weights move the logits beyond" in result.output
    assert list(tmp_path.iterdir()) == []


def test_optimum_cli_finds_the_edgeattn_exporter(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    optimum_cli = Path(sys.executable).parent / "optimum-cli"  # installed beside this interpreter
    assert optimum_cli.is_file(), "optimum (a convert dependency) should install optimum-cli"
    out = tmp_path / "out"
    command = [str(optimum_cli), "export", "edgeattn", "tiny-llama", "-o", str(out), "--max-length", "32", "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["numerics"]["passed"]
    assert (out / "edgeattn.json").is_file()
