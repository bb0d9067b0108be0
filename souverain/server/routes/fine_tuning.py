"""/v1/fine_tuning/jobs: create, list, get, start and cancel LoRA fine-tuning jobs (Mistral's Jobs API)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from souverain.db import finetune
from souverain.db.tables import FineTuningJob
from souverain.server.deps import CurrentCaller, Models, PlatformDep
from souverain.server.errors import APIError

router = APIRouter(tags=["fine-tuning"])


class TrainingFile(BaseModel):
    file_id: str = Field(..., min_length=1, max_length=64)
    weight: float = Field(1.0, gt=0, le=100)


class Hyperparameters(BaseModel):
    training_steps: int | None = Field(None, ge=1, le=100_000)
    epochs: float | None = Field(None, gt=0, le=100)
    learning_rate: float = Field(1e-4, gt=0, le=1)
    weight_decay: float | None = Field(0.1, ge=0, le=1)
    warmup_fraction: float | None = Field(0.05, ge=0, le=1)
    seq_len: int | None = Field(512, ge=16, le=32_768)
    fim_ratio: float | None = None
    rank: int = Field(16, ge=1, le=256)
    alpha: float | None = Field(None, gt=0)
    batch_size: int = Field(4, ge=1, le=256)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the base model's compute dtype while training


class JobIn(BaseModel):
    model: str = Field(..., min_length=1, max_length=256)
    training_files: list[TrainingFile] = Field(..., min_length=1, max_length=32)
    validation_files: list[str] | None = Field(None, max_length=32)
    suffix: str | None = Field(None, max_length=18, pattern=r"^[A-Za-z0-9_.-]*$")
    hyperparameters: Hyperparameters = Field(default_factory=lambda: Hyperparameters.model_validate({}))
    auto_start: bool = True
    integrations: list[Any] | None = None
    invalid_sample_skip_percentage: float | None = 0
    job_type: str | None = None
    repositories: list[Any] | None = None
    classifier_targets: list[Any] | None = None


def job_json(job: FineTuningJob, detailed: bool = True) -> dict[str, Any]:
    h = dict(job.hyperparameters)
    out: dict[str, Any] = {
        "id": job.id, "object": "job", "job_type": "completion", "auto_start": job.auto_start, "model": job.model,
        "status": job.status, "created_at": int(job.created_at.timestamp()),
        "modified_at": int(job.modified_at.timestamp()),
        "training_files": [f["file_id"] for f in job.training_files], "validation_files": job.validation_files,
        "hyperparameters": h, "fine_tuned_model": job.fine_tuned_model, "suffix": job.suffix,
        "integrations": [], "trained_tokens": job.trained_tokens, "metadata": None, "repositories": []}
    if detailed:
        out["events"] = list(reversed(job.events))  # newest first, as Mistral's
        out["checkpoints"] = list(reversed(job.checkpoints))
    return out


@router.post("/v1/fine_tuning/jobs")
def create_job(body: JobIn, caller: CurrentCaller, plat: PlatformDep, models: Models) -> dict[str, Any]:
    """Queue a LoRA job; it is validated, then runs when `auto_start` is true or once started. The plan caps
    `seq_len`, `batch_size`, the steps and the organisation's jobs under way; the plan's and the key's model
    allow-lists apply; the tokens trained are metered when the job ends."""
    base = models.models.get(body.model)
    if base is None or not plat.visible(caller, [body.model]):
        raise APIError(404, f"model {body.model!r} not found; fine-tune one of GET /v1/models", param="model",
                       code="model_not_found")
    plat.check_model(caller, body.model)
    if base.path is None:
        raise APIError(400, f"model {body.model!r} has no weights on disk to fine-tune", param="model")
    h = body.hyperparameters.model_dump()
    if h["alpha"] is None:
        h["alpha"] = 2.0 * h["rank"]
    caps = caller.limits.finetune if caller.limits else {}
    for name, cap_name in (("seq_len", "seq_len"), ("batch_size", "batch"), ("training_steps", "steps")):
        cap = caps.get(cap_name)
        if cap is not None and h.get(name) is not None and h[name] > cap:
            raise APIError(400, f"hyperparameters.{name} is {h[name]}; the {caller.limits and caller.limits.plan!r} "
                                f"plan allows at most {cap}", param=f"hyperparameters.{name}", code="plan_limit")
    if caps.get("steps") is not None:
        h["max_steps"] = caps["steps"]  # also bounds the steps `epochs` turns into
    with plat.database("fine-tuning jobs").session() as s:
        jobs_cap = caps.get("jobs")
        if jobs_cap is not None and finetune.active_count(s, org_id=caller.org_id) >= jobs_cap:
            raise APIError(429, f"your organisation has {jobs_cap} fine-tuning jobs under way, the plan's most; "
                                "wait for one to end or cancel one", type_="rate_limit_error", code="jobs_limit")
        for ref in [f.file_id for f in body.training_files] + list(body.validation_files or []):
            finetune.get_file(s, file_id=ref, org_id=caller.org_id)  # 404 when it is not the caller's
        job = finetune.create_job(s, org_id=caller.org_id, model=body.model,
                                  training_files=[f.model_dump() for f in body.training_files],
                                  validation_files=list(body.validation_files or []), suffix=body.suffix,
                                  hyperparameters=h, auto_start=body.auto_start)
        return job_json(job, detailed=False)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(caller: CurrentCaller, plat: PlatformDep, page: Annotated[int, Query(ge=0)] = 0,
              page_size: Annotated[int, Query(ge=1, le=1000)] = 100, model: str | None = None,
              status: str | None = None) -> dict[str, Any]:
    with plat.database("fine-tuning jobs").session() as s:
        rows = [j for j in finetune.list_jobs(s, org_id=caller.org_id, status=status) if not model or j.model == model]
        return {"object": "list", "total": len(rows),
                "data": [job_json(j, detailed=False) for j in rows[page * page_size : (page + 1) * page_size]]}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, caller: CurrentCaller, plat: PlatformDep) -> dict[str, Any]:
    """The job with its events (validation errors name file and line) and per-step metrics."""
    with plat.database("fine-tuning jobs").session() as s:
        return job_json(finetune.get_job(s, job_id=job_id, org_id=caller.org_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/start")
def start_job(job_id: str, caller: CurrentCaller, plat: PlatformDep) -> dict[str, Any]:
    with plat.database("fine-tuning jobs").session() as s:
        job = finetune.get_job(s, job_id=job_id, org_id=caller.org_id)
        if job.status in finetune.FINAL or job.status == "CANCELLATION_REQUESTED":
            raise APIError(400, f"job is {job.status}; it cannot start", code="invalid_state")
        job.start_requested = True
        finetune.add_event(job, "start-requested")
        return job_json(job)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, caller: CurrentCaller, plat: PlatformDep) -> dict[str, Any]:
    """Cancel: a running job stops within seconds (at its next step, or its worker is ended)."""
    with plat.database("fine-tuning jobs").session() as s:
        job = finetune.get_job(s, job_id=job_id, org_id=caller.org_id)
        if job.status == "RUNNING":
            finetune.set_status(job, "CANCELLATION_REQUESTED")
        elif job.status in ("QUEUED", "VALIDATING", "VALIDATED"):
            finetune.set_status(job, "CANCELLED")
        return job_json(job)
