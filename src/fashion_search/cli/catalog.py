"""CLI commands over catalogs and datasets: `synth`, `data check`, `download-fashioniq`, `index`, `info`,
`search`."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from fashion_search.cli.args import (
    add_device_arg,
    add_model_args,
    add_runtime_args,
    apply_runtime,
    load_model,
    non_negative_int,
    positive_float,
    positive_int,
    text_weight,
)
from fashion_search.errors import FashionSearchError


def cmd_synth(args) -> int:
    from fashion_search.data.synthetic import TrainDesign, generate

    if args.images_per_category < 1:
        raise FashionSearchError("--images-per-category must be positive")
    summary = generate(
        args.out,
        images_per_category=args.images_per_category,
        seed=args.seed,
        eval_gallery=args.eval_gallery,
        progress=not args.quiet,
        train_design=TrainDesign(look_size=args.train_look_size, varying=args.train_varying),
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
        pairs,
        Path(args.out),
        workers=args.workers,
        timeout=args.timeout,
        progress=not args.quiet,
        file_deadline=args.file_deadline,
    )
    print(
        f"downloaded {report.ok}, already present {report.skipped_existing}, failed {len(report.failed)} "
        f"(see {Path(args.out) / 'download_report.json'})"
    )
    if report.failed and not (report.ok or report.skipped_existing):
        print("fashion-search: error: every download failed (offline?); no image was saved", file=sys.stderr)
        return 1
    return 0


def cmd_index(args) -> int:
    from fashion_search.index.build import build_index
    from fashion_search.index.store import index_exists, read_manifest

    if not Path(args.images).is_dir():
        raise FashionSearchError(f"image folder not found: {args.images}")
    recorded, built = None, None
    if index_exists(Path(args.out)):
        built = read_manifest(Path(args.out))["model"]  # a re-run keeps the index's runtime by default
        if not args.checkpoint and not args.model:
            recorded = read_manifest(Path(args.out))["source"]  # and the model the index records
    kind, index_params = _backend(args)
    _check_ray_flags(args)
    model, source = load_model(args, recorded=recorded)
    model = apply_runtime(args, model, source, cache_dir=args.out, mode="throughput", recorded=built)
    if args.ray is not None and getattr(model, "runtime", "torch") != "torch":  # the index's recorded runtime
        raise FashionSearchError(_RAY_TORCH_ONLY.format(runtime=model.runtime))
    build = functools.partial(
        build_index,
        args.images,
        args.out,
        model,
        source,
        batch_size=args.batch_size,
        workers=args.workers,
        decode=args.decode,
        index_kind=kind,
        index_storage=args.index_storage,
        progress=not args.quiet,
        metadata=args.metadata,
        index_params=index_params,
    )
    if args.ray is None:
        report = build()
    else:
        from fashion_search.index.ray_embed import RayEmbedder, ray_session

        with ray_session(args.ray, progress=not args.quiet):
            report = build(embedder=RayEmbedder(model, batch_size=args.batch_size, actors=args.ray_actors))
    print(report.summary())
    for line in report.warnings():
        print(line, file=sys.stderr)
    return 0


def _check_ray_flags(args) -> None:
    """Flags of one embedding path given to the other would be silently ignored: refuse them."""
    if args.ray is None:
        if args.ray_actors is not None:
            raise FashionSearchError("--ray-actors needs --ray")
        return
    if args.workers is not None or args.decode != "auto":
        raise FashionSearchError("--workers and --decode apply without --ray; with --ray, Ray tasks decode")
    if args.runtime not in (None, "torch"):
        raise FashionSearchError(_RAY_TORCH_ONLY.format(runtime=args.runtime))


# The Ray actors rebuild the PyTorch model from its weights; exported graphs do not travel to them.
_RAY_TORCH_ONLY = "--ray embeds with PyTorch, not {runtime} (pass --runtime torch, which fp32 indexes accept, or leave out --ray)"


def _backend(args) -> tuple[str, dict | None]:
    """(index kind, constructor parameters) from --backend, --milvus-uri and --collection."""
    milvus_flags = args.milvus_uri is not None or args.collection is not None
    from fashion_search.index.store import index_exists, read_manifest

    if args.backend != "milvus":
        if milvus_flags:
            raise FashionSearchError("--milvus-uri and --collection need --backend milvus")
        if args.backend == "faiss" and index_exists(Path(args.out)):
            if read_manifest(Path(args.out))["index"]["kind"] == "milvus":
                raise FashionSearchError(f"{args.out} is a Milvus index: index into a new --out for FAISS")
        return args.index_type, None
    from fashion_search.index.milvus_index import check_collection, check_uri, default_collection

    if args.index_type not in ("auto", "milvus"):
        raise FashionSearchError("--index-type applies to the faiss backend; Milvus builds an HNSW index")
    if args.milvus_uri is None and not index_exists(Path(args.out)):
        raise FashionSearchError(
            "--backend milvus needs --milvus-uri (shop.db for Milvus Lite, or http://host:19530)"
        )
    params = {}
    if args.milvus_uri is not None:
        params["uri"] = check_uri(args.milvus_uri)
    if args.collection is not None:
        params["collection"] = check_collection(args.collection)
    elif not index_exists(Path(args.out)):
        params["collection"] = default_collection(args.out)
    return "milvus", params


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
    engine = SearchEngine.open(
        args.index,
        checkpoint=args.checkpoint,
        device=args.device,
        runtime=args.runtime,
        precision=args.precision,
        export_dir=args.export_dir,
    )
    results = engine.search(
        image=args.image,
        text=args.text,
        text_weight=args.text_weight,
        k=args.k,
        category=args.category,
        where=args.where,
        group=not args.no_group,
    )
    if args.json:
        print(json.dumps({"results": [r.to_dict() for r in results]}, indent=2))
    else:
        if not results:
            print(f"no results: the index holds {len(engine)} items", file=sys.stderr)
        for rank, r in enumerate(results, 1):
            product = f"  [{r.product_id}]" if r.product_id else ""
            print(f"{rank:3d}  {r.score:+.4f}  {r.id}{product}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in the Fashion-IQ layout")
    p.add_argument("out")
    p.add_argument(
        "--images-per-category", type=int, default=600, help="images of each category, all splits together"
    )
    p.add_argument(
        "--eval-gallery",
        type=int,
        default=None,
        help="images of each category in val and in test (default: a fifth each); train gets the rest",
    )
    p.add_argument(
        "--train-look-size",
        type=int,
        default=None,
        help="garments per train look (default: all of a line's, 15-32): smaller looks make more of them",
    )
    p.add_argument(
        "--train-varying",
        type=int,
        default=None,
        help="attributes each train line varies, 1-5 (default: as many as fit 2 looks of a ~64-garment "
        "line, 4 or 5; with --train-look-size, enough for it)",
    )
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
    p.add_argument("--timeout", type=positive_float, default=10.0, help="seconds per network operation")
    p.add_argument(
        "--file-deadline", type=positive_float, default=120.0, help="seconds for one attempt at one file"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("index", help="embed every image under a folder into an index (incremental)")
    p.add_argument("images", help="folder of catalog images (searched recursively)")
    p.add_argument("--out", required=True, help="index directory to create or update")
    add_model_args(p)
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
    p.add_argument(
        "--metadata",
        metavar="FILE",
        help="the items' attributes: CSV, JSON Lines or Parquet with a column `image` (the item id) and "
        "optionally `product_id`; every other column becomes a filterable attribute",
    )
    p.add_argument(
        "--backend",
        choices=("faiss", "milvus"),
        default=None,
        help="where the vectors are searched: faiss (files in --out, the default) or milvus (a collection)",
    )
    p.add_argument(
        "--milvus-uri",
        metavar="URI",
        help="Milvus Lite file (shop.db) or server (http://host:19530); a token is read from $MILVUS_TOKEN",
    )
    p.add_argument(
        "--collection", metavar="NAME", help="Milvus collection (default: fs_ + the --out folder name)"
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="embed on Ray Data: local (start Ray on this machine), auto (the cluster in $RAY_ADDRESS) or "
        "ray://HOST:10001; decoding runs in Ray tasks, the model in Ray actors (pip install "
        "'fashion-search[ray]')",
    )
    p.add_argument(
        "--ray-actors",
        type=positive_int,
        default=None,
        metavar="N",
        help="model actors with --ray (default: one per GPU of the cluster, else half its CPUs)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_args(p, rerun=True)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("info", help="describe an index")
    p.add_argument("--index", required=True)
    p.add_argument("--json", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("search", help="search an index by image, text, or both")
    p.add_argument("--index", required=True)
    p.add_argument("--image", help="reference image file")
    p.add_argument("--text", help="text query, or the change to apply to the image")
    p.add_argument(
        "--text-weight",
        type=text_weight,
        default=None,
        help="0 = image only, 1 = text only (default 0.5)",
    )
    p.add_argument("-k", type=positive_int, default=10, help="how many results (default 10)")
    p.add_argument("--category", default=None, help="only items under this top-level folder")
    p.add_argument(
        "--where",
        metavar="EXPR",
        help="filter by attributes, in Milvus's expression syntax: \"price < 50 and brand in ['Acme', 'Zed']\"",
    )
    p.add_argument(
        "--no-group",
        action="store_true",
        help="every matching image, not one result per product (when the catalog names products)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoint", default=None, help="override the model recorded in the index (must match)")
    add_device_arg(p)
    add_runtime_args(p, recorded=True)
    p.set_defaults(func=cmd_search)
