"""GET /health (liveness, no auth) and GET /ready (every model produces a token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from souverain.engine.request import Request, SamplingParams
from souverain.server.deps import CurrentCaller, Models
from souverain.server.generation import new_id

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(_: CurrentCaller, models: Models) -> Any:
    """Each loaded model generates one token."""
    status = {}
    for m in models.models.values():
        try:
            request = Request(new_id("ready"), m.tokenizer.encode("Hello"), SamplingParams(max_tokens=1, temperature=0))
            deltas = [d async for d in m.engine.generate(request)]
            status[m.id] = "ready" if deltas and deltas[-1].completion_tokens == 1 else "failed"
        except Exception as e:
            status[m.id] = f"failed: {e}"
    ok = bool(status) and all(v == "ready" for v in status.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "models": status}, 200 if ok else 503)
