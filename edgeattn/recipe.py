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

import tomllib
from pathlib import Path
from typing import Any

from edgeattn.errors import EdgeattnError
from edgeattn.spec import AttentionSpec
from edgeattn.thresholds import THRESHOLDS

CONVERT_KEYS = {"weights", "block_size", "attention_op", "max_length", "provider", "calibration_text"}
VALIDATE_LENGTHS = {"prompts", "prefill", "steps", "greedy_tokens"}
VALIDATE_KEYS = set(THRESHOLDS) | VALIDATE_LENGTHS | {"text"}


class RecipeError(EdgeattnError, ValueError):
    """A recipe file that cannot be read or has unknown keys."""


def read_recipe(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise RecipeError(f"recipe {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"recipe {path}: invalid TOML ({error})") from error
    unknown_tables = sorted(set(data) - {"spec", "convert", "validate"})
    if unknown_tables:
        raise RecipeError(f"recipe {path}: unknown tables {', '.join(unknown_tables)} (expected spec, convert, validate)")
    spec_fields = set(AttentionSpec.__dataclass_fields__)
    for table, allowed in (("spec", spec_fields), ("convert", CONVERT_KEYS), ("validate", VALIDATE_KEYS)):
        unknown = sorted(set(data.get(table, {})) - allowed)
        if unknown:
            raise RecipeError(f"recipe {path}: unknown [{table}] keys: {', '.join(unknown)}")
    _check_validate_types(path, data.get("validate", {}))
    return data


def _check_validate_types(path: Path, table: dict[str, Any]) -> None:
    """Thresholds are numbers, lengths whole numbers, text a path."""
    for key, value in table.items():
        if key in THRESHOLDS:
            ok, expected = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        elif key in VALIDATE_LENGTHS:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        else:
            ok, expected = isinstance(value, str), "a file path"
        if not ok:
            raise RecipeError(f"recipe {path}: [validate] {key} must be {expected}, got {value!r}")
