"""One hardened path from a file or bytes to an RGB image, shared by indexing, training and uploads."""

from __future__ import annotations

import functools
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fashion_search.errors import ImageDecodeError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

# Pillow's own guard (~89 Mpx) stays on; we refuse at the same limit *before* decoding, as an error
# rather than a warning, so a gigapixel upload never reaches the decoder.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# A long thin strip is a memory bomb one step later: the model's transform scales the short side up to
# its input size, so a 1x100,000 PNG of a few kB would become 224x22.4M pixels (15 GB) for ViT-B-32.
# Centre-cropping the long side to MAX_ASPECT x the short one keeps every pixel that the transform's
# centre crop uses, and bounds that step to 224x4,480.
MAX_ASPECT = 20

# A truncated JPEG must be reported, not half-decoded with grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = str | os.PathLike | bytes | BinaryIO

# The only decoders that ever see untrusted bytes: what shops publish, plus TIFF for scans. Left to
# itself Pillow tries ~40 plugins, among them EPS (which hands the file to Ghostscript when installed)
# and rarely exercised decoders (FLI, PCX, SGI, ...) whose bugs are the usual attack surface.
_WANTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")


@functools.cache
def allowed_formats() -> tuple[str, ...]:
    """The Pillow formats load_image decodes (those of _WANTED_FORMATS this Pillow build supports)."""
    Image.init()
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode `source` into an upright RGB image, or raise ImageDecodeError with a short reason.

    `draft_size` lets JPEG decode at a reduced scale (DCT scaling) when the caller will shrink the
    image anyway: several times faster for large photos and never smaller than the requested size.
    """
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageDecodeError("empty file")
        return _decode(io.BytesIO(source), max_pixels, draft_size)
    if not isinstance(source, str | os.PathLike):
        if getattr(source, "seekable", lambda: False)():
            start = source.tell()
            if not source.read(1):
                raise ImageDecodeError("empty file")
            source.seek(start)
        return _decode(source, max_pixels, draft_size)
    with _open_regular(source) as fh:
        return _decode(fh, max_pixels, draft_size)


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, with load_image's refusals (not a regular file, empty, unreadable)."""
    with _open_regular(path) as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file ({exc.strerror or type(exc).__name__})") from None


def _open_regular(path: str | os.PathLike) -> BinaryIO:
    try:
        # stat before open: opening a FIFO or a device named "x.jpg" would block or never end.
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError("not a regular file")
        if st.st_size == 0:
            raise ImageDecodeError("empty file")
        return open(path, "rb")  # the caller's with closes it, also when decoding fails
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file ({exc.strerror or type(exc).__name__})") from None


def _decode(fp: BinaryIO, max_pixels: int, draft_size: tuple[int, int] | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=allowed_formats())
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels"
                )
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()  # first frame of an animated GIF/WebP
            img = ImageOps.exif_transpose(img)
            return to_rgb(_bound_aspect(img))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a recognised image format (accepted: {', '.join(allowed_formats())})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow refuses before our own check sees the size: the limit in force is the lower of the two.
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageDecodeError(f"decompression bomb refused: over the limit of {limit:,} pixels") from None
    except Exception as exc:
        # Pillow's decoders answer hostile bytes with OSError, SyntaxError, ValueError and EOFError, but
        # also TypeError, IndexError, KeyError... (found by tests/reliability/test_fuzz.py): all of them
        # mean "this is not a usable image", a reason to report, never a crash of the batch or the server.
        raise ImageDecodeError(f"cannot decode image ({str(exc) or type(exc).__name__})") from None


def _bound_aspect(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w > MAX_ASPECT * h:
        left = (w - MAX_ASPECT * h) // 2
        return img.crop((left, 0, left + MAX_ASPECT * h, h))
    if h > MAX_ASPECT * w:
        top = (h - MAX_ASPECT * w) // 2
        return img.crop((0, top, w, top + MAX_ASPECT * w))
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16-bit and float scaled, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max(initial=0)), 1.0)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the name has a supported image extension (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def iter_image_files(root: str | os.PathLike) -> Iterator[Path]:
    """Yield image files under `root` recursively, sorted, following symlinks without looping."""
    for entry in iter_image_entries(root):
        yield Path(entry.path)


def iter_image_entries(root: str | os.PathLike) -> Iterator[os.DirEntry]:
    """iter_image_files as os.DirEntry objects: a catalog scan of 50,000 files spends most of its time
    building Path objects, which `scan_catalog` does not need (entry.path is a str under `root`)."""
    seen_dirs: set[tuple[int, int]] = set()

    def walk(directory: str) -> Iterator[os.DirEntry]:
        try:
            st = os.stat(directory)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:  # a symlink loop or a second link to a folder already walked
            return
        seen_dirs.add(key)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    yield from walk(entry.path)
                elif entry.is_file(follow_symlinks=True) and is_image_file(entry.name):
                    yield entry
            except OSError:
                continue

    yield from walk(os.fspath(root))
