"""Atomic output folders: all or nothing at the destination, --force to replace, ordinary file modes."""

from __future__ import annotations

import os
import stat

import pytest

from edgeattn.output_folder import OutputExistsError, atomic_folder


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
