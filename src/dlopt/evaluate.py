"""`dlopt eval`: the accuracy side of a model, beside its reference's.

Two ways to evaluate:
- on data: an .npz with one array per model input (plus optional `labels`), and metrics that
  compare the model's output with the labels (top1) or with a reference model's output on the same
  inputs (top1 agreement, cosine, SQNR, MSE); without --reference, an array named like the output
  (or `expected`) in the .npz is the reference output. The task metrics of dlopt.metrics (detection,
  map, sequence, topk, embedding, perplexity; `auto`: chosen from the reference's outputs) compare every
  output with the reference model's (--reference);
- with a reference model's own evaluator (`dlopt eval --model minilm`): its real task metrics on its real
  data (dlopt.models), for the model and, with --reference, for the reference model too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError
from dlopt.fidelity import cosine, mse, sample_rows, sqnr_db, top1_agreement  # the one implementation
from dlopt.inputs import session_inputs
from dlopt.metrics import higher_is_better  # direction: the metric table's, else the name's

# top1 against labels (or agreement with the reference), cosine, sqnr and mse on one output; the task
# metrics of dlopt.metrics.METRIC_TABLE on every output against the reference model's; auto: the task
# metric chosen from the reference's outputs
TASK_METRICS = ("auto", "topk", "detection", "map", "sequence", "embedding", "perplexity", "probability")
METRICS = ("top1", "cosine", "sqnr", "mse", *TASK_METRICS)
LABELS_KEY = "labels"  # both among dlopt.data.ANSWER_ARRAYS: other verbs skip them
EXPECTED_KEY = "expected"


# --------------------------------------------------------------------------- the metrics


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples (first axis) whose argmax over the flattened sample equals the label.
    `labels` are class indices [N], or scores of the same shape as `logits` (then: top-1 agreement
    of the two, dlopt.fidelity.top1_agreement)."""
    scores = np.asarray(logits)
    if scores.ndim < 2:
        raise InputError(
            f"top1 needs scores of shape [N, classes], got {list(scores.shape)}",
            "choose {output=NAME}, the output with the class scores",
        )
    target = np.asarray(labels)
    if target.shape == scores.shape:
        return top1_agreement(scores, target)
    predicted = sample_rows(scores).argmax(axis=1)
    target = target.reshape(-1)
    if target.shape[0] != predicted.shape[0]:
        raise InputError(f"{target.shape[0]} labels for {predicted.shape[0]} samples", "give one label per sample")
    return float(np.mean(predicted == target))


_COMPARE = {"cosine": cosine, "sqnr": sqnr_db, "mse": mse}


# --------------------------------------------------------------------------- running and results


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    metrics: tuple[str, ...] = ("top1",)
    target: str = "cpu"
    threads: int = 0  # 0: all cores (evaluation is not timed)
    batch_size: int = 32
    output: str | None = None  # which model output the metrics read; default: the first
    allow_fallback: bool = False
    evaluator: str | None = None  # FILE.py:FUNCTION, the user's metric vs the reference (dlopt.metrics)


@dataclass(frozen=True)
class MetricRow:
    metric: str
    value: float
    reference: float | None  # the reference model's value on the same task, where that means something
    note: str = ""

    @property
    def delta(self) -> float | None:
        return None if self.reference is None else self.value - self.reference


@dataclass(frozen=True)
class EvalResult:
    model: str
    reference: str | None
    source: str  # the data file, or "reference model NAME"
    samples: int | None
    rows: tuple[MetricRow, ...]
    runs_on: str
    config: EvalConfig = field(default_factory=EvalConfig)
    warnings: tuple[str, ...] = ()  # what makes the numbers doubtful (NaN inputs, labels out of range)

    def to_dict(self) -> dict[str, Any]:
        from dlopt.stage import config_to_dict
        from dlopt.tables import environment

        return {
            "schema": "dlopt.eval",
            "schema_version": 1,
            "model": self.model,
            "reference": self.reference,
            "source": self.source,
            "samples": self.samples,
            "runs_on": self.runs_on,
            "config": config_to_dict(self.config),
            "metrics": [
                {
                    "metric": r.metric,
                    "value": _json_float(r.value),
                    "reference": _json_float(r.reference),
                    "delta": _json_float(r.delta),
                    "note": r.note,
                }
                for r in self.rows
            ],
            "warnings": list(self.warnings),
            "environment": environment(),
        }

    def value(self, metric: str) -> float:
        for row in self.rows:
            if row.metric == metric:
                return row.value
        raise KeyError(metric)


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    if np.isinf(value) or np.isnan(value):
        return str(value)  # JSON has no inf/nan
    return float(value)


def validate_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if not metrics:
        raise InputError("no metric chosen", f"name one or more of {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise InputError(f"unknown metric {m!r}", f"choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(metrics))


def _open(path: str | os.PathLike, config: EvalConfig):
    from dlopt.fileio import load_onnx
    from dlopt.targets import get_target

    target = get_target(config.target)
    load_onnx(path, load_external_data=False)  # clear errors for missing or corrupt files
    threads = config.threads or (os.cpu_count() or 1)
    provider_options = target.provider_options()
    return target.create_session(
        Path(path), threads=threads, provider_options=provider_options, allow_fallback=config.allow_fallback
    )


def run_batched(handle, feeds: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Run the model over the samples of `feeds` (axis 0, or each input's sample axis when `feeds` is a
    dlopt.data.SampleArrays) in chunks (a fixed batch axis sets the chunk)."""
    from dlopt.data import SampleArrays  # samples on each input's declared axis (--input-layout)

    specs = session_inputs(handle.session)
    arrays = feeds if isinstance(feeds, SampleArrays) else SampleArrays.from_mapping(feeds)
    counts = {
        name: int(np.shape(a)[arrays.axes[name]]) for name, a in arrays.items() if arrays.axes.get(name) is not None
    }
    if len(set(counts.values())) > 1:
        raise InputError(
            f"the data's arrays hold different numbers of samples: {counts}",
            "give every input the same first dimension",
        )
    n = next(iter(counts.values())) if counts else 1
    axes = {s.name: arrays.axes.get(s.name) for s in specs}
    fixed = {size for s in specs if (axis := axes[s.name]) is not None and (size := s.fixed(axis))}
    step = fixed.pop() if len(fixed) == 1 else batch_size
    if n % step and fixed:
        raise InputError(
            f"{n} samples do not split into the model's fixed batch of {step}", f"give a multiple of {step} samples"
        )
    names = handle.output_names()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, step):
        part = arrays.take(start, start + step)
        for name, out in zip(names, handle.session.run(None, part)):
            chunks[name].append(out)
    # an output's samples lie on the axis its declared shape names like an input's sample axis ("batch" on
    # axis 1 of a streaming model's state), else on axis 0
    sample_dims = {
        s.shape[axis] for s in specs if (axis := axes[s.name]) is not None and isinstance(s.shape[axis], str)
    }
    out_axes = {
        o.name: next((a for a, d in enumerate(o.shape or []) if isinstance(d, str) and d in sample_dims), 0)
        for o in handle.session.get_outputs()
    }
    return {name: np.concatenate(parts, axis=out_axes.get(name, 0)) for name, parts in chunks.items()}


def _pick_output(outputs: Mapping[str, np.ndarray], wanted: str | None, what: str) -> tuple[str, np.ndarray]:
    if wanted is None:
        name = next(iter(outputs))
        return name, outputs[name]
    if wanted not in outputs:
        raise InputError(f"{what} has no output {wanted!r}", f"its outputs: {', '.join(outputs)}")
    return wanted, outputs[wanted]


def evaluate_data(
    model: str | os.PathLike,
    data: str | os.PathLike,
    config: EvalConfig = EvalConfig(),
    *,
    reference: str | os.PathLike | None = None,
) -> EvalResult:
    """Metrics of `model` on the inputs in the .npz `data` (see the module docstring)."""
    from dlopt.data import data_arrays
    from dlopt.inputs import feeds_from_arrays

    metrics = validate_metrics(config.metrics) if config.metrics or not config.evaluator else ()
    if config.evaluator:
        from dlopt.metrics import load_evaluator

        load_evaluator(config.evaluator)  # a missing or broken file fails before any model runs
    if config.batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {config.batch_size}", "e.g. {batch_size=32}")
    handle = _open(model, config)
    arrays = data_arrays(data, model, extra=(LABELS_KEY, EXPECTED_KEY, *handle.output_names()))  # dlopt.data
    feeds = arrays.with_arrays(feeds_from_arrays(session_inputs(handle.session), arrays, str(data), arrays.axes))
    n = _sample_count(feeds, data)
    all_outputs = run_batched(handle, feeds, config.batch_size)
    out_name, output = _pick_output(all_outputs, config.output, str(model))
    ref_output = None
    ref_handle = None
    ref_outputs: dict[str, np.ndarray] = {}
    if reference is not None:
        ref_handle = _open(reference, config)
        ref_feeds = arrays.with_arrays(
            feeds_from_arrays(session_inputs(ref_handle.session), arrays, str(data), arrays.axes)
        )
        ref_outputs = run_batched(ref_handle, ref_feeds, config.batch_size)
        _, ref_output = _pick_output(ref_outputs, out_name if out_name in ref_outputs else None, str(reference))
    elif out_name in arrays or EXPECTED_KEY in arrays:
        ref_output = arrays[out_name] if out_name in arrays else arrays[EXPECTED_KEY]
    labels = arrays.get(LABELS_KEY)
    rows = []
    if config.evaluator:
        rows.append(
            task_metric_row("auto", all_outputs, ref_outputs, feeds, config.output, data, evaluator=config.evaluator)
        )
    for metric in metrics:
        if metric in TASK_METRICS:
            rows.append(task_metric_row(metric, all_outputs, ref_outputs, feeds, config.output, data))
            continue
        if metric == "top1":
            if labels is None and ref_output is None:
                raise InputError(
                    f"top1 needs labels: {data} has no {LABELS_KEY!r} array and no reference",
                    f"add a {LABELS_KEY!r} array of class indices, or pass {{reference=REF.onnx}}",
                )
            if labels is not None:
                ref_value = top1(ref_output, labels) if reference is not None and ref_output is not None else None
                rows.append(MetricRow("top1", top1(output, labels), ref_value, f"vs {LABELS_KEY}"))
            if ref_output is not None:
                rows.append(
                    MetricRow("top1_agreement", top1(output, ref_output), None, "argmax equal to the reference's")
                )
            continue
        if ref_output is None:
            raise InputError(
                f"{metric} compares with a reference output, and there is none",
                f"pass {{reference=REF.onnx}}, or store the expected output in {data} "
                f"as {out_name!r} or {EXPECTED_KEY!r}",
            )
        note = "vs reference model" if reference is not None else "vs expected output in data"
        if metric == "sqnr" and np.issubdtype(np.asarray(ref_output).dtype, np.floating):
            from dlopt.metrics import group_sqnr

            groups = group_sqnr([[ref_output]], [[output]], [out_name])[out_name]
            if len(groups) > 1:  # a detector's boxes and scores apart: the whole output's SQNR hides the scores
                note += "; by channel group " + ", ".join(f"{g} {v:.1f} dB" for g, v in groups.items())
        rows.append(MetricRow(metric, _COMPARE[metric](output, ref_output), None, note))
    return EvalResult(
        model=str(model),
        reference=str(reference) if reference else None,
        source=str(data),
        samples=n,
        rows=tuple(rows),
        runs_on=handle.runs_on,
        config=config,
        warnings=data_warnings(feeds, labels, output, data),
    )


def task_metric_row(
    metric: str,
    outputs: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    feeds: Mapping[str, np.ndarray],
    output: str | None,
    data,
    *,
    evaluator: str | None = None,
) -> MetricRow:
    """A dlopt.metrics task metric of every output against the reference model's on the same inputs (the
    whole data as one run: each accumulator goes over the batch axis). Its reference value is the
    reference's against itself (1.0 for the agreement metrics), so the gate's drop is in the table's unit."""
    from dlopt.metrics import choose_metric, measure

    if not reference:
        raise InputError(
            f"{metric} compares every output with a reference model's, and there is none",
            "pass {reference=FP32.onnx}, the model the candidate was made from",
        )
    names = [n for n in reference if n in outputs]
    ref_run, run = [reference[n] for n in names], [outputs[n] for n in names]
    choice = choose_metric(ref_run, names, feeds, requested=None if metric == "auto" else metric, evaluator=evaluator)
    if output is not None and "output" in choice.params and output in names:
        from dataclasses import replace

        choice = replace(choice, params={**choice.params, "output": names.index(output)})
    value = measure(choice, [ref_run], [run], [feeds], names)
    baseline = measure(choice, [ref_run], [ref_run], [feeds], names)
    parts = [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in value.components.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    note = "; ".join([f"vs reference model; {choice.reason}", *parts[:6], value.note]).strip("; ")
    return MetricRow(value.name, value.value, baseline.value if choice.name != "sqnr" else None, note)


def _sample_count(feeds: Mapping[str, np.ndarray], data) -> int | None:
    from dlopt.data import SampleArrays

    count = SampleArrays.from_mapping(feeds).count
    if feeds and count == 0:
        raise InputError(f"data file {data} holds no samples (its arrays have 0 rows)", "give at least one sample")
    return count or None


def data_warnings(
    feeds: Mapping[str, np.ndarray], labels: np.ndarray | None, output: np.ndarray, data
) -> tuple[str, ...]:
    """What makes metrics on `data` doubtful: non-finite inputs or outputs, labels that name no class."""
    found = []
    for name, array in feeds.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating):
            bad = array.size - int(np.count_nonzero(np.isfinite(array)))
            if bad:
                found.append(
                    f"{data}: input {name!r} holds {bad} NaN or infinite value(s); metrics on those samples mean little"
                )
    out = np.asarray(output)
    if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
        found.append(
            f"the model's output holds {out.size - int(np.count_nonzero(np.isfinite(out)))} NaN or infinite value(s)"
        )
    if labels is not None and out.ndim >= 2 and np.asarray(labels).shape != out.shape:
        target = np.asarray(labels).reshape(-1)
        classes = int(np.prod(out.shape[1:]))
        if np.issubdtype(target.dtype, np.number):
            outside = int(np.count_nonzero((target < 0) | (target >= classes) | (target != np.round(target))))
            if outside:
                found.append(
                    f"{data}: {outside} label(s) are not a class index in [0, {classes}); top1 counts them as wrong"
                )
    return tuple(found)


def evaluate_reference_model(
    model: str | os.PathLike,
    name: str,
    config: EvalConfig = EvalConfig(),
    *,
    reference: str | os.PathLike | None = None,
) -> EvalResult:
    """The reference model `name`'s real evaluator (its task metrics on its real data) run on the
    ONNX `model`, and on `reference` for comparison."""
    from dlopt.models import get_reference_model, onnx_runner

    spec = get_reference_model(name)

    def runner(path, handle):
        run = onnx_runner(handle.session)
        needed = set(handle.input_names())

        def checked(feeds):
            missing = needed - set(feeds)
            if missing:  # a model that is not this reference model's: say so, not an onnxruntime traceback
                raise InputError(
                    f"{path} needs input(s) {sorted(missing)}, which the {name} evaluator does not "
                    f"provide (it gives {sorted(feeds)})",
                    f"evaluate a model exported from {name} (`dlopt export {name}`), or use {{data=DATA.npz}}",
                )
            return run(feeds)

        return checked

    handle = _open(model, config)
    values = spec.evaluate(runner(model, handle))
    ref_values: Mapping[str, float] = {}
    if reference is not None:
        ref_handle = _open(reference, config)
        ref_values = spec.evaluate(runner(reference, ref_handle))
    rows = tuple(
        MetricRow(metric, float(value), float(ref_values[metric]) if metric in ref_values else None)
        for metric, value in values.items()
    )
    return EvalResult(
        model=str(model),
        reference=str(reference) if reference else None,
        source=f"reference model {name}",
        samples=None,
        rows=rows,
        runs_on=handle.runs_on,
        config=config,
    )


def evaluate_lm(
    model: str | os.PathLike, data: str | os.PathLike, config: EvalConfig, reference: str | os.PathLike | None
) -> EvalResult:
    """The LM row of the metric table for an exported LM folder against its FP32 export (`reference`, an
    LM folder) on held-out UTF-8 text: perplexity over the reference's (FP32 = 1.0) and greedy next-token
    agreement, from prefills over windows of EVAL_WINDOW tokens (dlopt.lm.lm_fidelity)."""
    from dlopt.lm import heldout_fidelity, is_lm_folder

    if reference is None or not is_lm_folder(reference):
        raise InputError(
            f"evaluating the LM folder {model} needs its FP32 export as --reference (an LM folder)",
            "pass --reference FP32_FOLDER, the folder it was quantized from",
        )
    asked = set(config.metrics) - {"perplexity", "auto", "top1"}
    if asked or config.evaluator:
        what = sorted(asked)[0] if asked else "an evaluator"
        raise InputError(
            f"an LM folder is evaluated by perplexity and next-token agreement, not {what}", "use --metric perplexity"
        )
    f = heldout_fidelity(model, reference, data, threads=config.threads, what="--data text")
    window = f["window"]
    note = f"{f['tokens']} next tokens in {f['windows']} windows of {window}"
    rows = (
        MetricRow("perplexity", f["perplexity_ratio"], 1.0, f"ratio to the reference's; {note}"),
        MetricRow("perplexity_value", f["perplexity"], f["fp32_perplexity"], "exp(mean next-token NLL)"),
        MetricRow(
            "next_token_agreement",
            f["next_token_agreement"],
            1.0,
            "greedy (argmax) next token equal to the reference's",
        ),
    )
    return EvalResult(
        model=str(model),
        reference=str(reference),
        source=str(data),
        samples=f["windows"],
        rows=rows,
        runs_on="CPUExecutionProvider",
        config=config,
    )


def format_eval(result: EvalResult) -> str:
    from dlopt.tables import format_table

    model_label = Path(result.model).name
    ref_label = Path(result.reference).name if result.reference else "reference"
    if ref_label == model_label:
        ref_label = f"{ref_label} (reference)"
    rows = []
    for r in result.rows:
        better = ""
        direction = higher_is_better(r.metric)
        if r.delta is not None and r.delta != 0 and direction is not None and np.isfinite(r.delta):
            better = "better" if (r.delta > 0) == direction else "worse"
        rows.append(
            [
                r.metric,
                r.value,
                "" if r.reference is None else r.reference,
                "" if r.delta is None else f"{r.delta:+.4g} {better}".strip(),
                r.note,
            ]
        )
    table = format_table(["metric", model_label, ref_label, "delta", "note"], rows)
    samples = f", {result.samples} samples" if result.samples is not None else ""
    return f"{table}\n\nsource: {result.source}{samples}; ran on {result.runs_on}"


__all__ = [
    "EvalConfig",
    "EvalResult",
    "METRICS",
    "MetricRow",
    "TASK_METRICS",
    "evaluate_data",
    "evaluate_lm",
    "evaluate_reference_model",
    "format_eval",
    "higher_is_better",
    "run_batched",
    "task_metric_row",
    "top1",
    "validate_metrics",
]
