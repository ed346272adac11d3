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

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from fitllm.engine.async_engine import AsyncEngine
from fitllm.server.errors import error_body, install_error_handlers
from fitllm.server.kobold_api import router as kobold_router
from fitllm.server.metrics import CONTENT_TYPE, ServerMetrics
from fitllm.server.openai_api import router as openai_router
from fitllm.server.state import ServerState

MAX_BODY_BYTES = 32 << 20  # a request body larger than this is refused (413) before it is read
OPEN_PATHS = ("/health", "/metrics")


def default_model_name(model: str | None) -> str:
    """The name /v1/models reports: the checkpoint file's or folder's name (the default model's GGUF)."""
    if model is None:
        from fitllm.loader import DEFAULT_MODEL_FILE

        return Path(DEFAULT_MODEL_FILE).stem
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app over an AsyncEngine; the app's lifespan starts the engine thread and shuts it down."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine._thread.is_alive() and engine.engine is None and engine.error is None:
            engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="fitllm", lifespan=lifespan)
    app.state.fitllm = ServerState(engine, model_name, api_key)
    metrics = ServerMetrics(engine)
    install_error_handlers(app)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse(
                error_body(
                    f"the request body is larger than {MAX_BODY_BYTES} bytes", "invalid_request_error"
                ),
                status_code=413,
            )
        guarded = api_key and request.method != "OPTIONS" and not request.url.path.startswith(OPEN_PATHS)
        if guarded and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return JSONResponse(
                error_body(
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    "authentication_error",
                    code="invalid_api_key",
                ),
                status_code=401,
            )
        return await call_next(request)

    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.get("/health")
    async def health() -> Response:
        if engine.ready:
            return JSONResponse({"status": "ok"})
        status = "loading" if engine.error is None else f"failed: {engine.error}"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(openai_router)
    app.include_router(kobold_router)
    return app
