"""A real server (uvicorn on loopback) over tiny random models and a platform database, for the platform tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from souverain.db import keys
from souverain.db.database import Database
from souverain.db.tables import utcnow
from souverain.engine.async_engine import AsyncEngine
from souverain.server.app import create_app
from souverain.server.limits import RateLimiter
from souverain.server.loader import freeze_heap
from souverain.server.platform import Platform
from souverain.server.registry import LoadedModel, Registry
from souverain.server.settings import Settings
from souverain.web.throttle import LoginThrottle
from tests.engine.toy import ByteTokenizer, make_engine, tiny_model
from tests.serving import running

ROOT = "sk-root-operator"


class ChatBytes(ByteTokenizer):
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tools: Any = None) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant:" if add_generation_prompt else ""))


def tiny_registry() -> Registry:
    """`tiny` and `secret` share an engine; `serial` runs one sequence at a time (queue-order tests)."""
    tok = ChatBytes()
    model = tiny_model("dense")
    shared = AsyncEngine(make_engine(model, blocks=1024))
    serial = AsyncEngine(make_engine(model, blocks=1024, max_num_seqs=1))
    reg = Registry()
    info = {"capabilities": ["chat"], "architecture": "llama"}
    for name, engine in (("tiny", shared), ("secret", shared), ("serial", serial)):
        reg.add(LoadedModel(name, engine, tok, info))
    for e in (shared, serial):
        e.start()
    return reg


class FakeClock:
    """Drives both the rate limiter (monotonic seconds) and the database clock (UTC datetimes)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = utcnow()

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return self.wall + timedelta(seconds=self.t - 1000.0)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@contextmanager
def serve(registry: Registry, db: Database, clock: FakeClock) -> Iterator[str]:
    platform = Platform(db, [keys.digest(ROOT)], RateLimiter(clock.monotonic), now=clock.now)

    def make(port: int) -> Any:
        app = create_app(Settings(port=port, api_keys=[ROOT]), registry, db, platform)
        app.state.login_throttle = LoginThrottle(clock=clock.monotonic)  # sign-in back-off on the same clock
        return app

    freeze_heap()  # as `souverain serve` does (without it a full collection stalled the event loop ~1 s)
    with running(make) as url:
        yield url


def org_key(url: str, name: str, plan: str = "pro") -> str:
    """An organisation made through the admin API, and a key for it."""
    assert call(url, "POST", "/v1/admin/organisations", ROOT, {"name": name, "plan": plan})[0] == 201
    status, _, body = call(url, "POST", f"/v1/admin/keys?org={name}", ROOT, {"name": "k"})
    assert status == 201
    return str(body["key"])


class Browser:
    """A signed-in browser: the session cookie and the CSRF header, over plain urllib."""

    def __init__(self, url: str) -> None:
        self.url, self.cookie, self.csrf = url, "", ""

    def login(self, email: str, password: str, organisation: str | None = None) -> tuple[int, Any]:
        body: dict[str, Any] = {"email": email, "password": password}
        if organisation:
            body["organisation"] = organisation
        status, headers, answer = self.call("POST", "/app/api/login", body)
        if status == 200:
            self.cookie = headers["set-cookie"].split(";", 1)[0]
            self.csrf = answer["csrf"]
        return status, answer

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any, Any]:
        h = {"x-csrf-token": self.csrf, **({"Cookie": self.cookie} if self.cookie else {})}
        status, headers, answer = _send(self.url + path, method, h, body)
        if status == 200 and headers.get("set-cookie"):  # a new session (password change, organisation switch)
            self.cookie = headers["set-cookie"].split(";", 1)[0]
            self.csrf = answer.get("csrf", self.csrf) if isinstance(answer, dict) else self.csrf
        return status, headers, answer


def call(url: str, method: str, path: str, key: str | None, body: dict[str, Any] | None = None
         ) -> tuple[int, Any, Any]:
    """(status, headers, parsed JSON or text)."""
    return _send(url + path, method, {"Authorization": f"Bearer {key}"} if key else {}, body)


def _send(url: str, method: str, headers: dict[str, str], body: dict[str, Any] | None) -> tuple[int, Any, Any]:
    req = urllib.request.Request(url, method=method, headers={"Content-Type": "application/json", **headers},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, got, raw = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, got, raw = e.code, e.headers, e.read().decode()
    try:
        return status, got, json.loads(raw)
    except json.JSONDecodeError:
        return status, got, raw


def sse_events(raw: str) -> list[Any]:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in raw.splitlines() if line.startswith("data: ")]
