#!/usr/bin/env bash
# The GPU rows of docs/BENCHMARKS.md in one go: decode diagnosis, indexing (JPEGs decoded on the GPU, then
# on the CPU), query latency and training throughput on CUDA.
# ~8 minutes on one H200 (see benchmarks/README.md); each step writes one JSON document into $OUT (default
# benchmarks/results/DATE-gpu-MODEL, e.g. 2026-11-27-gpu-h200) and a failing step does not stop the next.
#
# On a machine with this project installed:   OUT=somewhere bash benchmarks/gpu_suite.sh
# On this workplace's device machine (its python3 has torch but not open_clip, faiss or fastapi), carry
# the wheels that benchmarks/README.md ("GPU rows") says how to download, and run:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD/src && OUT=/tmp/res timeout 540 bash benchmarks/gpu_suite.sh;
#   tar czf $OUT/gpu_results.tgz -C /tmp res
# SCALE=small runs the same steps tiny (a check of the script itself, on any machine; DEVICE=cpu).
# SKIP_CPU_DECODE=1, SKIP_LARGE=1, SKIP_COMPILE=1, SKIP_TRAIN=1, SKIP_HTTP=1, SKIP_RAY=1, SKIP_RUNTIMES=1 leave
# those steps out (a short rerun). The Ray step (index --ray local: one GPU actor per GPU against the
# single-process path) runs only where Ray Data is installed (pip install 'fashion-search[ray]').
set -uo pipefail

PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
# Results go by date and hardware: the GPU's model name, lower-case, without the vendor ("NVIDIA H200" -> h200).
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | sed -e 's/^NVIDIA //' \
    | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
OUT=${OUT:-benchmarks/results/$(date +%F)-gpu-${GPU_NAME:-$DEVICE}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "${SCALE:-full}" = small ]; then
    DECODE=(--model fs-micro --n 16 --repeat 2 --cpu-sample 4 --min-px 48 --max-px 96)
    INDEX=(--model fs-micro --batch-size 8 --workers 2 --ceiling-batches 2 --ceiling-every 0.5)
    IMAGES=(--n 16 --copies 2 --min-px 48 --max-px 96)
    ON_DEVICE=auto  # no GPU: auto decodes on the CPU
    LARGE_COPIES=4
    QUERY=(--model fs-micro --items 500 --queries 3 --reweight-queries 12 --ceiling-repeat 3 --search-repeat 10
           --min-px 48 --max-px 96)
    TRAIN=(--model fs-micro --batch-size 8 --steps 2 --warmup 1 --synth 60 --synth-size 48 --workers 1)
    COMPILE=(--model fs-micro --repeat 2 --backend eager)
    HTTP=(--items 300 --requests 3 --gaps 0,0.01 --min-px 48 --max-px 96)
    RAY=(--model fs-micro --n 16 --batch-size 4 --min-px 48 --max-px 96 --ray-cpus 2)
    RUNTIMES=(--model fs-micro --n 16 --repeat 2 --query-repeat 3 --min-px 48 --max-px 96)
else
    DECODE=(--n 256 --repeat 5)
    # 2,000 distinct JPEGs of 400-1000 px, each file linked 25 times: 50,000 files to decode, so that the
    # run lasts long enough (~20 s at 3,000 images/s) to outweigh start-up; 12 decode workers of 16 cores.
    INDEX=(--batch-size 256 --workers 12 --ceiling-batches 10 --ceiling-every 5)
    IMAGES=(--n 2000 --copies 25)
    ON_DEVICE=gpu
    LARGE_COPIES=100  # 200,000 files
    QUERY=(--items 100000 --queries 30)
    TRAIN=(--batch-size 256 --steps 10 --warmup 3 --synth 800 --workers 8)
    COMPILE=(--repeat 30)
    HTTP=(--items 10000 --requests 40)
    RAY=(--model ViT-B-32 --n 4000 --batch-size 256)
    RUNTIMES=(--n 2000)
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true; } > "$OUT/gpu.txt"
status=0
step() {  # name, then the command; its stderr goes to $OUT/name.log
    local name=$1
    shift
    echo "== $name: $*" >&2
    if ! "$@" --device "$DEVICE" --out "$OUT/$name.json" > /dev/null 2> "$OUT/$name.log"; then
        echo "   $name FAILED (see $OUT/$name.log)" >&2
        tail -5 "$OUT/$name.log" >&2
        status=1
    fi
}
# Most telling first (a lent GPU's time is short): the GPU decode path over 50,000 files, the start-up
# split, query latency and what HTTP adds to it (fs-micro: ~1 min), the GPU decode path over 200,000 files (start-up weighs a quarter as much; the
# longest step, its index HNSW), whether CUDA graphs (torch.compile's reduce-overhead mode) make the
# launch-bound batch-1 query towers fast, training, and last the CPU decode path over the 50,000 files.
step decode "$PY" benchmarks/diagnose_decode.py "${DECODE[@]}"
step index_gpu_decode "$PY" benchmarks/bench_index.py "${INDEX[@]}" "${IMAGES[@]}" --decode "$ON_DEVICE" --keep "$WORK/idx"
step startup "$PY" benchmarks/diagnose_index.py startup --images "$WORK/idx/images"
step query "$PY" benchmarks/bench_query.py "${QUERY[@]}"
[ "${SKIP_HTTP:-0}" = 1 ] || step http "$PY" benchmarks/diagnose_http.py "${HTTP[@]}"
[ "${SKIP_LARGE:-0}" = 1 ] ||
    step index_gpu_decode_x4 "$PY" benchmarks/bench_index.py "${INDEX[@]}" "${IMAGES[@]}" --copies "$LARGE_COPIES" --decode "$ON_DEVICE"
if [ "$DEVICE" = cuda ] && ! command -v "${CC:-cc}" > /dev/null && ! command -v gcc > /dev/null; then
    SKIP_COMPILE=1  # Triton builds its launcher with a C compiler: without one the step would only fail
    echo "== compile_query: skipped, no C compiler (cc/gcc) for Triton" >&2
fi
[ "${SKIP_COMPILE:-0}" = 1 ] ||
    step compile_query "$PY" benchmarks/diagnose_compile.py "${COMPILE[@]}" --mode reduce-overhead --batch-size 0
[ "${SKIP_TRAIN:-0}" = 1 ] || step train "$PY" benchmarks/bench_train.py "${TRAIN[@]}"
# The exported CPU runtimes (ONNX Runtime, OpenVINO) on the host's CPU cores against PyTorch on the same
# cores (they have no GPU path): bench_runtimes.py takes no --device, so it runs outside step().
if [ "${SKIP_RUNTIMES:-0}" != 1 ] && "$PY" -c "import onnxruntime, openvino" 2> /dev/null; then
    echo "== runtimes_cpu: bench_runtimes.py ${RUNTIMES[*]}" >&2
    "$PY" benchmarks/bench_runtimes.py "${RUNTIMES[@]}" --out "$OUT/runtimes_cpu.json" > /dev/null \
        2> "$OUT/runtimes_cpu.log" || { echo "   runtimes_cpu FAILED (see $OUT/runtimes_cpu.log)" >&2; status=1; }
fi
[ "${SKIP_CPU_DECODE:-0}" = 1 ] ||
    step index_cpu_decode "$PY" benchmarks/bench_index.py "${INDEX[@]}" --images "$WORK/idx/images" --decode cpu
if [ "${SKIP_RAY:-0}" != 1 ] && ! "$PY" -c "import ray.data" 2> /dev/null; then
    SKIP_RAY=1
    echo "== ray_index: skipped, Ray Data is not installed (pip install 'fashion-search[ray]')" >&2
fi
# Images/s of the Ray path (decode in CPU tasks, one GPU actor per GPU) and per actor, against the
# single-process path on the same catalog.
[ "${SKIP_RAY:-0}" = 1 ] || step ray_index "$PY" benchmarks/bench_ray_index.py "${RAY[@]}"
ls -la "$OUT" >&2
"$PY" benchmarks/summarize.py "$OUT" >&2
exit $status
