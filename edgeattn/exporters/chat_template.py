"""Flatten a Jinja chat template into plain strings the runtime can fill without Jinja.

The on-device runtime has no template engine, so convert renders the template once
with placeholder messages and records, per role, the text around ``{content}``, the
generation prompt, and the default prefix a template adds when there is no system
message. Templates whose output is not a concatenation of per-message pieces are
detected (the flattened form must reproduce a rendered two-turn chat) and skipped.
"""

from __future__ import annotations

from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgeattn.runtimes.chat import PLACEHOLDER, apply_chat_format


def flatten_chat_template(template: str | None, bos_token: str = "", eos_token: str = "") -> dict[str, Any] | None:
    if not template:
        return None
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment.globals["raise_exception"] = raise_exception
    compiled = environment.from_string(template)

    def render(messages, generation=False) -> str:
        return compiled.render(messages=messages, add_generation_prompt=generation,
                               bos_token=bos_token, eos_token=eos_token)

    try:
        system = {"role": "system", "content": "S"}
        base = render([system])
        roles = {"system": render([{"role": "system", "content": PLACEHOLDER}])}
        for role in ("user", "assistant"):
            roles[role] = _suffix(render([system, {"role": role, "content": PLACEHOLDER}]), base)
        generation_prompt = _suffix(render([system], generation=True), base)
        user_only = render([{"role": "user", "content": PLACEHOLDER}])
        prefix = user_only[: len(user_only) - len(roles["user"])] if user_only.endswith(roles["user"]) else None
    except (jinja2.exceptions.TemplateError, ValueError):
        return None
    if prefix is None:
        return None
    flat = {"roles": roles, "generation_prompt": generation_prompt, "default_prefix": prefix}
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    if apply_chat_format(flat, probe) != render(probe, generation=True):
        return None
    return flat


def _suffix(text: str, base: str) -> str:
    if not text.startswith(base):
        raise ValueError("template output does not extend message by message")
    return text[len(base):]
