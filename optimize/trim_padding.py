"""Padding removal: compute only the batch's real tokens, as a graph transformation.

Tokenizers pad a batch to a fixed length (or to its longest member); in the real padded sentences of
model:minilm 81 % of the positions are padding, and a mask-respecting encoder computes them only to
throw them away. The rewrite inserts, before every other node, a prefix that reads the attention
mask, computes the batch's longest real length L (the last position whose mask is non-zero, + 1, at
least 1) and slices every token input ([B, T, ...]: input_ids, attention_mask, token_type_ids,
position ids) to [:, :L]. Outputs with a token axis ([B, T, ...]) are padded back to T with Pad, so
the model's inputs, outputs and output shapes are unchanged; pooled outputs ([B, D]) need nothing.

What the padded-back positions hold: zeros. The untrimmed model computed values there from padding
tokens, which a mask-respecting consumer ignores; a consumer that reads them gets zeros instead.
Equivalence is therefore judged on the real (mask = 1) positions of per-token outputs and on the
whole of pooled outputs.

Because the prefix comes before everything, the rewrite does not depend on what follows: FP32, INT8
(QDQ, and the QOperator/QAttention graphs of ORT's quantizer), INT4 (MatMulNBits) and the fused
com.microsoft Attention/EmbedLayerNormalization ops (their mask input is the sliced mask) all see a
shorter sequence. Only a graph with the sequence length baked into constants (a fixed-shape export's
Reshape to [B, 128, ...]) cannot run shorter: `auto` then refuses with ONNX Runtime's error.

The packed form (pack_tokens_graph, below) computes only the real tokens of all rows; the model written
keeps both bodies after the prefix and picks one per call (switch_graph): the sliced body when the sliced
mask has no padding left (every batch of one), the packed body otherwise.

Only right padding is removed: with left padding the last real position is T - 1 and L = T (nothing
is sliced, the outputs are the model's own).

`auto` applies the rewrite only when held-out real inputs confirm it: the trimmed and the untrimmed
model run on them, padded (each sample as given, and samples padded further and batched with mixed
lengths), and every output's mean cosine must be at least `min_cosine` (0.999). An output that
depends on the padding (e.g. a mean over all positions without the mask) fails that and the reason
names it. For a quantized model with its float source at hand (quantize), that test runs on the
float model, and the quantized one must keep its fidelity to it once trimmed (see trim_padding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from dlopt.errors import InputError, StageError
from dlopt.stage import Artifact, Check, StageContext, StageInput, StageResult, config_to_dict, register_stage

TrimMode = Literal["auto", "on", "off"]
TRIM_MODES: tuple[str, ...] = ("auto", "on", "off")
TrimForm = Literal["auto", "pack", "slice"]
TRIM_FORMS: tuple[str, ...] = ("auto", "pack", "slice")
MASK_NAMES = ("attention_mask", "input_mask", "mask")  # looked up in this order when the config names none
PREFIX = "trim_padding/"
MIN_OPSET = 11  # Range, Pad with a pads input
MIN_COSINE = 0.999
QUANTIZED_MARGIN = 0.001  # a quantized model's mean cosine to its float source may drop this much once trimmed
EXTRA_PADDING = 32  # positions added after the longest sample in the check's padded batches
CHECK_BATCH = 8


@dataclass(frozen=True, kw_only=True)
class TrimPadding:
    """`mode`: auto (applied when held-out inputs confirm equivalence), on (applied; figures reported when
    there is data), off. `mask_input`: the attention-mask input (default: attention_mask, input_mask or
    mask). `min_cosine`: auto's floor on every output's mean cosine, trimmed vs untrimmed. `form`: pack (only
    the real tokens of all rows, as one sequence: see pack_tokens_graph), slice (to the batch's longest
    real length), or auto (pack where the graph allows it and the check passes, else slice)."""

    VERSION: ClassVar[int] = 1  # form came with a default: version 1 configs read the same
    mode: TrimMode = "auto"
    form: TrimForm = "auto"
    mask_input: str | None = None
    min_cosine: float = MIN_COSINE
    samples: int = 16  # held-out samples the check reads


def validate(config: TrimPadding) -> None:
    if config.mode not in TRIM_MODES:
        raise InputError(f"unknown trim-padding mode {config.mode!r}", f"choose one of {', '.join(TRIM_MODES)}")
    if config.form not in TRIM_FORMS:
        raise InputError(f"unknown trim-padding form {config.form!r}", f"choose one of {', '.join(TRIM_FORMS)}")
    if not 0 < config.min_cosine <= 1:
        raise InputError(f"trim-padding min_cosine {config.min_cosine} is out of range", "give a value in (0, 1]")
    if config.samples < 1:
        raise InputError(f"trim-padding samples {config.samples} must be >= 1", "e.g. 16")


# -- which inputs and outputs ------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What the rewrite slices and pads back, or why it cannot apply (`reason`)."""

    mask: str | None
    token_inputs: tuple[str, ...] = ()
    per_token_outputs: tuple[str, ...] = ()
    pooled_outputs: tuple[str, ...] = ()
    reason: str | None = None

    def mask_name(self) -> str:
        """The mask input of a plan that applies."""
        if self.mask is None:
            raise StageError(f"trim-padding does not apply: {self.reason}", "leave trim-padding off for this model")
        return self.mask


def _dims(value_info) -> list[Any] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def plan(model, mask_input: str | None = None) -> Plan:
    """The mask, the token inputs (rank >= 2, axis 1 the mask's) and the outputs with a token axis."""
    inputs = {i.name: i for i in model.graph.input}
    initializers = {t.name for t in model.graph.initializer}
    inputs = {k: v for k, v in inputs.items() if k not in initializers}
    if mask_input is not None and mask_input not in inputs:
        raise InputError(
            f"trim-padding: the model has no input {mask_input!r}", f"name one of its inputs: {', '.join(inputs)}"
        )
    mask = mask_input or next((n for n in MASK_NAMES if n in inputs), None)
    if mask is None:
        return Plan(None, reason=f"no attention-mask input (looked for {', '.join(MASK_NAMES)})")
    if any(node.name.startswith(PREFIX) for node in model.graph.node):
        return Plan(mask, reason="the model is trimmed already")
    if _opset(model) < MIN_OPSET:
        return Plan(mask, reason=f"opset {_opset(model)} is below {MIN_OPSET} (Range, Pad with a pads input)")
    mask_dims = _dims(inputs[mask])
    if mask_dims is None or len(mask_dims) != 2:
        return Plan(mask, reason=f"the mask {mask!r} is not declared [batch, sequence]")
    seq = mask_dims[1]
    if seq is None:
        return Plan(mask, reason=f"the mask {mask!r} has an unnamed sequence axis: cannot tell which inputs share it")
    tokens = tuple(n for n, v in inputs.items() if (d := _dims(v)) is not None and len(d) >= 2 and d[1] == seq)
    per_token: list[str] = []
    pooled: list[str] = []
    for out in model.graph.output:
        dims = _dims(out)
        if dims is None:
            return Plan(mask, reason=f"output {out.name!r} declares no shape: cannot tell whether it has a token axis")
        (per_token if len(dims) >= 2 and dims[1] == seq else pooled).append(out.name)
    if set(per_token) & set(inputs):
        return Plan(mask, reason="an output is a graph input")
    return Plan(mask, tokens, tuple(per_token), tuple(pooled))


def sliced_name(name: str) -> str:
    """The name trim_padding_graph gives token input `name` sliced."""
    return PREFIX + f"{name}_trimmed"


# -- the rewrite --------------------------------------------------------------------------------------
def trim_padding_graph(model, mask_input: str | None = None):
    """(trimmed copy of `model`, Plan). Raises StageError when the plan has a reason not to apply."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = plan(model, mask_input)
    if p.reason is not None:
        raise StageError(f"trim-padding does not apply: {p.reason}", "leave trim-padding off for this model")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    n = lambda name: PREFIX + name  # noqa: E731

    def const(name: str, values) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), n(name)))
        return n(name)

    one, one_v, axis1, shape1 = const("one", 1), const("one_v", [1]), const("axis1", [1]), const("shape1", [1])
    prefix = [
        helper.make_node("Cast", [p.mask_name()], [n("mask_i64")], to=TensorProto.INT64, name=n("cast_mask")),
        helper.make_node("Shape", [p.mask_name()], [n("mask_shape")], name=n("shape")),
        helper.make_node("Gather", [n("mask_shape"), one], [n("T")], axis=0, name=n("seq_len")),
        helper.make_node("Add", [n("T"), one], [n("T_plus_1")], name=n("t_plus_1")),
        # positions 1..T weighted by the mask: their maximum is the last real position + 1, per batch
        helper.make_node("Range", [one, n("T_plus_1"), one], [n("positions")], name=n("positions")),
        helper.make_node("Mul", [n("mask_i64"), n("positions")], [n("real_positions")], name=n("real_positions")),
        helper.make_node("ReduceMax", [n("real_positions")], [n("longest_2d")], keepdims=1, name=n("longest")),
        helper.make_node("Reshape", [n("longest_2d"), shape1], [n("longest")], name=n("longest_1d")),
        # at least one position: an all-padding batch still runs (on its first position)
        helper.make_node("Concat", [n("longest"), one_v], [n("longest_or_one")], axis=0, name=n("longest_or_one")),
        helper.make_node("ReduceMax", [n("longest_or_one")], [n("L")], keepdims=1, name=n("L")),
    ]
    renamed = {}
    for name in p.token_inputs:
        renamed[name] = sliced_name(name)
        prefix.append(
            helper.make_node(
                "Slice", [name, const(f"{name}_start", [0]), n("L"), axis1], [renamed[name]], name=n(f"slice_{name}")
            )
        )
    body = list(g.node)
    produced_outputs = {o for node in body for o in node.output}
    suffix = []
    if p.per_token_outputs:
        suffix += [
            helper.make_node("Reshape", [n("T"), shape1], [n("T_1d")], name=n("T_1d")),
            helper.make_node("Sub", [n("T_1d"), n("L")], [n("padding")], name=n("padding")),
        ]
    for name in p.per_token_outputs:
        if name not in produced_outputs:
            raise StageError(f"trim-padding: output {name!r} has no producing node", "report this model")
        rank = len(_dims(next(o for o in g.output if o.name == name)) or ())
        renamed_out = n(f"{name}_trimmed")
        for node in body:  # the producer writes the trimmed tensor; the Pad writes the output
            for i, o in enumerate(node.output):
                if o == name:
                    node.output[i] = renamed_out
        renamed[name] = renamed_out
        pads_parts = [const(f"{name}_pads_head", [0] * (rank + 1)), n("padding")]
        if rank > 2:
            pads_parts.append(const(f"{name}_pads_tail", [0] * (rank - 2)))
        suffix += [
            helper.make_node("Concat", pads_parts, [n(f"{name}_pads")], axis=0, name=n(f"{name}_pads")),
            helper.make_node("Pad", [renamed_out, n(f"{name}_pads")], [name], mode="constant", name=n(f"pad_{name}")),
        ]
    for node in body:
        _rename_inputs(node, renamed)
    del g.node[:]
    g.node.extend(prefix + body + suffix)
    # Inferred shapes may hold the padded length (a fixed 128): ORT re-infers them from the sliced inputs.
    del g.value_info[:]
    return out, p


def _rename_inputs(node, renamed: Mapping[str, str]) -> None:
    """Point `node` (and the subgraphs of its attributes, which may read outer names) at the renamed tensors."""
    for i, name in enumerate(node.input):
        if name in renamed:
            node.input[i] = renamed[name]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                _rename_inputs(inner, renamed)


# -- packing: only the real tokens, across the batch ---------------------------------------------------
# Slicing to the batch's longest real length leaves the padding inside the shorter rows: in batches of 8
# of model:minilm's sentences, 45 positions per row are computed where 28 are real. Packing computes only
# the real tokens: after the embeddings, the real positions of all rows are gathered into one [T, H]
# matrix; the per-token layers (projections, LayerNorm, GELU, residual sums, their quantize/dequantize)
# run on it unchanged, since they act on each token alone; each fused attention op is split into its QKV
# projection (on the T packed tokens) and MultiHeadAttention on the projections gathered to [B, L, 3H]
# with the padding mask, whose output is packed again; where a tensor leaves the per-token layers (mask
# pooling, a per-token output) it is scattered back to [B, L, H] with zeros at the padding positions.
# Only graphs whose attention is a fused com.microsoft Attention/QAttention op qualify: an unfused
# attention's Reshape/Transpose/MatMul mix the batch and sequence axes, which packed tokens do not have.
#
# The attention forms measured on MiniLM INT8, batches of 8 of model:minilm's sentences padded to 128
# (AMD EPYC Zen 4, one thread, thread CPU time, vs FP32 on the padded batch): sliced only 8.7x; packed
# with QAttention on the packed sequence and a block-diagonal [1, T, T] mask 11.1x (it spends as long on
# the T x T scores as on its projection); QAttention on its input gathered to [B, L, H] 11.7x; split as
# here 12.3x.
ATTENTION_MASK_INPUT = {"Attention": 3, "QAttention": 5}  # com.microsoft ops -> index of their mask input
ATTENTION_PAST_INPUT = {"Attention": 4, "QAttention": 8}
# Ops that act on each token alone (along the last axis), so that [T, H] in place of [B, L, H] computes
# the same per token. Binary ops qualify only when their other operand is a constant or derived from
# packed tensors (checked below); MatMul-like ops only with a constant weight.
TOKENWISE_OPS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Sum",
        "Cast",
        "Identity",
        "Relu",
        "Gelu",
        "BiasGelu",
        "FastGelu",
        "QuickGelu",
        "Erf",
        "Tanh",
        "Sigmoid",
        "Sqrt",
        "Pow",
        "Reciprocal",
        "Neg",
        "LayerNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "DynamicQuantizeLinear",
        "MatMul",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "Abs",
        "Max",
        "ReduceMax",
        "QuantizeLinear",
        "DequantizeLinear",
    }
)
_WEIGHTED_OPS = {
    "MatMul": 1,
    "MatMulInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulIntegerToFloat": 1,
    "MatMulNBits": 1,
}
_LAST_AXIS_OPS = {"LayerNormalization", "SimplifiedLayerNormalization"}
PACKED_ATTENTION = "split"  # the QKV projection on the packed tokens, MultiHeadAttention on [B, L] (see above)


@dataclass(frozen=True)
class PackPlan:
    """Where packing starts (`start`: the embeddings' output), the nodes that run packed and the attention
    nodes among them (indices in graph.node), the tensors scattered back, or why packing does not apply."""

    start: str | None = None
    packed_nodes: tuple[int, ...] = ()
    attention_nodes: tuple[int, ...] = ()
    unpacked: tuple[str, ...] = ()
    reason: str | None = None


def _attr(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _tokenwise_arguments(node, values: Mapping[str, np.ndarray]) -> bool:
    """A ReduceMax over the last axis only (per-token scales: optimize.quantize.token_scales); a
    QuantizeLinear/DequantizeLinear with one scale. Other token-wise ops have no such arguments."""
    if node.op_type == "ReduceMax":
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1:
            axes = values.get(node.input[1])
        return axes is not None and [int(a) for a in np.ravel(axes)] == [-1] and _attr(node, "keepdims", 1) == 1
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        scale = values.get(node.input[1])
        return scale is not None and scale.size == 1
    return True


def pack_plan(model) -> PackPlan:
    """Whether the per-token layers of `model` (a trimmed graph: see trim_padding_graph) can run on the
    real tokens packed into one sequence, and what that takes."""
    g = model.graph
    nodes = list(g.node)
    attention = [n for n in nodes if n.domain == "com.microsoft" and n.op_type in ATTENTION_MASK_INPUT]
    if not attention:
        return PackPlan(reason="no fused attention op (com.microsoft Attention/QAttention) to give a packed mask")
    for n in attention:
        if (
            _attr(n, "unidirectional", 0)
            or len(n.input) <= ATTENTION_MASK_INPUT[n.op_type]
            or not n.input[ATTENTION_MASK_INPUT[n.op_type]]
        ):
            return PackPlan(reason=f"attention {n.name!r} is causal or has no mask input")
        carried = ("num_heads", "scale", "mask_filter_value", "unidirectional")
        unusual = [a.name for a in n.attribute if a.name not in carried]
        if unusual:
            return PackPlan(
                reason=f"attention {n.name!r} has attributes {', '.join(unusual)} the packed form does not carry over"
            )
        past = ATTENTION_PAST_INPUT[n.op_type]
        if (
            (len(n.input) > past and n.input[past])
            or (len(n.output) > 1 and n.output[1])
            or any(len(n.input) > i and n.input[i] for i in range(past + 1, past + 4))
        ):
            return PackPlan(reason=f"attention {n.name!r} takes past state or extra inputs")
    producer = {o: n for n in nodes for o in n.output}
    start = attention[0].input[0]
    while start in producer and producer[start].op_type == "DynamicQuantizeLinear":
        start = producer[start].input[0]
    constants = {t.name for t in g.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    from onnx import numpy_helper

    initial_values = {t.name: numpy_helper.to_array(t) for t in g.initializer if np.prod(t.dims) <= 16}
    # tensors that vary with the inputs: a packed node's other operand must not be one of these unless packed
    varying = {i.name for i in g.input} - constants
    for n in nodes:
        if any(i in varying for i in n.input) or n.op_type in ("RandomNormal", "RandomUniform"):
            varying.update(o for o in n.output if o)
    packed_tensors, packed_nodes, boundary = {start}, [], []
    seen_start = start not in producer
    for index, n in enumerate(nodes):
        if not seen_start:
            seen_start = start in n.output
            continue
        ins = [i for i in n.input if i in packed_tensors]
        if not ins:
            continue
        if n.domain == "com.microsoft" and n.op_type in ATTENTION_MASK_INPUT:
            mask_at = ATTENTION_MASK_INPUT[n.op_type]
            others = [i for k, i in enumerate(n.input) if i and k not in (0, mask_at) and i not in packed_tensors]
            if n.input[0] not in packed_tensors or any(i in varying for i in others):
                return PackPlan(reason=f"attention {n.name!r} reads padded tensors beside the packed ones")
        elif n.op_type in TOKENWISE_OPS and n.domain in ("", "ai.onnx", "com.microsoft"):
            weight = _WEIGHTED_OPS.get(n.op_type)
            if weight is not None and (len(n.input) <= weight or n.input[weight] not in constants):
                boundary.append(n)
                continue
            if any(i and i not in packed_tensors and i in varying for i in n.input):
                boundary.append(n)  # it also reads a padded tensor (mask pooling): it reads ours scattered back
                continue
            if n.op_type in _LAST_AXIS_OPS and _attr(n, "axis", -1) != -1:
                return PackPlan(reason=f"{n.op_type} {n.name!r} normalizes over more than the last axis")
            if not _tokenwise_arguments(n, initial_values):
                boundary.append(n)  # a reduction over tokens, or per-channel (de)quantization of activations
                continue
        else:
            boundary.append(n)
            continue
        packed_nodes.append(index)
        packed_tensors.update(o for o in n.output if o)
    attention_at = tuple(
        i for i, n in enumerate(nodes) if n.domain == "com.microsoft" and n.op_type in ATTENTION_MASK_INPUT
    )
    if not set(attention_at) <= set(packed_nodes):
        return PackPlan(reason="not every attention op is reached through per-token ops from the embeddings")
    # the start tensor itself stays [B, L, H] for the nodes that do not run packed
    unpacked = sorted(
        (
            {i for n in boundary for i in n.input if i in packed_tensors}
            | {o.name for o in g.output if o.name in packed_tensors}
        )
        - {start}
    )
    if start in {o.name for o in g.output}:
        return PackPlan(reason="the embeddings are a graph output")
    # what leaves the packed layers must be a token tensor: a DynamicQuantizeLinear scale read outside cannot be
    scalars = {o for i in packed_nodes if nodes[i].op_type == "DynamicQuantizeLinear" for o in nodes[i].output[1:]}
    if set(unpacked) & scalars:
        return PackPlan(reason="a per-batch quantization scale is read outside the per-token layers")
    return PackPlan(start, tuple(packed_nodes), attention_at, tuple(unpacked))


def pack_tokens_graph(trimmed, mask: str):
    """(packed copy of the trimmed model `trimmed`, PackPlan); `mask`: the (sliced) mask tensor the
    packing reads. Raises StageError when pack_plan gives a reason not to."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dlopt.optimize.normalize import topological_sort

    pp = pack_plan(trimmed)
    if pp.reason is not None or pp.start is None:
        raise StageError(f"trim-padding cannot pack the tokens: {pp.reason}", "use the slice form")
    out = onnx.ModelProto()
    out.CopyFrom(trimmed)
    g = out.graph
    n = lambda name: PREFIX + "pack/" + name  # noqa: E731

    def const(name: str, values) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), n(name)))
        return n(name)

    start: str = pp.start
    packed_start = n("start")
    minus_one, zero_v, one_v, two_v = (
        const("minus_one", [-1]),
        const("zero_v", [0]),
        const("one_v", [1]),
        const("two_v", [2]),
    )
    end = const("end", [2**62])
    node = helper.make_node
    nodes = [
        # the real positions of the flattened [B, L] mask; an all-padding batch keeps position 0 (as slicing does)
        node("Cast", [mask], [n("mask_bool")], to=TensorProto.BOOL, name=n("mask_bool")),
        node("Cast", [n("mask_bool")], [n("mask_i64")], to=TensorProto.INT64, name=n("mask_i64")),
        node("Reshape", [n("mask_i64"), minus_one], [n("flat")], name=n("flat")),
        node("ReduceMax", [n("flat")], [n("any")], keepdims=1, name=n("any")),
        node("Sub", [one_v, n("any")], [n("none")], name=n("none")),
        node("Shape", [n("flat")], [n("flat_len")], name=n("flat_len")),
        node("Sub", [n("flat_len"), one_v], [n("tail")], name=n("tail")),
        node("Concat", [zero_v, n("tail")], [n("pads")], axis=0, name=n("pads")),
        node("Pad", [n("none"), n("pads")], [n("first_if_none")], mode="constant", name=n("first_if_none")),
        node("Add", [n("flat"), n("first_if_none")], [n("keep")], name=n("keep")),
        node("NonZero", [n("keep")], [n("nonzero")], name=n("nonzero")),
        node("Reshape", [n("nonzero"), minus_one], [n("index")], name=n("index")),
        node("Unsqueeze", [n("index"), one_v], [n("index_2d")], name=n("index_2d")),
        # [B, L, H] -> [B*L, H] -> the real rows [T, H]
        node("Flatten", [start], [n("start_flat")], axis=2, name=n("start_flat")),
        node("Gather", [n("start_flat"), n("index")], [packed_start], axis=0, name=n("gather")),
        node("Shape", [start], [n("start_shape")], name=n("start_shape")),
        node("Slice", [n("start_shape"), zero_v, two_v], [n("batch_and_length")], name=n("batch_and_length")),
        node("ReduceProd", [n("batch_and_length")], [n("rows")], keepdims=1, name=n("rows")),
        # where each position of [B, L] finds its packed row: its own, or row 0 for a padding position (the
        # attention's mask hides it as a key, and its output is dropped when packed again)
        node("CumSum", [n("keep"), zero_v], [n("count")], name=n("count")),
        node("Sub", [n("count"), one_v], [n("rank")], name=n("rank")),
        node("Mul", [n("rank"), n("keep")], [n("position_map_flat")], name=n("position_map_flat")),
        node("Reshape", [n("position_map_flat"), n("batch_and_length")], [n("position_map")], name=n("position_map")),
        node("Cast", [mask], [n("mask_i32")], to=TensorProto.INT32, name=n("mask_i32")),
    ]
    renamed: dict[str, str] = {start: packed_start}
    packed = set(pp.packed_nodes)
    outputs = {o.name for o in g.output}
    for name in pp.unpacked:
        if name in outputs:  # the graph output keeps its name: the packed tensor is renamed
            packed_name, target = n(f"{name}/packed"), name
            for i in packed:
                g.node[i].output[:] = [packed_name if o == name else o for o in g.node[i].output]
            renamed[name] = packed_name
        else:
            packed_name, target = name, n(f"{name}/unpacked")
            for i, item in enumerate(g.node):
                if i not in packed:
                    _rename_inputs(item, {name: target})
        t = lambda suffix, name=name: n(f"{name}/{suffix}")  # noqa: E731
        # [T, W] -> zeros [B*L, W] with the real rows scattered in -> [B, L, W]
        nodes += [
            node("Shape", [packed_name], [t("rows_shape")], name=t("rows_shape")),
            node("Slice", [t("rows_shape"), one_v, end], [t("width")], name=t("width")),
            node("Concat", [n("rows"), t("width")], [t("flat_shape")], axis=0, name=t("flat_shape")),
            node(
                "ConstantOfShape",
                [t("flat_shape")],
                [t("zeros")],
                name=t("zeros"),
                value=numpy_helper.from_array(np.zeros(1, np.float32)),
            ),
            node("ScatterND", [t("zeros"), n("index_2d"), packed_name], [t("scattered")], name=t("scatter")),
            node("Concat", [n("batch_and_length"), t("width")], [t("shape")], axis=0, name=t("shape")),
            node("Reshape", [t("scattered"), t("shape")], [target], name=t("unpack")),
        ]
    replaced = []
    for i, item in enumerate(g.node):
        if i not in packed:
            continue
        _rename_inputs(item, renamed)
        if i in pp.attention_nodes:
            nodes += _split_attention(out, item, lambda suffix, i=i: n(f"attention{i}/{suffix}"), n)
            replaced.append(i)
        elif item.op_type in _LAST_AXIS_OPS:  # [T, H] has no axis 2
            for a in item.attribute:
                if a.name == "axis":
                    a.i = -1
    kept = [item for i, item in enumerate(g.node) if i not in replaced]
    del g.node[:]
    g.node.extend(kept + nodes)
    topological_sort(g)  # the packing after the embeddings, each scatter after its tensor's producer
    return out, pp


# A batch with no padding left once sliced (every batch of one, and batches of equal lengths) gains nothing
# from packing and pays for it (the gathers and scatters, MultiHeadAttention beside a split projection in
# place of QAttention): MiniLM INT8 on one sentence of 28 tokens, sliced 3.42 ms, packed 3.45 ms (AMD EPYC
# Zen 4, one thread, thread CPU time). So the packed form branches, at run time, on whether the sliced mask
# has any padding: an If runs the sliced body when it has none and the packed body otherwise. Both bodies
# read the same initializers (the file does not grow); ORT prepacks the weights once per kernel, so the
# packed weights are held twice in memory.


def switch_graph(sliced, packed, p: Plan):
    """One model that runs `sliced`'s body when the sliced mask has no padding and `packed`'s otherwise (an
    If after the common trim prefix). `packed` must be `sliced` packed (pack_tokens_graph): the two share
    the prefix that slices the token inputs, which stays outside the If."""
    import onnx
    from onnx import TensorProto, helper

    g = sliced.graph
    producer = {o: node for node in g.node for o in node.output if o}
    prefix_ids: set[int] = set()
    stack = [sliced_name(t) for t in p.token_inputs]
    while stack:  # the prefix: every node the sliced token inputs depend on
        node = producer.get(stack.pop())
        if node is not None and id(node) not in prefix_ids:
            prefix_ids.add(id(node))
            stack.extend(node.input)
    prefix_nodes = [node for node in g.node if id(node) in prefix_ids]
    prefix_names = {node.name for node in prefix_nodes}
    if len(prefix_names) != len(prefix_nodes) or not prefix_names <= {node.name for node in packed.graph.node}:
        raise StageError("trim-padding: the packed model does not share the sliced model's prefix", "report this model")
    outputs = [o.name for o in g.output]

    def branch(model, tag: str):
        """The model's nodes after the prefix as a subgraph; the tensors they make are renamed under the tag
        (two branches of one If must not define the same names)."""
        nodes = []
        for node in model.graph.node:
            if node.name in prefix_names:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            nodes.append(copy)
        renamed = {o: f"{PREFIX}{tag}/{o}" for node in nodes for o in node.output if o}
        for node in nodes:
            _rename_inputs(node, renamed)
            node.output[:] = [renamed.get(o, o) for o in node.output]
            node.name = f"{PREFIX}{tag}/{node.name}" if node.name else ""
        declared = {o.name: o for o in model.graph.output}
        branch_outputs = [
            helper.make_tensor_value_info(renamed[name], declared[name].type.tensor_type.elem_type, None)
            for name in outputs
        ]
        return helper.make_graph(nodes, tag, [], branch_outputs)

    out = onnx.ModelProto()
    out.CopyFrom(sliced)
    known = {t.name for t in out.graph.initializer}
    out.graph.initializer.extend(t for t in packed.graph.initializer if t.name not in known)
    domains = {o.domain for o in out.opset_import}
    out.opset_import.extend(o for o in packed.opset_import if o.domain not in domains)
    n = lambda name: PREFIX + "switch/" + name  # noqa: E731
    mask = sliced_name(p.mask_name())
    switch = [
        # the sliced mask's smallest value: non-zero when no position of the batch is padding
        helper.make_node("Cast", [mask], [n("mask_float")], to=TensorProto.FLOAT, name=n("mask_float")),
        helper.make_node("ReduceMin", [n("mask_float")], [n("mask_min")], keepdims=0, name=n("mask_min")),
        helper.make_node("Cast", [n("mask_min")], [n("unpadded")], to=TensorProto.BOOL, name=n("unpadded")),
        helper.make_node(
            "If",
            [n("unpadded")],
            outputs,
            then_branch=branch(sliced, "sliced"),
            else_branch=branch(packed, "packed"),
            name=n("if"),
        ),
    ]
    del out.graph.node[:]
    out.graph.node.extend(prefix_nodes + switch)
    return out


def _split_attention(model, item, t, n) -> list:
    """The nodes that replace fused attention `item` on packed tokens: its QKV projection on them
    (MatMulIntegerToFloat for QAttention, MatMul + Add for Attention), gathered to [B, L, 3H],
    MultiHeadAttention with the padding mask, its output packed again to [T, H]."""
    from onnx import helper, numpy_helper

    node = helper.make_node
    heads = _attr(item, "num_heads")
    x, y = item.input[0], item.output[0]
    width = next(list(w.dims) for w in model.graph.initializer if w.name == item.input[1])[1] // 3
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, width], np.int64), t("rows_shape")))
    if item.op_type == "QAttention":
        ins = [
            x,
            item.input[1],
            item.input[3],
            item.input[4],
            item.input[6] if len(item.input) > 6 else "",
            item.input[7] if len(item.input) > 7 else "",
            item.input[2],
        ]
        nodes = [node("MatMulIntegerToFloat", ins, [t("qkv")], domain="com.microsoft", name=t("qkv"))]
    else:
        nodes = [
            node("MatMul", [x, item.input[1]], [t("qkv_nobias")], name=t("qkv_matmul")),
            node("Add", [t("qkv_nobias"), item.input[2]], [t("qkv")], name=t("qkv")),
        ]
    # Split needs its sizes said (num_outputs from opset 18, a sizes input from 13, an attribute before)
    outs, opset = [t("q"), t("k"), t("v")], _opset(model)
    if opset >= 18:
        split = node("Split", [t("padded_qkv")], outs, axis=2, num_outputs=3, name=t("split"))
    elif opset >= 13:
        model.graph.initializer.append(numpy_helper.from_array(np.array([width] * 3, np.int64), t("sizes")))
        split = node("Split", [t("padded_qkv"), t("sizes")], outs, axis=2, name=t("split"))
    else:
        split = node("Split", [t("padded_qkv")], outs, axis=2, split=[width] * 3, name=t("split"))
    nodes += [
        node("Gather", [t("qkv"), n("position_map")], [t("padded_qkv")], axis=0, name=t("unpack")),
        split,
        node(
            "MultiHeadAttention",
            [t("q"), t("k"), t("v"), "", n("mask_i32")],
            [t("padded_output")],
            domain="com.microsoft",
            num_heads=heads,
            name=t("attention"),
            **{k: _attr(item, k) for k in ("scale", "mask_filter_value") if _attr(item, k) is not None},
        ),
        node("Reshape", [t("padded_output"), t("rows_shape")], [t("output_rows")], name=t("output_rows")),
        node("Gather", [t("output_rows"), n("index")], [y], axis=0, name=t("pack")),
    ]
    return nodes


# -- the check ----------------------------------------------------------------------------------------
def padded_check_feeds(
    samples: Sequence[Mapping[str, np.ndarray]], p: Plan, *, extra: int = EXTRA_PADDING, batch: int = CHECK_BATCH
) -> list[dict[str, np.ndarray]]:
    """What the check runs on: each sample as given, then its rows cut to their real length and padded
    with zeros (mask 0) to the longest + `extra` positions, batched `batch` rows at a time (mixed lengths).
    Inputs without a token axis are kept per row. Zero is the padding value of every token input here:
    a model whose output reads the padded tokens' values fails the check, as it should."""
    feeds = [dict(s) for s in samples]
    rows: list[dict[str, np.ndarray]] = []
    for s in samples:
        mask = np.asarray(s[p.mask_name()])
        for r in range(mask.shape[0]):
            real = np.flatnonzero(mask[r])
            length = int(real[-1]) + 1 if real.size else 1
            rows.append(
                {
                    k: (np.asarray(v)[r : r + 1, :length] if k in p.token_inputs else np.asarray(v)[r : r + 1])
                    for k, v in s.items()
                }
            )
    if not rows:
        return feeds
    width = max(row[p.mask_name()].shape[1] for row in rows) + extra
    for start in range(0, len(rows), batch):
        group = rows[start : start + batch]
        batched = {}
        try:
            for k in group[0]:
                parts = [
                    np.pad(r[k], [(0, 0), (0, width - r[k].shape[1])] + [(0, 0)] * (r[k].ndim - 2))
                    if k in p.token_inputs
                    else r[k]
                    for r in group
                ]
                batched[k] = np.concatenate(parts, axis=0)
        except ValueError:  # a non-token input whose rows cannot be stacked: keep the per-sample feeds only
            return feeds
        feeds.append(batched)
    return feeds


def _ort_message(text: str, limit: int = 300) -> str:
    """ONNX Runtime's error in one line: without its source paths, the middle cut where it is long (the
    end says what failed, e.g. 'Attempting to broadcast an axis by a dimension other than 1. 24 by 44')."""
    import re

    text = " ".join(re.sub(r"/\S*onnxruntime\S*:\d+", "", text).split())
    return text if len(text) <= limit else f"{text[: limit // 3]} ... {text[-(2 * limit // 3) :]}"


def padded_run_problem(
    models: Sequence[Any],
    samples: Sequence[Mapping[str, np.ndarray]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    p: Plan,
) -> str | None:
    """Why the untrimmed `models` cannot run on the check's inputs padded further (a position embedding
    shorter than the padded length, a declared fixed sequence length), in one line; None when they run.
    Equivalence cannot be judged on padding the model never runs on, so auto leaves such a model
    untrimmed. Tried on the first padded batch only: every padded batch has the same width."""
    from dlopt.sessions import cpu_session, feeds_for, trial_run

    padded = list(feeds[len(samples) :])
    if not padded:
        return None
    width = int(np.shape(padded[0][p.mask_name()])[1])
    for model in models:
        session = cpu_session(model, error=StageError, hint="leave trim-padding off")
        try:
            trial_run(session, feeds_for(session, padded[0]))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors have no common public base class
            message = _ort_message(str(e))
            return (
                f"the model does not run on inputs padded to {width} tokens ({EXTRA_PADDING} beyond the "
                f"longest real length), which the equivalence check needs: {message}"
            )
    return None


def compare_outputs(reference, candidate, feeds: Sequence[Mapping[str, np.ndarray]], p: Plan) -> dict[str, dict]:
    """Per output: its kind, mean and worst cosine and max abs difference of `candidate` vs `reference`,
    over the rows of pooled outputs and the real (mask = 1) positions of per-token outputs."""
    from dlopt.fidelity import cosine_per_sample
    from dlopt.sessions import cpu_session, run_outputs

    ref_session = cpu_session(reference)
    names = [o.name for o in ref_session.get_outputs()]
    expected = run_outputs(ref_session, feeds)
    outputs = run_outputs(cpu_session(candidate, error=StageError, hint="leave trim-padding off"), feeds)
    figures: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        cos, diff = [], 0.0
        for f, ref_run, run in zip(feeds, expected, outputs):
            r, y = np.asarray(ref_run[j]), np.asarray(run[j])
            if r.shape != y.shape:
                raise StageError(
                    f"trim-padding changed output {name!r}'s shape {list(r.shape)} -> {list(y.shape)}",
                    "report this model",
                )
            if name in p.per_token_outputs:
                real = np.asarray(f[p.mask_name()]).astype(bool)
                r, y = r[real], y[real]
            if r.size == 0:
                continue
            cos.extend(cosine_per_sample(y.astype(np.float64), r.astype(np.float64)).tolist())
            diff = max(diff, float(np.max(np.abs(y.astype(np.float64) - r.astype(np.float64)))))
        figures[name] = {
            "kind": "per-token" if name in p.per_token_outputs else "pooled",
            "mean_cosine": round(float(np.mean(cos)), 6) if cos else None,
            "min_cosine": round(float(np.min(cos)), 6) if cos else None,
            "max_abs_diff": float(f"{diff:.4g}"),
        }
    return figures


def trim_padding(
    model,
    config: TrimPadding = TrimPadding(),
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    reference=None,
) -> StageResult:
    """Apply the rewrite per `config.mode` and `config.form`; the report says what was sliced, whether the
    tokens were packed (`form`: pack or slice, and why not pack), which outputs were padded back, the
    equivalence figures on `samples` (held-out real inputs) and, when not applied, why.

    `reference`: the float model `model` was quantized from. Then whether an output depends on the
    padding is judged on the float model (sliced vs untrimmed, cosine >= min_cosine), and the quantized
    model must keep its fidelity to the float model once trimmed (mean cosine at most QUANTIZED_MARGIN
    lower). Why not the quantized model against itself: dynamic INT8 takes its activation ranges per
    call, over padding too, so trimming reshuffles its rounding: MiniLM's INT8, trimmed vs untrimmed,
    measured cosine 0.997, while each was 0.991 from FP32 on the same padded inputs.

    Form auto tries pack first and falls back to slice when the graph cannot be packed or the packed
    model fails the check that the sliced one passes."""
    validate(config)
    report: dict[str, Any] = {"config": config_to_dict(config), "applied": False}
    if config.mode == "off":
        return StageResult(model, report | {"reason": "off"})
    p = plan(model, config.mask_input)
    if p.reason is not None:
        if config.mode == "on":
            raise InputError(f"--trim-padding on: {p.reason}", "use --trim-padding auto or off for this model")
        return StageResult(model, report | {"reason": p.reason})
    report.update(
        mask=p.mask,
        sliced_inputs=list(p.token_inputs),
        padded_back_outputs=list(p.per_token_outputs),
        pooled_outputs=list(p.pooled_outputs),
        padding_value=0,
    )
    sliced, _ = trim_padding_graph(model, p.mask)
    candidates: list[tuple[str, Any]] = []
    if config.form in ("auto", "pack"):
        packing = pack_plan(sliced)
        if packing.reason is None:
            packed, _ = pack_tokens_graph(sliced, sliced_name(p.mask_name()))
            packed = switch_graph(sliced, packed, p)
            candidates.append(("pack", packed))
            report["packing"] = {
                "attention": PACKED_ATTENTION,
                "unpadded_batches": "sliced",  # switch_graph
                "packed_nodes": len(packing.packed_nodes),
                "attention_nodes": len(packing.attention_nodes),
                "scattered_back": list(packing.unpacked),
            }
        elif config.form == "pack" and config.mode == "on":
            raise InputError(f"--trim-padding on with form pack: {packing.reason}", "use form auto or slice")
        else:
            report["pack_reason"] = packing.reason
    if config.form in ("auto", "slice"):
        candidates.append(("slice", sliced))
    if not candidates:  # form pack, auto mode, not packable
        return StageResult(model, report | {"reason": f"the tokens cannot be packed: {report['pack_reason']}"})
    samples = list(samples or [])[: config.samples]
    if not samples:
        form, chosen = candidates[0]
        if config.mode == "on":
            return StageResult(chosen, report | {"applied": True, "form": form, "equivalence": None})
        return StageResult(
            model, report | {"reason": "no held-out inputs to confirm equivalence on (give data, or trim-padding on)"}
        )
    feeds = padded_check_feeds(samples, p)
    problem = padded_run_problem([m for m in (reference, model) if m is not None], samples, feeds, p)
    if problem is not None:
        if config.mode == "on":
            name = model.graph.name or "unnamed"
            raise InputError(
                f"--trim-padding on: model graph {name!r}: {problem}",
                "use --trim-padding off for this model (or auto, which leaves it untrimmed)",
            )
        return StageResult(model, report | {"reason": problem})
    equivalence: dict[str, Any] = {
        "feeds": len(feeds),
        "min_cosine_required": config.min_cosine,
        "input_shapes": sorted({tuple(np.shape(f[p.mask_name()])) for f in feeds}),
    }
    report["equivalence"] = equivalence
    try:
        if reference is not None:
            reference_trimmed, _ = trim_padding_graph(reference, p.mask)
            equivalence["judged_on"] = "the float model; the quantized model's fidelity to it, trimmed vs untrimmed"
            equivalence["outputs"] = compare_outputs(reference, reference_trimmed, feeds, p)
            equivalence["fidelity_untrimmed"] = compare_outputs(reference, model, feeds, p)
            equivalence["quantized_margin"] = QUANTIZED_MARGIN
    except (StageError, InputError) as e:
        if config.mode == "on":
            raise
        return StageResult(model, report | {"reason": f"the trimmed model does not run: {e.message}"})
    if reference is not None:
        depends = [
            f"{k} (cosine {v['mean_cosine']:.4f})"
            for k, v in equivalence["outputs"].items()
            if v["mean_cosine"] is not None and v["mean_cosine"] < config.min_cosine
        ]
        if depends and config.mode == "auto":
            return StageResult(
                model,
                report
                | {
                    "reason": f"outputs depend on the padding: {', '.join(depends)} "
                    f"below {config.min_cosine} trimmed vs untrimmed"
                },
            )
    problems: list[str] = []
    for form, candidate in candidates:
        try:
            failing = _check_candidate(model, candidate, feeds, p, config, reference, equivalence, form)
        except (StageError, InputError) as e:
            if config.mode == "on" and form == candidates[-1][0]:
                raise
            problems.append(f"{form}: the trimmed model does not run: {e.message}")
            continue
        if not failing or config.mode == "on":
            if problems:
                report["pack_reason"] = "; ".join(problems)
            for key, of_form in (("outputs", f"outputs_{form}"), ("fidelity_trimmed", f"fidelity_{form}")):
                if of_form in equivalence:  # the figures of the form applied
                    equivalence[key] = equivalence[of_form]
            return StageResult(candidate, report | {"applied": True, "form": form})
        problems.append(f"{form}: {failing}")
    return StageResult(model, report | {"reason": "; ".join(problems)})


def _check_candidate(
    model, candidate, feeds, p: Plan, config: TrimPadding, reference, equivalence: dict[str, Any], form: str
) -> str | None:
    """Why `candidate` (the model trimmed in `form`) fails the check, or None; its figures go into
    `equivalence` (under the form's name when it is not the first checked)."""
    if reference is None:
        figures = compare_outputs(model, candidate, feeds, p)
        equivalence.setdefault("outputs", figures)
        equivalence[f"outputs_{form}"] = figures
        depends = [
            f"{k} (cosine {v['mean_cosine']:.4f})"
            for k, v in figures.items()
            if v["mean_cosine"] is not None and v["mean_cosine"] < config.min_cosine
        ]
        return (
            (f"outputs depend on the padding: {', '.join(depends)} below {config.min_cosine} trimmed vs untrimmed")
            if depends
            else None
        )
    trimmed_fidelity = compare_outputs(reference, candidate, feeds, p)
    equivalence.setdefault("fidelity_trimmed", trimmed_fidelity)
    equivalence[f"fidelity_{form}"] = trimmed_fidelity
    failing = []
    for name, before in equivalence["fidelity_untrimmed"].items():
        after = trimmed_fidelity[name]
        if (
            None not in (before["mean_cosine"], after["mean_cosine"])
            and after["mean_cosine"] < before["mean_cosine"] - QUANTIZED_MARGIN
        ):
            failing.append(
                f"{name} (cosine to the float model {before['mean_cosine']:.4f} untrimmed, "
                f"{after['mean_cosine']:.4f} trimmed)"
            )
    return f"trimming costs fidelity: {', '.join(failing)}" if failing else None


def summary_line(report: Mapping[str, Any] | None) -> str | None:
    """One line for the quantize log: applied with its figures, or why not."""
    if not report or report.get("reason") == "off":
        return None
    if not report.get("applied"):
        return f"trim-padding: not applied: {report.get('reason')}"
    eq = report.get("equivalence")
    figures = (
        ""
        if not eq
        else "; trimmed vs untrimmed cosine "
        + ", ".join(f"{k} {v['mean_cosine']}" for k, v in eq["outputs"].items())
        + f" on {eq['feeds']} padded batches"
    )
    back = report.get("padded_back_outputs") or []
    if eq and eq.get("fidelity_trimmed"):
        figures += "; cosine to the float model " + ", ".join(
            f"{k} {v['mean_cosine']} untrimmed, {eq['fidelity_trimmed'][k]['mean_cosine']} trimmed"
            for k, v in eq["fidelity_untrimmed"].items()
        )
    how = (
        "packed: only the real tokens of all rows computed, as one sequence"
        + (
            " (a batch with no padding once sliced runs sliced)"
            if (report.get("packing") or {}).get("unpadded_batches") == "sliced"
            else ""
        )
        if report.get("form") == "pack"
        else "sliced to the batch's longest real length"
    )
    why_not = (
        f" (not packed: {report['pack_reason']})" if report.get("form") == "slice" and report.get("pack_reason") else ""
    )
    return (
        f"trim-padding: inputs {', '.join(report['sliced_inputs'])} {how}{why_not}"
        + (f", {', '.join(back)} padded back with zeros" if back else "")
        + figures
    )


# -- the stage ----------------------------------------------------------------------------------------
def _onnx_problem(model, config, before) -> str | None:
    import onnx

    return None if isinstance(model, onnx.ModelProto) else f"got a {type(model).__name__}"


def _same_interface(model, config, before) -> str | None:
    sig = lambda m: ([(i.name, _dims(i)) for i in m.graph.input], [(o.name, _dims(o)) for o in m.graph.output])  # noqa: E731
    return None if sig(model) == sig(before) else "its inputs or outputs differ from its input's"


def _write(given: StageInput, config: TrimPadding, context: StageContext) -> Artifact:
    """The stage before's model trimmed, as OUTPUT/model.onnx, checked on the recipe's data (held-out samples:
    eval_data, else calibration); the report under the key quantize reports it by too (trim_padding)."""
    from dlopt.data import load_data
    from dlopt.fileio import load_onnx, save_onnx_atomic

    model = load_onnx(given.input_path())
    data = load_data(given.calibration, model) if given.calibration else None
    held = load_data(given.eval_data, model) if given.eval_data else None
    result = trim_padding_stage.apply(
        model, config, StageContext(data=data, eval_data=held, after=context.after, log=context.log)
    )
    produced = save_onnx_atomic(result.model, context.folder() / "model.onnx")
    return Artifact.of(produced, {"trim_padding": result.report})


@register_stage(
    kind="trim-padding",
    config=TrimPadding,
    takes="onnx",
    makes="onnx",
    writer=_write,
    requires=(Check("an ONNX model", _onnx_problem),),
    ensures=(Check("the same inputs and outputs", _same_interface),),
    summary="pack the real tokens, else slice token inputs to the batch's longest real length; pad outputs back",
    validate=validate,
    reads=("calibration", "eval_data"),  # held-out inputs confirm the equivalence (eval_data, else calibration)
)
def trim_padding_stage(model, config: TrimPadding, context: StageContext) -> StageResult:
    from dlopt.inputs import take_samples

    samples = take_samples(context.eval_data, config.samples) or take_samples(context.data, config.samples)
    result = trim_padding(model, config, samples)
    line = summary_line(result.report)
    if line:
        context.log(line)
    return result


__all__ = [
    "MIN_COSINE",
    "PACKED_ATTENTION",
    "PackPlan",
    "Plan",
    "TRIM_FORMS",
    "TRIM_MODES",
    "TrimForm",
    "TrimMode",
    "TrimPadding",
    "compare_outputs",
    "pack_plan",
    "pack_tokens_graph",
    "padded_check_feeds",
    "padded_run_problem",
    "plan",
    "sliced_name",
    "summary_line",
    "trim_padding",
    "trim_padding_graph",
    "trim_padding_stage",
]
