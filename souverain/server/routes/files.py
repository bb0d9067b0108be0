"""/v1/files: upload (multipart), list, get, delete and download fine-tuning data (Mistral's Files API)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from souverain.db import finetune
from souverain.db.tables import StoredFile
from souverain.server.deps import CurrentCaller, PlatformDep
from souverain.server.errors import APIError
from souverain.train.data import validate_jsonl

router = APIRouter(tags=["files"])


def file_json(f: StoredFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at.timestamp()),
            "filename": f.filename, "purpose": f.purpose, "sample_type": f.sample_type, "source": "upload",
            "num_lines": f.num_lines, "mimetype": "application/jsonl", "signature": None}


@router.post("/v1/files")
async def upload(request: Request, caller: CurrentCaller, plat: PlatformDep,
                 file: Annotated[UploadFile, File(description="A JSONL file")],
                 purpose: Annotated[Literal["fine-tune", "batch"], Form()] = "fine-tune") -> dict[str, Any]:
    """Store a file (up to `max_file_bytes`, and the plan's fine-tuning file cap). JSONL is checked here and
    again when a job uses it; errors name their lines. Checking and writing run in a worker thread."""
    limit = request.app.state.settings.max_file_bytes
    plan_cap = caller.limits.finetune.get("file_bytes") if caller.limits else None
    if plan_cap is not None and plan_cap < limit:
        limit = plan_cap
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"file over the limit of {limit} bytes" + (" (your plan's)" if limit == plan_cap else ""),
                       param="file")
    if not data:
        raise APIError(400, "the file is empty", param="file")
    name = Path(file.filename or "upload.jsonl").name[:200]
    folder = request.app.state.settings.data_path() / "files"
    db = plat.database("files")

    def store() -> dict[str, Any]:
        check = validate_jsonl(data)
        file_id = str(uuid.uuid4())
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{file_id}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # whole or absent
        with db.session() as s:
            row = finetune.add_file(s, org_id=caller.org_id, filename=name, purpose=purpose, size=len(data),
                                    num_lines=sum(1 for line in data.splitlines() if line.strip()),
                                    sample_type=check.kind, path=str(path), file_id=file_id)
            return file_json(row)

    return await anyio.to_thread.run_sync(store)


@router.get("/v1/files")
def list_files(caller: CurrentCaller, plat: PlatformDep, page: Annotated[int, Query(ge=0)] = 0,
               page_size: Annotated[int, Query(ge=1, le=1000)] = 100, purpose: str | None = None) -> dict[str, Any]:
    with plat.database("files").session() as s:
        rows = finetune.list_files(s, org_id=caller.org_id, purpose=purpose)
        return {"object": "list", "total": len(rows),
                "data": [file_json(f) for f in rows[page * page_size : (page + 1) * page_size]]}


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, caller: CurrentCaller, plat: PlatformDep) -> dict[str, Any]:
    with plat.database("files").session() as s:
        return {**file_json(finetune.get_file(s, file_id=file_id, org_id=caller.org_id)), "deleted": False}


@router.get("/v1/files/{file_id}/content", response_model=None)
def file_content(file_id: str, caller: CurrentCaller, plat: PlatformDep) -> FileResponse:
    with plat.database("files").session() as s:
        row = finetune.get_file(s, file_id=file_id, org_id=caller.org_id)
        return FileResponse(row.path, media_type="application/octet-stream", filename=row.filename)


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, caller: CurrentCaller, plat: PlatformDep) -> dict[str, Any]:
    """Delete a file no active job needs."""
    with plat.database("files").session() as s:
        row = finetune.get_file(s, file_id=file_id, org_id=caller.org_id)
        for job in finetune.list_jobs(s, org_id=row.org_id):
            used = {f["file_id"] for f in job.training_files} | set(job.validation_files)
            if job.status in finetune.ACTIVE and file_id in used:
                raise APIError(409, f"job {job.id} ({job.status}) uses this file", code="conflict")
        Path(row.path).unlink(missing_ok=True)
        s.delete(row)
    return {"id": file_id, "object": "file", "deleted": True}
