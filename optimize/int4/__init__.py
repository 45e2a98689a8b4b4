"""4-bit weight-only quantization: MatMul/Gemm weights -> MatMulNBits, embedding tables -> GatherBlockQuantized.

Built on ONNX Runtime's `MatMulNBitsQuantizer` (algorithm "rtn": round-to-nearest through its C++ block
quantizer; "hqq": half-quadratic quantization) and its MatMulNBits/GatherBlockQuantized contrib ops.
What dlopt adds around it, and why:
- Gemm is rewritten to MatMul (+ Add) first: ORT's quantizer only looks at MatMul, so the classifier heads and
  any 2-D Linear that the exporter emitted as Gemm would otherwise stay FP32.
- Embedding tables are quantized by dlopt, not by ORT: ORT writes GatherBlockQuantized with INT4/UINT4
  tensors and therefore forces the whole model to opset 21 without converting its other nodes, which
  breaks real exports (an opset-17 ReduceL2 with `axes` becomes invalid). The contrib op also takes
  uint8 data with 4-bit values packed along the last axis, which needs no opset change; that is what is
  written here. For MiniLM the table is 47 of its 91 MB, so this is what brings the model under 16 MB.
- Mixed precision by measured sensitivity: with calibration data, every candidate MatMul's output error
  under 4-bit weights is measured on real activations (SQNR of X·Ŵ against X·W, streamed one sample at a
  time) and the most sensitive share of the weights (`sensitive_fraction`, by parameter count) is kept at
  `fallback_bits` (8-bit MatMulNBits by default). A few value and FFN matrices of a BERT carry most of
  the 4-bit error (outlier activation channels), so a small share buys most of the fidelity back
  (MiniLM: embedding cosine 0.970 -> 0.982 for +0.5 MB).
- Symmetric blocks (the default) use a signed scale: the block's largest-magnitude weight lands exactly
  on code -8, as in ORT's MLAS quantizer (see block_grid); no zero points are stored.
- Algorithm "mse" (hand-written, same MatMulNBits format): round-to-nearest where each block's range is
  shrunk by the ratio that minimizes its squared error; ORT's RTN always uses the full min/max range.
  Its gain is small (2-3 % lower weight MSE on Gaussian weights) and it is slower, so it is not the default.
- Algorithm "gptq" (hand-written after ORT's port of neural-compressor's GPTQ, which in ORT 1.32 applies
  no error compensation at all, see gptq_blocks): the Hessians of all layers are collected in one
  streamed pass (one model run per sample; ORT's driver runs the model once per layer input per
  sample: 224 s on MiniLM), and the integer codes GPTQ chose are written directly. Inputs are visited
  by decreasing energy (act-order) with every block's grid fixed up front, chosen by an energy-weighted
  clip search; one factorization serves all weights that read the same input (q/k/v, gate/up).
  "auto" (the default) is GPTQ when calibration data is given, RTN otherwise.
- Tied LM heads: a MatMul reading Transpose(table) (how torch exports a head tied to the embedding) is
  folded to a constant weight and quantized; the embedding Gather then reads the head's codes through
  Reshapes (GatherBlockQuantized), so the table is stored once, at the head's precision.
- First/last layers and named nodes can be kept out (`keep_first`/`keep_last`, `exclude_nodes`).
- Measured (benchmarks/quantize_int4.py, one run): SmolLM2-135M perplexity 33.06 FP32 -> 35.34 (+6.9 %) with
  the defaults (GPTQ symmetric block 32, tied head/embedding and the 10 % most sensitive weights at 8 bits,
  int8 compute), 107.8 MB vs 542.6; RTN on the same grid gives +21 %. MiniLM: 15.1 MB, cosine 0.987.
- The result is checked: it must load in ONNX Runtime, keep the graph's inputs and outputs, and (with
  data) its fidelity against the float model is in the report, per output.

Where each part is (one hop from here):
  config.py       Int4WeightOnly, the scheme config
  pipeline.py     quantize_int4: the whole pass and its report
  graph.py        Gemm -> MatMul, transposed weights folded, tied tables shared, the contrib opset
  blocks.py       block grids in numpy, clip search (mse), nibble packing, embedding tables
  gptq.py         dlopt's own MatMulNBits writer and GPTQ
  sensitivity.py  per-MatMul 4-bit error on real activations (mixed precision)
  ort.py          ORT's MatMulNBitsQuantizer (rtn, hqq)
"""

from __future__ import annotations

from dlopt.optimize.int4.blocks import (
    CLIP_RATIOS,
    block_grid,
    dequantize_blocks,
    quantize_blocks,
    quantize_blocks_mse,
    search_grid,
)
from dlopt.optimize.int4.config import ALGORITHMS, Int4WeightOnly
from dlopt.optimize.int4.gptq import collect_hessians, gptq_blocks
from dlopt.optimize.int4.graph import gemm_to_matmul, name_nodes
from dlopt.optimize.int4.pipeline import quantize_int4
from dlopt.optimize.int4.sensitivity import rank_sensitivity
from dlopt.optimize.rounding import gptq_factor

__all__ = [
    "ALGORITHMS",
    "CLIP_RATIOS",
    "Int4WeightOnly",
    "block_grid",
    "collect_hessians",
    "dequantize_blocks",
    "gemm_to_matmul",
    "gptq_blocks",
    "gptq_factor",
    "name_nodes",
    "quantize_blocks",
    "quantize_blocks_mse",
    "quantize_int4",
    "rank_sensitivity",
    "search_grid",
]
