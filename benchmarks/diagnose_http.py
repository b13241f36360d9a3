"""What HTTP itself adds to a query (JSON on stdout): `fashion-search serve` against its own took_ms.

A server's query costs the engine's work (`took_ms` in the response: decode, forwards, search) plus
everything around it: the client sending the multipart body, uvicorn parsing the request, FastAPI
parsing the form and validating the fields, the hand-offs between the event loop and the threads that
run the engine, serialising the response, and the client reading it. On a 150 ms CPU forward that is
noise; on a GPU, whose batch-1 forwards take a few ms, it is a large share of the latency
(docs/BENCHMARKS.md section 2). This script measures it with a compact model (`fs-micro` by default),
so that the forwards do not swamp it:

  health     GET /health: the request/response floor of the stack (no body, no engine)
  cached     POST /search with the same image and text every time: both embeddings come from the
             engine's caches, so took_ms is a hash, a fusion and an index search
  composed   POST /search with a new image and text every time (decode + both forwards)

each through two clients: `raw` (http.client on a kept-alive connection, the multipart body built
before the clock starts: what the server and the socket cost) and `httpx` (a typical Python client,
encoding the form itself). Every request comes after --gap seconds of idleness (a server's requests
arrive at an idle process; 0 = back to back). Reported per case: the client's round trip and
`overhead_ms`, the median over requests of (round trip - the server's took_ms).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="fs-micro")
    p.add_argument("--items", type=int, default=10_000, help="random unit vectors in the index")
    p.add_argument("--requests", type=int, default=60, help="timed requests per case and client")
    p.add_argument("--gaps", default="0,0.25", help="seconds of idleness before each request, per pass")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--min-px", type=int, default=400, help="smallest query image side")
    p.add_argument("--max-px", type=int, default=1000, help="largest query image side")
    p.add_argument("--device", default=None, help="the server's --device (default: the best available)")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the index under DIR")
    return p.parse_args()


def multipart(image: bytes, text: str, k: int) -> tuple[bytes, str]:
    """The form a browser sends (image, text, k) as one body, and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
    parts = [
        head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{text}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'.encode(),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class RawClient:
    """http.client on one kept-alive connection: nothing between the clock and the socket."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> float:
        t0 = time.perf_counter()
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        response.read()
        return time.perf_counter() - t0

    def search(self, image: bytes, text: str, k: int) -> tuple[float, float]:
        body, content_type = multipart(image, text, k)
        t0 = time.perf_counter()
        self.conn.request("POST", "/search", body=body, headers={"Content-Type": content_type})
        response = self.conn.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - t0
        if response.status != 200:
            raise SystemExit(f"POST /search answered {response.status}: {data[:300]!r}")
        return elapsed, json.loads(data)["took_ms"] / 1000.0

    def close(self) -> None:
        self.conn.close()


class HttpxClient:
    """httpx.Client (keep-alive), encoding the multipart form itself inside the timed call."""

    def __init__(self, port: int):
        import httpx

        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0)

    def get(self, path: str) -> float:
        t0 = time.perf_counter()
        self.client.get(path)
        return time.perf_counter() - t0

    def search(self, image: bytes, text: str, k: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        r = self.client.post(
            "/search", files={"image": ("q.jpg", image, "image/jpeg")}, data={"text": text, "k": str(k)}
        )
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        return elapsed, r.json()["took_ms"] / 1000.0

    def close(self) -> None:
        self.client.close()


def run_case(client, case: str, n: int, gap: float, image_stream, k: int) -> dict:
    round_trips, overheads = [], []
    for _ in range(n + 2):  # the first two warm the connection and the caches
        image, text = next(image_stream)
        time.sleep(gap)
        if case == "health":
            round_trips.append(client.get("/health"))
            continue
        rtt, took = client.search(image, text, k)
        round_trips.append(rtt)
        overheads.append(rtt - took)
    out = {"round_trip_ms": common.latency_ms(round_trips[2:])}
    if overheads:
        out["overhead_ms"] = round(statistics.median(overheads[2:]) * 1000.0, 3)
    return out


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    common.import_torch(args.threads)
    from fashion_search.models.checkpoint import create_model

    work = common.work_dir(args.keep, "diagnose-http-")
    server = None
    try:
        model = create_model(args.model, "none", device="cpu")
        index_dir = work / "index"
        if index_dir.exists():
            shutil.rmtree(index_dir)
        common.log(f"writing an index of {args.items} random vectors")
        built = common.write_vector_index(index_dir, model, args.items, "auto", args.seed)
        del model
        rng = np.random.default_rng(args.seed)
        gaps = [float(g) for g in args.gaps.split(",") if g.strip()]
        n_new = (args.requests + 2) * len(gaps) * 2
        common.log(f"making {n_new} query JPEGs of {args.min_px}-{args.max_px} px")
        images = [common.jpeg_bytes(rng, args.min_px, args.max_px) for _ in range(n_new)]
        fresh = iter((img, f"is red and sleeveless, variant {i}") for i, img in enumerate(images))
        same = itertools.repeat((images[0], "is red and sleeveless"))

        port = common.free_port()
        server = common.start_server(index_dir, port, args.device)
        ready_s = common.wait_healthy(server, f"http://127.0.0.1:{port}")
        common.log(f"server healthy after {ready_s:.1f}s; {args.requests} requests per case")
        cases: dict[str, dict] = {}
        for gap in gaps:
            for name, make in (("raw", RawClient), ("httpx", HttpxClient)):
                client = make(port)
                try:
                    for case, stream in (("health", same), ("cached", same), ("composed", fresh)):
                        key = f"{name}/{case}/gap={gap:g}"
                        cases[key] = run_case(client, case, args.requests, gap, stream, args.k)
                        common.log(f"{key}: {json.dumps(cases[key]['round_trip_ms']['p50'])} ms p50")
                finally:
                    client.close()
        results = {
            "model": args.model,
            "device": args.device or "auto",
            "items": args.items,
            "index": built,
            "query_jpeg_kb_mean": round(sum(map(len, images)) / len(images) / 1024, 1),
            "server_startup_to_healthy_s": round(ready_s, 2),
            "cases": cases,
        }
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    common.emit("diagnose_http", args, load0, {"results": results})


if __name__ == "__main__":
    main()
