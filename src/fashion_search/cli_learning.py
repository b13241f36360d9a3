"""CLI commands for the learning loop: `train`, `eval`, `demo`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fashion_search.atomic import atomic_write_json, check_output_file
from fashion_search.errors import FashionSearchError

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
    "clip_loss_weight": float,
    "hard_negatives": int,
    "mine_hard_negatives": int,
    "patience": int,
    "seed": int,
    "workers": int,
    "device": str,
    "max_steps_per_epoch": int,
}


def cmd_train(args) -> int:
    from fashion_search.config import TrainConfig
    from fashion_search.training.loop import train

    overrides = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    overrides.update(data=args.data, out=args.out)
    if args.categories:
        overrides["categories"] = args.categories
    if args.no_augment:
        overrides["augment"] = False
    if args.config:
        cfg = TrainConfig.load(args.config, **overrides)
    elif args.resume and (Path(args.out) / "config.yaml").exists():
        cfg = TrainConfig.load(Path(args.out) / "config.yaml", **overrides)
    else:
        cfg = TrainConfig.from_dict(overrides)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    print(
        f"best epoch {result.best_epoch} (mean R@10/R@50 {result.best_score:.2f}); checkpoint: {result.run_dir / 'checkpoint.pt'}"
    )
    return 0


def cmd_eval(args) -> int:
    from fashion_search.cli import _load_model
    from fashion_search.evaluation.fashioniq import evaluate, format_table, rank_submission

    for output in (args.json, args.submission):  # checked before minutes of evaluation, not after
        if output:
            check_output_file(output)
    model, _ = _load_model(args, fusion=args.fusion)
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
    )
    print(format_table(result))
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0


def cmd_demo(args) -> int:
    from fashion_search.demo import run_demo

    return run_demo(Path(args.dir), serve=not args.no_serve, port=args.port)


def add_commands(sub: argparse._SubParsersAction) -> None:
    from fashion_search.cli import _add_model_args, non_negative_int, port_number, positive_int
    from fashion_search.config import TrainConfig

    p = sub.add_parser("train", help="fine-tune on Fashion-IQ-style triplets")
    p.add_argument("--data", required=True, help="dataset root in the Fashion-IQ layout")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, last.pt, history.json)")
    p.add_argument("--config", help="YAML file of training options (flags override it)")
    p.add_argument("--categories", help="comma-separated subset of dress,shirt,toptee")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--quiet", action="store_true")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults.update(
        pretrained="openai; none for the compact fs-* models",
        device="the best available",
        max_steps_per_epoch="the whole epoch",
    )
    for name, typ in _TRAIN_FLAGS.items():
        shown = defaults[name] if defaults[name] is not None else "none"
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"default: {shown}")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="Fashion-IQ protocol Recall@1/5/10/50")
    p.add_argument("--data", required=True)
    _add_model_args(p, fusion=True)
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="offline end to end: synth -> train -> eval -> index -> web UI")
    p.add_argument("--dir", default="demo", help="where the demo's data, run and index live")
    p.add_argument("--no-serve", action="store_true", help="stop after indexing instead of launching the UI")
    p.add_argument("--port", type=port_number, default=8501)
    p.set_defaults(func=cmd_demo)

    for face in ("serve", "ui"):
        _add_face(sub, face)


def _add_face(sub: argparse._SubParsersAction, face: str) -> None:
    from fashion_search.cli import port_number

    def run(args) -> int:
        import importlib.util

        from fashion_search.service.ui_launch import check_port_free

        needs = ("fastapi", "uvicorn") if face == "serve" else ("streamlit",)
        missing = [name for name in needs if importlib.util.find_spec(name) is None]
        if missing:  # a CLI-only install (pip install .)
            raise FashionSearchError(
                f"`fashion-search {face}` needs {', '.join(missing)}: pip install 'fashion-search[{face}]'"
            )
        check_port_free(args.host, args.port)
        if face == "serve":
            from fashion_search.service.api import serve
        else:
            from fashion_search.service.ui_launch import serve
        return serve(args)

    p = sub.add_parser(
        face, help="HTTP API over an index" if face == "serve" else "Streamlit web UI over an index"
    )
    p.add_argument("--index", required=True, help="index directory (from `fashion-search index`)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)",
    )
    port = 8000 if face == "serve" else 8501
    p.add_argument("--port", type=port_number, default=port, help=f"default {port}")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    if face == "serve":
        _add_serve_limits(p)
    p.set_defaults(func=run)


def _add_serve_limits(p: argparse.ArgumentParser) -> None:
    from fashion_search.cli import non_negative_float, positive_float, positive_int

    g = p.add_argument_group("limits and operations")
    for flag, kind, default, text in (
        ("--max-upload-mb", positive_float, 10.0, "largest image upload (default 10)"),
        ("--max-pixels", positive_int, 40_000_000, "largest decoded image (default 40,000,000)"),
        ("--max-text-chars", positive_int, 10_000, "longest text query (default 10,000)"),
        ("--rate-limit", non_negative_float, 0.0, "requests per second per client address (default 0: off)"),
        ("--rate-burst", positive_int, None, "burst allowance (default: 2 s worth)"),
        (
            "--reload-interval",
            non_negative_float,
            2.0,
            "seconds between checks for a rebuilt index, swapped in without downtime (default 2; 0: off)",
        ),
        (
            "--graceful-timeout",
            non_negative_float,
            10.0,
            "on SIGTERM/SIGINT, seconds to let requests in flight finish (default 10)",
        ),
    ):
        g.add_argument(flag, type=kind, default=default, help=text)
    g.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        default=None,
        help="allow browser calls from this origin (repeatable; default: none)",
    )


__all__ = ["add_commands", "FashionSearchError"]
