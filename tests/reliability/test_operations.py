"""API keys, /metrics, request ids and JSON logs, and the bound on uploads held in memory."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fashion_search.errors import FashionSearchError
from fashion_search.service.api import create_app
from fashion_search.service.auth import load_api_keys
from fashion_search.service.limits import ServerLimits
from fashion_search.service.observe import JsonLines, UploadSlots
from service_fixtures import service_engine, service_index  # noqa: F401

KEY = "k3y-" + "x" * 28


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 80), (200, 40, 60)).save(buf, "JPEG")
    return buf.getvalue()


def test_every_route_but_health_needs_a_key(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine, reload_interval=0, api_keys=(KEY,))) as c:
        item = service_engine.ids()[0]
        for method, path in [("post", "/search"), ("get", "/info"), ("get", "/metrics")] + [
            ("get", f"/items/{item}/image")
        ]:
            r = getattr(c, method)(path, data={"text": "red"}) if method == "post" else c.get(path)
            assert r.status_code == 401 and "API key" in r.json()["detail"], path
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/health").status_code == 200
        assert c.post("/search", data={"text": "red"}, headers={"X-API-Key": "wrong" * 5}).status_code == 401
        assert (
            c.post("/search", data={"text": "red"}, headers={"Authorization": f"Bearer {KEY}"}).status_code
            == 200
        )
        assert c.get(f"/items/{item}/image", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_keys_come_from_a_file_and_the_environment_and_are_never_printed(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# shop keys\n{KEY}\n\n  {KEY}2  \n")
    keys = load_api_keys(path, env={"FASHION_SEARCH_API_KEYS": "e" * 20 + ",f" + "f" * 19})
    assert keys == (KEY, KEY + "2", "e" * 20, "f" * 20)
    assert KEY not in repr(ServerLimits(api_keys=keys))
    (tmp_path / "empty").write_text("# none yet\n")
    for bad, message in [("empty", "no key"), ("missing", "cannot read")]:
        with pytest.raises(FashionSearchError, match=message):
            load_api_keys(tmp_path / bad, env={})
    with pytest.raises(FashionSearchError, match="at least 16"):
        load_api_keys(None, env={"FASHION_SEARCH_API_KEYS": "short"})


def test_metrics_count_requests_stages_refusals_and_the_index(service_engine):  # noqa: F811
    with TestClient(create_app(service_engine, reload_interval=0, max_upload_bytes=50_000)) as c:
        assert c.post(
            "/search", files={"image": ("q.jpg", jpeg(), "image/jpeg")}, data={"text": "a"}
        ).is_success
        assert c.post("/search", files={"image": ("q.jpg", b"x" * 200_000, "image/jpeg")}).status_code == 413
        assert c.get(f"/items/{service_engine.ids()[0]}/image").status_code == 200
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'fashion_search_http_requests_total{method="POST",route="/search",status="200"} 1.0' in text
    assert 'route="/items/{item_id:path}/image",status="200"' in text  # the template, not the item
    for stage in ("decode", "wait", "image", "text", "search"):
        assert f'fashion_search_search_stage_seconds_count{{stage="{stage}"}} 1.0' in text
    assert 'fashion_search_refused_requests_total{reason="too_large"} 1.0' in text
    assert f"fashion_search_index_items {float(len(service_engine))}" in text
    assert "fashion_search_model_queue_length 0.0" in text
    assert "fashion_search_index_version" in text
    assert 'fashion_search_model_info{checkpoint_sha256="' in text and 'model="fs-micro"' in text


def test_each_request_gets_an_id_in_its_header_and_its_json_log_line(service_engine):  # noqa: F811
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("fashion_search.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with TestClient(create_app(service_engine, reload_interval=0, api_keys=(KEY,))) as c:
            first = c.post("/search", data={"text": "red"}, headers={"Authorization": f"Bearer {KEY}"})
            second = c.get("/health", headers={"X-Request-ID": "shop-trace-42"})
    finally:
        logger.removeHandler(handler)
    rid = first.headers["x-request-id"]
    assert len(rid) == 32 and second.headers["x-request-id"] == "shop-trace-42"
    entries = [json.loads(line) for line in lines]
    assert [(e["request_id"], e["path"], e["status"]) for e in entries] == [
        (rid, "/search", 200),
        ("shop-trace-42", "/health", 200),
    ]
    assert KEY not in "".join(lines)


def test_large_uploads_wait_unread_beyond_the_slots():
    """64 concurrent 10 MB uploads held ~680 MB; now at most `slots` bodies are read at once."""
    inside, most, read_early = 0, 0, []

    async def app(scope, receive, send):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await receive()
        await asyncio.sleep(0.01)
        inside -= 1

    async def main():
        gate = UploadSlots(app, slots=2)
        headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"10000000")]

        async def one(n: int):
            async def receive():
                read_early.append(n) if inside > 2 else None
                return {"type": "http.request", "body": b"", "more_body": False}

            await gate({"type": "http", "method": "POST", "headers": headers}, receive, None)

        await asyncio.gather(*(one(n) for n in range(12)))
        # A small text form passes even when every slot is taken.
        async with gate.slots, gate.slots:
            small = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"300")]
            await asyncio.wait_for(
                gate({"type": "http", "method": "POST", "headers": small}, one_body, None), 5
            )

    async def one_body():
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(main())
    assert most == 2 and not read_early


def test_the_new_serve_flags_reach_the_limits(tmp_path, capsys):
    from fashion_search.cli import build_parser, main
    from fashion_search.cli.serving import limits_from_args

    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    argv = ["serve", "--index", "I", "--header-timeout", "3", "--body-timeout", "7", "--max-connections", "9"]
    argv += ["--max-uploads-in-memory", "2", "--log-format", "json", "--api-key-file", str(keys)]
    limits = limits_from_args(build_parser().parse_args(argv))
    assert (limits.header_timeout, limits.body_timeout, limits.max_connections) == (3.0, 7.0, 9)
    assert (limits.max_uploads_in_memory, limits.log_format, limits.api_keys) == (2, "json", (KEY,))
    # A key file that cannot be read stops the server before it starts: exit 2, one line.
    from service_fixtures import free_port

    argv = [
        "serve",
        "--index",
        str(tmp_path),
        "--port",
        str(free_port()),
        "--api-key-file",
        str(tmp_path / "no"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read API key file" in err and err.count("\n") == 1
