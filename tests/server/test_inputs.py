"""What a tenant can read or break with odd inputs: /metrics is the operator's, the prefix cache can be
private per user, secrets never reach a log, the data folder is private, static keys can come from a file.
(The former 500s are in test_platform.py::test_former_500_inputs_are_400s and test_api.py.)"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from souverain.db import accounts, keys
from souverain.db.database import Database
from souverain.server.registry import Registry
from tests.server.platform_app import ROOT, call
from tests.serving import free_port


def member_keys(db: Database, org_name: str, plan: str = "pro") -> tuple[str, str]:
    """Two members of one organisation, a key each."""
    with db.session() as s:
        org = accounts.create_org(s, name=org_name, plan=plan, actor="t")
        out = []
        for who in ("ann", "bob"):
            user = accounts.create_user(s, email=f"{who}@{org_name}.example", password="a long password", actor="t")
            accounts.add_member(s, org=org, user=user, role="member", actor="t")
            out.append(keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t", user_id=user.id)[1])
    return out[0], out[1]


def test_metrics_are_the_operators(url: str, db: Database) -> None:
    ann, _ = member_keys(db, "acme")
    status, _, body = call(url, "GET", "/metrics", ann)
    assert status == 403 and body["type"] == "permission_error"
    assert call(url, "GET", "/metrics", None)[0] == 401
    assert call(url, "GET", "/metrics", ROOT)[0] == 200


def test_prefix_cache_can_be_private_per_user(url: str, db: Database, registry: Registry) -> None:
    """With the plan's cache_per_user, a colleague's identical prompt finds nothing cached."""
    ann, bob = member_keys(db, "acme")
    stats = registry.models["tiny"].engine.engine.stats
    nonce = uuid.uuid4().hex  # the engine (and its cache) outlives this test: prompts new to it
    prompt = {"model": "tiny", "prompt": f"{nonce} a secret prompt that fills several cache blocks " * 3,
              "max_tokens": 1, "temperature": 0}

    def hits_for(key: str) -> int:
        before = stats.prefix_hits
        assert call(url, "POST", "/v1/completions", key, prompt)[0] == 200
        return stats.prefix_hits - before

    hits_for(ann)
    assert hits_for(bob) > 0  # shared per organisation by default
    assert call(url, "PUT", "/v1/admin/plans/pro", ROOT, {"cache_per_user": True})[0] == 200
    prompt["prompt"] = f"{nonce} another secret prompt that fills several cache blocks " * 3
    hits_for(ann)
    assert hits_for(bob) == 0  # bob cannot learn whether ann sent it
    assert hits_for(ann) > 0  # ann still reuses her own


def test_first_start_secrets_never_reach_the_log(tmp_path: Path, tiny_llama_folder: Path) -> None:
    """A server whose output is not a terminal (a service, a container): the owner's password and first key go
    to a 0600 file in a 0700 data folder, the log holds only its path; static keys come from a file."""
    home = tmp_path / "home"
    key_file = tmp_path / "keys.txt"
    key_file.write_text("sk-from-a-file-0123456789\n")
    log = tmp_path / "server.log"
    port = free_port()
    env = {**os.environ, "SOUVERAIN_HOME": str(home)}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "souverain", "serve", "--port", str(port), "--model",
                                   f"tiny={tiny_llama_folder}", "--kv-cache-memory", str(16 << 20), "--dtype",
                                   "float32", "--api-key-file", str(key_file)], env=env, stdout=out, stderr=out)
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                time.sleep(0.05)
        status = call(f"http://127.0.0.1:{port}", "GET", "/v1/models", "sk-from-a-file-0123456789")[0]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    secrets_file = home / "first-start.txt"
    text = secrets_file.read_text()
    password = next(line.split()[-1] for line in text.splitlines() if "password" in line)
    api_key = next(line.split()[-1] for line in text.splitlines() if "API key" in line)
    logged = log.read_text()
    assert str(secrets_file) in logged and password not in logged and api_key not in logged
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "souverain.db").stat().st_mode) == 0o600
    assert status == 200  # the key from --api-key-file works
