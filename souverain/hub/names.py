"""Model names: what users type, and the one folder each maps to inside the store."""

from __future__ import annotations

import re

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"{_PART}(?:/{_PART})?")


class NameError_(ValueError):
    pass


def check_name(name: str) -> str:
    """A model name is `name` or `org/name` of letters, digits, `.`, `_`, `-`; never `..`, a
    leading dot or slash, or a backslash, so it can never point outside the store."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise NameError_(f"invalid model name {name!r}: use letters, digits, '.', '_', '-' and at most one '/'")
    return name


def folder_name(name: str) -> str:
    """The store folder of a model: one level, `org/name` -> `org--name`."""
    return check_name(name).replace("/", "--")
