"""The real server (uvicorn on 127.0.0.1) against slow and malformed clients, with keys and JSON logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import httpx
import pytest

from service_fixtures import build_service_index, free_port, serve_cmd

pytestmark = pytest.mark.slow  # a subprocess: pays the ~5 s torch import

KEY = "slow-client-test-key-0123456789"
HEADER_S, BODY_S, MAX_CONN = 1.0, 2.0, 6


def start(tmp_path, port: int) -> subprocess.Popen:
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    flags = ["--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S)]
    flags += ["--max-connections", str(MAX_CONN), "--api-key-file", str(keys), "--log-format", "json"]
    cmd = serve_cmd(build_service_index(tmp_path), port, "--reload-interval", "0", *flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def trickle(port: int, chunks: list[bytes], gap: float, limit: float) -> tuple[bytes, float]:
    """Send `chunks` `gap` s apart until the server closes; (what it answered, seconds until closed)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.settimeout(gap)
        got = b""
        for chunk in chunks:  # bounded: the list is finite
            try:
                s.sendall(chunk)
            except OSError:
                break
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            got += data
            if not data:
                break
            s.settimeout(limit)  # answered: read to the close
            while data:
                data = s.recv(65536)
                got += data
            break
        return got, time.monotonic() - started


def read_to_close(s: socket.socket) -> bytes:
    got = b""
    for _ in range(1000):  # bounded; each recv waits at most the socket's timeout
        data = s.recv(65536)
        if not data:
            break
        got += data
    return got


def body_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


@pytest.mark.timeout(240)
def test_slow_and_malformed_clients_are_cut_off_with_json_answers(tmp_path):
    port = free_port()
    proc = start(tmp_path, port)
    try:
        # 1. Headers one line every 0.3 s, for up to 30 s: a 408 and a close at about HEADER_S.
        lines = [b"POST /search HTTP/1.1\r\n"] + [b"X-Pad-%d: y\r\n" % i for i in range(100)]
        reply, took = trickle(port, lines, 0.3, 20)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert "headers" in body_of(reply)["detail"] and took < HEADER_S + 8

        # 2. A body at ~3 bytes/s after complete headers: a 408 at about BODY_S.
        head = (
            b"POST /search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 500\r\n\r\n"
        )
        reply, took = trickle(port, [head] + [b"t"] * 100, 0.3, 20)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert "body" in body_of(reply)["detail"] and BODY_S - 0.5 < took < BODY_S + 8

        # 3. Over the connection cap: the extra connection gets a JSON 503 at once, the others still work.
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONN)]
        try:
            extra = socket.create_connection(("127.0.0.1", port), timeout=10)
            reply = read_to_close(extra)
            extra.close()
            assert reply.startswith(b"HTTP/1.1 503") and "connections" in body_of(reply)["detail"]
        finally:
            for s in held:
                s.close()
        time.sleep(0.5)  # the server sees the closes

        # 4. A request uvicorn cannot parse: JSON, not plain text.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost x-no-colon\r\n\r\n")
            reply = read_to_close(s)
        assert reply.startswith(b"HTTP/1.1 400") and b"application/json" in reply
        assert body_of(reply)["detail"] == "malformed HTTP request"

        # 5. Keys, metrics of all of the above, a request id in the header and the JSON log.
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/metrics", timeout=10).status_code == 401
        r = httpx.get(base + "/metrics", headers={"X-API-Key": KEY}, timeout=10)
        rid = r.headers["x-request-id"]
        for reason in ("slow_headers", "slow_body", "connections", "malformed"):
            assert f'fashion_search_refused_requests_total{{reason="{reason}"}} 1.0' in r.text, reason
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e.get("request_id") == rid and e.get("path") == "/metrics" for e in entries), err[-2000:]
    assert KEY not in err
    # A body cut off mid-read is the client's failure, not a server error with a traceback.
    assert not [e for e in entries if e["level"] in ("error", "critical")], err[-3000:]
