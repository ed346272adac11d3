"""The request guard: API key and body size, as plain ASGI middleware.

Plain ASGI rather than Starlette's `@app.middleware("http")` (BaseHTTPMiddleware): through that wrapper a
route's `request.is_disconnected()` never sees the client go away (Starlette discussion #2094), and a
non-streamed request must be aborted when its client disconnects.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fitllm.server.errors import error_body

MAX_BODY_BYTES = 32 << 20  # a request body larger than this is refused (413)
OPEN_PATHS = ("/health", "/metrics")
# What KoboldCpp answers without its password, so a front end can find the server and see that it is
# protected (/api/extra/version's "protected") before asking the user for the key.
OPEN_GET_PATHS = (
    "/api/v1/model",
    "/api/latest/model",
    "/api/v1/info/version",
    "/api/latest/info/version",
    "/api/v1/config/",
    "/api/latest/config/",
    "/api/extra/version",
    "/api/extra/true_max_context_length",
    "/api/extra/perf",
)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body (chunked ones included) passes MAX_BODY_BYTES; FastAPI lets an
    HTTPException through its body parsing, and the app's handler answers it as a 413 error body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _reply(
                send, 413, error_body(BodyTooLarge(self.max_body_bytes).detail, "invalid_request_error")
            )
            return
        guarded = (
            self.api_key is not None
            and scope["method"] != "OPTIONS"
            and scope["path"] != "/"  # the studio page itself; its API calls send the key
            and not scope["path"].startswith(OPEN_PATHS)
            and not (scope["method"] == "GET" and scope["path"].startswith(OPEN_GET_PATHS))
        )
        if guarded and not _bearer_matches(headers.get("authorization", ""), self.api_key):
            body = error_body(
                "missing or wrong API key (Authorization: Bearer KEY)",
                "authentication_error",
                code="invalid_api_key",
            )
            await _reply(send, 401, body)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, counted_receive, send)


def _bearer_matches(authorization: str, key: str | None) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110: schemes are case-insensitive)."""
    scheme, _, token = authorization.strip().partition(" ")
    return (
        key is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(token.strip().encode(), key.encode())
    )


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
