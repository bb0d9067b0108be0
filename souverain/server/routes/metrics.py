"""GET /metrics: Prometheus text, the engine's counters under vLLM's names with a `souverain:` prefix."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from souverain.engine.stats import EngineStats, Histogram
from souverain.server.deps import Models, current_caller
from souverain.server.errors import APIError

router = APIRouter()

# (name, type, help, value of EngineStats)
_SCALARS = [
    ("num_requests_running", "gauge", "Requests generating now", lambda s: s.running),
    ("num_requests_waiting", "gauge", "Requests waiting to be scheduled", lambda s: s.waiting),
    ("kv_cache_usage_perc", "gauge", "Share of KV cache blocks in use",
     lambda s: s.kv_blocks_used / max(1, s.kv_blocks_total)),
    ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache",
     lambda s: s.prefix_queries),
    ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache", lambda s: s.prefix_hits),
    ("prompt_tokens_total", "counter", "Prompt tokens computed", lambda s: s.prompt_tokens),
    ("generation_tokens_total", "counter", "Tokens generated", lambda s: s.generation_tokens),
    ("num_preemptions_total", "counter", "Sequences preempted to free KV blocks", lambda s: s.preemptions),
    ("request_success_total", "counter", "Requests finished", lambda s: s.requests_finished),
]
_HISTOGRAMS = [
    ("time_to_first_token_seconds", "Time to first token", lambda s: s.time_to_first_token),
    ("inter_token_latency_seconds", "Time between tokens", lambda s: s.inter_token_latency),
]
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _histogram(name: str, label: str, h: Histogram) -> list[str]:
    # Buckets from the recent samples, scaled to the full count (the engine keeps sum/count exactly).
    recent = list(h.recent)
    scale = h.count / len(recent) if recent else 0.0
    lines = [f'{name}_bucket{{{label},le="{b}"}} {round(sum(v <= b for v in recent) * scale)}' for b in _BUCKETS]
    lines += [f'{name}_bucket{{{label},le="+Inf"}} {h.count}', f"{name}_sum{{{label}}} {h.total}",
              f"{name}_count{{{label}}} {h.count}"]
    return lines


def render(stats: dict[str, EngineStats]) -> str:
    lines: list[str] = []
    for key, kind, help_, get in _SCALARS:
        name = f"souverain:{key}"
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model_name="{model}"}} {get(s)}' for model, s in stats.items()]
    for key, help_, get_h in _HISTOGRAMS:
        name = f"souverain:{key}"
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for model, s in stats.items():
            lines += _histogram(name, f'model_name="{model}"', get_h(s))
    return "\n".join(lines) + "\n"


def operator(request: Request) -> None:
    """The metrics describe every tenant's traffic (prefix-cache hits included, which would let one member
    test guesses about a colleague's prompts): the operator's key, or a metrics-only key, reads them."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    allowed = request.app.state.settings.metrics_keys
    if scheme.lower() == "bearer" and any(secrets.compare_digest(token.strip(), k) for k in allowed):
        return
    if not current_caller(request).root:
        raise APIError(403, "/metrics needs the operator's key or the metrics key (serve --metrics-key)",
                       type_="permission_error")


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(operator)])
async def metrics(models: Models) -> str:
    """Prometheus exposition of every loaded model's engine counters (operators only)."""
    return render({m.id: m.engine.engine.stats for m in models.models.values()})
