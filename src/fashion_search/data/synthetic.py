"""Offline synthetic Fashion-IQ: drawn garments in families that share a look, so retrieval needs image + text."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fashion_search.data.synthetic_draw import (
    ATTRIBUTES,
    CATEGORIES,
    DARKER,
    LIGHTER,
    Look,
    draw_garment,
    make_captions,
    parse_caption,
    random_background,
    random_look,
    relative_pairs,
    values,
)
from fashion_search.errors import FashionSearchError

SPLITS = ("train", "val", "test")
_LETTER = {"dress": "D", "shirt": "S", "toptee": "T"}
MIN_IMAGES_PER_CATEGORY = 50
MIN_TRAIN_PER_CATEGORY = 30  # what is left for train when val/test galleries are sized explicitly
_README_TITLE = "# Synthetic Fashion-IQ"
SUMMARY_FILE = "synth.json"  # generate()'s summary: what made the dataset (seed, sizes)
_SUBDIRS = ("images", "captions", "image_splits")
_VAL_SHARE = 0.2  # val and test each; train gets the rest
_EVAL_MIN_LOOKS = 12  # looks per val/test line: copies of every garment that only the look tells apart
# Attributes varying within a val/test line, at most: all five, so that a large gallery's looks hold 32
# garments each and the reference's look alone leaves the target among ~31 (image-only R@10 ~1/3).
_EVAL_MAX_VARYING = 5
_LOOKS_PER_BACKGROUND = 3  # so a background alone never singles out a family
_TRAIN_LINE, _TRAIN_LOOKS = 64, 2
_TRAIN_TRIPLETS_PER_IMAGE = 4
_CHANGES_WEIGHTS = {1: 0.2, 2: 0.5, 3: 0.3}  # how many attributes a triplet changes
_HARDNESS = 8.0  # val/test: weight exp(-_HARDNESS * best single-modality recall) when drawing triplets
_RELATIVE_BONUS = 1.0  # preference for value pairs that captions can phrase relatively ("longer", "darker")


# -- oracles ----------------------------------------------------------------------------------------


def _allowed(attr: str, op: str, value: str | None, category: str, strict: bool) -> set[str]:
    # What a text-only searcher can conclude from one claim, without seeing the reference.
    if op == "is":
        return {value}  # type: ignore[arg-type]
    if attr == "colour":
        return set((DARKER if op == "more" else LIGHTER).values())
    order = values(attr, category)
    if strict:  # the generator only says "longer" for middle -> top, so a learner can infer the top value
        return {order[2] if op == "more" else order[0]}
    return set(order[1:] if op == "more" else order[:2])  # "longer sleeves" = anything but sleeveless


def _resolve(claims: list[tuple[str, str, str | None]], ref: dict[str, str], category: str) -> dict[str, str]:
    # The target attributes the reference and the claims pin down (the composed oracle's query).
    want = dict(ref)
    for attr, op, value in claims:
        if op == "is":
            want[attr] = value  # type: ignore[assignment]
        elif attr == "colour":
            want[attr] = (DARKER if op == "more" else LIGHTER)[ref[attr]]
        else:
            order = values(attr, category)
            want[attr] = order[order.index(ref[attr]) + (1 if op == "more" else -1)]
    return want


class _Gallery:
    """One category's gallery of a split as integer codes, for the oracles."""

    def __init__(self, category: str, ids: list[str], attrs: list[dict[str, Any]]) -> None:
        self.category, self.ids, self.attrs = category, ids, attrs
        self.family = np.array([a["family"] for a in attrs], dtype=np.int64)
        codes = [[values(a, category).index(x[a]) for a in ATTRIBUTES] for x in attrs]
        self.codes = np.array(codes, dtype=np.int64).reshape(len(attrs), len(ATTRIBUTES))
        # One contiguous column per attribute: `_match` runs for every candidate pair (~150k per dataset).
        self.columns = {a: np.ascontiguousarray(self.codes[:, j]) for j, a in enumerate(ATTRIBUTES)}
        self.value_codes = {a: {v: i for i, v in enumerate(values(a, category))} for a in ATTRIBUTES}
        self.shared: dict[int, np.ndarray] = {}  # _hits per reference, kept as long as the gallery

    def _match(self, want: dict[str, set[str]]) -> np.ndarray:
        mask = np.ones(len(self.ids), dtype=bool)
        for attr in ATTRIBUTES:
            if attr in want:
                # A lookup table indexed by the codes: the same mask as np.isin, without its overhead.
                allowed = np.zeros(len(self.value_codes[attr]), dtype=bool)
                allowed[[self.value_codes[attr][v] for v in want[attr]]] = True
                mask &= allowed[self.columns[attr]]
        return mask

    def scores(
        self, ref: int, target: int, claims: list[tuple[str, str, str | None]], k: int
    ) -> dict[str, float]:
        """Expected R@k of the target for each idealised searcher (see `oracle_recalls`)."""
        out: dict[str, float] = {}
        for name, strict in (("text", False), ("text_strict", True)):
            want: dict[str, set[str]] = {}
            for attr, op, value in claims:
                got = _allowed(attr, op, value, self.category, strict)
                want[attr] = want[attr] & got if attr in want else got
            mask = self._match(want)
            out[name] = min(1.0, k / np.count_nonzero(mask)) if mask[target] else 0.0
        same = self.family == self.family[target]
        hits = self._hits(ref)
        above, tied = hits > hits[target], np.count_nonzero((hits == hits[target]) & same)
        # Attribute matches first, same family first among ties (the target is in the family's tie group).
        out["image"] = float(np.clip((k - np.count_nonzero(above)) / tied, 0.0, 1.0))
        out["image_look"] = float(np.clip((k - np.count_nonzero(above & same)) / tied, 0.0, 1.0))
        want_exact = {a: {v} for a, v in _resolve(claims, self.attrs[ref], self.category).items()}
        exact = self._match(want_exact) & same
        out["composed"] = min(1.0, k / np.count_nonzero(exact)) if exact[target] else 0.0
        return out

    def _hits(self, ref: int) -> np.ndarray:
        """How many attributes each gallery image shares with `ref` (a reference is in many pairs)."""
        if ref not in self.shared:
            self.shared[ref] = (self.codes == self.codes[ref]).sum(axis=1)
        return self.shared[ref]


# -- plan: lines of garments, each line shot in several looks (families) ---------------------------


@dataclass
class _Item:
    id: str
    category: str
    split: str
    family: int
    line: int
    attrs: dict[str, str]
    look: Look


def _box(rng: random.Random, category: str, k: int, usage: dict[Any, int], seen: set | None) -> list[dict]:
    """A line's garments: k attributes take two values each, the others one.

    Least-used values first, so train covers the vocabulary; val/test lines only use values that train
    has (`seen`), so every caption word can be learnt.
    """

    def cost(key: Any) -> float:
        return usage.get(key, 0) + rng.random() * 0.5

    options = {a: [v for v in values(a, category) if seen is None or (a, v) in seen] for a in ATTRIBUTES}
    varying = sorted((a for a in ATTRIBUTES if len(options[a]) > 1), key=lambda a: cost(("vary", a)))[:k]
    choices: list[tuple[str, ...]] = []
    for attr in ATTRIBUTES:
        if attr not in varying:
            pick: tuple[str, ...] = (min(options[attr], key=lambda v: cost((attr, v))),)
        else:
            usage[("vary", attr)] = usage.get(("vary", attr), 0) + 1
            friendly = set(relative_pairs(attr, category))
            # Pairs that captions can phrase relatively win unless that would starve other values.
            pick = min(
                itertools.combinations(options[attr], 2),
                key=lambda p: cost((attr, p[0])) + cost((attr, p[1])) - _RELATIVE_BONUS * (p in friendly),
            )
        for v in pick:
            usage[(attr, v)] = usage.get((attr, v), 0) + 1
        choices.append(pick)
    return [dict(zip(ATTRIBUTES, combo, strict=True)) for combo in itertools.product(*choices)]


@dataclass(frozen=True)
class TrainDesign:
    """How the train split's lines (~64 garments each) are shot. By default a line varies as many
    attributes as fit in 2 looks, log2(line / 2): 4 for lines of 60 (4 looks of 15, as 360 train images per
    category make), 5 for lines of 64 or more (2-3 looks of up to 32, as 720 make; every attribute then
    varies within a look, as in a val look). `look_size` sets the garments per look (more, smaller
    looks) and `varying` the attributes a line varies; each look samples its garments from the line's."""

    look_size: int | None = None
    varying: int | None = None

    def check(self) -> None:
        for name, value, low in (("train_look_size", self.look_size, 2), ("train_varying", self.varying, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise FashionSearchError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.varying is not None and self.varying > len(ATTRIBUTES):
            raise FashionSearchError(f"train_varying must be at most {len(ATTRIBUTES)}, got {self.varying}")
        if self.look_size is not None and self.varying is not None and self.look_size > 2**self.varying:
            raise FashionSearchError(
                f"train_look_size {self.look_size} exceeds the {2**self.varying} garments that "
                f"{self.varying} varying attributes make"
            )


# (split, size, varying attributes, garments per look or None for the whole box of 2^varying)
_Line = tuple[str, int, int, int | None]


def _varying(size: int, min_looks: int, max_k: int) -> int:
    # As many attributes as leave room for min_looks looks of the whole box.
    return max(2, min(max_k, int(math.log2(size / min_looks))))


def _line_sizes(
    category_size: int, eval_gallery: int | None = None, design: TrainDesign = TrainDesign()
) -> list[_Line]:
    # The lines of one category.
    n_eval = round(category_size * _VAL_SHARE) if eval_gallery is None else eval_gallery
    n_train = category_size - 2 * n_eval
    n_lines = max(1, round(n_train / _TRAIN_LINE))
    train = [n_train // n_lines + (i < n_train % n_lines) for i in range(n_lines)]
    # One line per val/test gallery: every garment in 12+ looks, 2 values per varying attribute, so a
    # caption alone fits many items (other looks) and the reference alone fits many (its copies, neighbours).
    evaluation: list[_Line] = [
        (s, n_eval, _varying(n_eval, _EVAL_MIN_LOOKS, _EVAL_MAX_VARYING), None) for s in SPLITS[1:]
    ]
    if design.look_size is None and design.varying is None:
        return [("train", s, _varying(s, _TRAIN_LOOKS, 5), None) for s in train] + evaluation
    lines: list[_Line] = []
    for size in train:
        look_size = min(size, design.look_size or 2 ** (design.varying or 4))
        varying = design.varying or max(2, min(5, math.ceil(math.log2(look_size))))
        lines.append(("train", size, varying, look_size))
    return lines + evaluation


def _plan_items(
    rng: random.Random,
    images_per_category: int,
    eval_gallery: int | None,
    design: TrainDesign = TrainDesign(),
) -> list[_Item]:
    items: list[_Item] = []
    usage: dict[Any, int] = {}
    # ids are random numbers: they say nothing about family or split
    numbers = {c: rng.sample(range(1, 10**8), images_per_category) for c in CATEGORIES}
    lines = _line_sizes(images_per_category, eval_gallery, design)
    specs = [(c, *spec) for spec in lines for c in CATEGORIES]
    specs.sort(key=lambda spec: spec[1] != "train")  # all train lines first (stable: categories interleave)
    seen: set[tuple[str, str]] = set()
    family = 0
    for line, (category, split, size, k, look_size) in enumerate(specs):
        box = _box(rng, category, k, usage, None if split == "train" else seen)
        if split == "train":
            seen.update((a, x[a]) for x in box for a in ATTRIBUTES)
        looks, hue = math.ceil(size / (look_size or len(box))), rng.random()
        # Several looks share each background (hues spread around the wheel): a search that goes by the
        # background finds the reference's copies in other looks, not its family; the shade, framing and
        # pattern phase still tell the family apart.
        n_bg = math.ceil(looks / _LOOKS_PER_BACKGROUND)
        backgrounds = [random_background(rng, hue + (b + rng.uniform(-0.2, 0.2)) / n_bg) for b in range(n_bg)]
        for j in range(looks):
            look = random_look(rng, backgrounds[j % n_bg])
            for attrs in rng.sample(box, size // looks + (j < size % looks)):
                image_id = f"S{_LETTER[category]}{numbers[category].pop():08d}"
                items.append(_Item(image_id, category, split, family, line, attrs, look))
            family += 1
    return items


def _pairs_by_changes(members: list[_Item]) -> dict[int, list[tuple[_Item, _Item]]]:
    buckets: dict[int, list[tuple[_Item, _Item]]] = {1: [], 2: [], 3: []}
    for ref, tgt in itertools.permutations(members, 2):
        d = sum(ref.attrs[a] != tgt.attrs[a] for a in ATTRIBUTES)
        if d in buckets:
            buckets[d].append((ref, tgt))
    return buckets


def _train_triplets(rng: random.Random, members: list[_Item]) -> list[dict[str, Any]]:
    buckets = _pairs_by_changes(members)
    out = []
    for _ in range(_TRAIN_TRIPLETS_PER_IMAGE * len(members)):
        ds = [d for d in buckets if buckets[d]]
        if not ds:
            break
        d = rng.choices(ds, weights=[_CHANGES_WEIGHTS[d] for d in ds])[0]
        ref, tgt = buckets[d].pop(rng.randrange(len(buckets[d])))
        captions, _ = make_captions(rng, ref.category, ref.attrs, tgt.attrs)
        out.append({"target": tgt.id, "candidate": ref.id, "captions": captions})
    return out


def _eval_triplets(
    rng: random.Random, gallery: list[_Item], families: dict[int, list[_Item]]
) -> list[dict[str, Any]]:
    """About one triplet per two gallery images, drawn preferring pairs that neither modality solves alone."""
    oracle = _Gallery(gallery[0].category, [g.id for g in gallery], [_record(g) for g in gallery])
    index = {g.id: i for i, g in enumerate(gallery)}
    cands = []
    for members in families.values():
        for d, pairs in _pairs_by_changes(members).items():
            for ref, tgt in pairs:
                captions, parts = make_captions(rng, ref.category, ref.attrs, tgt.attrs)
                s = oracle.scores(index[ref.id], index[tgt.id], parts[0] + parts[1], k=10)
                hardness = math.exp(-_HARDNESS * max(s["text_strict"], s["image"]))
                cands.append((d, hardness, ref, tgt, captions))
    totals = {d: sum(c[1] for c in cands if c[0] == d) for d in _CHANGES_WEIGHTS}
    # Weighted sampling without replacement (Efraimidis-Spirakis keys), change counts kept at their weights.
    keys = [rng.random() ** (totals[c[0]] / (_CHANGES_WEIGHTS[c[0]] * c[1])) for c in cands]
    chosen = sorted(range(len(cands)), key=keys.__getitem__, reverse=True)[: len(gallery) // 2]
    return [{"target": cands[i][3].id, "candidate": cands[i][2].id, "captions": cands[i][4]} for i in chosen]


def _record(item: _Item) -> dict[str, Any]:
    record = {"category": item.category, **item.attrs}
    return {**record, "family": item.family, "line": item.line, "split": item.split}


# -- public API ---------------------------------------------------------------------------------------


def _check_args(images_per_category: Any, seed: Any, image_size: Any, eval_gallery: Any) -> None:
    named = {"images_per_category": images_per_category, "seed": seed, "image_size": image_size}
    if eval_gallery is not None:
        named["eval_gallery"] = eval_gallery
    for name, value in named.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise FashionSearchError(f"{name} must be an integer, got {value!r}")
    if eval_gallery is not None:
        train = images_per_category - 2 * eval_gallery
        if eval_gallery < _EVAL_MIN_LOOKS or train < MIN_TRAIN_PER_CATEGORY:
            raise FashionSearchError(
                f"eval_gallery={eval_gallery} does not fit {images_per_category} images per category: val "
                f"and test need at least {_EVAL_MIN_LOOKS} each and train at least {MIN_TRAIN_PER_CATEGORY} "
                f"(images_per_category counts all three splits: use at least "
                f"{2 * max(eval_gallery, _EVAL_MIN_LOOKS) + MIN_TRAIN_PER_CATEGORY})"
            )
    if images_per_category < MIN_IMAGES_PER_CATEGORY:
        raise FashionSearchError(
            f"images_per_category={images_per_category} is too small to make train/val/test splits of "
            f"several families each: use at least {MIN_IMAGES_PER_CATEGORY}"
        )
    if not 32 <= image_size <= 1024:
        raise FashionSearchError(f"image_size={image_size} is out of range: use 32 to 1024 pixels")


def _prepare(out: Path) -> None:
    # Never mix with unrelated files; a previous synthetic dataset is replaced (its own files only).
    if out.exists() and not out.is_dir():
        raise FashionSearchError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        readme = out / "README.md"
        if not (readme.is_file() and readme.read_text(encoding="utf-8").startswith(_README_TITLE)):
            raise FashionSearchError(f"{out} is not empty and is not a synthetic dataset: use a new folder")
        for sub in _SUBDIRS:
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("attributes.json", SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
    for sub in _SUBDIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=isinstance(data, dict)) + "\n", encoding="utf-8")


def generate(
    out: str | Path,
    images_per_category: int = 600,
    seed: int = 0,
    image_size: int = 96,
    progress: bool = True,
    eval_gallery: int | None = None,
    train_design: TrainDesign = TrainDesign(),
) -> dict:
    """Write a synthetic Fashion-IQ dataset to `out`; return counts of images, families and triplets.

    `images_per_category` counts all three splits; val and test each get `eval_gallery` of them (default:
    a fifth each), train the rest. About one val/test triplet is drawn per two gallery images.

    Deterministic for a seed (byte-identical files with the same Pillow). The summary's `oracle_val` is
    `oracle_recalls(out, "val")["mean"]`: how far each modality alone gets on the val triplets.
    """
    _check_args(images_per_category, seed, image_size, eval_gallery)
    train_design.check()
    started = time.monotonic()
    out = Path(out)
    _prepare(out)
    rng = random.Random(seed)
    items = _plan_items(rng, images_per_category, eval_gallery, train_design)
    summary: dict[str, Any] = {"root": str(out), "seed": seed, "image_size": image_size}
    if train_design != TrainDesign():
        summary["train_design"] = {"look_size": train_design.look_size, "varying": train_design.varying}
    summary["images_per_category"] = images_per_category
    summary["eval_gallery"] = sum(i.split == "val" for i in items) // len(CATEGORIES)
    for key in ("images", "families", "triplets"):
        summary[key] = {c: {} for c in CATEGORIES}
    for category, split in itertools.product(CATEGORIES, SPLITS):
        gallery = [i for i in items if (i.category, i.split) == (category, split)]
        families: dict[int, list[_Item]] = {}
        for item in gallery:
            families.setdefault(item.family, []).append(item)
        if split == "train":
            found = [t for members in families.values() for t in _train_triplets(rng, members)]
        else:
            found = _eval_triplets(rng, gallery, families)
        rng.shuffle(found)  # file order says nothing about families
        _write_json(out / "captions" / f"cap.{category}.{split}.json", found)
        _write_json(out / "image_splits" / f"split.{category}.{split}.json", sorted(i.id for i in gallery))
        for key, n in (("images", len(gallery)), ("families", len(families)), ("triplets", len(found))):
            summary[key][category][split] = n
    _write_json(out / "attributes.json", {i.id: _record(i) for i in items})
    for item in tqdm(items, desc="drawing garments", unit="img", disable=not progress):
        img = draw_garment(item.attrs, item.category, item.look, image_size)
        img.save(out / "images" / f"{item.id}.jpg", "JPEG", quality=92, subsampling=0)
    summary["oracle_val"] = oracle_recalls(out, "val")["mean"]
    _write_readme(out, summary)
    _write_json(out / SUMMARY_FILE, {k: v for k, v in summary.items() if k != "root"})  # movable
    summary["seconds"] = round(time.monotonic() - started, 2)
    return summary


def _design_flags(summary: dict[str, Any]) -> str:
    design = summary.get("train_design", {})
    names = (("look_size", "--train-look-size"), ("varying", "--train-varying"))
    return "".join(f" {flag} {design[key]}" for key, flag in names if design.get(key))


def _write_readme(out: Path, summary: dict[str, Any]) -> None:
    total = {
        key: {s: sum(summary[key][c][s] for c in CATEGORIES) for s in SPLITS}
        for key in ("images", "triplets")
    }
    oracle = summary["oracle_val"]
    text = f"""{_README_TITLE}

Drawn garments (dress, shirt, toptee) in the Fashion-IQ layout, made by `fashion_search.data.synthetic`.
A family is one look (background, exact shade, framing, pattern phase) over garments whose colour, sleeve,
length, pattern and neckline differ; a triplet's target is its reference with 1-3 attributes changed, and
the two captions name only the changes. `attributes.json` has every image's attributes, family and split.

- seed {summary["seed"]}, {summary["images_per_category"]} images per category of {summary["image_size"]} px
- images train/val/test: {"/".join(str(total["images"][s]) for s in SPLITS)}
- triplets train/val/test: {"/".join(str(total["triplets"][s]) for s in SPLITS)}
- val oracle R@10: text-only {oracle["text"]:.2f}, image-only {oracle["image"]:.2f}, composed {oracle["composed"]:.2f}
- regenerate: `fashion-search synth OUT --images-per-category {summary["images_per_category"]} --eval-gallery {summary["eval_gallery"]} --seed {summary["seed"]}{_design_flags(summary)}`
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def _read_attributes(root: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((root / "attributes.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FashionSearchError(f"{root} has no readable attributes.json ({exc})") from None


def changes_of(root: str | Path):
    """A function (triplet -> "1" / "2" / "3"): how many attributes its target changes from its reference,
    read from a generated dataset's attributes.json (for `evaluate(group_by=...)`)."""
    attributes = _read_attributes(Path(root))

    def changes(triplet) -> str:
        ref, target = attributes[triplet.reference], attributes[triplet.target]
        return str(sum(ref[a] != target[a] for a in ATTRIBUTES))

    return changes


def oracle_recalls(root: str | Path, split: str = "val", k: int = 10) -> dict:
    """Expected R@k of idealised single-modality searchers on a generated dataset, per category and mean.

    - text: ranks first, in random order, the gallery items that fit everything the joined captions
      state ("longer sleeves" = anything but sleeveless); `text_strict` also reads a relative phrase as
      the one value the generator uses it for (what a learned text model can pick up).
    - image: ranks by the number of attributes equal to the reference's, same family first among ties;
      `image_look` ranks the reference's family first (a searcher that matches the look above all).
    - composed: the reference's family members with the reference's attributes plus the changes.
    """
    if split not in SPLITS or not isinstance(k, int) or k < 1:
        raise FashionSearchError(
            f"unknown split {split!r} or bad k={k!r}: expected {'/'.join(SPLITS)}, k >= 1"
        )
    root = Path(root)
    attributes = _read_attributes(root)
    per_category: dict[str, dict[str, float]] = {}
    for category in CATEGORIES:
        caps = root / "captions" / f"cap.{category}.{split}.json"
        if not caps.is_file():
            continue
        ids = json.loads(
            (root / "image_splits" / f"split.{category}.{split}.json").read_text(encoding="utf-8")
        )
        gallery = _Gallery(category, ids, [attributes[i] for i in ids])
        index = {image_id: i for i, image_id in enumerate(ids)}
        rows = []
        for t in json.loads(caps.read_text(encoding="utf-8")):
            claims = parse_caption(t["captions"][0]) + parse_caption(t["captions"][1])
            rows.append(gallery.scores(index[t["candidate"]], index[t["target"]], claims, k))
        if rows:
            means = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
            per_category[category] = {**means, "triplets": len(rows), "gallery": len(ids)}
    keys = ("text", "text_strict", "image", "image_look", "composed")
    mean = (
        {key: float(np.mean([v[key] for v in per_category.values()])) for key in keys} if per_category else {}
    )
    return {"split": split, "k": k, "categories": per_category, "mean": mean}
