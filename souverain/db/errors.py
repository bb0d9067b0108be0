"""Errors the repositories raise; the server maps them to HTTP statuses, the CLI to messages."""


class NotFound(LookupError):
    """No such row (the server answers 404)."""


class Conflict(ValueError):
    """A unique name already taken or an invalid change (the server answers 409 or 400)."""


class Forbidden(PermissionError):
    """The actor's role does not allow this change (the server answers 403)."""
