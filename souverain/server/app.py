"""create_app(settings, registry): the FastAPI application, built without import-time effects."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from souverain.db import keys
from souverain.db.database import Database
from souverain.server import errors
from souverain.server.guard import Guard
from souverain.server.platform import Platform
from souverain.server.registry import Registry
from souverain.server.routes import (
    account,
    admin,
    chat,
    completions,
    embeddings,
    files,
    fine_tuning,
    health,
    metrics,
    models,
)
from souverain.server.settings import Settings


def create_app(settings: Settings, registry: Registry, db: Database | None = None,
               platform: Platform | None = None) -> FastAPI:
    """The API over `registry`. With `db`, keys, plans, quotas and usage come from the platform database;
    without, only the static keys of `settings` guard it (and none means an open local server)."""
    app = FastAPI(title="Souverain", version="0.1.0",
                  description="Self-hosted, open-weight AI: a Mistral- and OpenAI-compatible API.")
    app.state.settings = settings
    app.state.registry = registry
    app.state.platform = platform or Platform(db, [keys.digest(k) for k in settings.api_keys],
                                              stale_after=settings.usage_stale_seconds)
    errors.install(app)
    for router in (health.router, models.router, chat.router, completions.router, embeddings.router,
                   metrics.router, account.router, admin.router, files.router, fine_tuning.router):
        app.include_router(router)
    if db is not None:  # the chat app needs accounts and conversation storage
        from souverain.server.adapters import sync_adapters

        registry.refresh = lambda: sync_adapters(registry, db, settings.data_path())
        from fastapi.staticfiles import StaticFiles

        from souverain.web import routes as web
        from souverain.web.session import session_caller
        from souverain.web.throttle import LoginThrottle

        app.state.session_caller = session_caller(app.state.platform)
        app.state.login_throttle = LoginThrottle()
        app.include_router(web.router)
        app.include_router(web.pages)
        app.mount("/static", StaticFiles(directory=web.STATIC), name="static")

    def openapi() -> dict[str, Any]:
        # The `model` fields list the models actually loaded: truthful, and it guides clients (and fuzzers).
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            generative = sorted(registry.models)
            fim = sorted(k for k, m in registry.models.items() if "fim" in m.info.get("capabilities", []))
            for name, ids in (("ChatCompletionRequest", generative), ("CompletionRequest", generative),
                              ("FIMCompletionRequest", fim), ("EmbeddingRequest", sorted(registry.embedders))):
                props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in props and ids:
                    props["model"]["enum"] = ids
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    def limit_for(path: str) -> int:
        return settings.max_file_bytes + (1 << 20) if path == "/v1/files" else settings.max_body_bytes

    app.add_middleware(Guard, platform=app.state.platform, limit_for=limit_for)  # type: ignore[arg-type]
    if settings.allowed_origins:  # outside the guard: a browser's preflight carries no key
        from fastapi.middleware.cors import CORSMiddleware

        # Bearer keys only: never the chat app's session cookie from another origin (no allow_credentials).
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,  # type: ignore[arg-type]
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["x-request-id"])
    if settings.access_log:
        from souverain.server.access import AccessLog

        app.add_middleware(AccessLog)  # type: ignore[arg-type]
    return app
