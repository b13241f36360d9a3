"""The Milvus backend against Milvus Lite: the same answers as exact FAISS search (ids, scores, filters,
grouping), incremental and killed re-index runs without duplicates, the model check, no token on disk."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

pytest.importorskip(
    "pymilvus", reason="the Milvus backend needs pymilvus: pip install 'fashion-search[milvus]'"
)
pytest.importorskip(
    "milvus_lite", reason="these tests run on Milvus Lite: pip install 'fashion-search[milvus]'"
)

from test_cli_index import MODEL, cli  # noqa: E402

from conftest import write_image  # noqa: E402
from fashion_search import load_engine  # noqa: E402
from fashion_search.index.store import load_version  # noqa: E402
from service_fixtures import open_page  # noqa: E402

BRANDS = ("Acme", "O'Neil", 'Say "hi"')  # quotes of both kinds must survive the trip into Milvus's filter
BUILD = [*MODEL, "--workers", "0", "--quiet"]


def _photos(root, n=12):
    rows = []
    for i in range(n):
        item = f"{'dress' if i % 2 else 'shirt'}/p{i // 2}_{i % 2}.jpg"
        write_image(root / item, (20 * i, 250 - 20 * i, 90 + 10 * i))
        rows.append(
            {
                "image": item,
                "product_id": f"P{i // 2}",
                "brand": BRANDS[i % 3],
                "price": "" if i == 5 else 10 + 9 * i,  # one item without a price: SQL's unknown
                "in_stock": "true" if i % 4 else "false",
            }
        )
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _milvus_ids(index_dir) -> list[str]:
    """Every id the collection holds (duplicates would show twice), straight from Milvus."""
    index = load_version(index_dir)[0]
    try:
        rows = index._connect().query(index.collection, filter='id != ""', output_fields=["id"], limit=16384)
        return sorted(r["id"] for r in rows)
    finally:
        index.close()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """One catalog indexed twice: exact FAISS (the reference) and Milvus Lite."""
    base = tmp_path_factory.mktemp("milvus_shop")
    rows = _photos(base / "photos")
    _write_csv(base / "meta.csv", rows)
    meta = ["--metadata", str(base / "meta.csv")]
    cli("index", str(base / "photos"), "--out", str(base / "faiss"), *BUILD, *meta, "--index-type", "exact")
    out = cli(
        "index", str(base / "photos"), "--out", str(base / "milvus"), *BUILD, *meta,
        "--backend", "milvus", "--milvus-uri", str(base / "shop.db"),
    )  # fmt: skip
    return base, out


QUERIES = {
    "image": {"image": "shirt/p2_0.jpg"},
    "text": {"text": "a red striped dress"},
    "composed": {"image": "dress/p3_1.jpg", "text": "is shorter and sleeveless", "text_weight": 0.5},
}
WHERES = [
    None,
    "price < 80",
    'brand == "O\'Neil"',
    "brand in ['Say \"hi\"', 'Acme'] and in_stock",
    "not (price < 50)",  # the item without a price matches neither this nor price < 50
    "category == 'dress' or price >= 100",
]


def _same(reference, got, tol=1e-5):
    """Same scores within tol, and the same ids except where two scores tie within tol."""
    assert len(reference) == len(got), ([r.id for r in reference], [r.id for r in got])
    for a, b in zip(reference, got):
        assert abs(a.score - b.score) <= tol, (a, b)
        if a.id != b.id:
            assert any(abs(a.score - r.score) <= tol and r.id == b.id for r in reference), (a, b)
        else:
            assert a.product_id == b.product_id and a.metadata == b.metadata


@pytest.mark.parametrize("group", [True, False], ids=["grouped", "every-image"])
@pytest.mark.parametrize("where", WHERES)
@pytest.mark.parametrize("mode", sorted(QUERIES))
def test_milvus_answers_as_exact_faiss(shop, engines, mode, where, group):
    base, _ = shop
    faiss, milvus = engines
    query = dict(QUERIES[mode])
    if "image" in query:
        query["image"] = str(base / "photos" / query["image"])
    for k in (3, 12):
        expected = faiss.search(**query, k=k, where=where, group=group)
        _same(expected, milvus.search(**query, k=k, where=where, group=group))
    assert expected, "every filter here matches some items"


@pytest.fixture(scope="module")
def engines(shop):
    base, _ = shop
    faiss, milvus = load_engine(base / "faiss"), load_engine(base / "milvus")
    yield faiss, milvus
    milvus.index.close()
    faiss.close()
    milvus.close()


def test_the_index_records_the_backend_and_info_shows_it(shop):
    from fashion_search.index import milvus_index, store

    assert milvus_index.VERSION_ATTRIBUTES == store.ATTRIBUTES
    base, out = shop
    assert "milvus recall@10 1.000" in out.stdout
    info = json.loads(cli("info", "--index", str(base / "milvus"), "--json").stdout)
    assert info["backend"] == {
        "backend": "milvus",
        "uri": str(base / "shop.db"),
        "collection": "fs_milvus",
        "params": {"index_type": "HNSW", "metric_type": "COSINE", "M": 16, "efConstruction": 200, "ef": 64},
    }
    assert info["index_kind"] == "milvus" and info["items"] == 12 and info["products"] == 6
    faiss = json.loads(cli("info", "--index", str(base / "faiss"), "--json").stdout)
    assert faiss["backend"] == {"backend": "faiss"}


def test_category_flag_and_cli_search_go_through_milvus(shop):
    base, _ = shop
    args = ["search", "--json", "--text", "red", "--category", "dress", "-k", "4"]
    want = json.loads(cli(*args, "--index", str(base / "faiss")).stdout)["results"]
    got = json.loads(cli(*args, "--index", str(base / "milvus")).stdout)["results"]
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert all(r["id"].startswith("dress/") for r in got)
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)


def test_reindex_follows_added_changed_and_deleted_files(tmp_path):
    photos, out, db = tmp_path / "photos", tmp_path / "idx", tmp_path / "shop.db"
    _photos(photos, n=8)
    cli("index", str(photos), "--out", str(out), *BUILD, "--backend", "milvus", "--milvus-uri", str(db))
    write_image(photos / "shirt" / "new.jpg", (1, 2, 3))
    write_image(photos / "dress" / "p0_1.jpg", (250, 250, 0), size=(50, 41))  # changed
    (photos / "shirt" / "p1_0.jpg").unlink()
    run = cli("index", str(photos), "--out", str(out), *BUILD)  # a re-run needs no Milvus flags
    assert "2 added, 2 removed, 6 unchanged" in run.stdout
    ids = sorted(load_version(out)[0].ids())
    assert "shirt/new.jpg" in ids and "shirt/p1_0.jpg" not in ids
    assert _milvus_ids(out) == ids
    engine = load_engine(out)
    try:
        hit = engine.search(image=str(photos / "dress" / "p0_1.jpg"), k=1)[0]
        assert hit.id == "dress/p0_1.jpg" and hit.score == pytest.approx(1.0, abs=1e-5)
    finally:
        engine.index.close()
        engine.close()


def test_a_killed_run_rerun_leaves_no_duplicates_or_orphans(tmp_path):
    """A build killed after Milvus took its rows but before its version went live: Milvus holds rows no
    version lists (an item since deleted, items to be embedded again). The re-run converges."""
    photos, out, db = tmp_path / "photos", tmp_path / "idx", tmp_path / "shop.db"
    _photos(photos, n=6)
    cli("index", str(photos), "--out", str(out), *BUILD, "--backend", "milvus", "--milvus-uri", str(db))
    write_image(photos / "shirt" / "late.jpg", (9, 9, 9))
    index = load_version(out)[0]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, index.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add(["shirt/late.jpg", "dress/ghost.jpg"], vectors[:2])
    index.remove(["shirt/p0_0.jpg"])
    index.add(["shirt/p0_0.jpg"], vectors[2:])
    index._sync()  # what save() sends to Milvus first; the kill comes before CURRENT moves
    index.close()
    assert "dress/ghost.jpg" in _milvus_ids(out)
    cli("index", str(photos), "--out", str(out), *BUILD)
    ids = sorted(load_version(out)[0].ids())
    assert len(ids) == 7 and "shirt/late.jpg" in ids
    assert _milvus_ids(out) == ids  # no ghost, no second copy of anything


def test_another_model_is_refused(shop):
    base, _ = shop
    proc = cli(
        "index", str(base / "photos"), "--out", str(base / "milvus"), "--model", "fs-tiny",
        "--pretrained", "none", "--workers", "0", "--quiet", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "was built with" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_token_stays_out_of_files_and_output(tmp_path, monkeypatch, caplog):
    secret = "s3cret-T0KEN-for-milvus"
    monkeypatch.setenv("MILVUS_TOKEN", secret)
    photos, out = tmp_path / "photos", tmp_path / "idx"
    _photos(photos, n=4)
    run = cli(
        "index",
        str(photos),
        "--out",
        str(out),
        *BUILD,
        "--backend",
        "milvus",
        "--milvus-uri",
        str(tmp_path / "t.db"),
    )
    info = cli("info", "--index", str(out), "--json")
    search = cli("search", "--index", str(out), "--text", "red")
    for text in (run.stdout, run.stderr, info.stdout, search.stdout, search.stderr, caplog.text):
        assert secret not in text
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--milvus-uri", "x.db"], "need --backend milvus"),
        (["--backend", "milvus"], "needs --milvus-uri"),
        (["--backend", "milvus", "--milvus-uri", "x.txt"], "must end in .db"),
        (["--backend", "milvus", "--milvus-uri", "http://u:pw@host:19530"], "MILVUS_TOKEN"),
        (["--backend", "milvus", "--milvus-uri", "x.db", "--collection", "bad-name"], "letters, digits"),
        (["--backend", "milvus", "--milvus-uri", "x.db", "--index-type", "ivf"], "faiss backend"),
    ],
)
def test_bad_milvus_flags_are_one_line(tmp_path, flags, message):
    (tmp_path / "photos").mkdir()
    proc = cli("index", str(tmp_path / "photos"), "--out", str(tmp_path / "idx"), *BUILD, *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_collection_is_not_shared_or_switched(shop, tmp_path):
    base, _ = shop
    shutil.copytree(base / "photos", tmp_path / "photos")
    taken = cli(
        "index", str(tmp_path / "photos"), "--out", str(tmp_path / "other"), *BUILD, "--backend", "milvus",
        "--milvus-uri", str(base / "shop.db"), "--collection", "fs_milvus", check=False,
    )  # fmt: skip
    assert taken.returncode == 2 and "already exists" in taken.stderr
    switched = cli(
        "index", str(base / "photos"), "--out", str(base / "milvus"), *BUILD, "--backend", "milvus",
        "--collection", "elsewhere", check=False,
    )  # fmt: skip
    assert switched.returncode == 2 and "differs" in switched.stderr
    faiss = cli(
        "index",
        str(base / "photos"),
        "--out",
        str(base / "milvus"),
        *BUILD,
        "--backend",
        "faiss",
        check=False,
    )
    assert faiss.returncode == 2 and "is a Milvus index" in faiss.stderr


def _jpeg(path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def test_the_http_api_serves_a_milvus_index_as_it_serves_faiss(shop, engines):
    from fastapi.testclient import TestClient

    from fashion_search.service.api import create_app

    base, _ = shop
    faiss, milvus = engines
    photo = base / "photos" / "dress/p3_1.jpg"
    form = {"text": "is shorter and sleeveless", "k": "5", "where": "price < 80 and in_stock"}
    answers = []
    for engine in (faiss, milvus):
        with TestClient(create_app(engine)) as client:
            r = client.post("/search", data=form, files={"image": _jpeg(photo)})
            assert r.status_code == 200, r.text
            answers.append(r.json()["results"])
            first = answers[-1][0]["id"]
            assert client.get(f"/items/{first}/image").content == (base / "photos" / first).read_bytes()
            assert client.get("/info").json()["items"] == 12
            bad = client.post("/search", data={"text": "x", "where": "price < 'abc'"})
            assert bad.status_code == 400 and "price is a number" in bad.json()["detail"]
    want, got = answers
    assert [h["id"] for h in got] == [h["id"] for h in want] != []
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-5)
    assert [h["metadata"] for h in got] == [h["metadata"] for h in want]


def test_the_web_page_searches_and_filters_a_milvus_index(shop, monkeypatch):
    base, _ = shop
    pages = {}
    for name in ("faiss", "milvus"):
        at = open_page(monkeypatch, base / name, timeout=60)
        at.text_input(key="text").input("a red garment").run()
        at.toggle(key="group").set_value(False).run()
        at.multiselect(key="flt_brand").set_value(["Acme", "O'Neil"]).run()
        assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
        pages[name] = [m.value for m in at.markdown if m.value.startswith("**")]
    assert pages["milvus"] == pages["faiss"] and len(pages["faiss"]) >= 4
