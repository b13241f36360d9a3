"""`fashion-search <command>`: a thin face over the library; heavy imports happen per command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fashion_search.background import in_background
from fashion_search.errors import FashionSearchError

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser, fusion: bool = False) -> None:
    p.add_argument("--checkpoint", help="a training run directory or its checkpoint.pt")
    p.add_argument(
        "--model", help="OpenCLIP architecture (ViT-B-32, ...) or a compact one (fs-tiny, fs-micro)"
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="OpenCLIP tag (openai, laion2b_s34b_b79k, ...), a weights file, or none for random weights "
        "(default: openai; none for the compact fs-* models)",
    )
    if fusion:
        p.add_argument("--fusion", default="sum", help="sum | combiner (without --checkpoint)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def _load_model(args, fusion: str = "sum"):
    from fashion_search.config import default_pretrained
    from fashion_search.index.build import index_source
    from fashion_search.models.checkpoint import create_model, load_checkpoint, resolve_checkpoint_path

    if args.checkpoint:
        if args.model:
            raise FashionSearchError("give either --checkpoint or --model, not both")
        path = resolve_checkpoint_path(args.checkpoint)
        model = load_checkpoint(path, device=args.device)
    else:
        if not args.model:
            raise FashionSearchError(
                "give --checkpoint RUN or --model NAME (with --pretrained TAG|FILE|none)"
            )
        pretrained = args.pretrained or default_pretrained(args.model)
        model = create_model(args.model, pretrained, fusion=fusion, device=args.device)
        path = None
    return model, index_source(model, path)


def cmd_index(args) -> int:
    from fashion_search.index.build import build_index, scan_catalog
    from fashion_search.index.store import index_exists, read_manifest

    if not Path(args.images).is_dir():
        raise FashionSearchError(f"image folder not found: {args.images}")
    if not args.checkpoint and not args.model and index_exists(Path(args.out)):
        # Re-running on an existing index: reuse the model it records.
        src = read_manifest(Path(args.out))["source"]
        args.checkpoint, args.model, args.pretrained = src.get("checkpoint"), None, None
        if not args.checkpoint:
            args.model, args.pretrained = src["model"], src["pretrained"]
    # The folder is scanned in a thread while the model is built: both take ~1 s at 50,000 files, and
    # the scan only lists and stats files (no torch or faiss work on that thread: one OpenMP pool).
    scanned = in_background(scan_catalog, Path(args.images).resolve())
    model, source = _load_model(args)
    report = build_index(
        args.images,
        args.out,
        model,
        source,
        catalog=scanned(),
        batch_size=args.batch_size,
        workers=args.workers,
        decode=args.decode,
        index_kind=args.index_type,
        index_storage=args.index_storage,
        progress=not args.quiet,
    )
    print(report.summary())
    for line in report.warnings():
        print(line, file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from fashion_search.service.engine import SearchEngine

    info = SearchEngine.open(args.index, device=args.device).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:18s} {value}")
    return 0


def cmd_search(args) -> int:
    from fashion_search.service.engine import SearchEngine

    if args.image is None and not args.text:
        raise FashionSearchError("give --image, --text, or both")
    if args.image is not None and not Path(args.image).is_file():
        what = "is not a file" if Path(args.image).exists() else "not found"
        raise FashionSearchError(f"query image {what}: {args.image}")
    if args.text_weight is not None and (args.image is None or not args.text):
        only = "a text" if args.image is None else "an image"
        print(
            f"note: --text-weight weighs an image against a text; this is {only}-only search",
            file=sys.stderr,
        )
    engine = SearchEngine.open(args.index, checkpoint=args.checkpoint, device=args.device)
    results = engine.search(
        image=args.image, text=args.text, text_weight=args.text_weight, k=args.k, category=args.category
    )
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results]}, indent=2))
    else:
        if not results:
            print(f"no results: the index holds {len(engine)} items", file=sys.stderr)
        for rank, r in enumerate(results, 1):
            print(f"{rank:3d}  {r.score:+.4f}  {r.id}")
    return 0


def _bounded(kind, low, strict: bool = False, high=None):
    """An argparse type: `kind` (int or float) >= low (> low if strict), <= high if given; NaN refused."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        ok = (value > low if strict else value >= low) and (high is None or value <= high)
        if not ok:  # NaN fails both comparisons
            bound = f"> {low}" if strict else f">= {low}"
            raise argparse.ArgumentTypeError(
                f"must be {bound}" + (f" and <= {high}" if high is not None else "") + f", got {text}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


positive_int = _bounded(int, 1)
non_negative_int = _bounded(int, 0)
positive_float = _bounded(float, 0.0, strict=True)
non_negative_float = _bounded(float, 0.0)
port_number = _bounded(int, 0, high=65535)
probability = _bounded(float, 0.0, high=1.0)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the contract's "one-line message naming the problem"), not
    the usage text and then the error; subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from fashion_search import __version__

    parser = _Parser(
        prog="fashion-search",
        description="Composed image retrieval for fashion: index a catalog of photos, search it by image, "
        "text or both, fine-tune and evaluate on Fashion-IQ, and serve an HTTP API and a web page.",
        epilog="`fashion-search COMMAND --help` lists a command's options and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"fashion-search {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="embed every image under a folder into an index (incremental)")
    p.add_argument("images", help="folder of catalog images (searched recursively)")
    p.add_argument("--out", required=True, help="index directory to create or update")
    _add_model_args(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward (default 32)")
    p.add_argument(
        "--workers", type=non_negative_int, default=None, help="decoding processes (default: cores - 1)"
    )
    p.add_argument(
        "--decode",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where JPEGs are decoded: gpu (nvJPEG on the CUDA device), cpu (the worker processes); "
        "auto: gpu when the model runs on CUDA and torchvision has nvJPEG",
    )
    p.add_argument("--index-type", default="auto", help="auto | exact | flat | hnsw | ivf")
    p.add_argument(
        "--index-storage",
        choices=("fp32", "fp16"),
        default=None,
        help="how the index keeps its vector copy: fp32 (default) or fp16 (half the memory; scores stay exact)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("info", help="describe an index")
    p.add_argument("--index", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("search", help="search an index by image, text, or both")
    p.add_argument("--index", required=True)
    p.add_argument("--image", help="reference image file")
    p.add_argument("--text", help="text query, or the change to apply to the image")
    p.add_argument(
        "--text-weight",
        type=probability,
        default=None,
        help="0 = image only, 1 = text only (default 0.5)",
    )
    p.add_argument("-k", type=positive_int, default=10, help="how many results (default 10)")
    p.add_argument("--category", default=None, help="only items under this top-level folder")
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoint", default=None, help="override the model recorded in the index (must match)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_search)

    from fashion_search import cli_data, cli_learning

    cli_data.add_commands(sub)
    cli_learning.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a bad flag: returned, so main() never exits itself
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except FashionSearchError as exc:
        print(f"fashion-search: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fashion-search: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fashion-search ... | head`: the reader left; exit quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run() -> None:
    """The console script: main(), then, on success, an immediate exit.

    Tearing down the thousands of modules torch and open_clip import took 1-2 s at interpreter exit
    (the tail of `benchmarks/bench_index.py`, docs/BENCHMARKS.md section 1), paid by every command after
    its work was done and its output written. On success there is nothing
    left to do: index files are written atomically and closed, DataLoader workers have exited, and
    stdout/stderr are flushed here. Errors take the normal exit path, cleanup included.
    """
    code = main()
    if code != 0:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    run()
