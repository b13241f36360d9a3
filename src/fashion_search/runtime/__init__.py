"""Exported CPU runtimes (ONNX Runtime, OpenVINO): `--runtime torch|onnx|openvino` and its export cache.

`use_runtime(model, "onnx")` returns a model with the same encode/compose methods whose forwards run in
an exported graph, exporting on first use into a cache folder keyed by the model's identity (beside
the checkpoint, or in the index folder for a model named by architecture) and reusing it afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from fashion_search.errors import FashionSearchError

RUNTIMES = ("torch", "onnx", "openvino")
PRECISIONS = ("fp32", "int8")
EXPORTS = "exports"


def default_cache_root() -> Path:
    """Where exports of a model named by architecture go when no index folder is at hand."""
    base = os.environ.get("FASHION_SEARCH_CACHE") or Path.home() / ".cache" / "fashion-search"
    return Path(base) / EXPORTS


def cache_roots(source: dict | None, fallback: str | os.PathLike | None) -> list[Path]:
    """Where a model's exports are looked for, in order: RUN/exports for a checkpoint, then
    `fallback`/exports (an index folder), else the user cache."""
    checkpoint = (source or {}).get("checkpoint")
    roots = [Path(checkpoint).parent / EXPORTS] if checkpoint else []
    return roots + [Path(fallback) / EXPORTS if fallback else default_cache_root()]


def _writable(path: Path) -> bool:
    for folder in (path, *path.parents):
        if folder.exists():
            return os.access(folder, os.W_OK)
    return False


def cache_root(source: dict | None, fallback: str | os.PathLike | None) -> Path:
    """Where a new export goes: the first writable of cache_roots (a read-only run folder, as mounted
    in a container, sends it to the index folder)."""
    roots = cache_roots(source, fallback)
    return next((root for root in roots if _writable(root)), roots[0])


def use_runtime(
    model,
    runtime: str | None = "torch",
    precision: str | None = "fp32",
    *,
    source: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    export_dir: str | os.PathLike | None = None,
    mode: str = "latency",
    threads: int | None = None,
):
    """`model` itself for torch fp32, else an ExportedModel over its export (made now if not cached).

    `export_dir` names an export made by `fashion-search export --out DIR`; otherwise the cache under
    cache_root(source, cache_dir) is used."""
    runtime, precision = runtime or "torch", precision or "fp32"
    if runtime not in RUNTIMES:
        raise FashionSearchError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    if precision not in PRECISIONS:
        raise FashionSearchError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if runtime == "torch":
        if export_dir:
            raise FashionSearchError("--export-dir runs an export: use it with --runtime onnx or openvino")
        if precision != "fp32":
            raise FashionSearchError(
                "--runtime torch runs the model in fp32; int8 needs --runtime onnx or openvino"
            )
        return model
    from fashion_search.runtime.export import export_model, export_name, require
    from fashion_search.runtime.exported import ExportedModel

    require(runtime)
    if model.device.type != "cpu":
        raise FashionSearchError(f"--runtime {runtime} runs on the CPU; leave out --device or use cpu")
    if export_dir is None:
        name = export_name(model, runtime, precision)
        found = [r / name for r in cache_roots(source, cache_dir) if (r / name / "manifest.json").is_file()]
        export_dir = found[0] if found else cache_root(source, cache_dir) / name
        if not found:
            try:
                export_model(model, export_dir, runtime, precision)
            except OSError as exc:
                raise FashionSearchError(
                    f"cannot export the model to {export_dir} ({exc.strerror or exc}): export it where "
                    "it can be written (fashion-search export --out DIR) and pass --export-dir DIR"
                ) from None
    exported = ExportedModel(model, export_dir, threads=threads, mode=mode)
    if (exported.runtime, exported.precision) != (runtime, precision):
        raise FashionSearchError(
            f"export {export_dir} is {exported.runtime} {exported.precision}, not {runtime} {precision}"
        )
    return exported
