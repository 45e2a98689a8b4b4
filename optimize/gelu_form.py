"""GELU in its tanh form (com.microsoft FastGelu) in place of its erf form (Gelu, BiasGelu), where that is
faster on this CPU and the model keeps its fidelity to its float source on held-out data.

Why: after INT8 a transformer's GELU is float and one of the largest parts left. ORT's erf kernel (BiasGelu)
and its tanh kernel (FastGelu, same bias input) differ by 1.3x-1.5x on AMD EPYC Zen 4 (one thread), and
MiniLM-L6's INT8 ran 4 % faster at [1, 128] with FastGelu. The tanh form is an approximation: its values
differ from the erf form's by up to 2e-4 (|GELU| <= |x|), far below INT8's rounding, but not nothing. So:
- speed is timed here, per CPU model, the two kernels interleaved on [1, rows, width] (the decision cache
  and --node-forms replay hold it, as for the LayerNorm form: dlopt.optimize.kernel_decisions);
- fidelity is checked on held-out inputs: every float output's mean cosine to the float source must not
  drop more than `max_cosine_drop` below the erf form's (MiniLM-L6 INT8: 0.99454 erf, 0.99458 tanh on 200
  sentences). Without inputs to check on, auto keeps the erf form.
form "exact" keeps the graph, "tanh" rewrites without timing (the fidelity check still applies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from dlopt.stage import StageResult, config_to_dict

MS_DOMAIN = "com.microsoft"
GeluForm = Literal["auto", "exact", "tanh"]
GELU_FORMS = ("auto", "exact", "tanh")
EXACT_OPS = ("Gelu", "BiasGelu")  # com.microsoft: gelu(x) and gelu(x + bias), erf form


@dataclass(frozen=True, kw_only=True)
class GeluFormConfig:
    VERSION: ClassVar[int] = 1
    form: GeluForm | str = "auto"
    min_gain: float = 1.15  # the tanh kernel must be this much faster (its CI above 1x) to be written
    max_cosine_drop: float = 0.0005  # per output, mean cosine to the float source, vs the erf form's
    rows: int = 128  # tokens in the timed tensor
    rounds: int = 15
    runs_per_round: int = 40


def find_gelu_sites(model) -> list[Any]:
    """The erf-form GELU nodes (com.microsoft Gelu, BiasGelu) of the main graph that run in float: not those
    between a DequantizeLinear and a QuantizeLinear (a static QDQ graph), whose form ORT's QDQ handling may
    depend on and whose speed the kernel timing here does not cover."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def quantized(node) -> bool:
        source = producer.get(node.input[0])
        readers = consumers.get(node.output[0], [])
        return (source is not None and source.op_type == "DequantizeLinear") or (
            bool(readers) and all(r.op_type == "QuantizeLinear" for r in readers)
        )

    return [n for n in model.graph.node if n.domain == MS_DOMAIN and n.op_type in EXACT_OPS and not quantized(n)]


def tanh_form(model) -> tuple[Any, int]:
    """A copy of `model` with each erf-form GELU written as FastGelu (BiasGelu(x, b) -> FastGelu(x, b):
    the same gelu(x + b)), and how many were rewritten."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    sites = find_gelu_sites(copy)
    for node in sites:
        node.op_type = "FastGelu"
    return copy, len(sites)


def _timing_models(width: int, rows: int, bias: bool) -> list[Any]:
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.linspace(-0.5, 0.5, width, dtype=np.float32), "bias")] if bias else []
    models = []
    for op in ("BiasGelu" if bias else "Gelu", "FastGelu"):
        graph = helper.make_graph(
            [helper.make_node(op, ["x"] + (["bias"] if bias else []), ["y"], domain=MS_DOMAIN)],
            op,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, width])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width])],
            inits,
        )
        models.append(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
        )
    return models


def time_gelu_forms(width: int, bias: bool, config: GeluFormConfig = GeluFormConfig()) -> tuple[Any, Any]:
    """Per-round microseconds of the erf and the tanh kernel on [1, rows, width] (one thread, the calling
    thread's CPU time, interleaved round by round)."""
    from dlopt.optimize.kernel_choice import time_models

    feeds = {"x": np.random.default_rng(1).standard_normal((1, config.rows, width)).astype(np.float32)}
    exact, tanh = time_models(
        _timing_models(width, config.rows, bias),
        [feeds, feeds],
        rounds=config.rounds,
        runs_per_round=config.runs_per_round,
    )
    return exact.tolist(), tanh.tolist()


def _width(model, node) -> int | None:
    """The width of a BiasGelu's bias (its last axis), from the initializer."""
    if len(node.input) < 2:
        return None
    dims = next((list(t.dims) for t in model.graph.initializer if t.name == node.input[1]), None)
    return int(dims[-1]) if dims else None


def fidelity_drop(reference, exact, tanh, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per float output: the mean cosine to `reference` of the erf-form and the tanh-form model on `feeds`."""
    from dlopt.fidelity import compare_sessions
    from dlopt.sessions import cpu_session

    ref = cpu_session(reference)
    before = compare_sessions(ref, cpu_session(exact), feeds)
    after = compare_sessions(ref, cpu_session(tanh), feeds)
    return {
        name: {"exact": before[name].cosine_mean, "tanh": after[name].cosine_mean} for name in before if name in after
    }


def choose_gelu_form(
    model,
    config: GeluFormConfig = GeluFormConfig(),
    *,
    reference=None,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    store=None,
) -> StageResult:
    """`model` with its erf-form GELUs in the tanh form where it times faster here (or a replayed decision
    says so) and, on `feeds` (held-out inputs), no float output's mean cosine to `reference` (the float
    source) drops more than `max_cosine_drop` below the erf form's; else `model` as it is. The report says
    which, with the timing and the cosines."""
    from dlopt.optimize.kernel_decisions import DecisionRule, DecisionStore

    if config.form not in GELU_FORMS:
        from dlopt.errors import InputError

        raise InputError(f"unknown GELU form {config.form!r}", f"choose one of {', '.join(GELU_FORMS)}")
    sites = find_gelu_sites(model)
    report: dict[str, Any] = {"config": config_to_dict(config), "sites": len(sites), "rewritten": 0, "decisions": []}
    if not sites:
        report["decision"] = "nothing to choose: no erf-form GELU (Gelu, BiasGelu)"
        return StageResult(model, report)
    if config.form == "exact":
        report["decision"] = "kept the erf form (asked)"
        return StageResult(model, report)
    if config.form == "auto":
        first = sites[0]
        bias = first.op_type == "BiasGelu"
        width = _width(model, first) if bias else None
        if width is None:
            bias, width = False, 1536  # a Gelu: its width is not in the graph; the kernel's per-element cost
        rule = DecisionRule(margin=config.min_gain, rounds=config.rounds, runs_per_round=config.runs_per_round)
        record = (store or DecisionStore()).decide(
            "gelu form",
            {"op": first.op_type, "width": width, "rows": config.rows, "dtype": "float32"},
            rule,
            default="erf",
            alternative="tanh",
            measure=lambda: time_gelu_forms(width, bias, config),
        )
        report["decisions"] = [record]
        if record["choice"] != "tanh":
            report["decision"] = f"kept the erf form: {record.get('why', record['source'])}"
            return StageResult(model, report)
    candidate, count = tanh_form(model)
    if reference is None or not feeds:
        report["decision"] = "kept the erf form: no held-out inputs to check the tanh form's fidelity on"
        return StageResult(model, report)
    cosines = fidelity_drop(reference, model, candidate, feeds)
    report["fidelity"] = {
        "samples": len(feeds),
        "max_cosine_drop": config.max_cosine_drop,
        "mean_cosine": {k: {form: round(c, 6) for form, c in v.items()} for k, v in cosines.items()},
    }
    worse = [
        f"{k} {v['exact']:.6f} -> {v['tanh']:.6f}"
        for k, v in cosines.items()
        if v["tanh"] < v["exact"] - config.max_cosine_drop
    ]
    if worse:
        report["decision"] = (
            f"kept the erf form: the tanh form lowers the mean cosine to the float model ({', '.join(worse)})"
        )
        return StageResult(model, report)
    report["rewritten"] = count
    why = "asked" if config.form == "tanh" else report["decisions"][0].get("why", report["decisions"][0]["source"])
    held = ", ".join(f"{k} {v['exact']:.6f} -> {v['tanh']:.6f}" for k, v in cosines.items())
    report["decision"] = (
        f"tanh form: {count} GELUs written as FastGelu ({why}); mean cosine to the float model {held} "
        f"on {len(feeds)} held-out samples"
    )
    return StageResult(candidate, report)


__all__ = [
    "GELU_FORMS",
    "GeluForm",
    "GeluFormConfig",
    "choose_gelu_form",
    "find_gelu_sites",
    "fidelity_drop",
    "tanh_form",
    "time_gelu_forms",
]
