"""What decode must read per token, the time that takes at a bandwidth, and whether a model fits a device.

A decode step reads every weight once and the part of the KV cache it attends to, so
``(weight bytes + KV bytes) / bandwidth`` is a floor on its time. Weight bytes are the
ONNX file and its external data on disk: every weight counted once, a tied or untied
embedding table whole (an untied table is only gathered from, so this overstates it).
KV bytes count every cached token: for hierarchical attention, which reads only the
blocks it keeps, that overstates the bytes too. Both make the floor a little high,
never low, for those models.
"""

from __future__ import annotations

from pathlib import Path

from edgeattn.errors import EdgeattnError, InvalidOptionError
from edgeattn.runtimes.manifest import Manifest
from edgeattn.runtimes.targets import Target


class TargetMemoryError(EdgeattnError, ValueError):
    """A model plus its KV cache at the requested length does not fit the target's memory budget."""


def weights_bytes(folder: Path, manifest: Manifest) -> int:
    """Bytes of the model file and its external data (files named after it, as ONNX saves them)."""
    model = manifest.files.model
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file() and path.name.startswith(model))


def folder_bytes(folder: Path) -> int:
    """Everything a device must hold on disk: the whole output folder."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def cache_tokens(kv: dict) -> int:
    """Tokens the KV cache of a profile entry holds: its ``capacity`` rows, less rows that hold other state.

    Profile entries describe baselines too, which have no manifest, so this reads the entry's ``kv_cache``
    (the manifest's keys; for a folder, ``KVCacheInfo.cache_tokens`` says the same)."""
    return kv.get("tokens", kv["capacity"])


def context_limit(kv: dict) -> tuple[int | None, str]:
    """The most tokens the folder's cache can hold (None: unlimited) and why."""
    limits = []
    if not kv["ring"]:
        tokens = cache_tokens(kv)
        limits.append((tokens, f"the KV cache holds {tokens} tokens (convert with a larger --max-length)"))
    if kv.get("max_positions") is not None:
        limits.append((kv["max_positions"], f"the position table has {kv['max_positions']} positions"))
    return min(limits) if limits else (None, "")


def kv_bytes_held(kv: dict, tokens: int) -> int:
    """KV bytes that hold ``tokens`` cached tokens (a ring keeps at most its capacity), a residual window's
    constant buffers included."""
    return kv["bytes_per_token"] * (min(tokens, kv["capacity"]) if kv["ring"] else tokens) + kv.get("residual_bytes", 0)


def keys_read(kv: dict, tokens: int) -> int:
    """Cached keys one decode step attends to at ``tokens`` of context: those held, or a hierarchical model's
    budget (sinks + window + selected blocks) once the context passes it."""
    held = min(tokens, kv["capacity"]) if kv["ring"] else tokens
    budget = kv.get("keys_read")
    return min(held, budget) if budget is not None else held


def kv_bytes_read(kv: dict, tokens: int) -> int:
    """KV bytes one decode step reads: its keys and values, the block summaries it scores, and a residual
    window's full-precision rows."""
    return kv["bytes_per_token"] * (keys_read(kv, tokens) + kv.get("summary_rows", 0)) + kv.get("residual_bytes", 0)


def kv_bytes_resident(kv: dict, tokens: int) -> int:
    """KV bytes in memory at ``tokens``: preallocated buffers cost their full capacity from the start."""
    if kv.get("growing"):
        return kv_bytes_held(kv, tokens)
    return kv["bytes_per_token"] * kv["capacity"] + kv.get("residual_bytes", 0)


def bound_ms(bytes_read: int, gb_per_s: float) -> float:
    return bytes_read / (gb_per_s * 1e9) * 1e3


def check_fit(name: str, info: dict, target: Target, max_length: int | None) -> dict:
    """Weights + KV cache at ``max_length`` (default: the model's own) against the target's budget.

    ``info`` describes the model: weights_bytes, max_length and kv_cache (see ``profile.Candidate``).
    """
    kv = info["kv_cache"]
    tokens = max_length if max_length is not None else info["max_length"]
    limit, reason = context_limit(kv)
    if limit is not None and tokens > limit:
        raise InvalidOptionError(f"{name}: --max-length {tokens} is beyond what the folder can hold: {reason}")
    weights = info["weights_bytes"]
    kv_resident = kv_bytes_resident(kv, tokens)
    required = weights + kv_resident
    return {"max_length": tokens, "weights_bytes": weights, "kv_bytes": kv_resident, "required_bytes": required,
            "budget_bytes": target.budget_bytes, "fits": required <= target.budget_bytes}


def raise_unless_fits(fits: dict[str, dict], target: Target) -> None:
    """One clear error naming every model that does not fit."""
    failures = [f"{name} needs {human_bytes(fit['weights_bytes'])} weights + {human_bytes(fit['kv_bytes'])} KV cache at "
                f"{fit['max_length']} tokens = {human_bytes(fit['required_bytes'])}"
                for name, fit in fits.items() if not fit["fits"]]
    if failures:
        raise TargetMemoryError(
            f"does not fit {target.name} ({target.description}): " + "; ".join(failures)
            + f" > budget {human_bytes(target.budget_bytes)}"
            + f" ({target.budget_fraction:.0%} of {human_bytes(target.memory_bytes)}); "
            "try --weights int4, a quantized --kv-cache, a --window, or a smaller --max-length")


def human_bytes(value: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disk and RAM sizes are sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value / 1e3:.1f} kB"
