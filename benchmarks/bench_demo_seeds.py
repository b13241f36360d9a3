"""The offline demo's scores across data seeds, training seeds and fusions (JSON on stdout).

For every data seed: the demo's synthetic dataset (`fashion-search demo --seed N` makes the same one),
cached under --work. For every (data seed, training seed, fusion): the demo's training recipe
(`config.DEMO_OVERRIDES`, so `demo_config`) with that fusion and `seed`, then the Fashion-IQ protocol on
the val split with composed R@10 split by how many attributes a query changes. A finished run in
--work is reused, so an interrupted sweep resumes; one trained with another recipe is moved aside and
trained again; --finished-only trains nothing and summarises the finished runs; --include FILE adds
the runs of an earlier output that trained this recipe (each run records its recipe). Each run takes the
time of the demo's training (10-20 minutes on 2 CPU cores): the full default grid is 18 of them.

Per fusion the summary gives mean, standard deviation, minimum and maximum over its runs of composed /
sum / image-only / text-only R@10 and R@50 and of the three-change R@10, beside the demo's goals.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import common

# The demo's goals, each judged on every run (a number that holds for one seed only is not a result).
GOALS = (
    ("composed_R@10", "composed R@10", ">= 90", lambda v: v >= 90),
    ("image_only_R@10", "image-only R@10", "<= 35", lambda v: v <= 35),
    ("text_only_R@10", "text-only R@10", "<= 35", lambda v: v <= 35),
    ("changes_3_R@10", "composed R@10 of three-change queries", ">= 80", lambda v: v >= 80),
)


# Flags that change what a run learns (training options) or what it is measured on (the dataset).
TRAINING_OVERRIDES = (
    "epochs",
    "model",
    "hard_negatives",
    "group_negatives",
    "group_negative_pool",
    "temperature",
)
OVERRIDES = (*TRAINING_OVERRIDES, "images_per_category", "eval_gallery")


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument(
        "--work",
        default=None,
        help="keep the datasets and runs here, reused when present (default: a temporary folder)",
    )
    p.add_argument("--data-seeds", default="0,1,2", help="comma-separated data seeds")
    p.add_argument("--train-seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--fusions", default="combiner,sum,attention", help="comma-separated fusions")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    p.add_argument("--model", default=None, help="override the demo's model (fs-rn-tiny)")
    p.add_argument(
        "--hard-negatives",
        type=int,
        default=None,
        help="override the demo's hard_negatives (1: random batches)",
    )
    p.add_argument(
        "--group-negatives",
        type=int,
        default=None,
        help="override the demo's group_negatives (look-mate negatives per triplet)",
    )
    p.add_argument(
        "--group-negative-pool",
        type=int,
        default=None,
        help="override the demo's group_negative_pool (draw them from the K look-mates most like the target)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="override the demo's temperature (a fixed one; the demo's is CLIP's learnable temperature)",
    )
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: summarise the runs of the grid already finished under --work with this recipe",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="FILE",
        help="also summarise the runs of an earlier output of this script (repeatable); a run trained "
        "with another recipe is left out, and one this sweep also has is taken from this sweep",
    )
    p.add_argument("--images-per-category", type=int, default=None, help="override the demo's dataset size")
    p.add_argument("--eval-gallery", type=int, default=None, help="override the demo's val/test gallery")
    return p.parse_args()


def run_config(data_dir: Path, run_dir: Path, fusion: str, train_seed: int, overrides: dict):
    from fashion_search.demo import demo_config

    cfg = replace(
        demo_config(run_dir.parent), data=str(data_dir), out=str(run_dir), fusion=fusion, seed=train_seed
    )
    return replace(cfg, **overrides)


def finished_with(run_dir: Path, cfg) -> bool:
    """Whether run_dir holds a finished run of exactly this recipe."""
    from fashion_search.demo import recipe_changes

    history_file = run_dir / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else {}
    return bool(history.get("finished")) and not recipe_changes(history, cfg)


def included_runs(files: list[str], expected, overrides_in: dict) -> list[dict]:
    """The runs of earlier outputs whose recorded recipe is `expected(run)`'s. A run that records no recipe
    (an output made before the script recorded it) counts as this recipe if its output's overrides are
    this sweep's, which the log says."""
    from fashion_search.demo import recipe_changes

    kept = []
    for name in files:
        doc = json.loads(Path(name).read_text())
        differ = sorted(k for k in OVERRIDES if doc["config"].get(k) != overrides_in.get(k))
        for run in doc["runs"]:
            where = (
                f"{name}: data seed {run['data_seed']}, training seed {run['train_seed']}, {run['fusion']}"
            )
            if "recipe" not in run and differ:
                common.log(f"{where} was run with other overrides ({differ}): left out")
                continue
            if "recipe" not in run:
                common.log(f"{where} records no recipe: counted as this sweep's (same overrides)")
            elif changed := sorted(
                recipe_changes({"config": run["recipe"], "epochs_run": run.get("epochs_run")}, expected(run))
            ):
                common.log(f"{where} was trained with another recipe ({changed}): left out")
                continue
            kept.append({**run, "included_from": name})
    return kept


def run_one(data_dir: Path, run_dir: Path, fusion: str, train_seed: int, overrides: dict) -> dict:
    from fashion_search.data.synthetic import changes_of
    from fashion_search.demo import recipe_changes, recipe_of
    from fashion_search.evaluation.fashioniq import evaluate
    from fashion_search.models.checkpoint import load_checkpoint
    from fashion_search.training.loop import train

    cfg = run_config(data_dir, run_dir, fusion, train_seed, overrides)
    history_file = run_dir / "history.json"
    started = time.perf_counter()
    history = json.loads(history_file.read_text()) if history_file.is_file() else {}
    finished = bool(history.get("finished"))
    changed = recipe_changes(history, cfg) if finished else {}
    if changed:  # a run of another recipe (an older demo's, other flags) is set aside, not reused
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        common.log(f"{run_dir} was trained with another recipe ({sorted(changed)}): moved to {aside}")
        finished = False
    if not finished:
        train(cfg, resume=(run_dir / "last.pt").exists(), progress=False)
    train_s = time.perf_counter() - started
    history = json.loads(history_file.read_text())
    model = load_checkpoint(run_dir)
    result = evaluate(model, data_dir, "val", workers=0, progress=False, group_by=changes_of(data_dir))
    modes = {mode: rows["average"] for mode, rows in result["modes"].items()}
    row = {
        "recipe": recipe_of(cfg),  # so that a later --include can tell whether it is the same recipe
        "train_s": round(train_s, 1) if not finished else None,
        "epochs_run": len(history.get("epochs", [])),
        "best_epoch": history.get("best_epoch"),
        "queries": modes["composed"]["queries"],
        "gallery": modes["composed"]["gallery"],
    }
    for mode, avg in modes.items():
        for k in ("R@1", "R@10", "R@50"):
            row[f"{mode}_{k}"] = round(avg[k], 2)
    for g, r in modes["composed"].get("groups", {}).items():
        row[f"changes_{g}_R@10"] = round(r["R@10"], 2)
        row[f"changes_{g}_queries"] = r["queries"]
    return row


def summarise(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r if k.endswith(("R@10", "R@50"))})
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            out[k] = {
                "mean": round(statistics.fmean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "runs": len(values),
            }
    return out


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    common.import_torch(args.threads)
    from fashion_search.data.synthetic import generate
    from fashion_search.demo import check_reusable_data, demo_dataset

    work = common.work_dir(args.work, "bench-demo-seeds-")
    overrides = {k: getattr(args, k) for k in TRAINING_OVERRIDES if getattr(args, k) is not None}
    runs: list[dict] = []
    for data_seed in common.parse_int_list(args.data_seeds):
        data_dir = work / f"data-{data_seed}"
        dataset = demo_dataset(data_seed)
        for key in ("images_per_category", "eval_gallery"):
            if getattr(args, key) is not None:
                dataset[key] = getattr(args, key)
        if (data_dir / "attributes.json").exists():
            check_reusable_data(data_dir, dataset)
        elif args.finished_only:
            common.log(f"data seed {data_seed}: no dataset in {data_dir}, left out")
            continue
        else:
            common.log(f"data seed {data_seed}: generating {data_dir}")
            generate(data_dir, **dataset, progress=False)
        for train_seed in common.parse_int_list(args.train_seeds):
            for fusion in [f for f in args.fusions.split(",") if f]:
                run_dir = work / f"run-d{data_seed}-t{train_seed}-{fusion}"
                common.log(f"data seed {data_seed}, training seed {train_seed}, {fusion}: {run_dir}")
                cfg = run_config(data_dir, run_dir, fusion, train_seed, overrides)
                if args.finished_only and not finished_with(run_dir, cfg):
                    common.log("  not finished with this recipe: left out (--finished-only)")
                    continue
                row = run_one(data_dir, run_dir, fusion, train_seed, overrides)
                runs.append({"data_seed": data_seed, "train_seed": train_seed, "fusion": fusion, **row})
                common.log(f"  composed R@10 {row['composed_R@10']}, image-only {row['image_only_R@10']}")
    seen = {(r["data_seed"], r["train_seed"], r["fusion"]) for r in runs}

    def expected(run: dict):
        data_dir, run_dir = work / f"data-{run['data_seed']}", work / "run"
        return run_config(data_dir, run_dir, run["fusion"], run["train_seed"], overrides)

    for run in included_runs(args.include, expected, vars(args)):
        key = (run["data_seed"], run["train_seed"], run["fusion"])
        if key not in seen:
            seen.add(key)
            runs.append(run)
    fusions = sorted({r["fusion"] for r in runs})
    summary = {f: summarise([r for r in runs if r["fusion"] == f]) for f in fusions}
    goals = []
    for fusion in fusions:
        mine = [r for r in runs if r["fusion"] == fusion]
        for key, name, goal, ok in GOALS:
            values = [r[key] for r in mine if r.get(key) is not None]
            stats = summary[fusion].get(key)
            goals.append(
                common.goal_row(
                    f"{fusion}: {name}, mean of {len(values)} runs",
                    stats["mean"] if stats else None,
                    "%",
                    f"{goal} on every run",
                    all(ok(v) for v in values) if values else None,
                    note=f"runs: {values}",
                )
            )
    common.emit("demo_seeds", args, load0, {"goals": goals, "summary": summary, "runs": runs})
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
