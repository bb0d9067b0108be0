"""Fine-tuning within the plan: caps on seq_len, batch, steps, file size and jobs under way; the plan's and the
key's model allow-lists; trained tokens metered; one organisation's jobs never hold back another's. On SQLite
and PostgreSQL."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from souverain.cli_finetune import upload_file
from souverain.db import accounts, finetune, keys, usage
from souverain.db.database import Database
from souverain.server.registry import Registry
from souverain.train.runner import JobRunner
from tests.server.platform_app import call
from tests.train.site import jobs_site

ROOT = "sk-root-limits"
DATA = b"".join(json.dumps({"text": f"sample {i} about the sea"}).encode() + b"\n" for i in range(8))


@pytest.fixture
def site(tmp_path: Path, tiny_llama_folder: Path, db: Database) -> Iterator[dict[str, Any]]:
    with jobs_site(db, tmp_path, tiny_llama_folder, ROOT) as found:
        yield found


def org_key(db: Database, name: str, plan: str) -> str:
    with db.session() as s:
        org = accounts.create_org(s, name=name, plan=plan, actor="t")
        return keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t")[1]


def upload(url: str, key: str, data: bytes = DATA) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(data)
        return str(upload_file(url, key, path)["id"])


def job(url: str, key: str, file_id: str, auto_start: bool = True, **hyper: Any) -> tuple[int, Any]:
    status, _, body = call(url, "POST", "/v1/fine_tuning/jobs", key, {
        "model": "tiny", "training_files": [{"file_id": file_id}], "hyperparameters": hyper,
        "auto_start": auto_start})
    return status, body


def test_plan_caps_and_allow_lists(site: dict[str, Any]) -> None:
    url, db = site["url"], site["db"]
    key = org_key(db, "small", "free")  # free: seq_len 2048, batch 4, 200 steps, 16 MiB files, 1 job
    file_id = upload(url, key)
    for hyper, field in (({"seq_len": 32768}, "seq_len"), ({"batch_size": 64}, "batch_size"),
                         ({"training_steps": 100_000}, "training_steps")):
        status, body = job(url, key, file_id, **hyper)
        assert status == 400 and body["param"] == f"hyperparameters.{field}" and body["code"] == "plan_limit", body
    assert call(url, "PUT", "/v1/admin/plans/free", ROOT, {"finetune_max_file_bytes": 100})[0] == 200
    with pytest.raises(typer.Exit):  # refused: 413 (the CLI's uploader prints it)
        upload(url, key)
    status, body = job(url, key, file_id, training_steps=2)
    assert status == 200
    status, body = job(url, key, file_id, training_steps=2)  # the plan's one job under way
    assert status == 429 and body["code"] == "jobs_limit"
    assert call(url, "PUT", "/v1/admin/plans/free", ROOT, {"allowed_models": ["something-else"],
                                                            "finetune_max_jobs": 5})[0] == 200
    status, body = job(url, key, file_id, training_steps=2)
    assert status == 403 and body["code"] == "model_not_allowed"


def test_trained_tokens_are_metered_once(site: dict[str, Any]) -> None:
    url, db = site["url"], site["db"]
    key = org_key(db, "acme", "pro")
    status, body = job(url, key, upload(url, key), training_steps=2, auto_start=False)
    assert status == 200
    assert call(url, "POST", f"/v1/fine_tuning/jobs/{body['id']}/cancel", key)[2]["status"] == "CANCELLED"
    with db.session() as s:  # as if it had trained before it was cancelled
        finetune.get_job(s, job_id=body["id"], org_id=None).trained_tokens = 1234
    runner = JobRunner(db, site["settings"].data_path(), lambda m: None)
    runner.tick()
    runner.tick()
    with db.session() as s:
        org = accounts.get_org(s, name="acme")
        rows = [r for r in usage.records(s, org_id=org.id) if r.endpoint == "fine-tuning"]
        assert [(r.request_id, r.prompt_tokens, r.status) for r in rows] == [(body["id"], 1234, "cancelled")]
        assert usage.month_tokens(s, org_id=org.id) == 1234


def test_one_organisations_jobs_do_not_hold_back_anothers(site: dict[str, Any]) -> None:
    url, db = site["url"], site["db"]
    reg: Registry = site["registry"]
    a, b = org_key(db, "a-corp", "pro"), org_key(db, "b-corp", "pro")
    ids, owner = {}, {}
    for name, key in (("a1", a), ("a2", a), ("b1", b)):
        status, body = job(url, key, upload(url, key), training_steps=2, auto_start=False)
        assert status == 200
        ids[name], owner[name] = body["id"], key
        time.sleep(0.01)  # distinct creation times: a1, a2, then b1
    runner = JobRunner(db, site["settings"].data_path(), lambda m: reg.models[m].path if m in reg.models else None,
                       max_workers=2)

    def states() -> dict[str, str]:
        with db.session() as s:
            return {n: finetune.get_job(s, job_id=i, org_id=None).status for n, i in ids.items()}

    def until(done: Any) -> None:
        deadline = time.monotonic() + 120
        while not done(states()):
            assert time.monotonic() < deadline, states()
            runner.tick()
            seen.add(frozenset(n for n, v in states().items() if v == "RUNNING"))
            time.sleep(0.1)

    seen: set[frozenset[str]] = set()
    try:
        until(lambda st: set(st.values()) == {"VALIDATED"})
        for name in ("a1", "a2", "b1"):  # all three asked to start at once
            assert call(url, "POST", f"/v1/fine_tuning/jobs/{ids[name]}/start", owner[name])[0] == 200
        runner.tick()
        # Two workers: a-corp's first job and b-corp's, not a-corp's two (the oldest two).
        assert {n for n, v in states().items() if v == "RUNNING"} == {"a1", "b1"}
        until(lambda st: all(v in finetune.FINAL for v in st.values()))
    finally:
        runner.stop()
    assert not any({"a1", "a2"} <= s for s in seen)  # a-corp never ran two at once
    assert set(states().values()) == {"SUCCESS"}
