"""Chat prompts from the flattened chat format stored in the manifest (no template engine needed)."""

from __future__ import annotations

from typing import Any

from edgeattn.errors import InvalidOptionError

PLACEHOLDER = "{content}"


def apply_chat_format(flat: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """The prompt for ``messages`` followed by the assistant's generation prompt."""
    text = flat["default_prefix"] if messages and messages[0]["role"] != "system" else ""
    for message in messages:
        if message["role"] not in flat["roles"]:
            raise InvalidOptionError(f"chat role {message['role']!r} is not in the model's chat format")
        text += flat["roles"][message["role"]].replace(PLACEHOLDER, message["content"])
    return text + flat["generation_prompt"]
