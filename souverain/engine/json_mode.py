"""JSON mode: a character-level recogniser that says whether text can still become a JSON object.

Decoding in JSON mode keeps one recogniser per sequence and accepts a token only when its text
keeps the output a prefix of some JSON object; once the object is closed, only EOS may follow.
Pure Python, no torch.
"""

from __future__ import annotations

_WS = " \t\n\r"
_LITERALS = ("true", "false", "null")
_ESCAPES = '"\\/bfnrtu'
_HEX = set("0123456789abcdefABCDEF")
_DIGITS = set("0123456789")
# Number DFA: state -> {character class -> next state}; accepting states end a number.
_NUMBER = {
    "start": {"-": "minus", "0": "zero", "1-9": "int"},
    "minus": {"0": "zero", "1-9": "int"},
    "zero": {".": "dot", "e": "e"},
    "int": {"0": "int", "1-9": "int", ".": "dot", "e": "e"},
    "dot": {"0": "frac", "1-9": "frac"},
    "frac": {"0": "frac", "1-9": "frac", "e": "e"},
    "e": {"+": "sign", "-": "sign", "0": "exp", "1-9": "exp"},
    "sign": {"0": "exp", "1-9": "exp"},
    "exp": {"0": "exp", "1-9": "exp"},
}
_NUMBER_END = {"zero", "int", "frac", "exp"}


def _number_class(ch: str) -> str:
    if ch in "123456789":
        return "1-9"
    return "e" if ch in "eE" else ch


class JsonPrefix:
    def __init__(self) -> None:
        # Open containers, innermost last: ["{", phase] or ["[", phase]. Object phases: key_or_end,
        # key, colon, value, next; array phases: value_or_end, value, next.
        self.stack: list[list[str]] = []
        self.scalar: str | None = None  # string | escape | unicode | number | literal
        self.buf = ""  # literal so far, \\u digits, or the number DFA state
        self.is_key = False
        self.started = False
        self.done = False

    def copy(self) -> JsonPrefix:
        c = JsonPrefix()
        c.stack = [list(f) for f in self.stack]
        c.scalar, c.buf, c.is_key, c.started, c.done = self.scalar, self.buf, self.is_key, self.started, self.done
        return c

    def feed_text(self, text: str) -> bool:
        """Accept all of `text`, or none of it (False, state unchanged)."""
        trial = self.copy()
        if not all(trial._feed(ch) for ch in text):
            return False
        self.__dict__.update(trial.__dict__)
        return True

    def closing(self) -> str:
        """The shortest text that completes the object from here (used when the budget runs out)."""
        out = ""
        in_key = False
        if self.scalar == "escape":
            out += "n"
        elif self.scalar == "unicode":
            out += "0" * (4 - len(self.buf))
        if self.scalar in ("string", "escape", "unicode"):
            out += '"'
            in_key = self.is_key
        elif self.scalar == "literal":
            out += next(lit for lit in _LITERALS if lit.startswith(self.buf))[len(self.buf):]
        elif self.scalar == "number" and self.buf not in _NUMBER_END:
            out += "0"
        if not self.started:
            return out + "{}"
        value_open = self.scalar is not None and not in_key
        for i, (kind, phase) in enumerate(reversed(self.stack)):
            if i == 0 and in_key:
                phase = "colon"
            elif (i > 0 or value_open) and phase in ("value", "value_or_end"):
                phase = "next"  # the value in progress (a scalar, or an inner container) was closed above
            if kind == "{":
                out += {"key_or_end": "", "key": '"":null', "colon": ":null", "value": "null", "next": ""}[phase] + "}"
            else:
                out += {"value_or_end": "", "value": "null", "next": ""}[phase] + "]"
        return out

    # -- structure --------------------------------------------------------------------------------
    def _feed(self, ch: str) -> bool:
        if self.scalar is not None:
            return self._scalar(ch)
        if ch in _WS:
            return True
        if self.done:
            return False
        if not self.started:  # json_object: the answer is one object
            self.started = True
            return ch == "{" and self._push("{", "key_or_end")
        frame = self.stack[-1]
        kind, phase = frame
        if kind == "{":
            if phase in ("key_or_end", "key") and ch == '"':
                self.scalar, self.is_key = "string", True
                return True
            if phase in ("key_or_end", "next") and ch == "}":
                return self._close()
            if phase == "colon" and ch == ":":
                frame[1] = "value"
                return True
            if phase == "next" and ch == ",":
                frame[1] = "key"
                return True
            return phase == "value" and self._value(ch)
        if phase in ("value_or_end", "next") and ch == "]":
            return self._close()
        if phase == "next" and ch == ",":
            frame[1] = "value"
            return True
        return phase in ("value_or_end", "value") and self._value(ch)

    def _push(self, kind: str, phase: str) -> bool:
        self.stack.append([kind, phase])
        return True

    def _value(self, ch: str) -> bool:
        if ch == "{":
            return self._push("{", "key_or_end")
        if ch == "[":
            return self._push("[", "value_or_end")
        if ch == '"':
            self.scalar, self.is_key = "string", False
            return True
        if ch in "-0123456789":
            self.scalar, self.buf = "number", _NUMBER["start"][_number_class(ch)]
            return True
        if ch in "tfn":
            self.scalar, self.buf = "literal", ch
            return True
        return False

    def _close(self) -> bool:
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        self.scalar, self.buf = None, ""
        if not self.stack:
            self.done = True
        else:
            self.stack[-1][1] = "next"

    # -- scalars ----------------------------------------------------------------------------------
    def _scalar(self, ch: str) -> bool:
        kind = self.scalar
        if kind == "string":
            if ch == "\\":
                self.scalar = "escape"
            elif ch == '"':
                if self.is_key:
                    self.scalar, self.is_key = None, False
                    self.stack[-1][1] = "colon"
                else:
                    self._value_done()
            elif ch < " ":
                return False  # control characters must be escaped
            return True
        if kind == "escape":
            if ch not in _ESCAPES:
                return False
            self.scalar, self.buf = ("unicode", "") if ch == "u" else ("string", "")
            return True
        if kind == "unicode":
            if ch not in _HEX:
                return False
            self.buf += ch
            if len(self.buf) == 4:
                self.scalar, self.buf = "string", ""
            return True
        if kind == "literal":
            if not any(lit.startswith(self.buf + ch) for lit in _LITERALS):
                return False
            self.buf += ch
            if self.buf in _LITERALS:
                self._value_done()
            return True
        nxt = _NUMBER[self.buf].get(_number_class(ch))  # a number
        if nxt is not None:
            self.buf = nxt
            return True
        if self.buf not in _NUMBER_END:
            return False
        self._value_done()
        return self._feed(ch)  # the character after a number belongs to the structure
