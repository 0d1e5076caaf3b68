"""Baselines for benchmarks/speed.py, each wrapped to look like EdgeLM (reset / forward / length).

* PyTorch eager: transformers' LlamaForCausalLM (default SDPA attention), a DynamicCache.
* transformers' own ONNX exporter (``OnnxExporter().export_for_generation`` with
  ``OnnxConfig(dynamic=True, ort_fusions="cpu")``, which emits GroupQueryAttention), run
  with onnxruntime, its present cache fed back as the next past.
* onnxruntime-genai's model builder (fp32 and int4), run by onnxruntime-genai itself.

All start from one Hugging Face folder exported from the packaged GGUF checkpoint, so
every row of the benchmark has the same weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SMOLLM2_MAX_POSITIONS = 8192
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")


def hf_folder(cache: Path) -> Path:
    """SmolLM2 as a Hugging Face safetensors folder (built once from the GGUF file)."""
    folder = cache / "hf-smollm2"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    from edgeattn.models import sources

    staging = cache / "hf-smollm2.partial"
    source = sources.load_hf("smollm2")  # dequantized fp32; load_hf already dropped the GGUF quantization config
    source.model.save_pretrained(staging)
    gguf = sources.smollm2_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(staging)
    config = json.loads((staging / "config.json").read_text())
    config.pop("quantization_config", None)  # a null entry makes onnxruntime-genai's builder fail
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    staging.rename(folder)
    return folder


def kv_bytes_per_token(hf: Path) -> int:
    """fp32 K and V of every layer: layers x 2 x kv heads x head dim x 4 bytes."""
    config = json.loads((hf / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4


# -- PyTorch eager ----------------------------------------------------------------------------


class TorchSession:
    def __init__(self, hf: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, local_files_only=True).eval()
        self.cache = None
        self.length = 0

    def reset(self, batch: int = 1) -> None:
        self.cache, self.length = None, 0

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.from_numpy(input_ids), cache=self.cache, use_cache=True,
                             logits_to_keep=1)
        self.cache = out.cache
        self.length += input_ids.shape[1]
        return out.logits[:, -1].float().numpy()


# -- onnxruntime-genai ------------------------------------------------------------------------


def genai_folder(cache: Path, hf: Path, precision: str, threads: int, max_length: int) -> Path:
    """onnxruntime-genai's builder output (a subprocess), its config set to ``threads`` and ``max_length``."""
    folder = cache / f"genai-{precision}"
    if not (folder / "genai_config.json").is_file():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(folder),
                   "-p", precision, "-e", "cpu", "-c", str(cache / "genai-cache")]
        if precision == "int4":
            command += ["--extra_options", "int4_block_size=32", "int4_accuracy_level=4"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai builder failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    config["search"]["max_length"] = max_length
    path.write_text(json.dumps(config, indent=4))
    return folder


class GenaiSession:
    """onnxruntime-genai: a Generator per sequence; append_tokens runs the model on new tokens."""

    def __init__(self, folder: Path, max_length: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.max_length = max_length
        self.generator = None
        self.length = 0

    def reset(self, batch: int = 1) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length)
        self.generator = self.og.Generator(self.model, params)
        self.length = 0

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        if self.generator is None:
            self.reset()
        self.generator.append_tokens(input_ids.astype(np.int32))
        self.length += input_ids.shape[1]
        return np.asarray(self.generator.get_logits()).reshape(input_ids.shape[0], -1)


# -- transformers' ONNX exporter --------------------------------------------------------------


def transformers_onnx_folder(cache: Path, hf: Path) -> Path:
    """transformers.exporters' ONNX export with onnxruntime CPU fusions (GroupQueryAttention).

    One multi-token decode graph serves prefill (on an empty cache) and decode.
    """
    folder = cache / "transformers-onnx"
    if (folder / "decode.onnx").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.exporters import OnnxExporter
    from transformers.exporters.configs import OnnxConfig

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, local_files_only=True).eval()
    sample = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    exported = OnnxExporter().export_for_generation(model, sample, OnnxConfig(dynamic=True, ort_fusions="cpu"),
                                                    multi_token_decode=True)
    staging = cache / "transformers-onnx.partial"
    exported.save_pretrained(staging)  # prefill.onnx, decode.onnx (+ .data), config.json, export.json
    staging.rename(folder)
    return folder


class GrowingOrtSession:
    """An ONNX decoder whose present cache = concat(past, new): feed each present back as the next past."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {item.name: item for item in self.session.get_inputs()}
        self.outputs = [item.name for item in self.session.get_outputs()]
        # the cache inputs, in order, and the outputs that follow the logits, in the same order
        self.past_names = [name for name in self.inputs if name not in _TOKEN_INPUTS]
        self.present_names = self.outputs[1:]
        if len(self.past_names) != len(self.present_names):
            raise ValueError(f"{path.name}: {len(self.past_names)} cache inputs but {len(self.present_names)} cache outputs")
        self.length = 0
        self.past: dict[str, np.ndarray] = {}

    def reset(self, batch: int = 1) -> None:
        self.length = 0
        self.past = {}
        for name in self.past_names:
            shape = [batch if index == 0 else _static(dim) for index, dim in enumerate(self.inputs[name].shape)]
            self.past[name] = np.zeros(shape, dtype=np.float32)

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        if not self.past and self.past_names:
            self.reset(input_ids.shape[0])
        batch, new = input_ids.shape
        feeds = dict(self.past)
        positions = np.arange(self.length, self.length + new, dtype=np.int64)[None].repeat(batch, 0)
        for name in self.inputs:
            if name == "input_ids":
                feeds[name] = input_ids.astype(np.int64)
            elif name == "attention_mask":
                feeds[name] = np.ones((batch, self.length + new), dtype=np.int64)
            elif name == "position_ids":
                feeds[name] = positions
            elif name == "cache_position":
                feeds[name] = positions[0]
        results = dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        for past, present in zip(self.past_names, self.present_names):
            self.past[past] = results[present]
        self.length += new
        logits = results[self.outputs[0]]
        return logits[:, -1] if logits.ndim == 3 else logits


def _static(dim) -> int:
    """A fixed dimension (an int, or a name that is a number: the exporter writes heads as '3'); 0 for the sequence."""
    if isinstance(dim, int):
        return dim
    return int(dim) if isinstance(dim, str) and dim.isdigit() else 0
