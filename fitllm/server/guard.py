"""The request guard: Host and Origin (fitllm/server/access.py), API key and body size, as plain ASGI
middleware, outermost, so that a refused request runs nothing.

Plain ASGI rather than Starlette's `@app.middleware("http")` (BaseHTTPMiddleware): through that wrapper a
route's `request.is_disconnected()` never sees the client go away (Starlette discussion #2094), and a
non-streamed request must be aborted when its client disconnects.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fitllm.server.access import AccessPolicy
from fitllm.server.errors import error_body
from fitllm.server.refusals import REFUSALS

MAX_BODY_BYTES = 32 << 20  # a request body larger than this is refused (413)
OPEN_PATHS = ("/health", "/metrics", "/ping", "/version")  # the last two: vLLM's
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
    "/api/extra/preloadstory",
    "/sdapi/v1/sd-models",
)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body (chunked ones included) passes MAX_BODY_BYTES; FastAPI lets an
    HTTPException through its body parsing, and the app's handler answers it as a 413 error body."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit} bytes (the limit follows --max-prompt-chars: raise it "
            f"for longer prompts)",
        )


class RequestGuard:
    """Refuses, before the app sees them: a foreign Host or Origin (403), a body over the limit (413), a
    missing or wrong API key (401). Its own refusals carry CORS headers for an allowed origin, so a front
    end there can read them."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        access: AccessPolicy | None = None,
        max_body_bytes: int | Callable[[], int] = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.access = access or AccessPolicy()
        self._max_body_bytes = max_body_bytes

    @property
    def max_body_bytes(self) -> int:
        """The body limit now: a number, or asked of a function (the server's follows the prompt limit, which
        is known once the model is loaded), so a body too large for any prompt is refused before it is read."""
        limit = self._max_body_bytes
        return limit() if callable(limit) else limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        if not self.access.host_allowed(host):
            message = (
                f"the Host {host!r} is not allowed (a DNS-rebinding guard); reach the server as localhost "
                f"or by IP address, or start it with --allowed-hosts NAME"
            )
            await _refuse(scope, send, 403, error_body(message, "permission_error", code="host_not_allowed"))
            return
        if origin is not None and not self.access.origin_allowed(origin, host):
            message = (
                f"requests from the web page origin {origin!r} are not allowed; start the server with "
                f"--allowed-origins {origin} to allow it"
            )
            await _refuse(
                scope, send, 403, error_body(message, "permission_error", code="origin_not_allowed")
            )
            return
        cors = [] if origin is None else _cors_headers(self.access, origin)
        length = headers.get("content-length", "")
        max_body = self.max_body_bytes
        if length.isdigit() and int(length) > max_body:
            body = error_body(BodyTooLarge(max_body).detail, "invalid_request_error")
            await _refuse(scope, send, 413, body, cors)
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
            await _refuse(scope, send, 401, body, cors)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise BodyTooLarge(max_body)
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


def _cors_headers(access: AccessPolicy, origin: str) -> list[tuple[bytes, bytes]]:
    """What the CORS middleware would add for `origin` (the guard answers before it runs)."""
    if not access.any_origin and origin.strip().lower().rstrip("/") not in access.origins:
        return []  # same origin: no CORS headers needed
    allowed = b"*" if access.any_origin else origin.encode("latin-1")
    return [(b"access-control-allow-origin", allowed), (b"vary", b"Origin")]


async def _refuse(
    scope: Scope, send: Send, status: int, body: dict[str, Any], extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answer a refusal, and log it (rate-limited) with its reason."""
    REFUSALS.refused(status, scope["method"], scope["path"], body["error"]["message"])
    await _reply(send, status, body, extra)


async def _reply(
    send: Send, status: int, body: dict[str, Any], extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
