"""Facts read off an ONNX graph that stages and the search choose by: op counts, whether it is a
transformer, whether it embeds tokens, which inputs are weights, which outputs are recurrent states.
Reading only: nothing here changes a model."""

from __future__ import annotations

import numpy as np

from dlopt.inputs import graph_inputs

# op type -> indices of its weight inputs (what weight-only quantization and weight folding read)
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (1,),
    "MatMul": (1,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}

# ops that only ORT's transformer fusions create: seeing one means the graph is already fused
FUSED_TRANSFORMER_OPS = {
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "QAttention",
}


def looks_like_transformer(model) -> bool:
    """Fused attention ops, or a Softmax, at least four MatMuls and token embeddings: an input named
    input_ids or a table lookup of integer inputs (`embeds_tokens`). Not any Gather: exporters write
    Shape -> Gather for every dynamic reshape, and integer inputs that are not token ids (indices,
    steps, state counters) are no evidence of one either."""
    ops = [n.op_type for n in model.graph.node]
    if FUSED_TRANSFORMER_OPS & set(ops):
        return True
    names = {i.name for i in graph_inputs(model)}
    return ops.count("Softmax") >= 1 and ops.count("MatMul") >= 4 and ("input_ids" in names or embeds_tokens(model))


def embeds_tokens(model) -> bool:
    """Whether a graph input of integer type indexes a 2-D float table (a Gather on an initializer,
    directly or through Cast/Reshape/Squeeze/Unsqueeze/Identity): a token embedding."""
    from onnx import TensorProto

    integer_inputs = {i.name for i in graph_inputs(model) if np.issubdtype(i.dtype, np.integer)}
    tables = {
        t.name
        for t in model.graph.initializer
        if len(t.dims) == 2 and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    }
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in tables:
            continue
        source = node.input[1]
        for _ in range(4):
            if source in integer_inputs:
                return True
            step = producer.get(source)
            if step is None or step.op_type not in ("Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity"):
                break
            source = step.input[0]
    return False


def op_counts(model) -> dict[str, int]:
    """Nodes by op type in every graph of the model, subgraphs (If branches, Loop bodies) included: what
    the file holds. A model trimmed of padding runs its layers inside an If (sliced or packed), which a
    count of the main graph alone would hide."""
    counts: dict[str, int] = {}
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                graphs.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
    return dict(sorted(counts.items()))


# An output that the caller feeds back as an input on the next call (a recurrent state) is named like
# that input plus one of these: Silero VAD's stateN -> state, h_out -> h, state_new -> state.
STATE_SUFFIXES = ("N", "_out", "_new", "_next", "_n")


def recurrent_pairs(model) -> list[tuple[str, str]]:
    """(input, output) pairs of a stateful model: the output named like the input + a STATE_SUFFIXES
    suffix, with the same rank and the same fixed dimensions where both declare them, in a model with
    other inputs too."""
    inputs = {spec.name: spec for spec in graph_inputs(model)}
    if len(inputs) < 2:  # a state is fed beside the data that drives it; image -> image_out is a filter
        return []
    pairs: list[tuple[str, str]] = []
    for output in model.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in output.type.tensor_type.shape.dim]
        for suffix in STATE_SUFFIXES:
            name = output.name[: -len(suffix)] if output.name.endswith(suffix) else ""
            spec = inputs.get(name) if name else None
            if spec is None:
                continue
            declared = list(spec.shape)
            if output.type.tensor_type.HasField("shape") and len(dims) != len(declared):
                continue
            if any(isinstance(a, int) and a > 0 and b and a != b for a, b in zip(declared, dims)):
                continue
            pairs.append((name, output.name))
            break
    return pairs


__all__ = [
    "FUSED_TRANSFORMER_OPS",
    "STATE_SUFFIXES",
    "WEIGHT_INPUTS",
    "embeds_tokens",
    "looks_like_transformer",
    "op_counts",
    "recurrent_pairs",
]
