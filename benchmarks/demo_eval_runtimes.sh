#!/usr/bin/env bash
# Composed R@K of a demo model per runtime and precision (docs/BENCHMARKS.md, "Exported CPU runtimes"):
# PyTorch fp32, ONNX Runtime fp32 / int8 / int8 calibrated, OpenVINO fp32 / int8 weights / int8
# calibrated, each `fashion-search eval` on the demo's val split; one JSON document on stdout.
# Accuracy only: the timings are bench_runtimes.py's.
#
#   bash benchmarks/demo_eval_runtimes.sh [DEMO_DIR] > demo_eval_runtimes.json   # DEMO_DIR: demo/ by default
# Needs the onnx and openvino extras (RUNTIMES="onnx" leaves OpenVINO out). The exports are cached beside
# the checkpoint (plain ones) and in a temporary folder (calibrated ones, made from DEMO_DIR/catalog).
set -euo pipefail

DEMO=${1:-demo}
FS=${FS:-fashion-search}
PY=${PY:-python3}
RUNTIMES=${RUNTIMES:-onnx openvino}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

evaluate() {  # NAME, then eval's runtime flags
    local name=$1
    shift
    echo "== $name" >&2
    $FS eval --data "$DEMO/data" --checkpoint "$DEMO/run" --workers 0 --quiet --json "$WORK/$name.json" "$@" >&2
    echo "fashion-search eval --data DEMO/data --checkpoint DEMO/run --workers 0 $*" > "$WORK/$name.command"
}

evaluate torch-fp32 --runtime torch
for runtime in $RUNTIMES; do
    evaluate "$runtime-fp32" --runtime "$runtime" --precision fp32
    evaluate "$runtime-int8" --runtime "$runtime" --precision int8
    $FS export --checkpoint "$DEMO/run" --format "$runtime" --int8 --calibration "$DEMO/catalog" \
        --out "$WORK/$runtime-calibrated" >&2
    evaluate "$runtime-int8-calibrated" --runtime "$runtime" --precision int8 --export-dir "$WORK/$runtime-calibrated"
done

$PY - "$WORK" "$DEMO" <<'EOF'
import json, os, platform, sys, time
from pathlib import Path

work, demo = Path(sys.argv[1]), sys.argv[2]
results = {}
for name in ("torch-fp32", "onnx-fp32", "onnx-int8", "onnx-int8-calibrated", "openvino-fp32",
             "openvino-int8", "openvino-int8-calibrated"):
    if not (work / f"{name}.json").exists():  # a runtime left out of RUNTIMES
        continue
    doc = json.loads((work / f"{name}.json").read_text())
    results[name] = {
        "command": (work / f"{name}.command").read_text().strip().replace("DEMO", demo),
        "model": doc.get("model"),
        "modes": {"composed": doc["modes"]["composed"]["average"]},
    }
print(json.dumps({
    "what": "composed R@K of a demo model on its val split, per runtime and precision",
    "demo": os.path.abspath(demo),
    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
    "date": time.strftime("%Y-%m-%d"),
    "results": results,
}, indent=1))
EOF
