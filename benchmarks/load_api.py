"""Bounded load test of the HTTP API on 127.0.0.1: mixed valid and malformed requests, latency as JSON.

    .venv/bin/python benchmarks/load_api.py --clients 16 --requests 500 --json benchmarks/load_api.json
    .venv/bin/python benchmarks/load_api.py --clients 12 --duration 300 --json soak.json   # a soak

Without --url it builds a small catalog index (random-weight fs-micro unless --model says otherwise) with
a metadata CSV (product_id, brand, price, in_stock), starts `fashion-search serve` on a free port, runs
the load, and stops the server with SIGTERM. Each client is a thread with its own keep-alive connection
sending --requests requests, or requests until --duration seconds have passed: composed (image + text),
text only, image only, filtered (one of those with a random `where` and `group`; only when the index has
the brand, price and in_stock attributes), and a --malformed share of bad ones (HTML as an image,
truncated JPEG, decompression bomb, k=0, weight 2, empty form, over-long text, JSON body, bad filters).
Valid requests must all answer 200 and malformed ones 4xx; the exit status is 1 when any did not.

With --duration, --warmup seconds of the same traffic run first and are not counted; the server's RSS
(VmRSS of the process this script started) is sampled every --rss-interval seconds of the measured
phase and reported as start, end, max and a least-squares slope in MB/min.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import common
import httpx
import numpy as np
from PIL import Image

TEXTS = ["is darker", "same but in navy", "shorter and sleeveless", "has stripes", "a red dress", "is longer"]
KINDS = ("composed", "text", "image", "filtered")
KIND_WEIGHTS = (4, 3, 2, 3)
BRANDS = ("Acme", "Zed", "Nord", "Lumen", "Orla")
# `where` templates of the filtered requests: {p} a price, {b}/{c} brands, {s} true or false.
WHERE_TEMPLATES = (
    "price < {p}",
    "price >= {p} and in_stock == {s}",
    "brand in ['{b}', '{c}']",
    "brand == '{b}' or price < {p}",
    "in_stock and not brand in ['{b}']",
    "{p} < price <= {q} and brand != '{c}'",
)


def _jpeg(colour, size=(96, 128), seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, dtype=np.float32) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _bomb_png(side: int = 60_000) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def build_catalog_index(base: Path, items: int, model: str, pretrained: str) -> Path:
    """A catalog of `items` noisy colour JPEGs in two categories, indexed into base/index with a metadata
    CSV: three photos per product_id, a brand, a price and in_stock."""
    from fashion_search.index.build import build_index
    from fashion_search.models.checkpoint import create_model

    rng = random.Random(0)
    rows = ["image,product_id,brand,price,in_stock"]
    for i in range(items):
        rel = f"{('dress', 'shirt')[i % 2]}/item{i:04d}.jpg"
        path = base / "catalog" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg((rng.randrange(256), rng.randrange(256), rng.randrange(256)), seed=i))
        product = i // 3
        price = 10 + (product * 37) % 190
        in_stock = "true" if rng.random() < 0.7 else "false"
        rows.append(f"{rel},p{product:04d},{BRANDS[product % len(BRANDS)]},{price}.99,{in_stock}")
    (base / "products.csv").write_text("\n".join(rows) + "\n")
    encoder = create_model(model, pretrained, fusion="sum", device="cpu")
    source = {"model": model, "pretrained": pretrained, "fusion": "sum", "checkpoint": None}
    build_index(
        base / "catalog",
        base / "index",
        encoder,
        source,
        workers=0,
        progress=False,
        metadata=base / "products.csv",
    )
    return base / "index"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fashion_search.cli", "serve", "--index", str(index), "--port", str(port)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                raise SystemExit(
                    f"server did not start:\n{log.read().decode(errors='replace')[-2000:]}"
                ) from None
            time.sleep(0.2)


def malformed_requests() -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) of bad requests every public API meets; each must get a 4xx."""
    photo = _jpeg((200, 40, 40))
    return [
        ("html_as_image", {"files": {"image": ("a.jpg", b"<html>404</html>", "image/jpeg")}}),
        ("truncated_jpeg", {"files": {"image": ("a.jpg", photo[: len(photo) // 2], "image/jpeg")}}),
        ("bomb_png", {"files": {"image": ("a.png", _bomb_png(), "image/png")}}),
        ("k_zero", {"data": {"text": "red", "k": "0"}}),
        ("weight_two", {"data": {"text": "red", "text_weight": "2"}}),
        ("empty_form", {"data": {}}),
        ("long_text", {"data": {"text": "x" * 10_001}}),
        ("json_body", {"json": {"text": "red"}}),
        ("where_syntax", {"data": {"text": "red", "where": "price <"}}),
        ("where_unknown_attribute", {"data": {"text": "red", "where": "colour == 'red'"}}),
        ("where_wrong_type", {"data": {"text": "red", "where": "price == 'cheap'"}}),
        ("where_call", {"data": {"text": "red", "where": "__import__('os').getpid() > 0"}}),
        ("where_c_syntax", {"data": {"text": "red", "where": "price < 50 && in_stock"}}),
    ]


def _where(rng: random.Random) -> str:
    b, c = rng.sample(BRANDS, 2)
    p = rng.randrange(10, 180)
    return rng.choice(WHERE_TEMPLATES).format(
        p=p, q=p + rng.randrange(10, 100), b=b, c=c, s=rng.choice(["true", "false"])
    )


def _valid_request(kind: str, rng: random.Random, catalog_photos: list[bytes]) -> dict:
    # Half the query photos are catalog files (the engine's embedding cache hits), half are new ones.
    if rng.random() < 0.5 and catalog_photos:
        photo = rng.choice(catalog_photos)
    else:
        photo = _jpeg(
            (rng.randrange(256), rng.randrange(256), rng.randrange(256)), seed=rng.randrange(1 << 30)
        )
    text = f"{rng.choice(TEXTS)} {rng.randrange(1000)}"
    k = str(rng.choice([5, 10, 50]))
    if kind == "composed":
        data = {"text": text, "text_weight": f"{rng.random():.2f}", "k": k}
        return {"files": {"image": ("q.jpg", photo, "image/jpeg")}, "data": data}
    if kind == "text":
        return {"data": {"text": text, "k": k}}
    if kind == "image":
        return {"files": {"image": ("q.jpg", photo, "image/jpeg")}, "data": {"k": k}}
    # filtered: one of the other three with a `where`, grouped by product or not
    request = _valid_request(rng.choice(KINDS[:3]), rng, catalog_photos)
    request["data"].update(where=_where(rng), group=rng.choice(["true", "false"]))
    return request


def run_load(
    base_url: str,
    clients: int,
    requests: int,
    malformed: float,
    seed: int,
    photos: list[bytes],
    duration: float | None = None,
    filters: bool = True,
):
    """Each client sends `requests` requests, or, with `duration`, requests until that many seconds have
    passed (a request under way when the time is up finishes and counts)."""
    records: list[tuple[str, str, object, float]] = []  # (kind, name, status or error, seconds)
    lock = threading.Lock()
    bad = malformed_requests()
    if not filters:
        bad = [(name, kwargs) for name, kwargs in bad if not name.startswith("where_")]
    weights = KIND_WEIGHTS if filters else (*KIND_WEIGHTS[:3], 0)
    deadline = None if duration is None else time.monotonic() + duration

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        local = []
        with httpx.Client(base_url=base_url, timeout=60) as http:
            sent = 0
            while (time.monotonic() < deadline) if deadline is not None else (sent < requests):
                sent += 1
                if rng.random() < malformed:
                    kind, (name, kwargs) = "malformed", rng.choice(bad)
                else:
                    kind = rng.choices(KINDS, weights=weights)[0]
                    name, kwargs = kind, _valid_request(kind, rng, photos)
                started = time.perf_counter()
                try:
                    outcome: object = http.post("/search", **kwargs).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                local.append((kind, name, outcome, time.perf_counter() - started))
        with lock:
            records.extend(local)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - started


class RssSampler:
    """VmRSS of one process every `interval` seconds, in a thread: (seconds since start, MB) rows."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval, self.rows = pid, interval, []
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        kb = common.status_kb(self.pid, "VmRSS")
        if kb is not None:
            self.rows.append([round(time.monotonic() - self._started, 1), round(kb / 1024.0, 1)])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._started = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()  # the end, once the load has stopped

    def report(self) -> dict:
        if not self.rows:
            return {"pid_sampled": self.pid, "samples": 0}
        t = np.array([r[0] for r in self.rows])
        mb = np.array([r[1] for r in self.rows])
        slope = float(np.polyfit(t / 60.0, mb, 1)[0]) if len(self.rows) >= 3 and np.ptp(t) > 0 else None
        return {
            "interval_s": self.interval,
            "samples": len(self.rows),
            "start_mb": float(mb[0]),
            "end_mb": float(mb[-1]),
            "max_mb": float(mb.max()),
            "min_mb": float(mb.min()),
            "slope_mb_per_min": None if slope is None else round(slope, 3),
            "timeline": {"columns": ["seconds", "rss_mb"], "rows": self.rows},
        }


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.array(seconds) * 1000.0
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def summarize(records, wall: float) -> dict:
    by_kind: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    valid_failures, malformed_5xx, transport = Counter(), Counter(), Counter()
    for kind, name, outcome, seconds in records:
        by_kind[kind].append(seconds)
        statuses[name][str(outcome)] += 1
        if not isinstance(outcome, int):
            transport[name] += 1
        elif kind != "malformed" and outcome != 200:
            valid_failures[name] += 1
        elif kind == "malformed" and not 400 <= outcome < 500:
            malformed_5xx[name] += 1
    valid = [s for kind, _, _, s in records if kind != "malformed"]
    return {
        "requests": len(records),
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(records) / wall, 2) if wall else None,
        "latency": {"valid": _percentiles(valid), **{k: _percentiles(v) for k, v in sorted(by_kind.items())}},
        "statuses": {name: dict(c) for name, c in sorted(statuses.items())},
        "errors": {
            "valid_not_200": sum(valid_failures.values()),
            "malformed_not_4xx": sum(malformed_5xx.values()),
            "transport": sum(transport.values()),
            "detail": {**valid_failures, **malformed_5xx, **transport},
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running server (default: start one on 127.0.0.1)")
    p.add_argument("--index", help="serve this index (default: build a small one in a temp folder)")
    p.add_argument("--items", type=int, default=500, help="catalog size of the built index")
    p.add_argument("--model", default="fs-micro")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=500, help="requests per client (without --duration)")
    p.add_argument("--duration", type=float, help="send requests for this many seconds instead")
    p.add_argument("--warmup", type=float, default=10.0, help="uncounted seconds first (with --duration)")
    p.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--malformed", type=float, default=0.1, help="share of malformed requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    if args.duration is not None and not 0 < args.duration <= 24 * 3600:
        p.error("--duration must be between 0 and 86400 seconds")

    machine = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="fs-load-") as tmp:
        proc = None
        index = Path(args.index) if args.index else None
        if args.url:
            base_url = args.url.rstrip("/")
        else:
            if index is None:
                index = build_catalog_index(Path(tmp), args.items, args.model, args.pretrained)
            port = _free_port()
            proc = start_server(index, port)
            base_url = f"http://127.0.0.1:{port}"
        try:
            info = httpx.get(base_url + "/info", timeout=10).json()
            filters = {"brand", "price", "in_stock"} <= set(info.get("attributes") or {})
            catalog = Path(tmp) / "catalog"
            photos = (
                [path.read_bytes() for path in sorted(catalog.rglob("*.jpg"))[:50]]
                if catalog.is_dir()
                else []
            )
            load = {"photos": photos, "filters": filters}
            warmup = None
            if args.duration is not None and args.warmup > 0:
                records, wall = run_load(
                    base_url, args.clients, 0, args.malformed, args.seed + 1, duration=args.warmup, **load
                )
                warmup = {"requests": len(records), "wall_s": round(wall, 3)}
                warmup["errors"] = summarize(records, wall)["errors"]
            load_before = os.getloadavg()
            sampler = RssSampler(proc.pid, args.rss_interval) if proc is not None else None
            with sampler or contextlib.nullcontext():
                records, wall = run_load(
                    base_url,
                    args.clients,
                    args.requests,
                    args.malformed,
                    args.seed,
                    duration=args.duration,
                    **load,
                )
            load_after = os.getloadavg()
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    config = ("clients", "requests", "duration", "warmup", "malformed", "seed", "items")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "loadavg_1min": {"start": round(load_before[0], 2), "end": round(load_after[0], 2)},
        "busy": common.busy_note(load_before, machine.get("cpus_usable")),
        "config": {
            **{k: getattr(args, k) for k in config},
            **({"requests": None} if args.duration is not None else {"duration": None, "warmup": None}),
        },
        "server": {k: info.get(k) for k in ("items", "model", "pretrained", "index_kind", "products")},
        "filtered_requests": filters,
        "warmup": warmup,
        **summarize(records, wall),
        "server_rss": sampler.report() if sampler is not None else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    checked = [result["errors"], *([warmup["errors"]] if warmup else [])]
    return 1 if any(e["valid_not_200"] or e["malformed_not_4xx"] or e["transport"] for e in checked) else 0


if __name__ == "__main__":
    sys.exit(main())
