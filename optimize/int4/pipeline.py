"""quantize_int4: the whole int4 pass on a model, with its report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dlopt.errors import InputError, StageError
from dlopt.fidelity import compare_sessions
from dlopt.fidelity import report as fidelity_report
from dlopt.inputs import take_samples
from dlopt.optimize.int4.blocks import quantize_blocks_mse, quantize_embedding
from dlopt.optimize.int4.config import Int4WeightOnly
from dlopt.optimize.int4.gptq import collect_hessians, gptq_blocks, write_matmul_nbits
from dlopt.optimize.int4.graph import (
    attribute_value,
    drop_unused_initializers,
    embedding_gathers,
    ensure_ms_opset,
    fold_transposed_weights,
    gemm_to_matmul,
    initializers_by_name,
    name_nodes,
    share_tied_tables,
    weight_matmuls,
)
from dlopt.optimize.int4.ort import ort_matmul_nbits, quiet_ort_quantizer
from dlopt.optimize.int4.sensitivity import rank_sensitivity, stage_session
from dlopt.optimize.quantize_scheme import check_excluded_nodes
from dlopt.optimize.rounding import gptq_factor
from dlopt.stage import StageResult, config_to_dict


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
            key = f"MatMulNBits({attribute_value(node, 'bits', 4)}-bit)"
        elif node.op_type == "GatherBlockQuantized":
            key = f"GatherBlockQuantized({attribute_value(node, 'bits', 4)}-bit)"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _select_fallback(
    candidates: list[Any], sqnr: dict[str, float], fraction: float, params: dict[str, int]
) -> list[str]:
    """The most sensitive nodes (lowest SQNR) whose weights fit in `fraction` of all candidate weights."""
    budget = fraction * sum(params[n.name] for n in candidates)
    chosen, used = [], 0
    for name in sorted(sqnr, key=lambda n: sqnr[n]):
        if used + params[name] <= budget:
            chosen.append(name)
            used += params[name]
    return chosen


def _why_kept(reason: str, config: Int4WeightOnly) -> str:
    """A fallback reason as a sentence that names the setting behind it."""
    if reason == "keep_first":
        return f"one of the first {config.keep_first} linear layers (keep_first={config.keep_first})"
    if reason == "keep_last":
        return (
            "the last linear layer (keep_last=1, the default: a language model's output head loses the most at 4 bits)"
            if config.keep_last == 1
            else f"one of the last {config.keep_last} linear layers (keep_last={config.keep_last})"
        )
    return (
        f"{reason}: among the most sensitive {config.sensitive_fraction:.0%} of linear weights "
        f"(sensitive_fraction={config.sensitive_fraction:g})"
    )


def _layer_precisions(
    order: list[str], four_bit: set[str], reasons: Mapping[str, str], excluded: list[str], config: Int4WeightOnly
) -> dict[str, Any]:
    """How many linear layers ended at 4 bits, and each one that did not, at what precision and why: what
    the report and the printed summary say instead of a bare "int4"."""
    kept_bits: int | str = 8 if config.fallback_bits == 8 else "float"
    kept = [
        {"node": name, "bits": kept_bits, "why": _why_kept(reasons[name], config)} for name in order if name in reasons
    ]
    kept += [{"node": name, "bits": "float", "why": "excluded (exclude_nodes / exclude_ops)"} for name in excluded]
    return {"linear": len(order) + len(excluded), "four_bit": len([n for n in order if n in four_bit]), "kept": kept}


def quantize_int4(
    model, config: Int4WeightOnly = Int4WeightOnly(), data: Iterable[Mapping[str, np.ndarray]] | None = None
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
    name_nodes(model)

    names = {n.name for n in model.graph.node}
    check_excluded_nodes(config.exclude_nodes, names)
    excluded = set(config.exclude_nodes)
    notes: list[str] = []

    gemms = [] if "Gemm" in config.exclude_ops else gemm_to_matmul(model, excluded)
    transposed = [] if "MatMul" in config.exclude_ops else fold_transposed_weights(model, excluded)
    candidates = [] if "MatMul" in config.exclude_ops else [n for n in weight_matmuls(model) if n.name not in excluded]
    if not candidates:
        raise InputError(
            "int4: the model has no MatMul or Gemm with a constant 2-D float weight to quantize",
            "4-bit weight-only quantization applies to linear layers; use {precision=int8} or fp16",
        )
    feeds = take_samples(data, max(config.sensitivity_samples, config.gptq_samples))
    inits = initializers_by_name(model)
    params = {n.name: int(np.prod(inits[n.input[1]].dims)) for n in candidates}

    fallback: list[str] = []
    reasons: dict[str, str] = {}
    order = [n.name for n in candidates]
    for name in order[: config.keep_first]:
        reasons[name] = "keep_first"
    for name in order[len(order) - config.keep_last :] if config.keep_last else []:
        reasons[name] = "keep_last"
    sensitivity: dict[str, float] = {}
    if config.sensitive_fraction > 0:
        if feeds:
            sensitivity = rank_sensitivity(
                model,
                candidates,
                feeds[: config.sensitivity_samples],
                config.block_size,
                config.symmetric,
                clip_search=config.algorithm == "mse",
            )
            for name in _select_fallback(
                [n for n in candidates if n.name not in reasons],
                {k: v for k, v in sensitivity.items() if k not in reasons},
                config.sensitive_fraction,
                params,
            ):
                reasons[name] = f"sensitive (4-bit SQNR {sensitivity[name]:.1f} dB)"
        else:
            notes.append("no calibration data: nodes were not ranked by sensitivity, all MatMuls are 4-bit")
    fallback = [n for n in order if n in reasons]
    four_bit = {n for n in order if n not in reasons}
    all_matmuls = {n.name for n in weight_matmuls(model)}

    if config.algorithm == "auto":
        config = dataclasses.replace(config, algorithm="gptq" if feeds else "rtn")
        if not feeds:
            notes.append("no calibration data: round-to-nearest; with data, GPTQ (error-compensating) is used")
    if config.algorithm == "gptq" and not feeds:
        raise InputError(
            "int4 algorithm gptq needs calibration data", "pass {calibration=DATA}, or use algorithm rtn or hqq"
        )
    with quiet_ort_quantizer():
        if config.algorithm == "mse":
            model = write_matmul_nbits(
                model, four_bit, config, lambda node, wt: quantize_blocks_mse(wt, config.block_size, config.symmetric)
            )
        elif config.algorithm == "gptq":
            hessians = collect_hessians(
                model, [n for n in candidates if n.name in four_bit], feeds[: config.gptq_samples]
            )

            factors: dict[str, Any] = {}  # q, k and v (gate and up) share an input, hence a factorization

            def solve(node, wt):
                h = hessians[node.input[0]]
                pad = wt.shape[1] - h.shape[0]
                h = np.pad(h, ((0, pad), (0, pad)))  # padded rows are dead: no contribution
                if node.input[0] not in factors:
                    factors.clear()  # consecutive nodes share; keep one factor in memory
                    factors[node.input[0]] = gptq_factor(h, act_order=config.gptq_act_order)
                return gptq_blocks(
                    np.ascontiguousarray(wt.T),
                    h,
                    config.block_size,
                    config.symmetric,
                    act_order=config.gptq_act_order,
                    clip_search=config.gptq_clip_search,
                    factor=factors[node.input[0]],
                )

            model = write_matmul_nbits(model, four_bit, config, solve)
        else:
            model = ort_matmul_nbits(model, bits=4, config=config, include=four_bit, all_matmuls=all_matmuls)
        if config.fallback_bits == 8 and fallback:
            model = ort_matmul_nbits(
                model,
                bits=8,
                config=config,
                include=set(fallback),
                all_matmuls={n.name for n in weight_matmuls(model)},
            )
    if config.accuracy_level:
        for node in model.graph.node:  # HQQ and GPTQ do not set it
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", config.accuracy_level))

    embeddings: list[str] = []
    tied: list[str] = []
    if config.quantize_embeddings and config.share_tied_embeddings and "Gather" not in config.exclude_ops:
        tied = share_tied_tables(model, transposed, excluded)
        embeddings += tied
    if config.quantize_embeddings and "Gather" not in config.exclude_ops:
        block = config.embedding_block_size or config.block_size
        gathers, gather_notes = embedding_gathers(model, block)
        notes += gather_notes
        for node in gathers:
            if node.name in excluded:
                continue
            quantize_embedding(model, node, block, config.symmetric, clip_search=config.algorithm == "mse")
            embeddings.append(node.name)
    ensure_ms_opset(model)
    drop_unused_initializers(model)

    session = stage_session(model)  # must load
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
        "layers": _layer_precisions(order, four_bit, reasons, sorted(all_matmuls - set(order)), config),
        "notes": notes,
    }
    if feeds:
        report["fidelity"] = {
            "samples": len(feeds),
            "outputs": fidelity_report(compare_sessions(stage_session(original), session, feeds)),
        }
    report["seconds"] = round(time.perf_counter() - started, 2)
    return StageResult(model, report)
