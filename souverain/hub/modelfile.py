"""Ollama's Modelfile: a model with its own system prompt, sampling defaults, template and license.

    FROM smollm2                       an installed model, or a .gguf file / model folder (relative to the Modelfile)
    SYSTEM \"\"\"You are a pirate.\"\"\"     the system message used when a request has none
    PARAMETER temperature 0.3          defaults for what a request leaves out (repeatable for `stop`)
    TEMPLATE \"\"\"{% for m in messages %}...\"\"\"   a Jinja chat template replacing the model's own
    MESSAGE user Hello                 turns put before every conversation
    LICENSE \"\"\"...\"\"\"

    ADAPTER ./lora                     a LoRA adapter (PEFT, Mistral's lora.safetensors, ours) applied to every answer

`souverain create NAME -f Modelfile` installs NAME: the base's files (hard-linked when they can be), the adapter
(converted, checked against the base's shapes) and these defaults in its manifest, which `serve`, the API and
`run` honour. What Souverain cannot honour is refused by name (Ollama's mirostat, a Go template), never dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelfileError(ValueError):
    pass


# Ollama's PARAMETER name -> (the API's name, its type). `num_ctx` sets the served context.
PARAMETERS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "seed": ("seed", int), "num_predict": ("max_tokens", int),
    "repeat_penalty": ("repetition_penalty", float), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "stop": ("stop", str), "num_ctx": ("context", int),
    "min_tokens": ("min_tokens", int),
}
ROLES = ("system", "user", "assistant")
_INSTRUCTION = re.compile(r"^\s*([A-Za-z]+)\s*(.*)$", re.S)


@dataclass
class Modelfile:
    base: str
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # the API's names
    template: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    license: str | None = None
    adapter: str | None = None  # a LoRA adapter folder (PEFT, Mistral's, ours), relative to the Modelfile

    def defaults(self) -> dict[str, Any]:
        """What the manifest keeps (`Manifest.defaults`): only what was set."""
        out: dict[str, Any] = {"system": self.system, "parameters": self.parameters or None,
                               "template": self.template, "messages": self.messages or None}
        return {k: v for k, v in out.items() if v is not None}


def _lines(text: str) -> list[tuple[int, str]]:
    """Logical lines, numbered: a triple-quoted value may span several physical lines."""
    out: list[tuple[int, str]] = []
    physical = text.splitlines()
    i = 0
    while i < len(physical):
        start, line = i + 1, physical[i]
        i += 1
        if line.count('"""') == 1:  # opens a block that ends on a later line
            while i < len(physical) and '"""' not in physical[i]:
                line += "\n" + physical[i]
                i += 1
            if i == len(physical):
                raise ModelfileError(f'line {start}: """ is never closed')
            line += "\n" + physical[i]
            i += 1
        if line.strip() and not line.lstrip().startswith("#"):
            out.append((start, line))
    return out


def _value(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith('"""') and raw.endswith('"""') and len(raw) >= 6:
        return raw[3:-3]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return raw[1:-1]
    return raw


def _go_template(text: str) -> bool:
    return bool(re.search(r"{{-?\s*(\.|if \.|range \.|end\b)", text))


def parse(text: str) -> Modelfile:
    base: str | None = None
    found = Modelfile(base="")
    for number, line in _lines(text):
        match = _INSTRUCTION.match(line)
        if match is None:
            raise ModelfileError(f"line {number}: expected an instruction (FROM, SYSTEM, PARAMETER, ...)")
        word, rest = match.group(1).upper(), match.group(2)
        if word == "FROM":
            base = _value(rest)
        elif word == "SYSTEM":
            found.system = _value(rest)
        elif word == "PARAMETER":
            name, _, raw = rest.strip().partition(" ")
            set_parameter(found.parameters, name.lower(), _value(raw), number)
        elif word == "TEMPLATE":
            template = _value(rest)
            if _go_template(template):
                raise ModelfileError(f"line {number}: TEMPLATE is a Go template (Ollama's syntax); Souverain renders "
                                     "Jinja chat templates, as Hugging Face's chat_template (messages, "
                                     "add_generation_prompt): write it in Jinja, or leave TEMPLATE out to keep the "
                                     "model's own")
            found.template = template
        elif word == "MESSAGE":
            role, _, content = rest.strip().partition(" ")
            if role.lower() not in ROLES:
                raise ModelfileError(f"line {number}: MESSAGE role must be one of {', '.join(ROLES)}, got {role!r}")
            found.messages.append({"role": role.lower(), "content": _value(content)})
        elif word == "LICENSE":
            found.license = _value(rest)
        elif word == "ADAPTER":
            found.adapter = _value(rest)
        else:
            raise ModelfileError(f"line {number}: unknown instruction {word} (FROM, SYSTEM, PARAMETER, TEMPLATE, "
                                 "MESSAGE, LICENSE)")
    if not base:
        raise ModelfileError("no FROM line: a Modelfile starts from a model (FROM smollm2, FROM ./model.gguf)")
    found.base = base
    return found


def set_parameter(into: dict[str, Any], name: str, raw: str, number: int) -> None:
    if name not in PARAMETERS:
        raise ModelfileError(f"line {number}: PARAMETER {name} is not supported; Souverain takes "
                             f"{', '.join(sorted(PARAMETERS))}")
    key, kind = PARAMETERS[name]
    if not raw:
        raise ModelfileError(f"line {number}: PARAMETER {name} needs a value")
    try:
        value: Any = kind(raw)
    except ValueError:
        raise ModelfileError(f"line {number}: PARAMETER {name} takes {'an integer' if kind is int else 'a number'}, "
                             f"got {raw!r}") from None
    if key == "stop":
        into.setdefault("stop", []).append(value)
    else:
        into[key] = value


def read(path: Path) -> Modelfile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelfileError(f"cannot read {path}: {e}") from None
    try:
        return parse(text)
    except ModelfileError as e:
        raise ModelfileError(f"{path}: {e}") from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A model made FROM a model with defaults keeps them, with its own on top."""
    out = {**base, **{k: v for k, v in override.items() if k != "parameters"}}
    parameters = {**base.get("parameters", {}), **override.get("parameters", {})}
    if parameters:
        out["parameters"] = parameters
    return out


def render(name: str, source: str, defaults: dict[str, Any], license_: str | None) -> str:
    """A Modelfile that recreates an installed model's defaults (`souverain show NAME --modelfile`)."""
    names = {api: ollama for ollama, (api, _) in PARAMETERS.items()}
    lines = [f"# Modelfile of {name}", f"FROM {source}"]
    if "template" in defaults:
        lines.append(f'TEMPLATE """{defaults["template"]}"""')
    if "system" in defaults:
        lines.append(f'SYSTEM """{defaults["system"]}"""')
    for key, value in defaults.get("parameters", {}).items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {names.get(key, key)} {json.dumps(v) if isinstance(v, str) else v}")
    for m in defaults.get("messages", []):
        lines.append(f'MESSAGE {m["role"]} """{m["content"]}"""')
    if "adapter" in defaults:
        lines.append(f"# ADAPTER: the converted adapter is in the model's files ({defaults['adapter']}/)")
    if license_:
        lines.append(f'LICENSE """{license_}"""')
    return "\n".join(lines) + "\n"
