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

from dlopt.optimize.calibration import Feeds, graph_inputs
from dlopt.stage import StageResult, config_to_dict

Fusion = Literal["auto", "on", "off"]

# ops that only ORT's transformer fusions create: seeing one means the graph is already fused
FUSED_TRANSFORMER_OPS = {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization",
                         "BiasGelu", "FastGelu", "QAttention"}


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    transformer_fusion: Fusion = "auto"  # auto: fuse graphs that look like BERT-style encoders
    model_type: str = "bert"  # onnxruntime.transformers.optimizer model type
    num_heads: int = 0  # 0: detected from the graph by ORT
    hidden_size: int = 0
    constant_folding: bool = True
    batchnorm_folding: bool = True  # Conv -> BatchNormalization pairs become one Conv
    shape_inference: bool = True
    check_samples: int = 2
    atol: float = 1e-4
    rtol: float = 1e-3


def looks_like_transformer(model) -> bool:
    ops = [n.op_type for n in model.graph.node]
    if FUSED_TRANSFORMER_OPS & set(ops):
        return True
    names = {i.name for i in graph_inputs(model)}
    return ops.count("Softmax") >= 1 and ops.count("MatMul") >= 4 and ("input_ids" in names or "Gather" in ops)


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def replace_nodes(graph, nodes) -> None:
    """Make `nodes` (in this order) the node list of `graph`, e.g. after a rewrite. Nodes taken from
    `graph` itself may be passed: protobuf keeps a message removed from a repeated field alive as a
    detached copy, and extend() copies each node back in."""
    nodes = list(nodes)
    del graph.node[:]
    graph.node.extend(nodes)


# -- running and comparing --------------------------------------------------------------------------
def make_session(model, threads: int = 1, optimization: str = "all"):
    import onnxruntime as ort

    from dlopt.runtime import session_options

    so = session_options(threads, optimization)
    payload = model.SerializeToString() if model.ByteSize() < 2**31 - 1 else None
    if payload is None:
        raise ValueError("models over 2 GiB must be run from a file")
    return ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"])


def synthetic_feeds(model, count: int = 2, seq_len: int = 16, seed: int = 0) -> list[Feeds]:
    """Inputs for a numerical check when no data is given: token-like ids for integer inputs
    (in [0, 1000), a mask of ones for names containing 'mask'), normal floats otherwise."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        sample = {}
        for spec in graph_inputs(model):
            shape = tuple(d if d is not None and d > 0 else (1 if axis == 0 else seq_len)
                          for axis, d in enumerate(spec.shape))
            if np.issubdtype(spec.dtype, np.integer):
                sample[spec.name] = (np.ones(shape, spec.dtype) if "mask" in spec.name
                                     else rng.integers(0, 1000, shape).astype(spec.dtype))
            elif spec.dtype == np.bool_:
                sample[spec.name] = np.ones(shape, np.bool_)
            else:
                sample[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        feeds.append(sample)
    return feeds


def check_feeds(model, data: Iterable[Mapping[str, np.ndarray]] | None, count: int) -> list[Feeds]:
    if data is not None:
        taken = []
        for feeds in data:
            taken.append(dict(feeds))
            if len(taken) >= count:
                break
        if taken:
            return taken
    return synthetic_feeds(model, count)


def run_outputs(session, feeds_list: list[Feeds]) -> list[list[np.ndarray]]:
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds_list]


def max_deviation(expected: list[list[np.ndarray]], actual: list[list[np.ndarray]], atol: float, rtol: float
                  ) -> tuple[bool, float]:
    """(within tolerance, largest absolute difference) over every output of every sample."""
    ok, worst = True, 0.0
    for exp_outs, act_outs in zip(expected, actual):
        for e, a in zip(exp_outs, act_outs):
            if e.shape != a.shape:
                return False, float("inf")
            if not np.issubdtype(e.dtype, np.floating):
                ok &= bool(np.array_equal(e, a))
                continue
            diff = np.abs(e.astype(np.float64) - a.astype(np.float64))
            if not np.all(np.isfinite(a) == np.isfinite(e)):
                return False, float("inf")
            diff = np.nan_to_num(diff)
            worst = max(worst, float(diff.max(initial=0.0)))
            ok &= bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(e))))
    return ok, worst


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
    return max(found, key=found.get) if found else (0, 0)


def _fuse_transformer(model, config: PreprocessConfig):
    return fuse_transformer(model, config.model_type, config.num_heads, config.hidden_size)


def fuse_transformer(model, model_type: str = "bert", num_heads: int = 0, hidden_size: int = 0, *,
                     use_gpu: bool = False) -> tuple[Any, dict[str, Any]]:
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
        fused = optimize_model(work, model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0,
                               use_gpu=use_gpu)
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    result = fused.model
    domains = {n.domain for n in result.graph.node} - {"", "ai.onnx"}
    declared = {o.domain for o in result.opset_import}
    for domain in sorted(domains - declared):  # the fusions use com.microsoft ops without declaring it
        result.opset_import.append(helper.make_opsetid(domain, 1))
    return result, {"fused": stats, "num_heads": heads, "hidden_size": hidden}


_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "If", "Loop", "Scan", "SequenceConstruct"}
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
        foldable = (node.domain in ("", "ai.onnx") and node.op_type not in _NOT_FOLDABLE
                    and all(i in consts for i in node.input if i)
                    and not any(o in graph_outputs for o in node.output))
        if foldable:
            try:
                mini = helper.make_model(
                    helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(o) for o in node.output],
                                      [numpy_helper.from_array(consts[i], i) for i in dict.fromkeys(node.input) if i]),
                    opset_imports=opsets)
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
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in graph.node for a in n.attribute)
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
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or any(
                a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        conv = producer.get(bn.input[0])
        params = bn.input[1:5]
        if (conv is None or conv.op_type != "Conv" or len(consumers.get(conv.output[0], [])) != 1
                or conv.output[0] in graph_outputs or conv.input[1] not in inits
                or not all(p in inits for p in params)
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits)):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        factor = gamma / np.sqrt(var + eps)
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
                if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype
        # named after the Conv: two Convs sharing one weight, each with its own BatchNorm, get two
        key = conv.name or conv.output[0]
        w_name, b_name = f"{key}/bn_folded_weight", f"{key}/bn_folded_bias"
        graph.initializer.extend([
            numpy_helper.from_array((w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype), w_name),
            numpy_helper.from_array(((bias - mean) * factor + beta).astype(dtype), b_name)])
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


def _infer_shapes(model, config: PreprocessConfig):
    import onnx

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


def preprocess(model, config: PreprocessConfig = PreprocessConfig(),
               data: Iterable[Mapping[str, np.ndarray]] | None = None) -> StageResult:
    """Run the enabled steps in order (fusion, constant folding, shape inference), each checked."""
    feeds = check_feeds(model, data, config.check_samples)
    reference = run_outputs(make_session(model, optimization="basic"), feeds)
    steps: list[tuple[str, Any]] = []
    fuse = config.transformer_fusion == "on" or (config.transformer_fusion == "auto"
                                                 and looks_like_transformer(model))
    if fuse and not (FUSED_TRANSFORMER_OPS & {n.op_type for n in model.graph.node}):
        steps.append(("transformer_fusion", _fuse_transformer))
    if config.batchnorm_folding and any(n.op_type == "BatchNormalization" for n in model.graph.node):
        steps.append(("batchnorm_folding", _fold_batchnorm))
    if config.constant_folding:
        steps.append(("constant_folding", _fold_constants))
    if config.shape_inference:
        steps.append(("shape_inference", _infer_shapes))

    report_steps = []
    current = model
    for name, step in steps:
        entry: dict[str, Any] = {"step": name}
        try:
            candidate, details = step(current, config)
            entry.update(details)
            ok, worst = max_deviation(reference, run_outputs(make_session(candidate, optimization="basic"), feeds),
                                      config.atol, config.rtol)
            entry["max_abs_diff"] = worst
            entry["applied"] = ok
            if ok:
                current = candidate
            else:
                entry["reason"] = f"outputs moved by {worst:.3g} (> atol {config.atol}, rtol {config.rtol}): rejected"
        except Exception as e:  # noqa: BLE001 - a failed optional step is reported, the model kept as it was
            entry.update(applied=False, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        report_steps.append(entry)
    report = {"config": config_to_dict(config), "steps": report_steps, "check_feeds": len(feeds),
              "ops_before": op_counts(model), "ops_after": op_counts(current)}
    return StageResult(current, report)


__all__ = ["FUSED_TRANSFORMER_OPS", "PreprocessConfig", "check_feeds", "looks_like_transformer", "make_session",
           "max_deviation", "op_counts", "preprocess", "replace_nodes", "run_outputs", "synthetic_feeds"]


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
