"""What every command group shares: the parser class, argument types, model flags and model loading."""

from __future__ import annotations

import argparse

from fashion_search.errors import FashionSearchError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the contract's "one-line message naming the problem"), not
    the usage text and then the error; subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def text_weight(text: str) -> float:
    """An argparse type for --text-weight, checked by the fusion's own rule (models/fusion.py)."""
    from fashion_search.models.fusion import check_text_weight

    try:
        return check_text_weight(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    except FashionSearchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


text_weight.__name__ = "float"


def add_model_args(p: argparse.ArgumentParser, fusion: bool = False) -> None:
    p.add_argument("--checkpoint", help="a training run directory or its checkpoint.pt")
    p.add_argument(
        "--model",
        help="OpenCLIP architecture (ViT-B-32, ...) or a compact one (fs-rn-tiny, fs-tiny, fs-micro)",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="OpenCLIP tag (openai, laion2b_s34b_b79k, ...), a weights file, or none for random weights "
        "(default: openai; none for the compact fs-* models)",
    )
    if fusion:
        p.add_argument("--fusion", default="sum", help="sum | combiner | attention (without --checkpoint)")
    add_device_arg(p)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def load_model(args, fusion: str = "sum", recorded: dict | None = None):
    """The model the flags ask for (models.checkpoint.resolve_model) and its source record for an index."""
    from fashion_search.models.checkpoint import model_source, resolve_model

    model = resolve_model(
        args.checkpoint, args.model, args.pretrained, fusion, args.device, recorded=recorded
    )
    checkpoint = args.checkpoint if args.checkpoint or args.model else (recorded or {}).get("checkpoint")
    return model, model_source(model, checkpoint)


def add_runtime_args(p: argparse.ArgumentParser, recorded: bool = False, rerun: bool = False) -> None:
    """--runtime / --precision / --export-dir (runtime/__init__.py); `recorded`: the defaults are what
    the index records; `rerun`: they are on a re-run of `index`."""
    default, default_precision = ("the index's", "the index's") if recorded else ("torch", "fp32")
    if rerun:
        default, default_precision = (f"{d}; a re-run: the index's" for d in (default, default_precision))
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx", "openvino"),
        default=None,
        help=f"what runs the model on the CPU: torch, onnx (ONNX Runtime) or openvino; an exported runtime "
        f"exports the model on first use and reuses the export (default: {default})",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default=None,
        help=f"int8: the export with int8 weights (made on first use without calibration; `fashion-search "
        f"export --int8 --calibration PHOTOS` for int8 activations) (default: {default_precision})",
    )
    p.add_argument("--export-dir", default=None, help="use this export (from `fashion-search export --out`)")


def apply_runtime(args, model, source: dict | None, cache_dir=None, mode: str = "latency", recorded=None):
    """The model under the runtime the flags (or the index's `recorded` identity) ask for."""
    from fashion_search.runtime import use_runtime

    recorded = recorded or {}
    runtime = args.runtime or (recorded.get("runtime") if not args.export_dir else None)
    precision = args.precision or (recorded.get("precision") if runtime == recorded.get("runtime") else None)
    if args.export_dir and not args.runtime:
        from fashion_search.runtime.export import read_export

        manifest = read_export(args.export_dir)
        runtime, precision = manifest["export_format"], manifest["precision"]
    return use_runtime(
        model,
        runtime,
        precision,
        source=source,
        cache_dir=cache_dir,
        export_dir=args.export_dir,
        mode=mode,
    )
