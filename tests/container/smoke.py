"""Container smoke test (`make test-container`): build the image, serve a tiny index, probe it.

Runs with the host's python3 standard library only (no project venv). Steps: podman and its settings
(deploy/podman.sh), a Debian base image (deploy/base-image.sh), the image (deploy/build-local.sh);
then, in containers of that image, a synthetic catalog and an fs-micro index with random weights;
then the API container with its default command, checked through 127.0.0.1 only: GET /health,
POST /search, an item's image, `podman healthcheck run`, and that its process is not root.

Skips (exit 0, reason printed) only where no container engine can start. Always removes its
containers and files and puts IP forwarding and the iptables rules back as they were. Every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PODMAN = [str(REPO / "deploy" / "podman.sh")]
IMAGE = os.environ.get("FS_CONTAINER_IMAGE", "localhost/fashion-search:test")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
BUILD_TIMEOUT = float(os.environ.get("FS_CONTAINER_BUILD_TIMEOUT", 1800))
START_TIMEOUT = 180.0


class Skip(Exception):
    pass


def log(msg: str) -> None:
    print(f"[container-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(
    cmd: list[str], timeout: float, check: bool = True, quiet: bool = False
) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from exc
    if check and done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        raise AssertionError(f"exit {done.returncode}: {' '.join(cmd)}\n{tail}")
    if not quiet and done.stderr.strip() and done.returncode != 0:
        log(done.stderr.strip().splitlines()[-1])
    return done


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return sh([*PODMAN, *args], timeout, check)


# -- the host's network state that running a container changes --------------------------------------
def firewall_state() -> dict:
    state = {"ip_forward": IP_FORWARD.read_text().strip() if IP_FORWARD.exists() else None}
    for tool in ("iptables", "ip6tables"):
        save = shutil.which(f"{tool}-save")
        state[tool] = sh([save], 30, check=False).stdout if save else None
    return state


def _rules(dump: str | None) -> set[str]:
    """Rules and non-default chains of an iptables-save dump, without comments and counters."""
    keep, table = set(), ""
    for line in (dump or "").splitlines():
        if line.startswith("*"):
            table = line
        elif line.startswith("-") or (line.startswith(":") and not line.endswith("ACCEPT [0:0]")):
            keep.add(f"{table} {line.split(' [')[0] if line.startswith(':') else line}")
    return keep


def restore_firewall(before: dict) -> None:
    running = podman("ps", "-q", timeout=60, check=False).stdout.split()
    if running:  # someone else's containers still need the forwarding and their chains
        log(f"{len(running)} other container(s) running: IP forwarding and iptables left as they are")
        return
    after = firewall_state()
    for tool in ("iptables", "ip6tables"):
        if before[tool] is None or _rules(after[tool]) == _rules(before[tool]):
            continue
        tables_before = {line[1:] for line in before[tool].splitlines() if line.startswith("*")}
        for line in after[tool].splitlines():
            if line.startswith("*") and line[1:] not in tables_before:  # a table that was empty
                sh([tool, "-t", line[1:], "-F"], 30, check=False)
                sh([tool, "-t", line[1:], "-X"], 30, check=False)
        if before[tool].strip():
            subprocess.run([f"{tool}-restore"], input=before[tool], text=True, timeout=30, check=False)
        log(f"{tool} rules restored")
    if before["ip_forward"] is not None and after["ip_forward"] != before["ip_forward"]:
        IP_FORWARD.write_text(before["ip_forward"] + "\n")
        log(f"ip_forward restored to {before['ip_forward']}")


# -- HTTP through 127.0.0.1 only -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    assert url.startswith("http://127.0.0.1:"), url
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return reply.status, reply.headers.get("content-type", ""), reply.read()


def multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_healthy(base: str, name: str) -> dict:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        state = podman(
            "inspect", "--format", "{{.State.Status}}", name, timeout=30, check=False
        ).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise AssertionError(f"the API container stopped ({state}):\n{logs(name)}")
        try:
            status, _, body = http(f"{base}/health", timeout=5)
            if status == 200:
                return json.loads(body)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"/health did not answer within {START_TIMEOUT:.0f} s:\n{logs(name)}")


def logs(name: str) -> str:
    out = podman("logs", "--tail", "40", name, timeout=30, check=False)
    return (out.stdout + out.stderr).strip()


# -- the test ---------------------------------------------------------------------------------------
def engine_ready() -> str:
    setup = sh([*PODMAN, "setup"], 900, check=False)
    if setup.returncode == 77:
        raise Skip(setup.stderr.strip().splitlines()[-1])
    if setup.returncode != 0:
        raise AssertionError(f"deploy/podman.sh setup failed:\n{setup.stderr[-2000:]}")
    t0 = time.monotonic()
    base = sh([str(REPO / "deploy" / "base-image.sh")], 900).stdout.strip()
    log(f"base image {base} ({time.monotonic() - t0:.0f} s)")
    probe = podman("run", "--rm", "--network", "none", base, "true", timeout=120, check=False)
    if probe.returncode != 0:
        raise Skip(f"podman cannot start a container here: {(probe.stderr or probe.stdout).strip()[-300:]}")
    return base


def run_test(work: Path) -> None:
    t0 = time.monotonic()
    log("building the image (deploy/build-local.sh)")
    sh([str(REPO / "deploy" / "build-local.sh"), IMAGE], BUILD_TIMEOUT)
    size = podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
    log(f"image {IMAGE}: {int(size) / 1e9:.2f} GB, built in {time.monotonic() - t0:.0f} s")
    meta = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    health = meta.get("Healthcheck") or {}
    assert "fashion-search-healthcheck" in " ".join(health.get("Test", [])), f"no HEALTHCHECK: {health}"
    assert meta["Config"].get("User") not in (None, "", "root", "0"), "the image runs as root"

    # The non-root user of the image writes the catalog and the index; world-writable scratch.
    synth, index = work / "synth", work / "index"
    for d in (synth, index):
        d.mkdir()
        d.chmod(0o777)
    offline = ["run", "--rm", "--network", "none", "--no-healthcheck"]
    podman(
        *offline,
        "-v",
        f"{synth}:/synth",
        IMAGE,
        "synth",
        "/synth",
        "--images-per-category",
        "50",
        "--quiet",
        timeout=300,
    )
    catalog = synth / "images"
    n_images = sum(1 for p in catalog.rglob("*") if p.is_file())
    podman(
        *offline,
        "-v",
        f"{catalog}:/catalog:ro",
        "-v",
        f"{index}:/index",
        IMAGE,
        "index",
        "/catalog",
        "--out",
        "/index",
        "--model",
        "fs-micro",
        "--pretrained",
        "none",
        "--workers",
        "0",
        "--quiet",
        timeout=600,
    )
    log(f"fs-micro index over {n_images} synthetic images")

    name = f"fs-smoke-{os.getpid()}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        # Without systemd podman cannot schedule the health check: the test runs it (no timer).
        podman(
            "run",
            "-d",
            "--name",
            name,
            "-p",
            f"127.0.0.1:{port}:8000",
            "--health-interval",
            "disable",
            "-v",
            f"{catalog}:/catalog:ro",
            "-v",
            f"{index}:/index:ro",
            IMAGE,
            timeout=120,
        )
        body = wait_healthy(base, name)
        assert body == {"status": "ok", "items": n_images}, body
        log(f"GET /health: {body}")

        data, ctype = multipart({"text": "a red dress with long sleeves", "k": "3"})
        status, _, raw = http(f"{base}/search", data, {"Content-Type": ctype})
        results = json.loads(raw)["results"]
        assert status == 200 and 1 <= len(results) <= 3, raw[:300]
        assert all({"id", "score", "image_url"} <= set(r) for r in results), results
        assert all(r["score"] >= s["score"] for r, s in zip(results, results[1:])), results
        log(f"POST /search: {[(r['id'], round(r['score'], 3)) for r in results]}")
        status, ctype, raw = http(f"{base}{results[0]['image_url']}")
        assert status == 200 and ctype.startswith("image/") and raw, (status, ctype)

        check = podman("healthcheck", "run", name, timeout=60, check=False)
        assert check.returncode == 0, f"podman healthcheck run: {check.stdout}{check.stderr}"
        log("podman healthcheck run: healthy")

        uid = podman(
            "exec", name, "sh", "-c", "awk '/^Uid:/ {print $2}' /proc/1/status", timeout=60
        ).stdout.strip()
        assert uid.isdigit() and int(uid) != 0, f"the server runs as uid {uid!r}"
        log(f"the server runs as uid {uid}")
    finally:
        podman("rm", "-f", "-v", "-t", "5", name, timeout=120, check=False)


def main() -> int:
    started = time.monotonic()
    try:
        engine_ready()
    except Skip as why:
        print(f"SKIP container test: {why}")
        return 0
    before = firewall_state()
    work = Path(tempfile.mkdtemp(prefix="fashion-search-container-", dir="/var/tmp"))
    try:
        run_test(work)
    except AssertionError as exc:
        print(f"FAIL container test: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        restore_firewall(before)
    log(f"PASS in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
