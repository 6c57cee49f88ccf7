#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one CUDA GPU): CUDA tests, kernel benchmarks against their torch
# references, sg.score end to end at N = 11008, M = 16384 in fp32 and bf16, and the layer-sequential check;
# one JSON. Runs the checkout in place (no install, synthetic data only); on a machine without CUDA it skips the
# GPU parts with the reason. Usage: bash benchmarks/gpu/run.sh [OUT.json]
#   (default: $OUT/gpu_check.json where $OUT is set, else benchmarks/results/gpu-check.json)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
dest=${1:-${OUT:+$OUT/gpu_check.json}}
dest=${dest:-benchmarks/results/gpu-check.json}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 470 "$PY" benchmarks/gpu/check.py --out "$dest"
