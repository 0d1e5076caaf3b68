"""Folders converted or exported once per test process and shared by every test file that asks for the same
one (conftest.py's ``converted`` and ``exported`` fixtures). A test copies a shared folder before changing
it: the sha256 of each folder's files is recorded when it is made and checked after every module that used it.

The imports of the conversion stack wait for the first conversion, so that the unit layer imports no model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

from edgeattn.spec import AttentionSpec


class SharedFolders:
    """The folders made in this test process, each with the sha256 of its files when it was made."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._converted: dict = {}
        self._exported: dict = {}
        self._hashes: dict[Path, dict[str, str]] = {}
        self._described: dict[Path, str] = {}
        self._handed_out: set[Path] = set()

    def converted(self, model: str = "tiny-llama", spec: AttentionSpec | None = None, **options):
        """``convert(ConvertOptions(model, folder, spec, **options))`` once per distinct conversion;
        returns (folder, manifest)."""
        from edgeattn.convert import ConvertOptions, convert

        key = ConvertOptions(model, Path(), AttentionSpec() if spec is None else spec, **options)
        if key not in self._converted:
            folder = self._tmp.mktemp(f"converted-{model}") / "out"
            manifest = convert(dataclasses.replace(key, output=folder))
            self._record(folder, f"{model} converted with {_spec_text(key.spec)}"
                                 + "".join(f", {name}={value!r}" for name, value in sorted(options.items())))
            self._converted[key] = folder, manifest
        folder, manifest = self._converted[key]
        self._handed_out.add(folder)
        return folder, manifest

    def exported(self, family: str, spec: AttentionSpec, lowering_for: Callable, max_length: int):
        """tiny-``family`` rewritten to ``spec`` (calibrated on the packaged text), one ``lowering_for(attention,
        spec, max_length)`` per layer, exported by tests/minimal_folder.py once per distinct argument; returns
        (folder, decoder, lowerings). Tests share the decoder too: they run it, never change it."""
        key = (family, spec, lowering_for, max_length)
        if key not in self._exported:
            from edgeattn.evaluation.calibration import calibration_ids, calibration_tokens
            from edgeattn.models import load
            from edgeattn.rewrites import rewrite
            from tests.minimal_folder import exported_folder

            model = load(f"tiny-{family}")
            decoder = model.decoder
            rewrite(decoder, spec, calibration_ids(model.tokenizer, None, calibration_tokens(spec)))
            lowerings = [lowering_for(attention, spec, max_length) for attention in decoder.attentions()]
            folder = exported_folder(self._tmp.mktemp(f"exported-{family}"), decoder, lowerings, model.tokenizer,
                                     max_length)
            self._record(folder, f"tiny-{family} with {_spec_text(spec)} exported by {lowering_for.__module__}, "
                                 f"max_length={max_length}")
            self._exported[key] = folder, decoder, lowerings
        folder, decoder, lowerings = self._exported[key]
        self._handed_out.add(folder)
        return folder, decoder, lowerings

    def check_unchanged(self, user: str) -> None:
        """Fail if a folder handed out since the last check differs from what was made; ``user`` is who had it."""
        changed = []
        for folder in sorted(self._handed_out):
            now = _hashes(folder)
            names = sorted(name for name in now.keys() | self._hashes[folder].keys()
                           if now.get(name) != self._hashes[folder].get(name))
            if names:
                changed.append(f"{folder} ({self._described[folder]}): {', '.join(names)}")
        self._handed_out.clear()
        assert not changed, (f"{user} changed shared folders that other test files read; copy a folder before "
                             "changing it:\n" + "\n".join(changed))

    def _record(self, folder: Path, description: str) -> None:
        self._hashes[folder] = _hashes(folder)
        self._described[folder] = description


def _hashes(folder: Path) -> dict[str, str]:
    """The sha256 of every file in ``folder``, the manifest included (edgeattn's file_hashes leaves it out)."""
    from edgeattn.runtimes.manifest import MANIFEST_NAME, file_hashes

    manifest = folder / MANIFEST_NAME
    return {**file_hashes(folder), MANIFEST_NAME: hashlib.sha256(manifest.read_bytes()).hexdigest()
            if manifest.is_file() else "missing"}


def _spec_text(spec: AttentionSpec) -> str:
    """The fields of ``spec`` that differ from the default's, for a message."""
    default = AttentionSpec()
    changed = [f"{field.name}={getattr(spec, field.name)!r}" for field in dataclasses.fields(spec)
               if getattr(spec, field.name) != getattr(default, field.name)]
    return f"AttentionSpec({', '.join(changed)})"
