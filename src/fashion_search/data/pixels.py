"""Image -> model input in two halves: geometry on the CPU as uint8, normalisation on the model's device.

Why split OpenCLIP's eval transform (Resize, CenterCrop, convert, ToTensor, Normalize): a float32 batch
is 4x the bytes of the same pixels in uint8, and every byte of it crosses shared memory (decode workers
-> main process), pinned memory and the host -> GPU bus. Shipping uint8 and normalising on the device
(one cheap element-wise step) gives bit-identical tensors on the CPU (same operations, same order) and
a quarter of the traffic on a GPU.

The same split lets JPEGs skip the CPU altogether on CUDA: `DeviceJpegDecoder` decodes a batch with
nvJPEG (torchvision.io.decode_jpeg on the GPU) and applies the same geometry there. Only files that
decode to the same picture as Pillow's path are sent that way (`device_decodable`): 3-channel JPEGs
(baseline or progressive) without an EXIF rotation, within the pixel and aspect limits. Everything
else -- PNG, WebP, CMYK, grey, rotated, cut-short files -- takes the CPU path in the workers.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from fashion_search.data.images import MAX_ASPECT, load_image

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class PixelPipeline:
    """The eval transform split at ToTensor: `geometry` (PIL -> PIL), then `normalise` (uint8 -> float)."""

    geometry: T.Compose
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_transform(cls, transform: T.Compose) -> PixelPipeline | None:
        """Split OpenCLIP's eval transform; None when it does not end in ToTensor + Normalize."""
        steps = list(getattr(transform, "transforms", []))
        if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
            return None
        norm = steps[-1]
        return cls(T.Compose(steps[:-2]), tuple(norm.mean), tuple(norm.std))

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, S, S) uint8, exactly the pixels ToTensor would have scaled."""
        arr = np.asarray(self.geometry(image), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) uint8 (or float in 0..255, as augmentation leaves them) on any device -> float32
        model input (ToTensor's /255, then Normalize)."""
        x = pixels.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def at_size(self, size: int) -> PixelPipeline:
        """The same geometry producing `size` x `size` pixels (training ships them larger than the model's
        input, to augment; training/augment.py). Only for resize + centre crop (`resize_and_crop`)."""
        self._shape()
        steps = []
        for step in self.geometry.transforms:
            if isinstance(step, T.Resize):
                step = T.Resize(size, interpolation=step.interpolation, antialias=step.antialias)
            elif isinstance(step, T.CenterCrop):
                step = T.CenterCrop(size)
            steps.append(step)
        return PixelPipeline(T.Compose(steps), self.mean, self.std)

    def resize_tensors(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) float pixels in 0..255 -> (n, 3, S, S) float, clamped but not rounded: the geometry
        (Resize of the shortest side, antialiased, + CenterCrop) written out on tensors, on their device.
        Only for resize + centre crop in bicubic or bilinear (`tensor_mode`)."""
        s, interpolation = self._shape()
        h, w = images.shape[-2:]
        # torchvision's shortest-side rule: the long side is truncated, not rounded.
        new_h, new_w = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
        x = images.to(torch.float32)
        if (new_h, new_w) != (h, w):
            x = torch.nn.functional.interpolate(
                x, size=[new_h, new_w], mode=tensor_mode(interpolation), align_corners=False, antialias=True
            )
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        return x[:, :, top : top + s, left : left + s].clamp(0, 255)

    def _shape(self) -> tuple[int, T.InterpolationMode]:
        shape = self.resize_and_crop()
        if shape is None:
            raise ValueError("the model's preprocessing is not resize + centre crop")
        return shape

    def resize_and_crop(self) -> tuple[int, T.InterpolationMode] | None:
        """(size, interpolation) when the geometry is Resize(shortest side) + CenterCrop(square) -- the
        shape that DeviceJpegDecoder reproduces on tensors; None for anything else."""
        steps = [s for s in self.geometry.transforms if type(s).__name__ != "MaybeConvertMode"]
        if len(steps) != 2 or not isinstance(steps[0], T.Resize) or not isinstance(steps[1], T.CenterCrop):
            return None
        resize, crop = steps
        size = (
            resize.size
            if isinstance(resize.size, int)
            else (resize.size[0] if len(resize.size) == 1 else None)
        )
        if size is None or resize.max_size is not None or tuple(crop.size) != (size, size):
            return None
        return size, resize.interpolation


def device_decodable(data: bytes, max_pixels: int) -> bool:
    """True when nvJPEG would produce what load_image + Pillow would: read from the header only (~0.1 ms)."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return False  # not a JPEG, or cut short: Pillow's path reports it properly
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
                w, h = img.size
                return (
                    img.format == "JPEG"  # not MPO (multi-picture) or another subtype
                    and img.mode == "RGB"  # 3-channel YCbCr; grey and CMYK take the CPU path
                    and w * h <= max_pixels
                    and max(w, h) <= MAX_ASPECT * min(w, h)
                    and img.getexif().get(_EXIF_ORIENTATION, 1) == 1
                )
    except Exception:  # any header Pillow cannot read goes the CPU path, which explains the failure
        return False


def tensor_mode(interpolation: T.InterpolationMode) -> str:
    """torch's interpolate mode for a Resize's interpolation (bicubic or bilinear)."""
    mode = {T.InterpolationMode.BICUBIC: "bicubic", T.InterpolationMode.BILINEAR: "bilinear"}.get(
        interpolation
    )
    if mode is None:
        raise ValueError(f"unsupported interpolation {interpolation} for resizing tensors")
    return mode


GROUP_ELEMENTS = 1 << 28  # images of one size resized together: at most ~1 GiB of float32 at a time


class DeviceJpegDecoder:
    """A batch of JPEG files' bytes -> (n, 3, S, S) uint8 on `device`, geometry as the PixelPipeline's.

    The geometry is torchvision's Resize(shortest side, antialias) + CenterCrop written out on float
    tensors (its arithmetic: resize, crop, clamp, round), so that images of one size -- most of a shop's
    catalog -- are resized together: a handful of kernel launches per size instead of per image.
    """

    def __init__(self, pipeline: PixelPipeline, device: torch.device | str):
        shape = pipeline.resize_and_crop()
        if shape is None:
            raise ValueError("the model's preprocessing is not resize + centre crop; decode on the CPU")
        self.size, interpolation = shape
        tensor_mode(interpolation)  # refused here, not at the first batch
        self.pipeline = pipeline
        self.device = torch.device(device)

    def __call__(self, payloads: Sequence[torch.Tensor]) -> torch.Tensor:
        decoded = decode_jpegs(list(payloads), self.device)
        out = torch.empty((len(decoded), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, img in enumerate(decoded):
            by_shape.setdefault(tuple(img.shape), []).append(j)
        for (_, h, w), rows in by_shape.items():
            # In float32 a group is 12 bytes a pixel: 256 phone photos of 12 Mpx would need 37 GB at once.
            step = max(1, GROUP_ELEMENTS // (3 * h * w))
            for start in range(0, len(rows), step):
                part = rows[start : start + step]
                group = torch.stack([decoded[j] for j in part]) if len(part) > 1 else decoded[part[0]][None]
                out[part] = self._resize_and_crop(group)
        return out

    def _resize_and_crop(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipeline.resize_tensors(images).round_().to(torch.uint8)

    def one(self, data: bytes, pipeline: PixelPipeline, max_pixels: int) -> torch.Tensor:
        """One file's (1, 3, S, S) uint8 on the device; a file nvJPEG refuses is decoded by Pillow at full
        size (as nvJPEG would have), and one Pillow refuses too raises its ImageDecodeError."""
        try:
            return self([torch.frombuffer(bytearray(data), dtype=torch.uint8)])
        except RuntimeError:
            return pipeline.to_uint8(load_image(data, max_pixels=max_pixels))[None].to(self.device)


def decode_jpegs(payloads, device: torch.device | str):
    """torchvision.io.decode_jpeg (RGB). torchvision 0.29 deprecates its image codecs in favour of
    TorchCodec and warns on every call; they still work, and every torchvision since 0.19 has them.

    On CUDA it first waits for the work queued on the calling thread's current stream: nvJPEG writes its
    output into memory that PyTorch's caching allocator hands out as soon as it is freed on that stream,
    without waiting for the kernels still queued there to read it, and the hardware decoder of an A100
    or H100 ignores stream order altogether (pytorch/vision PR 9606, meta-pytorch/torchcodec PR 1634):
    a batch's pixels or a forward's activations could be overwritten, silently. A thread that shares
    its stream with another (which may free a block right after this wait) must decode on a stream of
    its own (data.loading does).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)


def nvjpeg_problem(device: torch.device) -> str | None:
    """Why torchvision cannot decode JPEGs on this device (a one-pixel probe); None when it can."""
    if device.type != "cuda":
        return f"the model is on {device.type}, not CUDA"
    try:
        from torchvision.io import encode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            probe = encode_jpeg(torch.zeros((3, 8, 8), dtype=torch.uint8))
        decode_jpegs(probe, device)
        return None
    except Exception as exc:  # whatever the build lacks (nvJPEG, its library, a kernel image), say what
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"torchvision's nvJPEG probe failed: {type(exc).__name__}: {first}"[:300]


def nvjpeg_available(device: torch.device) -> bool:
    """Whether torchvision can decode JPEGs on this CUDA device (a one-pixel probe)."""
    return nvjpeg_problem(device) is None
