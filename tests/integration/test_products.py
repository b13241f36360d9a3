"""Product catalogs end to end: metadata from a file, filters and one result per product in the CLI, the
Python API and HTTP, and bad input refused in one line without losing the index."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_cli_index import MODEL, cli

from conftest import write_image
from fashion_search import load_engine
from fashion_search.service.api import create_app

BRANDS = ("Acme", "Zed", "Moda")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """12 photos of 6 products (two each) in two categories, with a CSV of their attributes."""
    base = tmp_path_factory.mktemp("shop")
    rows = []
    for n in range(12):
        category = "dress" if n % 2 else "shirt"
        item = f"{category}/p{n // 2}_{n % 2}.jpg"
        write_image(base / "photos" / item, (20 * n, 250 - 20 * n, 90 + 10 * n))
        rows.append(
            {
                "image": item,
                "product_id": f"P{n // 2}",
                "title": f"Garment {n // 2}",
                "brand": BRANDS[n % 3],
                "price": 10 + 9 * n,
                "in_stock": "true" if n % 4 else "false",
            }
        )
    rows.append({**rows[0], "image": "gone.jpg"})  # a row whose photo is not in the catalog
    with open(base / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    index = base / "index"
    out = cli(
        "index",
        str(base / "photos"),
        "--out",
        str(index),
        *MODEL,
        "--workers",
        "0",
        "--quiet",
        "--metadata",
        str(base / "meta.csv"),
    )
    return base, index, rows[:-1], out


def search(index, *args):
    return json.loads(cli("search", "--index", str(index), "--json", *args).stdout)["results"]


def expected(rows, where):
    """Plain Python over the CSV's rows: which images a filter keeps."""
    return {r["image"] for r in rows if where(r)}


def test_index_prints_and_stores_the_schema_and_reports_unmatched_rows(shop):
    base, index, _, out = shop
    assert (
        "attributes: category (string), title (string), brand (string), price (number), in_stock (bool)"
        in out.stdout
    )
    assert "1 metadata rows name no indexed image" in out.stderr
    info = json.loads(cli("info", "--index", str(index), "--json").stdout)
    assert info["attributes"] == {
        "category": "string",
        "title": "string",
        "brand": "string",
        "price": "number",
        "in_stock": "bool",
    }
    report = json.loads((index / "report.json").read_text())["metadata"]
    assert report["rows_not_indexed"] == 1 and report["rows_not_indexed_sample"] == ["gone.jpg"]
    assert report["items_without_row"] == 0


def test_where_keeps_only_matching_items_and_results_carry_their_metadata(shop):
    _, index, rows, _ = shop
    hits = search(
        index,
        "--text",
        "a red shirt",
        "-k",
        "50",
        "--no-group",
        "--where",
        "price < 70 and brand in ['Acme', 'Zed'] and in_stock == true",
    )
    want = expected(
        rows, lambda r: r["price"] < 70 and r["brand"] in ("Acme", "Zed") and r["in_stock"] == "true"
    )
    assert {h["id"] for h in hits} == want and want
    by_image = {r["image"]: r for r in rows}
    for h in hits:
        row = by_image[h["id"]]
        assert h["product_id"] == row["product_id"]
        assert h["metadata"]["price"] == row["price"] and h["metadata"]["brand"] == row["brand"]
        assert h["metadata"]["category"] == h["id"].split("/")[0]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_one_result_per_product_unless_no_group(shop):
    _, index, rows, _ = shop
    grouped = search(index, "--text", "a garment", "-k", "50")
    assert len(grouped) == 6 and len({h["product_id"] for h in grouped}) == 6
    every = search(index, "--text", "a garment", "-k", "50", "--no-group")
    assert len(every) == 12
    # each product's result is its best-scoring image
    best = {}
    for h in every:
        best.setdefault(h["product_id"], h)
    assert {h["product_id"]: h["id"] for h in grouped} == {p: h["id"] for p, h in best.items()}
    assert len(search(index, "--text", "a garment", "-k", "2")) == 2  # k counts products


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("price < 'abc'", "price is a number"),
        ("colour == 'red'", "unknown attribute 'colour'"),
        ("price < 50 and (brand ==", "at column"),
    ],
)
def test_a_bad_filter_exits_2_with_one_line(shop, where, message):
    _, index, _, _ = shop
    proc = cli("search", "--index", str(index), "--text", "x", "--where", where, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_changed_metadata_updates_attributes_without_embedding_and_a_bad_file_loses_nothing(shop, tmp_path):
    base, shared, rows, _ = shop
    index = tmp_path / "index"
    shutil.copytree(shared, index)  # the other tests keep the module's index as built
    changed = tmp_path / "meta.jsonl"
    changed.write_text(
        "\n".join(
            json.dumps({**r, "price": 1.5 if r["image"] == rows[3]["image"] else r["price"]}) for r in rows
        )
    )
    out = cli("index", str(base / "photos"), "--out", str(index), "--quiet", "--metadata", str(changed))
    assert "0 added" in out.stdout
    assert [h["id"] for h in search(index, "--text", "x", "--where", "price < 2")] == [rows[3]["image"]]

    broken = tmp_path / "broken.csv"
    broken.write_text("title,price\nA,3\n")
    proc = cli(
        "index", str(base / "photos"), "--out", str(index), "--quiet", "--metadata", str(broken), check=False
    )
    assert proc.returncode == 2 and "image" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert [h["id"] for h in search(index, "--text", "x", "--where", "price < 2")] == [rows[3]["image"]]


def test_python_api_and_http_take_the_same_filters(shop):
    _, index, rows, _ = shop
    engine = load_engine(index, device="cpu")
    try:
        hits = engine.search(text="a garment", k=50, where="brand == 'Moda' or price >= 100", group=False)
        want = expected(rows, lambda r: r["brand"] == "Moda" or r["price"] >= 100)
        assert {h.id for h in hits} == want
        assert all(h.metadata["brand"] == "Moda" or h.metadata["price"] >= 100 for h in hits)
        ranges = engine.attribute_values()
        assert ranges["price"]["min"] == 10 and ranges["price"]["max"] == 109
        assert ranges["brand"]["values"] == sorted(BRANDS)

        with TestClient(create_app(engine)) as client:
            r = client.post(
                "/search",
                data={
                    "text": "a garment",
                    "k": "50",
                    "group": "false",
                    "where": "brand == 'Moda' or price >= 100",
                },
            )
            assert r.status_code == 200
            assert {h["id"] for h in r.json()["results"]} == want
            first = r.json()["results"][0]
            assert first["product_id"] and first["metadata"]["title"].startswith("Garment")
            grouped = client.post("/search", data={"text": "a garment", "k": "50"}).json()["results"]
            assert len(grouped) == 6
            bad = client.post("/search", data={"text": "x", "where": "price < 'abc'"})
            assert bad.status_code == 400 and "price is a number" in bad.json()["detail"]
    finally:
        engine.close()


def test_category_and_where_combine(shop):
    _, index, rows, _ = shop
    hits = search(
        index, "--text", "x", "-k", "50", "--no-group", "--category", "dress", "--where", "price > 50"
    )
    assert {h["id"] for h in hits} == expected(
        rows, lambda r: r["image"].startswith("dress/") and r["price"] > 50
    )
    assert np.all([h["id"].startswith("dress/") for h in hits])
