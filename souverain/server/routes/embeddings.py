"""POST /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from souverain.server.deps import CurrentCaller, Models, PlatformDep
from souverain.server.errors import APIError

router = APIRouter()


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str] = Field(...)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, caller: CurrentCaller, models: Models, plat: PlatformDep
                     ) -> JSONResponse:
    """Embed one text or a list (mean-pooled and normalised, as sentence-transformers does)."""
    found = models.embedders.get(req.model)
    if found is None or not plat.visible(caller, [req.model]):
        raise APIError(404, f"embedding model {req.model!r} not found; see GET /v1/models", param="model",
                       code="model_not_found")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or len(texts) > 2048:
        raise APIError(400, "input must hold 1 to 2048 texts", param="input")
    if req.dimensions is not None and req.dimensions != found.embedder.dim:
        raise APIError(400, f"this model's embeddings have {found.embedder.dim} dimensions", param="dimensions")
    started = time.monotonic()
    headers = plat.gate(caller, req.model).headers  # rate limits before the texts are tokenised
    tokens = await asyncio.to_thread(found.embedder.count_tokens, texts)
    plat.charge(caller, tokens)
    request_id = f"embd-{uuid.uuid4().hex}"
    try:
        vectors = await asyncio.to_thread(found.embedder.embed, texts)  # the event loop stays free
    except BaseException:
        await plat.record(caller, caller.usage(request_id, req.model, "embeddings", tokens, 0,
                                               int((time.monotonic() - started) * 1000), "error"))
        raise
    await plat.record(caller, caller.usage(request_id, req.model, "embeddings", tokens, 0,
                                           int((time.monotonic() - started) * 1000), "stop"))
    data = []
    for i, v in enumerate(vectors):
        value: Any = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                      else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"id": request_id, "object": "list", "model": req.model, "data": data,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=headers)
