"""Recipe files (``--recipe recipe.toml``): the same keys as the convert flags, in TOML.

    [spec]                # AttentionSpec fields
    kv_heads = 1
    window = 512
    sinks = 4
    kv_cache = "int8"

    [convert]             # the other convert flags
    weights = "int4"
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
from pathlib import Path
from typing import Any

from edgeattn.errors import EdgeattnError
from edgeattn.runtimes.thresholds import THRESHOLDS
from edgeattn.spec import AttentionSpec

WHOLE, NUMBER, TEXT = "a whole number", "a number", "a string"
CONVERT_KINDS = {"weights": TEXT, "block_size": WHOLE, "attention_op": TEXT, "max_length": WHOLE, "provider": TEXT,
                 "calibration_text": TEXT}
VALIDATE_LENGTHS = {"prompts", "prefill", "steps", "greedy_tokens"}
VALIDATE_KINDS = {**dict.fromkeys(THRESHOLDS, NUMBER), **dict.fromkeys(VALIDATE_LENGTHS, WHOLE), "text": TEXT}
# What each [spec] value must be, read from AttentionSpec's annotations ("int | None" -> a whole number).
SPEC_KINDS = {name: {"int": WHOLE, "float": NUMBER, "str": TEXT}[str(field.type).split(" ")[0]]
              for name, field in AttentionSpec.__dataclass_fields__.items()}


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


def _is(kind: str, value: Any) -> bool:
    """TOML's booleans are not numbers here, though Python counts True as 1."""
    if isinstance(value, bool):
        return False
    return isinstance(value, {WHOLE: int, NUMBER: int | float, TEXT: str}[kind])
