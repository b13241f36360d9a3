"""Fetch the Fashion-IQ product images from ASIN-to-URL lists: polite, retrying, atomic and resumable."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from tqdm import tqdm

from fashion_search.atomic import create_temp
from fashion_search.data.images import IMAGE_EXTENSIONS, load_image
from fashion_search.errors import FashionSearchError, ImageDecodeError


def user_agent() -> str:
    """Names this tool and its version to the servers it asks (installed package metadata)."""
    version = metadata.version("fashion-search")
    return f"fashion-search/{version} (Fashion-IQ image downloader; python-httpx/{httpx.__version__})"


REPORT_NAME = "download_report.json"
# An ASIN becomes a file name: refuse anything that could leave the folder or hide as a dot-file.
_ASIN_RE = re.compile(r"[A-Za-z0-9_-]+")
_PART_MARK = ".part-"
# Pillow format -> the extension the Fashion-IQ reader looks for.
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
# Refuse absurd bodies (a product photo is ~50 KB) rather than filling the disk.
MAX_BYTES = 50 * 1024 * 1024
# 408 (request timeout) and 429 (too many requests) say "try later"; other 4xx will not change on retry.
_RETRY_4XX = frozenset({408, 429})


@dataclass
class DownloadReport:
    """What a run did; `failed` holds {"asin", "url", "reason"} for each image that could not be fetched."""

    ok: int = 0
    skipped_existing: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_url_lists(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(ASIN, URL) pairs from `ASIN \\t URL` lines; blanks and `#` comments skipped, first URL per ASIN kept."""
    if not paths:
        raise FashionSearchError("no URL lists given (expected files like asin2url.dress.txt)")
    pairs: dict[str, str] = {}
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise FashionSearchError(f"URL list not found: {path}") from None
        except IsADirectoryError:
            raise FashionSearchError(f"URL list is a folder, not a file: {path}") from None
        except UnicodeDecodeError:
            raise FashionSearchError(f"{path}: not a UTF-8 text file") from None
        except OSError as exc:
            raise FashionSearchError(f"cannot read URL list {path}: {exc.strerror or exc}") from None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            # The official lists use "ASIN \t URL"; accept any run of whitespace between the two.
            parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
            asin, url = (p.strip() for p in parts) if len(parts) == 2 else (parts[0], "")
            if (
                not _ASIN_RE.fullmatch(asin)
                or not url.lower().startswith(("http://", "https://"))
                or " " in url
            ):
                shown = line if len(line) <= 80 else line[:77] + "..."
                raise FashionSearchError(
                    f"{path}:{lineno}: expected 'ASIN <tab> http(s)://URL', got {shown!r}"
                )
            pairs.setdefault(asin, url)
    return list(pairs.items())


def download_images(
    pairs: Iterable[tuple[str, str]],
    out_dir: Path,
    workers: int = 8,
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    progress: bool = True,
    client: httpx.Client | None = None,
    file_deadline: float = 120.0,
) -> DownloadReport:
    """Download each (ASIN, URL) to `out_dir/{ASIN}.{ext}`, skipping ASINs that already have a valid image.

    `timeout` bounds each network operation of a request and `file_deadline` a whole attempt at one
    file (a host trickling a body a byte at a time never trips the former); 5xx, 408/429 and network errors are tried
    again up to `retries` more times, waiting `backoff * 2**n` seconds; other 4xx fail at once. Files
    are written under a temporary dot-name, checked to decode, then renamed, so a killed run never
    leaves a partial image under a final name. The report is also written to `out_dir/download_report.json`.
    Raises FashionSearchError only when the run cannot happen at all (bad arguments, unwritable folder).
    """
    if workers < 1 or retries < 0 or timeout <= 0 or backoff < 0 or file_deadline <= 0:
        raise FashionSearchError("workers and timeout must be positive, retries and backoff not negative")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    existing = _existing_images(out_dir)
    unique: dict[str, str] = {}
    for asin, url in pairs:
        unique.setdefault(asin, url)  # one task per ASIN: two threads must never write the same file
    todo = list(unique.items())
    own_client = client is None
    if client is None:
        client = httpx.Client(
            headers={"User-Agent": user_agent()},
            follow_redirects=True,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
        )
    fetcher = _Fetcher(client, out_dir, timeout, retries, backoff)
    fetcher.file_deadline = file_deadline
    results: dict[int, tuple[str, str]] = {}
    report = DownloadReport()
    bar = tqdm(total=len(todo), unit="img", desc="images", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fiq-download")
    try:
        futures = {
            pool.submit(fetcher.run, asin, url, existing.get(asin, [])): n
            for n, (asin, url) in enumerate(todo)
        }
        n_failed = 0
        for future in as_completed(futures):
            results[futures[future]] = status = future.result()
            bar.update(1)
            if status[0] == "failed":
                n_failed += 1
                bar.set_postfix(failed=n_failed, refresh=False)
    finally:
        # On Ctrl-C: drop queued downloads, let running ones finish (bounded by the timeout), still report.
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if own_client:
            client.close()
        for n in sorted(results):
            status, reason = results[n]
            if status == "ok":
                report.ok += 1
            elif status == "skipped":
                report.skipped_existing += 1
            else:
                asin, url = todo[n]
                report.failed.append({"asin": asin, "url": url, "reason": reason})
        _write_report(out_dir / REPORT_NAME, report)
    return report


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Fail now, not 77k times later, when the folder is read-only.
        fd, probe = tempfile.mkstemp(prefix=".write-test" + _PART_MARK, dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FashionSearchError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
    # Leftovers of a killed run: temporary files are dot-files, never under a final name.
    for entry in os.scandir(out_dir):
        if entry.name.startswith(".") and _PART_MARK in entry.name:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _existing_images(out_dir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for entry in os.scandir(out_dir):
        stem, ext = os.path.splitext(entry.name)
        if not entry.name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS:
            found.setdefault(stem, []).append(Path(entry.path))
    return found


def _write_report(path: Path, report: DownloadReport) -> None:
    fd, tmp = create_temp(path.parent, prefix=f".{path.name}{_PART_MARK}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FashionSearchError(f"cannot write {path}: {exc.strerror or exc}") from None


class _Retry(Exception):
    """A failure worth another attempt (5xx, network error, timeout)."""


class _Fail(Exception):
    """A failure that another attempt will not fix (404, not an image)."""


class _Fetcher:
    """Fetches one ASIN per call; shared by the worker threads (httpx.Client is thread-safe)."""

    file_deadline = 120.0  # seconds for one attempt at one file, headers to last byte

    def __init__(self, client: httpx.Client, out_dir: Path, timeout: float, retries: int, backoff: float):
        self.client, self.out_dir = client, out_dir
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    def run(self, asin: str, url: str, existing: list[Path]) -> tuple[str, str]:
        """("ok" | "skipped" | "failed", reason)."""
        if not _ASIN_RE.fullmatch(asin):
            return "failed", "invalid ASIN (letters, digits, '_' and '-' only)"
        for path in existing:
            try:
                _verify(path)
                return "skipped", ""
            except ImageDecodeError:
                # A corrupt or empty file would pass for a present image in the reader: replace it.
                with contextlib.suppress(OSError):
                    path.unlink()
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._rng_lock:
                    jitter = self._rng.uniform(0.0, 0.25)
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1.0 + jitter))
            try:
                self._fetch(asin, url)
                return "ok", ""
            except _Retry as exc:
                reason = str(exc)
            except _Fail as exc:
                return "failed", str(exc)
        tries = "1 try" if self.retries == 0 else f"{self.retries + 1} tries"
        return "failed", f"{reason} (after {tries})"

    def _fetch(self, asin: str, url: str) -> None:
        fd, tmp_name = create_temp(self.out_dir, prefix=f".{asin}{_PART_MARK}")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                content_type = self._stream_to(url, f)
                f.flush()
                os.fsync(f.fileno())  # the rename must not publish a file whose bytes are not on disk
            try:
                _verify(tmp)
            except ImageDecodeError as exc:
                raise _Fail(_decode_reason(tmp, content_type, str(exc))) from None
            with Image.open(tmp) as img:
                fmt = img.format or ""
            ext = _FORMAT_EXT.get(fmt)
            if ext is None:
                raise _Fail(f"unsupported image format {fmt or 'unknown'}")
            os.replace(tmp, self.out_dir / f"{asin}.{ext}")
        except OSError as exc:
            raise _Fail(f"cannot write file: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _stream_to(self, url: str, f: Any) -> str:
        give_up = time.monotonic() + self.file_deadline
        try:
            with self.client.stream("GET", url, timeout=self.timeout) as response:
                status = response.status_code
                if status >= 500 or status in _RETRY_4XX:
                    raise _Retry(f"HTTP {status}")
                if status >= 300:  # redirects are followed; what is left is an error or a dead link
                    raise _Fail(f"HTTP {status}")
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_BYTES:
                        raise _Fail(f"response larger than {MAX_BYTES // (1024 * 1024)} MB")
                    if time.monotonic() > give_up:
                        raise _Retry(f"response not complete within {self.file_deadline:g} s")
                    f.write(chunk)
                return response.headers.get("content-type", "")
        except httpx.TimeoutException:
            raise _Retry(f"timed out after {self.timeout:g} s") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Retry(f"network error ({type(exc).__name__}: {exc})") from None
        except httpx.HTTPError as exc:  # invalid URL, unsupported scheme, too many redirects...
            raise _Fail(f"request failed ({type(exc).__name__}: {exc})") from None


def _verify(path: Path) -> None:
    # A reduced-scale decode still reads every byte of the stream: truncation is caught, at a fraction of the cost.
    load_image(path, draft_size=(64, 64))


def _decode_reason(path: Path, content_type: str, error: str) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty response"
    text = head.lstrip().lower()
    if "html" in content_type.lower() or text.startswith((b"<!doctype", b"<html", b"<")):
        return "not an image (HTML page)"
    if content_type.lower().startswith("text/"):
        return f"not an image ({content_type.split(';')[0]})"
    if "truncated" in error:
        return "truncated image"
    return f"not an image ({error})"
