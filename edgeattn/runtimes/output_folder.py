"""Atomic outputs: build in a hidden staging area beside the destination, then rename into place.

An interrupted or failed build leaves nothing at the destination, and a destination is
never replaced without ``force``, not even one that appears while the build runs: the
result is published with a rename that refuses to replace (Linux ``renameat2`` with
RENAME_NOREPLACE; elsewhere the name is claimed with ``mkdir`` first). With ``force`` old
and new are swapped in one atomic exchange where the platform has one (RENAME_EXCHANGE),
so the destination is never missing. ``force`` replaces only an edgeattn output folder or
an empty one: never the working folder or a parent of it, the home folder, or a folder
that holds a path the caller keeps (the source model).

A staging area is a hidden sibling ``.NAME.XXXX.edgeattn-staging`` whose marker file its
run keeps locked. A later run to the same destination removes the areas of runs that were
killed (putting back a destination that a two-rename swap left missing) and logs what it
did. Standard library only: the runtime's reports (profile, validate) write through it too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from edgeattn.errors import EdgeattnError
from edgeattn.runtimes.manifest import MANIFEST_NAME

STAGING_SUFFIX = ".edgeattn-staging"
STAGING_MARKER = "edgeattn-staging.json"
_NEW, _OLD = "new", "old"  # inside a staging area: the result being built, a destination moved aside
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
_log = logging.getLogger(__name__)


class OutputExistsError(EdgeattnError, FileExistsError):
    """The destination exists and ``force`` was not given."""


class UnsafeOutputError(EdgeattnError, ValueError):
    """``force`` would replace something it must not: a source, the working folder, a folder not edgeattn's."""


def check_destination(destination: str | Path, force: bool, keep: Iterable[str | Path] = ()) -> Path:
    """The destination as an absolute path, refused when it exists and may not be replaced.

    Clears first what killed runs to this destination left beside it (see the module doc).
    ``keep``: paths that replacing the destination must not delete (the source model).
    """
    target = Path(os.path.abspath(destination))
    if not target.name:
        raise UnsafeOutputError(f"{destination} is the root folder; give a folder for the output")
    _clear_stale_staging(target)
    if os.path.lexists(target):
        _check_replaceable(target, destination, keep)
        if not force:
            raise OutputExistsError(f"{destination} already exists (use --force to replace it)")
    return target


@contextlib.contextmanager
def atomic_folder(destination: str | Path, force: bool = False, keep: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``destination``, on failure it is removed."""
    keep = tuple(keep)
    target = check_destination(destination, force, keep)
    target.parent.mkdir(parents=True, exist_ok=True)
    area, marker = _new_staging_area(target)
    staging = area / _NEW
    try:
        staging.mkdir()  # the mode any new folder gets (mkdtemp's would be 0700)
        yield staging
        _normal_file_modes(staging, _current_umask())
        _publish(staging, target, destination, force, keep)
    finally:
        shutil.rmtree(area, ignore_errors=True)  # the staging result on failure, the replaced folder on success
        marker.close()


def _publish(staging: Path, target: Path, destination: str | Path, force: bool, keep: tuple) -> None:
    try:
        _rename_noreplace(staging, target)
        return
    except FileExistsError:
        if not force:
            raise OutputExistsError(f"{destination} appeared while this run was writing it and was left as it is; "
                                    "this run's result was removed (use --force to replace it)") from None
    _check_replaceable(target, destination, keep)  # it may have appeared after the first check
    _exchange(staging, target)


def _check_replaceable(target: Path, destination: str | Path, keep: Iterable[str | Path]) -> None:
    """Refuse to replace what ``force`` must never delete; the destination exists."""
    if target.is_symlink():
        raise UnsafeOutputError(f"{destination} is a symbolic link; give the folder itself to replace it")
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UnsafeOutputError(f"{destination} is the working folder or one of its parents; "
                                "give a new folder for the output")
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        if resolved == Path.home().resolve():
            raise UnsafeOutputError(f"{destination} is the home folder; give a new folder for the output")
    for path in keep:
        if os.path.lexists(path) and (Path(path).resolve() == resolved or resolved in Path(path).resolve().parents):
            raise UnsafeOutputError(f"{destination} holds the source model {path}; replacing it would delete "
                                    "the source: give another output folder")
    if not resolved.is_dir():
        raise UnsafeOutputError(f"{destination} exists and is not a folder")
    if not (resolved / MANIFEST_NAME).is_file() and any(resolved.iterdir()):
        raise UnsafeOutputError(f"{destination} is not an edgeattn output folder (no {MANIFEST_NAME}) and not empty; "
                                "edgeattn replaces only its own output folders: give another output folder")


# -- renames that never replace by accident ---------------------------------------------------

def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; FileExistsError when anything is at ``target``."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.name == "nt":
        os.rename(source, target)  # Windows never replaces on rename
        return
    os.mkdir(target)  # claims the name: FileExistsError when it is taken
    try:
        os.rename(source, target)  # POSIX replaces only an empty folder: the one just made
    except OSError as error:
        with contextlib.suppress(OSError):
            os.rmdir(target)
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(error.errno, "destination appeared", str(target)) from error
        raise


def _exchange(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` and the old ``target`` at ``staging``; one atomic step where possible."""
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return
    aside = staging.parent / _OLD  # a kill between the two renames is repaired by the next run
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        raise


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2 with ``flags``; False when this system or its file system does not have them."""
    function = _renameat2_function()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    import ctypes

    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


@functools.lru_cache(maxsize=1)
def _renameat2_function():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28, or not glibc
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


# -- staging areas and what killed runs left ----------------------------------------------------

def _new_staging_area(target: Path) -> tuple[Path, IO[str]]:
    """A hidden sibling of ``target`` with a marker this process keeps locked while it runs."""
    area = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=STAGING_SUFFIX, dir=target.parent))
    try:
        marker = open(area / STAGING_MARKER, "w", encoding="utf-8")  # noqa: SIM115 - held open for the lock
        _try_lock(marker)  # locked before it says what it is, so no cleaner takes a live area for a stale one
        json.dump({"destination": target.name, "pid": os.getpid()}, marker)
        marker.flush()
    except BaseException:
        shutil.rmtree(area, ignore_errors=True)
        raise
    return area, marker


def _clear_stale_staging(target: Path) -> None:
    """Remove the staging areas of killed runs to ``target`` (their marker's lock is free)."""
    if not _can_lock():
        return  # no way to tell a live run's area from a dead one's: leave them
    try:
        areas = sorted(target.parent.glob(f".{glob.escape(target.name)}.*{STAGING_SUFFIX}"))
    except OSError:
        return
    for area in areas:
        if area.is_symlink() or not area.is_dir():
            continue
        try:
            marker = open(area / STAGING_MARKER, "r+", encoding="utf-8")  # noqa: SIM115
        except OSError:
            continue  # no marker: not an area of ours
        with marker:
            if not _try_lock(marker) or not _marks(marker, target):
                continue  # its run is alive, or it is not ours
            aside = area / _OLD
            if aside.is_dir() and not aside.is_symlink() and not os.path.lexists(target):
                os.rename(aside, target)
                _log.warning("put %s back: an interrupted --force replace had moved it aside", target)
            size = _tree_size(area)
            shutil.rmtree(area, ignore_errors=True)
            _log.warning("removed %s (%.1f MB) left by an interrupted run", area, size / 1e6)


def _marks(marker: IO[str], target: Path) -> bool:
    try:
        record = json.loads(marker.read())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and record.get("destination") == target.name


def _can_lock() -> bool:
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return False
    return True


def _try_lock(handle: IO[str]) -> bool:
    """Take the exclusive lock on ``handle`` without waiting; the kernel drops it when the process dies."""
    if not _can_lock():
        return False
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _tree_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


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
