"""Weight-only INT8: weights stored as int8 and dequantized to float in front of the float op.

What it is for: a model that cannot be given activation ranges (no calibration data) or whose op
has no integer kernel (GRU) still shrinks ~4x on disk, with outputs close to the float model
(symmetric int8 per output channel: the only error is the weights' rounding). Compute stays float:
no speedup. ONNX Runtime keeps each DequantizeLinear and runs it on every call by default (PP-OCRv4
det, one thread, this 2-core AVX2 EPYC: 67.5 ms vs 51.0 ms FP32); a session with the config entry
`session.disable_quant_qdq=1` folds them into float weights at load and runs at FP32 speed (49.3 ms)
with the same outputs (max difference 1.5e-7). The file on disk keeps the int8 weights either way.

Hand-written because ORT's quantizers store int8 weights only together with int8 compute: static
QDQ needs activation ranges, dynamic quantization replaces the op by an integer kernel (none for
GRU, and ConvInteger is slower than the float Conv on x86), and MatMulNBits covers MatMul only.

Weights are found in every graph, If/Loop/Scan subgraphs included, whether the initializer sits in
the subgraph or in an outer graph; the int8 tensor, its scales and the DequantizeLinear go into the
graph of the node that reads the weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dlopt.graphfacts import WEIGHT_INPUTS
from dlopt.optimize.normalize import PER_CHANNEL_OPSET, all_graphs, default_opset, subgraphs
from dlopt.optimize.preprocess import replace_nodes
from dlopt.stage import StageResult, config_to_dict

Scope = Literal["all", "leftovers"]
RECURRENT_OPS = ("LSTM", "GRU", "RNN")


@dataclass(frozen=True, kw_only=True)
class WeightOnlyConfig:
    per_channel: bool = True  # needs opset >= 13 (DequantizeLinear axis); per-tensor below
    op_types: tuple[str, ...] = tuple(WEIGHT_INPUTS)
    exclude_nodes: tuple[str, ...] = ()
    # leftovers: only what ORT's quantizers leave float, i.e. nodes inside If/Loop/Scan bodies and
    # recurrent layers (weights already quantized are no longer float initializers and are skipped anyway)
    scope: Scope = "all"


def _axis(node, weight: np.ndarray) -> int | None:
    """The output-channel axis of a weight for per-channel scales; None: per-tensor."""
    from onnx import helper

    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight.ndim - 1 if weight.ndim >= 2 else None
    if node.op_type in ("LSTM", "GRU", "RNN"):  # W [directions, gates*hidden, input], R [.., .., hidden]
        return 1
    return None


def _quantize(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127] and its float scale (one per channel along axis, or a scalar)."""
    w = weight.astype(np.float64)
    if axis is None:
        amax = np.asarray(np.abs(w).max(initial=0.0))
    else:
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    shaped = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(w.ndim)])
    q = np.clip(np.rint(w / shaped), -127, 127).astype(np.int8)
    return q, scale.astype(weight.dtype)


def quantize_weights_int8(model, config: WeightOnlyConfig = WeightOnlyConfig()) -> StageResult:
    """Replace each float weight initializer of the chosen nodes by int8 + scale + DequantizeLinear.
    `model` is not modified. Report: weights and nodes quantized by op type, bytes of weights before
    and after, and the axis rule used."""
    import onnx
    from onnx import helper, numpy_helper

    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    per_channel = config.per_channel and default_opset(model) >= PER_CHANNEL_OPSET
    wanted_ops = set(config.op_types) & set(WEIGHT_INPUTS)
    excluded = set(config.exclude_nodes)
    taken = {
        name
        for g in all_graphs(quantized.graph)
        for name in [
            *(i.name for i in g.input),
            *(t.name for t in g.initializer),
            *(o for n in g.node for o in n.output),
            *(n.name for n in g.node),
        ]
    }

    def fresh(name: str) -> str:
        candidate, k = name, 1
        while candidate in taken:
            candidate, k = f"{name}_{k}", k + 1
        taken.add(candidate)
        return candidate

    # (graph of the reading node, weight, axis) -> int8, scale. In the reader's graph, not the weight's: ORT's
    # DequantizeLinear -> MatMul fusion (to MatMulNBits) looks the int8 weight up in the node's own graph
    # and fails on an outer-scope one ("Missing required weight").
    made: dict[tuple[int, str, int | None], tuple[str, str]] = {}
    nodes_by_op: dict[str, int] = {}
    stats = {"weights": 0, "float_bytes": 0, "int8_bytes": 0}

    def owner_of(name: str, chain: list[tuple[dict[str, Any], set[str]]]):
        """The initializer `name` as seen from the innermost scope of `chain` (None if a value shadows it)."""
        for inits, values in reversed(chain):
            if name in inits:
                return inits[name]
            if name in values:
                return None
        return None

    def visit(graph, chain: list[tuple[dict[str, Any], set[str]]], inside: bool) -> None:
        values = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
        chain = [*chain, ({t.name: t for t in graph.initializer}, values)]
        new_nodes, local_dq = [], {}
        for node in graph.node:
            for sub in subgraphs(node):
                visit(sub, chain, True)
            chosen = config.scope == "all" or inside or node.op_type in RECURRENT_OPS
            if chosen and node.op_type in wanted_ops and node.name not in excluded and node.domain in ("", "ai.onnx"):
                done = False
                for index in WEIGHT_INPUTS[node.op_type]:
                    if index >= len(node.input) or not node.input[index]:
                        continue
                    init = owner_of(node.input[index], chain)
                    if init is None or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                        continue
                    weight = numpy_helper.to_array(init)
                    axis = _axis(node, weight) if per_channel else None
                    channels = weight.shape[axis] if axis is not None else 1
                    if weight.size * weight.itemsize <= weight.size + channels * weight.itemsize:
                        continue  # a tiny weight: its scales would outweigh the saving
                    key = (id(graph), init.name, axis)
                    if key not in made:
                        q, scale = _quantize(weight, axis)
                        names = fresh(f"{init.name}/int8"), fresh(f"{init.name}/int8_scale")
                        graph.initializer.extend(
                            [numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1])]
                        )
                        made[key] = names
                        stats["weights"] += 1
                        stats["float_bytes"] += weight.size * weight.itemsize
                        stats["int8_bytes"] += q.size + scale.size * scale.itemsize
                    if (init.name, axis) not in local_dq:
                        axis_attribute: dict[str, Any] = {"axis": axis} if axis is not None else {}
                        dq = helper.make_node(
                            "DequantizeLinear",
                            list(made[key]),
                            [fresh(f"{init.name}/dequantized")],
                            name=fresh(f"{init.name}/DequantizeLinear"),
                            **axis_attribute,
                        )
                        new_nodes.append(dq)
                        local_dq[(init.name, axis)] = dq.output[0]
                    node.input[index] = local_dq[(init.name, axis)]
                    done = True
                if done:
                    nodes_by_op[node.op_type] = nodes_by_op.get(node.op_type, 0) + 1
            new_nodes.append(node)
        replace_nodes(graph, new_nodes)

    visit(quantized.graph, [], False)
    if not stats["weights"]:
        return StageResult(model, {"config": config_to_dict(config), "per_channel": per_channel, "nodes": {}, **stats})
    read = {i for g in all_graphs(quantized.graph) for n in g.node for i in n.input}
    read |= {o.name for g in all_graphs(quantized.graph) for o in g.output}
    replaced = {name for (_, name, _) in made}
    for graph in all_graphs(quantized.graph):
        inputs = {i.name for i in graph.input}
        for t in [t for t in graph.initializer if t.name in replaced and t.name not in read | inputs]:
            graph.initializer.remove(t)
    return StageResult(
        quantized,
        {
            "config": config_to_dict(config),
            "per_channel": per_channel,
            "nodes": dict(sorted(nodes_by_op.items())),
            **stats,
        },
    )


def weighted_nodes(model, op_types: Iterable[str] = tuple(WEIGHT_INPUTS)) -> list[Any]:
    """Nodes of these op types anywhere in the model (subgraphs included)."""
    wanted = set(op_types)
    return [n for g in all_graphs(model.graph) for n in g.node if n.op_type in wanted]


__all__ = ["RECURRENT_OPS", "WEIGHT_INPUTS", "WeightOnlyConfig", "quantize_weights_int8", "weighted_nodes"]
