"""Chat templates: untrusted Jinja, rendered in a sandbox (an unsandboxed one was CVE-2024-34359)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    pass


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # HF's tojson keeps non-ASCII as is; Jinja's default escapes HTML, which templates do not want.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # The options transformers uses, so templates written for it render the same here.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from None


def render_chat(source: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
                tools: Sequence[dict[str, Any]] | None = None, **special: Any) -> str:
    """Render a chat template; `special` carries bos_token, eos_token and the like."""
    try:
        return _compile(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       tools=list(tools) if tools else None, **special)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # An untrusted template meeting unexpected messages (content None, a missing key...).
        raise ChatTemplateError(f"chat template failed on these messages: {e}") from None
