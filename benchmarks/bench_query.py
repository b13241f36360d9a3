"""Query latency (warm engine and live HTTP API) against one image + one text forward at batch 1."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import statistics
import sys
import time

import common
import numpy as np

COLOURS = ["red", "navy", "black", "white", "green", "beige", "pink", "grey", "yellow", "striped"]
CHANGES = [
    "is shorter and sleeveless",
    "has long sleeves",
    "is a maxi dress with a belt",
    "has a v-neck and no pattern",
    "is looser and has a collar",
    "has buttons and a floral print",
    "is more formal",
    "has thin straps",
]


def query_texts(n: int) -> list[str]:
    """n distinct captions, so that no query hits the engine's text cache."""
    combos = list(itertools.product(COLOURS, CHANGES))
    texts = []
    for i in range(n):
        colour, change = combos[i % len(combos)]
        rounds = i // len(combos)  # past 80 texts, a suffix keeps them distinct
        texts.append(f"is {colour} and {change}" + (f", version {rounds}" if rounds else ""))
    return texts


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--items", type=int, default=10_000, help="random unit vectors in the index")
    p.add_argument("--index-type", default="auto", help="auto | exact | flat | hnsw | ivf")
    p.add_argument("--queries", type=int, default=30, help="composed queries, each with a new image and text")
    p.add_argument("--reweight-queries", type=int, default=200, help="cached queries varying weight and k")
    p.add_argument("--ceiling-repeat", type=int, default=20, help="timed batch-1 forwards per tower")
    p.add_argument("--search-repeat", type=int, default=200, help="timed index searches")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--min-px", type=int, default=400, help="smallest query image side")
    p.add_argument("--max-px", type=int, default=1000, help="largest query image side")
    p.add_argument("--device", default=None)
    p.add_argument("--no-http", action="store_true", help="skip the live-server measurements")
    p.add_argument(
        "--phases",
        choices=("alternating", "sequential"),
        default="alternating",
        help="alternating: engine query i, then HTTP query i, ... (both see the same machine drift); "
        "sequential: all engine queries, then all HTTP queries (sessions 1-4)",
    )
    p.add_argument(
        "--idle-gap",
        type=float,
        default=0.25,
        help="seconds of idleness before every ceiling sample and every query (0: back to back, as in "
        "sessions 1-4). A forward right after another runs faster than one after idleness "
        "(`diagnose_index.py idle`); a server's query always comes after idleness, so the ceiling must too",
    )
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the index under DIR")
    return p.parse_args()


class Ceiling:
    """One image forward on a ready (1, 3, S, S) tensor + one text forward on ready tokens, and one
    index search: timed alone, or one sample before each query so that both see the same machine load.
    """

    def __init__(self, model, text: str, index, k: int, seed: int, model_thread):
        self.device = model.device
        self.model_thread = model_thread  # the engine's: its forwards and these share one OpenMP pool
        queries = common.unit_vectors(64, model.dim, seed + 999_999)
        self._next_query = iter(range(10**12))
        image_forward, text_forward = model_thread.run(common.query_towers, model, text)
        self.image_forward = lambda: model_thread.run(image_forward)
        self.text_forward = lambda: model_thread.run(text_forward)
        self.search = lambda: model_thread.run(
            index.search, queries[next(self._next_query) % len(queries)][None], k
        )
        self.tokenize = lambda: model.backbone.tokenize([text])

    def sample(self) -> tuple[float, float]:
        """(seconds of image + text forward, seconds of one index search), timed on the model thread
        where the engine runs them (the hop to it is the engine's cost, not the ceiling's)."""

        def timed(fn) -> float:
            return common.timed_call(fn, self.device)

        def sample_all() -> tuple[float, float]:
            return timed(self.image_forward) + timed(self.text_forward), timed(self.search)

        return self.model_thread.run(sample_all)

    def standalone(self, repeat: int, search_repeat: int) -> dict:
        """Each part timed back to back, on the model thread like sample()."""

        def timed(fn, n: int, warmup: int) -> list[float]:
            return self.model_thread.run(common.time_calls, fn, n, warmup=warmup, device=self.device)

        image = timed(self.image_forward, repeat, 3)
        txt = timed(self.text_forward, repeat, 3)
        tok = timed(self.tokenize, repeat, 1)
        search = timed(self.search, search_repeat, 5)
        img_ms, txt_ms = common.latency_ms(image), common.latency_ms(txt)
        return {
            "p50_ms": round(img_ms["p50"] + txt_ms["p50"], 3),
            "image_forward_ms": img_ms,
            "text_forward_ms": txt_ms,
            "tokenize_ms": common.latency_ms(tok),
            "index_search_ms": common.latency_ms(search),
        }


def phase_summary(query_s: list[float], ceiling_s: list[float], search_s: list[float], factor: float) -> dict:
    """Latency of a phase against the ceiling and search time sampled between its own queries."""
    q, c, srch = common.latency_ms(query_s), common.latency_ms(ceiling_s), common.latency_ms(search_s)
    budget = factor * c["p50"] + srch["p50"]
    return {
        "latency_ms": q,
        "interleaved_ceiling_ms": c,
        "interleaved_search_ms": srch,
        "budget_ms": round(budget, 3),
        "ratio": common.ratio(q["p50"] - srch["p50"], c["p50"]),
        "met": q["p50"] <= budget,
    }


def phase_goal(name: str, phase: dict, factor: float, note: str) -> dict:
    c = phase["interleaved_ceiling_ms"]["p50"]
    return common.goal_row(
        name,
        phase["latency_ms"]["p50"],
        "ms",
        f"<= {factor} x ceiling + search = {phase['budget_ms']:.1f} ms",
        phase["met"],
        c,
        phase["ratio"],
        note + "ceiling and search sampled between the queries; ratio = (p50 - search p50) / ceiling",
    )


def decode_cost(engine, images: list[bytes]) -> dict:
    """ms to decode + preprocess one query upload (the engine's own path), outside any forward."""
    uploads = itertools.cycle(images)

    def decode():
        engine.query_pixels(next(uploads))
        common.sync_device(engine.model.device)

    return common.latency_ms(common.time_calls(decode, len(images), warmup=1))


def engine_query(engine, k: int):
    """One composed query through engine.search (an image and a text it has not seen)."""

    def run(img: bytes, txt: str) -> dict:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        engine.search(image=img, text=txt, k=k, timings=timings)
        return {"seconds": time.perf_counter() - t0, "stages": timings}

    return run


def summary(records: list[dict], factor: float) -> dict:
    """A phase against the ceiling and search sampled before each of its queries, and its stage medians."""
    cols = ([r[key] for r in records] for key in ("seconds", "ceiling", "search"))
    return {**phase_summary(*cols, factor), "stages_ms": stage_medians([r["stages"] for r in records])}


def run_queries(phases: dict, n: int, warmup: int, alternate: bool, ceil: Ceiling, gap: float) -> dict:
    """phases: name -> (run(img, txt) -> record, images, texts). Before every query: `gap` seconds of
    idleness, a ceiling sample, `gap` again (see --idle-gap). Sequential: each phase's n queries in turn;
    alternating: query i of every phase before query i + 1 of any, so that every phase sees the same
    drift of the machine's speed (this VM's drifts 5-10% over minutes). The first `warmup` of each phase
    are dropped."""
    out: dict[str, list[dict]] = {name: [] for name in phases}
    order = (
        [(i, name) for i in range(n) for name in phases]
        if alternate
        else [(i, name) for name in phases for i in range(n)]
    )
    for i, name in order:
        run, images, texts = phases[name]
        time.sleep(gap)
        c, srch = ceil.sample()
        time.sleep(gap)
        record = {**run(images[i], texts[i]), "ceiling": c, "search": srch}
        if i >= warmup:
            out[name].append(record)
    return out


def stage_medians(stages: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds of each engine stage (decode, wait, image, text, search) over the queries."""
    names = sorted({name for s in stages for name in s})
    return {name: round(statistics.median(s.get(name, 0.0) for s in stages), 3) for name in names}


def server_timing(header: str) -> dict[str, float]:
    """'decode;dur=3.10, image;dur=95.2, ...' -> {"decode": 3.1, "image": 95.2, ...}"""
    out = {}
    for item in filter(None, (part.strip() for part in header.split(","))):
        name, _, dur = item.partition(";dur=")
        out[name] = float(dur)
    return out


def reweight_settings(n: int) -> list[tuple[float, int]]:
    weights = [round(w, 2) for w in np.linspace(0.0, 1.0, 11)]
    ks = [1, 5, 10, 20, 50, 100]
    return list(itertools.islice(itertools.cycle(itertools.product(weights, ks)), n))


def http_query(client, k: int):
    """One POST /search (keep-alive) with a new image and text: the client's round trip, the server's
    took_ms and its Server-Timing split as the record's stages."""

    def run(img: bytes, txt: str) -> dict:
        t0 = time.perf_counter()
        r = client.post(
            "/search", files={"image": ("q.jpg", img, "image/jpeg")}, data={"text": txt, "k": str(k)}
        )
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        stages = server_timing(r.headers.get("server-timing", ""))
        return {"seconds": elapsed, "stages": stages, "took": r.json()["took_ms"]}

    return run


def http_reweight(base: str, image: bytes, text: str, settings: list[tuple[float, int]]) -> dict:
    import httpx

    rtt = []
    with httpx.Client(base_url=base, timeout=120.0) as client:
        files = {"image": ("q.jpg", image, "image/jpeg")}
        client.post("/search", files=files, data={"text": text}).raise_for_status()  # fill the caches
        for w, k in settings:
            t0 = time.perf_counter()
            r = client.post("/search", files=files, data={"text": text, "text_weight": str(w), "k": str(k)})
            rtt.append(time.perf_counter() - t0)
            r.raise_for_status()
    return common.latency_ms(rtt)


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    torch = common.import_torch(args.threads)

    from fashion_search.index.store import load_index_dir
    from fashion_search.models.checkpoint import create_model
    from fashion_search.service.engine import SearchEngine
    from fashion_search.service.model_thread import ModelThread

    work = common.work_dir(args.keep, "bench-query-")
    try:
        torch.manual_seed(0)
        # Built on the thread that will run every forward, as SearchEngine.open does (model_thread.py).
        model_thread = ModelThread()
        model = model_thread.run(create_model, args.model, args.pretrained, device=args.device)
        device = model.device
        index_dir = work / "index"
        if index_dir.exists():
            shutil.rmtree(index_dir)
        common.log(f"writing an index of {args.items} random vectors to {index_dir}")
        # FAISS's build is OpenMP-parallel in PyTorch's runtime: on the main thread it would start a
        # second pool and slow every later forward (service/model_thread.py).
        built = model_thread.run(
            common.write_vector_index, index_dir, model, args.items, args.index_type, args.seed
        )
        index, manifest = load_index_dir(index_dir)
        engine = SearchEngine(model, index, manifest, index_dir, model_thread)

        warmup = 2
        n_img = args.queries + warmup
        rng = np.random.default_rng(args.seed)
        common.log(f"making {2 * n_img} query JPEGs of {args.min_px}-{args.max_px} px")
        images = [common.jpeg_bytes(rng, args.min_px, args.max_px) for _ in range(2 * n_img)]
        texts = query_texts(2 * n_img)
        engine_imgs, http_imgs = images[:n_img], images[n_img:]
        engine_txts, http_txts = texts[:n_img], texts[n_img:]

        common.log("ceiling: batch-1 image and text forwards, index search")
        ceil = Ceiling(model, texts[0], engine.index, args.k, args.seed, model_thread)
        standalone = ceil.standalone(args.ceiling_repeat, args.search_repeat)
        decode = decode_cost(engine, images[: min(10, len(images))])

        server, base, ready_s = None, None, None
        if not args.no_http:
            port = common.free_port()
            base = f"http://127.0.0.1:{port}"
            common.log(f"starting fashion-search serve on {base}")
            server = common.start_server(index_dir, port, args.device)
        stack = contextlib.ExitStack()
        try:
            phases = {"engine": (engine_query(engine, args.k), engine_imgs, engine_txts)}
            if server is not None:
                import httpx

                ready_s = common.wait_healthy(server, base)
                client = stack.enter_context(httpx.Client(base_url=base, timeout=120.0))
                phases["http"] = (http_query(client, args.k), http_imgs, http_txts)
            alternate = args.phases == "alternating"
            common.log(f"{args.queries} composed queries per phase ({', '.join(phases)}; {args.phases})")
            records = run_queries(phases, n_img, warmup, alternate, ceil, args.idle_gap)
            composed = summary(records["engine"], 1.15)

            settings = reweight_settings(args.reweight_queries)
            engine.search(image=images[0], text=texts[0], k=args.k)  # fills both caches
            next_setting = iter(settings)

            def reweigh():
                w, k = next(next_setting)
                engine.search(image=images[0], text=texts[0], text_weight=w, k=k)

            reweight_ms = common.latency_ms(common.time_calls(reweigh, len(settings) - 1, warmup=1))
            goals = [phase_goal("composed query p50, engine (new image + text)", composed, 1.15, "")]
            goals.append(
                common.goal_row(
                    "re-weight / k only p50, engine (cached embeddings)",
                    reweight_ms["p50"],
                    "ms",
                    "<= 10 ms at 100k items",
                    reweight_ms["p50"] <= 10.0 if args.items >= 100_000 else None,
                    note=f"{args.items:,} items, {built['kind']} index"
                    + ("" if args.items >= 100_000 else "; the goal applies at 100k"),
                )
            )
            results = {
                "model": args.model,
                "device": str(device),
                "items": args.items,
                "index": built,
                "k": args.k,
                "phases": args.phases,
                "idle_gap_s": args.idle_gap,
                "ceiling": standalone,
                "query_decode_preprocess_ms": decode,
                "engine_composed": composed,
                "engine_reweight_ms": reweight_ms,
            }
            if server is not None:
                http = summary(records["http"], 1.25)
                # The server's own split (Server-Timing): compare with engine_composed.stages_ms.
                http["server_stages_ms"] = http.pop("stages_ms")
                http["server_took_ms"] = common.latency_ms([r["took"] / 1000.0 for r in records["http"]])
                http["reweight_round_trip_ms"] = http_reweight(
                    base, images[1], texts[1], settings[: max(20, len(settings) // 4)]
                )
                http.update(
                    startup_to_healthy_s=round(ready_s, 3),
                    server_memory={
                        "vmhwm_mb": common.vm_hwm_mb(server.proc.pid),
                        "pss_mb": common.pss_mb(server.proc.pid),
                    },
                )
                results["http"] = http
                goals.append(
                    phase_goal(
                        "composed query p50, HTTP (live uvicorn, new image + text)",
                        http,
                        1.25,
                        "client round trip over keep-alive; ",
                    )
                )
        finally:
            stack.close()
            if server is not None:
                server.stop()
        common.emit("query", args, load0, {"results": results, "goals": goals})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
