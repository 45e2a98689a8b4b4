"""A price list for fake kernel timers (tests of dlopt.optimize.kernel_choice and kernel_decisions): what a
graph would cost if each Conv/Gemm/MatMul cost what its node class and form say, so the timed decisions can be
tested without timing anything."""

from __future__ import annotations

from collections.abc import Mapping

from dlopt.optimize.kernel_choice import node_class


def graph_cost(model, int8_cost: Mapping[str, float], float_cost: Mapping[str, float], boundary_cost: float = 0.0):
    """The sum over Conv/Gemm/MatMul nodes of their class's price in their form (INT8 when the weight is
    dequantized; classes not listed cost 1.0), plus `boundary_cost` per float node fed by a DequantizeLinear
    (the Q/DQ pair around a float node)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = producer.get(node.input[1])
        int8 = w is not None and w.op_type == "DequantizeLinear"
        dims = list(inits[w.input[0] if int8 else node.input[1]].dims)
        kind = node_class(node.op_type, dims, next((a.i for a in node.attribute if a.name == "group"), 1))
        total += (int8_cost if int8 else float_cost).get(kind, 1.0)
        x = producer.get(node.input[0])
        if not int8 and x is not None and x.op_type == "DequantizeLinear":
            total += boundary_cost
    return total
