"""Graph rewrites around 4-bit quantization: Gemm to MatMul, transposed weights folded, tied embedding
tables shared with their LM head, the contrib opset."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np

from dlopt.errors import InputError
from dlopt.optimize.int4.config import MIN_EMBEDDING_ELEMENTS, MS_DOMAIN

if TYPE_CHECKING:
    from onnx import TensorProto


# -- graph helpers -----------------------------------------------------------------------------------
def initializers_by_name(model) -> dict[str, Any]:
    """The graph's initializers by name."""
    return {t.name: t for t in model.graph.initializer}


def _is_float_weight(tensor: Any, rank: int = 2) -> TypeGuard[TensorProto]:
    from onnx import TensorProto

    return tensor is not None and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == rank


def attribute_value(node, name: str, default):
    """The value of `node`'s attribute `name`, or `default` when it has none."""
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def name_nodes(model) -> None:
    """ORT's quantizer selects nodes by name: give unnamed nodes unique names."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def gemm_to_matmul(model, skip: set[str]) -> list[str]:
    """Gemm(A, B, C) with a constant 2-D B and no transA -> MatMul(A, alpha·op(B)) (+ Add(beta·C)).

    Exact up to float rounding; returns the names of the rewritten nodes (the MatMul keeps the name)."""
    import onnx
    from onnx import numpy_helper

    inits = initializers_by_name(model)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten, nodes = [], []
    for node in model.graph.node:
        b = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if node.name in skip or not _is_float_weight(b) or attribute_value(node, "transA", 0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(b)
        if attribute_value(node, "transB", 0):
            w = w.T
        w = np.ascontiguousarray(w * np.float32(attribute_value(node, "alpha", 1.0)), dtype=np.float32)
        w_name = f"{b.name}__matmul" if consumers.get(b.name, 0) > 1 else b.name
        if w_name == b.name:
            model.graph.initializer.remove(b)
        model.graph.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name))
        if has_bias:
            bias = node.input[2]
            beta = float(attribute_value(node, "beta", 1.0))
            if beta != 1.0:
                c = inits.get(bias)
                if c is None:
                    raise InputError(
                        f"Gemm {node.name!r} scales a non-constant bias by beta={beta}",
                        f"exclude it: exclude_nodes=({node.name!r},)",
                    )
                scaled = numpy_helper.from_array(numpy_helper.to_array(c) * np.float32(beta), f"{bias}__beta")
                model.graph.initializer.append(scaled)
                bias = scaled.name
            nodes.append(onnx.helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name}__bias"))
        rewritten.append(node.name)
    if rewritten:
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    return rewritten


def fold_transposed_weights(model, skip: set[str]) -> list[tuple[str, str]]:
    """MatMul(x, Transpose(W)) with W a 2-D float initializer -> MatMul(x, Wᵀ as an initializer).

    A tied LM head exports this way (the embedding table, transposed at run time): without the fold the
    head stays float and ORT transposes 28 M weights on every run (SmolLM2). Exact; returns (MatMul,
    table) name pairs for the folded weights. The Transpose goes when nothing else reads it."""
    from onnx import numpy_helper

    inits = initializers_by_name(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded, dropped = [], set()
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in skip or len(node.input) != 2:
            continue
        tr = producers.get(node.input[1])
        if (
            tr is None
            or tr.op_type != "Transpose"
            or list(attribute_value(tr, "perm", [1, 0])) != [1, 0]
            or not _is_float_weight(inits.get(tr.input[0]))
        ):
            continue
        name = f"{tr.input[0]}__transposed"
        if name not in inits:
            w = numpy_helper.to_array(inits[tr.input[0]])
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(w.T), name)
            model.graph.initializer.append(inits[name])
        consumers[tr.output[0]] -= 1
        if consumers[tr.output[0]] == 0:
            dropped.add(tr.name)
        node.input[1] = name
        folded.append((node.name, tr.input[0]))
    if dropped:
        keep = [n for n in model.graph.node if n.name not in dropped]
        model.graph.ClearField("node")
        model.graph.node.extend(keep)
    return folded


def weight_matmuls(model) -> list[Any]:
    """MatMul nodes whose second input is a 2-D float initializer, in graph order."""
    inits = initializers_by_name(model)
    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) == 2 and _is_float_weight(inits.get(n.input[1]))
    ]


def embedding_gathers(model, block_size: int) -> tuple[list[Any], list[str]]:
    """Gathers on axis 0 of a large 2-D float table whose rows split into whole blocks; plus notes on
    large tables left alone and why."""
    inits = initializers_by_name(model)
    found, notes = [], []
    for node in model.graph.node:
        if node.op_type != "Gather":
            continue
        table = inits.get(node.input[0])
        if not _is_float_weight(table):
            continue
        rows, cols = table.dims
        if rows * cols < MIN_EMBEDDING_ELEMENTS:
            continue
        if attribute_value(node, "axis", 0) != 0:
            notes.append(f"{node.name}: gathers on axis {attribute_value(node, 'axis', 0)}, left in float")
        elif cols % block_size:
            notes.append(f"{node.name}: rows of {cols} do not split into blocks of {block_size}, left in float")
        else:
            found.append(node)
    return found, notes


def share_tied_tables(model, pairs: list[tuple[str, str]], excluded: set[str]) -> list[str]:
    """Gather(table) whose transpose became a quantized MatMul weight (a tied LM head) ->
    GatherBlockQuantized reading that MatMulNBits' own codes, scales and zero points through Reshapes.

    Both ops block along the hidden axis, so the LM head's [V, K/block, block·bits/8] codes are the
    table's rows: the file holds the tied weight once instead of twice (SmolLM2: 28 M weights, 14 MB at
    4 bits, 28 MB at 8). Returns the names of the Gathers rewritten."""
    import onnx
    from onnx import numpy_helper

    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    inits = initializers_by_name(model)
    shared = []
    for mm_name, table in pairs:
        mm = nbits.get(f"{mm_name}_Q4") or nbits.get(f"{mm_name}_Q8")
        if mm is None or table not in inits:
            continue
        rows, cols = inits[table].dims
        block, bits = attribute_value(mm, "block_size", 32), attribute_value(mm, "bits", 4)
        if attribute_value(mm, "N", 0) != rows or attribute_value(mm, "K", 0) != cols or cols % block:
            continue
        for i, node in enumerate(model.graph.node):
            if (
                node.op_type != "Gather"
                or node.input[0] != table
                or node.name in excluded
                or attribute_value(node, "axis", 0) != 0
            ):
                continue
            prefix = f"{node.name}__tied"
            per_row = {1: cols * bits // 8, 2: cols // block, 3: -(-(cols // block) * bits // 8)}
            inputs, reshapes = [], []
            for slot, source in ((1, mm.input[1]), (2, mm.input[2]), (3, mm.input[3] if len(mm.input) > 3 else "")):
                if not source:
                    continue
                shape = numpy_helper.from_array(np.array([rows, per_row[slot]], np.int64), f"{prefix}_shape{slot}")
                model.graph.initializer.append(shape)
                reshapes.append(
                    onnx.helper.make_node(
                        "Reshape", [source, shape.name], [f"{prefix}_in{slot}"], name=f"{prefix}_reshape{slot}"
                    )
                )
                inputs.append(reshapes[-1].output[0])
            gather = onnx.helper.make_node(
                "GatherBlockQuantized",
                [inputs[0], node.input[1], *inputs[1:]],
                list(node.output),
                name=node.name,
                domain=MS_DOMAIN,
                bits=bits,
                block_size=block,
                gather_axis=0,
                quantize_axis=1,
            )
            model.graph.node.remove(node)
            for j, new in enumerate([*reshapes, gather]):
                model.graph.node.insert(i + j, new)
            shared.append(node.name)
            break
    return shared


def ensure_ms_opset(model) -> None:
    """Import the com.microsoft domain (the contrib ops written here) if the model does not yet."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(__import__("onnx").helper.make_opsetid(MS_DOMAIN, 1))


def drop_unused_initializers(model) -> None:
    """Remove the initializers no node reads any more (weights replaced by their quantized form)."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(keep)
        names = {t.name for t in keep}
        inputs = [i for i in model.graph.input if i.name in names or i.name in used]
        model.graph.ClearField("input")
        model.graph.input.extend(inputs)
