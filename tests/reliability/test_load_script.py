"""benchmarks/load_api.py runs end to end on tiny inputs and writes the JSON its report is made of."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: each pays the ~5 s torch import

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_api.py"
VALID = ("composed", "text", "image", "filtered")


@pytest.mark.timeout(180)
def test_load_script_runs_and_writes_json(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(SCRIPT), "--clients", "3", "--requests", "12", "--items", "12"]
    cmd += ["--malformed", "0.3", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result == json.loads(done.stdout)
    assert result["requests"] == 36 and result["server"]["items"] == 12
    assert result["errors"] == {"valid_not_200": 0, "malformed_not_4xx": 0, "transport": 0, "detail": {}}
    assert result["throughput_rps"] > 0 and result["latency"]["valid"]["p99_ms"] > 0
    assert any(kind in result["statuses"] for kind in ("composed", "text", "image"))
    assert result["filtered_requests"] and result["server"]["products"] == 4
    assert result["statuses"]["filtered"] == {"200": result["latency"]["filtered"]["n"]}
    malformed = {name for name in result["statuses"] if name not in VALID}
    assert malformed and all(
        400 <= int(code) < 500 for name in malformed for code in result["statuses"][name]
    )


@pytest.mark.timeout(180)
def test_load_script_runs_for_a_duration_and_samples_the_server_rss(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(SCRIPT), "--clients", "2", "--duration", "2", "--warmup", "0.5"]
    cmd += ["--rss-interval", "0.5", "--items", "12", "--malformed", "0.3", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert 2.0 <= result["wall_s"] < 30 and result["requests"] > 0 and result["warmup"]["requests"] > 0
    assert result["errors"]["valid_not_200"] == result["errors"]["transport"] == 0
    assert result["warmup"]["errors"]["transport"] == 0
    assert result["statuses"].get("filtered", {}).keys() <= {"200"}
    rss = result["server_rss"]
    assert rss["samples"] >= 3 and 0 < rss["start_mb"] <= rss["max_mb"]
    assert rss["end_mb"] <= rss["max_mb"] and rss["slope_mb_per_min"] is not None
    assert set(result["loadavg_1min"]) == {"start", "end"}
