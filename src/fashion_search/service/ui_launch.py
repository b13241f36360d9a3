"""Launch the Streamlit page (`fashion-search ui`) as a child process, and wait for it to answer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from fashion_search.errors import FashionSearchError
from fashion_search.index.store import read_manifest

UI_SCRIPT = Path(__file__).with_name("ui.py")


def check_port_free(host: str, port: int) -> None:
    """Refuse, in one line, a host:port that cannot be listened on (in use, not this machine's address),
    before the index and the model are loaded for nothing. Binds as uvicorn and Streamlit do
    (SO_REUSEADDR), then lets go."""
    try:
        # host "" is every interface to uvicorn and Streamlit; to getaddrinfo that is None.
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise FashionSearchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def ui_command(
    index_dir: str | os.PathLike,
    host: str,
    port: int,
    device: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
) -> list[str]:
    """The `streamlit run` command line for the page; everything after `--` goes to ui.py."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT)]
    cmd += ["--server.address", host, "--server.port", str(port), "--server.headless", "true"]
    cmd += ["--browser.gatherUsageStats", "false"]
    # A served page is not a dev loop: no file watcher (inotify handles, CPU) and no reload on save.
    cmd += ["--server.fileWatcherType", "none", "--server.runOnSave", "false"]
    cmd += ["--server.maxUploadSize", "10"]  # MB, the same limit as the HTTP API
    cmd += ["--client.toolbarMode", "viewer"]  # shoppers need no "Deploy" or "Clear cache"
    cmd += ["--", "--index", str(Path(index_dir).resolve())]
    for flag, value in (("--device", device), ("--runtime", runtime), ("--precision", precision)):
        if value:
            cmd += [flag, value]
    return cmd


def launch_ui(
    index_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8501,
    device: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
    **popen_kwargs,
) -> subprocess.Popen:
    """Start the web UI in the background; the caller owns the process (wait, terminate)."""
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    cmd = ui_command(index_dir, host, port, device, runtime, precision)
    return subprocess.Popen(cmd, env=env, **popen_kwargs)


def wait_until_up(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll Streamlit's health endpoint until it answers (True), the process dies or time runs out."""
    health = url.rstrip("/") + "/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(health, timeout=2) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def serve(
    index_dir: str,
    host: str = "127.0.0.1",
    port: int = 8501,
    device: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
) -> int:
    """`fashion-search ui`: check the index, run Streamlit until Ctrl-C, and return its exit code."""
    read_manifest(Path(index_dir))  # a missing or damaged index fails here with exit 2, not in the page
    proc = launch_ui(index_dir, host, port, device, runtime, precision)
    url = f"http://{host}:{port}"
    print(f"fashion-search UI starting on {url} (Ctrl-C to stop)", flush=True)

    def forward(signum, _frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    # SIGTERM from a supervisor must reach Streamlit too, or it would outlive us as an orphan.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    try:
        if wait_until_up(url, timeout=120, proc=proc):
            print(f"fashion-search UI ready: {url}", flush=True)
        return _exit_code(proc.wait())
    except KeyboardInterrupt:
        # The terminal sends SIGINT to the whole group; send it again in case we were signalled alone.
        forward(signal.SIGINT, None)
        try:
            return _exit_code(proc.wait(timeout=10))
        except subprocess.TimeoutExpired:
            proc.kill()
            return _exit_code(proc.wait())
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _exit_code(returncode: int) -> int:
    """Popen reports death by signal N as -N; a shell reports it as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
