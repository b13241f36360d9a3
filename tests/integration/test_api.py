"""The HTTP API over a real engine and index: every endpoint, every bad-input path, traversal, concurrency."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from asserts import assert_hits_equivalent
from fashion_search.service.api import create_app
from service_fixtures import empty_index, free_port, serve_cmd, service_engine, service_index  # noqa: F401


@pytest.fixture(scope="module")
def client(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def catalog_root(service_engine) -> Path:  # noqa: F811
    return service_engine.catalog_root


def jpeg(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/jpeg")


def assert_client_error(r: httpx.Response, *statuses: int) -> None:
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert "detail" in r.json()
    assert "Traceback" not in r.text and "/tmp" not in r.text and os.sep + "home" not in r.text


# -- endpoints -----------------------------------------------------------------------------------
def test_health_info_and_docs(client, service_engine):  # noqa: F811
    assert client.get("/health").json() == {"status": "ok", "items": 12}
    head = client.head("/health")  # as load balancers probe
    assert head.status_code == 200 and head.content == b""
    info = client.get("/info").json()
    assert info["items"] == 12 and info["model"] == "fs-micro" and info["categories"] == ["dress", "shirt"]
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/health", "/info", "/search", "/items/{item_id}/image"} <= set(spec["paths"])


def test_image_only_search_finds_the_image_itself(client, catalog_root):
    ref = catalog_root / "shirt" / "item03.jpg"
    r = client.post("/search", files={"image": jpeg(ref)}, data={"k": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["id"] for h in body["results"]][0] == "shirt/item03.jpg"
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert len(body["results"]) == 5 and body["took_ms"] >= 0
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    # The image URL serves exactly the catalog file, typed as an image.
    img = client.get(body["results"][0]["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content == ref.read_bytes()


def test_search_reports_where_the_time_went_in_server_timing(client, catalog_root):
    # Bytes no other test sends, so that the engine's cache cannot skip the decode and the forward.
    buf = io.BytesIO()
    Image.open(catalog_root / "dress" / "item00.jpg").save(buf, "JPEG", quality=61)
    upload = ("q.jpg", buf.getvalue(), "image/jpeg")
    text = "is longer and in navy (server timing)"
    r = client.post("/search", files={"image": upload}, data={"text": text, "k": "3"})
    assert r.status_code == 200, r.text
    stages = dict(item.split(";dur=") for item in r.headers["server-timing"].split(", "))
    assert {"decode", "wait", "image", "text", "search", "total"} <= set(stages)
    ms = {name: float(value) for name, value in stages.items()}
    assert all(v >= 0 for v in ms.values())
    parts = ms["decode"] + ms["wait"] + ms["image"] + ms["text"] + ms["search"]
    assert parts <= ms["total"] + 0.05 and ms["total"] == pytest.approx(r.json()["took_ms"], abs=0.01)
    # Asked again: both embeddings come from the cache, so only the search (and the wait for the model
    # thread, where fusion and search run) is timed.
    again = client.post("/search", files={"image": upload}, data={"text": text, "k": "3"})
    stages = {s.split(";")[0] for s in again.headers["server-timing"].split(", ")}
    assert stages == {"wait", "search", "total"}


def test_a_query_is_handed_to_the_model_thread_once_by_the_event_loop(client, service_engine, catalog_root):  # noqa: F811
    """Every hand-off wakes a sleeping thread, which on an idle machine costs milliseconds: the endpoint
    gives the whole query to the model thread in one job, from the loop, with no pool thread between
    (before: a pool thread handed over the image's embedding, then the search -- two jobs)."""
    pool = service_engine.model_thread._pool
    callers: list[str] = []
    real_submit = pool.submit

    def counting_submit(*args, **kwargs):
        callers.append(threading.current_thread().name)
        return real_submit(*args, **kwargs)

    buf = io.BytesIO()
    Image.open(catalog_root / "shirt" / "item01.jpg").save(buf, "JPEG", quality=57)  # not cached yet
    pool.submit = counting_submit
    try:
        r = client.post(
            "/search",
            files={"image": ("q.jpg", buf.getvalue(), "image/jpeg")},
            data={"text": "is shorter (one hand-off)", "k": "3"},
        )
    finally:
        del pool.submit
    assert r.status_code == 200, r.text
    assert len(callers) == 1 and "AnyIO worker thread" not in callers[0], callers


def test_text_only_and_composed_return_k_sorted(client, catalog_root):
    for data, files in (
        ({"text": "a red striped dress", "k": "7"}, None),
        (
            {"text": "is darker", "text_weight": "0.3", "k": "7"},
            {"image": jpeg(catalog_root / "dress/item00.jpg")},
        ),
    ):
        r = client.post("/search", data=data, files=files)
        assert r.status_code == 200, r.text
        scores = [h["score"] for h in r.json()["results"]]
        assert len(scores) == 7 and scores == sorted(scores, reverse=True)


def test_text_weight_extremes_match_single_modalities(client, catalog_root):
    files = {"image": jpeg(catalog_root / "dress/item04.jpg")}
    image_only = client.post("/search", files=files, data={"k": "12"}).json()["results"]
    w0 = client.post("/search", files=files, data={"k": "12", "text": "longer", "text_weight": "0"}).json()
    text_only = client.post("/search", data={"k": "12", "text": "longer"}).json()["results"]
    w1 = client.post("/search", files=files, data={"k": "12", "text": "longer", "text_weight": "1"}).json()
    # w=0 re-normalises the image embedding (w=1 the text's): the same ranking up to an ulp's near-ties
    assert_hits_equivalent(w0["results"], image_only)
    assert_hits_equivalent(w1["results"], text_only)


def test_defaults_category_filter_and_k_above_catalog(client):
    assert len(client.post("/search", data={"text": "shirt"}).json()["results"]) == 10
    r = client.post("/search", data={"text": "shirt", "category": "shirt", "k": "20"})
    ids = [h["id"] for h in r.json()["results"]]
    assert len(ids) == 6 and all(i.startswith("shirt/") for i in ids)
    assert len(client.post("/search", data={"text": "x", "k": "1000"}).json()["results"]) == 12


def test_empty_index_answers_empty_results(empty_index):  # noqa: F811
    from fashion_search.service.engine import SearchEngine

    with TestClient(create_app(SearchEngine.open(empty_index, device="cpu"))) as c:
        assert c.get("/health").json() == {"status": "ok", "items": 0}
        assert c.post("/search", data={"text": "dress"}).json()["results"] == []


def test_ids_with_spaces_and_unicode_are_quoted(tmp_path):
    from fashion_search.service.engine import SearchEngine
    from service_fixtures import build_service_index, garment_image

    (tmp_path / "catalog").mkdir()
    garment_image((200, 50, 50), 4).save(tmp_path / "catalog" / "odd name ü#1.png", format="PNG")
    engine = SearchEngine.open(build_service_index(tmp_path, tmp_path / "catalog"), device="cpu")
    with TestClient(create_app(engine)) as c:
        hit = c.post("/search", data={"text": "x"}).json()["results"][0]
        assert hit["id"] == "odd name ü#1.png"
        assert hit["image_url"] == "/items/odd%20name%20%C3%BC%231.png/image"
        r = c.get(hit["image_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# -- bad input: always 4xx with a JSON detail ------------------------------------------------------
@pytest.mark.parametrize(
    "data, statuses",
    [
        ({}, (400, 422)),
        ({"text": "   "}, (400, 422)),
        ({"text": "x", "k": "0"}, (422,)),
        ({"text": "x", "k": "1001"}, (422,)),
        ({"text": "x", "k": "ten"}, (422,)),
        ({"text": "x", "k": "2.5"}, (422,)),
        ({"text": "x", "text_weight": "-0.1"}, (422,)),
        ({"text": "x", "text_weight": "1.5"}, (422,)),
        ({"text": "x", "text_weight": "nan"}, (422,)),
        ({"text": "x", "text_weight": "heavy"}, (422,)),
        ({"text": "x" * 10_001}, (422,)),
        ({"text": "x", "category": "shoes"}, (400,)),
    ],
)
def test_bad_parameters(client, data, statuses):
    assert_client_error(client.post("/search", data=data), *statuses)


def test_json_body_is_refused_with_a_hint(client):
    r = client.post("/search", json={"text": "red dress"})
    assert_client_error(r, 415)
    assert "multipart/form-data" in r.json()["detail"]


def test_long_text_below_the_cap_is_truncated_not_refused(client):
    r = client.post("/search", data={"text": "a very long description " * 400, "k": "3"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


@pytest.mark.parametrize(
    "payload",
    [
        b"<html>not an image</html>",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # a PNG signature and nothing else
        b"\xff\xd8\xff\xe0" + b"\x00" * 10,  # a JPEG header, truncated
        b"",  # a named but empty file
    ],
)
def test_undecodable_uploads(client, payload):
    r = client.post("/search", files={"image": ("photo.jpg", payload, "image/jpeg")}, data={"text": "x"})
    assert_client_error(r, 400, 415)


def test_truncated_real_jpeg(client, catalog_root):
    data = (catalog_root / "dress/item02.jpg").read_bytes()
    r = client.post("/search", files={"image": ("cut.jpg", data[: len(data) // 2], "image/jpeg")})
    assert_client_error(r, 400, 415)


def test_decompression_bomb_is_refused(client):
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx in a few kB
    assert len(buf.getvalue()) < 100_000
    r = client.post("/search", files={"image": ("bomb.png", buf.getvalue(), "image/png")})
    assert_client_error(r, 400, 413)
    assert "pixels" in r.json()["detail"]


def test_upload_size_limit(service_engine, catalog_root):  # noqa: F811
    photo = (catalog_root / "dress/item00.jpg").read_bytes()
    with TestClient(create_app(service_engine, max_upload_bytes=len(photo))) as c:
        assert c.post("/search", files={"image": ("a.jpg", photo, "image/jpeg")}).status_code == 200
        # One byte over: passes the body guard (form overhead), refused while reading the file.
        r = c.post("/search", files={"image": ("a.jpg", photo + b"\0", "image/jpeg")})
        assert_client_error(r, 413)
        # Far over, announced by Content-Length: refused before the body is read.
        big = photo + b"\0" * 200_000
        assert_client_error(c.post("/search", files={"image": ("a.jpg", big, "image/jpeg")}), 413)

        # Far over, streamed without Content-Length: refused by counting the bytes as they arrive.
        boundary = "fsboundary"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        head += "Content-Type: image/jpeg\r\n\r\n"

        def chunks():
            yield head.encode()
            for _ in range(50):
                yield b"\0" * 10_000
            yield f"\r\n--{boundary}--\r\n".encode()

        r = c.post(
            "/search", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
        assert "content-length" not in r.request.headers
        assert_client_error(r, 413)


def test_unexpected_errors_are_a_generic_500(service_engine, caplog):  # noqa: F811
    class Broken:
        def __getattr__(self, name):
            return getattr(service_engine, name)

        def __len__(self):
            return len(service_engine)

        def search(self, **kwargs):
            raise RuntimeError("secret detail /etc/shadow")

        def search_future(self, **kwargs):  # the API's way in: the error arrives through the future
            return service_engine.model_thread.submit(self.search, **kwargs)

    with TestClient(create_app(Broken()), raise_server_exceptions=False) as c:
        r = c.post("/search", data={"text": "x"})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert "secret detail" in caplog.text  # logged for the operator, not shown to the client


# -- /items: only indexed ids, never a path ------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "/items/nothere.jpg/image",
        "/items/dress/item01.jpg/image",  # exists in another category folder? no: dress holds even numbers
        "/items/%2e%2e/%2e%2e/etc/passwd/image",
        "/items/..%2f..%2fetc%2fpasswd/image",
        "/items/dress%2Fitem00.jpg/image",
        "/items/%2Fetc%2Fpasswd/image",
        "/items//etc/passwd/image",
        "/items/dress/%2e%2e/shirt/item01.jpg/image",
        "/items/%00/image",
        "/items/dress/item00.jpg%00.png/image",
        "/items/dress/item00.jpg",
        "/items/../../../../etc/passwd/image",
    ],
)
def test_items_refuse_anything_but_indexed_ids(client, url):
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code)
    assert r.headers["content-type"].startswith("application/json") and "detail" in r.json()


def test_items_outside_index_but_inside_catalog_are_refused(client, catalog_root, tmp_path):
    (catalog_root / "notes.txt").write_text("not indexed")
    assert client.get("/items/notes.txt/image").status_code == 404
    assert client.get("/items/shirt/item01.jpg/image").status_code == 200


# -- concurrency and CORS -------------------------------------------------------------------------
def test_concurrent_requests_are_consistent(client, catalog_root):
    queries = [
        ({"text": "a blue shirt", "k": "5"}, None),
        ({"k": "5"}, catalog_root / "shirt/item05.jpg"),
        ({"text": "with stripes", "text_weight": "0.6", "k": "5"}, catalog_root / "dress/item08.jpg"),
    ]

    def run(q):
        data, image = q
        files = {"image": jpeg(image)} if image else None
        r = client.post("/search", data=data, files=files)
        assert r.status_code == 200, r.text
        return [(h["id"], round(h["score"], 5)) for h in r.json()["results"]]

    expected = [run(q) for q in queries]
    jobs = [i % len(queries) for i in range(80)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda i: run(queries[i]), jobs))
    assert all(g == expected[i] for g, i in zip(got, jobs))


def test_cors_closed_by_default_and_opt_in(service_engine):  # noqa: F811
    origin = {"Origin": "http://shop.example"}
    with TestClient(create_app(service_engine)) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers=origin).headers
    with TestClient(create_app(service_engine, cors_origins=["http://shop.example"])) as c:
        assert (
            c.get("/health", headers=origin).headers["access-control-allow-origin"] == "http://shop.example"
        )


# -- the real server ------------------------------------------------------------------------------
def test_serve_command_runs_uvicorn(service_index, catalog_root):  # noqa: F811
    port = free_port()
    cmd = serve_cmd(service_index, port)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 25
        while True:
            try:
                r = httpx.get(base + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert r.json() == {"status": "ok", "items": 12}
        files = {"image": jpeg(catalog_root / "shirt/item07.jpg")}
        hit = httpx.post(base + "/search", files=files, data={"k": "1"}).json()["results"][0]
        assert hit["id"] == "shirt/item07.jpg"
        big = httpx.post(
            base + "/search", files={"image": ("a.jpg", b"\0" * (11 * 1024 * 1024), "image/jpeg")}
        )
        assert big.status_code == 413 and "detail" in big.json()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_with_a_missing_index_exits_2(tmp_path):
    cmd = [sys.executable, "-m", "fashion_search.cli", "serve", "--index", str(tmp_path / "nope")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "error" in done.stderr
