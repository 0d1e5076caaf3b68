"""Recipe files (``--recipe recipe.toml``): the same keys as the convert flags, in TOML.

    [spec]                # AttentionSpec fields
    kv_heads = 1
    window = 512
    sinks = 4
    kv_cache = "int8"

    [convert]             # the other convert flags
    weights = "int4"
    weights_block_size = 32
    attention_op = "auto"
    max_length = 4096

    [validate]            # edgeattn validate: thresholds and lengths (docs/validate.md)
    max_ppl_delta = 0.05
    min_top1 = 0.9
    steps = 128

Flags given on the command line win over the recipe.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from edgeattn.errors import EdgeattnError
from edgeattn.runtimes.thresholds import THRESHOLDS
from edgeattn.spec import AttentionSpec

WHOLE, NUMBER, TEXT = "a whole number", "a number", "a string"
# [convert] keys are ConvertOptions' fields; recipes written before the rename say block_size.
CONVERT_KINDS = {"weights": TEXT, "weights_block_size": WHOLE, "attention_op": TEXT, "max_length": WHOLE,
                 "provider": TEXT, "calibration_text": TEXT}
CONVERT_RENAMED = {"block_size": "weights_block_size"}
VALIDATE_LENGTHS = {"prompts", "prefill", "steps", "greedy_tokens"}
VALIDATE_KINDS = {**dict.fromkeys(THRESHOLDS, NUMBER), **dict.fromkeys(VALIDATE_LENGTHS, WHOLE), "text": TEXT}


def _kind(annotation) -> str:
    """What a value of ``annotation`` must be in TOML: ``int | None`` -> a whole number, a Literal -> a string."""
    if typing.get_origin(annotation) is typing.Literal:
        return TEXT
    if typing.get_origin(annotation) is types.UnionType:
        return _kind(next(option for option in typing.get_args(annotation) if option is not type(None)))
    return {int: WHOLE, float: NUMBER, str: TEXT}[annotation]


# What each [spec] value must be, read from AttentionSpec's annotations.
SPEC_KINDS = {name: _kind(annotation) for name, annotation in typing.get_type_hints(AttentionSpec).items()}


class RecipeError(EdgeattnError, ValueError):
    """A recipe file that cannot be read or has unknown keys."""


def read_recipe(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise RecipeError(f"recipe {path} does not exist") from error
    except UnicodeDecodeError as error:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"recipe {path}: invalid TOML ({error})") from error
    unknown_tables = sorted(set(data) - {"spec", "convert", "validate"})
    if unknown_tables:
        raise RecipeError(f"recipe {path}: unknown tables {', '.join(unknown_tables)} (expected spec, convert, validate)")
    for table in data:
        if not isinstance(data[table], dict):
            raise RecipeError(f"recipe {path}: {table} must be a table ([{table}]), got {data[table]!r}")
    _rename_old_keys(path, data.get("convert", {}))
    for table, kinds in (("spec", SPEC_KINDS), ("convert", CONVERT_KINDS), ("validate", VALIDATE_KINDS)):
        values = data.get(table, {})
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise RecipeError(f"recipe {path}: unknown [{table}] keys: {', '.join(unknown)}")
        for key, value in values.items():
            if not _is(kinds[key], value):
                raise RecipeError(f"recipe {path}: [{table}] {key} must be {kinds[key]}, got {value!r}")
    for key, value in data.get("validate", {}).items():
        if key in THRESHOLDS and not (math.isfinite(value) and value >= 0):
            raise RecipeError(f"recipe {path}: [validate] {key} must be a finite number >= 0, got {value!r}")
    return data


def _rename_old_keys(path: Path, convert: dict[str, Any]) -> None:
    for old, new in CONVERT_RENAMED.items():
        if old in convert:
            if new in convert:
                raise RecipeError(f"recipe {path}: [convert] sets both {old} and {new} (the same setting); keep {new}")
            convert[new] = convert.pop(old)


def _is(kind: str, value: Any) -> bool:
    """TOML's booleans are not numbers here, though Python counts True as 1."""
    if isinstance(value, bool):
        return False
    return isinstance(value, {WHOLE: int, NUMBER: int | float, TEXT: str}[kind])
