"""SmoothQuant (Xiao et al., 2023) for transformers: activation outlier channels folded into the weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from dlopt.optimize.preprocess import replace_nodes
from dlopt.sessions import cpu_session

# -- SmoothQuant ----------------------------------------------------------------------------------------
SMOOTHABLE_OPS = ("MatMul", "Attention")


def smooth_activations(
    model, data: Iterable[Mapping[str, np.ndarray]], *, alpha: float, samples: int = 64, exclude: Iterable[str] = ()
):
    """SmoothQuant (Xiao et al., 2023) for the MatMul/Attention nodes with constant 2-D weights.

    For each activation tensor X feeding such nodes, per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (W_j: row j of every weight X feeds), then X·W =
    (X/s)·(s·W): a Mul by 1/s is inserted on X (one per tensor, a cheap elementwise op) and the
    weights' rows are scaled by s. Lossless in float; the outlier channels of transformer hidden
    states no longer set the per-tensor activation scale. Returns (model, report)."""
    import onnx
    from onnx import helper, numpy_helper

    from dlopt.optimize.preprocess import with_outputs as _with_outputs

    exclude = set(exclude)
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if (
            node.op_type in SMOOTHABLE_OPS
            and node.name not in exclude
            and len(node.input) > 1
            and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2
            and node.input[0] not in inits
        ):
            groups.setdefault(node.input[0], []).append(node)
    if not groups:
        return model, {"smoothed_tensors": 0}
    tensors = sorted(groups)
    session = cpu_session(_with_outputs(model, tensors), graph_opt_level="basic")
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    amax: dict[str, np.ndarray] = {}
    for index, feeds in enumerate(data):
        if index >= samples:
            break
        outs = dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))
        for t in tensors:
            a = np.abs(outs[t]).reshape(-1, outs[t].shape[-1]).max(axis=0)
            amax[t] = np.maximum(amax[t], a) if t in amax else a
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    weights = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    muls, factors = {}, []
    for t in tensors:
        if t not in amax:
            continue
        wmax = np.max([np.abs(weights[n.input[1]]).max(axis=1) for n in groups[t]], axis=0)
        s = np.maximum(amax[t], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        s = np.clip(s / np.exp(np.mean(np.log(s))), 1e-2, 1e2).astype(np.float32)  # centred: weights keep scale
        factors.append(float(s.max() / s.min()))
        scaled = f"{t}/smoothed"
        inv = f"{t}/smooth_inv_scale"
        smoothed.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        muls[t] = helper.make_node("Mul", [t, inv], [scaled], name=f"{t}/smooth")
        for node in {n.input[1]: n for n in groups[t]}.values():  # a weight shared by two nodes: once
            name = f"{node.input[1]}/smoothed"
            smoothed.graph.initializer.append(
                numpy_helper.from_array((weights[node.input[1]] * s[:, None]).astype(np.float32), name)
            )
    targets = {n.name for t in muls for n in groups[t]}
    nodes, placed = [], set()
    for node in smoothed.graph.node:
        if node.name in targets and node.input[0] in muls:
            t = node.input[0]
            if t not in placed:
                nodes.append(muls[t])
                placed.add(t)
            node.input[0] = muls[t].output[0]
            node.input[1] = f"{node.input[1]}/smoothed"
        nodes.append(node)
    replace_nodes(smoothed.graph, nodes)
    used = {i for n in smoothed.graph.node for i in n.input}
    for t in [t for t in smoothed.graph.initializer if t.name not in used]:
        smoothed.graph.initializer.remove(t)
    return smoothed, {
        "alpha": alpha,
        "smoothed_tensors": len(muls),
        "smoothed_nodes": len(targets),
        "max_channel_factor_ratio": max(factors) if factors else 1.0,
    }
