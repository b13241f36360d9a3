"""Shared benchmark helpers: timing, percentiles, memory, machine facts, test data, subprocesses, JSON out."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import io
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _threads_from_argv(argv: Sequence[str]) -> None:
    """Honour --threads N before numpy, torch or faiss load: their BLAS/OpenMP pools read the
    variables once, at load time, which is before argparse runs (numpy is imported just below).
    """
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None
        if arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
        if value and value.isdigit() and int(value) > 0:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[var] = value


_threads_from_argv(sys.argv[1:])

import numpy as np  # noqa: E402  (after the thread variables are set)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "fashion-search-benchmark/1"


# -- timing -------------------------------------------------------------------------------------------
def sync_device(device: Any = None) -> None:
    """Wait for queued GPU work, so a wall-clock timer measures the work and not only its launch."""
    if device is None or getattr(device, "type", str(device)).startswith("cuda"):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()


def timed_call(fn: Callable[[], Any], device: Any = None) -> float:
    """Seconds of one fn() call, the device's queued work included."""
    t0 = time.perf_counter()
    fn()
    sync_device(device)
    return time.perf_counter() - t0


def time_calls(
    fn: Callable[[], Any], repeat: int, warmup: int = 1, device: Any = None, min_seconds: float = 0.0
) -> list[float]:
    """Seconds per call of fn(): `warmup` untimed calls, then at least `repeat` timed ones.

    min_seconds keeps timing past `repeat` calls until that much time has passed, so that very fast
    calls get enough samples for a stable p99.
    """
    for _ in range(warmup):
        fn()
    sync_device(device)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - started < min_seconds:
        samples.append(timed_call(fn, device))
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default)."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def latency_ms(samples: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/mean/min/max in milliseconds of a list of durations in seconds."""
    ms = [s * 1000.0 for s in samples]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(statistics.fmean(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


def ratio(measured: float | None, ceiling: float | None) -> float | None:
    if measured is None or not ceiling:
        return None
    return round(measured / ceiling, 4)


def goal_row(
    name: str,
    measured: float | None,
    unit: str,
    goal: str,
    met: bool | None,
    ceiling: float | None = None,
    ratio_value: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One row of a results table: what was measured, its ceiling, the ratio, the goal and the verdict."""
    return {
        "name": name,
        "measured": None if measured is None else round(float(measured), 4),
        "unit": unit,
        "ceiling": None if ceiling is None else round(float(ceiling), 4),
        "ratio": ratio_value,
        "goal": goal,
        "met": met,
        "note": note,
    }


# -- who else used the CPU ---------------------------------------------------------------------------
def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far: the whole machine's busy and stolen time (/proc/stat, all cores) and this
    process's own plus its reaped children's (a benchmark's subprocesses, once waited for)."""
    with open("/proc/stat", encoding="ascii") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fh.readline().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "busy_s": (user + nice + system + irq + softirq) / hz,
        "steal_s": steal / hz,
        "benchmark_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
    }


def cpu_share(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float | str]:
    """Cores busy with other processes and the share of time the hypervisor stole, between two
    cpu_snapshot()s (the second taken after the benchmark's subprocesses were reaped). A ratio to a
    ceiling holds only on a machine where both are near 0: the load average cannot tell, it counts the
    benchmark's own threads."""
    cpus = os.cpu_count() or 1
    benchmark = after["benchmark_s"] - before["benchmark_s"]
    others = max(0.0, after["busy_s"] - before["busy_s"] - benchmark)
    steal = (after["steal_s"] - before["steal_s"]) / (wall_s * cpus) if wall_s > 0 else 0.0
    other_cores = others / wall_s if wall_s > 0 else 0.0
    quiet = other_cores < 0.1 and steal < 0.02
    return {
        "benchmark_cores": round(benchmark / wall_s, 3) if wall_s > 0 else 0.0,
        "other_processes_cores": round(other_cores, 3),
        "steal_share": round(steal, 4),
        "verdict": "quiet"
        if quiet
        else "BUSY: other processes or the hypervisor took CPU time; ratios are less reliable",
    }


# -- memory -------------------------------------------------------------------------------------------
def self_peak_rss_mb() -> float:
    """This process's peak RSS (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def current_rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory right now, from /proc/PID/statm (None when unreadable or the process is gone)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def status_kb(pid: int | str, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    """Peak RSS of a live process (VmHWM); a process that has exited has none."""
    kb = status_kb(pid, "VmHWM")
    return None if kb is None else round(kb / 1024.0, 1)


def pss_mb(pid: int | str) -> float | None:
    """Proportional set size: shared pages split between their users, so a process tree's PSS sums fairly."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    return round(int(match.group(1)) / 1024.0, 1) if match else None


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (DataLoader workers, for instance)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


class MemorySampler:
    """Samples a process tree's memory in a thread: peak of the root's VmHWM, of the tree's RSS and PSS sums.

    The tree's RSS sum counts pages shared by forked workers once per process (an over-estimate); the PSS
    sum splits them fairly. Sampling can miss a peak shorter than its interval; VmHWM never misses one.

    The sampler must not slow what it measures: reading /proc/PID/smaps_rollup walks the page tables of
    the whole process under its mmap lock (28 ms for a 1.7 GB index process here) and listing the process
    tree reads every /proc/N/stat (4 ms). At 0.1 s intervals that was ~35% of one of two cores, taken
    from the measured process. So only the root's /proc/PID/status (VmHWM, VmRSS: cheap) is read every
    `interval`; the tree and its RSS every `tree_interval`, PSS every `pss_interval`.
    """

    def __init__(
        self,
        pid: int,
        interval: float = 0.1,
        pss: bool = True,
        tree_interval: float = 1.0,
        pss_interval: float = 3.0,
        timeline_interval: float = 5.0,
    ):
        self.pid, self.interval, self.pss = pid, interval, pss
        self.tree_interval, self.pss_interval = tree_interval, pss_interval
        # (seconds, root RSS MB) every timeline_interval: whether memory grows with the run or plateaus.
        self.timeline_interval, self.timeline = timeline_interval, []
        self._started = time.monotonic()
        self._next_timeline = 0.0
        self.root_hwm_mb = 0.0
        self.tree_rss_mb = 0.0
        self.tree_pss_mb = 0.0
        self.max_processes = 0
        self._next_tree = self._next_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> None:
        now = time.monotonic()
        hwm = vm_hwm_mb(self.pid)
        if hwm is not None:
            self.root_hwm_mb = max(self.root_hwm_mb, hwm)
        if now < self._next_tree:
            return
        self._next_tree = now + self.tree_interval
        tree = process_tree(self.pid)
        rss = [current_rss_mb(p) for p in tree]
        self.tree_rss_mb = max(self.tree_rss_mb, sum(r for r in rss if r is not None))
        self.max_processes = max(self.max_processes, len(tree))
        if now >= self._next_timeline and rss and rss[0] is not None:
            self._next_timeline = now + self.timeline_interval
            self.timeline.append([round(now - self._started, 1), rss[0]])
        if self.pss and now >= self._next_pss:
            self._next_pss = now + self.pss_interval
            pss = [pss_mb(p) for p in tree]
            self.tree_pss_mb = max(self.tree_pss_mb, sum(p for p in pss if p is not None))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def report(self) -> dict[str, float | int]:
        return {
            "root_vmhwm_mb": self.root_hwm_mb,
            "tree_rss_peak_mb": round(self.tree_rss_mb, 1),
            "tree_pss_peak_mb": round(self.tree_pss_mb, 1),
            "max_processes": self.max_processes,
            "root_rss_timeline": {"columns": ["seconds", "rss_mb"], "rows": self.timeline},
        }


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so an RSS delta measures what is still held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- machine ------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    # From package metadata: no need to import torch just to name its version.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_identity() -> dict[str, Any]:
    """Vendor, family/model/stepping and threads per core: a VM's "AMD EPYC" names no generation
    (family 25 is Zen 3/4, 26 Zen 5), and SMT siblings share one core's units."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping", "siblings", "cpu cores", "flags"):
                fields.setdefault(key, value.strip())
    except OSError:
        return {}
    flags = set(fields.get("flags", "").split())
    siblings, cores = fields.get("siblings"), fields.get("cpu cores")
    return {
        "vendor": fields.get("vendor_id"),
        "family_model_stepping": [fields.get(k) for k in ("cpu family", "model", "stepping")],
        "threads_per_core": int(siblings) // int(cores) if siblings and cores and int(cores) else None,
        "vector_flags": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx_vnni"),
    }


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load, library versions and thread settings, for the record of every run."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        mem_total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_gb = round(mem_total / 2**20, 1)
    except (OSError, AttributeError):
        mem_gb = None
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu": _cpu_identity(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gb": mem_gb,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "versions": {
            name: _version(dist)
            for name, dist in (
                ("fashion_search", "fashion-search"),
                ("torch", "torch"),
                ("open_clip", "open_clip_torch"),
                ("faiss", "faiss-cpu"),
                ("numpy", "numpy"),
                ("pillow", "pillow"),
                ("fastapi", "fastapi"),
                ("uvicorn", "uvicorn"),
            )
        },
        "env_threads": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
            if k in os.environ
        },
    }
    if info["versions"]["faiss"] is None:
        info["versions"]["faiss"] = _version("faiss-gpu") or _version("faiss")
    torch = sys.modules.get("torch")
    if torch is not None:  # only when the benchmark uses torch anyway
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    return info


def busy_note(loadavg_before: Sequence[float], cpus: int | None) -> str:
    """A plain-words verdict on how busy the machine was (1-minute load average against the cores)."""
    load = max(loadavg_before[0], os.getloadavg()[0])
    cpus = cpus or 1
    if load < 0.25 * cpus:
        return f"quiet (1-min load {load:.2f} on {cpus} cores)"
    return f"BUSY: 1-min load {load:.2f} on {cpus} cores while measuring; ratios are less reliable"


# -- arguments and output -----------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads here and in subprocesses (default: the libraries' own choice)",
    )
    return p


def apply_threads(threads: int | None) -> None:
    """Set the thread count before torch/faiss create their pools; subprocesses inherit the variables."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads)


def import_torch(threads: int | None):
    """torch, imported after `apply_threads` so that its OpenMP pool is created with that many threads."""
    apply_threads(threads)
    import torch

    apply_threads(threads)  # torch.set_num_threads too, now that torch is loaded
    return torch


def work_dir(keep: str | None, prefix: str) -> Path:
    """--keep DIR (created), or a fresh temporary folder that the caller removes."""
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def command_line() -> str:
    """How this run was started, relative to the repository, for the docs' "command" column."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *sys.argv[1:]])


def log(message: str) -> None:
    """Progress goes to stderr: stdout carries only the JSON result."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(benchmark: str, args: argparse.Namespace, started_load: Sequence[float], payload: dict) -> dict:
    """Print the result document as JSON on stdout (and to --out); return it."""
    machine = machine_info()
    doc = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine,
        "machine_load": busy_note(started_load, machine.get("cpus_usable")),
        **payload,
    }
    text = json.dumps(doc, indent=2, default=str)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return doc


def parse_int_list(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def ms_per_item(fn, items) -> float:
    """Mean ms of fn(item) over items, in this thread, after one untimed call (lazy imports, caches)."""
    fn(items[0])
    started = time.perf_counter()
    for item in items:
        fn(item)
    return round((time.perf_counter() - started) * 1000.0 / len(items), 3)


def query_towers(model, text: str = "is red and sleeveless", seed: int = 0):
    """(image_forward, text_forward): a query's two batch-1 forwards on ready inputs (a seeded random
    image tensor, tokens made once), each returning its embedding on the CPU."""
    import torch

    from fashion_search.models.backbone import autocast

    size = model.backbone.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    tokens = model.backbone.tokenize([text]).to(model.device)

    @torch.inference_mode()
    def text_forward():
        with autocast(model.device):
            return model.backbone.text_features(tokens).float().cpu()

    return (lambda: model.encode_pixels(pixels)), text_forward


def query_forwards(model, seed: int = 0):
    """A callable timing one query's two forwards (query_towers) in seconds: the unit the idle diagnosis
    compares."""
    image_forward, text_forward = query_towers(model, seed=seed)

    def forwards() -> float:
        started = time.perf_counter()
        image_forward()
        text_forward()
        return time.perf_counter() - started

    return forwards


# -- test data ----------------------------------------------------------------------------------------
def synth_photo(rng: np.random.Generator, width: int, height: int) -> Any:
    """A product-photo-like RGB image: smooth background, a garment-ish shape, fine texture.

    Smooth areas with some noise give JPEG sizes and decode costs near real photos; pure noise would
    make both several times larger.
    """
    from PIL import Image, ImageDraw, ImageFilter

    low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(low, "RGB").resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    points = [
        (cx + np.cos(a) * width * rng.uniform(0.15, 0.4), cy + np.sin(a) * height * rng.uniform(0.15, 0.4))
        for a in np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(5, 10))))
    ]
    draw.polygon(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.02, 0.1) * min(width, height)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(radius=1.0))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(height, width, 1)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(rng: np.random.Generator, min_px: int, max_px: int, quality: int = 90) -> bytes:
    """One encoded JPEG whose sides are drawn from [min_px, max_px]."""
    width, height = (int(v) for v in rng.integers(min_px, max_px + 1, size=2))
    buf = io.BytesIO()
    synth_photo(rng, width, height).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_jpeg(job: tuple[Path, int, int, int, int]) -> int:
    path, seed, i, min_px, max_px = job
    data = jpeg_bytes(np.random.default_rng([seed, i]), min_px, max_px)
    path.write_bytes(data)
    return len(data)


def make_jpeg_folder(
    root: Path, n: int, seed: int = 0, min_px: int = 400, max_px: int = 1000, categories: int = 4
) -> dict[str, Any]:
    """Write n seeded JPEGs (sides in [min_px, max_px]) under root/cat{i}/; return their count and sizes.

    Image i depends on (seed, i) alone, so the folder is the same whatever the number of processes
    writing it (all cores: ~30 ms per image per core, a minute for 2,000 on one core).
    """
    jobs = []
    for i in range(n):
        path = root / f"cat{i % categories}" / f"img{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((path, seed, i, min_px, max_px))
    procs = min(os.cpu_count() or 1, max(1, n // 32))
    if procs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(procs) as pool:
            sizes = pool.map(_write_jpeg, jobs, chunksize=8)
    else:
        sizes = [_write_jpeg(job) for job in jobs]
    total = sum(sizes)
    return {
        "images": n,
        "bytes": total,
        "mean_kb": round(total / max(n, 1) / 1024, 1),
        "px": [min_px, max_px],
    }


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n random L2-normalised float32 vectors (uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_vector_index(
    out: Path,
    model: Any,
    n: int,
    kind: str = "auto",
    seed: int = 0,
    catalog_root: Path | None = None,
    ids: Sequence[str] | None = None,
    signatures: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """An index directory of n random unit vectors, with the manifest `fashion-search index` would write.

    The manifest records `model`'s identity so that the engine (and `serve`) accept it, and a file
    signature ([size, mtime_ns]) per id so it has the size of a real manifest of n items; give the
    real ids and signatures of files under catalog_root to make `index` treat them as unchanged.
    """
    from fashion_search.index.registry import choose_index_kind, create_index
    from fashion_search.index.store import save_index_dir

    started = time.perf_counter()
    kind = choose_index_kind(n) if kind == "auto" else kind
    index = create_index(kind, model.dim)
    ids = list(ids) if ids is not None else [f"cat{i % 4}/img{i:07d}.jpg" for i in range(n)]
    step = 50_000  # add in slices: keeps the temporary float32 arrays small at 1M items
    for start in range(0, n, step):
        index.add(ids[start : start + step], unit_vectors(min(step, n - start), model.dim, seed + start))
    now = datetime.now(timezone.utc).isoformat()
    spec = model.backbone.spec
    manifest = {
        "format": "fashion-search-index/1",
        "model": model.identity(),
        "source": {
            "checkpoint": None,
            "model": spec.model,
            "pretrained": spec.pretrained,
            "fusion": model.fusion.name,
        },
        "catalog_root": str(catalog_root or out / "catalog"),
        "created": now,
        "updated": now,
        "files": signatures or {i: [100_000 + j, 1_700_000_000_000_000_000 + j] for j, i in enumerate(ids)},
        "skipped": {},
    }
    save_index_dir(out, index, manifest)
    return {"items": n, "kind": index.kind, "seconds": round(time.perf_counter() - started, 2)}


# -- subprocesses -------------------------------------------------------------------------------------
def fashion_search_cmd() -> list[str]:
    """The installed `fashion-search` console script next to this interpreter (the real entry point)."""
    script = Path(sys.executable).with_name("fashion-search")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fashion_search.cli"]


class Monitored:
    """A subprocess whose output is collected by threads (stderr chunks timestamped) and memory sampled."""

    def __init__(
        self,
        cmd: Sequence[str],
        env: dict[str, str] | None = None,
        sample_interval: float = 0.1,
        own_group: bool = False,
    ):
        """own_group: start the process in its own process group, so pause()/resume() reach its workers."""
        self.cmd = list(cmd)
        self.stdout = bytearray()
        self.stderr_chunks: list[tuple[float, bytes]] = []
        # (start, end) of each pause, seconds since start: time the process could not run.
        self.pauses: list[tuple[float, float]] = []
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            start_new_session=own_group,  # its own process group: SIGSTOP reaches the workers too
        )
        self.memory = MemorySampler(self.proc.pid, interval=sample_interval)
        self.memory.__enter__()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.rusage_maxrss_mb: float | None = None
        self.wall_s: float | None = None

    def _read(self, stream, timestamped: bool) -> None:
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            if timestamped:
                self.stderr_chunks.append((time.perf_counter() - self.started, chunk))
            else:
                self.stdout.extend(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(c for _, c in self.stderr_chunks).decode("utf-8", "replace")

    def exited(self) -> bool:
        """True once the process has ended; unlike Popen.poll() it does not reap it (wait() needs to)."""
        if self.proc.returncode is not None:
            return True
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def wait(self, timeout: float | None = None) -> int:
        """Reap the process with wait4, whose rusage gives its exact peak RSS (ru_maxrss)."""
        if self.wall_s is not None:  # already reaped
            return self.proc.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.proc.kill()
                pid, status, usage = os.wait4(self.proc.pid, 0)
                break
            time.sleep(0.02)
        self.wall_s = time.perf_counter() - self.started
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        self.rusage_maxrss_mb = round(usage.ru_maxrss / 1024.0, 1)
        self.memory.__exit__()
        for t in self._readers:
            t.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        return self.proc.returncode

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful), then wait; SIGKILL after `timeout`."""
        if self.proc.returncode is None:
            self.proc.terminate()
        return self.wait(timeout)

    def memory_report(self) -> dict[str, Any]:
        return {"peak_rss_mb": self.rusage_maxrss_mb, **self.memory.report()}

    def pause(self) -> bool:
        """SIGSTOP the whole process group (own_group=True); False when it has already ended."""
        if self.exited():
            return False
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self._paused_at = time.perf_counter() - self.started
        return True

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
        self.pauses.append((self._paused_at, time.perf_counter() - self.started))

    def kill_group(self) -> None:
        """SIGKILL what is left of the group (own_group=True): a Ctrl-C of the benchmark reaches only it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def paused_s(self) -> float:
        return sum(end - start for start, end in self.pauses)

    def active_at(self, t: float) -> float:
        """Seconds since start at which the process could run, up to `t` (pauses taken out)."""
        return t - sum(max(0.0, min(end, t) - start) for start, end in self.pauses if start < t)


def check_exit(mon: Monitored, what: str) -> None:
    if mon.proc.returncode != 0:
        tail = mon.stderr[-3000:]
        raise SystemExit(f"{what} exited with {mon.proc.returncode}: {shlex.join(mon.cmd)}\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(index_dir: Path, port: int, device: str | None = None) -> Monitored:
    """`fashion-search serve` on 127.0.0.1:port, the index watcher off (it would only add noise)."""
    cmd = [*fashion_search_cmd(), "serve", "--index", str(index_dir), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--reload-interval", "0"]
    if device:
        cmd += ["--device", device]
    return Monitored(cmd, sample_interval=0.25)


def wait_healthy(server: Monitored, base_url: str, timeout: float = 180.0) -> float:
    """Seconds from the server's start until /health answers 200; exits if the server dies first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.exited():
            server.wait(1)
            raise SystemExit(f"the server exited with {server.proc.returncode}:\n{server.stderr[-3000:]}")
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - server.started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise SystemExit(f"the server did not become healthy in {timeout:.0f}s:\n{server.stderr[-3000:]}")
