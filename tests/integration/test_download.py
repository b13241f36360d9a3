"""The image downloader against a local HTTP server: retries, failures, atomic writes, resume, kill."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from fashion_search.data.download import REPORT_NAME, DownloadReport, download_images, read_url_lists
from fashion_search.data.images import load_image
from fashion_search.errors import FashionSearchError

SHARED = Path(os.environ.get("FASHION_SEARCH_SHARED") or Path(__file__).parents[2] / ".." / "shared")
URL_SAMPLES = SHARED / "data" / "fashion-iq" / "image_url"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def _image_bytes(fmt: str, size: int = 32) -> bytes:
    img = Image.effect_noise((size, size), 60).convert("RGB")  # noise: a JPEG big enough to cut in half
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


JPEG = _image_bytes("JPEG", 64)
PNG = _image_bytes("PNG")
BIG = _image_bytes("JPEG", 256)  # half of it is more than a file buffer, so it reaches the disk
HTML = b"<!DOCTYPE html><html><body>Sorry, this image is no longer available</body></html>"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that timed out hangs up: not news
        pass


class Site:
    """A tiny image host; `hits` counts requests per path; `stop` releases handlers that hang."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.user_agents: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.half_sent = threading.Event()
        self.hang = True
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes, ctype: str = "image/jpeg", length: int | None = None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self):
                path = self.path
                with site.lock:
                    site.hits[path] += 1
                    n = site.hits[path]
                    site.user_agents.add(self.headers.get("User-Agent", ""))
                if path == "/good.jpg":
                    self.send(200, JPEG)
                elif path == "/png-named.jpg":  # the extension must come from the bytes, not the URL
                    self.send(200, PNG, "image/png")
                elif path == "/redirect.jpg":
                    self.send_response(302)
                    self.send_header("Location", "/good.jpg?from=redirect")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path.startswith("/good.jpg?"):
                    self.send(200, JPEG)
                elif path == "/flaky.jpg":
                    self.send(500, b"oops", "text/plain") if n == 1 else self.send(200, JPEG)
                elif path == "/always500.jpg":
                    self.send(503, b"busy", "text/plain")
                elif path == "/slow.jpg":
                    site.stop.wait(1.5)  # past the client's timeout
                    self.send(200, JPEG)
                elif path == "/truncated.jpg":
                    self.send(200, JPEG[: len(JPEG) // 2])
                elif path == "/cut.jpg":  # announces the full length, then the connection drops
                    self.send(200, JPEG[: len(JPEG) // 2], length=len(JPEG))
                elif path == "/page.jpg":
                    self.send(200, HTML, "text/html; charset=utf-8")
                elif path == "/hang.jpg" and site.hang:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(BIG)))
                    self.end_headers()
                    self.wfile.write(BIG[: len(BIG) // 2])
                    self.wfile.flush()
                    site.half_sent.set()
                    site.stop.wait(20)
                elif path == "/hang.jpg":
                    self.send(200, BIG)
                elif path == "/trickle.jpg":  # a valid image, one byte every 0.1 s: no read times out
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(JPEG)))
                    self.end_headers()
                    for i in range(len(JPEG)):
                        self.wfile.write(JPEG[i : i + 1])
                        self.wfile.flush()
                        if site.stop.wait(0.1):
                            break
                else:
                    self.send(404, b"not found", "text/plain")

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def site(monkeypatch):
    for var in PROXY_VARS:  # a proxy from the environment must not intercept 127.0.0.1
        monkeypatch.delenv(var, raising=False)
    s = Site()
    yield s
    s.close()


FAST = {"workers": 4, "timeout": 0.5, "retries": 1, "backoff": 0.01, "progress": False}


def _final_files(out: Path) -> dict[str, str]:
    return {p.stem: p.suffix for p in out.iterdir() if not p.name.startswith(".") and p.name != REPORT_NAME}


def test_download_good_bad_retry_and_resume(site, tmp_path):
    pairs = [
        ("GOODJPG", site.url("/good.jpg")),
        ("GOODPNG", site.url("/png-named.jpg")),
        ("REDIRECT", site.url("/redirect.jpg")),
        ("FLAKY", site.url("/flaky.jpg")),
        ("DEAD404", site.url("/missing.jpg")),
        ("BUSY", site.url("/always500.jpg")),
        ("SLOW", site.url("/slow.jpg")),
        ("TRUNC", site.url("/truncated.jpg")),
        ("CUT", site.url("/cut.jpg")),
        ("HTML", site.url("/page.jpg")),
    ]
    out = tmp_path / "images"
    t0 = time.monotonic()
    report = download_images(pairs, out, **FAST)
    assert time.monotonic() - t0 < 10

    assert report.ok == 4 and report.skipped_existing == 0
    assert _final_files(out) == {"GOODJPG": ".jpg", "GOODPNG": ".png", "REDIRECT": ".jpg", "FLAKY": ".jpg"}
    for path in out.glob("*.*g"):
        load_image(path)
    assert not [p for p in out.iterdir() if ".part-" in p.name]

    reasons = {f["asin"]: f["reason"] for f in report.failed}
    assert set(reasons) == {"DEAD404", "BUSY", "SLOW", "TRUNC", "CUT", "HTML"}
    assert reasons["DEAD404"] == "HTTP 404"
    assert reasons["BUSY"].startswith("HTTP 503") and "2 tries" in reasons["BUSY"]
    assert "timed out" in reasons["SLOW"]
    assert reasons["TRUNC"] == "truncated image"
    assert "network error" in reasons["CUT"]
    assert reasons["HTML"] == "not an image (HTML page)"
    assert {f["url"] for f in report.failed} == {u for a, u in pairs if a in reasons}

    # 500 and timeouts/network errors are retried (retries=1 -> 2 attempts); 404 and bad bodies are not.
    assert site.hits["/flaky.jpg"] == 2
    assert site.hits["/always500.jpg"] == 2
    assert site.hits["/slow.jpg"] == 2
    assert site.hits["/cut.jpg"] == 2
    assert site.hits["/missing.jpg"] == 1
    assert site.hits["/truncated.jpg"] == 1
    assert site.hits["/page.jpg"] == 1
    assert all("fashion-search" in ua for ua in site.user_agents)

    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved == {"ok": 4, "skipped_existing": 0, "failed": report.failed}

    # Second run: the good ones are not fetched again; only the dead links are tried again.
    before = Counter(site.hits)
    good_paths = ("/good.jpg", "/png-named.jpg", "/redirect.jpg", "/flaky.jpg", "/good.jpg?from=redirect")
    again = download_images([p for p in pairs if p[0] != "SLOW"], out, **FAST)
    assert again.ok == 0 and again.skipped_existing == 4 and len(again.failed) == 5
    assert all(site.hits[p] == before[p] for p in good_paths)
    assert json.loads((out / REPORT_NAME).read_text())["skipped_existing"] == 4


def test_second_run_fetches_nothing(site, tmp_path):
    pairs = [("A1", site.url("/good.jpg")), ("A2", site.url("/png-named.jpg"))]
    out = tmp_path / "deep" / "images"  # created, parents included
    assert download_images(pairs, out, **FAST) == DownloadReport(ok=2, skipped_existing=0, failed=[])
    hits = sum(site.hits.values())
    assert download_images(pairs, out, **FAST) == DownloadReport(ok=0, skipped_existing=2, failed=[])
    assert sum(site.hits.values()) == hits


def test_corrupt_existing_and_stale_parts_are_replaced(site, tmp_path, capsys):
    out = tmp_path / "images"
    out.mkdir()
    (out / "EMPTY.jpg").write_bytes(b"")
    (out / "BROKEN.png").write_bytes(PNG[:40])
    (out / "KEEP.JPG").write_bytes(JPEG)  # valid, upper-case extension: kept and not fetched
    (out / ".EMPTY.part-k1ll3d").write_bytes(JPEG[:100])
    (out / ".download_report.json.part-x").write_text("{")
    pairs = [(a, site.url("/good.jpg")) for a in ("EMPTY", "BROKEN", "KEEP")]
    report = download_images(pairs, out, workers=2, timeout=2, retries=0, progress=True)
    assert report.ok == 2 and report.skipped_existing == 1 and report.failed == []
    assert site.hits["/good.jpg"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["BROKEN.jpg", "EMPTY.jpg", "KEEP.JPG", REPORT_NAME]
    assert "img" in capsys.readouterr().err  # the tqdm bar


def test_killed_run_leaves_no_partial_final_file(site, tmp_path):
    out = tmp_path / "images"
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    code = (
        "import sys; from pathlib import Path; from fashion_search.data.download import download_images; "
        "download_images([('HANG', sys.argv[1])], Path(sys.argv[2]), workers=1, timeout=30, retries=0, "
        "progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, site.url("/hang.jpg"), str(out)], env=env)
    try:
        assert site.half_sent.wait(20), "the download never started"
        deadline = time.monotonic() + 10
        written = 0
        while not written and time.monotonic() < deadline:  # until the client has written the first bytes
            parts = [p for p in out.iterdir() if p.name.startswith(".HANG.part-")]
            written = parts[0].stat().st_size if parts else 0
            time.sleep(0.02)
        assert written > 0, "the partial download never reached the disk"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    leftovers = sorted(p.name for p in out.iterdir())
    assert len(leftovers) == 1 and leftovers[0].startswith(".HANG.part-")  # only the dot-file, no HANG.jpg

    site.hang = False
    report = download_images([("HANG", site.url("/hang.jpg"))], out, **FAST)
    assert report.ok == 1
    assert sorted(p.name for p in out.iterdir()) == ["HANG.jpg", REPORT_NAME]


def test_cannot_run_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FashionSearchError, match="cannot write to output folder"):
        download_images([("A", "http://127.0.0.1:9/a.jpg")], blocker / "images", progress=False)
    with pytest.raises(FashionSearchError):
        download_images([], tmp_path / "out", workers=0, progress=False)


def test_invalid_asin_is_a_failure_not_a_path(site, tmp_path):
    out = tmp_path / "images"
    report = download_images([("../evil", site.url("/good.jpg"))], out, **FAST)
    assert report.ok == 0 and report.failed[0]["reason"].startswith("invalid ASIN")
    assert site.hits["/good.jpg"] == 0 and not (tmp_path / "evil.jpg").exists()


def test_read_url_lists_lenient(tmp_path):
    a = tmp_path / "asin2url.dress.txt"
    a.write_text(
        "\ufeff# comment\n\nB00014NGF6 \t http://x/a.jpg\nB0006HJ8FU\thttp://x/b.jpg  \n"
        "  245600258X    https://x/c.jpg\nB00014NGF6 \t http://x/other.jpg\n",
        encoding="utf-8",
    )
    b = tmp_path / "asin2url.shirt.txt"
    b.write_text("B0006HJ8FU \t http://x/dup.jpg\nSD00000123 \t http://x/d.jpg", encoding="utf-8")
    assert read_url_lists([a, b]) == [
        ("B00014NGF6", "http://x/a.jpg"),
        ("B0006HJ8FU", "http://x/b.jpg"),
        ("245600258X", "https://x/c.jpg"),
        ("SD00000123", "http://x/d.jpg"),
    ]


@pytest.mark.parametrize(
    "text",
    ["B00014NGF6\n", "B00014NGF6 \t ftp://x/a.jpg\n", "../x \t http://x/a.jpg\n", "A \t http://x/a b.jpg\n"],
)
def test_read_url_lists_malformed_names_file_and_line(tmp_path, text):
    path = tmp_path / "urls.txt"
    path.write_text("# header\n" + text)
    with pytest.raises(FashionSearchError, match=r"urls\.txt:2: expected"):
        read_url_lists([path])


def test_read_url_lists_unreadable(tmp_path):
    with pytest.raises(FashionSearchError, match="no URL lists"):
        read_url_lists([])
    with pytest.raises(FashionSearchError, match="not found"):
        read_url_lists([tmp_path / "nope.txt"])
    with pytest.raises(FashionSearchError, match="folder"):
        read_url_lists([tmp_path])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FashionSearchError, match="UTF-8"):
        read_url_lists([tmp_path / "bin.txt"])


@pytest.mark.skipif(
    not URL_SAMPLES.is_dir(), reason=f"shared Fashion-IQ URL samples not found at {URL_SAMPLES}"
)
def test_read_real_url_samples():
    files = sorted(URL_SAMPLES.glob("asin2url.*.sample.txt"))
    assert len(files) == 3
    for f in files:
        pairs = read_url_lists([f])
        assert len(pairs) == 200
        assert all(url.startswith("http") for _, url in pairs)
    assert len(read_url_lists(files)) <= 600


def test_the_cli_fails_when_every_download_failed(site, tmp_path, capsys):
    from fashion_search.cli import main

    urls = tmp_path / "asin2url.dress.txt"
    urls.write_text(f"A1\t{site.url('/missing.jpg')}\nA2\t{site.url('/page.jpg')}\n")
    out = tmp_path / "images"
    args = ["download-fashioniq", "--urls", str(urls), "--out", str(out), "--timeout", "2", "--quiet"]
    assert main(args) == 1
    assert "every download failed" in capsys.readouterr().err
    (out / "A3.jpg").write_bytes(JPEG)  # one present file: a partial result is not a failure
    urls.write_text(urls.read_text() + f"A3\t{site.url('/missing.jpg')}\n")
    assert main(args) == 0


def test_a_body_trickled_byte_by_byte_is_cut_off_at_the_per_file_deadline(site, tmp_path):
    """Each read arrives well within the timeout; only a deadline on the whole file ends it."""
    assert len(JPEG) > 60  # at 10 bytes/s, over 6 s: far past the deadline below
    options = {**FAST, "timeout": 2.0, "retries": 0}
    report = download_images(
        [("TRICKLE", site.url("/trickle.jpg"))], tmp_path / "o", file_deadline=1.0, **options
    )
    assert [f["asin"] for f in report.failed] == ["TRICKLE"]
    from fashion_search.cli import build_parser

    args = build_parser().parse_args(
        ["download-fashioniq", "--urls", "u", "--out", "o", "--file-deadline", "5"]
    )
    assert args.file_deadline == 5.0
    assert "not complete within 1 s" in report.failed[0]["reason"]
    assert _final_files(tmp_path / "o") == {}
