"""Atomic outputs: build in a temporary sibling (folder or file), then rename into place.

An interrupted or failed build leaves nothing at the destination; an existing
destination folder is replaced only with ``force``. Standard library only: the
runtime's reports (profile, validate) write through it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgeattn.errors import EdgeattnError


class OutputExistsError(EdgeattnError, FileExistsError):
    """The destination exists and ``force`` was not given."""


def check_destination(destination: str | Path, force: bool) -> Path:
    destination = Path(destination)
    if destination.exists() and not force:
        raise OutputExistsError(f"{destination} already exists (use --force to replace it)")
    return destination


@contextlib.contextmanager
def atomic_folder(destination: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``destination``, on failure it is removed."""
    destination = check_destination(destination, force)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    umask = _current_umask()
    staging.chmod(0o777 & ~umask)  # mkdtemp creates 0700; the result should look like any new folder
    try:
        yield staging
        _normal_file_modes(staging, umask)
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
            destination.rename(retired / destination.name)
            staging.rename(destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``destination`` to write; on success it replaces ``destination``
    with an ordinary file's mode (mkstemp creates 0600), on failure it is removed."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{destination.stem}.", suffix=destination.suffix, dir=destination.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o666 & ~_current_umask())
        os.replace(staging, destination)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_text_atomically(destination: str | Path, text: str) -> Path:
    with atomic_file(destination) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(destination)


def _current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _normal_file_modes(folder: Path, umask: int) -> None:
    """Give every file the mode a plain new file gets: some writers (temporary files) leave 0600."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
