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
from dlopt.stage import Check, StageContext, StageResult, config_to_dict, register_stage

TrimMode = Literal["auto", "on", "off"]
TRIM_MODES: tuple[str, ...] = ("auto", "on", "off")
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
    mask). `min_cosine`: auto's floor on every output's mean cosine, trimmed vs untrimmed."""

    VERSION: ClassVar[int] = 1
    mode: TrimMode = "auto"
    mask_input: str | None = None
    min_cosine: float = MIN_COSINE
    samples: int = 16  # held-out samples the check reads


def validate(config: TrimPadding) -> None:
    if config.mode not in TRIM_MODES:
        raise InputError(f"unknown trim-padding mode {config.mode!r}", f"choose one of {', '.join(TRIM_MODES)}")
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
        raise InputError(f"trim-padding: the model has no input {mask_input!r}",
                         f"name one of its inputs: {', '.join(inputs)}")
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
        renamed[name] = n(f"{name}_trimmed")
        prefix.append(helper.make_node("Slice", [name, const(f"{name}_start", [0]), n("L"), axis1],
                                       [renamed[name]], name=n(f"slice_{name}")))
    body = list(g.node)
    produced_outputs = {o for node in body for o in node.output}
    suffix = []
    if p.per_token_outputs:
        suffix += [helper.make_node("Reshape", [n("T"), shape1], [n("T_1d")], name=n("T_1d")),
                   helper.make_node("Sub", [n("T_1d"), n("L")], [n("padding")], name=n("padding"))]
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
        suffix += [helper.make_node("Concat", pads_parts, [n(f"{name}_pads")], axis=0, name=n(f"{name}_pads")),
                   helper.make_node("Pad", [renamed_out, n(f"{name}_pads")], [name], mode="constant",
                                    name=n(f"pad_{name}"))]
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


# -- the check ----------------------------------------------------------------------------------------
def padded_check_feeds(samples: Sequence[Mapping[str, np.ndarray]], p: Plan, *,
                       extra: int = EXTRA_PADDING, batch: int = CHECK_BATCH) -> list[dict[str, np.ndarray]]:
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
            rows.append({k: (np.asarray(v)[r:r + 1, :length] if k in p.token_inputs else np.asarray(v)[r:r + 1])
                         for k, v in s.items()})
    if not rows:
        return feeds
    width = max(row[p.mask_name()].shape[1] for row in rows) + extra
    for start in range(0, len(rows), batch):
        group = rows[start:start + batch]
        batched = {}
        try:
            for k in group[0]:
                parts = [np.pad(r[k], [(0, 0), (0, width - r[k].shape[1])] + [(0, 0)] * (r[k].ndim - 2))
                         if k in p.token_inputs else r[k] for r in group]
                batched[k] = np.concatenate(parts, axis=0)
        except ValueError:  # a non-token input whose rows cannot be stacked: keep the per-sample feeds only
            return feeds
        feeds.append(batched)
    return feeds


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
                raise StageError(f"trim-padding changed output {name!r}'s shape {list(r.shape)} -> {list(y.shape)}",
                                 "report this model")
            if name in p.per_token_outputs:
                real = np.asarray(f[p.mask_name()]).astype(bool)
                r, y = r[real], y[real]
            if r.size == 0:
                continue
            cos.extend(cosine_per_sample(y.astype(np.float64), r.astype(np.float64)).tolist())
            diff = max(diff, float(np.max(np.abs(y.astype(np.float64) - r.astype(np.float64)))))
        figures[name] = {"kind": "per-token" if name in p.per_token_outputs else "pooled",
                         "mean_cosine": round(float(np.mean(cos)), 6) if cos else None,
                         "min_cosine": round(float(np.min(cos)), 6) if cos else None,
                         "max_abs_diff": float(f"{diff:.4g}")}
    return figures


def trim_padding(model, config: TrimPadding = TrimPadding(),
                 samples: Sequence[Mapping[str, np.ndarray]] | None = None, *, reference=None) -> StageResult:
    """Apply the rewrite per `config.mode`; the report says what was sliced, which outputs were padded
    back, the equivalence figures on `samples` (held-out real inputs) and, when not applied, why.

    `reference`: the float model `model` was quantized from. Then whether an output depends on the
    padding is judged on the float model (trimmed vs untrimmed, cosine >= min_cosine), and the quantized
    model must keep its fidelity to the float model once trimmed (mean cosine at most QUANTIZED_MARGIN
    lower). Why not the quantized model against itself: dynamic INT8 takes its activation ranges per
    call, over padding too, so trimming reshuffles its rounding: MiniLM's INT8, trimmed vs untrimmed,
    measured cosine 0.997, while each was 0.991 from FP32 on the same padded inputs."""
    validate(config)
    report: dict[str, Any] = {"config": config_to_dict(config), "applied": False}
    if config.mode == "off":
        return StageResult(model, report | {"reason": "off"})
    p = plan(model, config.mask_input)
    if p.reason is not None:
        if config.mode == "on":
            raise InputError(f"--trim-padding on: {p.reason}", "use --trim-padding auto or off for this model")
        return StageResult(model, report | {"reason": p.reason})
    report.update(mask=p.mask, sliced_inputs=list(p.token_inputs), padded_back_outputs=list(p.per_token_outputs),
                  pooled_outputs=list(p.pooled_outputs), padding_value=0)
    trimmed, _ = trim_padding_graph(model, p.mask)
    samples = list(samples or [])[:config.samples]
    if not samples:
        if config.mode == "on":
            return StageResult(trimmed, report | {"applied": True, "equivalence": None})
        return StageResult(model, report | {"reason": "no held-out inputs to confirm equivalence on (give data, "
                                                      "or trim-padding on)"})
    feeds = padded_check_feeds(samples, p)
    equivalence: dict[str, Any] = {"feeds": len(feeds), "min_cosine_required": config.min_cosine,
                                   "input_shapes": sorted({tuple(np.shape(f[p.mask_name()])) for f in feeds})}
    report["equivalence"] = equivalence
    failing: list[str] = []
    try:
        if reference is None:
            equivalence["outputs"] = compare_outputs(model, trimmed, feeds, p)
        else:
            reference_trimmed, _ = trim_padding_graph(reference, p.mask)
            equivalence["judged_on"] = "the float model; the quantized model's fidelity to it, trimmed vs untrimmed"
            equivalence["outputs"] = compare_outputs(reference, reference_trimmed, feeds, p)
            untrimmed_fidelity = compare_outputs(reference, model, feeds, p)
            trimmed_fidelity = compare_outputs(reference, trimmed, feeds, p)
            equivalence["fidelity_untrimmed"], equivalence["fidelity_trimmed"] = untrimmed_fidelity, trimmed_fidelity
            equivalence["quantized_margin"] = QUANTIZED_MARGIN
            for name, before in untrimmed_fidelity.items():
                after = trimmed_fidelity[name]
                if None not in (before["mean_cosine"], after["mean_cosine"]) \
                        and after["mean_cosine"] < before["mean_cosine"] - QUANTIZED_MARGIN:
                    failing.append(f"{name} (cosine to the float model {before['mean_cosine']:.4f} untrimmed, "
                                   f"{after['mean_cosine']:.4f} trimmed)")
    except (StageError, InputError) as e:
        if config.mode == "on":
            raise
        return StageResult(model, report | {"reason": f"the trimmed model does not run: {e.message}"})
    depends = [f"{k} (cosine {v['mean_cosine']:.4f})" for k, v in equivalence["outputs"].items()
               if v["mean_cosine"] is not None and v["mean_cosine"] < config.min_cosine]
    if depends and config.mode == "auto":
        return StageResult(model, report | {"reason": f"outputs depend on the padding: {', '.join(depends)} below "
                                                      f"{config.min_cosine} trimmed vs untrimmed"})
    if failing and config.mode == "auto":
        return StageResult(model, report | {"reason": f"trimming costs fidelity: {', '.join(failing)}"})
    return StageResult(trimmed, report | {"applied": True})


def summary_line(report: Mapping[str, Any] | None) -> str | None:
    """One line for the quantize log: applied with its figures, or why not."""
    if not report or report.get("reason") == "off":
        return None
    if not report.get("applied"):
        return f"trim-padding: not applied: {report.get('reason')}"
    eq = report.get("equivalence")
    figures = ("" if not eq else "; trimmed vs untrimmed cosine " + ", ".join(
        f"{k} {v['mean_cosine']}" for k, v in eq["outputs"].items()) + f" on {eq['feeds']} padded batches")
    back = report.get("padded_back_outputs") or []
    return (f"trim-padding: inputs {', '.join(report['sliced_inputs'])} sliced to the batch's longest real length"
            + (f", {', '.join(back)} padded back with zeros" if back else "") + figures)


# -- the stage ----------------------------------------------------------------------------------------
def _onnx_problem(model, config, before) -> str | None:
    import onnx

    return None if isinstance(model, onnx.ModelProto) else f"got a {type(model).__name__}"


def _same_interface(model, config, before) -> str | None:
    sig = lambda m: ([(i.name, _dims(i)) for i in m.graph.input], [(o.name, _dims(o)) for o in m.graph.output])  # noqa: E731
    return None if sig(model) == sig(before) else "its inputs or outputs differ from its input's"


@register_stage(kind="trim-padding", config=TrimPadding, takes="onnx", makes="onnx",
                requires=(Check("an ONNX model", _onnx_problem),),
                ensures=(Check("the same inputs and outputs", _same_interface),),
                summary="slice token inputs to the batch's longest real length, pad per-token outputs back",
                validate=validate)
def trim_padding_stage(model, config: TrimPadding, context: StageContext) -> StageResult:
    from dlopt.inputs import take_samples

    samples = take_samples(context.eval_data, config.samples) or take_samples(context.data, config.samples)
    result = trim_padding(model, config, samples)
    line = summary_line(result.report)
    if line:
        context.log(line)
    return result


__all__ = ["MIN_COSINE", "Plan", "TRIM_MODES", "TrimMode", "TrimPadding", "compare_outputs",
           "padded_check_feeds", "plan", "summary_line", "trim_padding", "trim_padding_graph", "trim_padding_stage"]
