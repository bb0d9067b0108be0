"""`souverain finetune` and `souverain jobs`: fine-tuning through a running server's API."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from souverain.cli_client import Key, Server, Url, call, server
from souverain.cli_common import err, out

jobs_app = typer.Typer(help="Fine-tuning jobs on a running server.", no_args_is_help=True)


def upload_file(url: str, key: str | None, path: Path) -> dict[str, Any]:
    """POST /v1/files (multipart, purpose fine-tune): the stored file's description."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return dict(call(Server(url, key), "POST", ("v1", "files"), body, f"multipart/form-data; boundary={boundary}"))


def finetune(
    model: Annotated[str, typer.Argument(help="The base model, as served")],
    data: Annotated[Path, typer.Argument(help="Training data: JSONL in Mistral's format", exists=True)],
    validation: Annotated[Path | None, typer.Option(help="Validation JSONL", exists=True)] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (default: from --epochs, or 50)")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate")] = 1e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    seq_len: Annotated[int, typer.Option(help="Packed sequence length")] = 512,
    suffix: Annotated[str | None, typer.Option(help="In the new model's id: ft:<model>:<suffix>:<job>")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends")] = True,
    url: Url = None, api_key: Key = None,
) -> None:
    """Upload DATA and fine-tune MODEL with LoRA; prints the new model's id when done."""
    target = server(url, api_key)
    hyper: dict[str, Any] = {"learning_rate": lr, "rank": rank, "seq_len": seq_len}
    if steps or not epochs:
        hyper["training_steps"] = steps or 50
    if epochs:
        hyper["epochs"] = epochs
    body = {"model": model, "suffix": suffix,
            "training_files": [{"file_id": upload_file(target.url, target.key, data)["id"]}],
            "validation_files": [upload_file(target.url, target.key, validation)["id"]] if validation else [],
            "hyperparameters": hyper, "auto_start": True}
    job = call(target, "POST", ("v1", "fine_tuning", "jobs"), json.dumps(body).encode())
    err.print(f"job {job['id']} queued", highlight=False)
    if wait:
        _follow(target, job["id"])


def _follow(target: Server, job_id: str) -> None:
    seen = 0
    while True:
        job = call(target, "GET", ("v1", "fine_tuning", "jobs", job_id))
        points = list(reversed(job.get("checkpoints") or []))
        for c in points[seen:]:
            m = c["metrics"]
            err.print(f"step {c['step_number']}: train loss {m.get('train_loss')}, valid loss {m.get('valid_loss')}",
                      highlight=False)
        seen = len(points)
        if job["status"] in ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"):
            break
        time.sleep(2)
    if job["status"] != "SUCCESS":
        ends = [e["data"] for e in job.get("events", []) if e["data"].get("status") == job["status"]]
        last: dict[str, Any] = ends[0] if ends else {}
        for line in last.get("errors", []) or [last.get("error", "")]:
            err.print(f"[red]{line}[/red]", highlight=False)
        raise typer.Exit(1)
    print(job["fine_tuned_model"])


@jobs_app.command("list")
def jobs_list(url: Url = None, api_key: Key = None) -> None:
    """The organisation's fine-tuning jobs (ids in full, to paste into `jobs show`/`jobs cancel`)."""
    jobs = call(server(url, api_key), "GET", ("v1", "fine_tuning", "jobs"))["data"]
    width = max((len(j["id"]) for j in jobs), default=3)
    table = Table(Column("JOB", no_wrap=True, min_width=width), Column("MODEL", overflow="fold"), "STATUS", "STEPS",
                  Column("FINE-TUNED MODEL", overflow="fold"), box=None)
    for j in jobs:
        table.add_row(j["id"], j["model"], j["status"], str(j["hyperparameters"].get("training_steps") or "-"),
                      j.get("fine_tuned_model") or "-")
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, url: Url = None, api_key: Key = None) -> None:
    """One job, as JSON."""
    print(json.dumps(call(server(url, api_key), "GET", ("v1", "fine_tuning", "jobs", job_id)), indent=2))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = None, api_key: Key = None) -> None:
    """Stop a queued or running job."""
    job = call(server(url, api_key), "POST", ("v1", "fine_tuning", "jobs", job_id, "cancel"))
    out.print(f"job {job_id}: {job['status']}", highlight=False)


def install(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
    app.add_typer(jobs_app, name="jobs")
