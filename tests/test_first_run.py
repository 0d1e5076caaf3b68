"""A user's first run: the demo's commands with only what the package ships, and a quiet console.

WikiText-2 is hidden as on a user's machine (``EDGEATTN_WIKITEXT_DIR`` names a missing folder).
The commands run as a user runs them, in their own process, so that what other libraries
print at import or export time (torch's logging, transformers' progress bars) is seen too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeattn.console import ProgressDisplay
from edgeattn.evaluation.calibration import WIKITEXT_ENV, default_evaluation_text, wikitext_path
from edgeattn.evaluation.perplexity import choose_windows
from edgeattn.progress import report, reports_progress

# What other libraries print that says nothing to an edgeattn user (issue: a user's first run).
NOISE = ("torchvision", "LeafSpec", "The axis name", "Converting and de-quantizing", "Loading weights",
         "Warning:", "it/s]")
# The demo's flags (Makefile: demo), on a tiny model.
DEMO_SPEC = ["--window", "512", "--sinks", "4", "--kv-cache", "int8"]


def edgeattn(*args: str, tmp_path, verbose: bool = False) -> subprocess.CompletedProcess:
    """Run the edgeattn command in a fresh process with WikiText-2 hidden."""
    environment = {**os.environ, WIKITEXT_ENV: str(tmp_path / "no-wikitext")}
    for name in ("TORCH_LOGS", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        environment.pop(name, None)  # as a user's shell has them: unset
    command = [sys.executable, "-m", "edgeattn", *(["--verbose"] if verbose else []), *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=1800)


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    for noise in NOISE:
        assert noise not in result.stdout + result.stderr, noise


def test_a_missing_wikitext_folder_hides_wikitext_everywhere(monkeypatch, tmp_path):
    monkeypatch.setenv(WIKITEXT_ENV, str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    assert wikitext_path("valid") is None and wikitext_path("test") is None
    (tmp_path / "wikitext").mkdir()
    (tmp_path / "wikitext" / "test.txt").write_text("text", encoding="utf-8")
    monkeypatch.setenv(WIKITEXT_ENV, str(tmp_path / "wikitext"))
    assert wikitext_path("test") == tmp_path / "wikitext" / "test.txt"


def test_quality_fits_its_windows_to_the_text_and_says_so():
    assert choose_windows(3000, 1024, 2).note is None
    fewer = choose_windows(1500, 1024, 2)
    assert (fewer.context, fewer.count) == (1024, 1)
    assert "1500 tokens: scored 1 window of 1024, not 2" in fewer.note
    shorter = choose_windows(929, 1024, 2)
    assert (shorter.context, shorter.count) == (929, 1)
    assert "fewer than one window of 1024" in shorter.note
    assert choose_windows(5000, 1024, None).count == 4


def test_an_inner_loop_reports_to_the_callback_given_to_the_outer_call():
    seen = []

    @reports_progress
    def outer(progress=None):
        report("inner", 1, 2)

    outer(progress=lambda step, done=None, total=None: seen.append((step, done, total)))
    outer()
    assert seen == [("inner", 1, 2)]


def test_progress_off_a_terminal_is_one_line_per_step(capsys):
    with ProgressDisplay() as progress:
        progress("loading")
        progress("scoring", 1, 4)
        progress("scoring", 2, 4)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["loading", "scoring"]
    with ProgressDisplay(quiet=True) as progress:
        progress("loading")
    assert capsys.readouterr().err == ""


def test_the_demos_commands_on_a_tiny_model_with_what_the_package_ships(tmp_path):
    quality = edgeattn("quality", "tiny-llama", *DEMO_SPEC, "--context", "1024", "--max-windows", "2", "--json",
                       tmp_path=tmp_path)
    assert_quiet(quality)
    report = json.loads(quality.stdout)
    assert (report["text"], report["context"], report["windows"], report["notes"]) == (
        "packaged evaluation text", 1024, 2, [])

    out = tmp_path / "demo-out" / "tiny"
    convert = edgeattn("convert", "tiny-llama", "-o", str(out), *DEMO_SPEC, "--weights", "int4", "--force",
                       tmp_path=tmp_path)
    assert_quiet(convert)
    assert "exporting to ONNX" in convert.stderr and "numerics" in convert.stdout
    assert_quiet(edgeattn("generate", str(out), "The capital of France is", "--max-new-tokens", "8",
                          tmp_path=tmp_path))
    validate = edgeattn("validate", str(out), tmp_path=tmp_path)
    assert_quiet(validate)
    assert "running onnxruntime (cpu)" in validate.stderr and "validate: passed" in validate.stdout
    profile = edgeattn("profile", str(out), "--target", "pi5", "--contexts", "128,512", "--prompt-lengths", "128",
                       "--repeats", "3", "--json", str(tmp_path / "profile.json"), tmp_path=tmp_path)
    assert_quiet(profile)
    assert json.loads((tmp_path / "profile.json").read_text(encoding="utf-8"))["complete"]


def test_verbose_shows_what_the_quiet_console_hides(tmp_path):
    """The noise is real and --verbose brings it back: the quiet test above can fail."""
    result = edgeattn("convert", "tiny-llama", "-o", str(tmp_path / "out"), "--max-length", "32", tmp_path=tmp_path,
                      verbose=True)
    assert result.returncode == 0, result.stderr
    assert any(noise in result.stderr for noise in ("torchvision", "LeafSpec", "The axis name")), result.stderr


@pytest.mark.real_model
def test_the_packaged_text_holds_the_demos_windows_of_smollm2_tokens(smollm2):
    assert len(smollm2.encode(default_evaluation_text())) >= 2 * 1024


@pytest.mark.real_model
def test_the_demos_quality_step_on_smollm2_with_what_the_package_ships(tmp_path):
    result = edgeattn("quality", "smollm2", *DEMO_SPEC, "--context", "1024", "--max-windows", "2", tmp_path=tmp_path)
    assert_quiet(result)
    assert "smollm2: 2 windows of 1024 tokens of the packaged evaluation text (2046 scored)" in result.stdout
    for step in ("loading smollm2", "scoring the original model", "rewriting attention: quantizing the KV cache",
                 "scoring the rewritten model"):
        assert step in result.stderr
