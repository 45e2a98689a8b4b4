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
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from dlopt.errors import InputError, MissingDependencyError, StageError
from dlopt.fidelity import compare_sessions, sqnr_from_energy
from dlopt.fidelity import report as fidelity_report
from dlopt.inputs import take_samples
from dlopt.optimize.rounding import gptq_factor
from dlopt.optimize.scheme import QuantizeScheme
from dlopt.sessions import cpu_session, feeds_for
from dlopt.stage import StageResult, config_to_dict

ALGORITHMS = ("auto", "rtn", "mse", "hqq", "gptq")
Algorithm = Literal["auto", "rtn", "mse", "hqq", "gptq"]
_OP_TYPES = ("MatMul", "Gemm", "Gather")
_MS_DOMAIN = "com.microsoft"
# tables smaller than this stay float: quantizing a position or token-type table saves nothing
_MIN_EMBEDDING_ELEMENTS = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Int4WeightOnly(QuantizeScheme):
    """4-bit block-quantized weights (MatMulNBits, GatherBlockQuantized); activations stay float."""

    VERSION: ClassVar[int] = 1
    precision: ClassVar[str] = "int4"
    block_size: int = 32  # weights per scale, along the reduction axis; a power of two >= 16
    symmetric: bool = True  # True: no zero points, a signed scale per block (see block_grid); False: a zero
    #                         point per block (~1.5 % larger; HQQ needs it)
    algorithm: Algorithm = "auto"  # auto: gptq with calibration data, else rtn. rtn: ORT's round to nearest;
    #                                mse: round to nearest with a per-block clipping range that minimizes
    #                                squared error (dlopt); hqq: half-quadratic (ORT, torch); gptq: dlopt's
    #                                error-compensating GPTQ, needs data
    quantize_embeddings: bool = True  # Gather on a large constant table -> GatherBlockQuantized (4-bit)
    embedding_block_size: int | None = None  # None: block_size
    share_tied_embeddings: bool = True  # a table that is also a (transposed) MatMul weight, like a tied LM
    #                                     head, is stored once: the Gather reads the MatMul's quantized codes
    # exclude_ops (QuantizeScheme): of MatMul, Gemm, Gather, the op types left in float
    keep_first: int = 0  # the first N weight MatMuls (graph order) kept at fallback_bits
    keep_last: int = 1  # the last N (an LM head; with a tied table, the embedding too) kept at fallback_bits
    sensitive_fraction: float = 0.1  # share of MatMul weights (by parameters) kept at fallback_bits, most
    #                                  sensitive first; needs calibration data (ignored without, with a note)
    fallback_bits: int = 8  # 8: 8-bit MatMulNBits; 32: float
    accuracy_level: int | None = 4  # MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (CPU:
    #                                 SmolLM2 b1x64 2.2x -> 1.1x FP32 time for +0.5 % perplexity; GPU EPs ignore it)
    sensitivity_samples: int = 8  # calibration samples used to rank nodes
    gptq_samples: int = 32  # calibration samples GPTQ builds its Hessians from (SmolLM2: 32 x 128 tokens)
    gptq_act_order: bool = True  # GPTQ visits inputs by decreasing energy, block grids fixed up front
    gptq_clip_search: bool = True  # GPTQ block grids by an energy-weighted clip-ratio search, not min/max

    def __post_init__(self):
        super().__post_init__()

        def bad(what: str, hint: str):
            raise InputError(f"int4: {what}", hint)

        for name in ("block_size", "embedding_block_size"):
            value = getattr(self, name)
            if value is None and name == "embedding_block_size":
                continue
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                bad(f"{name} {value!r} is not a power of two >= 16", "use 16, 32, 64, 128 or 256")
        if self.algorithm not in ALGORITHMS:
            bad(f"unknown algorithm {self.algorithm!r}", f"choose one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "hqq" and self.symmetric:
            bad("hqq fits a float zero point per block, it cannot be symmetric", "use symmetric=False or rtn/gptq")
        unknown_ops = sorted(set(self.exclude_ops) - set(_OP_TYPES))
        if unknown_ops:
            bad(f"exclude_ops {unknown_ops} are not quantized by int4", f"int4 quantizes {', '.join(_OP_TYPES)}")
        if self.fallback_bits not in (8, 32):
            bad(f"fallback_bits {self.fallback_bits!r}", "use 8 (8-bit MatMulNBits) or 32 (float)")
        if not 0.0 <= self.sensitive_fraction < 1.0:
            bad(f"sensitive_fraction {self.sensitive_fraction!r} is outside [0, 1)", "e.g. 0.1 keeps 10 % at 8-bit")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            bad(f"accuracy_level {self.accuracy_level!r}", "use 0-4 (4: int8 compute, fastest on CPU)")
        for name in ("keep_first", "keep_last"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0", "give a number of layers")
        if self.sensitivity_samples < 1 or self.gptq_samples < 1:
            bad("sample counts must be >= 1", "e.g. sensitivity_samples=8")


Int4Config = Int4WeightOnly  # its name before the scheme configs


# -- graph helpers -----------------------------------------------------------------------------------
def _initializers(model) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _is_float_weight(tensor, rank: int = 2) -> bool:
    from onnx import TensorProto

    return tensor is not None and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == rank


def _attr(node, name: str, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _name_nodes(model) -> None:
    """ORT's quantizer selects nodes by name: give unnamed nodes unique names."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def _gemm_to_matmul(model, skip: set[str]) -> list[str]:
    """Gemm(A, B, C) with a constant 2-D B and no transA -> MatMul(A, alpha·op(B)) (+ Add(beta·C)).

    Exact up to float rounding; returns the names of the rewritten nodes (the MatMul keeps the name)."""
    import onnx
    from onnx import numpy_helper

    inits = _initializers(model)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten, nodes = [], []
    for node in model.graph.node:
        b = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if node.name in skip or not _is_float_weight(b) or _attr(node, "transA", 0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(b)
        if _attr(node, "transB", 0):
            w = w.T
        w = np.ascontiguousarray(w * np.float32(_attr(node, "alpha", 1.0)), dtype=np.float32)
        w_name = f"{b.name}__matmul" if consumers.get(b.name, 0) > 1 else b.name
        if w_name == b.name:
            model.graph.initializer.remove(b)
        model.graph.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name))
        if has_bias:
            bias = node.input[2]
            beta = float(_attr(node, "beta", 1.0))
            if beta != 1.0:
                c = inits.get(bias)
                if c is None:
                    raise InputError(f"Gemm {node.name!r} scales a non-constant bias by beta={beta}",
                                     f"exclude it: exclude_nodes=({node.name!r},)")
                scaled = numpy_helper.from_array(numpy_helper.to_array(c) * np.float32(beta), f"{bias}__beta")
                model.graph.initializer.append(scaled)
                bias = scaled.name
            nodes.append(onnx.helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name}__bias"))
        rewritten.append(node.name)
    if rewritten:
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    return rewritten


def _fold_transposed_weights(model, skip: set[str]) -> list[tuple[str, str]]:
    """MatMul(x, Transpose(W)) with W a 2-D float initializer -> MatMul(x, Wᵀ as an initializer).

    A tied LM head exports this way (the embedding table, transposed at run time): without the fold the
    head stays float and ORT transposes 28 M weights on every run (SmolLM2). Exact; returns (MatMul,
    table) name pairs for the folded weights. The Transpose goes when nothing else reads it."""
    from onnx import numpy_helper

    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded, dropped = [], set()
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in skip or len(node.input) != 2:
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or list(_attr(tr, "perm", [1, 0])) != [1, 0] \
                or not _is_float_weight(inits.get(tr.input[0])):
            continue
        name = f"{tr.input[0]}__transposed"
        if name not in inits:
            w = numpy_helper.to_array(inits[tr.input[0]])
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(w.T), name)
            model.graph.initializer.append(inits[name])
        consumers[tr.output[0]] -= 1
        if consumers[tr.output[0]] == 0:
            dropped.add(tr.name)
        node.input[1] = name
        folded.append((node.name, tr.input[0]))
    if dropped:
        keep = [n for n in model.graph.node if n.name not in dropped]
        model.graph.ClearField("node")
        model.graph.node.extend(keep)
    return folded


def _weight_matmuls(model) -> list[Any]:
    """MatMul nodes whose second input is a 2-D float initializer, in graph order."""
    inits = _initializers(model)
    return [n for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and _is_float_weight(inits.get(n.input[1]))]


def _embedding_gathers(model, block_size: int) -> tuple[list[Any], list[str]]:
    """Gathers on axis 0 of a large 2-D float table whose rows split into whole blocks; plus notes on
    large tables left alone and why."""
    inits = _initializers(model)
    found, notes = [], []
    for node in model.graph.node:
        if node.op_type != "Gather":
            continue
        table = inits.get(node.input[0])
        if not _is_float_weight(table):
            continue
        rows, cols = table.dims
        if rows * cols < _MIN_EMBEDDING_ELEMENTS:
            continue
        if _attr(node, "axis", 0) != 0:
            notes.append(f"{node.name}: gathers on axis {_attr(node, 'axis', 0)}, left in float")
        elif cols % block_size:
            notes.append(f"{node.name}: rows of {cols} do not split into blocks of {block_size}, left in float")
        else:
            found.append(node)
    return found, notes


def _share_tied_tables(model, pairs: list[tuple[str, str]], excluded: set[str]) -> list[str]:
    """Gather(table) whose transpose became a quantized MatMul weight (a tied LM head) ->
    GatherBlockQuantized reading that MatMulNBits' own codes, scales and zero points through Reshapes.

    Both ops block along the hidden axis, so the LM head's [V, K/block, block·bits/8] codes are the
    table's rows: the file holds the tied weight once instead of twice (SmolLM2: 28 M weights, 14 MB at
    4 bits, 28 MB at 8). Returns the names of the Gathers rewritten."""
    import onnx
    from onnx import numpy_helper

    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    inits = _initializers(model)
    shared = []
    for mm_name, table in pairs:
        mm = nbits.get(f"{mm_name}_Q4") or nbits.get(f"{mm_name}_Q8")
        if mm is None or table not in inits:
            continue
        rows, cols = inits[table].dims
        block, bits = _attr(mm, "block_size", 32), _attr(mm, "bits", 4)
        if _attr(mm, "N", 0) != rows or _attr(mm, "K", 0) != cols or cols % block:
            continue
        for i, node in enumerate(model.graph.node):
            if node.op_type != "Gather" or node.input[0] != table or node.name in excluded \
                    or _attr(node, "axis", 0) != 0:
                continue
            prefix = f"{node.name}__tied"
            per_row = {1: cols * bits // 8, 2: cols // block, 3: -(-(cols // block) * bits // 8)}
            inputs, reshapes = [], []
            for slot, source in ((1, mm.input[1]), (2, mm.input[2]), (3, mm.input[3] if len(mm.input) > 3 else "")):
                if not source:
                    continue
                shape = numpy_helper.from_array(np.array([rows, per_row[slot]], np.int64), f"{prefix}_shape{slot}")
                model.graph.initializer.append(shape)
                reshapes.append(onnx.helper.make_node("Reshape", [source, shape.name], [f"{prefix}_in{slot}"],
                                                      name=f"{prefix}_reshape{slot}"))
                inputs.append(reshapes[-1].output[0])
            gather = onnx.helper.make_node("GatherBlockQuantized", [inputs[0], node.input[1], *inputs[1:]],
                                           list(node.output), name=node.name, domain=_MS_DOMAIN, bits=bits,
                                           block_size=block, gather_axis=0, quantize_axis=1)
            model.graph.node.remove(node)
            for j, new in enumerate([*reshapes, gather]):
                model.graph.node.insert(i + j, new)
            shared.append(node.name)
            break
    return shared


def _ensure_ms_opset(model) -> None:
    if not any(o.domain == _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(__import__("onnx").helper.make_opsetid(_MS_DOMAIN, 1))


def _drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(keep)
        names = {t.name for t in keep}
        inputs = [i for i in model.graph.input if i.name in names or i.name in used]
        model.graph.ClearField("input")
        model.graph.input.extend(inputs)


# -- block quantization in numpy (embeddings, and the error model used to rank nodes) -----------------
def block_grid(blocks: np.ndarray, symmetric: bool, ratio: float = 1.0, bits: int = 4
               ) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (float arrays, shape blocks.shape[:-1]) of each block along the last axis.

    Symmetric: the zero point is fixed at 2^(bits-1) (what the contrib ops assume without one) and the
    scale is *signed*, v/-2^(bits-1) for the block's largest-magnitude weight v, so that weight lands
    exactly on the code that has no positive twin (-8); the other sign gets 7 steps. An unsigned
    amax/8 would clip a positive extreme to 7/8 of itself (ORT's MLAS quantizer uses the signed
    scale too). Asymmetric: min/max including zero, an integer zero point. `ratio` < 1 shrinks the
    range (the clip search of quantize_blocks_mse and of GPTQ)."""
    top = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        return extreme * (ratio / -mid), np.full(extreme.shape, float(mid))
    lo = np.minimum(blocks.min(axis=-1), 0.0) * ratio
    hi = np.maximum(blocks.max(axis=-1), 0.0) * ratio
    scale = (hi - lo) / top
    zp = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, top)
    return scale, zp


def _round_to_grid(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int = 4) -> np.ndarray:
    safe = np.where(scale == 0, 1, scale)[..., None]
    return np.clip(np.round(blocks / safe + zp[..., None]), 0, (1 << bits) - 1)


def quantize_blocks(w: np.ndarray, block_size: int, symmetric: bool, bits: int = 4
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest block quantization of w [rows, cols] along its last axis.

    Returns (q uint8 [rows, cols] in [0, 2^bits), scales float32 [rows, cols/block], zero points uint8
    [rows, cols/block]); w ≈ (q - zp) · scale (see block_grid for the grid)."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // block_size, block_size).astype(np.float32)
    scale, zp = block_grid(blocks, symmetric, bits=bits)
    q = _round_to_grid(blocks, scale, zp, bits).astype(np.uint8)
    return q.reshape(rows, cols), scale.astype(np.float32), zp.astype(np.uint8)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block_size: int) -> np.ndarray:
    rows, cols = q.shape
    blocks = q.reshape(rows, cols // block_size, block_size).astype(np.float32) - zp[..., None]
    return (blocks * scale[..., None]).reshape(rows, cols)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)


def search_grid(blocks: np.ndarray, symmetric: bool, ratios=CLIP_RATIOS, weights: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """block_grid with, per block, the ratio of `ratios` that gives the smallest squared error of the
    rounded block (each position weighted by `weights`, broadcast against blocks, when given)."""
    best_err = best_scale = best_zp = None
    for ratio in ratios:
        scale, zp = block_grid(blocks, symmetric, ratio)
        diff = (_round_to_grid(blocks, scale, zp) - zp[..., None]) * scale[..., None] - blocks
        err = (np.square(diff) if weights is None else np.square(diff) * weights).sum(axis=-1)
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zp
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def quantize_blocks_mse(w: np.ndarray, block_size: int, symmetric: bool, ratios=CLIP_RATIOS,
                        rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like quantize_blocks, but each block's range is shrunk by the ratio (of `ratios`) that gives the
    smallest squared error: clipping a block's one or two extreme weights buys a finer grid for the
    other 30. Same output format as quantize_blocks."""
    rows, cols = w.shape
    nb = cols // block_size
    q_all = np.empty((rows, cols), np.uint8)
    s_all = np.empty((rows, nb), np.float32)
    z_all = np.empty((rows, nb), np.uint8)
    for start in range(0, rows, rows_per_chunk):
        blocks = w[start:start + rows_per_chunk].reshape(-1, nb, block_size).astype(np.float32)
        scale, zp = search_grid(blocks, symmetric, ratios)
        end = start + blocks.shape[0]
        q_all[start:end] = _round_to_grid(blocks, scale, zp).reshape(blocks.shape[0], cols).astype(np.uint8)
        s_all[start:end] = scale
        z_all[start:end] = zp.astype(np.uint8)
    return q_all, s_all, z_all


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (odd lengths padded)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _quantize_embedding(model, node, block_size: int, symmetric: bool, clip_search: bool) -> None:
    """Replace Gather(table, ids) by GatherBlockQuantized on uint8-packed 4-bit data (see module doc)."""
    import onnx
    from onnx import numpy_helper

    inits = _initializers(model)
    table = inits[node.input[0]]
    w = numpy_helper.to_array(table)
    q, scale, zp = (quantize_blocks_mse if clip_search else quantize_blocks)(w, block_size, symmetric)
    prefix = f"{table.name}__q4_{node.name}"
    new_inits = [numpy_helper.from_array(_pack_nibbles(q), f"{prefix}_data"),
                 numpy_helper.from_array(scale, f"{prefix}_scales")]
    inputs = [new_inits[0].name, node.input[1], new_inits[1].name]
    if not symmetric:
        new_inits.append(numpy_helper.from_array(_pack_nibbles(zp), f"{prefix}_zero_points"))
        inputs.append(new_inits[2].name)
    model.graph.initializer.extend(new_inits)
    replacement = onnx.helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=node.name,
                                        domain=_MS_DOMAIN, bits=4, block_size=block_size, gather_axis=0,
                                        quantize_axis=1)
    position = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(position, replacement)


def _progress(items: list[Any], description: str, total: int, counts) -> Iterator[Any]:
    """Yield items; on a terminal, a progress bar on stderr advancing on the items `counts` selects."""
    import sys

    from dlopt.optimize.calibration import progress_bar

    with progress_bar(total, description, sys.stderr.isatty() and total >= 4) as advance:
        for item in items:
            yield item
            if counts(item):
                advance()


def _matmul_nbits_own(model, include: set[str], config: Int4WeightOnly, quantize) -> Any:
    """4-bit MatMulNBits written by dlopt (algorithms 'mse' and 'gptq').

    `quantize(node, wt)` gets the weight transposed and zero-padded to whole blocks along K, [N, K'],
    and returns (codes uint8 [N, K'], scales [N, K'/block], zero points [N, K'/block]) as
    quantize_blocks does. The layout is the contrib op's: B [N, K'/block, block/2] with two weights per
    byte along K (low nibble first), scales [N·K'/block], zero points packed two per byte
    [N·ceil(K'/block / 2)]; checked against ONNX Runtime's kernel in the tests."""
    import onnx
    from onnx import numpy_helper

    inits = _initializers(model)
    block = config.block_size
    nodes = []
    for node in _progress(list(model.graph.node), f"int4 {config.algorithm}", total=len(include),
                          counts=lambda n: n.name in include):
        if node.name not in include:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k, n = w.shape
        pad = (-k) % block
        wt = np.ascontiguousarray(np.pad(w, ((0, pad), (0, 0))).T)  # [N, K'], blocks along K
        q, scale, zp = quantize(node, wt)
        kb = wt.shape[1] // block
        prefix = f"{node.input[1]}__q4_{node.name}"
        new = [numpy_helper.from_array(_pack_nibbles(q.reshape(n, kb, block)), f"{prefix}_B"),
               numpy_helper.from_array(scale.astype(np.float32).reshape(-1), f"{prefix}_scales")]
        if not config.symmetric:
            new.append(numpy_helper.from_array(_pack_nibbles(zp).reshape(-1), f"{prefix}_zero_points"))
        model.graph.initializer.extend(new)
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block}
        if config.accuracy_level:
            attrs["accuracy_level"] = config.accuracy_level
        nodes.append(onnx.helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in new], list(node.output),
                                           name=f"{node.name}_Q4", domain=_MS_DOMAIN, **attrs))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def gptq_blocks(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool, percdamp: float = 0.01,
                lazy: int = 128, act_order: bool = False, clip_search: bool = False,
                factor: tuple[np.ndarray, np.ndarray | None] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) for w [K, N] given H = 2·XᵀX/n [K, K], K a multiple of block_size.

    Columns of K are quantized in order; each one's rounding error is spread over the columns not yet
    quantized through the inverse Hessian's Cholesky factor, so the layer's output error, not the weight
    error, is minimized. Written after ORT's port of neural-compressor's `gptq`, with two differences: the
    error is spread with rows of the upper Cholesky factor (ORT 1.32 indexes its columns, Hinv[i:, i], which
    are zero below the diagonal, so its GPTQ compensates nothing and equals plain rounding), and the
    integer codes and grid are returned as chosen (ORT re-derives a grid from fake-quantized weights).

    Without `act_order` a block's scale and zero point are fixed from the (updated) weights when the
    block starts. With it, rows are visited by decreasing H diagonal (the inputs with the most energy
    first, while there is still room to compensate their error) and every block's grid is fixed up front
    from the original weights ("static groups"), so blocks stay contiguous along K, the MatMulNBits
    layout. `clip_search` picks each block's range by the clip ratio with the smallest squared error,
    weighted by the H diagonal (an input's energy), instead of the full min/max. `factor` is
    gptq_factor(hessian, percdamp, act_order), passed in when several weights share one input (q/k/v).
    Returns (codes uint8 [N, K], scales [N, K/block], zero points uint8 [N, K/block])."""
    k, n = w.shape
    lazy = max(block_size, lazy - lazy % block_size)
    perm, hinv = factor if factor is not None else gptq_factor(hessian, percdamp, act_order)
    if hinv is None:  # not positive definite even after damping: plain rounding
        return quantize_blocks(np.ascontiguousarray(w.T), block_size, symmetric)
    weights = w.astype(np.float32).copy()
    energy = np.diag(hessian).astype(np.float64)
    weights[energy == 0, :] = 0.0  # dead inputs: nothing to reproduce
    nb = k // block_size
    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.float32)

    def fix_grid(g: int, group: np.ndarray) -> None:  # group [block, N] -> the grid of block g, per column
        blocks = np.ascontiguousarray(group.T)
        if clip_search:
            e = energy[g * block_size:(g + 1) * block_size]
            scales[g], zeros[g] = search_grid(blocks, symmetric, weights=e / max(e.mean(), 1e-30))
        else:
            scales[g], zeros[g] = block_grid(blocks, symmetric)

    if act_order:
        for g in range(nb):
            fix_grid(g, weights[g * block_size:(g + 1) * block_size])
    weights = weights[perm]
    codes = np.zeros((k, n), np.uint8)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        block = weights[i1:i2].copy()
        errors = np.zeros_like(block)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block_size
            if not act_order and col % block_size == 0:  # the group lies inside this lazy block
                fix_grid(g, block[i:i + block_size])
            safe = np.where(scales[g] == 0, 1, scales[g])
            q = np.clip(np.round(block[i] / safe + zeros[g]), 0, 15)
            codes[col] = q.astype(np.uint8)
            err = (block[i] - (q - zeros[g]) * scales[g]) / hinv1[i, i]
            block[i:] -= np.outer(hinv1[i, i:], err)  # a row of the upper Cholesky factor
            errors[i] = err
        weights[i2:] -= hinv[i1:i2, i2:].T @ errors
    return codes.T.copy(), scales.T.astype(np.float32), zeros.T.astype(np.uint8)


def collect_hessians(model, nodes: list[Any], feeds: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """H = 2·XᵀX / rows for each distinct MatMul input X, accumulated one sample at a time (one run of
    the model per sample for all layers; ORT's GPTQ driver runs it once per input per sample)."""
    inputs = sorted({n.input[0] for n in nodes})
    session = _session(_with_outputs(model, inputs))
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for sample in feeds:
        values = dict(zip(names, session.run(None, feeds_for(session, sample))))
        for name in inputs:
            x = values[name].astype(np.float64).reshape(-1, values[name].shape[-1])
            sums[name] = sums.get(name, 0.0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
    return {name: 2.0 * sums[name] / max(rows[name], 1) for name in inputs}


# -- running the float model -------------------------------------------------------------------------
def _session(model):
    return cpu_session(model, error=StageError, hint="report this model")


def _with_outputs(model, names: list[str]):
    from dlopt.optimize.preprocess import with_outputs

    return with_outputs(model, names)


def rank_sensitivity(model, nodes: list[Any], feeds: list[Mapping[str, np.ndarray]], block_size: int,
                     symmetric: bool, clip_search: bool = False) -> dict[str, float]:
    """SQNR (dB) of each MatMul's output with 4-bit weights against its float output, on real inputs.

    The node's input activations come from the float model (exposed as extra outputs); X·W and
    X·(W - Ŵ) are accumulated sample by sample, so memory does not grow with the number of samples."""
    from onnx import numpy_helper

    inits = _initializers(model)
    weights, errors = {}, {}
    for node in nodes:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k = w.shape[0]
        pad = (-k) % block_size
        wt = np.pad(w, ((0, pad), (0, 0))).T  # [N, K'] so that blocks run along K, as MatMulNBits does
        q, s, z = (quantize_blocks_mse if clip_search else quantize_blocks)(wt, block_size, symmetric)
        weights[node.name] = w
        errors[node.name] = (wt - dequantize_blocks(q, s, z, block_size)).T[:k]
    session = _session(_with_outputs(model, sorted({n.input[0] for n in nodes})))
    names = [o.name for o in session.get_outputs()]
    signal = {n.name: 0.0 for n in nodes}
    noise = {n.name: 0.0 for n in nodes}
    for sample in feeds:
        values = dict(zip(names, session.run(None, feeds_for(session, sample))))
        for node in nodes:
            x = values[node.input[0]].astype(np.float32)
            x = x.reshape(-1, x.shape[-1])
            signal[node.name] += float(np.square(x @ weights[node.name]).sum())
            noise[node.name] += float(np.square(x @ errors[node.name]).sum())
    return {name: sqnr_from_energy(signal[name], noise[name]) for name in signal}


# -- ORT's quantizer ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_ort_quantizer() -> Iterator[None]:
    """ORT's weight-only quantizer logs every node at INFO and prints a progress bar to stdout."""
    loggers = [logging.getLogger(n) for n in ("onnxruntime.quantization.matmul_nbits_quantizer",
                                              "onnxruntime.quantization.neural_compressor.weight_only")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(__import__("io").StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ort_nbits(model, *, bits: int, config: Int4WeightOnly, include: set[str], all_matmuls: set[str]):
    """Quantize the MatMuls named in `include` with ORT's round-to-nearest (or HQQ) block quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if not include:
        return model
    if config.algorithm == "hqq" and bits == 4:
        try:
            import torch  # noqa: F401  (HQQ runs in torch)
        except ImportError as e:
            raise MissingDependencyError("int4 algorithm hqq needs torch", "pip install torch==2.13.0") from e
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4, op_types_to_quantize=("MatMul",))
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                            accuracy_level=config.accuracy_level, bits=bits,
                                            op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, algo_config=algo, nodes_to_exclude=sorted(all_matmuls - include))
    quantizer.process()
    return quantizer.model.model


# -- the stage ---------------------------------------------------------------------------------------
def _size(model) -> int:
    return model.ByteSize()


def _op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _quantized_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            key = f"MatMulNBits({_attr(node, 'bits', 4)}-bit)"
        elif node.op_type == "GatherBlockQuantized":
            key = f"GatherBlockQuantized({_attr(node, 'bits', 4)}-bit)"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _select_fallback(candidates: list[Any], sqnr: dict[str, float], fraction: float, params: dict[str, int]
                     ) -> list[str]:
    """The most sensitive nodes (lowest SQNR) whose weights fit in `fraction` of all candidate weights."""
    budget = fraction * sum(params[n.name] for n in candidates)
    chosen, used = [], 0
    for name in sorted(sqnr, key=lambda n: sqnr[n]):
        if used + params[name] <= budget:
            chosen.append(name)
            used += params[name]
    return chosen


def quantize_int4(model, config: Int4WeightOnly = Int4WeightOnly(), data: Iterable[Mapping[str, np.ndarray]] | None = None
                  ) -> StageResult:
    """4-bit weight-only quantization of an onnx.ModelProto (never modified); see the module doc.

    `data` (an iterable of feeds, e.g. CalibrationData) is used to rank nodes by sensitivity, for GPTQ,
    and to measure fidelity against the float model; without it RTN/HQQ still run."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"int4 takes an onnx.ModelProto, not {type(model).__name__}", "load it with dlopt.fileio")
    started = time.perf_counter()
    original = model
    model = onnx.ModelProto()
    model.CopyFrom(original)
    _name_nodes(model)

    names = {n.name for n in model.graph.node}
    missing = sorted(set(config.exclude_nodes) - names)
    if missing:
        raise InputError(f"int4: exclude_nodes {missing} are not nodes of the model",
                         "check the names (e.g. with Netron) or drop them")
    excluded = set(config.exclude_nodes)
    notes: list[str] = []

    gemms = [] if "Gemm" in config.exclude_ops else _gemm_to_matmul(model, excluded)
    transposed = [] if "MatMul" in config.exclude_ops else _fold_transposed_weights(model, excluded)
    candidates = [] if "MatMul" in config.exclude_ops else \
        [n for n in _weight_matmuls(model) if n.name not in excluded]
    if not candidates:
        raise InputError("int4: the model has no MatMul or Gemm with a constant 2-D float weight to quantize",
                         "4-bit weight-only quantization applies to linear layers; use {precision=int8} or fp16")
    feeds = take_samples(data, max(config.sensitivity_samples, config.gptq_samples))
    inits = _initializers(model)
    params = {n.name: int(np.prod(inits[n.input[1]].dims)) for n in candidates}

    fallback: list[str] = []
    reasons: dict[str, str] = {}
    order = [n.name for n in candidates]
    for name in order[:config.keep_first]:
        reasons[name] = "keep_first"
    for name in order[len(order) - config.keep_last:] if config.keep_last else []:
        reasons[name] = "keep_last"
    sensitivity: dict[str, float] = {}
    if config.sensitive_fraction > 0:
        if feeds:
            sensitivity = rank_sensitivity(model, candidates, feeds[:config.sensitivity_samples],
                                           config.block_size, config.symmetric,
                                           clip_search=config.algorithm == "mse")
            for name in _select_fallback([n for n in candidates if n.name not in reasons],
                                         {k: v for k, v in sensitivity.items() if k not in reasons},
                                         config.sensitive_fraction, params):
                reasons[name] = f"sensitive (4-bit SQNR {sensitivity[name]:.1f} dB)"
        else:
            notes.append("no calibration data: nodes were not ranked by sensitivity, all MatMuls are 4-bit")
    fallback = [n for n in order if n in reasons]
    four_bit = {n for n in order if n not in reasons}
    all_matmuls = {n.name for n in _weight_matmuls(model)}

    if config.algorithm == "auto":
        config = dataclasses.replace(config, algorithm="gptq" if feeds else "rtn")
        if not feeds:
            notes.append("no calibration data: round-to-nearest; with data, GPTQ (error-compensating) is used")
    if config.algorithm == "gptq" and not feeds:
        raise InputError("int4 algorithm gptq needs calibration data", "pass {calibration=DATA}, or use algorithm rtn or hqq")
    with _quiet_ort_quantizer():
        if config.algorithm == "mse":
            model = _matmul_nbits_own(model, four_bit, config,
                                      lambda node, wt: quantize_blocks_mse(wt, config.block_size, config.symmetric))
        elif config.algorithm == "gptq":
            hessians = collect_hessians(model, [n for n in candidates if n.name in four_bit],
                                        feeds[:config.gptq_samples])

            factors: dict[str, Any] = {}  # q, k and v (gate and up) share an input, hence a factorization

            def solve(node, wt):
                h = hessians[node.input[0]]
                pad = wt.shape[1] - h.shape[0]
                h = np.pad(h, ((0, pad), (0, pad)))  # padded rows are dead: no contribution
                if node.input[0] not in factors:
                    factors.clear()  # consecutive nodes share; keep one factor in memory
                    factors[node.input[0]] = gptq_factor(h, act_order=config.gptq_act_order)
                return gptq_blocks(np.ascontiguousarray(wt.T), h, config.block_size, config.symmetric,
                                   act_order=config.gptq_act_order, clip_search=config.gptq_clip_search,
                                   factor=factors[node.input[0]])

            model = _matmul_nbits_own(model, four_bit, config, solve)
        else:
            model = _ort_nbits(model, bits=4, config=config, include=four_bit, all_matmuls=all_matmuls)
        if config.fallback_bits == 8 and fallback:
            model = _ort_nbits(model, bits=8, config=config, include=set(fallback),
                               all_matmuls={n.name for n in _weight_matmuls(model)})
    if config.accuracy_level:
        for node in model.graph.node:  # HQQ and GPTQ do not set it
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", config.accuracy_level))

    embeddings: list[str] = []
    tied: list[str] = []
    if config.quantize_embeddings and config.share_tied_embeddings and "Gather" not in config.exclude_ops:
        tied = _share_tied_tables(model, transposed, excluded)
        embeddings += tied
    if config.quantize_embeddings and "Gather" not in config.exclude_ops:
        block = config.embedding_block_size or config.block_size
        gathers, gather_notes = _embedding_gathers(model, block)
        notes += gather_notes
        for node in gathers:
            if node.name in excluded:
                continue
            _quantize_embedding(model, node, block, config.symmetric, clip_search=config.algorithm == "mse")
            embeddings.append(node.name)
    _ensure_ms_opset(model)
    _drop_unused_initializers(model)

    session = _session(model)  # must load
    if [o.name for o in session.get_outputs()] != [o.name for o in original.graph.output]:
        raise StageError("int4 quantization changed the graph outputs", "report this model")
    left_float = sorted(all_matmuls - four_bit - (set(fallback) if config.fallback_bits == 8 else set()))
    report: dict[str, Any] = {
        "stage": "int4",
        "config": config_to_dict(config),
        "algorithm": config.algorithm,
        "bytes_before": _size(original),
        "bytes_after": _size(model),
        "ops_before": _op_counts(original),
        "ops_after": _op_counts(model),
        "quantized_nodes": _quantized_counts(model),
        "gemm_rewritten": gemms,
        "transposed_weights_folded": [mm for mm, _ in transposed],
        "embeddings_tied_to_matmul": tied,
        "embeddings_quantized": embeddings,
        "fallback_nodes": {n: reasons[n] for n in fallback},
        "fallback_bits": config.fallback_bits,
        "float_matmuls": left_float,
        "sensitivity_sqnr_db": {k: round(v, 2) for k, v in sorted(sensitivity.items(), key=lambda kv: kv[1])},
        "notes": notes,
    }
    if feeds:
        report["fidelity"] = {"samples": len(feeds),
                              "outputs": fidelity_report(compare_sessions(_session(original), session, feeds))}
    report["seconds"] = round(time.perf_counter() - started, 2)
    return StageResult(model, report)


__all__ = ["ALGORITHMS", "Int4Config", "Int4WeightOnly", "collect_hessians", "dequantize_blocks", "gptq_blocks", "gptq_factor",
           "quantize_blocks", "quantize_blocks_mse", "quantize_int4", "rank_sensitivity"]
