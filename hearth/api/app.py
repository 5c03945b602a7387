"""The app factory: wires settings, the engine, middleware, error handlers and routers; no route logic here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from hearth import __version__
from hearth.api import anthropic, gallery, health, ollama, openapi, realtime, runners, vad, web
from hearth.api.drain import DrainMiddleware
from hearth.api.errors import install_error_handlers
from hearth.api.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    OllamaJsonMiddleware,
)
from hearth.api.openai import audio, chat, completions, embeddings, images, models, responses
from hearth.chat.images import configure_image_limits
from hearth.engine import Engine
from hearth.settings import Settings

log = logging.getLogger("hearth.api")


def create_app(settings: Settings) -> FastAPI:
    engine = Engine(settings)
    configure_image_limits(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        preload = asyncio.create_task(engine.preload())
        cleanup = asyncio.create_task(images.cleanup_loop(engine))
        try:
            yield
        finally:
            cleanup.cancel()
            preload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await preload
            await engine.stop()
            log.info("all runners stopped")

    app = FastAPI(title="Hearth", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app, {"/api/": ollama.error_body, "/v1/messages": anthropic.error_body})
    if settings.web:  # before Ollama's plain-text "/", which answers in its place with --no-web
        web.mount(app)
    # The gallery's /models/available and /models/jobs come before /models/{id}, which would swallow them.
    for router in (health.router, gallery.router, models.router, chat.router, completions.router, embeddings.router,
                   audio.router, vad.router, images.router, runners.router, ollama.router, anthropic.router,
                   responses.router, realtime.router):
        app.include_router(router)
    openapi.install(app)
    # Outermost first: refuse unauthenticated requests before reading their bodies.
    app.add_middleware(OllamaJsonMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    # The admin key (model installs and deletes) opens every other route too.
    keys = [*settings.api_keys, settings.admin_api_key] if settings.api_keys and settings.admin_api_key \
        else settings.api_keys
    app.add_middleware(ApiKeyMiddleware, keys=keys, open_prefixes=("/web/",) if settings.web else (),
                       open_paths=("/", "/ui") if settings.web else ())
    app.add_middleware(DrainMiddleware)  # on SIGTERM: 503 for new requests, a grace for running ones
    app.add_middleware(MetricsMiddleware, metrics=engine.runners.metrics)  # outermost: refusals count too
    return app
