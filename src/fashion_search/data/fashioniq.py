"""The Fashion-IQ layout (captions/, image_splits/, images/): reader, caption protocol and a data check."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion_search.data.images import IMAGE_EXTENSIONS
from fashion_search.errors import FashionSearchError

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")

# Characters the CLIP4Cir protocol strips from both ends of each caption before joining.
_STRIP = ".?, "
# A category is part of a file name: keep it to a plain token so it can never escape the folder.
_CATEGORY_RE = re.compile(r"[A-Za-z0-9_-]+")
_MISSING_EXAMPLES = 5


def _clean(caption: str) -> str:
    return caption.strip(_STRIP)


def join_captions(c1: str, c2: str) -> str:
    """The standard evaluation caption (CLIP4Cir validate.py): "C1 and c2", stripped of stray punctuation."""
    return f"{_clean(c1).capitalize()} and {_clean(c2)}"


def join_captions_reversed(c1: str, c2: str) -> str:
    """`join_captions` with the two captions swapped (the "both orders averaged" protocol)."""
    return join_captions(c2, c1)


def training_caption(c1: str, c2: str, rng: random.Random) -> str:
    """One of "c1 and c2", "c2 and c1", c1, c2 uniformly (CLIP4Cir's randomized training caption)."""
    choice = rng.randrange(4)
    if choice == 0:
        return join_captions(c1, c2)
    if choice == 1:
        return join_captions(c2, c1)
    # CLIP4Cir capitalizes the single captions too, so all four forms start the same way.
    return _clean(c1 if choice == 2 else c2).capitalize()


@dataclass(frozen=True)
class Triplet:
    """A reference image, a target image (None in the test split) and the two relative captions."""

    category: str
    reference: str
    target: str | None
    captions: tuple[str, str]


class FashionIQ:
    """Reads a Fashion-IQ folder: `captions/cap.{cat}.{split}.json`, `image_splits/split.{cat}.{split}.json`
    and `images/{id}.{ext}` (images may be absent: the annotations alone are readable)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FashionSearchError(f"Fashion-IQ folder not found: {self.root}")
        missing = [name + "/" for name in ("captions", "image_splits") if not (self.root / name).is_dir()]
        if missing:
            raise FashionSearchError(
                f"{self.root} is not a Fashion-IQ folder: missing {' and '.join(missing)} "
                "(expected captions/cap.{cat}.{split}.json and image_splits/split.{cat}.{split}.json)"
            )
        self.images_dir = self.root / "images"
        self._images: dict[str, Path] | None = None
        self._triplets: dict[tuple[str, str], list[Triplet]] = {}
        self._splits: dict[tuple[str, str], list[str]] = {}

    # -- annotations -------------------------------------------------------------------------------

    def categories(self, split: str) -> list[str]:
        """Categories whose caption file exists for `split` (the standard three first, in their order)."""
        _check_split(split)
        suffix = f".{split}.json"
        found = set()
        for path in (self.root / "captions").glob(f"cap.*{suffix}"):
            name = path.name[len("cap.") : -len(suffix)]
            if _CATEGORY_RE.fullmatch(name):
                found.add(name)
        return [c for c in CATEGORIES if c in found] + sorted(found.difference(CATEGORIES))

    def triplets(self, category: str, split: str) -> list[Triplet]:
        """All triplets of a caption file, in file order."""
        key = (_check_category(category), _check_split(split))
        if key not in self._triplets:
            path = self.root / "captions" / f"cap.{category}.{split}.json"
            self._triplets[key] = _parse_triplets(_read_json(path, "caption"), category, path)
        return list(self._triplets[key])

    def split_images(self, category: str, split: str) -> list[str]:
        """Image ids listed in the split file (the retrieval gallery), order kept, duplicates removed."""
        key = (_check_category(category), _check_split(split))
        if key not in self._splits:
            path = self.root / "image_splits" / f"split.{category}.{split}.json"
            data = _read_json(path, "split")
            if not isinstance(data, list) or not all(isinstance(i, str) and i.strip() for i in data):
                raise FashionSearchError(f"{path}: expected a JSON list of image ids (strings)")
            self._splits[key] = list(dict.fromkeys(i.strip() for i in data))
        return list(self._splits[key])

    # -- images ------------------------------------------------------------------------------------

    def _image_index(self) -> dict[str, Path]:
        # One directory listing instead of a stat per id: the real dataset has ~77k images.
        if self._images is None:
            index: dict[str, Path] = {}
            try:
                entries = sorted(os.scandir(self.images_dir), key=lambda e: e.name)
            except FileNotFoundError:
                entries = []
            except OSError as exc:
                raise FashionSearchError(f"cannot list {self.images_dir}: {exc.strerror or exc}") from None
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                # Dot-files include the downloader's in-progress `.ASIN.part-*` files.
                if entry.name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    if not entry.is_file():
                        continue
                except OSError:
                    continue
                index.setdefault(stem, Path(entry.path))  # sorted: "X.jpg" wins over "X.png"
            self._images = index
        return self._images

    def image_path(self, image_id: str) -> Path | None:
        """The image file of an id (any supported extension, any case), or None when it is missing."""
        return self._image_index().get(image_id)

    def gallery(self, category: str, split: str) -> tuple[list[str], list[str]]:
        """(present ids, missing ids) of the split's image list."""
        index = self._image_index()
        present: list[str] = []
        missing: list[str] = []
        for image_id in self.split_images(category, split):
            (present if image_id in index else missing).append(image_id)
        return present, missing

    def usable_triplets(self, category: str, split: str) -> tuple[list[Triplet], int]:
        """Triplets whose reference (and target, when known) images exist, and how many were skipped."""
        index = self._image_index()
        usable = [
            t
            for t in self.triplets(category, split)
            if t.reference in index and (t.target is None or t.target in index)
        ]
        return usable, len(self.triplets(category, split)) - len(usable)

    # -- data check --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Counts per split and category for `fashion-search data check DIR` (see `format_summary`)."""
        index = self._image_index()
        splits: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            cats = dict.fromkeys(self.categories(split))
            split_glob = (self.root / "image_splits").glob(f"split.*.{split}.json")
            cats.update(
                dict.fromkeys(sorted(p.name[len("split.") : -len(f".{split}.json")] for p in split_glob))
            )
            rows: dict[str, Any] = {}
            for cat in cats:
                if not _CATEGORY_RE.fullmatch(cat):
                    continue
                rows[cat] = self._summary_row(cat, split, index)
            if rows:
                splits[split] = rows
        return {
            "root": str(self.root),
            "images_dir": str(self.images_dir),
            "images_dir_exists": self.images_dir.is_dir(),
            "images_indexed": len(index),
            "splits": splits,
        }

    def _summary_row(self, cat: str, split: str, index: dict[str, Path]) -> dict[str, Any]:
        row: dict[str, Any] = {"triplets": None, "images": None, "missing_examples": []}
        examples: dict[str, None] = {}
        if (self.root / "image_splits" / f"split.{cat}.{split}.json").is_file():
            present, missing = self.gallery(cat, split)
            row["images"] = {
                "total": len(present) + len(missing),
                "present": len(present),
                "missing": len(missing),
            }
            examples.update(dict.fromkeys(missing[:_MISSING_EXAMPLES]))
        if (self.root / "captions" / f"cap.{cat}.{split}.json").is_file():
            usable, skipped = self.usable_triplets(cat, split)
            row["triplets"] = {"total": len(usable) + skipped, "usable": len(usable), "skipped": skipped}
            for t in self.triplets(cat, split):
                if len(examples) >= _MISSING_EXAMPLES:
                    break
                for image_id in (t.reference, t.target):
                    if image_id is not None and image_id not in index:
                        examples[image_id] = None
        row["missing_examples"] = list(examples)[:_MISSING_EXAMPLES]
        return row


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table for the terminal."""
    lines = [f"Fashion-IQ at {summary['root']}"]
    if summary.get("images_dir_exists"):
        lines.append(f"images: {summary['images_indexed']:,} files in {summary['images_dir']}")
    else:
        lines.append(f"images: folder {summary['images_dir']} not found (annotations only)")
    header = ("split", "category", "triplets", "usable", "skipped", "images", "present", "missing")
    table: list[tuple[str, ...]] = [header]
    examples: list[str] = []

    def fmt(part: dict[str, int] | None, key: str) -> str:
        return "-" if part is None else f"{part[key]:,}"

    for split, rows in summary["splits"].items():
        for cat, row in rows.items():
            t, i = row["triplets"], row["images"]
            table.append(
                (split, cat, fmt(t, "total"), fmt(t, "usable"), fmt(t, "skipped"))
                + (fmt(i, "total"), fmt(i, "present"), fmt(i, "missing"))
            )
            if row["missing_examples"]:
                examples.append(f"  {split}/{cat}: {', '.join(row['missing_examples'])}")
    if len(table) == 1:
        lines.append("no caption or split files found")
        return "\n".join(lines)
    widths = [max(len(r[k]) for r in table) for k in range(len(header))]
    for r in table:
        left = [r[k].ljust(widths[k]) for k in range(2)]
        right = [r[k].rjust(widths[k]) for k in range(2, len(header))]
        lines.append("  ".join(left + right).rstrip())
    if examples:
        lines.append("examples of missing images:")
        lines.extend(examples)
    return "\n".join(lines)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise FashionSearchError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def _check_category(category: str) -> str:
    if not isinstance(category, str) or not _CATEGORY_RE.fullmatch(category):
        raise FashionSearchError(f"invalid category {category!r}: expected e.g. {', '.join(CATEGORIES)}")
    return category


def _read_json(path: Path, kind: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FashionSearchError(f"{kind} file not found: {path}") from None
    except UnicodeDecodeError:
        raise FashionSearchError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise FashionSearchError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FashionSearchError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})"
        ) from None


def _parse_triplets(data: Any, category: str, path: Path) -> list[Triplet]:
    if not isinstance(data, list):
        raise FashionSearchError(f"{path}: expected a JSON list of triplets")
    out: list[Triplet] = []
    for n, entry in enumerate(data):
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict):
            raise FashionSearchError(f"{where} is not an object")
        reference, target, captions = entry.get("candidate"), entry.get("target"), entry.get("captions")
        if not isinstance(reference, str) or not reference.strip():
            raise FashionSearchError(f'{where} has no "candidate" image id')
        if target is not None and (not isinstance(target, str) or not target.strip()):
            raise FashionSearchError(f'{where} has an invalid "target" image id')
        if not (
            isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)
        ):
            raise FashionSearchError(f'{where}: "captions" must be a list of two strings')
        out.append(
            Triplet(
                category=category,
                reference=reference.strip(),
                target=target.strip() if target is not None else None,
                captions=(captions[0], captions[1]),
            )
        )
    return out
