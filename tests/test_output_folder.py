"""Atomic output folders and files: all or nothing at the destination, nothing replaced without --force (not
even what appears meanwhile), --force never deleting what is not edgeattn's, killed runs cleaned, ordinary modes."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edgeattn.runtimes import output_folder
from edgeattn.runtimes.manifest import MANIFEST_NAME
from edgeattn.runtimes.output_folder import (
    OutputExistsError,
    UnsafeOutputError,
    atomic_file,
    atomic_folder,
    check_destination,
    write_text_atomically,
)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _edgeattn_folder(path: Path, text: str) -> Path:
    """A folder that looks like an earlier output: an edgeattn.json and one file."""
    path.mkdir()
    (path / MANIFEST_NAME).write_text("{}")
    (path / "old.txt").write_text(text)
    return path


def test_success_publishes_the_folder_with_ordinary_modes(tmp_path):
    destination = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        with atomic_folder(destination) as staging:
            (staging / "model.onnx").write_text("graph")
            private = staging / "model.onnx.data"
            private.write_bytes(b"weights")
            private.chmod(0o600)  # as a temporary-file writer leaves it
            assert not destination.exists()
    finally:
        os.umask(umask)
    assert sorted(p.name for p in destination.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert _mode(destination) == 0o755
    assert _mode(destination / "model.onnx.data") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_failure_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    destination = _edgeattn_folder(tmp_path / "out", "keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_folder(destination):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(destination, force=True) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (destination / "old.txt").read_text() == "keep me"
    assert list(tmp_path.glob(".*")) == []


def test_force_replaces_the_folder(tmp_path):
    destination = _edgeattn_folder(tmp_path / "out", "old")
    with atomic_folder(destination, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in destination.iterdir()] == ["new.txt"]  # the old folder is gone whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_is_replaced_whole_with_an_ordinary_mode(tmp_path):
    destination = tmp_path / "report.json"
    destination.write_text("old")
    umask = os.umask(0o022)
    try:
        write_text_atomically(destination, "new")
    finally:
        os.umask(umask)
    assert destination.read_text() == "new" and _mode(destination) == 0o644  # not mkstemp's 0600
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    destination = tmp_path / "plot.png"
    destination.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(destination) as staging:
        staging.write_text("half")
        raise RuntimeError("interrupted")
    assert destination.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["plot.png"]


# -- a destination that appears meanwhile, two runs at once, --force that must refuse -----------------


@pytest.fixture(params=["renameat2", "fallback"])
def rename_path(request, monkeypatch):
    """Run a test with Linux renameat2, and again with the portable fallback (mkdir claim, two renames)."""
    if request.param == "renameat2" and output_folder._renameat2_function() is None:
        pytest.skip("no renameat2 here")
    if request.param == "fallback":
        monkeypatch.setattr(output_folder, "_renameat2", lambda source, target, flags: False)
    return request.param


def test_a_destination_that_appears_meanwhile_is_kept(tmp_path, rename_path):
    destination = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
        with atomic_folder(destination) as staging:
            (staging / "model.onnx").write_text("new")
            destination.mkdir()
            (destination / "keep.txt").write_text("mine")
    assert [p.name for p in destination.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging result was removed


def test_an_empty_folder_that_appears_meanwhile_is_not_replaced_either(tmp_path, rename_path):
    destination = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared"):
        with atomic_folder(destination) as staging:
            (staging / "model.onnx").write_text("new")
            destination.mkdir()  # POSIX rename would replace an empty folder
    assert list(destination.iterdir()) == []


def test_two_runs_to_one_destination_exactly_one_succeeds(tmp_path, rename_path):
    destination = tmp_path / "out"
    both_built = threading.Barrier(2)
    outcomes = []

    def run(tag: str) -> None:
        try:
            with atomic_folder(destination) as staging:
                (staging / "who.txt").write_text(tag)
                both_built.wait(timeout=10)
            outcomes.append(("ok", tag))
        except OutputExistsError:
            outcomes.append(("refused", tag))

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(kind for kind, _ in outcomes) == ["ok", "refused"]
    winner = next(tag for kind, tag in outcomes if kind == "ok")
    assert (destination / "who.txt").read_text() == winner
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_refuses_a_folder_that_is_not_edgeattns(tmp_path):
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    with pytest.raises(UnsafeOutputError, match="not an edgeattn output folder"):
        with atomic_folder(documents, force=True):
            pass
    assert (documents / "thesis.txt").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty, force=True) as staging:  # an empty folder may be replaced
        (staging / "model.onnx").write_text("new")
    assert [p.name for p in empty.iterdir()] == ["model.onnx"]


def test_force_refuses_what_appeared_meanwhile_unless_it_is_edgeattns(tmp_path, rename_path):
    destination = tmp_path / "out"
    with pytest.raises(UnsafeOutputError, match="not an edgeattn output folder"):
        with atomic_folder(destination, force=True) as staging:
            (staging / "model.onnx").write_text("new")
            destination.mkdir()
            (destination / "keep.txt").write_text("mine")
    assert [p.name for p in destination.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("where", ["the source itself", "a parent of the source"])
def test_force_never_replaces_a_folder_holding_the_source(tmp_path, where):
    source = _edgeattn_folder(tmp_path / "out", "weights")  # even one that looks like an output folder
    (source / "model.safetensors").write_text("weights")
    destination = source if where == "the source itself" else tmp_path
    with pytest.raises(UnsafeOutputError, match="holds the source model"):
        with atomic_folder(destination, force=True, keep=[source / "model.safetensors"]):
            pass
    assert (source / "model.safetensors").read_text() == "weights"


@pytest.mark.parametrize("which", ["cwd", "parent of cwd", "home", "root"])
def test_force_never_replaces_the_working_folder_its_parents_home_or_root(tmp_path, monkeypatch, which):
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    (work / MANIFEST_NAME).write_text("{}")  # looks like an output folder: still refused
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "project"))
    destination = {"cwd": ".", "parent of cwd": "..", "home": str(tmp_path / "project"), "root": "/"}[which]
    message = {"home": "working folder or one of its parents|home folder", "root": "root folder"}.get(
        which, "working folder or one of its parents")
    with pytest.raises(UnsafeOutputError, match=message):
        with atomic_folder(destination, force=True):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["work"]


# -- crash safety: an atomic swap, and what killed runs leave behind -----------------------------------


def test_force_swaps_in_one_step_so_the_destination_is_never_missing(tmp_path, monkeypatch):
    if output_folder._renameat2_function() is None:
        pytest.skip("no renameat2 here")
    destination = _edgeattn_folder(tmp_path / "out", "old")

    def no_two_step_swap(*args):
        raise AssertionError("a two-rename swap leaves a moment without the destination")

    monkeypatch.setattr(output_folder.os, "rename", no_two_step_swap)
    with atomic_folder(destination, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in destination.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _run_and_die(script: str) -> None:
    """Run ``script`` in a child that kills itself with SIGKILL where the script says ``die()``."""
    prelude = "import os, signal\nfrom pathlib import Path\nfrom edgeattn.runtimes import output_folder\n" \
              "def die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr


def _stale_areas(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob(f".out.*{output_folder.STAGING_SUFFIX}"))


def test_a_killed_run_is_cleaned_at_the_next_run_and_logged(tmp_path, caplog):
    _run_and_die(f"""
        with output_folder.atomic_folder(Path({str(tmp_path / "out")!r})) as staging:
            (staging / "model.onnx.data").write_bytes(b"x" * 3_000_000)
            die()
    """)
    stale = _stale_areas(tmp_path)
    assert len(stale) == 1 and not (tmp_path / "out").exists()
    (tmp_path / ".out.backup").mkdir()  # hidden folders that are not staging areas are not ours
    unmarked = tmp_path / f".out.abc{output_folder.STAGING_SUFFIX}"
    unmarked.mkdir()
    with caplog.at_level(logging.WARNING, logger="edgeattn"):
        with atomic_folder(tmp_path / "out") as staging:
            (staging / "model.onnx").write_text("new")
    assert f"removed {stale[0]} (3.0 MB) left by an interrupted run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.backup", unmarked.name, "out"])


def test_a_running_run_is_not_taken_for_a_killed_one(tmp_path):
    destination = tmp_path / "out"
    with atomic_folder(destination) as staging:
        (staging / "model.onnx").write_text("first")
        with pytest.raises(OutputExistsError, match="appeared"):  # a second run to the same destination
            with atomic_folder(destination) as second:
                (second / "model.onnx").write_text("second")
                destination.mkdir()  # stands for the first run publishing before it
        destination.rmdir()
        assert staging.is_dir()  # the second run did not clean the first one's area
    assert (destination / "model.onnx").read_text() == "first"


def test_a_kill_inside_a_two_rename_swap_is_repaired_by_the_next_run(tmp_path, caplog):
    destination = _edgeattn_folder(tmp_path / "out", "old")
    _run_and_die(f"""
        output_folder._renameat2 = lambda source, target, flags: False  # a system without renameat2
        real_rename = os.rename
        def rename_then_die(source, target):
            real_rename(source, target)
            die()  # after the old folder was moved aside, before the new one took its place
        output_folder.os.rename = rename_then_die
        with output_folder.atomic_folder(Path({str(destination)!r}), force=True) as staging:
            (staging / "new.txt").write_text("new")
    """)
    assert not destination.exists() and len(_stale_areas(tmp_path)) == 1
    with caplog.at_level(logging.WARNING, logger="edgeattn"):
        with pytest.raises(OutputExistsError, match="already exists"):
            check_destination(destination, force=False)
    assert f"put {destination} back" in caplog.text
    assert (destination / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_command_line_says_what_it_cleaned(tmp_path):
    from click.testing import CliRunner

    from edgeattn.cli import main

    _run_and_die(f"""
        with output_folder.atomic_folder(Path({str(tmp_path / "out")!r})) as staging:
            die()
    """)
    [stale] = _stale_areas(tmp_path)
    out = _edgeattn_folder(tmp_path / "out", "old")
    result = CliRunner().invoke(main, ["convert", "tiny-llama", "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert f"edgeattn: removed {stale} (0.0 MB) left by an interrupted run" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
