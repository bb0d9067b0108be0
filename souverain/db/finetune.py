"""Uploaded files and fine-tuning jobs: rows only; the bytes and adapters live in the data directory."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from souverain.db import usage
from souverain.db.errors import NotFound
from souverain.db.tables import FineTuningJob, StoredFile, UsageRecord, utcnow

ACTIVE = ("QUEUED", "VALIDATING", "VALIDATED", "RUNNING", "CANCELLATION_REQUESTED")
FINAL = ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED")


def add_file(s: Session, *, org_id: int | None, filename: str, purpose: str, size: int, num_lines: int | None,
             sample_type: str, path: str, file_id: str | None = None) -> StoredFile:
    row = StoredFile(id=file_id or str(uuid.uuid4()), org_id=org_id, filename=filename, purpose=purpose, bytes=size,
                     num_lines=num_lines, sample_type=sample_type, path=path)
    s.add(row)
    s.flush()
    return row


def get_file(s: Session, *, file_id: str, org_id: int | None) -> StoredFile:
    row = s.get(StoredFile, file_id)
    if row is None or (org_id is not None and row.org_id != org_id):
        raise NotFound(f"no file {file_id!r}")
    return row


def list_files(s: Session, *, org_id: int | None, purpose: str | None = None) -> list[StoredFile]:
    q = select(StoredFile).order_by(StoredFile.created_at.desc())
    if org_id is not None:
        q = q.where(StoredFile.org_id == org_id)
    if purpose:
        q = q.where(StoredFile.purpose == purpose)
    return list(s.scalars(q))


def create_job(s: Session, *, org_id: int | None, model: str, training_files: list[dict[str, Any]],
               validation_files: list[str], suffix: str | None, hyperparameters: dict[str, Any],
               auto_start: bool) -> FineTuningJob:
    job = FineTuningJob(id=str(uuid.uuid4()), org_id=org_id, model=model, training_files=training_files,
                        validation_files=validation_files, suffix=suffix, hyperparameters=hyperparameters,
                        auto_start=auto_start, start_requested=auto_start, status="QUEUED", trained_tokens=0,
                        events=[], checkpoints=[])
    s.add(job)
    add_event(job, "status-updated", {"status": "QUEUED"})
    s.flush()
    return job


def get_job(s: Session, *, job_id: str, org_id: int | None) -> FineTuningJob:
    job = s.get(FineTuningJob, job_id)
    if job is None or (org_id is not None and job.org_id != org_id):
        raise NotFound(f"no fine-tuning job {job_id!r}")
    return job


def list_jobs(s: Session, *, org_id: int | None, status: str | None = None) -> list[FineTuningJob]:
    q = select(FineTuningJob).order_by(FineTuningJob.created_at.desc())
    if org_id is not None:
        q = q.where(FineTuningJob.org_id == org_id)
    if status:
        q = q.where(FineTuningJob.status == status)
    return list(s.scalars(q))


def active_count(s: Session, *, org_id: int | None) -> int:
    return len(list(s.scalars(select(FineTuningJob.id).where(FineTuningJob.org_id == org_id,
                                                              FineTuningJob.status.in_(ACTIVE)))))


def active_jobs(s: Session) -> list[FineTuningJob]:
    """Jobs not yet ended, oldest first (the runner's work list: an indexed query, however many jobs ended)."""
    return list(s.scalars(select(FineTuningJob).where(FineTuningJob.status.in_(ACTIVE))
                          .order_by(FineTuningJob.created_at)))


def add_event(job: FineTuningJob, name: str, data: dict[str, Any] | None = None) -> None:
    # A new list: JSON columns notice reassignment, not in-place appends.
    job.events = [*job.events, {"name": name, "created_at": int(utcnow().timestamp()), "data": data or {}}]
    job.modified_at = utcnow()


def set_status(job: FineTuningJob, status: str, **data: Any) -> None:
    job.status = status
    add_event(job, "status-updated", {"status": status, **data})


def add_checkpoint(job: FineTuningJob, step: int, train_loss: float, valid_loss: float | None, tokens: int) -> None:
    train = None if train_loss != train_loss else train_loss  # NaN (no step yet) is not JSON
    job.checkpoints = [*job.checkpoints, {"step_number": step, "created_at": int(utcnow().timestamp()),
                                          "metrics": {"train_loss": train, "valid_loss": valid_loss,
                                                      "valid_mean_token_accuracy": None}}]
    job.trained_tokens += tokens
    job.modified_at = utcnow()


def succeeded(s: Session) -> list[FineTuningJob]:
    return list(s.scalars(select(FineTuningJob).where(FineTuningJob.status == "SUCCESS",
                                                      FineTuningJob.fine_tuned_model.is_not(None))))


FINETUNE_ENDPOINT = "fine-tuning"


def unmetered(s: Session) -> list[FineTuningJob]:
    """Ended jobs whose trained tokens are not in the usage yet."""
    metered = select(UsageRecord.request_id).where(UsageRecord.endpoint == FINETUNE_ENDPOINT)
    return list(s.scalars(select(FineTuningJob).where(FineTuningJob.status.in_(FINAL),
                                                      FineTuningJob.id.not_in(metered))))


def meter(s: Session, *, job: FineTuningJob) -> None:
    """One usage row for an ended job: its trained tokens count against the organisation's month."""
    usage.record(s, usage=usage.Usage(job.id, job.model, FINETUNE_ENDPOINT, job.trained_tokens, 0,
                                      int((job.modified_at - job.created_at).total_seconds() * 1000),
                                      job.status.lower(), job.org_id))
