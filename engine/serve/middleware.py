"""The HTTP guard in front of every route (pure ASGI, so it also sees streamed responses end):

  - API key: when the server has one, /v1/* and /metrics need `Authorization: Bearer KEY`
    (what the openai client sends) or `X-API-Key: KEY`; else 401. / , /static and /health stay open.
  - body limit: a request body over max_body_bytes gets 413, by its Content-Length or, for a
    chunked body, as soon as the bytes read pass the limit. An over-limit Content-Length body is
    read and dropped first (up to DRAIN_MAX_BYTES), because a server that closes with unread
    bytes in its socket makes the kernel send a reset, and the client, still uploading, then sees
    "connection reset" instead of the 413. Bigger bodies, and clients that sent
    `Expect: 100-continue` (they wait for our answer before sending), get the 413 and a close.
  - metrics: requests by endpoint and status, and the server time of each.
  - access log: one JSON line per request on the `engine.serve.access` logger, written when
    the response (streamed ones included) has ended.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from starlette.exceptions import HTTPException

from .errors import ApiError

ACCESS_LOG = logging.getLogger("engine.serve.access")
DRAIN_MAX_BYTES = 64 << 20      # an over-limit body up to this size is read and dropped before the 413
KNOWN_ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/v1/caption", "/v1/answer", "/v1/ocr", "/v1/detect",
                   "/v1/segment", "/health", "/metrics", "/")


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body without Content-Length (chunked) passes the limit. An
    HTTPException, so that FastAPI's body parsing lets it through and the app answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return (f"the request body is over the server's limit of {limit / 2 ** 20:g} MiB; send a smaller image "
            "(downscale or recompress it), or start the server with a larger --max-body-mb")


def endpoint_of(path: str) -> str:
    """The metric label of a path: a known endpoint, /static, or "other" (bounded cardinality)."""
    if path in KNOWN_ENDPOINTS:
        return path
    return "/static" if path.startswith("/static/") else "other"


async def drain_body(receive, max_bytes: int) -> bool:
    """Read and drop the request body. True when it ended within max_bytes (the connection can
    answer cleanly and stay open), False when it was longer or the client went away."""
    dropped = 0
    while dropped <= max_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return False
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return dropped <= max_bytes
    return False


def needs_key(path: str) -> bool:
    return path.startswith("/v1/") or path == "/metrics"


class HttpGuard:
    def __init__(self, app, state):
        self.app = app
        self.state = state                    # app.ServerState

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = endpoint_of(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        scope["paligemma.log"] = log = {}
        status = {"code": 500, "started": False}
        metrics = self.state.metrics
        metrics.request_started()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            error = self._refuse(path, headers)
            if error is not None:
                close = False
                if error.status == 413:
                    waits = headers.get("expect", "").lower() == "100-continue"
                    close = waits or not await drain_body(receive, DRAIN_MAX_BYTES)
                await self._send_error(send_wrapper, error, close)
                return
            limit = self.state.config.max_body_bytes
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, receive_limited, send_wrapper)
            except BodyTooLarge:
                if not status["started"]:
                    drained = await drain_body(receive, DRAIN_MAX_BYTES)
                    await self._send_error(send_wrapper, self._too_large(limit), close=not drained)
        finally:
            seconds = time.perf_counter() - t0
            metrics.request_finished(endpoint, status["code"], seconds)
            self._log(scope, request_id, status["code"], seconds, headers, log)

    def _refuse(self, path: str, headers: dict) -> ApiError | None:
        cfg = self.state.config
        if cfg.api_key and needs_key(path):
            given = headers.get("x-api-key")
            auth = headers.get("authorization", "")
            if given is None and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if given is None or not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                what = "missing" if given is None else "wrong"
                return ApiError(401, f"{what} API key: send it as `Authorization: Bearer KEY` (or the X-API-Key "
                                     "header); the key is the server's --api-key (or $PALIGEMMA_API_KEY)",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, f"bad Content-Length header {length!r}")
            if int(length) > cfg.max_body_bytes:
                return self._too_large(cfg.max_body_bytes)
        return None

    @staticmethod
    def _too_large(limit: int) -> ApiError:
        return ApiError(413, too_large_message(limit), code="body_too_large")

    @staticmethod
    async def _send_error(send, error: ApiError, close: bool = False) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _log(scope, request_id: str, status: int, seconds: float, headers: dict, extra: dict) -> None:
        if not ACCESS_LOG.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        record = {"ts": round(time.time(), 3), "request_id": request_id, "method": scope.get("method"),
                  "path": scope.get("path"), "status": status, "ms": round(seconds * 1e3, 1),
                  "client": f"{client[0]}:{client[1]}" if client else None,
                  "user_agent": headers.get("user-agent")}
        record.update(extra)
        ACCESS_LOG.info(json.dumps(record, separators=(",", ":")))
