"""Exporting a retrieval model's graphs (image tower, text tower, fusion) to ONNX or OpenVINO IR.

An export is a folder: `image.*`, `text.*`, `fusion.*` (fusions with weights) and `manifest.json`, which
holds the model's identity (the keys an index records), the format, the precision and the library
versions. It is written to a temp folder beside the target and renamed into place, so a killed export
never leaves a half folder under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fashion_search.errors import FashionSearchError
from fashion_search.index.build import IDENTITY_KEYS
from fashion_search.models.retrieval import RetrievalModel
from fashion_search.runtime.quantize import (
    INT8_RECIPE,
    calibration_batches,
    method_for,
    quantize_onnx,
    quantize_openvino,
)

FORMAT = "fashion-search-export/1"
MANIFEST = "manifest.json"
FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
PRECISIONS = ("fp32", "int8")
OPSET = 17
_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
_PIP_EXTRA = {"onnx": "onnx", "openvino": "openvino"}


def require(fmt: str) -> None:
    """One line naming the package to install when a runtime's library is missing."""
    import importlib.util

    if fmt not in FORMATS:
        raise FashionSearchError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    missing = [name for name in _PACKAGES[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise FashionSearchError(
            f"--runtime {fmt} needs {', '.join(missing)}: pip install 'fashion-search[{_PIP_EXTRA[fmt]}]'"
        )


def model_key(model: RetrievalModel) -> str:
    """A short hash of the model's identity: an export is reused only by the model it was made from."""
    ident = model.identity()
    digest = hashlib.sha256(json.dumps({k: ident.get(k) for k in IDENTITY_KEYS}, sort_keys=True).encode())
    # Without a checkpoint a learned fusion's weights are a fresh random draw that the identity does not
    # name: its (small) weights go into the key, so a cached export never carries another draw's.
    for tensor in model.fusion.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def export_name(model: RetrievalModel, fmt: str, precision: str) -> str:
    key = model_key(model)
    if precision == "int8":  # an export cached by an older int8 recipe is not reused
        key = hashlib.sha256(f"{key}:int8-recipe-{INT8_RECIPE}".encode()).hexdigest()[:16]
    return f"{fmt}-{precision}-{key}"


class _ImageTower(nn.Module):
    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_features(pixels)


class _TextTower(nn.Module):
    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.text_features(tokens)


class _Fuse(nn.Module):
    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.fusion = model.fusion

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.fusion.fuse(image, text)


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _onnx_export(module: nn.Module, inputs: tuple, names: list[str], path: Path) -> None:
    batch = {name: {0: "n"} for name in [*names, "out"]}
    # The TorchScript exporter: open_clip's ViTs export through it reliably, and it gives one file.
    # Grad on: nn.MultiheadAttention takes its fused fast path (no ONNX symbol) in no-grad eval mode.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            inputs,
            str(path),
            input_names=names,
            output_names=["out"],
            dynamic_axes=batch,
            opset_version=OPSET,
            dynamo=False,
        )


def _to_openvino(src: Path, dst: Path, int8: bool, batches: list | None) -> None:
    import openvino as ov

    model = ov.convert_model(str(src))
    if int8:
        model = quantize_openvino(model, batches)
    ov.save_model(model, str(dst), compress_to_fp16=False)


def _versions() -> dict:
    from importlib import metadata

    out = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino", "open_clip_torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def export_model(
    model: RetrievalModel,
    out_dir: str | os.PathLike,
    fmt: str = "onnx",
    precision: str = "fp32",
    calibration: Sequence[str | os.PathLike] | None = None,
) -> Path:
    """Write the model's graphs to `out_dir` (replaced if present); returns it.

    int8 `calibration` photos make the image tower's activations int8 too, with ranges measured on
    them (see runtime/quantize.py); without, only the weights are int8."""
    require(fmt)
    if precision not in PRECISIONS:
        raise FashionSearchError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if calibration is not None and precision != "int8":
        raise FashionSearchError("calibration photos are for int8 exports: add --int8")
    if model.fusion.uses_tokens:
        raise FashionSearchError(
            f"the {model.fusion.name} fusion reads token features, which the exported graphs do not "
            "return: serve it with --runtime torch"
        )
    if model.device.type != "cpu":
        raise FashionSearchError("export a model loaded on the CPU (--device cpu)")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    batches = calibration_batches(model, calibration) if calibration is not None else None
    try:
        _write_graphs(model, tmp, fmt, precision, batches)
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp)  # another process exported the same model first: its copy serves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_graphs(model: RetrievalModel, tmp: Path, fmt: str, precision: str, batches: list | None) -> None:
    backbone = model.backbone.cpu().eval()
    size = backbone.image_size
    pixels = torch.zeros(2, 3, size, size)
    tokens = backbone.tokenize(["a red dress", "blue"])
    emb = torch.nn.functional.normalize(torch.ones(2, model.dim), dim=-1)
    graphs = {
        "image": (_ImageTower(model), (pixels,), ["pixels"]),
        "text": (_TextTower(model), (tokens,), ["tokens"]),
    }
    if _has_weights(model.fusion):  # sum is two additions: it runs in place, nothing to export
        graphs["fusion"] = (_Fuse(model), (emb, emb), ["image", "text"])
    files, methods = {}, {}
    for name, (module, inputs, names) in graphs.items():
        onnx_path = tmp / f"{name}.onnx"
        _onnx_export(module, inputs, names, onnx_path)
        # The fusion stays fp32: a few small matrix products, where int8 saves nothing and costs accuracy.
        int8 = precision == "int8" and name != "fusion"
        graph_batches = batches if name == "image" else None
        if int8:
            methods[name] = method_for(fmt, graph_batches is not None)
        if int8 and fmt == "onnx":
            quantized = tmp / f"{name}.int8.onnx"
            quantize_onnx(onnx_path, quantized, graph_batches)
            os.replace(quantized, onnx_path)
        if fmt == "openvino":
            _to_openvino(onnx_path, tmp / f"{name}.xml", int8, graph_batches)
            onnx_path.unlink()
            files[name] = [f"{name}.xml", f"{name}.bin"]
        else:
            files[name] = [f"{name}.onnx"]
        for extra in tmp.glob(f"{name}.onnx.data"):  # external weights of a graph over 2 GB
            files[name].append(extra.name)
    ident = model.identity()
    manifest = {
        "format": FORMAT,
        "export_format": fmt,
        "precision": precision,
        "quantization": methods,  # graph -> dynamic | static | weights (runtime/quantize.py)
        "calibration_images": sum(len(b) for b in batches) if batches else 0,
        "opset": OPSET,
        "identity": {k: ident.get(k) for k in IDENTITY_KEYS},
        "graphs": files,
        "sizes": {f: (tmp / f).stat().st_size for names in files.values() for f in names},
        "versions": _versions(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_export(export_dir: str | os.PathLike, model: RetrievalModel | None = None) -> dict:
    """The export's manifest, checked: files present at their recorded sizes, and (given `model`)
    made from that very model."""
    d = Path(export_dir)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise FashionSearchError(f"{d} is not a fashion-search export (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise FashionSearchError(f"cannot read export manifest {d / MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FashionSearchError(f"{d / MANIFEST} is not a fashion-search export manifest")
    for name, size in manifest.get("sizes", {}).items():
        path = d / name
        if not path.is_file():
            raise FashionSearchError(f"export {d} is incomplete: {name} is missing; export it again")
        if path.stat().st_size != size:
            raise FashionSearchError(
                f"export file {path} is damaged ({path.stat().st_size} bytes, {size} written); export it again"
            )
    if model is not None:
        ident = model.identity()
        diffs = [k for k in IDENTITY_KEYS if manifest["identity"].get(k) != ident.get(k)]
        if diffs:
            built = ", ".join(f"{k} {manifest['identity'].get(k)}" for k in diffs)
            raise FashionSearchError(
                f"export {d} was made from another model ({built}); export this one again"
            )
    return manifest
