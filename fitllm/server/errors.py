"""OpenAI-style errors: every failure is `{"error": {"message", "type", "param", "code"}}` with its status
(on the Kobold routes, `/api/...`, with KoboldCpp's `{"detail": {"msg", "type"}}` beside it).

Which error a failure answers: `api_error` for admission (bad input a 400, what a retry gets past a 503),
`stream_error` for a request that failed after it was admitted (answered as JSON, or as a stream's last
event: sse.py).

FastAPI's own validation failures (a bare 422) and malformed JSON become 400s in that shape too, so any
client written for the OpenAI API can show the message; /openapi.json documents those 400s in that shape.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fitllm.engine.async_engine import EngineDead, QueueFull, RequestFailed
from fitllm.memory.ledger import BudgetExceeded
from fitllm.server.refusals import REFUSALS

RETRY_AFTER_S = 1
log = logging.getLogger("fitllm")


class APIError(Exception):
    """An error answered as JSON with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def kobold_error_body(err: APIError) -> dict[str, Any]:
    """The error for a Kobold route: KoboldCpp's `{"detail": {"msg", "type"}}` beside the OpenAI-style
    `error` object (KoboldAI Lite and SillyTavern read the first; other clients of fitllm the second)."""
    return error_body(err.message, err.type, err.param, err.code) | {
        "detail": {"msg": err.message, "type": err.type}
    }


def _response(request: Request, err: APIError) -> JSONResponse:
    if 400 <= err.status < 500:
        REFUSALS.refused(err.status, request.method, request.url.path, err.message)
    kobold = request.url.path.startswith("/api/")
    body = kobold_error_body(err) if kobold else error_body(err.message, err.type, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


_PARAM = re.compile(r"^([a-z_]+)(?::| must )")


def bad_request(message: str, param: str | None = None) -> APIError:
    """A 400; without `param`, one is read from messages of the form "name: ..." or "name must ..."."""
    if param is None and (m := _PARAM.match(message)):
        param = m.group(1)
    return APIError(400, message, param=param)


def unavailable(message: str) -> APIError:
    """A 503 a client should retry shortly (loading, busy, out of memory for now)."""
    return APIError(503, message, "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def api_error(exc: BaseException) -> APIError:
    """What a failure of admission or of a running request answers: a 400 for bad input, a 503 for what a
    retry can get past (a full queue, no memory now, a shutdown), a 500 naming the failure otherwise."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, BudgetExceeded):
        return unavailable(f"not enough free memory right now: {exc}")
    if isinstance(exc, QueueFull):
        return unavailable(f"server busy: {exc}")
    if isinstance(exc, EngineDead):
        return unavailable(str(exc))
    return APIError(500, f"the request failed: {type(exc).__name__}: {exc}", "server_error")


def stream_error(exc: Exception) -> APIError:
    """What a request that failed after it was admitted answers: its own failure a 500 naming it, a shutdown
    or a stopped engine a 503 to retry, bad input a 400; anything else a 500 (logged, never a traceback)."""
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), "server_error", code="request_failed")
    err = api_error(exc)
    if err.status >= 500 and err.status != 503:
        log.error("a stream failed: %r", exc, exc_info=exc)
    return err


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg')}", None
    where = f"{param}: " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _response(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _response(request, APIError(exc.status_code, str(exc.detail), type_, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback; the client gets the error in the API's shape, not plain text.
        return _response(request, APIError(500, f"internal error: {exc}", "server_error"))


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
BAD_REQUEST = {
    "description": "Bad request (a field is missing, of the wrong type or out of range)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def install_openapi(app: FastAPI) -> None:
    """/openapi.json as the server answers: the 400 error body where FastAPI would document a 422 (which
    the handlers above never send), and on every POST route (the Kobold routes read their bodies
    themselves)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # One route with two methods (Kobold's check: one route, so a 405's Allow names both) gets one
            # operation id from FastAPI; each method's is made unique below (client generators need that).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Duplicate Operation ID")
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            schemas["Error"] = ERROR_SCHEMA
            for path in schema.get("paths", {}).values():
                for method, op in path.items():
                    if op.get("operationId", "").endswith("_get") and method != "get":
                        op["operationId"] = op["operationId"].removesuffix("_get") + f"_{method}"
                    elif op.get("operationId", "").endswith("_post") and method != "post":
                        op["operationId"] = op["operationId"].removesuffix("_post") + f"_{method}"
                    responses = op.setdefault("responses", {})
                    if responses.pop("422", None) is not None or method == "post":
                        responses["400"] = BAD_REQUEST
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
