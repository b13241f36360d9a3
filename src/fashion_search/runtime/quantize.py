"""int8 graphs for the exported runtimes, with or without calibration photos.

| runtime  | no calibration (`--int8`)                                   | `--int8 --calibration PHOTOS`                                |
|----------|-------------------------------------------------------------|--------------------------------------------------------------|
| ONNX     | ONNX Runtime dynamic: int8 weights per channel, activations  | image tower static (QDQ): activation ranges measured on the   |
|          | quantized per batch at run time                             | photos; text tower dynamic (photos say nothing about text)   |
| OpenVINO | NNCF weight compression: int8 weights, fp32 activations      | image tower NNCF post-training quantization on the photos;    |
|          |                                                             | text tower weight compression                                |

Only matrix products are quantized: the patch convolution, the token table and the fusion stay fp32
(ConvInteger is slow on CPUs, and the fusion's few small products save nothing). ONNX int8 weights use
7 of their 8 bits (`reduce_range`): on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake, AMD
before Zen 4) ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits, which saturate with
full-range weights (cosine to fp32 fell to 0.985 on a Zen 3 with them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fashion_search.errors import FashionSearchError

if TYPE_CHECKING:
    import numpy as np

# Raised whenever the int8 recipe changes, so a cached int8 export of an older recipe is made again.
INT8_RECIPE = 2
DEFAULT_CALIBRATION_IMAGES = 300
_CALIBRATION_BATCH = 8


def method_for(fmt: str, calibrated: bool) -> str:
    """What int8 means for one graph of one format (the table above): dynamic, static or weights."""
    if calibrated:
        return "static"
    return "dynamic" if fmt == "onnx" else "weights"


@contextmanager
def _quiet_loggers(*names: str):
    # ONNX Runtime's quantizer and NNCF log hints at the root logger / INFO: not for a CLI user. NNCF
    # also imports torch.utils.cpp_extension, which warns on a CPU machine with a CUDA build of torch
    # that no CUDA runtime is found: true, and irrelevant to an OpenVINO export.
    loggers = [logging.getLogger(name) for name in ("", *names)]
    before = [log.disabled for log in loggers]
    for log in loggers:
        log.disabled = True
    try:
        yield
    finally:
        for log, was in zip(loggers, before):
            log.disabled = was


def calibration_batches(model, photos: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """The photos as the image tower takes them (normalised float32), in batches of 8.

    Undecodable files are skipped; none decodable is a one-line error."""
    import torch

    from fashion_search.data.images import ImageDecodeError, load_image

    pipeline = model.pixel_pipeline
    pixels = []
    for path in photos:
        try:
            pixels.append(pipeline.to_uint8(load_image(Path(path))))
        except (ImageDecodeError, OSError):
            continue
    if not pixels:
        raise FashionSearchError("no decodable calibration photos: give a folder of catalog images")
    batches = []
    with torch.inference_mode():
        for i in range(0, len(pixels), _CALIBRATION_BATCH):
            x = model.model_input(torch.stack(pixels[i : i + _CALIBRATION_BATCH]))
            batches.append(x.float().contiguous().numpy())
    return batches


def calibration_photos(folder: str | os.PathLike, limit: int = DEFAULT_CALIBRATION_IMAGES) -> list[str]:
    """Up to `limit` images of a catalog folder, spread evenly over its sorted file list (a catalog's
    first files are often one product line)."""
    from fashion_search.data.images import iter_image_entries

    root = Path(folder)
    if not root.is_dir():
        raise FashionSearchError(f"calibration folder {root} does not exist or is not a folder")
    if limit < 1:
        raise FashionSearchError(f"--calibration-size must be >= 1, got {limit}")
    files = sorted(entry.path for entry in iter_image_entries(root))
    if not files:
        raise FashionSearchError(f"calibration folder {root} holds no images")
    step = max(1, len(files) / limit)
    return [files[int(i * step)] for i in range(min(limit, len(files)))]


def quantize_onnx(src: Path, dst: Path, batches: list[np.ndarray] | None = None) -> None:
    """int8 ONNX graph: dynamic without `batches`, static QDQ with activation ranges from them."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with _quiet_loggers():
        if batches is None:
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                reduce_range=True,
            )
            return
        quantize_static(
            str(src),
            str(dst),
            _Reader(batches),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            reduce_range=True,
        )


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over prepared batches (its calibrators only call
    get_next)."""

    def __init__(self, batches: list[np.ndarray]):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {"pixels": batch}


def quantize_openvino(model, batches: list[np.ndarray] | None = None):
    """int8 OpenVINO model via NNCF: weight compression without `batches`, post-training quantization
    (activations too) with them."""
    with _quiet_loggers("torch.utils.cpp_extension"):
        try:
            import nncf
        except ImportError:
            raise FashionSearchError(
                "OpenVINO int8 needs NNCF: pip install 'fashion-search[openvino]'"
            ) from None
        nncf.set_log_level(logging.ERROR)
        if batches is None:
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        return nncf.quantize(
            model,
            nncf.Dataset(batches),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(batches),  # dataset items are batches
        )
