"""EdgeLM: run an edgeattn output folder with onnxruntime. Needs only onnxruntime, numpy, tokenizers.

The folder describes itself (``edgeattn.json``); nothing is inferred from file names.
KV-cache buffers are preallocated once per batch size and bound with IO binding as
both the past input and the present output of each layer, so a decode step copies no
cache: the fused attention op writes the new tokens in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgeattn.errors import EdgeattnError, InvalidOptionError
from edgeattn.runtimes.chat import apply_chat_format
from edgeattn.runtimes.folder_checks import check_graph, load_tokenizer
from edgeattn.runtimes.manifest import Manifest, read_manifest, verify_files

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Tokens per session run when a prompt is longer: attention's [heads, chunk, context] scores stay small
# (peak memory), and on a 2-core x86 host 256-token chunks prefill 512 and 2048 tokens 5-8% faster than
# 512-token or whole-prompt runs (docs/benchmarks.md).
PREFILL_CHUNK = 256
_log = logging.getLogger(__name__)


class ContextFullError(EdgeattnError, RuntimeError):
    """The KV cache (or the position table) has no room for the requested tokens."""


class RuntimeLoadError(EdgeattnError, RuntimeError):
    """The folder's model cannot be loaded by onnxruntime."""


class EdgeLM:
    """A loaded output folder: tokenizer, onnxruntime session and KV-cache buffers."""

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession, provider: str,
                 tokenizer: Tokenizer) -> None:
        self.folder = folder
        self.manifest = manifest
        self.session = session
        self.provider = provider
        self.tokenizer = tokenizer
        self.kv = manifest.kv_cache
        self.length = 0  # tokens in the cache
        self._batch = 0
        self._caches: list[dict[str, ort.OrtValue]] = []  # per layer: kind -> buffer

    @classmethod
    def load(cls, folder: str | Path, provider: str = "cpu", threads: int | None = None,
             verify: bool = False, manifest: Manifest | None = None) -> EdgeLM:
        """Load ``folder`` on ``provider`` ("cpu" or "cuda", falling back to CPU with a message).

        The manifest must describe the folder's graph and tokenizer; ``verify`` also checks every
        file against the sha256 the manifest records (reads every byte: seconds for a large model).
        ``manifest``: run the folder as this one describes it, before it is written (convert checks
        the folder's numerics first, and writes the manifest last).
        """
        folder = Path(folder)
        manifest = read_manifest(folder) if manifest is None else manifest
        if verify:
            verify_files(folder, manifest, required=True)
        provider = _usable_provider(provider)
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise InvalidOptionError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        try:
            session = ort.InferenceSession(str(folder / manifest.files.model), options, providers=providers)
        except Exception as error:
            raise RuntimeLoadError(f"{folder}: onnxruntime cannot load the model ({str(error).splitlines()[0]})") from error
        check_graph(folder, manifest, session)
        return cls(folder, manifest, session, provider, load_tokenizer(folder, manifest))

    # -- low level: feed tokens, get next-token logits ---------------------------------------

    def reset(self, batch: int = 1) -> None:
        """Empty the KV cache (and size it for ``batch`` sequences)."""
        if batch != self._batch:
            device = "cuda" if self.provider == "cuda" else "cpu"
            self._caches = [
                {kind: ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, *shape_tail), np.dtype(dtype)), device, 0)
                 for kind, (dtype, shape_tail) in self.kv.buffers.items()}
                for _ in range(self.manifest.model.num_layers)
            ]
            self._batch = batch
        self.length = 0  # rows left from an earlier sequence are never read: the graph masks them by position

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        """Append ``input_ids`` [batch, n] to the cache; return next-token logits [batch, vocab].

        A long input runs in chunks of ``PREFILL_CHUNK`` tokens (same logits, less memory)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise InvalidOptionError(f"input_ids must be [batch, n>0], got shape {input_ids.shape}")
        if input_ids.shape[0] != self._batch:
            self.reset(input_ids.shape[0])
        self._check_room(input_ids.shape[1])
        for start in range(0, input_ids.shape[1], PREFILL_CHUNK):
            logits = self._run(input_ids[:, start:start + PREFILL_CHUNK])
        return logits

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        """One session run on ``input_ids`` (room already checked)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        total = self.length + input_ids.shape[1]
        binding.bind_cpu_input("attention_mask", np.ones((input_ids.shape[0], total), dtype=np.int64))
        binding.bind_output("logits")  # first bound output -> first copied output
        names = self.manifest.io.cache_names
        for index, cache in enumerate(self._caches):
            for kind, value in cache.items():
                binding.bind_ortvalue_input(names.past.format(layer=index, kind=kind), value)
                binding.bind_ortvalue_output(names.present.format(layer=index, kind=kind), value)
        self.session.run_with_iobinding(binding)
        self.length = total
        return binding.get_outputs()[0].numpy()[:, -1].copy()  # logits only (copy_outputs_to_cpu copies the KV too)

    def _check_room(self, new_tokens: int) -> None:
        end = self.length + new_tokens
        tokens = self.kv.cache_tokens
        if not self.kv.ring and end > tokens:
            raise ContextFullError(
                f"KV cache full: {self.length} tokens cached + {new_tokens} new > capacity {tokens} "
                "(convert with a larger --max-length, or a --window for constant memory)")
        limit = self.kv.max_positions
        if limit is not None and end > limit:
            raise ContextFullError(f"position {end - 1} is beyond the model's position table ({limit} positions)")

    # -- text ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Format chat ``messages`` with the model's chat format and open the assistant turn."""
        chat = self.manifest.chat_format
        if not chat:
            raise InvalidOptionError("this model has no chat template; use a plain prompt")
        return apply_chat_format(chat, messages)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.manifest.model.eos_token_ids or [])


def _usable_provider(provider: str) -> str:
    if provider not in PROVIDERS:
        raise InvalidOptionError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        _log.warning("%s is not available in this onnxruntime build (%s); falling back to CPU",
                     PROVIDERS[provider], ", ".join(ort.get_available_providers()))
        return "cpu"
    return provider
