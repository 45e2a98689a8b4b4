"""Graph pre-processing before quantization: transformer fusions, constant folding, shape inference.

Each step runs on a copy, then the step's output is run against its input through ONNX Runtime on
the same feeds (calibration samples when given, else synthesized ones); a step whose outputs differ
beyond atol + rtol·|expected| is rejected, reported, and its input kept. A step is never trusted
blindly: ORT's fusions are pattern matches and a mismatched pattern can change numerics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from dlopt.fidelity import within_tolerance
from dlopt.graphfacts import FUSED_TRANSFORMER_OPS, looks_like_transformer, op_counts
from dlopt.inputs import Feeds, model_feeds, parse_input_shapes, take_samples
from dlopt.sessions import cpu_session, run_outputs
from dlopt.stage import StageResult, config_to_dict

Fusion = Literal["auto", "on", "off"]


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    transformer_fusion: Fusion = "auto"  # auto: fuse graphs that look like BERT-style encoders
    model_type: str = "bert"  # onnxruntime.transformers.optimizer model type
    num_heads: int = 0  # 0: detected from the graph by ORT
    hidden_size: int = 0
    constant_folding: bool = True
    batchnorm_folding: bool = True  # Conv -> BatchNormalization pairs become one Conv
    shape_inference: bool = True
    # dynamic INT8: Gemm with a constant B rewritten as MatMul (+ Add), which ORT's dynamic quantizer has an
    # integer kernel for (it quantizes MatMul, not Gemm: an MLP exported with Gemm would stay float)
    gemm_to_matmul: bool = False
    check_samples: int = 2
    atol: float = 1e-4
    rtol: float = 1e-3
    input_shapes: tuple[str, ...] = ()  # --input-shape NAME=DxD... for the synthetic check samples


def replace_nodes(graph, nodes) -> None:
    """Make `nodes` (in this order) the node list of `graph`, e.g. after a rewrite. Nodes taken from
    `graph` itself may be passed: protobuf keeps a message removed from a repeated field alive as a
    detached copy, and extend() copies each node back in."""
    nodes = list(nodes)
    del graph.node[:]
    graph.node.extend(nodes)


# -- the samples every check runs on ------------------------------------------------------------------
def check_feeds(
    model, data: Iterable[Mapping[str, np.ndarray]] | None, count: int, input_shapes: tuple[str, ...] = ()
) -> list[Feeds]:
    """Up to `count` samples of `data`; without data, synthetic samples that the float model runs on
    (dlopt.inputs; `input_shapes` as the user's `--input-shape` values)."""
    taken = take_samples(data, count)
    return taken or model_feeds(model, count=count, overrides=parse_input_shapes(input_shapes))


# -- the steps ----------------------------------------------------------------------------------------
def detect_attention_shape(model) -> tuple[int, int]:
    """(num_heads, hidden_size) of a BERT-style graph, 0 where not found.

    Written here because ORT's own detection reads the head count from the Q reshape's shape, and
    current transformers export `view(batch, seq, -1, head_dim)`: the head count is -1 there. The
    head size is in that shape and the hidden size is the width of the projection feeding it."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {out: node for node in model.graph.node for out in node.output}
    found: dict[tuple[int, int], int] = {}
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        heads, head_size = (consts.get(concat.input[2]), consts.get(concat.input[3]))
        if head_size is None or heads is None or head_size.size != 1 or heads.size != 1 or head_size.item() <= 0:
            continue
        width = 0
        src = producer.get(node.input[0])
        while src is not None and src.op_type in ("Add", "MatMul") and not width:
            weights = [consts[i] for i in src.input if i in consts and consts[i].ndim == 2]
            if src.op_type == "MatMul" and weights:
                width = int(weights[0].shape[1])
            src = next((producer[i] for i in src.input if i in producer), None)
        h = int(heads.item()) if heads.item() > 0 else (width // int(head_size.item()) if width else 0)
        if h > 0:
            key = (h, h * int(head_size.item()))
            found[key] = found.get(key, 0) + 1
    return max(found, key=lambda key: found[key]) if found else (0, 0)


def _fuse_transformer(model, config: PreprocessConfig):
    return fuse_transformer(model, config.model_type, config.num_heads, config.hidden_size)


def fuse_transformer(
    model, model_type: str = "bert", num_heads: int = 0, hidden_size: int = 0, *, use_gpu: bool = False
) -> tuple[Any, dict[str, Any]]:
    """ONNX Runtime's transformer fusions (Attention, EmbedLayerNormalization, ...); heads and width
    found in the graph when not given. use_gpu: the fusions the CUDA provider has kernels for.
    `model` is not modified (ORT's optimizer rewrites the proto it is given in place)."""
    import onnx
    from onnx import helper
    from onnxruntime.transformers.optimizer import optimize_model

    from dlopt.quiet import quiet_libraries

    heads, hidden = num_heads, hidden_size
    if not heads or not hidden:
        heads, hidden = detect_attention_shape(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    with quiet_libraries():
        fused = optimize_model(
            work, model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0, use_gpu=use_gpu
        )
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    result = fused.model
    domains = {n.domain for n in result.graph.node} - {"", "ai.onnx"}
    declared = {o.domain for o in result.opset_import}
    for domain in sorted(domains - declared):  # the fusions use com.microsoft ops without declaring it
        result.opset_import.append(helper.make_opsetid(domain, 1))
    return result, {"fused": stats, "num_heads": heads, "hidden_size": hidden}


_NOT_FOLDABLE = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
    "SequenceConstruct",
}
FOLD_LIMIT_ELEMENTS = 1 << 20  # a folded tensor larger than this stays computed (e.g. ConstantOfShape)


def _fold_constants(model, config: PreprocessConfig):
    """Replace nodes whose inputs are all constant by initializers; every other node keeps its name.

    Hand-written on purpose: ORT's offline 'basic' level also fuses (MatMul+Add -> Gemm ...) and
    renames nodes, which would break --exclude-nodes and the sensitivity report's node names."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    opsets = list(folded.opset_import)
    keep, folded_count = [], 0
    for node in graph.node:
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDABLE
            and all(i in consts for i in node.input if i)
            and not any(o in graph_outputs for o in node.output)
        )
        if foldable:
            try:
                mini = helper.make_model(
                    helper.make_graph(
                        [node],
                        "fold",
                        [],
                        [helper.make_empty_tensor_value_info(o) for o in node.output],
                        [numpy_helper.from_array(consts[i], i) for i in dict.fromkeys(node.input) if i],
                    ),
                    opset_imports=opsets,
                )
                values = ReferenceEvaluator(mini).run(None, {})
                if all(np.asarray(v).size <= FOLD_LIMIT_ELEMENTS for v in values):
                    for name, value in zip(node.output, values):
                        consts[name] = np.asarray(value)
                        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
                    folded_count += 1
                    continue
            except Exception:  # noqa: BLE001 - a node the reference runtime cannot evaluate stays computed
                pass
        keep.append(node)
    replace_nodes(graph, keep)
    used = {i for n in graph.node for i in n.input} | graph_outputs
    has_subgraphs = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute
    )
    unused = [] if has_subgraphs else [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return folded, {"nodes_before": len(model.graph.node), "nodes_after": len(graph.node), "folded": folded_count}


def _fold_batchnorm(model, config: PreprocessConfig):
    """Fold every inference BatchNormalization that alone consumes a Conv with constant weights into
    that Conv (w * g/sqrt(v + eps) per output channel, bias (b - mean) * g/sqrt(v + eps) + beta).

    Needed before quantization, not after: ORT folds BatchNorm only when it builds a session, i.e.
    after the QDQ nodes are placed, so an unfolded pair quantizes the Conv's pre-BN output with the
    wrong range and leaves a float BatchNormalization between QLinearConv kernels. The Conv keeps its
    name and takes the BatchNormalization's output name."""
    import onnx
    from onnx import numpy_helper

    folded_model = onnx.ModelProto()
    folded_model.CopyFrom(model)
    graph = folded_model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    drop, replaced, count = set(), set(), 0
    for bn in graph.node:
        if (
            bn.op_type != "BatchNormalization"
            or len(bn.output) != 1
            or any(a.name == "training_mode" and a.i for a in bn.attribute)
        ):
            continue
        conv = producer.get(bn.input[0])
        params = bn.input[1:5]
        if (
            conv is None
            or conv.op_type != "Conv"
            or len(consumers.get(conv.output[0], [])) != 1
            or conv.output[0] in graph_outputs
            or conv.input[1] not in inits
            or not all(p in inits for p in params)
            or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits)
        ):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        factor = gamma / np.sqrt(var + eps)
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(w.shape[0])
        )
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype
        # named after the Conv: two Convs sharing one weight, each with its own BatchNorm, get two
        key = conv.name or conv.output[0]
        w_name, b_name = f"{key}/bn_folded_weight", f"{key}/bn_folded_bias"
        graph.initializer.extend(
            [
                numpy_helper.from_array((w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype), w_name),
                numpy_helper.from_array(((bias - mean) * factor + beta).astype(dtype), b_name),
            ]
        )
        replaced.update([*params, *conv.input[1:]])
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        count += 1
    replace_nodes(graph, [n for n in graph.node if id(n) not in drop])
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name in replaced and t.name not in used]:
        graph.initializer.remove(t)
    return folded_model, {"folded": count}


def _gemm_to_matmul(model, config: PreprocessConfig):
    """Each Gemm (transA 0) whose B is an initializer becomes MatMul(A, alpha*B') named like the Gemm
    (so --exclude-nodes names still hold), plus Add(beta*C) when it has C. B' is B, or B transposed
    for transB: the transposition is done once here, not per call."""
    import onnx
    from onnx import helper, numpy_helper

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("transA", 0) or node.input[1] not in inits:
            nodes.append(node)
            continue
        key = node.name or node.output[0]
        b = numpy_helper.to_array(inits[node.input[1]])
        b = (b.T if attrs.get("transB", 0) else b) * np.asarray(attrs.get("alpha", 1.0), b.dtype)
        weight = f"{key}/matmul_weight"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b), weight))
        has_c = len(node.input) > 2 and node.input[2]
        product = f"{key}/matmul_output" if has_c else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if has_c:
            c = node.input[2]
            beta = attrs.get("beta", 1.0)
            if beta != 1.0:
                if c not in inits:
                    nodes.append(
                        helper.make_node("Mul", [c, f"{key}/beta"], [f"{key}/scaled_c"], name=f"{key}/beta_scale")
                    )
                    graph.initializer.append(numpy_helper.from_array(np.asarray(beta, np.float32), f"{key}/beta"))
                else:
                    scaled = numpy_helper.to_array(inits[c]) * beta
                    graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), f"{key}/scaled_c"))
                c = f"{key}/scaled_c"
            nodes.append(helper.make_node("Add", [product, c], [node.output[0]], name=f"{key}/bias"))
        count += 1
    if not count:
        return model, {"rewritten": 0}
    replace_nodes(graph, nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    has_subgraphs = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute
    )
    if not has_subgraphs:
        for t in [t for t in graph.initializer if t.name not in used]:
            graph.initializer.remove(t)
    return rewritten, {"rewritten": count}


def _infer_shapes(model, config: PreprocessConfig):
    """ORT's symbolic inference where the graph has its contrib ops (fused transformers), which onnx's
    own inference does not know; onnx's everywhere else: the symbolic one simplifies every Resize's
    output size with sympy, which took 60 s on the PP-OCRv4 text detector (6 Resize nodes) against
    under a second for onnx's, and the quantizer needs the element types, which both give."""
    import onnx

    if not any(n.domain == "com.microsoft" for n in model.graph.node):
        inferred = onnx.shape_inference.infer_shapes(model)
        return inferred, {"engine": "onnx", "value_infos": len(inferred.graph.value_info)}
    try:
        # through the transformers helper: importing onnxruntime.tools imports torch (9 s)
        from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInference

        # symbolic inference knows ORT's contrib ops (Attention, SkipLayerNormalization ...)
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
        engine = "onnxruntime symbolic"
    except Exception:  # noqa: BLE001 - falls back to ONNX's own inference, which is reported
        inferred = onnx.shape_inference.infer_shapes(model)
        engine = "onnx"
    return inferred, {"engine": engine, "value_infos": len(inferred.graph.value_info)}


def run_checked_steps(
    model, steps, config, feeds: list[Feeds], reference: list[list[np.ndarray]], atol: float, rtol: float
) -> tuple[Any, list[dict[str, Any]]]:
    """Apply each (name, step(model, config) -> (model, details)) in order on a copy; keep a step's
    output only if it runs on `feeds` within atol + rtol*|reference| of `reference`, else report why
    it was rejected and go on from its input. Returns (model, one report entry per step)."""
    report_steps = []
    current = model
    for name, step in steps:
        entry: dict[str, Any] = {"step": name}
        try:
            candidate, details = step(current, config)
            entry.update(details)
            if candidate is current:  # nothing to do: nothing to check
                entry.update(applied=False, reason=entry.get("reason", "nothing to do"))
                report_steps.append(entry)
                continue
            outputs = run_outputs(cpu_session(candidate, graph_opt_level="basic"), feeds)
            ok, worst = within_tolerance(reference, outputs, atol, rtol)
            entry["max_abs_diff"] = worst
            entry["applied"] = ok
            if ok:
                current = candidate
            else:
                entry["reason"] = f"outputs moved by {worst:.3g} (> atol {atol}, rtol {rtol}): rejected"
        except Exception as e:  # noqa: BLE001 - a failed optional step is reported, the model kept as it was
            entry.update(applied=False, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        report_steps.append(entry)
    return current, report_steps


def preprocess(
    model, config: PreprocessConfig = PreprocessConfig(), data: Iterable[Mapping[str, np.ndarray]] | None = None
) -> StageResult:
    """Run the enabled steps in order (fusion, constant folding, shape inference), each checked."""
    feeds = check_feeds(model, data, config.check_samples, config.input_shapes)
    reference = run_outputs(cpu_session(model, graph_opt_level="basic"), feeds)
    steps: list[tuple[str, Any]] = []
    fuse = config.transformer_fusion == "on" or (config.transformer_fusion == "auto" and looks_like_transformer(model))
    if fuse and not (FUSED_TRANSFORMER_OPS & {n.op_type for n in model.graph.node}):
        steps.append(("transformer_fusion", _fuse_transformer))
    if config.batchnorm_folding and any(n.op_type == "BatchNormalization" for n in model.graph.node):
        steps.append(("batchnorm_folding", _fold_batchnorm))
    if config.constant_folding:
        steps.append(("constant_folding", _fold_constants))
    if config.gemm_to_matmul and any(n.op_type == "Gemm" for n in model.graph.node):
        steps.append(("gemm_to_matmul", _gemm_to_matmul))
    if config.shape_inference:
        steps.append(("shape_inference", _infer_shapes))

    current, report_steps = run_checked_steps(model, steps, config, feeds, reference, config.atol, config.rtol)
    report = {
        "config": config_to_dict(config),
        "steps": report_steps,
        "check_feeds": len(feeds),
        "ops_before": op_counts(model),
        "ops_after": op_counts(current),
    }
    return StageResult(current, report)


__all__ = ["PreprocessConfig", "check_feeds", "preprocess", "replace_nodes", "run_checked_steps"]


def with_outputs(model, names: list[str]):
    """A copy of `model` that also outputs the tensors `names` (to read intermediate values)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy
