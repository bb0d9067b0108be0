"""The server side of fine-tuning: has queued jobs validated (in a process of their own), starts workers —
at most `max_workers` at once and one per organisation, so one organisation's long job never blocks the
others — restarts a worker that died (it resumes from its checkpoint), enforces cancellation, and meters the
tokens each job trained once it ends."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from souverain.db import finetune
from souverain.db.database import Database
from souverain.db.tables import FineTuningJob

log = logging.getLogger(__name__)
MAX_RESTARTS = 3


@dataclass
class JobRunner:
    db: Database
    data_dir: Path
    base_path: Callable[[str], Path | None]  # a base model id -> its weights (None: not available to train)
    poll_s: float = 0.5
    cancel_grace_s: float = 5.0
    max_workers: int = 2
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    validators: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    cancel_seen: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="souverain-jobs", daemon=True)
        self._thread.start()

    def stop(self, kill_workers: bool = True) -> None:
        """Stop the loop and (by default) the workers: their jobs resume from a checkpoint at the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if kill_workers:
            for p in self.procs.values():
                p.kill()
                p.wait()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad row must not end the loop
                log.exception("fine-tuning runner pass failed")
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        """One pass over the active jobs (tests call it directly)."""
        with self.db.session() as s:
            jobs = finetune.active_jobs(s)
            for job in jobs:
                self._advance(s, job)
            busy = {j.org_id for j in jobs if j.status == "RUNNING"}
            running = sum(1 for j in jobs if j.status == "RUNNING")
            for job in jobs:  # oldest first; an organisation with a job running waits its turn
                if running < self.max_workers and job.status == "VALIDATED" and job.start_requested \
                        and job.org_id not in busy:
                    self._spawn(job)
                    finetune.set_status(job, "RUNNING")
                    busy.add(job.org_id)
                    running += 1
            for job in finetune.unmetered(s):
                finetune.meter(s, job=job)

    def _advance(self, s: Session, job: FineTuningJob) -> None:
        proc = self.procs.get(job.id)
        alive = proc is not None and proc.poll() is None
        if job.status == "QUEUED":
            finetune.set_status(job, "VALIDATING")
            if self.base_path(job.model) is None:
                finetune.set_status(job, "FAILED_VALIDATION", errors=[
                    f"model {job.model!r} is not served here as a base model that can be fine-tuned"])
            else:
                self.validators[job.id] = subprocess.Popen(
                    [sys.executable, "-m", "souverain.train.validate", "--job", job.id],
                    env={**os.environ, "SOUVERAIN_DB": self.db.url}, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
        elif job.status == "VALIDATING":
            check = self.validators.get(job.id)
            if check is None:  # started by a server that stopped: validate again
                finetune.set_status(job, "QUEUED")
            elif check.poll() is not None:  # it wrote its verdict before it ended, unless it failed
                self.validators.pop(job.id)
                if check.returncode != 0:
                    why = check.stderr.read().decode()[-500:] if check.stderr else ""
                    finetune.set_status(job, "FAILED_VALIDATION", errors=[f"the validator failed: {why}".strip()])
        elif job.status == "CANCELLATION_REQUESTED":
            first = self.cancel_seen.setdefault(job.id, time.monotonic())
            if not alive:
                finetune.set_status(job, "CANCELLED")
            elif time.monotonic() - first > self.cancel_grace_s:  # the worker did not stop by itself
                assert proc is not None
                proc.kill()
                proc.wait()
                finetune.set_status(job, "CANCELLED", killed=True)
        elif job.status == "RUNNING" and not alive:
            if proc is None and job.worker_pid and _pid_alive(job.worker_pid):
                return  # a worker another server process started is still at work
            # The worker died (or this server restarted): start it again; it resumes from its checkpoint.
            count = self.restarts[job.id] = self.restarts.get(job.id, 0) + 1
            if count > MAX_RESTARTS:
                finetune.set_status(job, "FAILED", error=f"the worker died {MAX_RESTARTS} times")
            else:
                finetune.add_event(job, "worker-restarted", {"attempt": count})
                self._spawn(job)

    def _spawn(self, job: FineTuningJob) -> None:
        path = self.base_path(job.model)
        assert path is not None
        job_dir = self.data_dir / "jobs" / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        log_file = (job_dir / "worker.log").open("ab")
        env = {**os.environ, "SOUVERAIN_DB": self.db.url}  # not on the command line: it may hold a password
        threads = max(1, (os.cpu_count() or 1) // self.max_workers)  # workers side by side share the cores
        self.procs[job.id] = subprocess.Popen(
            [sys.executable, "-m", "souverain.train.worker", "--db", "env", "--job", job.id, "--model", str(path),
             "--data-dir", str(self.data_dir), "--threads", str(threads)], stdout=log_file, stderr=subprocess.STDOUT,
            env=env)
        job.worker_pid = self.procs[job.id].pid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
