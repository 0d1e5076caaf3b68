"""A JSON value against the subset of JSON Schema (draft 2020-12) that edgeattn's schemas use.

The runtime installs no jsonschema, yet must refuse a damaged manifest in one line that
says where it is damaged. The tests check that this checker and jsonschema agree on
edgeattn's schemas; a schema that uses a keyword outside the subset is refused, so no
part of a schema goes silently unchecked. One difference, on purpose: an integer must be
written as one (``2``, not ``2.0``), since the runtime uses it to size arrays.
"""

from __future__ import annotations

import json
import re
from typing import Any

SUPPORTED = frozenset({"type", "properties", "required", "additionalProperties", "items", "enum", "const",
                       "minimum", "minLength", "minItems", "maxItems", "pattern"})
ANNOTATIONS = frozenset({"$schema", "$id", "title", "description"})
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaDefinitionError(ValueError):
    """The schema itself uses a keyword this checker does not implement."""


def first_problem(value: Any, schema: dict, where: str = "") -> str | None:
    """``"<where> <what is wrong>"`` for the first place ``value`` breaks ``schema``; None when it conforms."""
    unknown = set(schema) - SUPPORTED - ANNOTATIONS
    if unknown:
        raise SchemaDefinitionError(f"schema keywords outside the supported subset: {', '.join(sorted(unknown))}")
    name = where or "the document"
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_TYPES[kind](value) for kind in types):
            return f"{name} must be {' or '.join(_article(kind) for kind in types)}, got {_shown(value)}"
    if "const" in schema and not _same(value, schema["const"]):
        return f"{name} must be {_shown(schema['const'])}, got {_shown(value)}"
    if "enum" in schema and not any(_same(value, choice) for choice in schema["enum"]):
        return f"{name} must be one of {', '.join(_shown(c) for c in schema['enum'])}; got {_shown(value)}"
    if _TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        return f"{name} must be at least {schema['minimum']}, got {_shown(value)}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{name} must not be empty"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{name} has an unexpected form: {_shown(value)}"
    if isinstance(value, list):
        return _array_problem(value, schema, name)
    if isinstance(value, dict):
        return _object_problem(value, schema, where)
    return None


def _array_problem(value: list, schema: dict, name: str) -> str | None:
    if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
        return f"{name} has {len(value)} items, expected {_item_range(schema)}"
    if "items" in schema:
        for index, item in enumerate(value):
            problem = first_problem(item, schema["items"], f"{name}[{index}]")
            if problem:
                return problem
    return None


def _object_problem(value: dict, schema: dict, where: str) -> str | None:
    prefix = f"{where}." if where else ""
    for key in schema.get("required", []):
        if key not in value:
            return f"{prefix}{key} is missing"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            problem = first_problem(item, properties[key], f"{prefix}{key}")
        elif extra is False:
            problem = f"{prefix}{key} is not a known key"
        elif isinstance(extra, dict):
            problem = first_problem(item, extra, f"{prefix}{key}")
        else:
            problem = None
        if problem:
            return problem
    return None


def _same(value: Any, expected: Any) -> bool:
    """JSON equality: ``true`` is not ``1``."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    return value == expected


def _article(kind: str) -> str:
    return {"object": "an object", "array": "a list", "integer": "a whole number", "null": "null",
            "boolean": "true or false"}.get(kind, f"a {kind}")


def _item_range(schema: dict) -> str:
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    return f"{low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
