"""What a shop's operations need around the API: request ids and access logs (text or JSON lines),
Prometheus metrics, API keys, and a bound on uploads held in memory. `install` adds them to an app."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import sys
import time
import uuid

from fastapi import FastAPI, Response

from fashion_search.service.auth import ApiKeyAuth
from fashion_search.service.engine import SearchEngine
from fashion_search.service.limits import ServerLimits
from fashion_search.service.metrics import ServerMetrics

access_log = logging.getLogger("fashion_search.access")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# A client's own X-Request-ID is kept (tracing across a shop's services) when it is a plain token.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def install(app: FastAPI, engine: SearchEngine, limits: ServerLimits) -> ServerMetrics:
    """GET /metrics plus the middlewares, outermost first: observe -> API keys -> upload slots -> the
    app's own (rate limit, body limit, CORS). Call after the app's own middlewares are added."""
    metrics = ServerMetrics(engine)
    app.state.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(UploadSlots, slots=limits.max_uploads_in_memory)
    if limits.api_keys:
        app.add_middleware(ApiKeyAuth, keys=limits.api_keys)
    app.add_middleware(ObserveRequests, metrics=metrics)
    return metrics


class ObserveRequests:
    """ASGI middleware: a request id (X-Request-ID, in and out, and on every log record of the request),
    one access log line per request, and the request counted and timed in the metrics."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        seen = {"status": 500, "timing": ""}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = list(message.get("headers") or [])
                seen["timing"] = dict(headers).get(b"server-timing", b"").decode("latin-1")
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = _route_template(scope)
            self.metrics.observe(route, scope["method"], seen["status"], seconds, seen["timing"])
            client = (scope.get("client") or ("-", 0))[0]
            # The path only, never the query string or headers: API keys must not reach the logs.
            access_log.info(
                '%s "%s %s" %d %.1f ms',
                client,
                scope["method"],
                scope["path"],
                seen["status"],
                seconds * 1000.0,
                extra={
                    "client": client,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": seen["status"],
                    "duration_ms": round(seconds * 1000.0, 2),
                },
            )
            request_id.reset(token)


def _route_template(scope) -> str:
    """The matched route's template (/items/{item_id:path}/image), never the raw path: one time series
    per route, not one per item or per scanner's guess."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class UploadSlots:
    """ASGI middleware: at most `slots` large multipart requests (uploads) are read and searched at once.

    An upload is read into memory whole before it waits for the one model thread, so N concurrent 10 MB
    uploads held N x 10 MB plus their copies. Requests beyond the slots wait here before their body is
    read: their bytes stay in the client's socket, not in this process. Small forms (text queries)
    pass freely."""

    def __init__(self, app, slots: int, small: int = 64 * 1024):
        self.app, self.small = app, small
        self.slots = asyncio.Semaphore(slots)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not self._large_upload(scope):
            return await self.app(scope, receive, send)
        async with self.slots:
            await self.app(scope, receive, send)

    def _large_upload(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        if not headers.get(b"content-type", b"").startswith(b"multipart/"):
            return False
        length = headers.get(b"content-length")
        return length is None or not length.isdigit() or int(length) > self.small


class JsonLines(logging.Formatter):
    """One JSON object per record, with the request id, for log pipelines."""

    _EXTRA = ("client", "method", "path", "status", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id.get(),
        }
        entry.update({k: getattr(record, k) for k in self._EXTRA if hasattr(record, k)})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(log_format: str) -> None:
    """Root logging for `serve` (uvicorn's own loggers propagate to it): text or JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_WithRequestId())
    if log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
