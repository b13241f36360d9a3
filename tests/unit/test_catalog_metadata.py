"""Metadata files (CSV, JSON Lines, Parquet) -> typed columns -> the columnar AttributeStore, and every
message a malformed file gets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fashion_search.catalog.attributes import AttributeStore
from fashion_search.catalog.metadata import read_metadata
from fashion_search.errors import FashionSearchError

CSV = (
    "image,product_id,price,brand,in_stock,size\n"
    "dress/a.jpg,P1,10,Acme,true,38\n"
    "./dress/b.jpg,P1,,Zed,FALSE,M\n"
    "shirt/c.jpg,,55.5,O'Neill,,\n"
    "\n"
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_types_missing_cells_and_products(tmp_path):
    table = read_metadata(_write(tmp_path, "m.csv", CSV))
    assert table.images == ["dress/a.jpg", "dress/b.jpg", "shirt/c.jpg"]  # ./ dropped: ids are relative
    assert table.product_ids == ["P1", "P1", None]
    assert table.types == {"price": "number", "brand": "string", "in_stock": "bool", "size": "string"}
    assert table.columns["price"] == [10.0, None, 55.5]
    assert table.columns["in_stock"] == [True, False, None]
    assert table.columns["size"] == ["38", "M", None]  # one non-number makes the column a string
    assert table.lines == [2, 3, 4]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson"])
def test_json_lines_keep_real_types(tmp_path, suffix):
    rows = [
        {"image": "dress/a.jpg", "product_id": 7, "price": 10, "in_stock": True, "brand": "Acme"},
        {"image": "dress/b.jpg", "price": 12.5, "in_stock": None, "brand": "Zed", "colour": "red"},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    table = read_metadata(_write(tmp_path, "m" + suffix, text))
    assert table.types == {"price": "number", "in_stock": "bool", "brand": "string", "colour": "string"}
    assert table.product_ids == ["7", None]
    assert table.columns["colour"] == [None, "red"]
    assert table.columns["in_stock"] == [True, None]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "image": ["dress/a.jpg", "top/b.jpg"],
            "product_id": ["P1", None],
            "price": [9.5, None],
            "stock": [3, 0],
            "in_stock": [True, False],
            "brand": ["Acme", None],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    got = read_metadata(tmp_path / "m.parquet")
    assert got.types == {"price": "number", "stock": "number", "in_stock": "bool", "brand": "string"}
    assert got.columns["price"] == [9.5, None] and got.columns["brand"] == ["Acme", None]
    assert got.product_ids == ["P1", None]


def test_missing_image_column_lists_the_columns(tmp_path):
    with pytest.raises(FashionSearchError, match=r"no 'image' column \(columns found: 'file', 'price'\)"):
        read_metadata(_write(tmp_path, "m.csv", "file,price\na.jpg,3\n"))


def test_duplicate_image_names_both_lines(tmp_path):
    text = "image,price\na.jpg,1\nb.jpg,2\na.jpg,3\n"
    with pytest.raises(FashionSearchError, match=r"'a.jpg' appears twice, on lines 2 and 4"):
        read_metadata(_write(tmp_path, "m.csv", text))


def test_malformed_csv_line_is_named(tmp_path):
    with pytest.raises(FashionSearchError, match=r"line 3: 3 fields, the header has 2"):
        read_metadata(_write(tmp_path, "m.csv", "image,price\na.jpg,1\nb.jpg,2,9\n"))
    with pytest.raises(FashionSearchError, match=r"line 2: malformed CSV"):
        read_metadata(_write(tmp_path, "q.csv", 'image,price\n"a.jpg"x,1\n'))


def test_malformed_json_line_is_named(tmp_path):
    text = '{"image": "a.jpg"}\n\n{"image": "b.jpg", price: 3}\n'
    with pytest.raises(FashionSearchError, match=r"line 3: not valid JSON"):
        read_metadata(_write(tmp_path, "m.jsonl", text))
    with pytest.raises(FashionSearchError, match=r"line 1: expected a JSON object"):
        read_metadata(_write(tmp_path, "n.jsonl", "[1, 2]\n"))
    with pytest.raises(FashionSearchError, match=r"line 1: column 'tags' holds a list"):
        read_metadata(_write(tmp_path, "o.jsonl", '{"image": "a.jpg", "tags": [1]}\n'))


def test_other_refusals(tmp_path):
    with pytest.raises(FashionSearchError, match="unknown extension"):
        read_metadata(_write(tmp_path, "m.txt", "image\na.jpg\n"))
    with pytest.raises(FashionSearchError, match="does not exist"):
        read_metadata(tmp_path / "nope.csv")
    with pytest.raises(FashionSearchError, match="column 'unit price' cannot be an attribute"):
        read_metadata(_write(tmp_path, "m.csv", "image,unit price\na.jpg,1\n"))
    with pytest.raises(FashionSearchError, match="line 3: the 'image' cell is empty"):
        read_metadata(_write(tmp_path, "e.csv", "image,price\na.jpg,1\n,2\n"))


def _store(tmp_path):
    table = read_metadata(_write(tmp_path, "m.csv", CSV + "gone.jpg,P9,1,Acme,true,S\n"))
    ids = ["shirt/c.jpg", "dress/a.jpg", "top.jpg", "dress/b.jpg"]
    return AttributeStore.build(ids, table)


def test_store_aligns_with_ids_and_reports_strays(tmp_path):
    store, report = _store(tmp_path)
    assert report.rows_not_indexed == 1 and report.rows_not_indexed_sample == ["gone.jpg"]
    assert report.items_without_row == 1 and report.items_without_row_sample == ["top.jpg"]
    assert store.schema() == {
        "category": "string",
        "price": "number",
        "brand": "string",
        "in_stock": "bool",
        "size": "string",
    }
    assert store.row_metadata(0) == {"category": "shirt", "price": 55.5, "brand": "O'Neill"}
    assert store.row_metadata(2) == {"category": ""}
    assert store.row_metadata(3) == {"category": "dress", "brand": "Zed", "in_stock": False, "size": "M"}
    assert [store.product_id(r) for r in range(4)] == [None, "P1", None, "P1"]
    groups = store.groups()
    assert groups[1] == groups[3] and len({groups[0], groups[1], groups[2]}) == 3  # no product: alone
    # arrays only: 8 (price) + 1 (bool) + 3 x 4 (string codes) + 4 (product) bytes a row, plus vocabularies
    assert 25 <= store.nbytes_per_item() < 60


def test_integral_numbers_display_as_ints(tmp_path):
    table = read_metadata(_write(tmp_path, "m.csv", "image,stock\na.jpg,3\nb.jpg,\n"))
    store, _ = AttributeStore.build(["a.jpg", "b.jpg"], table)
    assert store.row_metadata(0) == {"category": "", "stock": 3} and isinstance(
        store.row_metadata(0)["stock"], int
    )


def test_store_save_load_mmap_and_reindex(tmp_path):
    store, _ = _store(tmp_path)
    out = tmp_path / "v1"
    out.mkdir()
    store.save(out)
    loaded = AttributeStore.load(out, mmap=True)
    assert isinstance(loaded.columns["price"].data, np.memmap)
    assert [loaded.row_metadata(r) for r in range(4)] == [store.row_metadata(r) for r in range(4)]
    assert loaded.schema() == store.schema()
    old = ["shirt/c.jpg", "dress/a.jpg", "top.jpg", "dress/b.jpg"]
    moved = loaded.reindex(old, ["new/x.jpg", "dress/b.jpg", "shirt/c.jpg"])
    assert len(moved) == 3
    assert moved.row_metadata(0) == {"category": "new"}  # a new item: only its built-in category
    assert moved.row_metadata(1) == store.row_metadata(3) and moved.product_id(1) == "P1"
    assert moved.row_metadata(2) == store.row_metadata(0)


def test_store_load_refuses_damaged_files(tmp_path):
    store, _ = _store(tmp_path)
    out = tmp_path / "v1"
    out.mkdir()
    store.save(out)
    np.save(out / "attr_price.npy", np.zeros(3))
    with pytest.raises(FashionSearchError, match="attr_price.npy"):
        AttributeStore.load(out)


def test_store_without_metadata_has_category_only():
    store, report = AttributeStore.build(["dress/a.jpg", "b.jpg"], None)
    assert store.schema() == {"category": "string"} and report.items_without_row == 0
    assert store.row_metadata(0) == {"category": "dress"}


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    path = tmp_path / "m.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(FashionSearchError, match=r"needs pyarrow: pip install 'fashion-search\[parquet\]'"):
        read_metadata(path)
