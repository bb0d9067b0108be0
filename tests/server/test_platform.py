"""The platform in the request path: keys, private models, plans, rate limits, quotas, usage, priorities.

Each test runs on SQLite and on PostgreSQL; rate limits run on an injected clock, never on sleeps.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from typing import Any

import pytest

from souverain.db import accounts, keys, usage
from souverain.db.database import Database
from souverain.server.registry import Registry
from tests.server.platform_app import ROOT, FakeClock, call, org_key, sse_events

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}


def test_key_lifecycle_over_http(url: str, clock: FakeClock) -> None:
    key = org_key(url, "acme")
    assert call(url, "GET", "/v1/models", key)[0] == 200
    assert call(url, "GET", "/v1/models", None)[0] == 401
    assert call(url, "GET", "/v1/models", key[:-2])[0] == 401
    status, _, listing = call(url, "GET", "/v1/admin/keys?org=acme", ROOT)
    assert status == 200 and key not in json.dumps(listing) and listing["data"][0]["prefix"] == key[:keys.VISIBLE]
    # Revoked: refused from the next request on.
    assert call(url, "DELETE", f"/v1/admin/keys/{listing['data'][0]['id']}?org=acme", ROOT)[0] == 200
    status, _, body = call(url, "GET", "/v1/models", key)
    assert status == 401 and body["type"] == "authentication_error"
    # Expired: a key for one day stops working on the second.
    short = call(url, "POST", "/v1/admin/keys?org=acme", ROOT, {"expires_in_days": 1})[2]["key"]
    assert call(url, "POST", "/v1/completions", short, COMPLETION)[0] == 200
    clock.advance(2 * 86400)
    assert call(url, "POST", "/v1/completions", short, COMPLETION)[0] == 401


def test_roles_guard_the_admin_api(url: str, db: Database) -> None:
    member_key = org_key(url, "acme")
    assert call(url, "GET", "/v1/admin/keys", member_key)[0] == 403  # a key without an admin behind it
    with db.session() as s:
        org = accounts.get_org(s, name="acme")
        boss = accounts.create_user(s, email="boss@acme.example", password="a long password", actor="t")
        accounts.add_member(s, org=org, user=boss, role="admin", actor="t")
        _, admin_key = keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t", user_id=boss.id)
        other = accounts.create_org(s, name="globex", actor="t")
        _, other_key = keys.create_key(s, workspace=accounts.get_workspace(s, org=other), actor="t")
    status, _, body = call(url, "GET", "/v1/admin/keys", admin_key)
    assert status == 200 and len(body["data"]) == 2
    assert call(url, "GET", "/v1/admin/keys?org=globex", admin_key)[0] == 403  # not its organisation
    assert call(url, "PUT", "/v1/admin/plans/free", admin_key, {"priority": 0})[0] == 403  # operator only
    assert call(url, "PUT", "/v1/admin/organisation/plan", admin_key, {"plan": "enterprise"})[0] == 403
    assert call(url, "POST", "/v1/admin/workspaces", admin_key, {"name": "research"})[0] == 201
    assert call(url, "POST", "/v1/admin/workspaces", admin_key, {"name": "research"})[0] == 409
    status, _, invited = call(url, "POST", "/v1/admin/members", admin_key, {"email": "new@acme.example"})
    assert status == 201 and invited["invitation"] and "password" not in invited
    audit = call(url, "GET", "/v1/admin/audit", admin_key)[2]["data"]
    assert {"workspace.create", "member.invite"} <= {a["action"] for a in audit}
    assert call(url, "GET", "/v1/models", other_key)[0] == 200


def test_private_model_is_invisible_to_other_organisations(url: str) -> None:
    owner, stranger = org_key(url, "acme"), org_key(url, "globex")
    assert call(url, "PUT", "/v1/admin/models/secret/private", ROOT, {"org": "acme"})[0] == 200
    ids = {m["id"] for m in call(url, "GET", "/v1/models", stranger)[2]["data"]}
    assert "secret" not in ids and "tiny" in ids
    assert call(url, "GET", "/v1/models/secret", stranger)[0] == 404
    status, _, body = call(url, "POST", "/v1/completions", stranger, {**COMPLETION, "model": "secret"})
    assert status == 404 and body["code"] == "model_not_found"
    assert "secret" in {m["id"] for m in call(url, "GET", "/v1/models", owner)[2]["data"]}
    assert call(url, "POST", "/v1/completions", owner, {**COMPLETION, "model": "secret"})[0] == 200
    assert call(url, "DELETE", "/v1/admin/models/secret/private", ROOT)[0] == 200
    assert call(url, "GET", "/v1/models/secret", stranger)[0] == 200


def test_an_alias_is_as_private_as_the_model_it_names(url: str, registry: Registry) -> None:
    """`--served-model-name secret other-name`: the second name opens no door the first keeps shut."""
    registry.aliases["other-name"] = "secret"
    try:
        owner, stranger = org_key(url, "initech"), org_key(url, "umbrella")
        assert call(url, "PUT", "/v1/admin/models/secret/private", ROOT, {"org": "initech"})[0] == 200
        assert "other-name" not in {m["id"] for m in call(url, "GET", "/v1/models", stranger)[2]["data"]}
        assert call(url, "GET", "/v1/models/other-name", stranger)[0] == 404
        status, _, body = call(url, "POST", "/v1/completions", stranger, {**COMPLETION, "model": "other-name"})
        assert status == 404 and body["code"] == "model_not_found"
        assert call(url, "POST", "/v1/completions", owner, {**COMPLETION, "model": "other-name"})[0] == 200
        assert call(url, "DELETE", "/v1/admin/models/secret/private", ROOT)[0] == 200
    finally:
        del registry.aliases["other-name"]


def test_rate_limit_trips_and_recovers(url: str, clock: FakeClock) -> None:
    key = org_key(url, "small", plan="free")  # 1 request/s
    status, headers, _ = call(url, "POST", "/v1/completions", key, COMPLETION)
    assert status == 200 and headers["x-ratelimit-limit-requests"] == "1/s"
    assert headers["x-ratelimit-remaining-requests"] == "0" and "x-ratelimit-remaining-tokens" in headers
    status, headers, body = call(url, "POST", "/v1/completions", key, COMPLETION)
    assert status == 429 and body["code"] == "rate_limit_exceeded"
    assert headers["Retry-After"] == "1" and headers["x-ratelimit-reset-requests"].endswith("s")
    clock.advance(1.0)
    assert call(url, "POST", "/v1/completions", key, COMPLETION)[0] == 200


def test_tokens_per_minute_count_the_answers(url: str, clock: FakeClock) -> None:
    assert call(url, "PUT", "/v1/admin/plans/trickle", ROOT, {"tokens_per_minute": 60, "priority": 2})[0] == 200
    key = org_key(url, "small", plan="trickle")  # 1 token/s
    body = {**COMPLETION, "max_tokens": 60, "min_tokens": 60}
    assert call(url, "POST", "/v1/completions", key, body)[0] == 200  # 6 prompt + 60 answer tokens: 6 in debt
    status, headers, _ = call(url, "POST", "/v1/completions", key, body)
    assert status == 429 and int(headers["Retry-After"]) == 7  # (6 + 1) tokens at 1 a second
    clock.advance(int(headers["Retry-After"]))
    assert call(url, "POST", "/v1/completions", key, body)[0] == 200


def test_monthly_quota_stops_requests(url: str, db: Database) -> None:
    assert call(url, "PUT", "/v1/admin/plans/tiny-month", ROOT, {"tokens_per_month": 40})[0] == 200
    key = org_key(url, "small", plan="tiny-month")
    spent = 0
    for _ in range(10):
        status, headers, body = call(url, "POST", "/v1/completions", key, {**COMPLETION, "max_tokens": 8,
                                                                            "min_tokens": 8})
        if status != 200:
            break
        spent += body["usage"]["total_tokens"]
    assert status == 429 and body["code"] == "quota_exceeded" and "quota" in body["message"]
    assert headers["x-should-retry"] == "false" and headers["x-ratelimit-remaining-tokens-month"] == "0"
    assert 40 <= spent < 40 + 14  # overshoot at most one request's tokens
    with db.session() as s:
        assert usage.month_tokens(s, org_id=accounts.get_org(s, name="small").id) == spent


def test_plan_and_key_model_lists_and_context(url: str) -> None:
    assert call(url, "PUT", "/v1/admin/plans/narrow", ROOT,
                {"allowed_models": ["tiny"], "max_context": 32, "priority": 2})[0] == 200
    key = org_key(url, "small", plan="narrow")
    status, _, body = call(url, "POST", "/v1/completions", key, {**COMPLETION, "model": "serial"})
    assert status == 403 and body["param"] == "model" and "plan" in body["message"]
    status, _, body = call(url, "POST", "/v1/completions", key, {**COMPLETION, "max_tokens": 100})
    assert status == 400 and body["code"] == "context_length_exceeded" and "32" in body["message"]
    only = call(url, "POST", "/v1/admin/keys?org=small", ROOT, {"allowed_models": ["serial"]})[2]["key"]
    status, _, body = call(url, "POST", "/v1/completions", only, COMPLETION)
    assert status == 403 and "API key" in body["message"]


def test_usage_rows_equal_what_clients_were_told(url: str, db: Database) -> None:
    key = org_key(url, "acme")
    told: dict[str, dict[str, int]] = {}
    _, _, body = call(url, "POST", "/v1/completions", key, COMPLETION)
    told[body["id"]] = body["usage"]
    _, _, body = call(url, "POST", "/v1/chat/completions", key,
                      {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2})
    told[body["id"]] = body["usage"]
    _, _, raw = call(url, "POST", "/v1/chat/completions", key,
                     {"model": "tiny", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 6,
                      "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    told[events[0]["id"]] = events[-2]["usage"]
    with db.session() as s:
        org_id = accounts.get_org(s, name="acme").id
        rows = {r.request_id: r for r in usage.records(s, org_id=org_id)}
        assert usage.month_tokens(s, org_id=org_id) == sum(u["total_tokens"] for u in told.values())
    assert set(rows) == set(told)
    for rid, u in told.items():
        assert (rows[rid].prompt_tokens, rows[rid].completion_tokens) == (u["prompt_tokens"], u["completion_tokens"])
        assert rows[rid].key_id is not None and rows[rid].workspace_id is not None and rows[rid].status
    report = call(url, "GET", "/v1/admin/usage?org=acme&format=csv", ROOT)[2]
    assert report.splitlines()[0] == ",".join(usage.REPORT_COLUMNS) and ",default,tiny,3," in report


def test_disconnect_cancels_and_is_still_billed(url: str, db: Database) -> None:
    key = org_key(url, "acme")
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "tiny", "prompt": "go", "max_tokens": 400, "min_tokens": 400, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {key}",
                                                               "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event: generation is under way
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 20
    rows: list[Any] = []
    while time.monotonic() < deadline and not (rows and rows[0].status != "running"):
        with db.session() as s:
            rows = usage.records(s, org_id=accounts.get_org(s, name="acme").id)
        time.sleep(0.1)
    assert len(rows) == 1 and rows[0].status == "cancelled" and rows[0].prompt_tokens == 3
    assert 1 <= rows[0].completion_tokens < 400


def test_pro_outranks_free_in_the_engine_queue(url: str, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    free, pro = org_key(url, "free-co", plan="free"), org_key(url, "pro-co", plan="pro")
    engine = registry.models["serial"].engine.engine
    stats, scheduler = engine.stats, engine.scheduler
    # The order is read where it is decided, in the engine thread: the clients' threads return in any order
    # (Pro's response can reach its thread after Free's 4 tokens are done; CI saw that once).
    lengths = {500: "blocker", 4: "free", 5: "pro"}
    finished: list[str] = []
    finish = scheduler.finish

    def recording_finish(seq: Any, reason: Any) -> None:
        finished.append(lengths.get(seq.params.max_tokens, "other"))
        finish(seq, reason)

    monkeypatch.setattr(scheduler, "finish", recording_finish)

    def run(key: str, tokens: int) -> None:
        body = {**COMPLETION, "model": "serial", "max_tokens": tokens, "min_tokens": tokens}
        assert call(url, "POST", "/v1/completions", key, body)[0] == 200

    def wait_for(cond: Any) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.002)

    # Occupy the one-sequence engine, then queue Free before Pro: Pro must be served first.
    threads = [threading.Thread(target=run, args=(ROOT, 500))]
    threads[0].start()
    wait_for(lambda: stats.running == 1)
    threads.append(threading.Thread(target=run, args=(free, 4)))
    threads[1].start()
    wait_for(lambda: stats.waiting == 1)
    threads.append(threading.Thread(target=run, args=(pro, 5)))
    threads[2].start()
    wait_for(lambda: stats.waiting == 2)
    assert not finished, "the blocker finished too early: the queue order was not tested"
    for t in threads:
        t.join(timeout=120)
    assert finished == ["blocker", "pro", "free"]


def test_former_500_inputs_are_400s(url: str) -> None:
    """Inputs that once raised inside the server: each is a 4xx naming the problem now."""
    org_key(url, "odd")
    for ref in ("²", "٣", "99999999999999999999999"):  # str.isdigit() digits int() refuses; a BIGINT overflow
        assert call(url, "DELETE", f"/v1/admin/keys/{urllib.parse.quote(ref)}?org=odd", ROOT)[0] == 404, ref
    for days in (1e300, 1e6):
        status, _, body = call(url, "POST", "/v1/admin/keys?org=odd", ROOT, {"expires_in_days": days})
        assert status == 422 and "expires_in_days" in body["message"], body


def test_sqlite_file_is_private(tmp_path: Any) -> None:
    import stat

    from souverain.db.database import open_database, sqlite_url

    path = tmp_path / "souverain.db"
    open_database(sqlite_url(path)).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
