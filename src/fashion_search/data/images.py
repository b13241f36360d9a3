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
    max_decode_bytes: int | None = None,
) -> Image.Image:
    """Decode `source` into an upright RGB image, or raise ImageDecodeError with a short reason.

    `draft_size` lets JPEG decode at a reduced scale (DCT scaling) when the caller will shrink the
    image anyway: several times faster for large photos and never smaller than the requested size;
    other formats are box-reduced to about twice that size before any mode conversion.
    `max_decode_bytes` bounds the memory decoding takes (see decode_cost), which for a 16-bit or
    palette image is several times what its pixel count suggests.
    """
    args = (max_pixels, draft_size, max_decode_bytes)
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageDecodeError("empty file")
        return _decode(io.BytesIO(source), *args)
    if not isinstance(source, str | os.PathLike):
        if getattr(source, "seekable", lambda: False)():
            start = source.tell()
            if not source.read(1):
                raise ImageDecodeError("empty file")
            source.seek(start)
        return _decode(source, *args)
    with _open_regular(source) as fh:
        return _decode(fh, *args)


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


# Peak bytes per pixel from decoding to an 8-bit RGB image, by decoded mode: Pillow keeps RGB-like
# modes in 4 bytes a pixel; 16-bit and 32-bit grey are brought to 8 bits in bands (one byte a pixel
# more); a palette image is expanded to RGB(A) whole, as it cannot be box-reduced first.
_DECODE_BYTES = {"1": 2, "L": 1, "P": 5, "I;16": 3, "I;16B": 3, "I;16L": 3, "I;16N": 3, "I": 5, "F": 5}


def decode_cost(mode: str, width: int, height: int) -> int:
    """Bytes of memory that decoding a `mode` image of width x height takes at its peak."""
    return width * height * _DECODE_BYTES.get(mode, 4)


def _decode(
    fp: BinaryIO, max_pixels: int, draft_size: tuple[int, int] | None, max_decode_bytes: int | None
) -> Image.Image:
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
            # After draft: a JPEG's cost is that of its reduced scale, which is all that is decoded.
            cost = decode_cost(img.mode, *img.size)
            if max_decode_bytes is not None and cost > max_decode_bytes:
                raise ImageDecodeError(
                    f"image is {img.size[0]}x{img.size[1]} pixels of mode {img.mode}: decoding takes "
                    f"{cost / 2**20:,.0f} MB, over the limit of {max_decode_bytes / 2**20:,.0f} MB"
                )
            img.load()  # first frame of an animated GIF/WebP
            if draft_size is not None:
                img = _reduce(img, draft_size)
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


def _reduce(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Box-reduce by an integer factor to no less than twice `size` on the short side: the model's
    resize then works on a few hundred pixels rather than thousands (what Pillow's thumbnail does
    with reducing_gap=2), and the 8-bit conversion below on a fraction of the pixels."""
    factor = min(img.size) // (2 * max(size))
    if factor < 2:
        return img
    # Image.reduce does not take these modes: bring them to the narrowest mode it does take.
    if img.mode.startswith("I;16"):
        img = _grey_to_8bit(img)
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return img.reduce(factor)


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
        return _grey_to_8bit(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_8bit(img: Image.Image, band_rows: int = 256) -> Image.Image:
    """16/32-bit or float grey scaled to 8 bits a band of rows at a time: converting a large image to
    float32 whole would take 4 bytes a pixel more than the decoded image itself."""
    top_value = float(img.getextrema()[1] or 0)
    top = 65535.0 if img.mode.startswith("I;16") or top_value > 255 else 255.0
    if img.mode == "F":
        top = max(top_value, 1.0)
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    for row in range(0, height, band_rows):
        band = np.asarray(img.crop((0, row, width, min(height, row + band_rows))), dtype=np.float32)
        out[row : row + band.shape[0]] = np.clip(band / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


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
