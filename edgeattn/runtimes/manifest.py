"""The manifest (``edgeattn.json``): what an output folder contains and how to drive it.

Read by the runtime on the device, so this module needs only the standard library.
A folder describes itself: the runtime never parses a file name. A manifest is checked
against ``runtimes/manifest.schema.json`` on reading, every file it names must lie inside
its folder, and ``sha256`` (written by convert, optional for older folders) lets
``verify_files`` prove that the files are the ones convert wrote.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path, PurePath
from typing import Any

from edgeattn.errors import EdgeattnError
from edgeattn.runtimes.schema_check import first_problem

MANIFEST_NAME = "edgeattn.json"
FORMAT = "edgeattn"
FORMAT_VERSION = 1
HASHES = "sha256"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class ManifestError(EdgeattnError, ValueError):
    """A folder's manifest is missing, unreadable, damaged, from a newer edgeattn, or names files it should not."""


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an output folder, checked for format, version and schema; the files it names must
    exist inside the folder."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such folder")
    if not path.is_file():
        raise ManifestError(f"{folder}: not an edgeattn output folder (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an edgeattn manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: format_version must be a whole number >= 1, got {json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format version {version!r} is newer than this edgeattn understands ({FORMAT_VERSION}); "
            "upgrade edgeattn")
    problem = first_problem(manifest, _schema())
    if problem:
        raise ManifestError(f"{path}: damaged or edited manifest: {problem}")
    for role, name in manifest["files"].items():
        _check_inside(folder, name, f"{role} file")
        if not (folder / name).is_file():
            raise ManifestError(f"{folder}: {role} file {name} is missing")
    for name in manifest.get(HASHES, {}):
        _check_inside(folder, name, "file")
    return manifest


def cache_tokens(kv: dict[str, Any]) -> int:
    """Tokens a manifest's KV cache holds: its ``capacity`` rows, less rows that hold other state (the block
    summaries of hierarchical attention)."""
    return kv.get("tokens", kv["capacity"])


def file_hashes(folder: str | Path) -> dict[str, str]:
    """The sha256 of every file in ``folder`` but the manifest, by its name relative to the folder."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): _sha256(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST_NAME}


def verify_files(folder: str | Path, manifest: dict[str, Any], required: bool = False) -> int:
    """Check every file the manifest has a sha256 for; returns how many. ``required``: a folder without
    sha256 records (converted by an older edgeattn) is an error, not a pass."""
    folder = Path(folder)
    hashes = manifest.get(HASHES) or {}
    if required and not hashes:
        raise ManifestError(f"{folder}: the manifest records no sha256 of its files (converted by an older "
                            "edgeattn); convert it again to verify it")
    for name, expected in hashes.items():
        _check_inside(folder, name, "file")
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{folder}: {name} is missing")
        if _sha256(path) != expected:
            raise ManifestError(f"{folder}: {name} does not match the sha256 in the manifest "
                                "(damaged or changed since convert)")
    return len(hashes)


def _check_inside(folder: Path, name: str, what: str) -> None:
    """Refuse a name that leads out of ``folder`` (absolute, ``..``, a link pointing out), without
    touching or revealing anything outside it."""
    outside = ManifestError(f"{folder}: the manifest names {what} {name!r} outside the folder; "
                            "edgeattn reads only files inside an output folder")
    relative = PurePath(name)
    if relative.is_absolute() or relative.drive or ".." in relative.parts or "\\" in name:
        raise outside
    try:
        root = folder.resolve()
        inside = (root / relative).resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
        inside = False
    if not inside:
        raise outside


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
