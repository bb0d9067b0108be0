"""GET /v1/models, GET /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from souverain.server.deps import CurrentCaller, Models, PlatformDep, find_model
from souverain.server.registry import LoadedEmbedder, LoadedModel
from souverain.server.residency import Residency

router = APIRouter()


def model_card(m: LoadedModel, residency: Residency | None = None) -> dict[str, Any]:
    caps = set(m.info.get("capabilities", []))
    stats = m.engine.engine.stats
    slot = residency.slot_of(m.engine) if residency is not None else None
    until = residency.until(m.engine) if residency is not None else None
    return {
        "id": m.id, "object": "model", "created": m.created, "owned_by": "souverain",
        "max_context_length": m.max_context,
        "capabilities": {"completion_chat": "chat" in caps, "completion_fim": "fim" in caps,
                         "function_calling": "chat" in caps, "fine_tuning": m.path is not None, "vision": False},
        "type": "base", "architecture": m.info.get("architecture"), "quantization": m.info.get("quantization"),
        "status": {"running": stats.running, "waiting": stats.waiting, "kv_blocks_used": stats.kv_blocks_used,
                   "kv_blocks_total": stats.kv_blocks_total, "loaded": m.engine.loaded,
                   # weights' files + KV cache while loaded; when an idle model unloads (null: not by keep-alive)
                   "memory_bytes": (slot.size if slot else None) if m.engine.loaded else 0,
                   "expires_at": int(until) if until is not None else None},
    }


def adapter_card(m: LoadedModel, residency: Residency | None = None) -> dict[str, Any]:
    """A fine-tuned model: Mistral's FTModelCard (type fine-tuned, its job and root)."""
    card = model_card(m, residency)
    card["capabilities"]["fine_tuning"] = False
    return {**card, "type": "fine-tuned", "job": m.job or "", "root": m.parent, "parent": m.parent,
            "archived": False, "owned_by": "organisation"}


def embedder_card(m: LoadedEmbedder) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": "souverain",
            "max_context_length": m.embedder.max_len, "type": "base", "architecture": m.info.get("architecture"),
            "capabilities": {"completion_chat": False, "completion_fim": False, "function_calling": False,
                             "fine_tuning": False, "vision": False, "embeddings": True}}


@router.get("/v1/models")
async def list_models(caller: CurrentCaller, models: Models, plat: PlatformDep) -> dict[str, Any]:
    """The models this server has loaded that the caller may use (private models only for their organisations)."""
    if models.refresh is not None:
        models.refresh()
    shown = set(plat.visible(caller, [*models.models, *models.adapters, *models.embedders]))
    res = models.residency
    cards = ([model_card(m, res) for m in models.models.values() if m.id in shown]
             + [adapter_card(m, res) for m in models.adapters.values() if m.id in shown]
             + [embedder_card(m) for m in models.embedders.values() if m.id in shown]
             + [{**model_card(models.models[target], res), "id": alias, "root": target}
                for alias, target in models.aliases.items() if target in shown and target in models.models])
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, caller: CurrentCaller, models: Models, plat: PlatformDep) -> dict[str, Any]:
    """One loaded model."""
    if model_id in models.embedders and plat.visible(caller, [model_id]):
        return embedder_card(models.embedders[model_id])
    found = find_model(models, model_id, caller, plat)
    return adapter_card(found, models.residency) if found.adapter else model_card(found, models.residency)
