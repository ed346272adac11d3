"""The HTTP server: one FastAPI app, one port, the engine on its own thread (`fitllm serve`).

Routes: OpenAI-compatible (fitllm/server/openai/), KoboldAI / KoboldCpp-compatible
(fitllm/server/kobold/), `/health` (503 while loading), `/metrics`
(Prometheus). With an API key every API route needs `Authorization: Bearer KEY`; `/health` and
`/metrics` stay open for probes and scrapers. Browsers are held to the Host and Origin allow-lists of
fitllm/server/access.py (the server's own pages, plus the origins `--allowed-origins` names), so a web page
the user visits cannot drive the server. A client's `priority` is honoured only with
`--scheduling-policy priority` (as vLLM).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from fitllm import __version__
from fitllm.engine.async_engine import AsyncEngine
from fitllm.server.access import AccessPolicy
from fitllm.server.errors import install_error_handlers, install_openapi
from fitllm.server.guard import MAX_BODY_BYTES, RequestGuard
from fitllm.server.heavy import HeavyWork, ServerLimits
from fitllm.server.infill import router as infill_router
from fitllm.server.kobold.jobs import KoboldJobs
from fitllm.server.kobold.routes import router as kobold_router
from fitllm.server.metrics import CONTENT_TYPE, ServerMetrics
from fitllm.server.openai.routes import router as openai_router
from fitllm.server.shutdown import Drain, DrainGuard
from fitllm.server.state import ServerState
from fitllm.server.story_trim import DEFAULT_SMART_CONTEXT_SHARE, check_share
from fitllm.studio.routes import router as studio_router

BODY_BYTES_PER_PROMPT_CHAR = 8  # bytes of body a prompt character may need (a JSON unicode escape takes 6)
METRICS_RESPONSE = {
    "description": "Prometheus text exposition format (version 0.0.4)",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


def default_model_name(model: str | None) -> str:
    """The name /v1/models reports: the checkpoint file's or folder's name (the default model's GGUF)."""
    if model is None:
        from fitllm.loader import DEFAULT_MODEL_FILE

        return Path(DEFAULT_MODEL_FILE).stem
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    *,
    access: AccessPolicy | None = None,
    scheduling_policy: str = "fcfs",
    limits: ServerLimits | None = None,
    smart_context_share: float = DEFAULT_SMART_CONTEXT_SHARE,
) -> FastAPI:
    """The app over an AsyncEngine; the app's lifespan starts the engine thread and shuts it down. Serve it
    with `shutdown.draining_server` so a shutdown drains its requests. The routes' context shift default is
    the engine's --context-shift (server/story_trim.py)."""
    access = access or AccessPolicy()
    limits = limits or ServerLimits()
    heavy = HeavyWork(limits.heavy_workers, limits.heavy_max_waiting)
    drain = Drain(limits.shutdown_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()  # unless it was started before (a test may start it to wait for the model)
        try:
            yield
        finally:
            engine.shutdown()
            heavy.close()

    app = FastAPI(title="fitllm", lifespan=lifespan)
    app.state.fitllm = ServerState(
        engine,
        model_name,
        api_key,
        scheduling_policy=scheduling_policy,
        limits=limits,
        heavy=heavy,
        drain=drain,
        context_shift=engine.config.context_shift,
        smart_context_share=check_share(smart_context_share),
    )
    app.state.kobold_jobs = KoboldJobs(alive=engine.is_running)
    metrics = ServerMetrics(engine)
    install_error_handlers(app)
    install_openapi(app)

    # The last added runs first: the guard refuses foreign hosts and origins before CORS answers anything.
    cors = access.cors_origins()
    app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["*"], allow_headers=["*"])

    def max_body_bytes() -> int:
        """A body never needs more than BODY_BYTES_PER_PROMPT_CHAR bytes per prompt character the server
        accepts (JSON escapes, chat messages' other fields), plus 1 MiB; before the model is loaded, and never
        more than, MAX_BODY_BYTES. So a 30 MiB body is refused before it is read or parsed."""
        served = engine.served_model
        if served is None:
            return MAX_BODY_BYTES
        chars = limits.prompt_chars(served.max_model_len)
        return min(MAX_BODY_BYTES, BODY_BYTES_PER_PROMPT_CHAR * chars + (1 << 20))

    app.add_middleware(RequestGuard, api_key=api_key, access=access, max_body_bytes=max_body_bytes)
    app.add_middleware(DrainGuard, drain=drain)  # outermost: during a shutdown nothing new gets further

    @app.get("/health")
    async def health() -> Response:
        if drain.active:
            return JSONResponse({"status": "shutting down"}, status_code=503, headers={"Retry-After": "1"})
        if engine.ready:
            return JSONResponse({"status": "ok"})
        status = "loading" if engine.error is None else f"failed: {engine.error}"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        """vLLM's liveness probe (SageMaker's name): what /health answers."""
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        """vLLM's /version: the server's version."""
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: METRICS_RESPONSE})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(openai_router)
    app.include_router(infill_router)
    app.include_router(kobold_router)
    app.include_router(studio_router)
    return app
