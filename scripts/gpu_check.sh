#!/usr/bin/env bash
# Everything the GPU machine checks and times, in one call (run from the repo root there):
#   bash scripts/gpu_check.sh            # writes under $OUT (or ./out/gpu)
# The image has torch, triton, numpy, rich, typer, matplotlib, pynvml; tilestack runs from source.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m tilestack.cli bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -25
python3 scripts/bench_attention.py "$@" --out "$OUT" 2>&1 | tee "$OUT/attention.log" | tail -40
