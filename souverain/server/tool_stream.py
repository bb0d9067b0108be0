"""Reading tool calls out of a model's answer as it streams, in the model's native format.

`ToolCallReader.feed(text)` returns events in order: plain content, the start of a call (index and name),
and pieces of its arguments (raw JSON text, in order; their concatenation is the arguments object) —
exactly what the SDKs assemble from `delta.tool_calls`. The same reader serves non-streamed answers.
Whether an answer is a call is decided by its start: the `[TOOL_CALLS]` token (Mistral) or a `<tool_call>`
block (others); until that is known, text that could still open a call is held back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from souverain.server.tools import CLOSE, OPEN, ToolFormat

# Mistral v11: the [TOOL_CALLS] and [ARGS] control tokens decode to nothing, so a call reads "name{...}".
_NAME_ONLY = re.compile(r"([A-Za-z0-9_.-]{1,64})(?=\s*[{\[])")
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    name: str


@dataclass
class CallArguments:
    index: int
    text: str


Event = Content | CallStart | CallArguments


@dataclass
class _Args:
    """Scans one JSON value character by character: where it ends, outside strings."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False

    def feed(self, ch: str) -> bool:
        """True when `ch` completed the value."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        self.started = self.started or not ch.isspace()
        return self.started and self.depth == 0 and not self.in_string and ch in "}]"


@dataclass
class ToolCallReader:
    fmt: ToolFormat
    enabled: bool = True  # tool_choice none: everything is content
    mode: str = "undecided"  # undecided | text | calls
    calls: int = 0
    buf: str = ""
    args: _Args | None = None
    names: list[str] = field(default_factory=list)

    def feed(self, text: str, token_ids: list[int] | None = None) -> list[Event]:
        if self.mode == "undecided":
            self._decide(text, token_ids or [])
            text, self.buf = self.buf, ""
            if self.mode == "undecided":
                self.buf = text
                return []
        if self.mode == "text":
            return [Content(text)] if text else []
        self.buf += text
        return self._calls()

    def finish(self) -> list[Event]:
        """The end of the answer: text still held back is content after all."""
        if self.mode == "undecided" and self.buf:
            self.mode = "text"
            return [Content(self.buf)]
        return []

    def _decide(self, text: str, token_ids: list[int]) -> None:
        if not self.enabled:
            self.mode = "text"
        elif self.fmt.kind == "mistral":
            # The first token says it: [TOOL_CALLS] (a control token, never typed text) or anything else.
            if token_ids:
                self.mode = "calls" if token_ids[0] == self.fmt.call_token else "text"
        elif self.fmt.kind == "llama3":  # a call is the answer's JSON object itself
            head = (self.buf + text).lstrip()
            if head:
                self.mode = "calls" if head.startswith("{") else "text"
        else:
            head = (self.buf + text).lstrip()
            if head.startswith(OPEN):
                self.mode = "calls"
            elif not OPEN.startswith(head):
                self.mode = "text"
        self.buf += text

    def _calls(self) -> list[Event]:
        events: list[Event] = []
        while self.buf:
            if self.args is not None:  # inside a call's arguments: stream them as they come
                if not self.args.started:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        break
                for i, ch in enumerate(self.buf):
                    if self.args.feed(ch):
                        events.append(CallArguments(self.calls - 1, self.buf[: i + 1]))
                        self.buf, self.args = self.buf[i + 1 :], None
                        break
                else:
                    events.append(CallArguments(self.calls - 1, self.buf))
                    self.buf = ""
                continue
            head = self.buf.lstrip(" \t\r\n[],}")
            for tag in (OPEN, CLOSE):
                if head.startswith(tag):
                    head = head[len(tag) :]
            if head != self.buf:
                self.buf = head
                continue
            if not head.startswith("{") and self.fmt.args_token is None:
                if head and not (OPEN.startswith(head) or CLOSE.startswith(head)):
                    # Not a call after all (no grammar held it): what is left is content.
                    events.append(Content(head))
                    self.buf = ""
                break
            v11 = self.fmt.args_token is not None
            match = _NAME_ONLY.match(head) if v11 else _HEADER.match(head)
            if match is None:
                if v11 and head and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}\s*", head):
                    events.append(Content(head))  # not a call after all
                    self.buf = ""
                break  # the header is not complete yet
            name = match.group(1).encode().decode("unicode_escape") if "\\" in match.group(1) else match.group(1)
            self.names.append(name)
            events.append(CallStart(self.calls, name))
            self.calls += 1
            self.args = _Args()
            self.buf = head[match.end() :]
        return events
