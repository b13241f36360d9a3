"""HTTP API over one SearchEngine: /health, /info, POST /search (multipart) and /items/{id}/image."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import mimetypes
import threading
import time
from collections import OrderedDict
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from fashion_search.errors import FashionSearchError
from fashion_search.service.engine import MAX_K, SearchEngine
from fashion_search.service.limits import ServerLimits
from fashion_search.service.observe import install as install_operations

log = logging.getLogger("fashion_search.api")

# Room in the request body for the text fields and multipart framing around the image itself.
_FORM_OVERHEAD = 64 * 1024


class SearchHit(BaseModel):
    id: str
    score: float
    image_url: str
    product_id: str | None = None
    metadata: dict = {}


class SearchResponse(BaseModel):
    results: list[SearchHit]
    took_ms: float


class Health(BaseModel):
    status: str
    items: int


def _json_error(status: int, detail, extra: list[tuple[bytes, bytes]] = ()) -> dict:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += list(extra)
    return {"start": {"type": "http.response.start", "status": status, "headers": headers}, "body": body}


async def _send_json_error(send, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    reply = _json_error(status, detail, extra)
    await send(reply["start"])
    await send({"type": "http.response.body", "body": reply["body"]})


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes before they are parsed or spooled.

    The Content-Length header is checked first (cheap, honest clients), then bytes are counted as
    they arrive, because the header may be absent (chunked) and nothing else in the stack stops a
    multi-gigabyte upload from being written to a temporary file.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                return await _send_json_error(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_json_error(send, 413, self._message())
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPExceptions from body parsing, so this becomes a JSON 413.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body too large (limit {self.limit - _FORM_OVERHEAD:,} bytes for the image)"


class RateLimit:
    """ASGI middleware: a token bucket per client address; over the limit a JSON 429 with Retry-After.

    Keyed on the ASGI client address: the socket peer, or the address a trusted proxy forwarded (uvicorn
    honours X-Forwarded-For only from --forwarded-allow-ips, by default 127.0.0.1, i.e. a proxy on this
    host). At most `max_clients` buckets are kept, the least recently seen dropped first, so a scan from
    many addresses cannot grow memory without bound. Runs on the event loop: no lock needed.
    """

    def __init__(self, app, rate: float, burst: int, max_clients: int = 10_000, clock=time.monotonic):
        self.app, self.rate, self.burst, self.max_clients, self.clock = app, rate, burst, max_clients, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        now = self.clock()
        tokens, last = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        if not allowed:
            retry = max(1, math.ceil((1.0 - tokens) / self.rate))
            detail = f"too many requests: at most {self.rate:g} per second per client; retry later"
            return await _send_json_error(send, 429, detail, [(b"retry-after", str(retry).encode())])
        await self.app(scope, receive, send)


def _watch_index(engine: SearchEngine, interval: float, stop: threading.Event) -> None:
    """Poll the index's CURRENT and swap in a rebuilt version; searches never wait for the load."""
    while not stop.wait(interval):
        try:
            engine.maybe_reload(min_interval=0.0)
        except Exception:  # a bug here must not end the watching, only be seen
            log.exception("index reload check failed")


def _public(message: str, engine: SearchEngine) -> str:
    """An error message without server paths: the catalog and index folders are nobody's business."""
    for secret in {str(engine.catalog_root.resolve()), str(engine.catalog_root), str(engine.index_dir or "")}:
        if len(secret) > 1:
            message = message.replace(secret, "<catalog>")
    return message


def _install_error_handlers(app: FastAPI, engine: SearchEngine) -> None:
    @app.exception_handler(FashionSearchError)
    async def user_error(request: Request, exc: FashionSearchError) -> JSONResponse:
        # ImageDecodeError (not an image, truncated, too many pixels) is the client's bad input too.
        return JSONResponse({"detail": _public(str(exc), engine)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input back (up to 10 kB of text); loc + msg suffice.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


def create_app(engine: SearchEngine, limits: ServerLimits | None = None, **changes) -> FastAPI:
    """The API over an opened engine; every tensor operation and index search runs on its model thread.

    `limits` (default ServerLimits()), with any of its fields changed by keyword (`rate_limit=5`).
    """
    limits = dataclasses.replace(limits or ServerLimits(), **changes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        watcher = None
        if limits.reload_interval > 0 and engine.index_dir is not None:
            watcher = threading.Thread(
                target=_watch_index,
                args=(engine, limits.reload_interval, stop),
                name="index-reload",
                daemon=True,
            )
            watcher.start()
        try:
            yield
        finally:
            stop.set()
            if watcher is not None:
                watcher.join(timeout=10)  # a load in progress finishes; a daemon thread never blocks exit

    app = FastAPI(
        title="fashion-search",
        summary="Composed image retrieval for fashion: a reference photo plus a change in words.",
        version="1",
        lifespan=lifespan,
    )
    app.state.engine = engine
    engine.max_decode_bytes = limits.max_decode_bytes  # one server per engine: its budget for uploads
    _install_error_handlers(app, engine)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        # On the event loop: a load balancer's probe needs no thread, and len() only reads a snapshot.
        return Health(status="ok", items=len(engine))

    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:  # what load balancers probe with
        return Response(status_code=200)

    @app.get("/info")
    def info() -> dict:
        # The catalog's location on the server is nobody's business but the operator's.
        return {key: value for key, value in engine.info().items() if key != "catalog_root"}

    @app.post("/search", response_model=SearchResponse)
    async def search(
        request: Request,
        response: Response,
        image: Annotated[UploadFile | None, File(description="reference garment photo")] = None,
        text: Annotated[str | None, Form(description="the change, in words")] = None,
        text_weight: Annotated[
            float | None, Form(ge=0.0, le=1.0, description="0 = image only, 1 = text only")
        ] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        category: Annotated[str | None, Form(description="top-level catalog folder")] = None,
        where: Annotated[
            str | None,
            Form(description="attribute filter, Milvus expression syntax: price < 50 and in_stock == true"),
        ] = None,
        group: Annotated[
            bool, Form(description="one result per product (when the catalog has products)")
        ] = True,
    ) -> SearchResponse:
        content_type = request.headers.get("content-type", "")
        if content_type and not content_type.startswith(
            ("multipart/form-data", "application/x-www-form-urlencoded")
        ):
            raise HTTPException(
                415,
                "send the query as multipart/form-data: image, text, text_weight, k, category, where, group",
            )
        for name, value in (("text", text), ("where", where)):
            if value is not None and len(value) > limits.max_text_chars:
                # Checked here, not by Form(max_length=...): the limit is per app, annotations per module.
                raise HTTPException(422, f"{name} is longer than {limits.max_text_chars:,} characters")
        data = await _read_upload(image, limits.max_upload_bytes)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        # Async, and the whole query one job on the engine's model thread: the loop awaits it without
        # a pool thread in between (engine.search_future). The API's stricter pixel limit applies.
        results = await asyncio.wrap_future(
            engine.search_future(
                image=data,
                text=text or None,
                text_weight=text_weight,
                k=k,
                category=category or None,
                timings=timings,
                max_pixels=limits.max_pixels,
                where=where or None,
                group=group,
            )
        )
        took = (time.perf_counter() - started) * 1000.0
        # W3C Server-Timing: browsers' dev tools and clients see where the time went (stages not run,
        # e.g. an image embedding served from the cache, are absent).
        response.headers["Server-Timing"] = ", ".join(
            [f"{stage};dur={ms:.2f}" for stage, ms in timings.items()] + [f"total;dur={took:.2f}"]
        )
        hits = [
            SearchHit(
                id=r.id,
                score=r.score,
                image_url=f"/items/{quote(r.id)}/image",
                product_id=r.product_id,
                metadata=r.metadata,
            )
            for r in results
        ]
        return SearchResponse(results=hits, took_ms=round(took, 3))

    @app.get("/items/{item_id:path}/image", response_class=FileResponse)
    def item_image(item_id: str, request: Request) -> FileResponse:
        # Canonical URLs (quote(id)) never encode "/"; an encoded slash is someone probing for traversal.
        raw = request.scope.get("raw_path", b"").lower()
        if b"%2f" in raw or ".." in item_id.split("/") or "\x00" in item_id:
            raise HTTPException(404, "item not found")
        try:
            path = engine.item_path(item_id)
        except FashionSearchError:
            raise HTTPException(404, "item not found") from None
        if not path.is_file():
            raise HTTPException(404, "item image is no longer in the catalog")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})

    if limits.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(limits.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes + _FORM_OVERHEAD)
    if limits.rate_limit > 0:  # added last, so outermost: a flood is refused before any body is read
        rate = limits.rate_limit
        burst = limits.rate_burst if limits.rate_burst is not None else max(1, math.ceil(2 * rate))
        app.add_middleware(RateLimit, rate=rate, burst=burst)
    install_operations(app, engine, limits)  # /metrics, request ids and logs, API keys, upload slots
    return app


async def _read_upload(image: UploadFile | None, limit: int) -> bytes | None:
    """The uploaded bytes, at most `limit` of them; None when the form's file field was left empty."""
    if image is None:
        return None
    data = await image.read(limit + 1)  # from memory; a part spooled to disk is read in a thread
    if len(data) > limit:
        raise HTTPException(413, f"image too large (limit {limit:,} bytes)")
    if not data and not image.filename:
        return None  # browsers send an empty, unnamed part for a file input nobody used
    if not data:
        raise HTTPException(400, "uploaded image is empty")
    return data


def serve(
    index_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
    export_dir: str | None = None,
) -> int:
    """`fashion-search serve`: open the engine once, then run uvicorn until SIGINT/SIGTERM.

    On a signal uvicorn stops accepting connections, lets requests in flight finish (at most
    limits.graceful_timeout seconds), then stops the index watcher.
    """
    import uvicorn

    from fashion_search.service.connections import guarded_protocol
    from fashion_search.service.observe import configure_logging

    limits = limits or ServerLimits()
    engine = SearchEngine.open(
        index_dir,
        checkpoint=checkpoint,
        device=device,
        runtime=runtime,
        precision=precision,
        export_dir=export_dir,
    )
    app = create_app(engine, limits)
    configure_logging(limits.log_format)
    keys = f"; {len(limits.api_keys)} API key(s) required" if limits.api_keys else ""
    print(
        f"fashion-search API on http://{host}:{port} ({len(engine)} items; docs at /docs{keys})", flush=True
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits, app.state.metrics.refuse),
        log_config=None,  # configure_logging's handler; the access log is observe.py's, with request ids
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=limits.graceful_timeout,
    )
    return 0
