"""Atomic output folders and files: all or nothing at the destination, --force to replace, ordinary file modes."""

from __future__ import annotations

import os
import stat

import pytest

from edgeattn.output_folder import OutputExistsError, atomic_file, atomic_folder, write_text_atomically


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_folder(destination):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(destination, force=True) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (destination / "old.txt").read_text() == "keep me"


def test_force_replaces_the_folder(tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with atomic_folder(destination, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in destination.iterdir()] == ["new.txt"]
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
