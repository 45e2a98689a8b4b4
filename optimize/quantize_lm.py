"""4-bit (and mixed 4/8-bit) weights for an exported decoder LM folder: `dlopt quantize lm/ --precision int4 -o lm4/`.

The input is a folder from `dlopt export ... --task text-generation` (onnxruntime-genai's fused graph:
fused QKV MatMuls, GroupQueryAttention, a KV cache, an embedding Gather reading the transposed LM-head
weight when the two are tied). The output is the same folder with MatMul -> MatMulNBits and the
embedding -> GatherBlockQuantized, which onnxruntime-genai loads as it is (genai_config.json and the
tokenizer files are copied; the graph's inputs and outputs do not change).

Why not onnxruntime-genai's own int4 (builder `-p int4`) or ORT's MatMulNBitsQuantizer alone: both round
to nearest (RTN), and on SmolLM2-135M that costs +23-39 % perplexity (issue 22). What dlopt adds:
- GPTQ (dlopt.optimize.int4.gptq: error-compensating, act-order, energy-weighted clip search) on
  asymmetric blocks with integer zero points, the form ORT's fast MatMulNBits CPU kernel runs (float
  zero points, HQQ's form, fall back to dequantizing every weight per call: 57x slower per decode
  MatMul on Zen 4, measured in benchmarks/llm.py's notes);
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
  onnxruntime-genai and generate.

The perplexity runs use one float session whose MatMul weights are overridable graph inputs: every
candidate weight set (a block size, one node at 4 bits) is fed in, no model is rebuilt per measurement.
accuracy_level 4 (int8 activations in MatMulNBits) is what makes the CPU kernel fast; its effect on
perplexity is in the fidelity figure, since that runs the written graph.

Measured (benchmarks/llm.py, SmolLM2-135M, Zen 4 under load, benchmarks/RESULTS.md): 99.8 MB, perplexity
+2.4 % over the fp32 export (genai int4: +36 %), decode 5.1x PyTorch's tokens/s but 0.82x genai int4's: the
fractional zero points' corrections cost decode time; integer zero points alone (float_offsets=False) decode
faster than genai's int4 and lose 12-42 % perplexity on this model.
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
from dlopt.lm import lm_fidelity, prefill_feeds, read_genai_config, read_text_tokens
from dlopt.lm import windows as _windows

BLOCK_SIZES = (32, 64, 128)
MIN_EFFECT_PCT = 0.05  # a layer goes to 8-bit only if alone at 4 bits it raises calibration perplexity by more:
#                        below, the measurement is at its noise (SmolLM2's Q4_1-grid layers measure 0.000 %)
BLOCK_TOLERANCE = 0.005  # a larger block is chosen when its calibration perplexity is within 0.5 % of the best
MODEL_FILES = ("model.onnx", "model.onnx.data")
REPORT_NAME = "quantize.json"


@dataclass(frozen=True, kw_only=True)
class QuantizeLm:
    """How an exported LM folder is quantized (`dlopt quantize LM_FOLDER --precision int4`)."""

    VERSION = 1
    block_size: int | None = None  # weights per scale along K; None: chosen by measurement from BLOCK_SIZES
    algorithm: str = "auto"  # auto: gptq with calibration text, else rtn; gptq | rtn
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (the fast CPU path), 0 = float
    max_size_mb: float | None = None  # folder weight budget (model.onnx + data, MB = 1e6 bytes); with it, the
    #                                   MatMuls with the largest measured perplexity effect go to 8-bit
    fallback_bits: int = 8
    fallback_block_size: int = 64  # 8-bit blocks (ORT's 8-bit kernel: block 64 is 30 % faster than 32 on Zen 4)
    quantize_embeddings: bool = True
    float_offsets: bool = True  # zero points with a fractional part: the integer part in MatMulNBits (its fast
    #                             kernel takes only uint4 ones), the rest as a per-block fp16 correction (see
    #                             add_offset_corrections); False: integer zero points only
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
    if config.max_size_mb is not None and config.max_size_mb <= 0:
        raise InputError(f"--max-size must be positive, got {config.max_size_mb}", "a size in MB, e.g. 100")
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


def add_offset_corrections(model, offsets: dict[str, np.ndarray], block: int) -> list[str]:
    """y = MatMulNBits(x) + BlockSums(x) @ E for the MatMuls in `offsets` (E = offsetᵀ [K/block, N], fp16).

    Why: ORT 1.32's MatMulNBits CPU kernel runs its fast int8 path only with uint4 zero points; with
    float zero points (HQQ's form) it dequantizes every weight on every call (decode MatMul K=576, N=1536:
    1.6 ms vs 28 us on Zen 4). A real zero point z + f is the same as the integer z in the kernel plus a
    constant offset -f·scale on each block's weights, and a constant on a block contributes
    offset · sum(x over the block): one small MatMul over K/block block sums. The block sums are
    computed once per distinct input (q/k/v, gate/up share theirs). Offsets are stored as fp16 (they are
    at most half a step; fp16 keeps them to 1/2000 of that) and cast once when the session loads.
    Returns the names of the MatMulNBits corrected."""
    from onnx import TensorProto, helper, numpy_helper

    by_name = {n.name: n for n in model.graph.node}
    sums: dict[str, str] = {}
    done = []
    for name, offset in offsets.items():
        node = by_name.get(f"{name}_Q4")
        k = next((a.i for a in node.attribute if a.name == "K"), 0) if node is not None else 0
        if node is None or k % block:
            continue  # a padded K has no whole block sums: keep integer zero points there
        x, y = node.input[0], node.output[0]
        nodes = []
        if x not in sums:
            shape = numpy_helper.from_array(np.array([0, 0, k // block, block], np.int64), f"{x}__blocks_shape")
            axes = numpy_helper.from_array(np.array([-1], np.int64), f"{x}__blocks_axes")
            model.graph.initializer.extend([shape, axes])
            nodes += [
                helper.make_node("Reshape", [x, shape.name], [f"{x}__blocks"], name=f"{x}__blocks_reshape"),
                helper.make_node(
                    "ReduceSum", [f"{x}__blocks", axes.name], [f"{x}__block_sums"], name=f"{x}__block_sums", keepdims=0
                ),
            ]
            sums[x] = f"{x}__block_sums"
        table = numpy_helper.from_array(np.ascontiguousarray(offset.T).astype(np.float16), f"{name}__offsets")
        model.graph.initializer.append(table)
        node.output[0] = f"{y}__nbits"
        nodes += [
            helper.make_node(
                "Cast", [table.name], [f"{name}__offsets_f32"], name=f"{name}__offsets_cast", to=TensorProto.FLOAT
            ),
            helper.make_node(
                "MatMul", [sums[x], f"{name}__offsets_f32"], [f"{y}__offset"], name=f"{name}__offset_matmul"
            ),
        ]
        position = list(model.graph.node).index(node)
        for i, new in enumerate(nodes):
            model.graph.node.insert(position + i, new)
        model.graph.node.insert(
            position + len(nodes) + 1,
            helper.make_node("Add", [f"{y}__nbits", f"{y}__offset"], [y], name=f"{name}__offset_add"),
        )
        done.append(name)
    return done


def add_embedding_offsets(model, gather_name: str, head_name: str, block: int) -> bool:
    """The tied embedding's share of the head's fractional zero points: GatherBlockQuantized reads the
    head's codes with their integer zero points, so each looked-up row gets its blocks' offsets added,
    gathered from the head's offset table (the same initializer, [K/block, V]). Once per forward pass,
    on [B, T] tokens: a few small nodes. Returns whether the correction was added."""
    from onnx import helper, numpy_helper

    gather = next((n for n in model.graph.node if n.name == gather_name), None)
    table = f"{head_name}__offsets_f32"
    if gather is None or not any(table in n.output for n in model.graph.node):
        return False
    ids, out = gather.input[1], gather.output[0]
    prefix = f"{gather_name}__offsets"
    expand = numpy_helper.from_array(np.array([1, 1, 1, block], np.int64), f"{prefix}_expand")
    flat = numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{prefix}_flat")
    last = numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}_last")
    model.graph.initializer.extend([expand, flat, last])
    gather.output[0] = f"{out}__integer"
    nodes = [
        helper.make_node("Gather", [table, ids], [f"{prefix}_rows"], name=f"{prefix}_gather", axis=1),
        helper.make_node(
            "Transpose", [f"{prefix}_rows"], [f"{prefix}_btn"], name=f"{prefix}_transpose", perm=[1, 2, 0]
        ),
        helper.make_node("Unsqueeze", [f"{prefix}_btn", last.name], [f"{prefix}_btn1"], name=f"{prefix}_unsqueeze"),
        helper.make_node("Expand", [f"{prefix}_btn1", expand.name], [f"{prefix}_blocks"], name=f"{prefix}_expand"),
        helper.make_node("Reshape", [f"{prefix}_blocks", flat.name], [f"{prefix}_values"], name=f"{prefix}_reshape"),
        helper.make_node("Add", [f"{out}__integer", f"{prefix}_values"], [out], name=f"{prefix}_add"),
    ]
    # the head's Cast of its offsets (an initializer's) moves to the top, so the embedding can read it
    cast = next(n for n in model.graph.node if table in n.output)
    model.graph.node.remove(cast)
    model.graph.node.insert(0, cast)
    position = list(model.graph.node).index(gather) + 1
    for i, new in enumerate(nodes):
        model.graph.node.insert(position + i, new)
    return True


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
    from dlopt.optimize.int4.blocks import _quantize_embedding, quantize_blocks_float
    from dlopt.optimize.int4.gptq import _matmul_nbits_own
    from dlopt.optimize.int4.graph import (
        _drop_unused_initializers,
        _embedding_gathers,
        _ensure_ms_opset,
        _initializers,
        _name_nodes,
        _share_tied_tables,
        _weight_matmuls,
    )
    from dlopt.optimize.int4.ort import _ort_nbits, _quiet_ort_quantizer
    from dlopt.optimize.rounding import gptq_factor

    check_config(config)
    started = time.perf_counter()
    original = model
    model = onnx.ModelProto()
    model.CopyFrom(original)
    _name_nodes(model)
    matmuls = _weight_matmuls(model)
    if not matmuls:
        raise InputError("the LM graph has no MatMul with a constant weight to quantize", "export the folder again")
    inits = _initializers(model)
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
    # points, and add_embedding_offsets adds the rest to the rows it looks up
    floating = {n.name for n in matmuls if config.float_offsets}
    codes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
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
            codes[node.name] = gptq_blocks(
                np.pad(w, ((0, pad), (0, 0))),
                h,
                block,
                False,
                act_order=True,
                clip_search=True,
                factor=factors[node.input[0]],
                float_zero_points=node.name in floating,
            )
        del hessians, factors
    else:
        for node in matmuls:
            wt = _transposed(weights[node.name], block)
            codes[node.name] = (
                quantize_blocks_float(wt, block) if node.name in floating else quantize_blocks(wt, block, False)
            )

    # mixed precision: each node's measured perplexity effect at 4 bits, then 8-bit while the budget allows
    eight: dict[str, dict[str, Any]] = {}
    effects: dict[str, float] = {}
    # bytes of everything but the MatMul weights, as serialized (graph, norms, an untied table at 4 bits)
    other_bytes = model.ByteSize() - sum(w.nbytes for w in weights.values())
    shapes = {name: (int(w.shape[0]), int(w.shape[1])) for name, w in weights.items()}
    size4 = {
        n.name: _nbits_bytes(*shapes[n.name], 4, block, True)
        + (shapes[n.name][0] // block * shapes[n.name][1] * 2 if n.name in floating else 0)  # fp16 offsets
        for n in matmuls
    }
    size8 = {n.name: _nbits_bytes(*shapes[n.name], 8, config.fallback_block_size, False) for n in matmuls}
    if tied is None and config.quantize_embeddings:
        for g in _embedding_gathers(model, block)[0]:
            rows, cols = inits[g.input[0]].dims
            other_bytes -= rows * cols * 4 - _nbits_bytes(cols, rows, 4, block, True)
    all_four = other_bytes + sum(size4.values())
    measured["size_estimate_mb"] = {"all_4bit": round(all_four / 1e6, 3)}
    budget = None if config.max_size_mb is None else int(config.max_size_mb * 1e6)
    if budget is not None:
        if all_four > budget:
            raise InputError(
                f"the all-4-bit model is {all_four / 1e6:.1f} MB, over --max-size {config.max_size_mb:g} MB",
                f"raise --max-size to at least {math.ceil(all_four / 1e4) / 100:g}",
            )
        assert probe is not None
        groups = _layer_groups(matmuls)
        log(f"measuring the perplexity effect of each of {len(groups)} layers at 4 bits")
        base = probe.nll()
        for key, nodes in groups.items():
            replaced = {n.input[1]: _dequantized(codes[n.name], weights[n.name].shape[0], block) for n in nodes}
            effects[key] = probe.nll(replaced) - base
        used = all_four
        ranked = sorted(effects, key=lambda g: -effects[g])
        for rank, key in enumerate(ranked, 1):
            extra = sum(size8[n.name] - size4[n.name] for n in groups[key])
            if (math.exp(effects[key]) - 1) * 100 <= MIN_EFFECT_PCT:
                break
            if used + extra <= budget:
                used += extra
                pct = (math.exp(effects[key]) - 1) * 100
                eight[key] = {
                    "matmuls": [n.name for n in groups[key]],
                    "perplexity_effect_pct": round(pct, 3),
                    "extra_mb": round(extra / 1e6, 2),
                    "why": f"its MatMuls alone at 4 bits raise calibration perplexity by {pct:.2f} %, "
                    f"rank {rank} of {len(ranked)} layers; fits the budget",
                }
        measured["size_estimate_mb"].update(chosen=round(used / 1e6, 3), budget=config.max_size_mb)

    # the graph: MatMulNBits (4-bit codes as chosen; 8-bit by ORT), the tied embedding reading the head's codes
    eight_nodes = {name for group in eight.values() for name in group["matmuls"]}
    four = {n.name for n in matmuls if n.name not in eight_nodes}
    table_name = None
    if tied is not None:
        head, gather = tied
        table_name = f"{head.input[1]}__table"  # a float copy only until the head is quantized, then dropped
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weights[head.name].T), table_name))
        transpose = gather.input[0]
        gather.input[0] = table_name
        if not any(transpose in n.input for n in model.graph.node):  # the float head weight's last other reader
            model.graph.node.remove(next(n for n in model.graph.node if transpose in n.output))
    with _quiet_ort_quantizer():
        integer = {name: _integer_zero_points(*codes[name]) for name in four}
        model = _matmul_nbits_own(model, four, four_config, lambda node, wt: integer[node.name][:3])
        offsets: dict[str, np.ndarray] = {}
        for name in four:
            offset = integer[name][3]
            if offset is not None:
                offsets[name] = offset
        corrected = add_offset_corrections(model, offsets, block)
        if eight:
            eight_config = dataclasses.replace(
                four_config, block_size=config.fallback_block_size, symmetric=True, accuracy_level=4
            )  # 8-bit without int8 compute is 70x slower on CPU
            model = _ort_nbits(
                model,
                bits=8,
                config=eight_config,
                include=eight_nodes,
                all_matmuls={n.name for n in _weight_matmuls(model)},
            )
    embeddings: list[str] = []
    if tied is not None:
        assert table_name is not None
        embeddings = _share_tied_tables(model, [(tied[0].name, table_name)], set())
        if not embeddings:
            raise StageError("the tied embedding could not share the LM head's codes", "report this model")
        if tied[0].name in corrected and not add_embedding_offsets(model, embeddings[0], tied[0].name, block):
            raise StageError("the tied embedding could not read the LM head's offsets", "report this model")
    elif config.quantize_embeddings:
        for node in _embedding_gathers(model, block)[0]:
            _quantize_embedding(model, node, block, False, clip_search=False)
            embeddings.append(node.name)
    _ensure_ms_opset(model)
    _drop_unused_initializers(model)
    left = [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in {t.name for t in model.graph.initializer}
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

    from dlopt.genai import require_genai
    from dlopt.optimize.export_lm import _check_output_folder

    check_config(config)
    src, out = Path(folder), Path(output)
    head_size = int(read_genai_config(src)["model"]["decoder"]["head_size"])
    if src.resolve() == out.resolve():
        raise InputError(f"the output {out} is the input folder", "write the quantized model to a new folder")
    _check_output_folder(out)
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
        if out.exists():
            out.rmdir()
        os.replace(staged, out)
    return report


def summary_text(report: dict[str, Any]) -> str:
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
    "summary_text",
]
