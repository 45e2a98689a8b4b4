#!/usr/bin/env bash
# Install dlopt on a fresh machine and run its main job end to end on a bundled real model (MiniLM-L6):
# export to ONNX (verified against torch) -> quantize to INT8 (recipe picked for this CPU) -> accuracy of
# both on real data -> latency of both, interleaved, with a 95 % CI on the ratio -> a verified mobile
# bundle. Everything lands in ./out/. Installs into the active virtual environment, else into the
# project's .venv (created with python3 on first use): see scripts/venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

python -m pip install -q torch==2.13.0      # the CPU build, from this machine's disk
python -m pip install -q -e ".[models]"
mkdir -p out

# torchscript + eager attention gives the graph ONNX Runtime fuses into Attention ops (faster INT8)
dlopt export minilm -o out/minilm.onnx
dlopt quantize out/minilm.onnx -o out/minilm.int8.onnx --precision int8 --calibration model:minilm
dlopt eval out/minilm.onnx --model minilm
dlopt eval out/minilm.int8.onnx --model minilm
dlopt bench out/minilm.onnx out/minilm.int8.onnx --batch 1,8 --json out/bench.json
rm -rf out/minilm-mobile
dlopt package out/minilm.int8.onnx --target mobile -o out/minilm-mobile
dlopt verify out/minilm-mobile
