"""A server killed with SIGKILL mid-stream, again and again, loses no usage row and leaves a sound database.

Every request whose stream reached `data: [DONE]` must have its usage row, because the row is committed
before `[DONE]` is sent. Two servers at a time share the database (several writer processes), each killed in
turn. Rounds in all: SOUVERAIN_KILL_ROUNDS (default 30: ~60 s; more for a deeper run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from souverain.db import accounts, keys, usage
from souverain.db.database import open_database, sqlite_url
from tests.serving import free_port

ROUNDS = int(os.environ.get("SOUVERAIN_KILL_ROUNDS", "30"))
CLIENTS = 4


def stream_until_killed(base: str, key: str, completed: list[str], stop: threading.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        body = {"model": "tiny", "prompt": "the server", "stream": True, "temperature": 1.0,
                "max_tokens": rng.randint(2, 40)}
        req = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        rid, done = None, False
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and rid is None:
                        rid = json.loads(line[6:]).get("id")
        except (OSError, ValueError):
            return  # the server is gone
        if done and rid:
            completed.append(rid)


def kill_rounds(rounds: int, seed: int, url: str, key: str, env: dict[str, str], model: Path,
                completed: list[str]) -> None:
    """Start a server, let clients stream, SIGKILL it at a random moment; `rounds` times."""
    rng = random.Random(seed)
    for _ in range(rounds):
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "souverain", "serve", "--port", str(port), "--model",
                                   f"tiny={model}", "--db", url, "--kv-cache-memory", str(16 << 20),
                                   "--dtype", "float32"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        stop = threading.Event()
        clients = [threading.Thread(target=stream_until_killed, args=(base, key, completed, stop))
                   for _ in range(CLIENTS)]
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=1)
                    break
                except OSError as e:
                    if server.poll() is not None:  # it could not start: say why, plainly
                        why = server.stderr.read().decode()[-4000:] if server.stderr else "exited"
                        raise AssertionError(why) from e
                    time.sleep(0.05)
            for c in clients:
                c.start()
            time.sleep(rng.uniform(0.2, 0.8))
        finally:
            server.send_signal(signal.SIGKILL)
            server.wait()
        stop.set()
        for c in clients:
            if c.is_alive():
                c.join(timeout=30)


def test_sigkill_mid_stream_loses_no_usage(tmp_path: Path, tiny_llama_folder: Path) -> None:
    url = sqlite_url(tmp_path / "platform.db")
    db = open_database(url)
    with db.session() as s:
        org = accounts.create_org(s, name="acme", plan="enterprise", actor="t")
        _, key = keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t")
    db.close()
    env = {**os.environ, "SOUVERAIN_HOME": str(tmp_path / "home")}
    completed: list[str] = []
    failures: list[BaseException] = []

    def lane(rounds: int, seed: int) -> None:
        try:
            kill_rounds(rounds, seed, url, key, env, tiny_llama_folder, completed)
        except BaseException as e:  # a lane's failure must fail the test, not vanish with its thread
            failures.append(e)

    # Two lanes of servers, each killed in turn, on the one database: several processes write at once.
    lanes = [threading.Thread(target=lane, args=(ROUNDS // 2 + i * (ROUNDS % 2), i)) for i in range(2)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    assert not failures, failures
    db = open_database(url)
    try:
        assert db.integrity_check() == []
        with db.session() as s:
            recorded = {r.request_id for r in usage.records(s)}
        assert len(completed) >= ROUNDS  # the clients did finish requests between the kills
        missing = [rid for rid in completed if rid not in recorded]
        print(f"{ROUNDS} kills; {len(completed)} completed streams, {len(recorded)} usage rows, {len(missing)} missing")
        assert not missing, f"{len(missing)} of {len(completed)} completed requests have no usage row"
    finally:
        db.close()
