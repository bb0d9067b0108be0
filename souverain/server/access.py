"""The access log (one line per request: method, path, status, duration, request id, organisation — never a key,
a query string or a body) and the server's log set-up (level; text or JSON lines)."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from souverain.server.guard import caller_from

log = logging.getLogger("souverain.access")


@dataclass
class AccessLog:
    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        seen: dict[str, Any] = {"status": 0, "rid": "-"}

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for key, value in message.get("headers", []):
                    if key.lower() == b"x-request-id":
                        seen["rid"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            # After the last byte (a stream's duration is the whole answer); status 0: the client left first.
            caller = caller_from(scope)
            org = caller.org_id if caller is not None and caller.org_id is not None else "-"
            log.info("%s %s %s %.1fms rid=%s org=%s", scope["method"], scope["path"],
                     seen["status"], (time.perf_counter() - start) * 1000, seen["rid"], org,
                     extra={"access": {"method": scope["method"], "path": scope["path"],
                                       "status": seen["status"],
                                       "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                                       "request_id": seen["rid"], "org": org}})


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                               "level": record.levelname.lower(), "logger": record.name}
        access = getattr(record, "access", None)
        if access is not None:
            out.update(access)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


LEVELS = ("debug", "info", "warning", "error", "critical")


def configure(level: str, fmt: str, access: bool) -> dict[str, Any]:
    """Root logging to stderr in `fmt`; returns uvicorn's log_config (its own loggers through the same handler,
    its access log off: ours has the request id and the organisation)."""
    if level not in LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The access lines are INFO: on by default whatever the level, off with --no-access-log.
    log.setLevel(logging.INFO if access else logging.CRITICAL + 1)
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {"uvicorn": {"level": level.upper()}, "uvicorn.error": {"level": level.upper()},
                        "uvicorn.access": {"level": "WARNING", "propagate": False}}}
