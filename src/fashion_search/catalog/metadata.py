"""Reads a catalog metadata file (CSV, JSON Lines or Parquet) into typed columns, one row per image."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_search.errors import FashionSearchError

IMAGE_COLUMN = "image"
PRODUCT_COLUMN = "product_id"
ATTRIBUTE_TYPES = ("number", "bool", "string")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# Attribute names must be usable in a filter expression as they are (Milvus field names follow the same
# rule), and must not be one of the expression's own words.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_NAMES = frozenset({"and", "or", "not", "in", "true", "false", "like", "is", "null"})
# A decimal number as people write it in a spreadsheet; float() alone would also take "nan", "inf", "1_0".
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class MetadataTable:
    """Rows of a metadata file: the image id, its product (or None) and typed attribute columns.

    `columns[name]` holds Python values aligned with `images` (None where missing): float for numbers,
    bool for bools, str for strings. `lines[i]` says where row i came from, for messages. This is the
    build-time form; the served form is catalog.attributes.AttributeStore (columnar numpy arrays).
    """

    path: str
    images: list[str]
    product_ids: list[str | None]
    types: dict[str, str]
    columns: dict[str, list[Any]]
    lines: list[int] = field(default_factory=list)
    line_word: str = "line"  # "row" for Parquet, which has no lines

    def __len__(self) -> int:
        return len(self.images)


def read_metadata(path: str | Path) -> MetadataTable:
    """Read FILE by its extension (.csv, .jsonl/.json/.ndjson, .parquet) and infer each column's type."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FashionSearchError(
            f"metadata file {path} has an unknown extension: use one of {', '.join(sorted(FORMATS))}"
        )
    if not path.is_file():
        raise FashionSearchError(f"metadata file {path} does not exist")
    reader = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
    names, records, lines = reader(path)
    return _build_table(path, names, records, lines, "row" if fmt == "parquet" else "line")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    records, lines = [], []
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets often write a BOM
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise FashionSearchError(f"metadata file {path} is empty: expected a header line")
            names = [h.strip() for h in header]
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank lines, e.g. a trailing one
                if len(row) != len(names):
                    raise FashionSearchError(
                        f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(names)}"
                    )
                # Every CSV cell is text: an empty one is a missing value, whatever the column's type.
                records.append({n: (c if c.strip() else None) for n, c in zip(names, row)})
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise FashionSearchError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise FashionSearchError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    return names, records, lines


def _read_jsonl(path: Path) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    names: dict[str, None] = {}  # insertion-ordered set: columns in order of first appearance
    records, lines = [], []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FashionSearchError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FashionSearchError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise FashionSearchError(f"{path} line {number}: expected a JSON object, one per line")
        for key, value in record.items():
            if isinstance(value, (list, dict)):
                raise FashionSearchError(
                    f"{path} line {number}: column {key!r} holds a {type(value).__name__}; "
                    "only numbers, true/false and strings are attributes"
                )
            names.setdefault(key)
        records.append(record)
        lines.append(number)
    return list(names), records, lines


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    try:
        import pyarrow.parquet as pq  # imported here: only Parquet catalogs need pyarrow
    except ImportError as exc:
        raise FashionSearchError(
            f"reading {path} needs pyarrow: pip install 'fashion-search[parquet]' (or use CSV / JSON Lines)"
        ) from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family for a bad file
        raise FashionSearchError(f"{path} is not a readable Parquet file: {exc}") from exc
    names = list(table.column_names)
    for f in table.schema:
        if not (_is_scalar_arrow_type(f.type)):
            raise FashionSearchError(
                f"{path}: column {f.name!r} has type {f.type}; only numbers, booleans and strings are attributes"
            )
    records = table.to_pylist()
    return names, records, list(range(1, len(records) + 1))


def _is_scalar_arrow_type(t: Any) -> bool:
    import pyarrow.types as pt

    return bool(
        pt.is_integer(t)
        or pt.is_floating(t)
        or pt.is_boolean(t)
        or pt.is_string(t)
        or pt.is_large_string(t)
        or pt.is_null(t)
        or pt.is_dictionary(t)
    )


def _build_table(
    path: Path, names: list[str], records: list[dict[str, Any]], lines: list[int], word: str
) -> MetadataTable:
    if IMAGE_COLUMN not in names:
        found = ", ".join(repr(n) for n in names) or "none"
        raise FashionSearchError(f"{path} has no {IMAGE_COLUMN!r} column (columns found: {found})")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FashionSearchError(f"{path}: column {dup!r} appears twice")
    attributes = [n for n in names if n not in (IMAGE_COLUMN, PRODUCT_COLUMN)]
    for name in attributes:
        if not _NAME.match(name) or name.lower() in RESERVED_NAMES:
            raise FashionSearchError(
                f"{path}: column {name!r} cannot be an attribute: use letters, digits and _, not starting "
                f"with a digit, and none of {', '.join(sorted(RESERVED_NAMES))}"
            )
    images: list[str] = []
    first_line: dict[str, int] = {}
    products: list[str | None] = []
    for record, line in zip(records, lines):
        image = record.get(IMAGE_COLUMN)
        if not isinstance(image, str) or not image.strip():
            raise FashionSearchError(f"{path} {word} {line}: the {IMAGE_COLUMN!r} cell is empty or not text")
        image = _normalise_id(image)
        if image in first_line:
            raise FashionSearchError(
                f"{path}: image {image!r} appears twice, on {word}s {first_line[image]} and {line}"
            )
        first_line[image] = line
        images.append(image)
        products.append(_as_text(record.get(PRODUCT_COLUMN)))
    types, columns = {}, {}
    for name in attributes:
        raw = [record.get(name) for record in records]
        types[name], columns[name] = _infer(raw)
    return MetadataTable(str(path), images, products, types, columns, lines, word)


def _normalise_id(image: str) -> str:
    # Ids are POSIX paths relative to the photo folder, as the index writes them.
    image = image.strip().replace("\\", "/")
    while image.startswith("./"):
        image = image[2:]
    return image


def _as_text(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a product id of 7 read as 7.0 by a typed reader is still "7"
    return str(value).strip() if isinstance(value, str) else str(value)


def _infer(raw: list[Any]) -> tuple[str, list[Any]]:
    """One rule for every format: all present values bools (or the text true/false) -> bool; all numbers
    (or decimal text) -> number; anything else -> string. Missing: None, NaN, empty text."""
    present = [v for v in raw if not _missing(v)]

    def is_bool(v: Any) -> bool:
        return isinstance(v, bool) or (isinstance(v, str) and v.strip().lower() in ("true", "false"))

    def is_number(v: Any) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, float)):
            return math.isfinite(v)
        return isinstance(v, str) and bool(_NUMBER.match(v.strip()))

    if present and all(is_bool(v) for v in present):
        return "bool", [
            None if _missing(v) else (v if isinstance(v, bool) else v.strip().lower() == "true") for v in raw
        ]
    if present and all(is_number(v) for v in present):
        return "number", [None if _missing(v) else float(v) for v in raw]
    return "string", [None if _missing(v) else _string(v) for v in raw]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _string(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return v.strip() if isinstance(v, str) else str(v)
