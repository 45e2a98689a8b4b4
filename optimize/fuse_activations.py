"""Decomposed activations written back as the single ops ONNX Runtime has kernels for, before quantization.

Exporters from Paddle and others write hard-swish as Add/Clip/Div/Mul (or HardSigmoid·Mul), SiLU as
Sigmoid·Mul and GELU as Erf arithmetic. After static INT8 each piece that ORT's quantizer has no int8
form for (Div, Erf) sits in float between a DequantizeLinear and a QuantizeLinear, one pass over the
tensor per piece. Fused:
- hard-swish: x * Clip(x + 3, 0, 6) / 6 (Div by 6 or Mul by 1/6, before or after the Mul by x) and
  x * HardSigmoid(x) with alpha 1/6, beta 0.5 -> HardSwish (opset >= 14; below, x * HardSigmoid(x):
  two ops instead of four);
- SiLU: x * Sigmoid(x) -> com.microsoft QuickGelu with alpha 1.0 (x * sigmoid(alpha * x)). Not for
  static INT8: there the decomposed form is the fast one, because ORT's quantizer has int8 kernels for
  both Sigmoid and Mul (QLinearSigmoid, QLinearMul) and does not calibrate QuickGelu's output, so the
  next Conv stays float: Conv-SiLU-Conv [1, 32, 56, 56] measured 0.55 ms decomposed vs 1.21 ms with
  QuickGelu (AMD EPYC Zen 4, one thread). In float ORT fuses Sigmoid·Mul into QuickGelu itself (0.132 ms
  both ways), so writing it only makes the stored graph say what runs;
- GELU: x * 0.5 * (1 + Erf(x / sqrt 2)) in its three usual orders (Div by sqrt 2 or Mul by 1/sqrt 2)
  -> com.microsoft Gelu, or BiasGelu(y, b) when x = y + b with b a 1-D constant over the last axis.
Conv + activation: ORT's own graph optimizer fuses Conv with Relu/Clip/HardSigmoid/LeakyRelu/Tanh/Sigmoid
(FusedConv) in float, and its QDQ quantizer folds Relu/Clip into the Conv's output range in INT8; once
hard-swish is one op, nothing between the Conv and it is left for either to trip on. No further
conv + activation rewrite is done here.

Each kind of fusion is a checked step (dlopt.optimize.preprocess.run_checked_steps): the fused graph runs
on the model's data and must match the unfused graph's outputs within atol + rtol * |reference|
(defaults 1e-4, 1e-3: the fused kernels round differently), else that kind is not applied and the report
says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dlopt.stage import StageResult, config_to_dict

MS_DOMAIN = "com.microsoft"
HARDSWISH_OPSET = 14
KINDS = ("hardswish", "silu", "gelu")


@dataclass(frozen=True, kw_only=True)
class FuseActivations:
    """Which fusions to try (`kinds`), how the result is checked (atol, rtol on `check_samples` of the data),
    and `static_int8`: the model is about to be statically quantized (SiLU is then left decomposed)."""

    VERSION: ClassVar[int] = 1
    kinds: tuple[str, ...] = KINDS
    static_int8: bool = False
    check_samples: int = 4
    atol: float = 1e-4
    rtol: float = 1e-3
    input_shapes: tuple[str, ...] = ()


# -- the graph, indexed --------------------------------------------------------------------------------
class _Index:
    """Producers, consumers and scalar constants of one graph (its initializers and Constant nodes)."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def scalar(self, name: str) -> float | None:
        v = self.values.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def only_consumer(self, name: str, op_type: str | tuple[str, ...]):
        """The single consumer of `name` if it is of `op_type` and `name` is no graph output, else None."""
        users = self.consumers.get(name, [])
        types = (op_type,) if isinstance(op_type, str) else op_type
        if len(users) != 1 or name in self.outputs or users[0].op_type not in types:
            return None
        return users[0]

    def other_input(self, node, name: str) -> str | None:
        """The input of a two-input node that is not `name` (None if both are, or it has not two)."""
        if len(node.input) != 2 or list(node.input).count(name) != 1:
            return None
        return node.input[1] if node.input[0] == name else node.input[0]


def _near(value: float | None, target: float, tol: float = 1e-4) -> bool:
    return value is not None and abs(value - target) <= tol * max(1.0, abs(target))


def _opset(model, domain: str = "") -> int:
    return next(
        (o.version for o in model.opset_import if o.domain in ((domain, "ai.onnx") if not domain else (domain,))), 0
    )


def _scale_by(ix: _Index, node, name: str, factor: float) -> bool:
    """Whether `node` multiplies `name` by `factor` (Mul by factor or Div by 1/factor)."""
    other = ix.other_input(node, name)
    if other is None:
        return False
    if node.op_type == "Mul":
        return _near(ix.scalar(other), factor)
    return node.op_type == "Div" and node.input[0] == name and _near(ix.scalar(other), 1 / factor)


# -- the patterns: each returns (nodes to remove, replacement nodes) per site -----------------------------
def _clip_bounds(ix: _Index, clip) -> tuple[float | None, float | None]:
    if len(clip.input) > 1:  # opset >= 11: min, max as inputs
        low = ix.scalar(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
        high = ix.scalar(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
        return low, high
    attrs = {a.name: a.f for a in clip.attribute}
    return attrs.get("min"), attrs.get("max")


def _hardswish_sites(ix: _Index, model) -> list[tuple[list, list]]:
    from onnx import helper

    sites = []

    def fused(x: str, out: str, name: str) -> list:
        if _opset(model) >= HARDSWISH_OPSET:
            return [helper.make_node("HardSwish", [x], [out], name=name)]
        return [
            helper.make_node(
                "HardSigmoid", [x], [out + "/hardsigmoid"], alpha=1 / 6, beta=0.5, name=name + "/hardsigmoid"
            ),
            helper.make_node("Mul", [x, out + "/hardsigmoid"], [out], name=name),
        ]

    for clip in [n for n in ix.graph.node if n.op_type == "Clip"]:
        low, high = _clip_bounds(ix, clip)
        add = ix.producer.get(clip.input[0])
        if not (_near(low, 0.0) and _near(high, 6.0)) or add is None or add.op_type != "Add":
            continue
        x = next((i for i in add.input if _near(ix.scalar(ix.other_input(add, i) or ""), 3.0)), None)
        if x is None or ix.only_consumer(add.output[0], "Clip") is None:
            continue
        c = clip.output[0]
        first = ix.only_consumer(c, ("Mul", "Div"))
        if first is None:
            continue
        if _scale_by(ix, first, c, 1 / 6):  # Clip/6, then * x
            second = ix.only_consumer(first.output[0], "Mul")
            if second is None or ix.other_input(second, first.output[0]) != x:
                continue
        elif first.op_type == "Mul" and ix.other_input(first, c) == x:  # x * Clip, then /6
            second = ix.only_consumer(first.output[0], ("Mul", "Div"))
            if second is None or not _scale_by(ix, second, first.output[0], 1 / 6):
                continue
        else:
            continue
        sites.append(([add, clip, first, second], fused(x, second.output[0], clip.name or c)))
    for hs in [n for n in ix.graph.node if n.op_type == "HardSigmoid"]:
        attrs = {a.name: a.f for a in hs.attribute}
        if not (_near(attrs.get("alpha", 0.2), 1 / 6) and _near(attrs.get("beta", 0.5), 0.5)):
            continue
        mul = ix.only_consumer(hs.output[0], "Mul")
        if mul is None or ix.other_input(mul, hs.output[0]) != hs.input[0] or _opset(model) < HARDSWISH_OPSET:
            continue
        sites.append(([hs, mul], fused(hs.input[0], mul.output[0], hs.name or hs.output[0])))
    return sites


def _silu_sites(ix: _Index, model) -> list[tuple[list, list]]:
    from onnx import helper

    sites = []
    for sig in [n for n in ix.graph.node if n.op_type == "Sigmoid"]:
        mul = ix.only_consumer(sig.output[0], "Mul")
        if mul is None or ix.other_input(mul, sig.output[0]) != sig.input[0]:
            continue
        sites.append(
            (
                [sig, mul],
                [
                    helper.make_node(
                        "QuickGelu",
                        [sig.input[0]],
                        [mul.output[0]],
                        alpha=1.0,
                        domain=MS_DOMAIN,
                        name=(sig.name or sig.output[0]) + "/silu",
                    )
                ],
            )
        )
    return sites


def _gelu_sites(ix: _Index, model) -> list[tuple[list, list]]:
    from onnx import helper

    sites = []
    for erf in [n for n in ix.graph.node if n.op_type == "Erf"]:
        scale = ix.producer.get(erf.input[0])
        if scale is None or scale.op_type not in ("Div", "Mul"):
            continue
        x = next((i for i in scale.input if _scale_by(ix, scale, i, 2**-0.5)), None)
        add = ix.only_consumer(erf.output[0], "Add")
        if x is None or add is None or not _near(ix.scalar(ix.other_input(add, erf.output[0]) or ""), 1.0):
            continue
        a = add.output[0]
        nxt = ix.only_consumer(a, "Mul")
        if nxt is None:
            continue
        other = ix.other_input(nxt, a)
        removed = [scale, erf, add, nxt]
        if other == x:  # (x * (1 + erf)) * 0.5
            last = ix.only_consumer(nxt.output[0], ("Mul", "Div"))
            if last is None or not _scale_by(ix, last, nxt.output[0], 0.5):
                continue
            removed.append(last)
        elif _near(ix.scalar(other or ""), 0.5):  # x * ((1 + erf) * 0.5)
            last = ix.only_consumer(nxt.output[0], "Mul")
            if last is None or ix.other_input(last, nxt.output[0]) != x:
                continue
            removed.append(last)
        else:  # (x * 0.5) * (1 + erf)
            half = ix.producer.get(other or "")
            if (
                half is None
                or half.op_type not in ("Mul", "Div")
                or not _scale_by(ix, half, x, 0.5)
                or len(ix.consumers.get(half.output[0], [])) != 1
            ):
                continue
            removed.append(half)
            last = nxt
        out = last.output[0]
        name = (erf.name or erf.output[0]) + "/gelu"
        bias_add = ix.producer.get(x)
        uses = {id(n) for n in ix.consumers.get(x, [])}
        bias = None
        if (
            bias_add is not None
            and bias_add.op_type == "Add"
            and x not in ix.outputs
            and uses <= {id(n) for n in removed}
        ):
            bias = next(
                (b for b in bias_add.input if (v := ix.values.get(b)) is not None and v.ndim == 1 and v.size > 1), None
            )
        y = ix.other_input(bias_add, bias) if bias is not None else None  # None: Add(bias, bias), no bias add
        if bias is not None and y is not None:
            sites.append(
                ([bias_add, *removed], [helper.make_node("BiasGelu", [y, bias], [out], domain=MS_DOMAIN, name=name)])
            )
        else:
            sites.append((removed, [helper.make_node("Gelu", [x], [out], domain=MS_DOMAIN, name=name)]))
    return sites


PATTERNS: dict[str, Callable[[_Index, Any], list[tuple[list, list]]]] = {
    "hardswish": _hardswish_sites,
    "silu": _silu_sites,
    "gelu": _gelu_sites,
}


def _fuse_kind(kind: str) -> Callable[[Any, FuseActivations], tuple[Any, dict[str, Any]]]:
    """A step for run_checked_steps: every site of `kind` in the main graph fused (or the model itself
    when there is none)."""

    def step(model, config: FuseActivations):
        import onnx
        from onnx import helper

        ix = _Index(model.graph)
        sites = PATTERNS[kind](ix, model)
        taken: set[int] = set()
        kept = []
        for removed, added in sites:  # sites that share a node (overlapping matches): the first wins
            ids = {id(n) for n in removed}
            if ids & taken:
                continue
            taken |= ids
            kept.append((removed, added))
        if not kept:
            return model, {"sites": 0, "reason": "no such pattern"}
        out = onnx.ModelProto()
        out.CopyFrom(model)
        # rebuild the node list: each site's replacement where its last node stood (inputs exist by then)
        last_index = {}
        for removed, added in kept:
            positions = [list(model.graph.node).index(n) for n in removed]
            last_index[max(positions)] = added
        drop = {list(model.graph.node).index(n) for removed, _ in kept for n in removed}
        nodes = []
        for i, n in enumerate(model.graph.node):
            if i in last_index:
                nodes.extend(last_index[i])
            elif i not in drop:
                copy = onnx.NodeProto()
                copy.CopyFrom(n)
                nodes.append(copy)
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        if any(n.domain == MS_DOMAIN for _, added in kept for n in added) and _opset(out, MS_DOMAIN) == 0:
            out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        fused_ops: dict[str, int] = {}
        for _, added in kept:
            op = added[-1].op_type if added[-1].op_type != "Mul" else "HardSigmoid+Mul"
            fused_ops[op] = fused_ops.get(op, 0) + 1
        return out, {"sites": len(kept), "nodes_removed": sum(len(r) for r, _ in kept), "fused_into": fused_ops}

    return step


def fuse_activations(
    model, config: FuseActivations = FuseActivations(), data: Iterable[Mapping[str, np.ndarray]] | None = None
) -> StageResult:
    """Fuse each kind in `config.kinds` (SiLU not for static INT8: see the module doc), each checked against
    its input's outputs on samples of `data` (or synthetic inputs). The report lists every kind: applied,
    sites, what they became, the check's max abs diff, or why not."""
    from dlopt.graphfacts import op_counts
    from dlopt.optimize.preprocess import check_feeds, run_checked_steps
    from dlopt.sessions import cpu_session, run_outputs

    kinds = [k for k in config.kinds if not (k == "silu" and config.static_int8)]
    report: dict[str, Any] = {"config": config_to_dict(config), "steps": []}
    if config.static_int8 and "silu" in config.kinds:
        report["skipped"] = {
            "silu": "static INT8: Sigmoid and Mul have int8 kernels (QLinearSigmoid, QLinearMul); "
            "QuickGelu would stay float and keep the next op float"
        }
    ops = {n.op_type for n in model.graph.node}
    anchors = {"hardswish": {"Clip", "HardSigmoid"}, "silu": {"Sigmoid"}, "gelu": {"Erf"}}
    steps = [(k, _fuse_kind(k)) for k in kinds if anchors[k] & ops]
    if not steps:
        return StageResult(model, report)
    feeds = check_feeds(model, data, config.check_samples, config.input_shapes)
    reference = run_outputs(cpu_session(model, graph_opt_level="basic"), feeds)
    fused, report["steps"] = run_checked_steps(model, steps, config, feeds, reference, config.atol, config.rtol)
    report["check"] = {"samples": len(feeds), "atol": config.atol, "rtol": config.rtol}
    if fused is not model:
        report["ops_before"], report["ops_after"] = op_counts(model), op_counts(fused)
    return StageResult(fused, report)


def summary_line(report: Mapping[str, Any] | None) -> str | None:
    """One line for the quantize log: what was fused (and checked), or nothing when no pattern was found."""
    steps = [s for s in (report or {}).get("steps", []) if s.get("sites") or not s.get("applied")]
    steps = [s for s in steps if s.get("reason") != "no such pattern"]
    if not steps:
        return None
    parts = []
    for s in steps:
        if s.get("applied"):
            into = ", ".join(f"{v} {k}" for k, v in s.get("fused_into", {}).items())
            parts.append(f"{s['step']}: {s['sites']} site(s) -> {into} (max abs diff {s.get('max_abs_diff', 0):.2g})")
        else:
            parts.append(f"{s['step']}: not applied ({s.get('reason')})")
    return "activation fusion: " + "; ".join(parts)


__all__ = ["FuseActivations", "KINDS", "PATTERNS", "fuse_activations", "summary_line"]
