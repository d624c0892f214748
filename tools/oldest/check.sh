#!/usr/bin/env bash
# The test suite under the oldest Python and packages we support: those A1111 1.10 ships (Python 3.10, which A1111
# and Forge both ask for, torch 2.1.2, gradio 3.41.2, FastAPI 0.94, numpy 1.26). CI runs today's; this catches what only the old ones break (names torch 2.1 lacks, FastAPI 0.94's
# annotation rules). Needs the package registry, and about 5 GB for the venv.
#   bash tools/oldest/check.sh [pytest arguments]      (VENV=/path to keep the venv elsewhere, PYTHON=python3.10)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-/tmp/copier-oldest}
PYTHON=${PYTHON:-python3.10}
if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.1.2 torchvision==0.16.2 "numpy<2" gradio==3.41.2 fastapi==0.94.0 "httpx<0.28" \
        safetensors pillow open-clip-torch pytest pytest-timeout "transformers>=4.30,<4.50" einops omegaconf
    "$VENV/bin/pip" install -q --no-deps stable-diffusion-sdkit==2.1.5
fi
PYTHONPATH=$PWD "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
