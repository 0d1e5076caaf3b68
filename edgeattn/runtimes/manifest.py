"""The manifest (``edgeattn.json``): what an output folder contains and how to drive it.

Read by the runtime on the device, so this module needs only the standard library.
A folder describes itself: the runtime never parses a file name. A manifest is checked
against ``runtimes/manifest.schema.json`` on reading, every file it names must lie inside
its folder, and ``sha256`` (written by convert, optional for older folders) lets
``verify_files`` prove that the files are the ones convert wrote.

``Manifest`` and its parts are the format, documented key by key: one dataclass per JSON
object, one attribute per key. ``Manifest.from_dict(d).to_dict() == d`` for every manifest convert
writes, older ones included; keys this edgeattn does not know are kept and written back after
the known ones (a null under a key that is never null, or another key order, is not preserved).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, ClassVar, Self

from edgeattn.errors import EdgeattnError
from edgeattn.runtimes.schema_check import first_problem

MANIFEST_NAME = "edgeattn.json"
FORMAT = "edgeattn"
FORMAT_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class ManifestError(EdgeattnError, ValueError):
    """A folder's manifest is missing, unreadable, damaged, from a newer edgeattn, or names files it should not."""


@dataclass(frozen=True, kw_only=True)
class ManifestPart:
    """One JSON object of the manifest, its keys as attributes, declared in the order convert writes them.

    A key the folder lacks reads as None and stays out on writing. ``NULLABLE`` keys may also
    be null (convert writes null where they have no value), so ``absent`` remembers which of
    them the folder lacked. Keys this edgeattn does not know (the schema allows them, and a
    newer folder has them) stay in ``extra`` and are written back after the known ones.
    """

    NULLABLE: ClassVar[frozenset[str]] = frozenset()
    PARTS: ClassVar[dict[str, type[ManifestPart]]] = {}  # key -> the part its object reads as

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    absent: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """The part of the JSON object ``d``, which the schema has accepted (it has every required key)."""
        keys = _keys(cls)
        values = {key: cls.PARTS[key].from_dict(value) if key in cls.PARTS and value is not None
                  else copy.deepcopy(value) for key, value in d.items() if key in keys}
        return cls(**values, extra={key: copy.deepcopy(value) for key, value in d.items() if key not in keys},
                   absent=cls.NULLABLE - set(d))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order convert writes them, unknown keys last."""
        result = {}
        for key in _keys(type(self)):
            value = getattr(self, key)
            if value is None and (key not in self.NULLABLE or key in self.absent):
                continue
            result[key] = value.to_dict() if isinstance(value, ManifestPart) else copy.deepcopy(value)
        return {**result, **copy.deepcopy(self.extra)}


def _keys(part: type[ManifestPart]) -> list[str]:
    return [f.name for f in dataclasses.fields(part) if f.name not in ("extra", "absent")]


@dataclass(frozen=True, kw_only=True)
class SourceInfo(ManifestPart):
    """The model convert read."""

    NULLABLE = frozenset({"weights_sha256"})

    model: str
    """As given to convert (a name such as ``smollm2``, a folder, a .gguf file); validate reloads it."""
    family: str | None = None
    """The architecture (``llama``, ``qwen2``, ...)."""
    weights_sha256: str | None = None
    """Of the checkpoint's weights; null for the random ``tiny-*`` models. validate refuses other weights."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo(ManifestPart):
    """The decoder's sizes and special tokens, as exported (after the rewrite)."""

    NULLABLE = frozenset({"bos_token_id"})

    num_layers: int
    num_heads: int | None = None
    num_kv_heads: int | None = None
    """After the rewrite (``--kv-heads`` merges heads)."""
    head_dim: int | None = None
    hidden_size: int | None = None
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] | None = None
    """Generation stops on any of them."""
    max_length: int
    """The ``--max-length`` the folder was converted for."""


@dataclass(frozen=True, kw_only=True)
class WeightsInfo(ManifestPart):
    """How the graph stores its weights."""

    NULLABLE = frozenset({"block_size"})

    dtype: str
    """``fp32``, ``fp16``, ``int8`` or ``int4``: the precision reached (for ``--weights source``, the GGUF's)."""
    block_size: int | None = None
    """Quantization block size of int8/int4 weights (MatMulNBits); null for float weights."""
    requested: str | None = None
    """From a GGUF source: the ``--weights`` asked for."""
    gguf: dict[str, Any] | None = None
    """From a GGUF source: a summary and, per weight, whether its blocks were carried or requantized."""


@dataclass(frozen=True, kw_only=True)
class LoweringInfo(ManifestPart):
    """Which attention op each layer was lowered to, and why the others were not used."""

    requested: str | None = None
    """``--attention-op``."""
    provider: str | None = None
    chosen: str | None = None
    per_layer: list[str] | None = None
    op_per_layer: list[str] | None = None
    not_chosen: dict[str, str] | None = None
    """Lowering -> why it was not used."""
    op: str | None = None
    """The fused op of the first layer."""
    norm_fusion: str | None = None
    """``skip`` (onnxruntime's SkipSimplifiedLayerNormalization) or ``standard``."""


@dataclass(frozen=True, kw_only=True)
class FilesInfo(ManifestPart):
    """Role -> file name inside the folder; a role not listed here is kept in ``extra``."""

    model: str
    """The ONNX graph; its external data lies beside it, named after it."""
    tokenizer: str
    tokenizer_config: str | None = None
    chat_template: str | None = None
    golden: str | None = None
    """Reference logits of the rewritten PyTorch model, for ``validate --golden``."""


@dataclass(frozen=True, kw_only=True)
class CacheNames(ManifestPart):
    """Graph input and output names of the KV cache: ``{layer}`` is the layer index, ``{kind}`` key or value."""

    past: str
    present: str


@dataclass(frozen=True, kw_only=True)
class IOInfo(ManifestPart):
    """The graph's inputs and outputs, as the runtime binds them."""

    PARTS = {"cache_names": CacheNames}

    inputs: dict[str, list] | None = None
    """Name -> symbolic shape."""
    outputs: dict[str, list] | None = None
    cache_names: CacheNames
    shared_past_present_buffer: bool | None = None
    """Past and present are meant to be bound to one buffer, which the attention op writes in place."""


@dataclass(frozen=True, kw_only=True)
class KVCacheInfo(ManifestPart):
    """The KV-cache buffer the runtime preallocates, the same for every layer: [batch, *shape_tail]."""

    NULLABLE = frozenset({"max_positions", "quant"})

    capacity: int
    """Rows of the buffer: tokens, slots of a ring (older hierarchical folders: tokens plus block summaries)."""
    dtype: str
    """Of the buffer: ``float32``, ``float16``, ``int8`` or ``uint8`` (packed int4 codes)."""
    shape_tail: list[int]
    """[kv heads, capacity, row width]; a row is the head dim, half of it for packed int4, or codes plus scales."""
    ring: bool
    """Old tokens are overwritten (a sliding window): the cache never fills."""
    max_positions: int | None = None
    """How many positions the graph can number; null where a ring renumbers them, so there is no limit."""
    tokens: int | None = None
    """Rows that hold tokens (hierarchical attention; ``capacity`` rounds them up to whole blocks, or in older
    folders also counts the block summaries)."""
    keys_read: int | None = None
    """The most cached keys a decode step reads (hierarchical: the whole blocks holding the sinks, the window and
    the selected blocks)."""
    summary_rows: int | None = None
    """Block summaries a decode step scores (hierarchical attention)."""
    growing: bool | None = None
    """The cache grows with the tokens (present = concat(past, new)) instead of being preallocated."""
    extra_buffers: list[dict[str, Any]] | None = None
    """Per-layer buffers after key and value, each ``{"kind", "dtype", "shape_tail"}``: past and present named
    with ``{kind}``, [batch, *shape_tail], bound to one memory like the cache (a residual window's
    ``key_residual`` and ``value_residual``)."""
    residual_tokens: int | None = None
    """Recent tokens each query reads at full precision (a KIVI residual window over a per-token cache)."""
    residual_bytes: int | None = None
    """Constant bytes of one sequence's residual windows, all layers (not in ``bytes_per_token``)."""
    bytes_per_token: int | float
    """Exact: all layers, keys and values, per-token scales included."""
    bytes_at_capacity: int | float | None = None
    codec: str
    """How keys and values are stored: ``fp32``, ``fp16``, ``int8`` or ``int4``."""
    quant: str | None = None
    """``per-channel`` or ``per-token`` scales of an int8/int4 codec."""

    @property
    def buffers(self) -> dict[str, tuple[str, list]]:
        """Each layer's buffers by the ``{kind}`` of their names, in graph order (key, value, then the extra
        buffers): kind -> (dtype, shape_tail)."""
        buffers = {"key": (self.dtype, self.shape_tail), "value": (self.dtype, self.shape_tail)}
        for buffer in self.extra_buffers or ():
            buffers[buffer["kind"]] = (buffer["dtype"], buffer["shape_tail"])
        return buffers

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.buffers)

    @property
    def cache_tokens(self) -> int:
        """Tokens the cache holds: its ``capacity`` rows, less rows that hold other state."""
        return self.tokens if self.tokens is not None else self.capacity


@dataclass(frozen=True, kw_only=True)
class CalibrationInfo(ManifestPart):
    """The text calibrated rewrite steps ran on, so that validate can rebuild the rewrite."""

    text: str | None = None
    """``packaged``, or a user's file by name (never its path: validate asks for the text again)."""
    sha256: str | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class Manifest(ManifestPart):
    """An output folder's ``edgeattn.json``."""

    NULLABLE = frozenset({"chat_format"})
    PARTS = {"source": SourceInfo, "model": ModelInfo, "weights": WeightsInfo, "lowering": LoweringInfo,
             "files": FilesInfo, "io": IOInfo, "kv_cache": KVCacheInfo, "calibration": CalibrationInfo}

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    """A reader refuses a newer version: it changes when a key changes meaning or goes away."""
    edgeattn_version: str | None = None
    """Of the edgeattn that wrote the folder."""
    source: SourceInfo
    spec: dict[str, Any]
    """The ``AttentionSpec`` the model was rewritten with, one key per rewrite flag."""
    rewrites: list[str] | None = None
    """One line per rewrite step."""
    model: ModelInfo
    weights: WeightsInfo
    lowering: LoweringInfo | None = None
    files: FilesInfo
    io: IOInfo
    kv_cache: KVCacheInfo
    chat_format: dict[str, Any] | None = None
    """The chat template flattened for the runtime (``runtimes.chat``: no jinja2 on the device); null without one."""
    op_histogram: dict[str, int] | None = None
    """Node count per op type of the final graph."""
    opset: int | None = None
    """The graph's ai.onnx opset."""
    versions: dict[str, str] | None = None
    """torch, onnx and onnxruntime that wrote the folder."""
    calibration: CalibrationInfo | None = None
    numerics: dict[str, Any] | None = None
    """``passed`` and convert's checks: ``export`` (the graph against PyTorch) and, with quantized weights, ``weights``."""
    sha256: dict[str, str] | None = None
    """File name -> sha256 of every other file of the folder (absent in folders of older versions)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """The manifest ``d``; ManifestError names the first place where it breaks the schema."""
        problem = first_problem(d, _schema())
        if problem:
            raise ManifestError(problem)
        return super().from_dict(d)


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest`` into ``folder``, refused (ManifestError) where read_manifest would refuse it."""
    folder = Path(folder)
    body = manifest.to_dict()
    problem = first_problem(body, _schema())
    if problem:
        raise ManifestError(f"{folder}: the manifest to write breaks the schema: {problem}")
    _check_files(folder, manifest)
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an output folder, checked for format, version and schema; the files it names must
    exist inside the folder."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such folder")
    if not path.is_file():
        raise ManifestError(f"{folder}: not an edgeattn output folder (no {MANIFEST_NAME})")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an edgeattn manifest")
    version = body.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: format_version must be a whole number >= 1, got {json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format version {version!r} is newer than this edgeattn understands ({FORMAT_VERSION}); "
            "upgrade edgeattn")
    try:
        manifest = Manifest.from_dict(body)
    except ManifestError as error:
        raise ManifestError(f"{path}: damaged or edited manifest: {error}") from None
    _check_files(folder, manifest)
    return manifest


def file_hashes(folder: str | Path) -> dict[str, str]:
    """The sha256 of every file in ``folder`` but the manifest, by its name relative to the folder."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): _sha256(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST_NAME}


def verify_files(folder: str | Path, manifest: Manifest, required: bool = False) -> int:
    """Check every file the manifest has a sha256 for; returns how many. ``required``: a folder without
    sha256 records (converted by an older edgeattn) is an error, not a pass."""
    folder = Path(folder)
    hashes = manifest.sha256 or {}
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


def _check_files(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest names lies inside ``folder``; every file of a role exists."""
    for role, name in manifest.files.to_dict().items():
        _check_inside(folder, name, f"{role} file")
        if not (folder / name).is_file():
            raise ManifestError(f"{folder}: {role} file {name} is missing")
    for name in manifest.sha256 or {}:
        _check_inside(folder, name, "file")


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
