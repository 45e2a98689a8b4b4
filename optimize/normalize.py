"""Graph normalization before INT8: what ONNX Runtime's quantizers assume of a graph, made true and checked.

- Weights held in Constant nodes become initializers, in If/Loop/Scan subgraphs too: ORT's
  quantizers only quantize initializers, so a weight in a Constant node stays float (PP-OCR's
  exported models hold every Conv weight that way).
- Weight inputs computed from constants alone become initializers too (in subgraphs as well): torch
  exports an LSTM's W/R/B as Slice/Concat/Unsqueeze of its parameters (reordering the gates), which
  leaves ORT's quantizers nothing to quantize (Silero VAD: both LSTMs, 42 % of its weights, stayed
  float). Only the chain that feeds a weighted layer is folded; producers left unused and
  initializers nobody reads any more are dropped.
- Nodes without a name (or sharing one) get a unique name: the quantizer, exclusion lists and GPTQ
  statistics address nodes by name.
- Opsets below 13 are upgraded with onnx's version converter: per-channel weights need
  DequantizeLinear's `axis`, which opset 13 introduced; ORT's quantizer writes it anyway and the
  graph is invalid ("Unrecognized attribute: axis for operator DequantizeLinear").

Each step runs on a copy and is kept only if the result passes onnx's checker (the upgrade) and
runs through ONNX Runtime with outputs within a tight tolerance of its input on the same feeds
(`dlopt.optimize.preprocess.run_checked_steps`); a rejected step is reported with its reason, and
the recipe reads it (a failed upgrade means per-tensor weights, said so in the recipe's reasons).

Also here: `topological_sort`, which orders a graph whose subgraphs read outer values (ORT's
subgraph quantization appends the outer quantize nodes after the If/Loop that reads them), and
`subgraph_nodes`, the nodes that sit inside subgraphs.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from dlopt.graphfacts import op_counts
from dlopt.optimize.preprocess import check_feeds, replace_nodes, run_checked_steps
from dlopt.sessions import cpu_session, run_outputs
from dlopt.stage import StageResult, config_to_dict

PER_CHANNEL_OPSET = 13  # DequantizeLinear/QuantizeLinear `axis` (per-channel scales) exist from opset 13


@dataclass(frozen=True, kw_only=True)
class NormalizeConfig:
    constants_to_initializers: bool = True
    fold_weight_inputs: bool = True  # weights computed from constants (Slice/Concat/... of initializers) folded
    min_opset: int = PER_CHANNEL_OPSET  # upgrade the default domain to at least this; 0: never
    check_samples: int = 2
    input_shapes: tuple[str, ...] = ()  # --input-shape NAME=DxD... for the synthetic check samples
    # lossless rewrites: outputs must match their input this closely (the upgrade measured bit-exact on
    # PP-OCRv4 det and cls)
    atol: float = 1e-5
    rtol: float = 1e-4


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def subgraphs(node) -> Iterator[Any]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    import onnx

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph) -> Iterator[Any]:
    """`graph` and every subgraph under it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def subgraph_nodes(model, op_types: Iterable[str] | None = None) -> list[tuple[str, Any]]:
    """(owner path, node) for the nodes inside subgraphs (e.g. 'branch/then_branch'), optionally of
    these op types."""
    import onnx

    wanted = set(op_types) if op_types is not None else None
    found: list[tuple[str, Any]] = []

    def visit(graph, path: str) -> None:
        for node in graph.node:
            for attr in node.attribute:
                subs = (
                    [attr.g]
                    if attr.type == onnx.AttributeProto.GRAPH
                    else list(attr.graphs)
                    if attr.type == onnx.AttributeProto.GRAPHS
                    else []
                )
                for sub in subs:
                    where = f"{path}{node.name or node.op_type}/{attr.name}"
                    found.extend((where, n) for n in sub.node if wanted is None or n.op_type in wanted)
                    visit(sub, where + "/")

    visit(model.graph, "")
    return found


def _outer_reads(graph) -> set[str]:
    """Names a graph reads that it does not define itself: its subgraph nodes' implicit inputs."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(i for i in node.input if i)
        for sub in subgraphs(node):
            reads |= _outer_reads(sub)
    return reads - defined


def topological_sort(graph) -> None:
    """Order `graph`'s nodes (and each subgraph's, in place) so that every value, including the
    outer values a subgraph reads, is produced before it is used; stable for already-sorted graphs.

    Hand-written: ORT's ONNXModel.topological_sort ignores the implicit inputs of If/Loop/Scan, which
    are exactly what goes out of order here."""
    for node in graph.node:
        for sub in subgraphs(node):
            topological_sort(sub)
    producer = {o: index for index, n in enumerate(graph.node) for o in n.output if o}
    needs: list[set[int]] = []
    for node in graph.node:
        reads = {i for i in node.input if i}
        for sub in subgraphs(node):
            reads |= _outer_reads(sub)
        needs.append({producer[r] for r in reads if r in producer})
    if all(all(p < index for p in wanted) for index, wanted in enumerate(needs)):
        return  # already in order
    # Kahn's algorithm, always taking the earliest ready node: keeps the original order wherever it was valid
    waiting = [len(wanted) for wanted in needs]
    users: dict[int, list[int]] = {}
    for index, wanted in enumerate(needs):
        for p in wanted:
            users.setdefault(p, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users.get(index, ()):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    placed = set(order)
    order += [i for i in range(len(graph.node)) if i not in placed]  # a cycle: left as it was (the checker says)
    replace_nodes(graph, [graph.node[i] for i in order])


# -- the steps ----------------------------------------------------------------------------------------
def _constants_to_initializers(model, config: NormalizeConfig):
    """Every Constant node holding a tensor (`value`) becomes an initializer of its own graph, named
    after its output (kept a node when that output is also the graph's output)."""
    import onnx

    moved = 0
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    for graph in all_graphs(converted.graph):
        outputs = {o.name for o in graph.output}
        keep = []
        for node in graph.node:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if (
                node.op_type == "Constant"
                and node.domain in ("", "ai.onnx")
                and value is not None
                and node.output[0] not in outputs
            ):
                tensor = graph.initializer.add()
                tensor.CopyFrom(value)
                tensor.name = node.output[0]
                moved += 1
            else:
                keep.append(node)
        if len(keep) != len(graph.node):
            replace_nodes(graph, keep)
    if not moved:
        return model, {"moved": 0}
    if converted.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        converted.ir_version = 4
    return converted, {"moved": moved}


FOLD_CHAIN_LIMIT = 64  # nodes in one weight's constant chain; a longer one is left computed


def _constant_chain(name: str, producer: Mapping[str, Any], constants: Mapping[str, Any]) -> list[Any] | None:
    """The nodes (in order) that compute `name` from `constants` alone, or None when it depends on an
    input, an outer value that is not constant, a non-default domain or a node holding a subgraph."""
    import onnx

    chain: list[Any] = []
    seen: set[str] = set()

    def visit(value: str) -> bool:
        if value in constants or value in seen:
            return True
        node = producer.get(value)
        if (
            node is None
            or node.domain not in ("", "ai.onnx")
            or len(chain) >= FOLD_CHAIN_LIMIT
            or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        ):
            return False
        if not all(visit(i) for i in node.input if i):
            return False
        if not any(o in seen for o in node.output):
            chain.append(node)
            seen.update(o for o in node.output if o)
        return True

    return chain if visit(name) else None


def _reads(graph) -> set[str]:
    """Every name read in `graph` and its subgraphs (node inputs, subgraph outputs)."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(i for i in node.input if i)
        for sub in subgraphs(node):
            names |= _reads(sub)
    return names


def _drop_unused(graph) -> None:
    """Remove nodes of `graph` (and its subgraphs) whose outputs nobody reads, then initializers nobody
    reads: what folding a weight's chain left behind."""
    for node in graph.node:
        for sub in subgraphs(node):
            _drop_unused(sub)
    while True:
        used = {o.name for o in graph.output}
        for node in graph.node:
            used.update(i for i in node.input if i)
            for sub in subgraphs(node):
                used |= _outer_reads(sub)
        keep = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        replace_nodes(graph, keep)
    read = _reads(graph)
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)


def _fold_weight_inputs(model, config: NormalizeConfig):
    """Each weight input of a Conv/Gemm/MatMul/LSTM/GRU/RNN that is computed from initializers (of its
    graph or an enclosing one) and Constant nodes only becomes an initializer of the node's graph, with
    the value onnx's reference evaluator gives the chain."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from dlopt.graphfacts import WEIGHT_INPUTS

    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    opsets = list(folded.opset_import)
    count = 0

    def visit(graph, outer: Mapping[str, Any]) -> None:
        nonlocal count
        constants = dict(outer)
        for value in graph.input:  # a subgraph's own inputs shadow outer names
            constants.pop(value.name, None)
        constants.update({t.name: t for t in graph.initializer})
        producer = {o: n for n in graph.node for o in n.output if o}
        done: set[str] = set()
        for node in list(graph.node):
            if node.domain not in ("", "ai.onnx"):
                continue
            for index in WEIGHT_INPUTS.get(node.op_type, ()):
                name = node.input[index] if index < len(node.input) else ""
                if not name or name in constants or name in done:
                    continue
                chain = _constant_chain(name, producer, constants)
                if not chain:
                    continue
                made = {o for n in chain for o in n.output}
                leaves = dict.fromkeys(i for n in chain for i in n.input if i and i not in made)
                try:
                    mini = helper.make_model(
                        helper.make_graph(
                            chain,
                            "fold",
                            [],
                            [helper.make_empty_tensor_value_info(name)],
                            [constants[leaf] for leaf in leaves],
                        ),
                        opset_imports=opsets,
                        ir_version=folded.ir_version,
                    )
                    outputs = cast(list, ReferenceEvaluator(mini).run(None, {}))  # a list unless intermediate=True
                    value = np.asarray(outputs[0])
                except Exception:  # noqa: BLE001 - a chain the reference runtime cannot evaluate stays computed
                    continue
                tensor = numpy_helper.from_array(value, name)
                graph.initializer.append(tensor)
                constants[name] = tensor
                done.add(name)
                count += 1
        if done:  # the folded values' producers go; what only they read goes with them in _drop_unused
            replace_nodes(graph, [n for n in graph.node if not any(o in done for o in n.output)])
        for node in graph.node:
            for sub in subgraphs(node):
                visit(sub, constants)

    visit(folded.graph, {})
    if not count:
        return model, {"folded": 0}
    _drop_unused(folded.graph)
    if folded.ir_version < 4:
        folded.ir_version = 4
    return folded, {"folded": count}


def _upgrade_opset(model, config: NormalizeConfig):
    import onnx
    from onnx import version_converter

    before = default_opset(model)
    if not config.min_opset or before >= config.min_opset:
        return model, {"from": before, "to": before}
    upgraded = version_converter.convert_version(model, config.min_opset)
    onnx.checker.check_model(upgraded)
    return upgraded, {"from": before, "to": default_opset(upgraded)}


def _name_nodes(model) -> tuple[Any, int]:
    """(model, how many nodes were named): every node, in subgraphs too, with a unique non-empty name.
    Exporters leave names empty (onnx allows it), but ORT's quantizer, dlopt's exclusion lists, GPTQ
    statistics and sensitivity ranking all address nodes by name: two unnamed Convs would share one.
    Renaming changes no output, so it needs no check run."""
    import onnx

    nodes = [n for g in all_graphs(model.graph) for n in g.node]
    names = [n.name for n in nodes]
    taken = set(names)
    if all(names) and len(taken) == len(names):
        return model, 0
    named = onnx.ModelProto()
    named.CopyFrom(model)
    seen: set[str] = set()
    count = 0
    for index, node in enumerate(n for g in all_graphs(named.graph) for n in g.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in taken or name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        seen.add(name)
        count += 1
    return named, count


def _computed_weights(model) -> bool:
    """Whether some weighted layer reads its weight from a computed value (not an initializer nor a
    Constant node)."""
    from dlopt.graphfacts import WEIGHT_INPUTS

    def visit(graph, outer: set[str]) -> bool:
        names = outer | {t.name for t in graph.initializer}
        # a Constant node's weight is constants_to_initializers' to move
        produced = {o for n in graph.node if n.op_type != "Constant" for o in n.output}
        for node in graph.node:
            for index in WEIGHT_INPUTS.get(node.op_type, ()):
                if index < len(node.input) and node.input[index] in produced:
                    return True
            if any(visit(sub, names) for sub in subgraphs(node)):
                return True
        return False

    return visit(model.graph, set())


def normalize(
    model, config: NormalizeConfig = NormalizeConfig(), data: Iterable[Mapping[str, np.ndarray]] | None = None
) -> StageResult:
    """Run the enabled steps (Constant weights to initializers, weights computed from constants folded,
    opset upgrade), each checked; the
    report holds each step and the opset before and after."""
    steps: list[tuple[str, Any]] = []
    if config.constants_to_initializers and any(
        n.op_type == "Constant" for g in all_graphs(model.graph) for n in g.node
    ):
        steps.append(("constants_to_initializers", _constants_to_initializers))
    if config.fold_weight_inputs and _computed_weights(model):
        steps.append(("fold_weight_inputs", _fold_weight_inputs))
    if config.min_opset and default_opset(model) < config.min_opset:
        steps.append(("opset_upgrade", _upgrade_opset))
    current = model
    report_steps: list[dict[str, Any]] = []
    if steps:
        feeds = check_feeds(model, data, config.check_samples, config.input_shapes)
        reference = run_outputs(cpu_session(model, graph_opt_level="basic"), feeds)
        current, report_steps = run_checked_steps(model, steps, config, feeds, reference, config.atol, config.rtol)
    current, named = _name_nodes(current)
    if named:
        report_steps.append({"step": "node_names", "applied": True, "named": named})
    report = {
        "config": config_to_dict(config),
        "steps": report_steps,
        "opset": {"before": default_opset(model), "after": default_opset(current)},
    }
    if current is not model:
        report["ops_after"] = op_counts(current)
    return StageResult(current, report)


def upgrade_failure(report: Mapping[str, Any] | None) -> str | None:
    """Why the opset upgrade in a normalize() report was rejected; None when it was not tried or held."""
    for step in (report or {}).get("steps", []):
        if step["step"] == "opset_upgrade" and not step.get("applied"):
            return step.get("reason", "rejected")
    return None


__all__ = [
    "PER_CHANNEL_OPSET",
    "NormalizeConfig",
    "all_graphs",
    "default_opset",
    "normalize",
    "subgraph_nodes",
    "subgraphs",
    "topological_sort",
    "upgrade_failure",
]
