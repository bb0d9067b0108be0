"""Fine-tuning jobs over HTTP on a tiny model: validation errors with line numbers, cancel, and a worker killed
mid-training that resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from souverain.cli_finetune import upload_file
from souverain.db import finetune
from souverain.db.database import Database, open_database, sqlite_url
from souverain.server.registry import Registry
from souverain.train.runner import JobRunner
from tests.server.platform_app import call
from tests.train.site import jobs_site

ROOT = "sk-root-jobs"
TEXTS = b"".join(json.dumps({"text": f"sample number {i} about the sea and the wind"}).encode() + b"\n"
                 for i in range(12))


@pytest.fixture
def site(tmp_path: Path, tiny_llama_folder: Path) -> Iterator[dict[str, Any]]:
    db = open_database(sqlite_url(tmp_path / "souverain.db"))
    with jobs_site(db, tmp_path, tiny_llama_folder, ROOT) as found:
        yield found
    db.close()


def runner_for(site: dict[str, Any]) -> JobRunner:
    reg: Registry = site["registry"]
    return JobRunner(site["db"], site["settings"].data_path(),
                     lambda m: reg.models[m].path if m in reg.models else None)


def upload(url: str, name: str, data: bytes) -> dict[str, Any]:
    """Through the CLI's own uploader (multipart, as the SDKs send it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        return upload_file(url, ROOT, path)


def job_state(db: Database, job_id: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], int | None]:
    with db.session() as s:
        job = finetune.get_job(s, job_id=job_id, org_id=None)
        return job.status, job.checkpoints, job.events, job.worker_pid


def wait_for(cond: Any, runner: JobRunner, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        runner.tick()
        time.sleep(0.1)


def test_files_api(site: dict[str, Any]) -> None:
    url = site["url"]
    f = upload(url, "data.jsonl", TEXTS)
    assert f["bytes"] == len(TEXTS) and f["num_lines"] == 12 and f["sample_type"] == "pretrain"
    assert call(url, "GET", f"/v1/files/{f['id']}", ROOT)[2]["filename"] == "data.jsonl"
    with urllib.request.urlopen(urllib.request.Request(url + f"/v1/files/{f['id']}/content",
                                                       headers={"Authorization": f"Bearer {ROOT}"})) as r:
        assert r.read() == TEXTS
    assert [x["id"] for x in call(url, "GET", "/v1/files", ROOT)[2]["data"]] == [f["id"]]
    assert call(url, "DELETE", f"/v1/files/{f['id']}", ROOT)[2]["deleted"] is True
    assert call(url, "GET", f"/v1/files/{f['id']}", ROOT)[0] == 404


def test_invalid_jsonl_fails_validation_with_line_numbers(site: dict[str, Any]) -> None:
    url = site["url"]
    bad = (b'{"text": "fine"}\n{"text": broken\n{"messages": [{"role": "user", "content": "hi"}]}\n'
           b'{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    f = upload(url, "bad.jsonl", bad)
    status, _, job = call(url, "POST", "/v1/fine_tuning/jobs", ROOT,
                          {"model": "tiny", "training_files": [{"file_id": f["id"]}]})
    assert status == 200 and job["status"] == "QUEUED"
    runner = runner_for(site)
    # Validated in a process of its own: the server's event loop never parses the file.
    wait_for(lambda: job_state(site["db"], job["id"])[0] not in ("QUEUED", "VALIDATING"), runner, 60)
    detail = call(url, "GET", f"/v1/fine_tuning/jobs/{job['id']}", ROOT)[2]
    assert detail["status"] == "FAILED_VALIDATION"
    errors = next(e for e in detail["events"] if e["data"].get("status") == "FAILED_VALIDATION")["data"]["errors"]
    text = "\n".join(errors)
    assert "bad.jsonl: line 2: not JSON" in text and "line 3: no assistant message" in text
    assert "line 4: messages[0].role" in text and "line 1" not in text
    # Bad requests are refused at once, naming the field.
    status, _, body = call(url, "POST", "/v1/fine_tuning/jobs", ROOT,
                           {"model": "tiny", "training_files": [{"file_id": "nope"}]})
    assert status == 404
    status, _, body = call(url, "POST", "/v1/fine_tuning/jobs", ROOT,
                           {"model": "tiny", "training_files": [{"file_id": f["id"]}],
                            "hyperparameters": {"learning_rate": -1}})
    assert status == 422 and "learning_rate" in body["param"]


def test_cancel_stops_a_running_job_within_seconds(site: dict[str, Any]) -> None:
    url = site["url"]
    f = upload(url, "data.jsonl", TEXTS)
    job = call(url, "POST", "/v1/fine_tuning/jobs", ROOT, {"model": "tiny", "training_files": [{"file_id": f["id"]}],
                                                           "hyperparameters": {"training_steps": 100000}})[2]
    runner = runner_for(site)
    try:
        wait_for(lambda: len(job_state(site["db"], job["id"])[1]) >= 3, runner)
        started = time.monotonic()
        assert call(url, "POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", ROOT)[2]["status"] == \
            "CANCELLATION_REQUESTED"
        wait_for(lambda: job_state(site["db"], job["id"])[0] == "CANCELLED", runner, timeout=30)
        assert time.monotonic() - started < 10
    finally:
        runner.stop()


def test_killed_worker_resumes_from_its_checkpoint(site: dict[str, Any]) -> None:
    url = site["url"]
    f = upload(url, "data.jsonl", TEXTS)
    job = call(url, "POST", "/v1/fine_tuning/jobs", ROOT,
               {"model": "tiny", "training_files": [{"file_id": f["id"]}], "suffix": "sea",
                "hyperparameters": {"training_steps": 400, "learning_rate": 1e-3, "batch_size": 2}})[2]
    first = runner_for(site)
    wait_for(lambda: len(job_state(site["db"], job["id"])[1]) >= 25, first)
    _, before, _, pid = job_state(site["db"], job["id"])
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the worker dies mid-training, as in a crash or a restart
    first.procs[job["id"]].wait()
    first.stop()
    killed_at = max(c["step_number"] for c in before)
    second = runner_for(site)  # a new server process would start this way
    try:
        wait_for(lambda: job_state(site["db"], job["id"])[0] in ("SUCCESS", "FAILED"), second, timeout=300)
    finally:
        second.stop()
    status, checkpoints, events, _ = job_state(site["db"], job["id"])
    assert status == "SUCCESS", events[-3:]
    steps = [c["step_number"] for c in checkpoints]
    resumed_at = next(s for i, s in enumerate(steps) if i and s <= steps[i - 1])
    assert resumed_at > 1 and (resumed_at - 1) % 10 == 0 and resumed_at <= killed_at + 1  # from the checkpoint
    assert steps[-1] == 400
    assert any(e["name"] == "worker-started" and e["data"].get("resumed") for e in events)
    detail = call(url, "GET", "/v1/models", ROOT)[2]
    card = next(m for m in detail["data"] if m["id"].startswith("ft:tiny:sea:"))
    assert card["parent"] == "tiny" and card["type"] == "fine-tuned"
    status, _, body = call(url, "POST", "/v1/completions", ROOT, {"model": card["id"], "prompt": "the sea",
                                                                  "max_tokens": 5, "min_tokens": 5,
                                                                  "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 5


def test_cli_finetune_follows_the_job(site: dict[str, Any], tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "sea.jsonl"
    data.write_bytes(TEXTS)
    runner = runner_for(site)
    runner.poll_s = 0.2
    runner.start()
    try:
        done = subprocess.run([sys.executable, "-m", "souverain", "finetune", "tiny", str(data), "--steps", "6",
                               "--suffix", "cli", "--url", site["url"], "--api-key", ROOT],
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        runner.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("ft:tiny:cli:") and "step 6: train loss" in done.stderr
    listed = subprocess.run([sys.executable, "-m", "souverain", "jobs", "list", "--url", site["url"], "--api-key",
                             ROOT], capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "COLUMNS": "200"})
    assert "SUCCESS" in listed.stdout and "ft:tiny:cli:" in listed.stdout
    # An 80-column terminal: the job ids are still printed whole (they are pasted into `jobs cancel`).
    import re

    job_id = re.search(r"job (\S+) queued", done.stderr)
    assert job_id is not None
    narrow = subprocess.run([sys.executable, "-m", "souverain", "jobs", "list", "--url", site["url"], "--api-key",
                             ROOT], capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "COLUMNS": "80"})
    assert narrow.returncode == 0 and job_id.group(1) in narrow.stdout, narrow.stdout
