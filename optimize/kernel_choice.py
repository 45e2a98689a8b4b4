"""Pick, by timing on this host, between equivalent graph forms that ONNX Runtime runs at different speeds.

Why this exists: ORT fuses `Add -> LayerNormalization` into its contrib `SkipLayerNormalization` when a
session is created, and assumes the fused kernel is faster. On this 2-core AMD EPYC (AVX2, ORT 1.32)
it is not: a 1x128x384 float tensor takes 325 us per call through SkipLayerNormalization against 71 us
for the same sum and `LayerNormalization` as two nodes (one thread, CPU time, ~28 us of session-call
overhead in both), 2,615 vs 436 us for 1,024 rows; its 12 nodes were 3.6 ms of MiniLM-L6's 31 ms INT8
run at seq 128. A model cannot switch one of ORT's fusions off for the sessions its users create, but the
fusion only matches an `Add` node: the same sum written as `Sum` is left alone. So, when the timing
says so, every residual sum that feeds a LayerNormalization becomes a `Sum`, and every
`SkipLayerNormalization` already in the graph (ORT's transformer optimizer writes them) becomes
`Sum -> LayerNormalization`. The arithmetic is the same float32 sum and normalization.

The choice is measured, not assumed: a later ORT, or another CPU, may run the fused kernel faster,
and then the graph is left as it is. Only for the CPU execution provider (CUDA's fused kernel is the
fast one) and float32 LayerNorms.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dlopt.optimize.kernel_decisions import DecisionRule, DecisionStore, judge
from dlopt.stage import StageResult, config_to_dict

LayerNormForm = Literal["auto", "fused", "unfused"]
LAYERNORM_FORMS = ("auto", "fused", "unfused")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True, kw_only=True)
class KernelChoiceConfig:
    layernorm: LayerNormForm | str = "auto"  # auto: unfused when it measures min_gain faster here
    min_gain: float = 1.15  # the unfused form must be this much faster (and its CI above 1x) to be written
    rows: int = 128  # tokens in the timed tensor (batch 1, seq 128: the shape benchmarks quote)
    rounds: int = 15  # interleaved timing rounds; the median of their ratios, with its CI, decides
    runs_per_round: int = 40

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule(margin=self.min_gain, rounds=self.rounds, runs_per_round=self.runs_per_round)


def _float_initializer(model, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            array = numpy_helper.to_array(init)
            return array if array.dtype == np.float32 else None
    return None


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def find_layernorm_sites(model) -> dict[str, list]:
    """The nodes the rewrite would touch: `SkipLayerNormalization` nodes with float32 gamma whose only
    extra output (if any) is the sum, and `Add` nodes whose single consumer is a float32
    LayerNormalization's input 0 (the pattern ORT's session-time SkipLayerNormFusion matches)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    producer = {out: node for node in model.graph.node for out in node.output}
    skips, adds = [], []
    for node in model.graph.node:
        if node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN:
            extra = list(node.output[1:3])  # mean, inv_std_var: a LayerNormalization has them too, but
            # at other output positions; such graphs are rare enough to be left as they are
            if any(extra) or len(node.input) < 3 or _float_initializer(model, node.input[2]) is None:
                continue
            skips.append(node)
        elif node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
            add = producer.get(node.input[0])
            # an Add between DequantizeLinear nodes is a QDQ-quantized Add, for ORT's QLinearAdd: not ours
            dequantized = add is not None and any(
                producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in add.input
            )
            if (
                add is not None
                and add.op_type == "Add"
                and add.domain in ("", "ai.onnx")
                and not dequantized
                and len(consumers.get(add.output[0], [])) == 1
                and add.output[0] not in graph_outputs
                and len(node.input) > 1
                and _float_initializer(model, node.input[1]) is not None
            ):
                adds.append(add)
    return {"skip_layernorm": skips, "add": adds}


def _timing_models(hidden: int, rows: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(1, 0.1, hidden).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, hidden).astype(np.float32), "beta"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, rows, hidden]) for n in ("x", "skip")]
    output = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, hidden])]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    fused = helper.make_graph(
        [
            helper.make_node(
                "SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain=MS_DOMAIN, epsilon=1e-12
            )
        ],
        "fused",
        inputs,
        output,
        inits,
    )
    unfused = helper.make_graph(
        [
            helper.make_node("Sum", ["x", "skip"], ["s"]),
            helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12),
        ],
        "unfused",
        inputs,
        output,
        inits,
    )
    return [onnx.helper.make_model(g, opset_imports=opsets) for g in (fused, unfused)]


def time_layernorm_forms(hidden: int, config: KernelChoiceConfig = KernelChoiceConfig()) -> dict[str, float]:
    """Median microseconds of the fused and the unfused form on this host (one thread, CPU time of the
    calling thread, the two interleaved round by round), the median per-round ratio fused/unfused, and
    each round's microseconds (fused_rounds_us, unfused_rounds_us)."""
    from dlopt.bench import InterleavedSampler
    from dlopt.sessions import cpu_session

    sessions = [cpu_session(m, threads=1) for m in _timing_models(hidden, config.rows)]
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((1, config.rows, hidden)).astype(np.float32) for n in ("x", "skip")}
    for session in sessions:
        for _ in range(5):
            session.run(None, feeds)
    runs = config.runs_per_round

    def runs_of(session: Any) -> Callable[[], list[Any]]:
        return lambda: [session.run(None, feeds) for _ in range(runs)]

    sampler = InterleavedSampler([runs_of(s) for s in sessions])
    sampler.run_rounds(config.rounds)
    times = [sampler.samples(i, "cpu") / runs * 1e6 for i in range(2)]
    ratios = times[0] / np.maximum(times[1], 1e-9)
    return {
        "fused_us": float(np.median(times[0])),
        "unfused_us": float(np.median(times[1])),
        "ratio": float(np.median(ratios)),
        "fused_rounds_us": times[0].tolist(),
        "unfused_rounds_us": times[1].tolist(),
    }


def _rewrite(model, skips: list, adds: list) -> int:
    from onnx import helper

    from dlopt.optimize.preprocess import replace_nodes

    add_names = {id(n) for n in adds}
    skip_names = {id(n) for n in skips}
    nodes = []
    for node in model.graph.node:
        if id(node) in add_names:
            nodes.append(helper.make_node("Sum", list(node.input), list(node.output), name=node.name))
        elif id(node) in skip_names:
            # inputs: input, skip, gamma, beta?, bias?; output 3 (optional) is input + skip + bias
            x, skip, gamma = node.input[0], node.input[1], node.input[2]
            beta = node.input[3] if len(node.input) > 3 and node.input[3] else ""
            bias = node.input[4] if len(node.input) > 4 and node.input[4] else ""
            summed = node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.output[0]}_skip_sum"
            epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
            nodes.append(
                helper.make_node("Sum", [x, skip] + ([bias] if bias else []), [summed], name=f"{node.name}_sum")
            )
            nodes.append(
                helper.make_node(
                    "LayerNormalization",
                    [summed, gamma] + ([beta] if beta else []),
                    [node.output[0]],
                    name=node.name,
                    axis=-1,
                    epsilon=epsilon,
                )
            )
        else:
            nodes.append(node)
    replace_nodes(model.graph, nodes)
    return len(adds) + len(skips)


def choose_layernorm_form(
    model,
    config: KernelChoiceConfig = KernelChoiceConfig(),
    *,
    timing: dict[str, float] | None = None,
    store: DecisionStore | None = None,
) -> StageResult:
    """A copy of `model` with its residual sums written in the form that runs faster here (see the module
    docstring); `model` is not modified. `timing` (from time_layernorm_forms) skips the measurement and
    the decision cache; else `store` (default: the decision cache; a report's decisions to replay)
    decides (dlopt.optimize.kernel_decisions)."""
    import onnx

    sites = find_layernorm_sites(model)
    if _default_opset(model) < 17:  # a SkipLayerNormalization cannot become an ONNX LayerNormalization
        sites["skip_layernorm"] = []
    count = len(sites["skip_layernorm"]) + len(sites["add"])
    report: dict[str, Any] = {"config": config_to_dict(config), "sites": count, "rewritten": 0, "decisions": []}
    if count == 0:
        report["decision"] = "nothing to choose: no residual sum feeds a float32 LayerNormalization"
        return StageResult(model, report)
    if config.layernorm == "fused":
        report["decision"] = "kept fused (asked)"
        return StageResult(model, report)
    if config.layernorm != "unfused":  # auto, or a report to replay
        gammas = [_float_initializer(model, n.input[2]) for n in sites["skip_layernorm"]]
        consumer_of = {n.input[0]: n for n in model.graph.node if n.op_type == "LayerNormalization"}
        gammas += [_float_initializer(model, consumer_of[a.output[0]].input[1]) for a in sites["add"]]
        hidden = int(np.bincount([g.size for g in gammas if g is not None]).argmax())
        if timing is not None:
            figures = judge([timing["fused_us"]], [timing["unfused_us"]], config.rule)
            record: dict[str, Any] = {
                "question": "layernorm form",
                "default": "fused",
                "alternative": "unfused",
                "choice": "unfused" if figures["alternative_wins"] else "fused",
                "source": "given",
                "signature_sha256": "",
                "figures": figures,
            }
        else:

            def measure():
                t = time_layernorm_forms(hidden, config)
                return t["fused_rounds_us"], t["unfused_rounds_us"]

            record = (store or DecisionStore()).decide(
                "layernorm form",
                {"hidden": hidden, "rows": config.rows, "dtype": "float32"},
                config.rule,
                default="fused",
                alternative="unfused",
                measure=measure,
            )
        report["decisions"] = [record]
        figures = record.get("figures") or {}
        report["timing"] = {"hidden": hidden, "rows": config.rows, "source": record["source"]}
        if figures:
            report["timing"] |= {
                "fused_us": figures["default_us"],
                "unfused_us": figures["alternative_us"],
                "ratio": figures["speedup"],
                "ci": figures["ci"],
                "rounds": figures["rounds"],
            }
        if record["choice"] != "unfused":
            report["decision"] = f"kept fused: {_record_text(record)}"
            return StageResult(model, report)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copied = find_layernorm_sites(copy)
    if _default_opset(copy) < 17:
        copied["skip_layernorm"] = []
    report["rewritten"] = _rewrite(copy, copied["skip_layernorm"], copied["add"])
    why = "asked" if config.layernorm == "unfused" else _record_text(report["decisions"][0])
    report["decision"] = (
        f"unfused: {report['rewritten']} residual sums written as Sum (+ LayerNormalization), "
        f"which ORT does not fuse; {why}"
    )
    return StageResult(copy, report)


def _record_text(record: Mapping[str, Any]) -> str:
    """One decision in words: its figures (or where it came from) and its source."""
    figures = record.get("figures")
    source = {"timed": "timed now", "cache": "from the decision cache", "given": "from the given timing"}.get(
        record["source"], record.get("why", record["source"])
    )
    if not figures:
        return source
    return (
        f"{record['alternative']} {figures['speedup']:.2f}x vs {record['default']} (CI {figures['ci'][0]:.2f}-"
        f"{figures['ci'][1]:.2f}, {figures['rounds']} rounds of thread CPU time, margin {figures['margin']}x; "
        f"{source})"
    )


# -- per-node INT8 or float in static QDQ graphs ----------------------------------------------------
# INT8 is not faster for every node on every CPU. On this 2-core AMD EPYC (AVX2, no VNNI) EfficientNet-
# Lite0's depthwise convs ran 0.64-0.97x their float speed in INT8 and its 1-3-channel convs 0.46-0.66x,
# while dense convs gained 1.3-1.75x; fashion-cnn's one-channel first conv took 3.07 ms in INT8 against
# 0.62 ms in float at batch 64. So each class of quantized node is timed in both forms, in the model's own
# shapes, and a class whose INT8 form is slower here is proposed for float. Mixing float into an INT8 chain
# costs Q/DQ pairs and layout transposes, so the caller keeps the proposal only if the whole model, timed
# before and after, is faster (dlopt.optimize.quantize).
NodeForms = Literal["auto", "int8"]
NODE_FORMS = ("auto", "int8")
NODE_CLASSES = ("depthwise conv", "pointwise conv", "dense conv", "small-channel conv", "gemm")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")

# (models, feeds) -> per model its microseconds per round (or one figure), the models timed interleaved
# per model: a figure per round, or an array of them (time_models)
Timer = Callable[[Sequence[Any], Sequence[Mapping[str, np.ndarray]]], Sequence[float | np.ndarray]]


@dataclass(frozen=True, kw_only=True)
class NodeFormConfig:
    # auto: float where INT8 times slower here; int8: every quantizable node INT8; FILE.quantize.json: the
    # decisions recorded in that report (given to choose_node_forms as a replaying DecisionStore)
    forms: NodeForms | str = "auto"
    min_gain: float = 1.15  # a class goes float when float is this much faster (and its CI above 1x)
    whole_min_gain: float = 1.03  # ... and the whole model with those nodes in float is this much faster
    rounds: int = 15
    runs_per_round: int = 3

    @property
    def class_rule(self) -> DecisionRule:
        return DecisionRule(margin=self.min_gain, rounds=self.rounds, runs_per_round=self.runs_per_round)

    @property
    def whole_rule(self) -> DecisionRule:
        return DecisionRule(margin=self.whole_min_gain, rounds=self.rounds, runs_per_round=self.runs_per_round)


def node_class(op_type: str, weight_shape: Sequence[int], group: int = 1) -> str:
    """The kernel class of a quantizable node: Gemm/MatMul -> 'gemm'; a Conv by its weight [O, I/g, k...]:
    one input channel per group -> depthwise, 1-3 input channels -> small-channel, 1x1 -> pointwise,
    else dense."""
    if op_type != "Conv":
        return "gemm"
    per_group = int(weight_shape[1])
    if group > 1 and per_group == 1:
        return "depthwise conv"
    if per_group * group <= 3:
        return "small-channel conv"
    if all(int(k) == 1 for k in weight_shape[2:]):
        return "pointwise conv"
    return "dense conv"


@dataclass(frozen=True)
class QuantizedNode:
    name: str
    op_type: str
    node_class: str
    activation: str  # the float model's input tensor of the node
    quantized_input: str  # the QDQ graph's quantized tensor that feeds the node's input DequantizeLinear


def quantized_nodes_by_class(float_model, qdq_model) -> dict[str, list[QuantizedNode]]:
    """The Conv/Gemm/MatMul nodes that run in INT8 in `qdq_model` (activation and constant weight both
    dequantized), grouped by node_class, with the same-named node in `float_model`."""
    from onnx import numpy_helper

    producer = {o: n for n in qdq_model.graph.node for o in n.output}
    q_inits = {t.name for t in qdq_model.graph.initializer}
    f_inits = {t.name: t for t in float_model.graph.initializer}
    f_nodes = {n.name: n for n in float_model.graph.node if n.name}
    found: dict[str, list[QuantizedNode]] = {}
    for node in qdq_model.graph.node:
        if node.op_type not in QUANTIZED_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        act, weight = producer.get(node.input[0]), producer.get(node.input[1])
        if (
            act is None
            or weight is None
            or act.op_type != "DequantizeLinear"
            or weight.op_type != "DequantizeLinear"
            or weight.input[0] not in q_inits
            or node.name not in f_nodes
        ):
            continue
        original = f_nodes[node.name]
        if len(original.input) < 2 or original.input[1] not in f_inits:
            continue
        shape = numpy_helper.to_array(f_inits[original.input[1]]).shape
        group = next((a.i for a in original.attribute if a.name == "group"), 1)
        kind = node_class(node.op_type, shape, group)
        found.setdefault(kind, []).append(QuantizedNode(node.name, node.op_type, kind, original.input[0], act.input[0]))
    return found


def _subgraph(model, keep_nodes: list, inputs: list[tuple[str, int, tuple[int, ...]]], outputs: list[str], prefix: str):
    """Nodes of `model` renamed with `prefix` (tensors too), with their initializers; `inputs` become graph
    inputs (name, onnx elem type, shape); `outputs` graph outputs of unknown shape."""
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer}

    def rename(name: str) -> str:
        return f"{prefix}{name}" if name else name  # "" is an omitted optional input: kept as is

    nodes, used = [], []
    for node in keep_nodes:
        copy = helper.make_node(
            node.op_type,
            [rename(i) for i in node.input],
            [rename(o) for o in node.output],
            name=rename(node.name),
            domain=node.domain,
        )
        copy.attribute.extend(node.attribute)
        nodes.append(copy)
        for i in node.input:
            if i in inits and i not in used:
                used.append(i)
    initializers = []
    for name in used:
        tensor = type(inits[name])()
        tensor.CopyFrom(inits[name])
        tensor.name = rename(name)
        initializers.append(tensor)
    graph_inputs = [helper.make_tensor_value_info(rename(n), t, list(shape)) for n, t, shape in inputs]
    graph_outputs = [helper.make_empty_tensor_value_info(rename(o)) for o in outputs]
    return nodes, initializers, graph_inputs, graph_outputs


def node_form_models(
    float_model, qdq_model, nodes: Sequence[QuantizedNode], activations: Mapping[str, np.ndarray]
) -> tuple[list, list[dict[str, np.ndarray]]]:
    """Two models holding `nodes` side by side, each with its own input: the float form (the float
    model's node, and a Relu/Clip right after it that the QDQ graph folded away) fed real float
    activations, and the INT8 form (input DequantizeLinear, weight/bias DequantizeLinear, the node, its
    output QuantizeLinear: what ORT fuses into QLinearConv / QGemm) fed those activations quantized.
    Returns ([float model, int8 model], [float feeds, int8 feeds])."""
    import onnx
    from onnx import helper, numpy_helper

    f_consumers: dict[str, list] = {}
    for n in float_model.graph.node:
        for i in n.input:
            f_consumers.setdefault(i, []).append(n)
    q_consumers: dict[str, list] = {}
    for n in qdq_model.graph.node:
        for i in n.input:
            q_consumers.setdefault(i, []).append(n)
    q_producer = {o: n for n in qdq_model.graph.node for o in n.output}
    q_inits = {t.name: numpy_helper.to_array(t) for t in qdq_model.graph.initializer}
    f_by_name = {n.name: n for n in float_model.graph.node}
    q_by_name = {n.name: n for n in qdq_model.graph.node}
    parts: dict[str, tuple[list[Any], list[Any], list[Any], list[Any]]] = {
        "float": ([], [], [], []),
        "int8": ([], [], [], []),
    }
    feeds: dict[str, dict[str, np.ndarray]] = {"float": {}, "int8": {}}
    for k, qn in enumerate(nodes):
        x = np.asarray(activations[qn.activation], np.float32)
        # float form
        f_node = f_by_name[qn.name]
        keep, out = [f_node], f_node.output[0]
        after = f_consumers.get(out, [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip") and out not in q_consumers:
            keep.append(after[0])  # the QDQ graph folded it into the output's quantization range
            out = after[0].output[0]
        built = _subgraph(float_model, keep, [(qn.activation, onnx.TensorProto.FLOAT, x.shape)], [out], f"n{k}_")
        for part, items in zip(parts["float"], built):
            part.extend(items)
        feeds["float"][f"n{k}_{qn.activation}"] = x
        # int8 form
        q_node = q_by_name[qn.name]
        dq_in = q_producer[q_node.input[0]]
        scale, zero = q_inits[dq_in.input[1]], q_inits[dq_in.input[2]]
        info = np.iinfo(zero.dtype)
        xq = np.clip(np.rint(x / scale) + zero.astype(np.int32), info.min, info.max).astype(zero.dtype)
        keep = [dq_in] + [q_producer[i] for i in q_node.input[1:] if i in q_producer] + [q_node]
        out = q_node.output[0]
        after = q_consumers.get(out, [])
        if len(after) == 1 and after[0].op_type == "QuantizeLinear":
            keep.append(after[0])
            out = after[0].output[0]
        elem = helper.np_dtype_to_tensor_dtype(zero.dtype)
        built = _subgraph(qdq_model, keep, [(dq_in.input[0], elem, xq.shape)], [out], f"n{k}_")
        for part, items in zip(parts["int8"], built):
            part.extend(items)
        feeds["int8"][f"n{k}_{dq_in.input[0]}"] = xq
    models = []
    for form in ("float", "int8"):
        nodes_, inits, ins, outs = parts[form]
        graph = helper.make_graph(nodes_, f"{form}_forms", ins, outs, inits)
        source = float_model if form == "float" else qdq_model
        model = helper.make_model(graph, opset_imports=list(source.opset_import))
        model.ir_version = source.ir_version
        models.append(model)
    return models, [feeds["float"], feeds["int8"]]


def time_models(
    models: Sequence[Any], feeds: Sequence[Mapping[str, np.ndarray]], *, rounds: int = 15, runs_per_round: int = 3
) -> list[np.ndarray]:
    """Microseconds per run of each model on its feeds, one figure per round (one thread, CPU time of the
    calling thread, the models interleaved round by round: index i of every array is one round)."""
    from dlopt.bench import InterleavedSampler
    from dlopt.sessions import cpu_session

    sessions = [cpu_session(m) for m in models]
    for session, f in zip(sessions, feeds):
        for _ in range(2):
            session.run(None, dict(f))

    def runs_of(session: Any, feed: Mapping[str, np.ndarray]) -> Callable[[], list[Any]]:
        return lambda: [session.run(None, dict(feed)) for _ in range(runs_per_round)]

    sampler = InterleavedSampler([runs_of(s, f) for s, f in zip(sessions, feeds)])
    sampler.warm_up(max_seconds=0.5, clock="cpu")
    sampler.run_rounds(rounds)
    return [sampler.samples(i, "cpu") / runs_per_round * 1e6 for i in range(len(models))]


def _attributes(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: str(helper.get_attribute_value(a)) for a in sorted(node.attribute, key=lambda a: a.name)}


def node_signature(float_model, qdq_model, node: QuantizedNode, activation: np.ndarray) -> dict[str, Any]:
    """What decides a node's kernels, without its name: op types of both timed forms, attributes,
    weight shape, the activation's shape and dtype, the quantized types."""
    from onnx import numpy_helper

    f_nodes = {n.name: n for n in float_model.graph.node}
    f_consumers: dict[str, list] = {}
    for n in float_model.graph.node:
        for i in n.input:
            f_consumers.setdefault(i, []).append(n)
    f_inits = {t.name: t for t in float_model.graph.initializer}
    q_inits = {t.name: t for t in qdq_model.graph.initializer}
    q_producer = {o: n for n in qdq_model.graph.node for o in n.output}
    original = f_nodes[node.name]
    after = [n.op_type for n in f_consumers.get(original.output[0], []) if n.op_type in ("Relu", "Clip")]
    q_node = next(n for n in qdq_model.graph.node if n.name == node.name)
    zero_types = []
    for name in q_node.input:
        dq = q_producer.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) > 2 and dq.input[2] in q_inits:
            zero_types.append(str(numpy_helper.to_array(q_inits[dq.input[2]]).dtype))
    return {
        "op_type": original.op_type,
        "class": node.node_class,
        "attributes": _attributes(original),
        "weight_shape": list(f_inits[original.input[1]].dims),
        "bias": len(original.input) > 2 and bool(original.input[2]),
        "activation_shape": list(activation.shape),
        "activation_dtype": str(activation.dtype),
        "quantized_types": zero_types,
        "then": after,
    }


def _activations(float_model, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    from dlopt.optimize.preprocess import with_outputs
    from dlopt.sessions import cpu_session

    session = cpu_session(with_outputs(float_model, list(names)))
    inputs = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(list(names), {k: v for k, v in feeds.items() if k in inputs})))


def time_node_classes(
    float_model,
    qdq_model,
    feeds: Mapping[str, np.ndarray],
    config: NodeFormConfig = NodeFormConfig(),
    *,
    timer: Timer | None = None,
) -> dict[str, dict[str, Any]]:
    """{node class: {nodes, float_us, int8_us, ratio (int8/float)}}: each class's quantized nodes timed
    side by side in both forms, on the activations `feeds` produce in the float model (the model's own
    shapes and values); medians of the rounds."""
    classes = quantized_nodes_by_class(float_model, qdq_model)
    if not classes:
        return {}
    values = _activations(float_model, feeds, sorted({n.activation for nodes in classes.values() for n in nodes}))
    timer = timer or (lambda m, f: time_models(m, f, rounds=config.rounds, runs_per_round=config.runs_per_round))
    timing = {}
    for kind in NODE_CLASSES:
        nodes = classes.get(kind, [])
        if not nodes:
            continue
        models, form_feeds = node_form_models(float_model, qdq_model, nodes, values)
        float_us, int8_us = (float(np.median(np.atleast_1d(t))) for t in timer(models, form_feeds))
        timing[kind] = {
            "nodes": [n.name for n in nodes],
            "float_us": round(float_us, 2),
            "int8_us": round(int8_us, 2),
            "ratio": round(int8_us / max(float_us, 1e-9), 3),
        }
    return timing


def float_classes(timing: Mapping[str, Mapping[str, Any]], config: NodeFormConfig = NodeFormConfig()) -> list[str]:
    """The node classes decided float (a `choice` recorded), else those whose INT8 form measured at least
    config.min_gain times slower than float."""
    return [
        kind
        for kind, t in timing.items()
        if (t["choice"] == "float" if "choice" in t else t["ratio"] >= config.min_gain)
    ]


def _op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def choose_node_forms(
    float_model,
    qdq_model,
    feeds: Mapping[str, np.ndarray],
    requantize: Callable[[list[str]], Any],
    config: NodeFormConfig = NodeFormConfig(),
    *,
    timer: Timer | None = None,
    store: DecisionStore | None = None,
) -> StageResult:
    """`qdq_model` (a static QDQ quantization of `float_model`), or, where it measures faster here, the
    model `requantize(names)` returns with the nodes of the classes whose INT8 form timed slower kept in
    float (quantize passes its own quantize_int8 with those names excluded and shielded). Both the
    per-class timing and the whole-model check use `timer` (default: time_models: per-round figures),
    and each decision goes through `store` (default: the decision cache; or a report's decisions to
    replay, without timing): the same model on the same CPU model gets the same decisions."""
    timer = timer or (lambda m, f: time_models(m, f, rounds=config.rounds, runs_per_round=config.runs_per_round))
    report: dict[str, Any] = {
        "config": config_to_dict(config),
        "classes": {},
        "float_classes": [],
        "float_nodes": [],
        "kept": False,
        "decisions": [],
    }
    if config.forms == "int8":
        report["decision"] = "every quantizable node INT8 (asked)"
        return StageResult(qdq_model, report)
    store = store or DecisionStore()
    classes = quantized_nodes_by_class(float_model, qdq_model)
    if not classes:
        report["decision"] = "nothing to choose: no static INT8 Conv/Gemm/MatMul"
        return StageResult(qdq_model, report)
    values = _activations(float_model, feeds, sorted({n.activation for nodes in classes.values() for n in nodes}))
    for kind in NODE_CLASSES:
        nodes = classes.get(kind, [])
        if not nodes:
            continue
        signature = {
            "class": kind,
            "nodes": sorted(
                (node_signature(float_model, qdq_model, n, values[n.activation]) for n in nodes),
                key=lambda d: json.dumps(d, sort_keys=True),
            ),
        }

        def measure(nodes=nodes):
            models, form_feeds = node_form_models(float_model, qdq_model, nodes, values)
            float_us, int8_us = timer(models, form_feeds)
            return int8_us, float_us  # (the default form, the alternative)

        record = store.decide(
            f"node class {kind}: int8 or float",
            signature,
            config.class_rule,
            default="int8",
            alternative="float",
            measure=measure,
        )
        report["decisions"].append(record)
        figures = record.get("figures") or {}
        float_us, int8_us = figures.get("alternative_us"), figures.get("default_us")
        report["classes"][kind] = {
            "nodes": [n.name for n in nodes],
            "float_us": float_us,
            "int8_us": int8_us,
            "ratio": round(int8_us / max(float_us, 1e-9), 3) if float_us is not None and int8_us is not None else None,
            "ci": figures.get("ci"),
            "choice": record["choice"],
            "source": record["source"],
        }
    timing = report["classes"]
    slower = float_classes(timing, config)
    report["float_classes"] = slower
    summary = "; ".join(
        f"{k} " + (f"int8/float {t['ratio']:.2f}x" if t["ratio"] is not None else t["source"])
        for k, t in timing.items()
    )
    if not slower:
        report["decision"] = (
            f"all INT8: no node class ran float {config.min_gain}x faster with its CI above 1x "
            f"({summary}; {_sources(report['decisions'])})"
        )
        return StageResult(qdq_model, report)
    names = [n for k in slower for n in timing[k]["nodes"]]
    mixed = requantize(names)

    def measure_whole():
        int8_us, mixed_us = timer([qdq_model, mixed], [feeds, feeds])
        return int8_us, mixed_us

    # the model by what was decided about it (each class's node signatures) and its op counts: no names and
    # no bytes, so that a replay on a machine whose quantizer writes other bytes still finds it
    whole = {
        "classes": sorted(d["signature_sha256"] for d in report["decisions"]),
        "float_classes": sorted(slower),
        "op_counts": sorted(_op_counts(qdq_model).items()),
    }
    record = store.decide(
        "whole model: all INT8 or mixed",
        whole,
        config.whole_rule,
        default="all int8",
        alternative="mixed",
        measure=measure_whole,
    )
    report["decisions"].append(record)
    figures = record.get("figures") or {}
    gain = figures.get("speedup")
    report["whole_model"] = {
        "int8_us": figures.get("default_us"),
        "mixed_us": figures.get("alternative_us"),
        "gain": gain,
        "ci": figures.get("ci"),
        "choice": record["choice"],
        "source": record["source"],
    }
    if record["choice"] != "mixed":
        report["decision"] = (
            f"all INT8: {', '.join(slower)} timed slower in INT8 ({summary}), but the whole model "
            f"with them in float "
            + (
                f"ran {gain:.2f}x (CI {figures['ci'][0]:.2f}-"
                f"{figures['ci'][1]:.2f}; needs {config.whole_min_gain}x "
                "with the CI above 1x: the Q/DQ pairs and layout changes "
                "around float nodes cost what they saved)"
                if figures
                else f"was not chosen ({record.get('why')})"
            )
            + f"; {_sources(report['decisions'])}"
        )
        return StageResult(qdq_model, report)
    report.update(kept=True, float_nodes=names)
    report["decision"] = (
        f"{len(names)} node(s) kept in float ({', '.join(slower)}): INT8 timed slower here "
        f"({summary}); whole model "
        + (f"{gain:.2f}x faster than all INT8" if figures else record.get("why", ""))
        + f"; {_sources(report['decisions'])}"
    )
    return StageResult(mixed, report)


def _sources(decisions: Sequence[Mapping[str, Any]]) -> str:
    """'3 decisions timed now, 1 from the decision cache'."""
    names = {
        "timed": "timed now",
        "cache": "from the decision cache",
        "replayed": "replayed from a report",
        "default": "defaults (not in the replayed report)",
    }
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d["source"]] = counts.get(d["source"], 0) + 1
    return ", ".join(f"{n} decision{'s' if n != 1 else ''} {names.get(s, s)}" for s, n in counts.items())


__all__ = [
    "LAYERNORM_FORMS",
    "NODE_CLASSES",
    "NODE_FORMS",
    "KernelChoiceConfig",
    "NodeFormConfig",
    "QuantizedNode",
    "choose_layernorm_form",
    "choose_node_forms",
    "find_layernorm_sites",
    "float_classes",
    "node_class",
    "node_form_models",
    "node_signature",
    "quantized_nodes_by_class",
    "time_layernorm_forms",
    "time_models",
    "time_node_classes",
]
