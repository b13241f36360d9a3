"""API limits and hygiene: per-client rate limit, configurable caps, no paths, CORS closed, /items confined."""

from __future__ import annotations

import asyncio
import io
import os

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fashion_search.cli import build_parser
from fashion_search.service.api import RateLimit, create_app
from fashion_search.service.engine import SearchEngine
from service_fixtures import build_service_index, garment_image, service_engine, service_index  # noqa: F401


def png(size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


# -- rate limiting -----------------------------------------------------------------------------------
def test_no_rate_limit_by_default(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine)) as c:
        assert {c.get("/health").status_code for _ in range(60)} == {200}


def test_rate_limit_answers_429_with_retry_after(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine, rate_limit=0.5, rate_burst=3)) as c:
        assert [c.post("/search", data={"text": "x"}).status_code for _ in range(3)] == [200] * 3
        r = c.post("/search", data={"text": "x"}, files={"image": ("a.png", png(), "image/png")})
        assert r.status_code == 429 and r.headers["content-type"] == "application/json"
        assert 1 <= int(r.headers["retry-after"]) <= 2 and "too many requests" in r.json()["detail"]
        assert c.get("/health").status_code == 429  # every path counts: a flood is a flood


def _call(limiter: RateLimit, client: str) -> int:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "client": (client, 1234), "headers": []}
    asyncio.run(limiter(scope, receive, send))
    return sent[0]["status"] if sent else 200


def test_rate_limit_is_per_client_refills_and_stays_bounded():
    now = [0.0]

    async def ok(scope, receive, send):
        return None

    limiter = RateLimit(ok, rate=2.0, burst=2, max_clients=100, clock=lambda: now[0])
    assert [_call(limiter, "10.0.0.1") for _ in range(3)] == [200, 200, 429]
    assert _call(limiter, "10.0.0.2") == 200  # another client has its own bucket
    now[0] += 0.5  # one token back at 2/s
    assert [_call(limiter, "10.0.0.1") for _ in range(2)] == [200, 429]
    for n in range(1000):  # a scan from many addresses
        _call(limiter, f"10.1.{n // 256}.{n % 256}")
    assert len(limiter.buckets) == 100


def test_serve_flags_reach_the_app():
    from fashion_search.cli.serving import limits_from_args
    from fashion_search.service.limits import ServerLimits

    # Left out, every flag is the server's own default: one home for each limit.
    assert limits_from_args(build_parser().parse_args(["serve", "--index", "I"])) == ServerLimits()
    args = build_parser().parse_args(
        [
            "serve",
            "--index",
            "I",
            "--rate-limit",
            "5",
            "--rate-burst",
            "9",
            "--cors-origin",
            "https://a.example",
        ]
        + ["--cors-origin", "https://b.example", "--max-text-chars", "50", "--reload-interval", "0"]
        + ["--max-upload-mb", "2", "--max-pixels", "1000"]
    )
    assert limits_from_args(args) == ServerLimits(
        max_upload_bytes=2 * 1024 * 1024,
        max_pixels=1000,
        max_text_chars=50,
        rate_limit=5.0,
        rate_burst=9,
        reload_interval=0.0,
        cors_origins=("https://a.example", "https://b.example"),
    )


def test_an_unknown_limit_is_refused(service_engine):  # noqa: F811
    with pytest.raises(TypeError):
        create_app(service_engine, max_pixel=1000)  # a typo must not silently keep the default


# -- configurable caps -----------------------------------------------------------------------------------
def test_text_and_pixel_caps_are_configurable(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine, max_text_chars=20, max_pixels=1000)) as c:
        assert c.post("/search", data={"text": "x" * 20}).status_code == 200
        r = c.post("/search", data={"text": "x" * 21})
        assert r.status_code == 422 and "20 characters" in r.json()["detail"]
        assert c.post("/search", files={"image": ("s.png", png((30, 30)), "image/png")}).status_code == 200
        r = c.post("/search", files={"image": ("b.png", png((48, 40)), "image/png")})
        assert r.status_code == 400 and "1,000 pixels" in r.json()["detail"]


# -- no server paths --------------------------------------------------------------------------------------
def test_info_does_not_reveal_server_paths(service_engine):  # noqa: F811
    """Bug: /info answered the catalog's absolute path (catalog_root) to anyone."""
    with TestClient(create_app(service_engine)) as c:
        r = c.get("/info")
    assert r.status_code == 200 and "catalog_root" not in r.json()
    assert str(service_engine.catalog_root) not in r.text and "/tmp/" not in r.text


# -- /items never leaves the catalog -----------------------------------------------------------------------
def test_items_behind_symlinks_out_of_the_catalog_are_not_served(tmp_path):
    outside = tmp_path / "private"
    outside.mkdir()
    garment_image((10, 200, 10), 3).save(outside / "secret.jpg")
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    garment_image((200, 10, 10), 4).save(catalog / "inside.jpg")
    os.symlink(outside / "secret.jpg", catalog / "link.jpg")  # a file link out of the catalog
    os.symlink(outside, catalog / "linked-dir")  # and a folder link
    engine = SearchEngine.open(build_service_index(tmp_path, catalog), device="cpu")
    assert sorted(engine.ids()) == ["inside.jpg", "link.jpg", "linked-dir/secret.jpg"]
    with TestClient(create_app(engine)) as c:
        assert c.get("/items/inside.jpg/image").status_code == 200
        for item in ("link.jpg", "linked-dir/secret.jpg"):
            r = c.get(f"/items/{item}/image")
            assert r.status_code == 404 and r.json() == {"detail": "item not found"}
        # A file swapped for a link after indexing is refused the same way.
        (catalog / "inside.jpg").unlink()
        os.symlink("/etc/hostname", catalog / "inside.jpg")
        assert c.get("/items/inside.jpg/image").status_code == 404


# -- CORS ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("origins", [(), ("https://shop.example",)])
def test_cors_preflight_only_for_configured_origins(service_engine, origins):  # noqa: F811
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with TestClient(create_app(service_engine, cors_origins=origins)) as c:
        evil = c.options("/search", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in evil.headers
        shop = c.options("/search", headers={"Origin": "https://shop.example", **preflight})
        if origins:
            assert shop.status_code == 200
            assert shop.headers["access-control-allow-origin"] == "https://shop.example"
        else:
            assert "access-control-allow-origin" not in shop.headers and shop.status_code == 405
            assert "detail" in shop.json()
