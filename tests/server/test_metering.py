"""Metering that cannot lose tokens: billed equals generated after a disconnect, streamed or not, and after a
SIGKILL the restarted server still bills what the client received. On SQLite and PostgreSQL.

"Generated" is read off the engine's own counter (EngineStats.generation_tokens), which the server's meter
does not use: the meter reads the request's count, the test the engine-wide one.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from souverain.db import accounts, keys, usage
from souverain.db.database import Database, open_database
from souverain.db.tables import UsageRecord, utcnow
from souverain.server.registry import Registry
from tests.server.platform_app import ROOT, call, org_key
from tests.serving import free_port

LONG = {"model": "tiny", "prompt": "go", "max_tokens": 480, "min_tokens": 480, "temperature": 1.0, "logprobs": 0}


def final_row(db: Database, org: str, timeout: float = 10.0) -> UsageRecord:
    deadline = time.monotonic() + timeout
    while True:
        with db.session() as s:
            rows = usage.records(s, org_id=accounts.get_org(s, name=org).id)
        if (rows and rows[0].status != "running") or time.monotonic() > deadline:
            assert len(rows) == 1, rows
            return rows[0]
        time.sleep(0.05)


def month_total(db: Database, org: str) -> int:
    with db.session() as s:
        return usage.month_tokens(s, org_id=accounts.get_org(s, name=org).id)


def idle(registry: Registry) -> None:
    stats = registry.models["tiny"].engine.engine.stats
    deadline = time.monotonic() + 10
    while (stats.running or stats.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not stats.running and not stats.waiting


def open_stream(url: str, key: str, body: dict[str, Any]) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {key}",
                                                               "Content-Type": "application/json"})
    return conn


def read_tokens(response: http.client.HTTPResponse, count: int) -> int:
    """Read SSE chunks until `count` tokens arrived (logprobs: one entry per token)."""
    got = 0
    while got < count:
        line = response.fp.readline().decode()
        assert line, "stream ended early"
        if line.startswith("data: {"):
            got += len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
    return got


def test_streamed_disconnect_at_token_40_bills_what_was_generated(url: str, db: Database, registry: Registry
                                                                  ) -> None:
    key = org_key(url, "acme")
    idle(registry)
    stats = registry.models["tiny"].engine.engine.stats
    before = stats.generation_tokens
    conn = open_stream(url, key, {**LONG, "stream": True})
    response = conn.getresponse()
    assert response.status == 200
    assert read_tokens(response, 40) >= 40
    conn.sock.close()  # the client goes away at token 40
    conn.close()
    row = final_row(db, "acme")
    idle(registry)
    generated = stats.generation_tokens - before
    print(f"streamed disconnect: received 40, generated {generated}, billed {row.completion_tokens}")
    assert row.status == "cancelled"
    assert row.completion_tokens == generated and 40 <= generated < 480
    assert month_total(db, "acme") == row.prompt_tokens + row.completion_tokens


def test_unstreamed_disconnect_cancels_and_bills_what_was_generated(url: str, db: Database, registry: Registry
                                                                    ) -> None:
    key = org_key(url, "acme")
    idle(registry)
    stats = registry.models["tiny"].engine.engine.stats
    before = stats.generation_tokens
    conn = open_stream(url, key, LONG)
    deadline = time.monotonic() + 20
    while stats.generation_tokens - before < 40:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    conn.sock.close()  # no response read: the client gives up waiting
    conn.close()
    row = final_row(db, "acme")
    idle(registry)
    generated = stats.generation_tokens - before
    print(f"unstreamed disconnect: generated {generated}, billed {row.completion_tokens}")
    assert row.status == "cancelled"
    assert row.completion_tokens == generated and 40 <= generated < 480  # cancelled: not run to 480
    assert month_total(db, "acme") == row.prompt_tokens + row.completion_tokens


def test_tokens_per_minute_reserves_n_times_max_tokens_and_refunds_the_rest(url: str, db: Database) -> None:
    key = org_key(url, "acme")
    assert call(url, "PUT", "/v1/admin/plans/pro", ROOT, {"tokens_per_minute": 5000})[0] == 200
    small = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
    status, _, answer = call(url, "POST", "/v1/completions", key, small)
    assert status == 200
    spent = answer["usage"]["total_tokens"]
    # The clock stands still (no refill): the bucket is down by exactly what was used, the reservation of
    # max_tokens given back.
    status, headers, answer = call(url, "POST", "/v1/completions", key, small)
    assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) == 5000 - spent
    spent += answer["usage"]["total_tokens"]
    # While a request that may spend n x max_tokens = 16 x 400 runs, the bucket holds that reservation: the
    # organisation's next request waits, though few tokens were generated yet.
    conn = open_stream(url, key, {**LONG, "n": 16, "max_tokens": 400, "min_tokens": 400, "stream": True})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()
    status, headers, body = call(url, "POST", "/v1/completions", key, small)
    assert status == 429 and body["code"] == "rate_limit_exceeded" and int(headers["Retry-After"]) >= 1
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 10
    while not (row := [r for r in _rows(db, "acme") if r.status == "cancelled"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    spent += row[0].prompt_tokens + row[0].completion_tokens
    print(f"16 x 400 reserved, cancelled after {row[0].completion_tokens} tokens")
    status, headers, _ = call(url, "POST", "/v1/completions", key, small)  # the unused reservation came back
    assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) == 5000 - spent


def _rows(db: Database, org: str) -> list[UsageRecord]:
    with db.session() as s:
        return usage.records(s, org_id=accounts.get_org(s, name=org).id)


# -- SIGKILL ------------------------------------------------------------------------------------------
def _server(port: int, url: str, model: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "souverain", "serve", "--port", str(port), "--model",
                             f"tiny={model}", "--db", url, "--kv-cache-memory", str(16 << 20), "--dtype", "float32"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
    raise AssertionError("the server did not start")


def test_sigkill_at_token_40_bills_what_the_client_received(tmp_path: Path, tiny_llama_folder: Path,
                                                            db_url: str) -> None:
    db = open_database(db_url)
    with db.session() as s:
        org = accounts.create_org(s, name="acme", plan="pro", actor="t")
        _, key = keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t")
    env = {**os.environ, "SOUVERAIN_HOME": str(tmp_path / "home"), "SOUVERAIN_USAGE_STALE_SECONDS": "0"}
    port = free_port()
    server = _server(port, db_url, tiny_llama_folder, env)
    try:
        conn = open_stream(f"http://127.0.0.1:{port}", key, {**LONG, "prompt": "the server", "stream": True})
        response = conn.getresponse()
        assert response.status == 200
        first = read_tokens(response, 40)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    received = first + _drain(response)  # everything the dead server had sent: what the client could ever read
    conn.close()
    port = free_port()
    server = _server(port, db_url, tiny_llama_folder, env)  # the restart settles the dead server's row
    try:
        with db.session() as s:
            rows = usage.records(s, org_id=org.id)
        total = month_total(db, "acme")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        db.close()
    assert len(rows) == 1
    row = rows[0]
    print(f"SIGKILL at token 40: the server had sent {received}, billed {row.completion_tokens} ({row.status})")
    assert row.status == "interrupted"
    # Write-ahead: every token sent was committed first, so nothing the client got is unbilled. The last commit
    # may also cover tokens the engine had produced but not sent yet (one commit window's worth at most).
    assert 40 <= received <= row.completion_tokens <= received + 64
    assert total == row.prompt_tokens + row.completion_tokens


def _drain(response: http.client.HTTPResponse) -> int:
    """Tokens in what is left of a stream whose server died (its socket buffers still hold them)."""
    got = 0
    try:
        while line := response.fp.readline().decode(errors="replace"):
            if line.startswith("data: {"):
                try:
                    got += len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
                except ValueError:
                    break  # a chunk cut off by the kill
    except OSError:
        pass
    return got


def test_rows_left_running_are_settled_only_when_stale(db: Database) -> None:
    from datetime import timedelta

    from souverain.db.tables import utcnow

    with db.session() as s:
        org = accounts.create_org(s, name="acme", actor="t")
        now = utcnow()
        for rid, age in (("old", 120), ("fresh", 5)):
            usage.write_progress(s, usage=usage.Usage(rid, "m", "chat", 3, 0, 0, "running", org.id), row_id=None,
                                 completion_tokens=7, billed=0, status="running", latency_ms=0,
                                 at=now - timedelta(seconds=age))
    with db.session() as s:
        assert usage.settle_stale(s, before=now - timedelta(seconds=60)) == 1
    with db.session() as s:
        status = {r.request_id: r.status for r in usage.records(s)}
        assert status == {"old": "interrupted", "fresh": "running"}


def test_a_prompt_refused_after_tokenising_still_costs_its_tokens(url: str) -> None:
    """Tokenising is the expensive part: a tenant cannot burn CPU for free with prompts that cannot fit."""
    key = org_key(url, "acme")
    assert call(url, "PUT", "/v1/admin/plans/pro", ROOT, {"tokens_per_minute": 5000})[0] == 200
    too_long = {"model": "tiny", "prompt": "x" * 600, "max_tokens": 1}  # 601 byte tokens; the context is 512
    status, _, body = call(url, "POST", "/v1/completions", key, too_long)
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, headers, _ = call(url, "POST", "/v1/completions", key, {"model": "tiny", "prompt": "hi", "max_tokens": 1,
                                                                     "temperature": 0})
    assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) == 5000 - 601


def test_a_stream_the_server_never_began_is_swept(db: Database) -> None:
    """A client that leaves before its streamed response starts: the generator never runs, so the ledger
    closes the meter itself (cancelled, reservation given back) instead of keeping the row open forever."""
    from souverain.server.metering import NEVER_BEGUN_AFTER, Ledger, Meter

    with db.session() as s:
        org = accounts.create_org(s, name="acme", actor="t")
    closed: list[int] = []
    ledger = Ledger(db, utcnow)
    meter = Meter(ledger, usage.Usage("never", "m", "chat", 5, 0, 0, "running", org.id), lambda: 0, closed.append,
                  started=time.monotonic() - NEVER_BEGUN_AFTER - 1)
    ledger.open(meter)
    deadline = time.monotonic() + 10
    while not (rows := [r for r in _all_rows(db) if r.status != "running"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [(r.request_id, r.status, r.completion_tokens) for r in rows] == [("never", "cancelled", 0)]
    assert closed == [0] and meter.closed
    ledger.shutdown()


def _all_rows(db: Database) -> list[UsageRecord]:
    with db.session() as s:
        return usage.records(s)
