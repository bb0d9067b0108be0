"""Sign-in under a flood of wrong passwords: 401/429 only, the API keeps answering, back-off per account and
per address. On SQLite and PostgreSQL; the back-off runs on an injected clock."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from souverain.db import accounts, keys
from souverain.db.database import Database
from tests.server.platform_app import Browser, FakeClock, call

EMAIL, PASSWORD = "ann@acme.example", "correct horse battery"


@pytest.fixture
def key(db: Database) -> str:
    with db.session() as s:
        org = accounts.create_org(s, name="acme", plan="pro", actor="t")
        user = accounts.create_user(s, email=EMAIL, password=PASSWORD, actor="t")
        accounts.add_member(s, org=org, user=user, role="member", actor="t")
        return keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t")[1]


def test_sixty_concurrent_bad_logins_while_the_api_answers(url: str, key: str, clock: FakeClock) -> None:
    statuses: Counter[int] = Counter()
    slowest = 0.0
    stop = threading.Event()

    def bad_login(i: int) -> None:
        email = EMAIL if i % 2 else f"nobody{i}@acme.example"  # half on a real account, half on unknown ones
        status, _ = Browser(url).login(email, f"wrong password {i}")
        statuses[status] += 1

    def api() -> None:
        nonlocal slowest
        while not stop.is_set():
            started = time.monotonic()
            assert call(url, "GET", "/v1/models", key)[0] == 200
            slowest = max(slowest, time.monotonic() - started)

    watcher = threading.Thread(target=api)
    watcher.start()
    time.sleep(0.1)
    flood = [threading.Thread(target=bad_login, args=(i,)) for i in range(60)]
    for t in flood:
        t.start()
    for t in flood:
        t.join(timeout=60)
    stop.set()
    watcher.join(timeout=10)
    print(f"60 bad logins: {dict(statuses)}; slowest GET /v1/models meanwhile: {slowest:.3f} s")
    assert set(statuses) <= {401, 429} and sum(statuses.values()) == 60
    assert statuses[429] > 0  # one address, many at once: most are turned away before any hashing
    assert slowest < 1.0


def test_back_off_per_account_then_the_right_password_works(url: str, key: str, clock: FakeClock) -> None:
    browser = Browser(url)
    answers = [browser.login(EMAIL, "wrong password")[0] for _ in range(5)]
    assert answers == [401] * 5
    status, body = browser.login(EMAIL, PASSWORD)  # locked now, even with the right password
    assert status == 429 and body["code"] == "too_many_sign_ins"
    clock.advance(1.5)
    assert browser.login(EMAIL, "wrong again")[0] == 401  # a sixth failure: the wait doubles
    clock.advance(1.5)
    assert browser.login(EMAIL, PASSWORD)[0] == 429
    clock.advance(1.0)
    status, body = browser.login(EMAIL, PASSWORD)
    assert status == 200 and body["organisation"] == "acme" and body["organisations"] == ["acme"]
    assert browser.call("GET", "/app/api/me")[0] == 200


def test_unknown_and_known_emails_get_the_same_answer(url: str, key: str) -> None:
    known = Browser(url).login(EMAIL, "wrong password")
    unknown = Browser(url).login("nobody@acme.example", "wrong password")
    assert known[0] == unknown[0] == 401 and known[1]["message"] == unknown[1]["message"]
