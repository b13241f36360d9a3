"""Screen variants of the demo's dataset design and training recipe in parallel (JSON on stdout).

Each variant is a name with extra `fashion-search synth` flags and extra `fashion-search train` flags on
top of the demo's (`config.DEMO_OVERRIDES`, the combiner). For every variant and data seed the script
makes the dataset (shared by the variants with the same synth flags), trains with each training seed
and evaluates on val (`fashion-search eval`, which splits a synthetic dataset's composed R@10 by
the number of changes). Runs go to --jobs worker processes at a time, each limited to --threads CPU
threads; every finished run is appended to OUT/results.jsonl at once, so a run cut short still leaves
the finished ones. A run already finished in OUT is reused.

It is made for a machine with many cores (and a GPU: `--device cuda`); numbers from a GPU (bf16
autocast) are for ranking variants, and a winner is confirmed with `bench_demo_seeds.py` on the CPU.

    python benchmarks/screen_demo_recipes.py --out runs/screen --device cuda --jobs 8 \\
        --variants base,look8v5 --data-seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> (synth flags, train flags), on top of the demo's dataset (`demo.demo_dataset`: 720 train images
# per category beside val and test galleries of 1,000) and recipe (7 epochs).
VARIANTS: dict[str, tuple[str, str]] = {
    "base": ("", ""),
    # half the images, twice over: the same number of steps
    "train360-e14": ("--images-per-category 2360", "--epochs 14 --patience 14"),
    "look8v5": ("--train-look-size 8 --train-varying 5", ""),
    "train360-look8v5-e14": (
        "--images-per-category 2360 --train-look-size 8 --train-varying 5",
        "--epochs 14 --patience 14",
    ),
    "train1080-e5": ("--images-per-category 3080", "--epochs 5 --patience 5"),
    "e9": ("", "--epochs 9 --patience 9"),
    "attention": ("", "--fusion attention"),
    "sum": ("", "--fusion sum"),
    "t0.02": ("", "--temperature 0.02"),
    "gn7": ("", "--group-negatives 7"),
    "smoke": ("", "--epochs 1 --max-steps-per-epoch 2"),  # checks the machine, in about a minute
}
# The CLI of this interpreter's package, installed or on PYTHONPATH.
_CLI = [sys.executable, "-m", "fashion_search"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="datasets, runs and results.jsonl go here")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    p.add_argument("--data-seeds", default="0,1")
    p.add_argument("--train-seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    p.add_argument("--images-per-category", type=int, default=None, help="override the demo's dataset size")
    p.add_argument("--eval-gallery", type=int, default=None, help="override the demo's val/test gallery")
    p.add_argument(
        "--train-flags",
        default="",
        help="training flags added to every run's, after the variant's (a quick check: '--epochs 1')",
    )
    p.add_argument(
        "--summarise-only",
        action="store_true",
        help="run nothing: summarise OUT/results.jsonl (the runs of a screen that was cut short)",
    )
    return p.parse_args()


def _synth_flags(args: argparse.Namespace, variant: str) -> list[str]:
    from fashion_search.demo import demo_dataset

    demo = demo_dataset()
    sizes = [
        "--images-per-category",
        str(args.images_per_category or demo["images_per_category"]),
        "--eval-gallery",
        str(args.eval_gallery or demo["eval_gallery"]),
    ]
    return sizes + shlex.split(VARIANTS[variant][0])  # a variant's own --images-per-category comes last


def _dataset_key(flags: list[str], seed: int) -> str:
    words = "_".join(f.lstrip("-") for f in flags).replace("images-per-category_", "ipc")
    return f"data-{words}-s{seed}"


class Screen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.lock = threading.Lock()
        self.datasets: dict[str, threading.Event] = {}
        self.failed: dict[str, str] = {}
        self.config = self.out / "demo_config.yaml"
        from fashion_search.config import DEMO_OVERRIDES, TrainConfig

        values = TrainConfig(fusion="combiner", **DEMO_OVERRIDES).to_dict()
        for key in ("data", "out", "device"):
            values.pop(key, None)
        import yaml

        self.config.write_text(yaml.safe_dump(values, sort_keys=False))

    def _run(self, cmd: list[str], log: Path) -> None:
        with log.open("a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env=self.env)

    def dataset(self, variant: str, seed: int) -> Path:
        flags = _synth_flags(self.args, variant)
        key = _dataset_key(flags, seed)
        path = self.out / key
        with self.lock:
            event = self.datasets.get(key)
            mine = event is None
            if mine:
                event = self.datasets[key] = threading.Event()
        if mine:
            try:
                if not (path / "synth.json").is_file():
                    cmd = [*_CLI, "synth", str(path), *flags, "--seed", str(seed), "--quiet"]
                    self._run(cmd, self.out / f"{key}.log")
            except subprocess.CalledProcessError as exc:
                self.failed[key] = str(exc)
            finally:
                event.set()
        event.wait()
        if key in self.failed:
            raise RuntimeError(f"dataset {key} failed: {self.failed[key]}")
        return path

    def run(self, variant: str, seed: int, train_seed: int) -> dict:
        data = self.dataset(variant, seed)
        run = self.out / f"run-{variant}-d{seed}-t{train_seed}"
        log = self.out / f"{run.name}.log"
        history_file = run / "history.json"
        train_s = None  # a run finished earlier is reused, not timed
        if not (history_file.is_file() and json.loads(history_file.read_text()).get("finished")):
            cmd = [*_CLI, "train", "--config", str(self.config), "--data", str(data), "--out", str(run)]
            cmd += shlex.split(VARIANTS[variant][1]) + shlex.split(self.args.train_flags)
            cmd += ["--seed", str(train_seed), "--device", self.args.device, "--quiet"]
            started = time.perf_counter()
            self._run(cmd, log)
            train_s = round(time.perf_counter() - started, 1)
        result_file = run / "eval.json"
        cmd = [*_CLI, "eval", "--data", str(data), "--checkpoint", str(run), "--split", "val"]
        self._run([*cmd, "--device", self.args.device, "--json", str(result_file), "--quiet"], log)
        history = json.loads(history_file.read_text())
        modes = json.loads(result_file.read_text())["modes"]
        row = {
            "variant": variant,
            "data_seed": seed,
            "train_seed": train_seed,
            "train_s": train_s,
            "epochs_run": len(history["epochs"]),
            "best_epoch": history.get("best_epoch"),
        }
        for mode, rows in modes.items():
            row[f"{mode}_R@10"] = round(rows["average"]["R@10"], 2)
        for g, r in modes["composed"]["average"].get("groups", {}).items():
            row[f"changes_{g}_R@10"] = round(r["R@10"], 2)
        with self.lock, (self.out / "results.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row


def summarise(rows: list[dict]) -> dict:
    """Per variant: the mean (and, over several runs, std and minimum) of each headline R@10."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        out[variant] = {"runs": len(mine)}
        for key in ("composed_R@10", "changes_3_R@10", "image_only_R@10", "text_only_R@10", "sum_R@10"):
            values = [r[key] for r in mine if key in r]
            if values:
                stats = {"mean": round(statistics.fmean(values), 2), "min": min(values), "max": max(values)}
                if len(values) > 1:
                    stats["std"] = round(statistics.stdev(values), 2)
                out[variant][key] = stats
        out[variant]["per_run"] = {f"d{r['data_seed']}-t{r['train_seed']}": r["composed_R@10"] for r in mine}
    return out


def main() -> int:
    args = parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants: {unknown} (known: {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.data_seeds.split(",")]
    if args.summarise_only:
        lines = (Path(args.out) / "results.jsonl").read_text().splitlines()
        rows = [row for row in map(json.loads, lines) if row["variant"] in variants]
        print(json.dumps({"summary": summarise(rows), "runs": rows}, indent=1))
        return 0
    screen = Screen(args)
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    # In the order given, so the first variants finish first.
    jobs = [(v, s, t) for v in variants for s in seeds for t in train_seeds]
    rows, errors = [], []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(screen.run, *job): job for job in jobs}
        for future, (v, s, t) in futures.items():
            try:
                rows.append(future.result())
            except Exception as exc:  # one failed run must not lose the others
                errors.append(f"{v} d{s} t{t}: {exc}")
    print(
        json.dumps(
            {"device": args.device, "summary": summarise(rows), "runs": rows, "errors": errors}, indent=1
        )
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
