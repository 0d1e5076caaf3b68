"""The manifest (``edgeattn.json``): what an output folder contains and how to drive it.

Read by the runtime on the device, so this module needs only the standard library.
A folder describes itself: the runtime never parses a file name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeattn.errors import EdgeattnError

MANIFEST_NAME = "edgeattn.json"
FORMAT = "edgeattn"
FORMAT_VERSION = 1


class ManifestError(EdgeattnError, ValueError):
    """A folder's manifest is missing, unreadable, or from a newer edgeattn."""


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an output folder, checked for format and version; files it names must exist."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such folder")
    if not path.is_file():
        raise ManifestError(f"{folder}: not an edgeattn output folder (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an edgeattn manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format version {version!r} is newer than this edgeattn understands ({FORMAT_VERSION}); "
            "upgrade edgeattn")
    for role, name in manifest.get("files", {}).items():
        if name and not (folder / name).is_file():
            raise ManifestError(f"{folder}: {role} file {name} is missing")
    return manifest
