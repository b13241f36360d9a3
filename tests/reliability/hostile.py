"""A generated catalog of hostile and odd image files, each with what the intake path must make of it."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE, GREEN, WHITE = (220, 30, 30), (30, 30, 220), (30, 200, 60), (255, 255, 255)


@dataclass(frozen=True)
class Case:
    """One file: its bytes, and either the upright size and probe colours it decodes to, or a reason."""

    name: str
    data: bytes
    size: tuple[int, int] | None = None  # expected (width, height) after decoding; None: refused
    probes: tuple = field(default=())  # ((x, y), (r, g, b)) pairs checked within a tolerance
    reason: str = ""  # a substring of the refusal reason

    @property
    def valid(self) -> bool:
        return self.size is not None


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _solid(colour, size=(48, 40), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, colour).convert(mode)


def _halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: shows which way a rotation went."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG header declaring width x height, with almost no pixel data: a bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def tiff_with_rational_offsets() -> bytes:
    """A TIFF whose StripOffsets tag claims the RATIONAL type: Pillow raised TypeError (found by fuzzing)."""
    data = bytearray(_encode(_solid(RED, (4, 4)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    (count,) = struct.unpack_from("<H", data, ifd)
    for n in range(count):
        entry = ifd + 2 + 12 * n
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 5)
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [_solid(c, (32, 32)) for c in (RED, GREEN, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; "rotate 90 degrees clockwise to display"
    return _encode(_halves((40, 20)), "JPEG", exif=exif.tobytes(), quality=95)


def _rgba_half_transparent() -> bytes:
    img = _solid(RED, (40, 40)).convert("RGBA")
    alpha = Image.new("L", (40, 40), 255)
    alpha.paste(0, (0, 0, 40, 20))  # top half fully transparent: must come out white, not black
    img.putalpha(alpha)
    return _encode(img, "PNG")


def _palette_transparent() -> bytes:
    img = _solid(BLUE, (30, 30)).convert("P")
    return _encode(img, "PNG", transparency=img.getpixel((0, 0)))


def _grey16(value: int) -> bytes:
    return _encode(Image.fromarray(np.full((20, 30), value, dtype=np.uint16)), "PNG")


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


def cases() -> list[Case]:
    """Every kind of file a real shop catalog holds, with the expected outcome of load_image."""
    centre = (24, 20)
    return [
        # -- valid but odd: decoded to upright RGB -------------------------------------------------
        Case("plain.jpg", _encode(_solid(RED), "JPEG"), (48, 40), ((centre, RED),)),
        Case("cmyk.jpg", _encode(_solid(RED, mode="CMYK"), "JPEG"), (48, 40), ((centre, RED),)),
        Case("cmyk scan.tif.jpg", _encode(_solid(BLUE, mode="CMYK"), "TIFF"), (48, 40), ((centre, BLUE),)),
        Case("grey16 mid.png", _grey16(32768), (30, 20), (((5, 5), (128, 128, 128)),)),
        Case("grey16 white.png", _grey16(65535), (30, 20), (((5, 5), WHITE),)),
        Case("palette.gif", _encode(_solid(GREEN).convert("P"), "GIF"), (48, 40), ((centre, GREEN),)),
        Case("palette-transparent.png", _palette_transparent(), (30, 30), (((5, 5), WHITE),)),
        Case("la.png", _encode(Image.new("LA", (16, 16), (0, 0)), "PNG"), (16, 16), (((8, 8), WHITE),)),
        Case("rgba.png", _rgba_half_transparent(), (40, 40), (((20, 5), WHITE), ((20, 35), RED))),
        Case("bilevel.png", _encode(Image.new("1", (16, 16), 1), "PNG"), (16, 16), (((8, 8), WHITE),)),
        Case("grey.jpg", _encode(_solid(RED, mode="L"), "JPEG"), (48, 40)),
        Case("animated.gif", _animated("GIF"), (32, 32), (((16, 16), RED),)),
        Case("animated.webp", _animated("WEBP"), (32, 32), (((16, 16), RED),)),
        Case("exif-rotated.jpg", _exif_rotated(), (20, 40), (((10, 5), RED), ((10, 35), BLUE))),
        Case("progressive.jpg", _encode(_solid(GREEN), "JPEG", progressive=True), (48, 40)),
        Case("one-pixel.png", _encode(_solid(BLUE, (1, 1)), "PNG"), (1, 1), (((0, 0), BLUE),)),
        # 4000x60 keeps its centre 1200x60 (MAX_ASPECT 20): all the model's centre crop ever looks at.
        Case("banner 4000x60.jpg", _encode(_solid(RED, (4000, 60)), "JPEG"), (1200, 60)),
        Case("strip 2x4000.png", _encode(_solid(BLUE, (2, 4000)), "PNG"), (2, 40)),
        Case("named ü ñ 中文.PNG", _encode(_solid(GREEN), "PNG"), (48, 40), ((centre, GREEN),)),
        Case("really a png.jpg", _encode(_solid(BLUE), "PNG"), (48, 40), ((centre, BLUE),)),
        # -- invalid: refused with a reason ----------------------------------------------------------
        Case("empty.jpg", b"", reason="empty file"),
        Case("truncated.jpg", _truncated_jpeg(), reason="truncated"),
        Case(
            "error-page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", reason="recognised"
        ),
        Case("random.png", np.random.default_rng(1).bytes(4096), reason="recognised"),
        Case("signature-only.png", b"\x89PNG\r\n\x1a\n", reason="recognised"),
        Case("bomb.png", png_declaring(100_000, 100_000), reason="decompression bomb"),
        Case(
            "postscript.jpg",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n",
            reason="recognised",
        ),
        Case("pcx-inside.jpg", _encode(_solid(RED), "PCX"), reason="recognised"),
        Case("bad-tiff-tags.jpg", tiff_with_rational_offsets(), reason="cannot decode"),
        Case(
            "svg.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', reason="recognised"
        ),
    ]


def write_corpus(root: Path, nested: bool = True) -> dict[str, Case]:
    """Write every case under `root` (valid ones also in a sub-folder), plus links that must be survived.

    Returns {item id: case} for the files an index build must list (indexed or skipped).
    """
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for case in cases():
        (root / case.name).write_bytes(case.data)
        expected[case.name] = case
    if nested:
        sub = root / "sub folder"
        sub.mkdir()
        (sub / "again.jpg").write_bytes(cases()[0].data)
        expected["sub folder/again.jpg"] = cases()[0]
        os.symlink("..", sub / "loop")  # a directory loop: must be walked once, not forever
        os.symlink("a.jpg", root / "b.jpg")  # a file symlink loop: not a file, not listed
        os.symlink("b.jpg", root / "a.jpg")
        os.symlink("missing.jpg", root / "dangling.jpg")
        os.mkfifo(root / "fifo.jpg")  # opening it would block forever
        (root / "folder.jpg").mkdir()  # a directory with an image name
        (root / "notes.txt").write_text("not an image name: never listed")
    return expected
