"""Atomic output folders: build in a temporary sibling folder, then rename into place.

An interrupted or failed build leaves nothing at the destination; an existing
destination is replaced only with ``force``.
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
    umask = os.umask(0)
    os.umask(umask)
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


def _normal_file_modes(folder: Path, umask: int) -> None:
    """Give every file the mode a plain new file gets: some writers (temporary files) leave 0600."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
