"""The HTTP server: one FastAPI app, one port, the engine on its own thread (`fitllm serve`).

Routes: OpenAI-compatible (fitllm/server/openai_api.py), KoboldAI / KoboldCpp-compatible
(fitllm/server/kobold_api.py), `/health` (503 while loading), `/metrics`
(Prometheus). With an API key every API route needs `Authorization: Bearer KEY`; `/health` and
`/metrics` stay open for probes and scrapers. CORS allows any origin, since browser front ends call the
API directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from fitllm.engine.async_engine import AsyncEngine
from fitllm.server.errors import install_error_handlers
from fitllm.server.guard import RequestGuard
from fitllm.server.heavy import HeavyWork, ServerLimits
from fitllm.server.kobold_api import router as kobold_router
from fitllm.server.metrics import CONTENT_TYPE, ServerMetrics
from fitllm.server.openai_api import router as openai_router
from fitllm.server.shutdown import Drain, DrainGuard
from fitllm.server.state import ServerState
from fitllm.studio.routes import router as studio_router


def default_model_name(model: str | None) -> str:
    """The name /v1/models reports: the checkpoint file's or folder's name (the default model's GGUF)."""
    if model is None:
        from fitllm.loader import DEFAULT_MODEL_FILE

        return Path(DEFAULT_MODEL_FILE).stem
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def build_app(
    engine: AsyncEngine, model_name: str, api_key: str | None = None, limits: ServerLimits | None = None
) -> FastAPI:
    """The app over an AsyncEngine; the app's lifespan starts the engine thread and shuts it down. Serve it
    with `shutdown.draining_server` so a shutdown drains its requests."""
    limits = limits or ServerLimits()
    heavy = HeavyWork(limits.heavy_workers, limits.heavy_max_waiting)
    drain = Drain(limits.shutdown_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine._thread.is_alive() and engine.engine is None and engine.error is None:
            engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            heavy.close()

    app = FastAPI(title="fitllm", lifespan=lifespan)
    app.state.fitllm = ServerState(engine, model_name, api_key, limits=limits, heavy=heavy, drain=drain)
    metrics = ServerMetrics(engine)
    install_error_handlers(app)

    app.add_middleware(RequestGuard, api_key=api_key)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(DrainGuard, drain=drain)  # outermost: during a shutdown nothing new gets further

    @app.get("/health")
    async def health() -> Response:
        if drain.active:
            return JSONResponse({"status": "shutting down"}, status_code=503, headers={"Retry-After": "1"})
        if engine.ready:
            return JSONResponse({"status": "ok"})
        status = "loading" if engine.error is None else f"failed: {engine.error}"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(openai_router)
    app.include_router(kobold_router)
    app.include_router(studio_router)
    return app
