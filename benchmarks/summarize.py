"""One line per goal (and the decode diagnosis's main figures) from a folder of benchmark JSON documents.

python benchmarks/summarize.py benchmarks/results/2026-11-27-gpu-h200
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def lines(doc: dict, name: str) -> list[str]:
    out = []
    for goal in doc.get("goals", []):
        out.append(
            f"{name}: {goal.get('name')}: {goal.get('measured')} {goal.get('unit', '')} "
            f"(ceiling {goal.get('ceiling')}, ratio {goal.get('ratio')}, goal {goal.get('goal')}, met {goal.get('met')})"
        )
    res = doc.get("results", {})
    if doc.get("benchmark") == "diagnose_decode":
        dev = res.get("device_decode", {})
        out.append(
            f"{name}: nvjpeg {res.get('nvjpeg')}, device decode+geometry {dev.get('images_per_s')} img/s "
            f"(host cpu {dev.get('decode_and_geometry', {}).get('host_cpu_ms_p50')} ms per batch of {dev.get('batch')}), "
            f"forward {res.get('forward', {}).get('images_per_s')} img/s, cpu {res.get('cpu')}"
        )
        out.append(f"{name}: agreement {res.get('agreement')}, progressive {res.get('progressive')}")
        out.append(f"{name}: indexer's reader vs batch-at-a-time decode {res.get('pipeline')}")
    if doc.get("benchmark") == "diagnose_index_startup":
        out.append(
            f"{name}: {res.get('steps_s')} ({res.get('catalog_files')} files, "
            f"transformers imported: {res.get('transformers_imported')})"
        )
        out.append(f"{name}: slowest imports {res.get('slowest_imports_cumulative_s', [])[:6]}")
    if "engine_composed" in res:
        out.append(
            f"{name}: ceiling {res.get('ceiling', {}).get('p50_ms')} ms, decode {res.get('query_decode_preprocess_ms', {}).get('p50')} ms, "
            f"engine stages {res['engine_composed'].get('stages_ms')}, "
            f"server stages {res.get('http', {}).get('server_stages_ms')}"
        )
    if doc.get("benchmark") == "diagnose_http":
        cases = {
            key: (case["round_trip_ms"]["p50"], case.get("overhead_ms"))
            for key, case in res.get("cases", {}).items()
        }
        out.append(f"{name}: round trip p50 / overhead ms {cases}")
    if doc.get("benchmark") == "diagnose_compile":
        out.append(f"{name}: mode {res.get('mode')} on {res.get('device')}: {res.get('forwards')}")
    if "index_run" in res:
        run = res["index_run"]
        out.append(
            f"{name}: {run.get('images_indexed')} images in {run.get('wall_s')} s = {run.get('images_per_s')} img/s, "
            f"phases {run.get('phases')}, build stages {run.get('build_stages')}, "
            f"first batch {run.get('first_batch_marks')}, decode {res.get('decode_preprocess')}"
        )
    return out


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{path.name}: unreadable ({exc})")
            continue
        for line in lines(doc, path.stem):
            print(line)


if __name__ == "__main__":
    main()
