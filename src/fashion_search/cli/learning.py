"""CLI commands of the learning loop: `train`, `eval`, `demo`, and `export` (the model to ONNX/OpenVINO)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from fashion_search.atomic import atomic_write_json, check_output_file
from fashion_search.cli.args import (
    add_model_args,
    add_runtime_args,
    apply_runtime,
    load_model,
    non_negative_int,
    port_number,
    positive_int,
)
from fashion_search.errors import FashionSearchError
from fashion_search.runtime.quantize import DEFAULT_CALIBRATION_IMAGES

_TRAIN_FLAGS = {
    "model": str,
    "pretrained": str,
    "fusion": str,
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "lr_fusion": float,
    "layer_decay": float,
    "weight_decay": float,
    "warmup_epochs": float,
    "grad_clip": float,
    "temperature": float,
    "color_jitter": float,
    "stop_at_loss": float,
    "clip_loss_weight": float,
    "hard_negatives": int,
    "mine_hard_negatives": int,
    "group_negatives": int,
    "group_negative_pool": int,
    "patience": int,
    "seed": int,
    "workers": int,
    "device": str,
    "max_steps_per_epoch": int,
    "grad_cache_chunk": int,
}


def cmd_train(args) -> int:
    from fashion_search.config import TrainConfig, load_recipe

    overrides = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    overrides.update({k: getattr(args, k) for k in ("data", "out") if getattr(args, k) is not None})
    if args.categories:
        overrides["categories"] = args.categories
    if args.no_augment:
        overrides["augment"] = False
    # Precedence: flags over --config FILE over --recipe NAME over the defaults.
    recipe = load_recipe(args.recipe) if args.recipe else {}
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    if args.config:
        cfg = TrainConfig.load(args.config, base=recipe, **overrides)
    elif args.resume and args.out and (Path(args.out) / "config.yaml").exists():
        cfg = TrainConfig.load(Path(args.out) / "config.yaml", **overrides)
    else:
        cfg = TrainConfig.from_dict({**recipe, **overrides})
    if args.print_config:  # what would run, before any data, weights or run directory is touched
        print(cfg.to_yaml(), end="")
        return 0
    # Checked here, not by argparse: --print-config needs neither, and a --config file may name both.
    missing = [f"--{k}" for k in ("data", "out") if not getattr(cfg, k)]
    if missing:
        raise FashionSearchError(f"train needs {' and '.join(missing)} (or a --config file that sets them)")
    from fashion_search.training.loop import train

    result = train(cfg, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    print(
        f"best epoch {result.best_epoch} (mean R@10/R@50 {result.best_score:.2f}); checkpoint: {result.run_dir / 'checkpoint.pt'}"
    )
    return 0


def _changes_if_synthetic(data: Path):
    # A synthetic dataset knows how many attributes each query changes: its results are also split by that.
    from fashion_search.data.synthetic import SUMMARY_FILE, changes_of

    return changes_of(data) if (data / SUMMARY_FILE).is_file() else None


def cmd_eval(args) -> int:
    from fashion_search.evaluation.fashioniq import by_changes_line, evaluate, format_table, rank_submission

    for output in (args.json, args.submission):  # checked before minutes of evaluation, not after
        if output:
            check_output_file(output)
    model, source = load_model(args, fusion=args.fusion)
    model = apply_runtime(args, model, source, mode="throughput")
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    if args.submission:
        ranked = rank_submission(
            model, args.data, args.split, categories, workers=args.workers, progress=not args.quiet
        )
        atomic_write_json(Path(args.submission), ranked)
        n = sum(len(c["queries"]) for c in ranked["categories"].values())
        print(f"wrote top-50 rankings for {n} {args.split} queries to {args.submission}")
        return 0
    result = evaluate(
        model,
        args.data,
        args.split,
        categories,
        joining=args.joining,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
        group_by=_changes_if_synthetic(Path(args.data)),
    )
    print(format_table(result))
    if "groups" in result["modes"]["composed"]["average"]:
        print(by_changes_line(result))
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0


def cmd_export(args) -> int:
    from fashion_search.runtime import cache_root
    from fashion_search.runtime.export import export_model, export_name, read_export
    from fashion_search.runtime.quantize import calibration_photos

    if args.device not in (None, "cpu"):
        raise FashionSearchError("export runs on the CPU: leave out --device")
    args.device = "cpu"
    model, source = load_model(args, fusion=args.fusion)
    precision = "int8" if args.int8 else "fp32"
    if args.calibration and not args.int8:
        raise FashionSearchError("--calibration measures int8 activation ranges: add --int8")
    photos = calibration_photos(args.calibration, args.calibration_size) if args.calibration else None
    out = (
        Path(args.out) if args.out else cache_root(source, None) / export_name(model, args.format, precision)
    )
    export_model(model, out, args.format, precision, calibration=photos)
    manifest = read_export(out, model)
    size = sum(manifest["sizes"].values()) / 1e6
    how = ", ".join(f"{g} {m}" for g, m in manifest.get("quantization", {}).items())
    print(
        f"exported {', '.join(manifest['graphs'])} ({args.format} {precision}{f': {how}' if how else ''}, "
        f"{size:.1f} MB) to {out}"
    )
    return 0


def cmd_demo(args) -> int:
    from fashion_search.demo import run_demo

    return run_demo(Path(args.dir), serve=not args.no_serve, port=args.port, seed=args.seed)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from fashion_search.config import TrainConfig, list_recipes

    p = sub.add_parser("train", help="fine-tune on Fashion-IQ-style triplets")
    p.add_argument("--data", help="dataset root in the Fashion-IQ layout (required unless --print-config)")
    p.add_argument(
        "--out", help="run directory: checkpoint.pt, last.pt, history.json (required unless --print-config)"
    )
    p.add_argument("--config", help="YAML file of training options (flags override it)")
    p.add_argument(
        "--recipe",
        help=f"a shipped recipe: {' | '.join(list_recipes())} (fiq: the defaults; flags and --config override it)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (as RUN/config.yaml holds it) and exit without training",
    )
    p.add_argument("--categories", help="comma-separated subset of dress,shirt,toptee")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute the towers' activations in backward: less memory, more compute",
    )
    p.add_argument("--quiet", action="store_true")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults.update(
        pretrained="openai; none for the compact fs-* models",
        device="the best available",
        max_steps_per_epoch="the whole epoch",
        warmup_epochs=f"none (warmup_ratio {TrainConfig.warmup_ratio} of the steps)",
        temperature="learnable",
        stop_at_loss="none",
        grad_cache_chunk="0 (off); N: GradCache, the encoders see N triplets at a time",
    )
    for name, typ in _TRAIN_FLAGS.items():
        shown = defaults[name] if defaults[name] is not None else "none"
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"default: {shown}")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="Fashion-IQ protocol Recall@1/5/10/50")
    p.add_argument("--data", required=True)
    add_model_args(p, fusion=True)
    p.add_argument("--split", default="val")
    p.add_argument("--categories", default=None, help="comma-separated subset")
    p.add_argument(
        "--joining", default="standard", help="standard ('Cap1 and cap2') | both (orders averaged)"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--submission", default=None, metavar="FILE", help="write top-50 rankings (for --split test)"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="default 64")
    p.add_argument("--workers", type=non_negative_int, default=None, help="decoding processes")
    p.add_argument("--quiet", action="store_true")
    add_runtime_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export the model's towers and fusion to ONNX or OpenVINO IR")
    add_model_args(p, fusion=True)
    p.add_argument("--format", choices=("onnx", "openvino"), default="onnx", help="default onnx")
    p.add_argument(
        "--out",
        default=None,
        help="export folder (default: the cache `--runtime` reads: RUN/exports/FORMAT-PRECISION-ID for a "
        "checkpoint, ~/.cache/fashion-search/exports/... for a model name)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights for every matrix product (ONNX: activations quantized per batch at run time; "
        "OpenVINO: weights only)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="PHOTOS",
        help="with --int8: a folder of catalog photos to measure the image tower's activation ranges on, "
        "so its activations run in int8 too (static quantization)",
    )
    p.add_argument(
        "--calibration-size",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help=f"calibration photos used, spread over the folder (default {DEFAULT_CALIBRATION_IMAGES})",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="offline end to end: synth -> train -> eval -> index -> web UI")
    p.add_argument("--dir", default="demo", help="where the demo's data, run and index live")
    p.add_argument("--no-serve", action="store_true", help="stop after indexing instead of launching the UI")
    p.add_argument("--port", type=port_number, default=8501)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the synthetic dataset's seed (a folder keeps the seed it was made with: another seed needs another --dir)",
    )
    p.set_defaults(func=cmd_demo)
