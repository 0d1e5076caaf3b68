"""Paths the user names, checked before the long work: texts must be UTF-8, outputs writable.

A destination is probed by creating and removing a temporary file in its nearest existing
folder, the only test that holds for read-only mounts, ACLs and quotas alike (``os.access``
answers yes to root everywhere). A file-system error met later, while writing, becomes one
line naming the path and the reason. Standard library only: the runtime install uses it.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgeattn.errors import EdgeattnError

# The errors a user fixes by choosing another path or freeing space, never by changing edgeattn.
FILESYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                               errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP})
_CHUNK = 1 << 20


class UserPathError(EdgeattnError, OSError):
    """A path the user named cannot be read or written."""


def check_text_file(path: str | Path, what: str) -> Path:
    """Refuse a text file that is missing or not UTF-8, naming ``what`` (a flag) and the path."""
    path = Path(path)
    if not path.is_file():
        raise UserPathError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise UserPathError(f"{what} {path} is not UTF-8 text (byte {offset + error.start}: {error.reason})") from None
    except OSError as error:
        raise UserPathError(f"{what} {path}: {error.strerror or error}") from None
    return path


def check_writable(path: str | Path, what: str) -> Path:
    """Refuse a destination that cannot be created: its nearest existing folder must take a new file."""
    path = Path(path)
    folder = path.absolute().parent
    while True:
        try:
            mode = folder.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            folder = folder.parent
        except OSError as error:
            raise UserPathError(f"{what} {path}: {folder}: {error.strerror or error}") from None
    if not stat.S_ISDIR(mode):
        raise UserPathError(f"{what} {path}: {folder} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".edgeattn-probe.", dir=folder)
    except OSError as error:
        raise UserPathError(f"{what} {path}: cannot write in {folder} ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def reporting_write_errors(path: str | Path) -> Iterator[None]:
    """Within ``with``: a file-system error becomes one line naming the file (else ``path``) and the reason."""
    try:
        yield
    except OSError as error:
        if isinstance(error, EdgeattnError) or error.errno not in FILESYSTEM_ERRNOS:
            raise
        raise UserPathError(describe_os_error(error, path)) from error


def describe_os_error(error: OSError, path: str | Path | None = None) -> str:
    """'cannot write out: No space left on device', or the file the error names."""
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    if error.filename:
        return f"{error.filename}: {reason}"
    return f"cannot write {path}: {reason}" if path is not None else reason
