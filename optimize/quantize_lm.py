"""4-bit (and mixed 4/8-bit) weights for an exported decoder LM folder: `dlopt quantize lm/ --precision int4 -o lm4/`.

The input is a folder from `dlopt export ... --task text-generation` (onnxruntime-genai's fused graph:
fused QKV MatMuls, GroupQueryAttention, a KV cache, an embedding Gather reading the transposed LM-head
weight when the two are tied). The output is the same folder with MatMul -> MatMulNBits and the
embedding -> GatherBlockQuantized, which onnxruntime-genai loads as it is (genai_config.json and the
tokenizer files are copied; the graph's inputs and outputs do not change).

Why not onnxruntime-genai's own int4 (builder `-p int4`) or ORT's MatMulNBitsQuantizer alone: both round
to nearest (RTN), and on SmolLM2-135M that costs +23-39 % perplexity (issue 22). What dlopt adds:
- GPTQ (dlopt.optimize.int4.gptq: error-compensating, act-order, energy-weighted clip search) on
  asymmetric blocks with real-valued zero points (a GGUF Q4_1 block, min m and step d, is reproduced
  exactly). ORT's fast MatMulNBits CPU kernel takes only uint4 zero points (float ones, HQQ's form, fall
  back to dequantizing every weight per call: 57x slower per decode MatMul on Zen 4), so the integer
  part stays there and the rest rides in the same MatMulNBits as 4-bit rows over the input's block sums
  appended along K (append_offset_blocks);
- the block size chosen by measurement: each candidate size, round-to-nearest on every MatMul at once,
  scored by perplexity on calibration text; the largest block within BLOCK_TOLERANCE of the best wins
  (larger blocks are smaller and never slower);
- mixed 4/8-bit by measured perplexity effect, not by name: each MatMul alone at its 4-bit weights
  (the rest float) is scored by the rise in calibration negative log-likelihood; under `max_size_mb`
  the ones with the largest rise go to 8-bit (ORT's RTN, symmetric; 8-bit error is negligible) while
  the folder fits. The report lists every 8-bit node with its measured effect;
- the embedding: a table tied to the LM head is stored once, as GatherBlockQuantized reading the
  head's own codes (what genai's int4 does too); an untied table is 4-bit on its own;
- fidelity on held-out text (the last calibration window, never calibrated on) through dlopt.metrics'
  LM row: perplexity over FP32's and greedy next-token agreement; the folder must load in
  onnxruntime-genai and generate;
- the LM head computed for the last position only (dlopt.lm.prune_to_last_position: [B, 1, V] logits,
  which onnxruntime-genai reads as its builder's `prune_lm_head`): at prefill the head is ~20 % of the
  MACs of SmolLM2-135M over 128 tokens and generation reads one row. dlopt.lm's sessions (eval, gate,
  a re-quantize) restore every position's logits for perplexity (all_position_logits).

The perplexity runs use one float session whose MatMul weights are overridable graph inputs: every
candidate weight set (a block size, one node at 4 bits) is fed in, no model is rebuilt per measurement.
accuracy_level 4 (int8 activations in MatMulNBits) is what makes the CPU kernel fast; its effect on
perplexity is in the fidelity figure, since that runs the written graph.

Measured (benchmarks/llm.py, SmolLM2-135M, Zen 4 under load 5-16, benchmarks/RESULTS.md): 93.4 MB, perplexity
+2.9 % over the fp32 export (genai int4: +36 %); decode 0.87-0.96x genai int4's tokens/s (the earlier form with a
correction MatMul + Add per MatMulNBits: 0.75-0.91x in the same runs), prefill 1.10-1.12x genai's (the appended
K costs int8 compute there). Integer zero points alone (float_offsets=False) decode as fast as genai's int4
and lose 12-42 % perplexity on this model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError, StageError, VerificationError
from dlopt.lm import (
    all_position_logits,
    lm_fidelity,
    prefill_feeds,
    prune_to_last_position,
    read_genai_config,
    read_text_tokens,
)
from dlopt.lm import windows as _windows

BLOCK_SIZES = (32, 64, 128)
MIN_EFFECT_PCT = 0.05  # a layer goes to 8-bit only if alone at 4 bits it raises calibration perplexity by more:
#                        below, the measurement is at its noise (SmolLM2's Q4_1-grid layers measure 0.000 %)
BLOCK_TOLERANCE = 0.005  # a larger block is chosen when its calibration perplexity is within 0.5 % of the best
MAX_INDICATOR_BYTES = 64 * 1024  # block sums by a MatMul with a 0/1 indicator up to this size (K=576: 41 kB, stays
#                                   in L2), by Reshape -> ReduceSum above it (K=1536: 295 kB, would stream per call)
MODEL_FILES = ("model.onnx", "model.onnx.data")
REPORT_NAME = "quantize.json"


@dataclass(frozen=True, kw_only=True)
class QuantizeLm:
    """How an exported LM folder is quantized (`dlopt quantize LM_FOLDER --precision int4`)."""

    VERSION = 3  # 3: the LM head's finer 4-bit rung (head_block_size); 2: fractional zero points as appended
    #              offset blocks (was: separate correction MatMuls)
    block_size: int | None = None  # weights per scale along K; None: chosen by measurement from BLOCK_SIZES
    algorithm: str = "auto"  # auto: gptq with calibration text, else rtn; gptq | rtn
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (the fast CPU path), 0 = float
    max_size_mb: float | None = None  # folder weight budget (model.onnx + data, MB = 1e6 bytes); with it, the
    #                                   MatMuls with the largest measured perplexity effect go to 8-bit
    fallback_bits: int = 8
    fallback_block_size: int = 64  # 8-bit blocks (ORT's 8-bit kernel: block 64 is 30 % faster than 32 on Zen 4)
    head_block_size: int | None = 16  # the LM head's rung between 8-bit and the model's block: 4-bit in these
    #                                   smaller blocks, chosen under max_size_mb when the 8-bit head does not fit
    #                                   and it measures a smaller perplexity effect (SmolLM2: the 8-bit head is
    #                                   +10.9 MB, 104 MB in all; blocks of 16 +4.8 MB); None: no such rung
    quantize_embeddings: bool = True
    float_offsets: bool = True  # zero points with a fractional part: the integer part in MatMulNBits (its fast
    #                             kernel takes only uint4 ones), the rest as 4-bit weights over the input's block
    #                             sums appended along K (see append_offset_blocks); False: integer zero points only
    offset_stages: int = 1  # residual stages of those appended weights (append_offset_blocks)
    window: int = 256  # tokens per calibration window
    calibration_windows: int = 16  # windows GPTQ builds its Hessians from
    sensitivity_windows: int = 2  # windows each perplexity measurement runs (block size, per-node effect)
    holdout_windows: int = 2  # windows after the calibration ones, held out for the fidelity figure


def check_config(config: QuantizeLm) -> None:
    if config.block_size is not None and (config.block_size < 16 or config.block_size & (config.block_size - 1)):
        raise InputError(f"the block size must be a power of two >= 16, got {config.block_size}", "e.g. 32")
    if config.algorithm not in ("auto", "gptq", "rtn"):
        raise InputError(
            f"int4 for LM folders runs gptq or rtn, not {config.algorithm!r}", "use gptq (with text) or rtn"
        )
    if config.accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(
            f"accuracy_level must be 0-4, got {config.accuracy_level}", "4 (int8 compute) is the fast CPU path"
        )
    head_block = config.head_block_size
    if head_block is not None and (head_block < 16 or head_block & (head_block - 1)):
        raise InputError(f"the head block size must be a power of two >= 16, got {head_block}", "e.g. 16")
    if config.max_size_mb is not None and config.max_size_mb <= 0:
        raise InputError(f"--max-size must be positive, got {config.max_size_mb}", "a size in MB, e.g. 100")
    if not 1 <= config.offset_stages <= 3:
        raise InputError(f"offset_stages must be 1-3, got {config.offset_stages}", "1 (the fast form) or 2")
    if config.fallback_bits != 8:
        raise InputError(f"the fallback precision is 8-bit, not {config.fallback_bits}", "leave fallback_bits at 8")
    if config.window < 8 or config.calibration_windows < 1 or config.sensitivity_windows < 1:
        raise InputError("calibration windows must be at least 1 and 8 tokens long", "keep the defaults")


def read_calibration(folder: Path, calibration: str | os.PathLike | np.ndarray | None) -> np.ndarray | None:
    """Calibration token ids: a UTF-8 text file (tokenized by the folder's tokenizer) or token ids."""
    if calibration is None or isinstance(calibration, np.ndarray):
        return None if calibration is None else calibration.astype(np.int64).reshape(-1)
    return read_text_tokens(folder, calibration, "calibration text")


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of next-token negative log-likelihoods of ids[1:] under logits[:-1]."""
    x = logits[0, :-1].astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    return float(np.sum(logz - x[np.arange(x.shape[0]), ids[1:]]))


class WeightProbe:
    """One float session of the LM whose MatMul weights are overridable inputs: the calibration
    perplexity of any set of replaced weights, without rebuilding the model."""

    def __init__(self, model, weights: dict[str, str], windows: list[np.ndarray], head_size: int):
        import onnx

        from dlopt.sessions import cpu_session

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        inits = {t.name: t for t in probe.graph.initializer}
        for name in sorted(set(weights.values())):
            probe.graph.input.append(
                onnx.helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims))
            )
        keep = [o for o in probe.graph.output if o.name == "logits"]
        probe.graph.ClearField("output")
        probe.graph.output.extend(keep)
        self.session = cpu_session(probe, error=StageError, hint="report this model")
        self.windows = windows
        self.feeds = [prefill_feeds(model, w, head_size) for w in windows]
        self.tokens = sum(w.shape[0] - 1 for w in windows)

    def nll(self, replaced: dict[str, np.ndarray] | None = None) -> float:
        """Mean next-token NLL per token over the windows, with `replaced` (initializer -> array) fed."""
        total = 0.0
        for ids, feeds in zip(self.windows, self.feeds):
            (logits,) = self.session.run(["logits"], {**feeds, **(replaced or {})})
            total += _nll(logits, ids)
        return total / self.tokens


# -- block quantization of one MatMul weight ---------------------------------------------------------
def _transposed(w: np.ndarray, block: int) -> np.ndarray:
    k = w.shape[0]
    return np.ascontiguousarray(np.pad(w, ((0, (-k) % block), (0, 0))).T)  # [N, K'], blocks along K


def _dequantized(codes: tuple[np.ndarray, np.ndarray, np.ndarray], k: int, block: int) -> np.ndarray:
    from dlopt.optimize.int4 import dequantize_blocks

    return np.ascontiguousarray(dequantize_blocks(*codes, block).T[:k])


def _nbits_bytes(k: int, n: int, bits: int, block: int, zero_points: bool) -> int:
    """Bytes of one MatMulNBits' initializers: codes, fp32 scales, packed zero points."""
    blocks = -(-k // block)
    zp = n * -(-blocks * bits // 8) if zero_points else 0
    return n * blocks * (block * bits // 8) + n * blocks * 4 + zp


# -- the pass ----------------------------------------------------------------------------------------
def _offset_bytes(k: int, n: int, block: int, stages: int) -> int:
    """Bytes that append_offset_blocks adds to one MatMulNBits: `stages` runs of K/block rows, whole blocks."""
    per = -(-(k // block) // block) * block
    return _nbits_bytes(k + stages * per, n, 4, block, True) - _nbits_bytes(k, n, 4, block, True)


def serialized_bytes(model) -> int:
    """What `model` takes on disk as quantize_lm_folder saves it: the proto plus, for each tensor moved to
    model.onnx.data (raw data of 1024 bytes or more), its location entry (~54 bytes on SmolLM2; 64 counted)."""
    external = sum(1 for t in model.graph.initializer if len(t.raw_data) >= 1024)
    return model.ByteSize() + 64 * external


def _tied_head(model, matmuls: list[Any]) -> tuple[Any, Any] | None:
    """(the LM-head MatMul, the embedding Gather) when the Gather reads Transpose(head weight)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    by_weight = {n.input[1]: n for n in matmuls}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in producers:
            continue
        tr = producers[node.input[0]]
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0])
        if tr.op_type == "Transpose" and perm == [1, 0] and tr.input[0] in by_weight:
            return by_weight[tr.input[0]], node
    return None


def _integer_zero_points(
    q: np.ndarray, scale: np.ndarray, zp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Split real zero points into MatMulNBits' uint4 ones and the per-block remainder in weight units:
    (q - zp)·s = (q - z)·s + offset with z = round(zp) in [0, 15], offset = (z - zp)·s [N, blocks]."""
    if zp.dtype == np.uint8:
        return q, scale, zp, None
    z = np.clip(np.round(zp), 0, 15)
    offset = ((z - zp) * scale).astype(np.float32)
    return q, scale, z.astype(np.uint8), offset if np.any(offset) else None


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of pack_nibbles along the last axis: the first `count` 4-bit values, low nibble first."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 15, packed >> 4
    return out[..., :count]


def _offset_weights(offset: np.ndarray, block: int, stages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit codes of the appended rows that carry `offset` [N, nb] (blocks of the weight along K).

    Stage s holds the residual left by stages < s, in whole blocks of its own (its own scales): stage s
    occupies rows [s·P, s·P + nb) of the appended part, P = nb rounded up to a whole block, the rest of its
    blocks zero (codes at the zero point). Returns (codes uint8 [N, S·P], scales [N, S·P/block], zero
    points uint8 [N, S·P/block]) for `stages` = S."""
    from dlopt.optimize.int4 import dequantize_blocks
    from dlopt.optimize.int4.blocks import quantize_blocks_mse

    n, nb = offset.shape
    per = -(-nb // block) * block
    residual = offset.astype(np.float32)
    parts = []
    for _ in range(stages):
        padded = np.pad(residual, ((0, 0), (0, per - nb)))
        q, scale, zp = quantize_blocks_mse(padded, block, False)  # the clip of least squared error
        residual = residual - dequantize_blocks(q, scale, zp, block)[:, :nb]
        parts.append((q, scale, zp))
    q, scale, zp = (np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
    return q, scale, zp


def append_offset_blocks(model, offsets: dict[str, np.ndarray], block: int, stages: int = 1) -> list[str]:
    """Fold the fractional zero points' offsets into the MatMulNBits themselves: x @ W = [x, S(x)] @ [W_int; E].

    Why: ORT 1.32's MatMulNBits CPU kernel runs its fast int8 path only with uint4 zero points; with float
    zero points (HQQ's form) it dequantizes every weight on every call (decode MatMul K=576, N=1536: 1.6 ms
    vs 28 us on Zen 4). A real zero point z + f equals the integer z in the kernel plus a constant offset
    (z - zp)·scale on each block's weights, and a constant on a block contributes offset · S_b(x), the
    sum of x over the block. Appending the nb = K/block block sums to the input and the offsets as nb more
    rows of weights (4-bit, in blocks of their own: E) keeps one MatMulNBits per MatMul. The earlier form,
    a separate fp32 MatMul over the block sums plus an Add per MatMulNBits, read 1/8 byte per weight more
    at each decode step (+25 % over the 4-bit codes and scales) and doubled the node count: 0.8x genai
    int4's decode tokens/s on Zen 4; this form adds nb·S/K (3-6 %) to K. The offsets' own 4-bit rounding
    is undone by `stages` residual stages (the block sums appended once per stage), see _offset_weights.

    Each distinct input gets one Reshape -> ReduceSum (the block sums) -> [Pad] -> Concat, shared by the
    MatMulNBits that read it (fused QKV; gate and up). A tied embedding reading the head's codes through
    GatherBlockQuantized (_share_tied_tables) gets the head's offsets added to the rows it looks up.
    Returns the names of the MatMuls (without _Q4) given offsets."""
    from onnx import numpy_helper

    from dlopt.optimize.int4.blocks import pack_nibbles
    from dlopt.optimize.int4.graph import attribute_value, initializers_by_name

    by_name = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = initializers_by_name(model)
    augmented: dict[str, str] = {}
    done = []
    for name, offset in offsets.items():
        node = by_name.get(f"{name}_Q4")
        if node is None or attribute_value(node, "K", 0) % block or attribute_value(node, "block_size", 0) != block:
            continue  # a padded K has no whole block sums: keep integer zero points there
        k, n = attribute_value(node, "K", 0), attribute_value(node, "N", 0)
        nb = k // block
        per = -(-nb // block) * block
        x = node.input[0]
        if x not in augmented:
            augmented[x] = f"{x}__with_block_sums"
            new = _block_sum_nodes(model, x, augmented[x], k, block, stages)
            position = list(model.graph.node).index(node)
            for i, added in enumerate(new):
                model.graph.node.insert(position + i, added)
        q_off, s_off, z_off = _offset_weights(offset, block, stages)
        codes, scales, zeros = (inits[i] for i in node.input[1:4])
        blocks = k // block
        b = numpy_helper.to_array(codes).reshape(n, blocks, block // 2)
        s = numpy_helper.to_array(scales).reshape(n, blocks)
        z = _unpack_nibbles(numpy_helper.to_array(zeros).reshape(n, -1), blocks)
        extra = q_off.shape[1] // block
        # the last stage's tail past nb is zero input: its codes sit at the zero point and are never read
        # beyond K' (the kernel pads the last block), so K' = K + (S-1)·P + nb
        b = np.concatenate([b, pack_nibbles(q_off.reshape(n, extra, block))], axis=1)
        s = np.concatenate([s, s_off], axis=1)
        z = pack_nibbles(np.concatenate([z, z_off], axis=1))
        for proto, array in ((codes, b), (scales, s.reshape(-1)), (zeros, z.reshape(-1))):
            proto.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), proto.name))
        node.input[0] = augmented[x]
        for a in node.attribute:
            if a.name == "K":
                a.i = k + (stages - 1) * per + nb
        tied = [  # a tied embedding reading these codes through a Reshape
            g
            for g in model.graph.node
            if g.op_type == "GatherBlockQuantized"
            and g.input[0] in producers
            and producers[g.input[0]].op_type == "Reshape"
            and producers[g.input[0]].input[0] == codes.name
        ]
        for gather in tied:
            _tied_embedding_offsets(model, gather, producers, k, block, blocks + extra, nb, per, stages)
        done.append(name)
    return done


def _block_sum_nodes(model, x: str, out: str, k: int, block: int, stages: int) -> list[Any]:
    """Nodes computing `out` = [x, S(x) (stage 1), ..., S(x) (stage S)], S(x) the K/block block sums of x,
    each stage but the last zero-padded to whole blocks.

    Small K: one MatMul of x with a 0/1 indicator [K, appended width] (shared by every input of that K),
    then a Concat: two nodes. Decode runs ~120 of these per token, and per-node overhead is what costs
    there (SmolLM2, Zen 4, 1 thread: decode time 1.09x -> 0.99x genai int4's against Reshape -> ReduceSum
    -> Concat). Large K (indicator over MAX_INDICATOR_BYTES, e.g. the MLP's down projection): Reshape ->
    ReduceSum [-> Pad] -> Concat, which reads only x."""
    from onnx import helper, numpy_helper

    nb = k // block
    per = -(-nb // block) * block
    width = (stages - 1) * per + nb
    p = f"{x}__block_sums"
    if k * width * 4 <= MAX_INDICATOR_BYTES:
        name = f"block_sum_indicator_k{k}_b{block}_s{stages}"
        if not any(t.name == name for t in model.graph.initializer):
            indicator = np.zeros((k, width), np.float32)
            for stage in range(stages):
                indicator[np.arange(k), stage * per + np.arange(k) // block] = 1.0
            model.graph.initializer.append(numpy_helper.from_array(indicator, name))
        return [
            helper.make_node("MatMul", [x, name], [p], name=p),
            helper.make_node("Concat", [x, p], [out], name=f"{p}_concat", axis=-1),
        ]
    consts = [
        numpy_helper.from_array(np.array([0, 0, nb, block], np.int64), f"{p}_shape"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{p}_axes"),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, per - nb], np.int64), f"{p}_pads"),
    ]
    model.graph.initializer.extend(consts)
    new = [
        helper.make_node("Reshape", [x, consts[0].name], [f"{p}_blocks"], name=f"{p}_reshape"),
        helper.make_node("ReduceSum", [f"{p}_blocks", consts[1].name], [p], name=p, keepdims=0),
    ]
    stage_input = p
    if stages > 1 and per > nb:  # every stage but the last fills whole blocks
        new.append(helper.make_node("Pad", [p, consts[2].name], [f"{p}_padded"], name=f"{p}_pad"))
        stage_input = f"{p}_padded"
    new.append(helper.make_node("Concat", [x] + [stage_input] * (stages - 1) + [p], [out], name=f"{p}_concat", axis=-1))
    return new


def _tied_embedding_offsets(
    model, gather, producers: dict[str, Any], k: int, block: int, blocks: int, nb: int, per: int, stages: int
) -> None:
    """GatherBlockQuantized over the head's appended codes: its rows are [K integer-part weights | the offset
    rows]. Each looked-up row becomes its first K values plus, at each k, the offset rows of k's block,
    summed over the stages (a Gather of those columns and a ReduceSum)."""
    from onnx import helper, numpy_helper

    from dlopt.optimize.int4.graph import initializers_by_name

    inits = initializers_by_name(model)
    per_row = {0: blocks * block // 2, 2: blocks, 3: -(-blocks // 2)}  # inputs: codes, ids, scales, zero points
    for slot in (0, 2, 3):
        shape = inits[producers[gather.input[slot]].input[1]]
        rows = int(numpy_helper.to_array(shape)[0])
        shape.CopyFrom(numpy_helper.from_array(np.array([rows, per_row[slot]], np.int64), shape.name))
    out = gather.output[0]
    p = f"{gather.name}__offsets"
    columns = k + np.arange(stages)[:, None] * per + (np.arange(k) // block)[None, :]  # [S, K]
    consts = [
        numpy_helper.from_array(np.array([0], np.int64), f"{p}_start"),
        numpy_helper.from_array(np.array([k], np.int64), f"{p}_end"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{p}_axis"),
        numpy_helper.from_array(columns[0] if stages == 1 else columns, f"{p}_columns"),
        numpy_helper.from_array(np.array([-2], np.int64), f"{p}_stage_axis"),
    ]
    model.graph.initializer.extend(consts)
    gather.output[0] = f"{out}__with_offsets"
    rows = gather.output[0]
    new = [
        helper.make_node("Slice", [rows, *(c.name for c in consts[:3])], [f"{p}_integer"], name=f"{p}_slice"),
        helper.make_node("Gather", [rows, consts[3].name], [f"{p}_per_weight"], name=f"{p}_gather", axis=-1),
    ]
    added = f"{p}_per_weight"
    if stages > 1:
        new.append(helper.make_node("ReduceSum", [added, consts[4].name], [f"{p}_sum"], name=f"{p}_stages", keepdims=0))
        added = f"{p}_sum"
    new.append(helper.make_node("Add", [f"{p}_integer", added], [out], name=f"{p}_add"))
    position = list(model.graph.node).index(gather) + 1
    for i, node in enumerate(new):
        model.graph.node.insert(position + i, node)


def _layer_groups(matmuls: list[Any]) -> dict[str, list[Any]]:
    """The MatMuls by decoder layer (`/model/layers.N/...` in the genai graph); others (the LM head) alone."""
    import re

    groups: dict[str, list[Any]] = {}
    for node in matmuls:
        found = re.search(r"layers\.(\d+)/", node.name)
        groups.setdefault(f"layer {found.group(1)}" if found else node.name.strip("/").split("/")[0], []).append(node)
    return groups


def quantize_lm_model(
    model,
    config: QuantizeLm,
    tokens: np.ndarray | None,
    head_size: int,
    *,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[Any, dict[str, Any]]:
    """Quantize the genai decoder `model` (an onnx.ModelProto with its weights loaded; not modified).
    Returns the quantized model and the report."""
    import onnx
    from onnx import numpy_helper

    from dlopt.optimize.int4 import Int4WeightOnly, collect_hessians, gptq_blocks, quantize_blocks
    from dlopt.optimize.int4.blocks import quantize_blocks_float, quantize_embedding
    from dlopt.optimize.int4.gptq import write_matmul_nbits
    from dlopt.optimize.int4.graph import (
        drop_unused_initializers,
        embedding_gathers,
        ensure_ms_opset,
        initializers_by_name,
        name_nodes,
        share_tied_tables,
        weight_matmuls,
    )
    from dlopt.optimize.int4.ort import ort_matmul_nbits, quiet_ort_quantizer
    from dlopt.optimize.rounding import gptq_factor

    check_config(config)
    started = time.perf_counter()
    original = all_position_logits(model)  # calibration reads every position's logits
    model = onnx.ModelProto()
    model.CopyFrom(original)
    name_nodes(model)
    matmuls = weight_matmuls(model)
    if not matmuls:
        raise InputError("the LM graph has no MatMul with a constant weight to quantize", "export the folder again")
    inits = initializers_by_name(model)
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in matmuls}
    notes: list[str] = []
    algorithm = config.algorithm
    if algorithm == "auto":
        algorithm = "gptq" if tokens is not None else "rtn"
        if tokens is None:
            notes.append(
                "no calibration text: round-to-nearest, block size "
                f"{config.block_size or BLOCK_SIZES[0]}, no 8-bit layers (GPTQ and both choices need text)"
            )
    if tokens is None and (algorithm == "gptq" or config.max_size_mb is not None):
        raise InputError(
            "GPTQ and --max-size measure perplexity on calibration text, and there is none",
            "pass --calibration TEXT.txt (UTF-8 text like the model's inputs)",
        )

    windows: list[np.ndarray] = []
    holdout: list[np.ndarray] = []
    if tokens is not None:
        all_windows = _windows(tokens, config.window)
        need = max(config.calibration_windows, config.sensitivity_windows)
        if len(all_windows) < min(need, 2) + 1:
            raise InputError(
                f"the calibration text has {tokens.shape[0]} tokens, too few for "
                f"{min(need, 2) + 1} windows of {config.window}",
                f"give at least {(need + config.holdout_windows) * config.window} tokens of text",
            )
        held = min(config.holdout_windows, max(1, len(all_windows) // 5))
        windows, holdout = all_windows[:-held], all_windows[-held:]
        if len(windows) < need:
            notes.append(
                f"calibration text gives {len(windows)} windows of {config.window} tokens "
                f"(+{held} held out), fewer than the {need} asked for"
            )

    tied = _tied_head(model, matmuls) if config.quantize_embeddings else None
    probe = None
    measured: dict[str, Any] = {}
    block = config.block_size or BLOCK_SIZES[0]
    if tokens is not None:
        log(f"calibration: {len(windows)} windows of {config.window} tokens; held out: {len(holdout)}")
        probe = WeightProbe(
            model, {n.name: n.input[1] for n in matmuls}, windows[: config.sensitivity_windows], head_size
        )
        base_nll = probe.nll()
        measured["float_perplexity"] = math.exp(base_nll)
        log(f"calibration perplexity at FP32: {measured['float_perplexity']:.3f}")
        if config.block_size is None:
            scores = {}
            for size in BLOCK_SIZES:
                if any(w.shape[0] % size for w in weights.values()) and size != BLOCK_SIZES[0]:
                    continue
                replaced = {}
                for node in matmuls:
                    w = weights[node.name]
                    wt = _transposed(w, size)
                    grid = quantize_blocks_float(wt, size) if config.float_offsets else quantize_blocks(wt, size, False)
                    replaced[node.input[1]] = _dequantized(grid, w.shape[0], size)
                scores[size] = math.exp(probe.nll(replaced))
                log(f"block size {size}: calibration perplexity {scores[size]:.3f} with every MatMul at 4 bits (RTN)")
            best = min(scores.values())
            block = max(s for s, p in scores.items() if p <= best * (1 + BLOCK_TOLERANCE))
            measured["block_size_perplexity_rtn"] = {str(k): round(v, 4) for k, v in scores.items()}
            measured["block_size_rule"] = (
                f"the largest block within {BLOCK_TOLERANCE:.1%} of the lowest calibration "
                "perplexity (RTN, every MatMul at 4 bits)"
            )
    four_config = Int4WeightOnly(
        block_size=block,
        symmetric=False,
        algorithm="gptq" if algorithm == "gptq" else "rtn",
        accuracy_level=config.accuracy_level or None,
        quantize_embeddings=False,
    )

    # the 4-bit codes of every MatMul (GPTQ from one streamed pass of Hessians, or RTN). A tied head keeps
    # its fractional zero points too: the embedding's GatherBlockQuantized reads its codes and integer zero
    # points, and append_offset_blocks adds the rest to the rows it looks up
    floating = {n.name for n in matmuls if config.float_offsets}
    codes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    # the LM head's finer rung (a candidate only with a size budget, which measures it): its codes beside the
    # model block's. The head: the one MatMul outside the decoder layers (the tied one, when tied)
    outside = [n for key, nodes in _layer_groups(matmuls).items() if not key.startswith("layer ") for n in nodes]
    head_node = tied[0] if tied is not None else (outside[0] if len(outside) == 1 else None)
    fine = config.head_block_size
    fine_codes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if (
        config.max_size_mb is None
        or head_node is None
        or fine is None
        or fine >= block
        or weights[head_node.name].shape[0] % block  # whole blocks of both sizes: one Hessian factor serves
    ):
        fine = None

    def code_sizes(node) -> list[tuple[int, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]]:
        """The block sizes `node`'s codes are computed in, and where each goes: the model's block, and for the
        head also the finer rung's (fine_codes; its rows are whole blocks of both, so no padding differs)."""
        head = fine is not None and head_node is not None and node.name == head_node.name
        return [(block, codes)] + ([(fine, fine_codes)] if head and fine is not None else [])

    # the size estimate (checked before the GPTQ pass, corrected after the build below)
    effects: dict[str, float] = {}
    # bytes of everything but the MatMul weights, as serialized (graph, norms, an untied table at 4 bits)
    other_bytes = model.ByteSize() - sum(w.nbytes for w in weights.values())
    shapes = {name: (int(w.shape[0]), int(w.shape[1])) for name, w in weights.items()}
    size4 = {
        n.name: _nbits_bytes(*shapes[n.name], 4, block, True)
        + (_offset_bytes(*shapes[n.name], block, config.offset_stages) if n.name in floating else 0)
        for n in matmuls
    }
    size8 = {n.name: _nbits_bytes(*shapes[n.name], 8, config.fallback_block_size, False) for n in matmuls}
    if tied is None and config.quantize_embeddings:
        for g in embedding_gathers(model, block)[0]:
            rows, cols = inits[g.input[0]].dims
            other_bytes -= rows * cols * 4 - _nbits_bytes(cols, rows, 4, block, True)
    all_four = other_bytes + sum(size4.values())
    measured["size_estimate_mb"] = {"all_4bit": round(all_four / 1e6, 6)}
    budget = None if config.max_size_mb is None else int(config.max_size_mb * 1e6)
    if budget is not None and all_four > budget:  # before the GPTQ pass: the estimate is below the built size
        raise InputError(
            f"the all-4-bit model is {all_four / 1e6:.1f} MB, over --max-size {config.max_size_mb:g} MB",
            f"raise --max-size to at least {math.ceil(all_four / 1e4) / 100:g}",
        )

    if algorithm == "gptq":
        log(f"GPTQ: Hessians from {len(windows[: config.calibration_windows])} windows")
        feeds = [prefill_feeds(model, w, head_size) for w in windows[: config.calibration_windows]]
        hessians = collect_hessians(model, matmuls, feeds)
        factors: dict[str, Any] = {}
        for node in matmuls:
            w = weights[node.name]
            h = hessians[node.input[0]]
            pad = (-w.shape[0]) % block
            h = np.pad(h, ((0, pad), (0, pad)))
            if node.input[0] not in factors:
                factors.clear()
                factors[node.input[0]] = gptq_factor(h, act_order=True)
            for size, into in code_sizes(node):
                into[node.name] = gptq_blocks(
                    np.pad(w, ((0, pad), (0, 0))),
                    h,
                    size,
                    False,
                    act_order=True,
                    clip_search=True,
                    factor=factors[node.input[0]],
                    float_zero_points=node.name in floating,
                )
        del hessians, factors
    else:
        for node in matmuls:
            for size, into in code_sizes(node):
                wt = _transposed(weights[node.name], size)
                into[node.name] = (
                    quantize_blocks_float(wt, size) if node.name in floating else quantize_blocks(wt, size, False)
                )

    # mixed precision: each node's measured perplexity effect at 4 bits, then 8-bit while the budget allows
    groups = _layer_groups(matmuls)
    fine_effects: dict[str, float] = {}  # the head's finer rung, measured once whatever the ladder's limit

    def ladder(limit: int) -> tuple[dict[str, dict[str, Any]], dict[str, int], dict[str, Any] | None, int]:
        """The ladder under `limit` bytes of estimate: the layers at 8 bits, the MatMuls in blocks other than
        `block` (the LM head's finer rung), the head's form and why, the estimated bytes."""
        eight: dict[str, dict[str, Any]] = {}
        blocks: dict[str, int] = {}
        head_form: dict[str, Any] | None = None
        used = all_four
        ranked = sorted(effects, key=lambda g: -effects[g])
        for rank, key in enumerate(ranked, 1):
            extra = sum(size8[n.name] - size4[n.name] for n in groups[key])
            if (math.exp(effects[key]) - 1) * 100 <= MIN_EFFECT_PCT:
                break
            if (
                used + extra > limit
                and fine is not None
                and head_node is not None
                and fine_codes
                and [n.name for n in groups[key]] == [head_node.name]
            ):
                # the head's rungs: 8-bit > 4-bit in blocks of `fine` > 4-bit in the model's blocks
                name = head_node.name
                fine_size = _nbits_bytes(*shapes[name], 4, fine, True) + (
                    _offset_bytes(*shapes[name], fine, config.offset_stages) if name in floating else 0
                )
                if name not in fine_effects:
                    assert probe is not None
                    replaced = {head_node.input[1]: _dequantized(fine_codes[name], shapes[name][0], fine)}
                    fine_effects[name] = probe.nll(replaced) - base
                fine_effect = fine_effects[name]
                pct, fine_pct = ((math.exp(e) - 1) * 100 for e in (effects[key], fine_effect))
                fits = used + fine_size - size4[name] <= limit
                better = fine_effect < effects[key]
                head_form = {
                    "form": f"4-bit blocks of {fine if fits and better else block}",
                    "perplexity_effect_pct": {f"4-bit b{block}": round(pct, 3), f"4-bit b{fine}": round(fine_pct, 3)},
                    "extra_mb": {
                        "8-bit": round(extra / 1e6, 6),
                        f"4-bit b{fine}": round((fine_size - size4[name]) / 1e6, 6),
                    },
                }
                if fits and better:
                    head_form["why"] = (
                        f"8-bit does not fit the budget (+{extra / 1e6:.3g} MB); 4-bit in blocks of {fine} does "
                        f"(+{(fine_size - size4[name]) / 1e6:.3g} MB) and measures {fine_pct:.2f} % against "
                        f"{pct:.2f} % in blocks of {block}"
                    )
                    used += fine_size - size4[name]
                    blocks[name] = fine
                else:
                    head_form["why"] = (
                        f"neither 8-bit (+{extra / 1e6:.2f} MB) nor 4-bit in blocks of {fine} fits the budget"
                        if not fits
                        else f"4-bit in blocks of {fine} measures no lower ({fine_pct:.2f} % vs {pct:.2f} %)"
                    )
                continue
            if used + extra <= limit:
                used += extra
                pct = (math.exp(effects[key]) - 1) * 100
                eight[key] = {
                    "matmuls": [n.name for n in groups[key]],
                    "perplexity_effect_pct": round(pct, 3),
                    "extra_mb": round(extra / 1e6, 2),
                    "why": f"its MatMuls alone at 4 bits raise calibration perplexity by {pct:.2f} %, "
                    f"rank {rank} of {len(ranked)} layers; fits the budget",
                }
        return eight, blocks, head_form, used

    template = model  # the graph before the build (build() changes a copy of it under a budget)

    def build(model):
        """The graph for the ladder's choice, built on `model` (changed in place): MatMulNBits (4-bit codes as
        chosen; 8-bit by ORT), the tied embedding reading the head's codes, the offset rows appended."""
        eight_nodes = {name for group in eight.values() for name in group["matmuls"]}
        four = {n.name for n in matmuls if n.name not in eight_nodes}
        chosen = {name: fine_codes[name] if name in blocks else codes[name] for name in four}
        table_name = None
        if tied is not None:
            head, gather = tied
            table_name = f"{head.input[1]}__table"  # a float copy only until the head is quantized, then dropped
            model.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weights[head.name].T), table_name)
            )
            gather = next(n for n in model.graph.node if n.name == gather.name)  # `model` may be a copy
            transpose = gather.input[0]
            gather.input[0] = table_name
            if not any(transpose in n.input for n in model.graph.node):  # the float head weight's last other reader
                model.graph.node.remove(next(n for n in model.graph.node if transpose in n.output))
        with quiet_ort_quantizer():
            integer = {name: _integer_zero_points(*chosen[name]) for name in four}
            offsets: dict[int, dict[str, np.ndarray]] = {}  # by block size
            for size in sorted({blocks.get(name, block) for name in four}, reverse=True):
                some = {name for name in four if blocks.get(name, block) == size}
                model = write_matmul_nbits(
                    model,
                    some,
                    dataclasses.replace(four_config, block_size=size),
                    lambda node, wt: integer[node.name][:3],
                )
                for name in some:
                    offset = integer[name][3]
                    if offset is not None:
                        offsets.setdefault(size, {})[name] = offset
            if eight:
                eight_config = dataclasses.replace(
                    four_config, block_size=config.fallback_block_size, symmetric=True, accuracy_level=4
                )  # 8-bit without int8 compute is 70x slower on CPU
                model = ort_matmul_nbits(
                    model,
                    bits=8,
                    config=eight_config,
                    include=eight_nodes,
                    all_matmuls={n.name for n in weight_matmuls(model)},
                )
        embeddings: list[str] = []
        if tied is not None:
            assert table_name is not None
            embeddings = share_tied_tables(model, [(tied[0].name, table_name)], set())
            if not embeddings:
                raise StageError("the tied embedding could not share the LM head's codes", "report this model")
        elif config.quantize_embeddings:
            for node in embedding_gathers(model, block)[0]:
                quantize_embedding(model, node, block, False, clip_search=False)
                embeddings.append(node.name)
        # after the tied embedding shares the head's codes: the head's appended offset rows reach its rows too
        corrected = [
            name
            for size, some in offsets.items()
            for name in append_offset_blocks(model, some, size, config.offset_stages)
        ]
        ensure_ms_opset(model)
        drop_unused_initializers(model)
        # the head on the last position, as written (the held-out check reads every position's logits through
        # lm_session, which restores them in memory)
        last_position = prune_to_last_position(model)
        return model, eight_nodes, four, embeddings, corrected, last_position

    def measured_build() -> tuple[Any, int]:
        """The ladder's choice built on a copy of `template`, and its size as written."""
        built = onnx.ModelProto()
        built.CopyFrom(template)
        parts = build(built)
        return parts, serialized_bytes(parts[0])

    # The estimate leaves out the new nodes, names and the block sums' indicators (~0.24 MB on SmolLM2's 620
    # nodes, 17 kB on the tiny test model). So under a budget the all-4-bit graph is built first and the ladder
    # runs on the estimate corrected by what it left out; the chosen graph is measured too, and over the budget
    # the ladder runs again under a limit lowered by the overshoot (one rung less) rather than refusing at the
    # end, after the GPTQ pass.
    eight: dict[str, dict[str, Any]] = {}
    blocks: dict[str, int] = {}
    head_form: dict[str, Any] | None = None
    if budget is None:
        model, eight_nodes, four, embeddings, corrected, last_position = build(model)
    else:
        assert probe is not None
        built, actual = measured_build()
        measured["size_estimate_mb"].update(all_4bit_built=round(actual / 1e6, 6), budget=config.max_size_mb)
        if actual > budget:
            raise InputError(
                f"the all-4-bit model is {actual / 1e6:.3f} MB, over --max-size {config.max_size_mb:g} MB",
                f"raise --max-size to at least {math.ceil(actual / 1e4) / 100:g}",
            )
        log(f"measuring the perplexity effect of each of {len(groups)} layers at 4 bits")
        base = probe.nll()
        for key, nodes in groups.items():
            replaced = {n.input[1]: _dequantized(codes[n.name], weights[n.name].shape[0], block) for n in nodes}
            effects[key] = probe.nll(replaced) - base
        limit = budget - (actual - all_four)
        for attempt in range(4):
            eight, blocks, head_form, used = ladder(limit)
            measured["size_estimate_mb"].update(chosen=round((used + actual - all_four) / 1e6, 6))
            if not eight and not blocks:
                break  # the all-4-bit graph, built and measured above
            chosen_built, chosen_actual = measured_build()
            if chosen_actual <= budget or attempt == 3:
                built, actual = chosen_built, chosen_actual  # past 3 rebuilds the written size's check refuses
                break
            limit = used - (chosen_actual - budget)
            log(f"built {chosen_actual / 1e6:.3f} MB, over the budget: one rung less")
            measured["size_estimate_mb"].setdefault("rebuilt_over", []).append(round(chosen_actual / 1e6, 6))
        measured["size_estimate_mb"].update(built=round(actual / 1e6, 6))
        model, eight_nodes, four, embeddings, corrected, last_position = built
    left = [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm")
        and n.input[1] in {t.name for t in model.graph.initializer}
        and not n.name.endswith("__block_sums")  # append_offset_blocks' block sums (0/1 indicator), not weights
    ]
    if [o.name for o in model.graph.output] != [o.name for o in original.graph.output]:
        raise StageError("quantization changed the graph outputs", "report this model")
    report: dict[str, Any] = {
        "stage": "int4-lm",
        "config": dataclasses.asdict(config),
        "algorithm": algorithm,
        "block_size": block,
        "symmetric": False,
        "accuracy_level": config.accuracy_level,
        "matmuls": len(matmuls),
        "matmuls_4bit": len(four),
        "layers_8bit": eight,
        "lm_head": head_form or {},
        "matmuls_8bit": sorted(eight_nodes),
        "float_matmuls": left,
        "offset_corrections": len(corrected),
        "embeddings_quantized": embeddings,
        "embedding_tied_to_lm_head": tied is not None,
        "layer_perplexity_effect_pct": {
            k: round((math.exp(v) - 1) * 100, 3) for k, v in sorted(effects.items(), key=lambda kv: -kv[1])
        },
        "measured": measured,
        "notes": notes,
    }
    if holdout:
        fidelity = lm_fidelity(original, model, holdout, head_size)
        report["fidelity"] = {
            **{k: round(v, 5) if isinstance(v, float) else v for k, v in fidelity.items()},
            "text": "held-out calibration text (never calibrated on)",
        }
    report["logits"] = "last position" if last_position else "every position"
    report["seconds"] = round(time.perf_counter() - started, 1)
    return model, report


def _genai_check(folder: Path) -> list[int]:
    """The folder loads in onnxruntime-genai and generates: 8 greedy tokens after a short prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=16, min_length=16)
    generator = og.Generator(model, params)
    generator.append_tokens(np.arange(8, 16, dtype=np.int32)[None])
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def quantize_lm_folder(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    config: QuantizeLm = QuantizeLm(),
    calibration: str | os.PathLike | np.ndarray | None = None,
    *,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Quantize the exported LM FOLDER into the new folder OUTPUT (written atomically: complete or not at all).
    `calibration`: a UTF-8 text file or token ids. Returns the report (also OUTPUT/quantize.json)."""
    import onnx

    from dlopt.fileio import check_output_folder, usual_permissions
    from dlopt.genai import require_genai

    check_config(config)
    src, out = Path(folder), Path(output)
    head_size = int(read_genai_config(src)["model"]["decoder"]["head_size"])
    if src.resolve() == out.resolve():
        raise InputError(f"the output {out} is the input folder", "write the quantized model to a new folder")
    check_output_folder(out)
    require_genai()
    if calibration is None and (config.algorithm == "gptq" or config.max_size_mb is not None):
        raise InputError(
            "GPTQ and --max-size measure perplexity on calibration text, and there is none",
            "pass --calibration TEXT.txt (UTF-8 text like the model's inputs)",
        )
    tokens = read_calibration(src, calibration)
    try:
        model = onnx.load(str(src / "model.onnx"))
    except Exception as e:  # noqa: BLE001 - a damaged file is the input's problem
        raise InputError(f"cannot load {src / 'model.onnx'}: {e}", "export the folder again") from e
    if any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph.node):
        raise InputError(f"{src} is already quantized", "quantize the fp32 export")
    quantized, report = quantize_lm_model(model, config, tokens, head_size, log=log)
    parent = out.parent if str(out.parent) else Path(".")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=parent) as work:
        staged = Path(work) / "lm"
        staged.mkdir()
        for item in src.iterdir():
            if item.is_file() and item.name not in (*MODEL_FILES, "export.json", REPORT_NAME):
                shutil.copy2(item, staged / item.name)
        onnx.save(
            quantized,
            str(staged / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        report["source"] = str(src.resolve())
        report["bytes_before"] = sum((src / f).stat().st_size for f in MODEL_FILES if (src / f).exists())
        report["bytes_after"] = sum((staged / f).stat().st_size for f in MODEL_FILES if (staged / f).exists())
        if config.max_size_mb is not None and report["bytes_after"] > config.max_size_mb * 1e6:
            raise VerificationError(
                f"the quantized model is {report['bytes_after'] / 1e6:.1f} MB, over --max-size "
                f"{config.max_size_mb:g} MB; nothing written",
                "report this model",
            )
        report["genai_greedy_check"] = _genai_check(staged)
        (staged / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        usual_permissions(staged)
        if out.exists():
            out.rmdir()
        os.replace(staged, out)
    return report


def quantize_lm_text(report: dict[str, Any]) -> str:
    lines = [
        f"int4 {report['algorithm']}, asymmetric blocks of {report['block_size']}, accuracy_level "
        f"{report['accuracy_level']}: {report['bytes_before'] / 1e6:.1f} MB -> {report['bytes_after'] / 1e6:.1f} MB; "
        f"{report['matmuls_4bit']} MatMuls 4-bit, {len(report['matmuls_8bit'])} 8-bit"
        + (", embedding tied to the LM head's codes" if report["embedding_tied_to_lm_head"] else "")
    ]
    if report["measured"].get("block_size_perplexity_rtn"):
        lines.append(
            "block size by calibration perplexity (RTN): "
            + ", ".join(f"{k}: {v:.2f}" for k, v in report["measured"]["block_size_perplexity_rtn"].items())
        )
    for name, why in report["layers_8bit"].items():
        lines.append(f"8-bit {name} ({len(why['matmuls'])} MatMuls): {why['why']} (+{why['extra_mb']} MB)")
    if report.get("lm_head"):
        lines.append(f"LM head {report['lm_head']['form']}: {report['lm_head']['why']}")
    if "fidelity" in report:
        f = report["fidelity"]
        lines.append(
            f"held-out text ({f['tokens']} tokens): perplexity {f['perplexity']:.3f} vs FP32 "
            f"{f['fp32_perplexity']:.3f} ({(f['perplexity_ratio'] - 1) * 100:+.2f} %), next-token agreement "
            f"{f['next_token_agreement']:.3f}"
        )
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


__all__ = [
    "BLOCK_SIZES",
    "QuantizeLm",
    "WeightProbe",
    "check_config",
    "quantize_lm_folder",
    "quantize_lm_model",
    "read_calibration",
    "quantize_lm_text",
]
