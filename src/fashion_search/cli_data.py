"""CLI commands for datasets: `synth`, `data check`, `download-fashioniq`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fashion_search.errors import FashionSearchError


def cmd_synth(args) -> int:
    from fashion_search.data.synthetic import generate

    if args.images_per_category < 1:
        raise FashionSearchError("--images-per-category must be positive")
    summary = generate(
        args.out, images_per_category=args.images_per_category, seed=args.seed, progress=not args.quiet
    )
    print(json.dumps(summary, indent=2) if args.json else f"synthetic dataset written to {args.out}")
    return 0


def cmd_data_check(args) -> int:
    from fashion_search.data.fashioniq import FashionIQ, format_summary

    summary = FashionIQ(args.dir).summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_download(args) -> int:
    from fashion_search.data.download import download_images, read_url_lists

    pairs = read_url_lists([Path(p) for p in args.urls])
    report = download_images(
        pairs, Path(args.out), workers=args.workers, timeout=args.timeout, progress=not args.quiet
    )
    print(
        f"downloaded {report.ok}, already present {report.skipped_existing}, failed {len(report.failed)} "
        f"(see {Path(args.out) / 'download_report.json'})"
    )
    if report.failed and not (report.ok or report.skipped_existing):
        print("fashion-search: error: every download failed (offline?); no image was saved", file=sys.stderr)
        return 1
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from fashion_search.cli import positive_float, positive_int

    p = sub.add_parser("synth", help="write a synthetic dataset in the Fashion-IQ layout")
    p.add_argument("out")
    p.add_argument("--images-per-category", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    c = data_sub.add_parser("check", help="count triplets and images present per split and category")
    c.add_argument("dir", help="dataset root (captions/, image_splits/, images/)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("download-fashioniq", help="fetch Fashion-IQ images from ASIN-URL lists (resumable)")
    p.add_argument("--urls", nargs="+", required=True, help="asin2url.*.txt files (ASIN \\t URL)")
    p.add_argument("--out", required=True, help="images directory, e.g. DATA/images")
    p.add_argument("--workers", type=positive_int, default=8)
    p.add_argument("--timeout", type=positive_float, default=10.0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_download)
