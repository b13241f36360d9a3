"""Rendering of the synthetic garments: the attribute vocabulary, Pillow pictures and relative captions."""

from __future__ import annotations

import colorsys
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

# Named garment colours, far apart in RGB so each stays nameable at 64 px after JPEG and resizing.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 40),
    "orange": (245, 130, 25),
    "yellow": (245, 215, 40),
    "green": (40, 150, 65),
    "blue": (55, 125, 230),
    "navy": (25, 35, 100),
    "purple": (125, 50, 165),
    "pink": (245, 140, 185),
    "brown": (120, 70, 35),
    "black": (25, 25, 25),
    "white": (248, 248, 248),
    "grey": (135, 135, 135),
}

CATEGORIES = ("dress", "shirt", "toptee")
ATTRIBUTES = ("colour", "sleeve", "length", "pattern", "neckline")
_VALUES = {
    "colour": tuple(PALETTE),
    "sleeve": ("sleeveless", "short", "long"),
    "pattern": ("solid", "stripes", "dots", "checks"),
    "neckline": ("round", "v-neck", "square"),
}
_LENGTHS = {"dress": ("mini", "knee", "maxi"), "shirt": ("cropped", "regular", "long")}
_LENGTHS["toptee"] = _LENGTHS["shirt"]
# "darker"/"lighter" is only said where the reference's hue has exactly one darker/lighter palette colour.
DARKER = {"blue": "navy", "grey": "black", "pink": "red"}
LIGHTER = {"navy": "blue", "grey": "white", "red": "pink"}

_P_RELATIVE = 0.7  # "longer sleeves" rather than "long sleeves", where the reference pins it down
_P_SPLIT = 0.3  # the two captions share out the changes rather than both naming all of them


def values(attr: str, category: str) -> tuple[str, ...]:
    """The values an attribute takes for a category (length is phrased per category)."""
    return _LENGTHS[category] if attr == "length" else _VALUES[attr]


# -- captions ---------------------------------------------------------------------------------------
# A claim is (attribute, op, value): op "is" names the target value; "more"/"less" is relative to the
# reference (longer / shorter, darker / lighter), with the target value it stands for (None once parsed).
_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("colour", "is"): (
        "is {}",
        "in {}",
        "make it {}",
        "{} colored",
        "change the color to {}",
        "is {} instead",
    ),
    ("colour", "more"): ("is darker", "a darker shade", "darker in color", "in a deeper color"),
    ("colour", "less"): ("is lighter", "a lighter shade", "lighter in color", "in a paler color"),
    ("sleeve", "sleeveless"): ("is sleeveless", "has no sleeves", "without sleeves"),
    ("sleeve", "short"): ("has short sleeves", "is short-sleeved", "with short sleeves"),
    ("sleeve", "long"): ("has long sleeves", "is long-sleeved", "with long sleeves"),
    ("sleeve", "more"): ("has longer sleeves", "with longer sleeves", "is longer-sleeved"),
    ("sleeve", "less"): ("has shorter sleeves", "with shorter sleeves", "is shorter-sleeved"),
    ("length", "mini"): ("is a mini dress", "is mini length", "ends above the knee"),
    ("length", "knee"): ("is knee length", "hits the knee", "is a knee-length dress"),
    ("length", "maxi"): ("is a maxi dress", "is floor length", "make it a maxi dress"),
    ("length", "cropped"): ("is cropped", "has a cropped cut", "shows the midriff"),
    ("length", "regular"): ("is regular length", "hits at the hip", "is standard length"),
    ("length", "long"): ("is longline", "is tunic length", "covers the hips"),
    ("length", "more"): ("is longer", "has a longer hem", "make it longer", "a longer cut"),
    ("length", "less"): ("is shorter", "has a shorter hem", "make it shorter", "a shorter cut"),
    ("pattern", "solid"): ("is solid", "is plain", "has no pattern", "without a print"),
    ("pattern", "stripes"): ("is striped", "has stripes", "with stripes"),
    ("pattern", "dots"): ("has polka dots", "is dotted", "with dots"),
    ("pattern", "checks"): ("is checked", "is plaid", "has a check pattern"),
    ("neckline", "round"): ("has a round neck", "has a crew neck", "with a round neckline"),
    ("neckline", "v-neck"): ("has a v-neck", "with a v neckline", "is v-necked"),
    ("neckline", "square"): ("has a square neck", "with a square neckline", "is square-necked"),
}


def _phrase_table() -> dict[str, tuple[str, str, str | None]]:
    # Every concrete phrase -> (attr, op, value or None for relative ops); one phrase, one meaning.
    table: dict[str, tuple[str, str, str | None]] = {}
    for (attr, key), phrases in _PHRASES.items():
        for phrase in phrases:
            if attr == "colour" and key == "is":
                items = [(phrase.format(c), (attr, "is", c)) for c in _VALUES["colour"]]
            elif key in ("more", "less"):
                items = [(phrase, (attr, key, None))]
            else:
                items = [(phrase, (attr, "is", key))]
            for text, claim in items:
                assert table.setdefault(text, claim) == claim, f"ambiguous phrase {text!r}"
    return table


_TABLE = _phrase_table()
# Longest first, so "is shorter-sleeved" wins over "is shorter" where both would match.
_PARSER = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(_TABLE, key=len, reverse=True)) + r")\b")


def parse_caption(caption: str) -> list[tuple[str, str, str | None]]:
    """The claims a caption makes, in order: (attr, "is", value) or (attr, "more"/"less", None)."""
    return [_TABLE[m.group(1)] for m in _PARSER.finditer(caption.lower())]


def _relative_op(attr: str, old: str, new: str, category: str) -> str | None:
    if attr in ("sleeve", "length"):
        order = values(attr, category)
        # Only from the middle value does "longer"/"shorter" leave a single possible target.
        if order.index(old) == 1:
            return "more" if order.index(new) == 2 else "less"
        return None
    if attr == "colour":
        return "more" if DARKER.get(old) == new else "less" if LIGHTER.get(old) == new else None
    return None


def relative_pairs(attr: str, category: str) -> list[tuple[str, str]]:
    """Value pairs whose changes captions can phrase relatively ("longer sleeves", "darker")."""
    if attr == "colour":
        return [("blue", "navy"), ("grey", "black"), ("grey", "white"), ("pink", "red")]
    if attr in ("sleeve", "length"):
        order = values(attr, category)
        return [(order[0], order[1]), (order[1], order[2])]
    return []


def _fragment(rng: random.Random, claim: tuple[str, str, str]) -> str:
    attr, op, value = claim
    if op == "is" and attr == "colour":
        return rng.choice(_PHRASES[("colour", "is")]).format(value)
    return rng.choice(_PHRASES[(attr, value if op == "is" else op)])


def _join(fragments: list[str]) -> str:
    return fragments[0] if len(fragments) == 1 else ", ".join(fragments[:-1]) + " and " + fragments[-1]


def make_captions(
    rng: random.Random, category: str, ref: dict[str, str], target: dict[str, str]
) -> tuple[list[str], list[list[tuple[str, str, str]]]]:
    """Two relative captions and the claims of each; together they name every change, nothing else."""
    claims = []
    for attr in ATTRIBUTES:
        if ref[attr] != target[attr]:
            op = _relative_op(attr, ref[attr], target[attr], category)
            claims.append((attr, op if op and rng.random() < _P_RELATIVE else "is", target[attr]))
    if len(claims) > 1 and rng.random() < _P_SPLIT:
        rng.shuffle(claims)
        cut = rng.randint(1, len(claims) - 1)
        parts = [claims[:cut], claims[cut:]]
    else:
        parts = [claims, claims]
    captions: list[str] = []
    for part in parts:
        for _ in range(8):  # different words for the same claims where the templates allow it
            order = rng.sample(part, len(part))
            text = _join([_fragment(rng, c) for c in order])
            if not captions or text != captions[0]:
                break
        captions.append(text)
    return captions, parts


# -- pictures ---------------------------------------------------------------------------------------

# Drawing happens at this multiple of the output size; the reduction gives anti-aliased edges.
_SUPERSAMPLE = 2

Point = tuple[float, float]


@dataclass(frozen=True)
class Look:
    """The nuisance a family shares and a target inherits from its reference (never named in captions)."""

    background: tuple[int, int, int]
    shade: tuple[int, int, int]  # RGB offset added to the named colour: the "exact shade"
    scale: float
    dx: float
    dy: float
    phase: tuple[float, float]  # pattern offset, as a fraction of the pattern period


def random_background(rng: random.Random, hue: float) -> tuple[int, int, int]:
    """A light, desaturated colour that no garment colour name fits."""
    s, v = rng.uniform(0.08, 0.2), rng.uniform(0.72, 0.9)
    r, g, b = (round(c * 255) for c in colorsys.hsv_to_rgb(hue % 1.0, s, v))
    return r, g, b


def random_look(rng: random.Random, background: tuple[int, int, int]) -> Look:
    """A look on `background`: a small jitter of the named colour's shade, a framing, a pattern phase."""
    return Look(
        background=background,
        shade=(rng.randint(-20, 20), rng.randint(-20, 20), rng.randint(-20, 20)),
        scale=rng.uniform(0.72, 1.0),
        dx=rng.uniform(-0.1, 0.1),
        dy=rng.uniform(-0.07, 0.07),
        phase=(rng.random(), rng.random()),
    )


# Hem heights (fraction of the canvas) per length value, far enough apart to read at 64 px.
_HEM = {"cropped": 0.52, "regular": 0.72, "long": 0.93, "mini": 0.6, "knee": 0.78, "maxi": 0.96}
_SHOULDER_Y, _ARMPIT_Y, _WAIST_Y = 0.1, 0.28, 0.4


def _body(category: str, length: str, sleeveless: bool) -> list[Point]:
    hem = _HEM[length]
    # Sleeveless garments have narrow straps; the armhole then shows the background, which reads clearly.
    left, right = (0.36, 0.64) if sleeveless else (0.29, 0.71)
    if category == "dress":
        flare = {"mini": 0.25, "knee": 0.21, "maxi": 0.17}[length]
        return [
            (left, _SHOULDER_Y),
            (right, _SHOULDER_Y),
            (0.69, _ARMPIT_Y),
            (0.63, _WAIST_Y),
            (1 - flare, hem),
            (flare, hem),
            (0.37, _WAIST_Y),
            (0.31, _ARMPIT_Y),
        ]
    wide = 0.015 if category == "shirt" else 0.0  # shirts are a touch boxier than tees
    return [
        (left - wide, _SHOULDER_Y),
        (right + wide, _SHOULDER_Y),
        (0.70 + wide, _ARMPIT_Y),
        (0.71 + wide, hem),
        (0.29 - wide, hem),
        (0.30 - wide, _ARMPIT_Y),
    ]


def _sleeves(sleeve: str, category: str) -> list[list[Point]]:
    if sleeve == "sleeveless":
        return []
    if sleeve == "short":
        left = [(0.29, _SHOULDER_Y), (0.14, 0.25), (0.22, 0.33), (0.31, _ARMPIT_Y)]
    else:
        wrist = 0.6 if category == "dress" else 0.66
        left = [(0.29, _SHOULDER_Y), (0.18, 0.21), (0.07, wrist), (0.17, wrist + 0.02), (0.26, 0.35)]
        left.append((0.31, _ARMPIT_Y))
    return [left, [(1 - x, y) for x, y in left]]


def _neck_cut(neckline: str) -> tuple[str, list[Point]]:
    if neckline == "round":
        return "ellipse", [(0.41, _SHOULDER_Y - 0.07), (0.59, _SHOULDER_Y + 0.08)]
    if neckline == "v-neck":
        return "polygon", [(0.40, _SHOULDER_Y - 0.01), (0.60, _SHOULDER_Y - 0.01), (0.50, _SHOULDER_Y + 0.18)]
    return "rectangle", [(0.41, _SHOULDER_Y - 0.01), (0.59, _SHOULDER_Y + 0.09)]


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    # Pattern ink: near-white on dark garments, near-black on light ones, so patterns read on every colour.
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (30, 30, 35) if luma > 150 else (240, 240, 235)


def _pattern_layer(size: int, colour: tuple[int, int, int], pattern: str, phase: Point) -> Image.Image:
    layer = Image.new("RGB", (size, size), colour)
    if pattern == "solid":
        return layer
    draw = ImageDraw.Draw(layer)
    ink = _contrast(colour)
    period = size * 0.1
    ox, oy = phase[0] * period, phase[1] * period
    steps = range(-1, int(size / period) + 2)
    if pattern == "stripes":
        for i in steps:
            y = oy + i * period
            draw.rectangle([0, y, size, y + period * 0.45], fill=ink)
    elif pattern == "checks":
        for i in steps:
            p = i * period
            draw.rectangle([0, oy + p, size, oy + p + period * 0.25], fill=ink)
            draw.rectangle([ox + p, 0, ox + p + period * 0.25, size], fill=ink)
    else:  # dots, every other row shifted by half a period
        radius = period * 0.26
        for i in steps:
            for j in steps:
                x = ox + j * period + (period / 2 if i % 2 else 0)
                y = oy + i * period
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=ink)
    return layer


def draw_garment(attrs: dict[str, str], category: str, look: Look, image_size: int) -> Image.Image:
    """One RGB image_size x image_size picture of a garment with `attrs`, framed and shaded by `look`."""
    size = image_size * _SUPERSAMPLE

    def px(points: list[Point]) -> list[Point]:
        # The look's framing: scale about the centre, then shift.
        return [
            ((0.5 + (x - 0.5) * look.scale + look.dx) * size, (0.5 + (y - 0.5) * look.scale + look.dy) * size)
            for x, y in points
        ]

    base = PALETTE[attrs["colour"]]
    colour = tuple(max(0, min(255, c + d)) for c, d in zip(base, look.shade, strict=True))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(px(_body(category, attrs["length"], attrs["sleeve"] == "sleeveless")), fill=255)
    for sleeve in _sleeves(attrs["sleeve"], category):
        draw.polygon(px(sleeve), fill=255)
    kind, shape = _neck_cut(attrs["neckline"])
    getattr(draw, kind)(px(shape), fill=0)

    img = Image.new("RGB", (size, size), look.background)
    img.paste(_pattern_layer(size, colour, attrs["pattern"], look.phase), mask=mask)  # type: ignore[arg-type]
    # A darker rim keeps white and light garments separable from the light backgrounds.
    rim = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 60 else 0)
    img.paste(tuple(int(c * 0.55) for c in colour), mask=rim)
    if category == "shirt":
        _shirt_details(ImageDraw.Draw(img), px, colour, attrs, size)
    return img.reduce(_SUPERSAMPLE)


def _shirt_details(
    draw: ImageDraw.ImageDraw, px: Callable, colour: tuple, attrs: dict[str, str], size: int
) -> None:
    # Collar points beside the neckline (never over it: the neckline must stay readable) and a button
    # placket from the neckline's lowest point down: the shirt's signature next to the plain tee.
    trim = tuple(int(c * 0.55) for c in colour)
    collar_fill = tuple(min(255, int(c * 0.8 + 50)) for c in colour)
    for side in (1, -1):
        flap = [(0.5 - side * 0.10, _SHOULDER_Y - 0.02), (0.5 - side * 0.17, _SHOULDER_Y + 0.01)]
        flap.append((0.5 - side * 0.11, _SHOULDER_Y + 0.08))
        draw.polygon(px(flap), fill=collar_fill, outline=trim)
    top = _SHOULDER_Y + {"round": 0.09, "square": 0.1, "v-neck": 0.19}[attrs["neckline"]]
    (x0, y0), (x1, y1) = px([(0.5, top), (0.5, _HEM[attrs["length"]] - 0.02)])
    width = max(1, size // 90)
    draw.line([(x0, y0), (x1, y1)], fill=trim, width=width)
    steps = max(1, int((y1 - y0) / (size * 0.09)))
    for i in range(steps + 1):
        y = y0 + (y1 - y0) * i / steps
        r = size * 0.012
        draw.ellipse([x0 + 3 * width - r, y - r, x0 + 3 * width + r, y + r], fill=trim)
