"""Prometheus metrics of one API server (GET /metrics), fed by service/observe.py and the connection guard."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fashion_search.service.engine import SearchEngine

# The stages /search reports in its Server-Timing header (engine.search's `timings`).
STAGES = ("decode", "wait", "image", "text", "search")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A refusal is a 4xx the server chose to send (not a 404 for a missing item); by the status it answered.
REFUSAL_REASONS = {
    400: "bad_input",
    401: "unauthorized",
    408: "slow_body",
    413: "too_large",
    415: "bad_media_type",
    422: "invalid_form",
    429: "rate_limited",
    503: "overloaded",
}


class ServerMetrics:
    """One registry per app (not the process-wide default): tests and embedders may build several."""

    def __init__(self, engine: SearchEngine):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fashion_search_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "fashion_search_http_request_duration_seconds",
            "time from request start to response end, by route template",
            ["route"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.stages = Histogram(
            "fashion_search_search_stage_seconds",
            "time per /search stage (decode, wait for the model thread, image, text, search)",
            ["stage"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.refused = Counter(
            "fashion_search_refused_requests",
            "requests and connections refused, by reason",
            ["reason"],
            registry=registry,
        )
        queue = Gauge(
            "fashion_search_model_queue_length",
            "jobs waiting for the model thread behind the one running",
            registry=registry,
        )
        queue.set_function(engine.model_thread.pending)
        items = Gauge("fashion_search_index_items", "items in the live index", registry=registry)
        items.set_function(lambda: len(engine))
        version = Gauge(
            "fashion_search_index_version",
            "version number of the live index (0: unversioned)",
            registry=registry,
        )
        version.set_function(lambda: engine.version or 0)
        ident = engine.info()
        Info("fashion_search_model", "the model that embeds queries and the index", registry=registry).info(
            {
                key: str(ident.get(key) or "")
                for key in ("model", "pretrained", "fusion", "dim", "checkpoint_sha256", "index_kind")
            }
        )
        for reason in (*REFUSAL_REASONS.values(), "connections", "slow_headers", "malformed"):
            self.refused.labels(reason)  # present at 0 from the start: rate() needs a first sample

    def observe(self, route: str, method: str, status: int, seconds: float, server_timing: str) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status in REFUSAL_REASONS:
            self.refused.labels(REFUSAL_REASONS[status]).inc()
        for stage, ms in parse_server_timing(server_timing):
            if stage in STAGES:
                self.stages.labels(stage).observe(ms / 1000.0)

    def refuse(self, reason: str) -> None:
        """For refusals outside the app (the connection guard: cap, deadlines, malformed requests)."""
        self.refused.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def parse_server_timing(header: str) -> list[tuple[str, float]]:
    """`decode;dur=1.5, wait;dur=0.2` -> [("decode", 1.5), ("wait", 0.2)]; malformed parts skipped."""
    out = []
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            try:
                out.append((name, float(rest[4:])))
            except ValueError:
                continue
    return out
