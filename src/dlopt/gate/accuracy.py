"""The accuracy checks: an evaluator (a reference model's, or data and metrics) run on both models,
and the drop of each metric against its limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlopt.errors import InputError
from dlopt.gate.config import GateConfig
from dlopt.gate.result import GateCheck
from dlopt.metrics import metric_drop  # the one meaning of a drop, for quantize and optimize too

# What a metric computed against the baseline's own output would be for the baseline itself.
_PERFECT_VS_BASELINE = {"top1_agreement": 1.0, "cosine": 1.0, "mse": 0.0}


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """How to score both models: a reference model's real evaluator (`dlopt.models`), or data + metrics
    (`dlopt.evaluate.evaluate_data`; the candidate is compared with the baseline on the same inputs)."""

    reference_model: str | None = None
    data: Any = None  # a source of dlopt.data (text) or a DataSpec
    metrics: tuple[str, ...] = ("top1",)
    output: str | None = None
    target: str = "cpu"

    def describe(self) -> str:
        if self.reference_model:
            return f"the {self.reference_model} reference evaluator"
        return f"{self.data} ({', '.join(self.metrics)})"


def validate_eval_spec(spec: EvalSpec) -> None:
    from dlopt.evaluate import validate_metrics

    if (spec.reference_model is None) == (spec.data is None):
        raise InputError(
            "the accuracy gate needs one evaluator",
            "name a reference model's evaluator, or evaluation data (.npz) and a metric",
        )
    if spec.reference_model is not None:
        from dlopt.models import get_reference_model

        get_reference_model(spec.reference_model)  # unknown names fail here, before any measuring
        return
    metrics = validate_metrics(spec.metrics)
    if "sqnr" in metrics:
        raise InputError(
            "sqnr has no 'drop' against the baseline (the baseline's own SQNR is infinite)",
            "gate on cosine, mse or top1 instead (dlopt eval reports SQNR)",
        )
    from dlopt.data import as_spec

    data = as_spec(spec.data)
    if data.is_path and not Path(data.source).exists():
        raise InputError(
            f"evaluation data {data.source} does not exist",
            "give an existing .npz file, a folder, a reader file.py:function or model:NAME",
        )


def accuracy_gated(config: GateConfig) -> bool:
    return config.max_accuracy_drop is not None or bool(config.metric_drops)


def accuracy_checks(baseline: Path, candidate: Path, spec: EvalSpec, config: GateConfig) -> list[GateCheck]:
    """Score both models with `spec` and gate each metric's drop on its limit (config.metric_drops, else
    config.max_accuracy_drop; a metric with neither is not gated and not listed)."""
    from dlopt.evaluate import EvalConfig, evaluate_data, evaluate_reference_model

    started = time.perf_counter()
    eval_config = EvalConfig(
        metrics=spec.metrics, target=spec.target, output=spec.output, allow_fallback=config.allow_fallback
    )
    if spec.reference_model is not None:
        result = evaluate_reference_model(candidate, spec.reference_model, eval_config, reference=baseline)
    else:
        result = evaluate_data(candidate, spec.data, eval_config, reference=baseline)
    seconds = time.perf_counter() - started
    per_metric = dict(config.metric_drops)
    unknown = sorted(set(per_metric) - {row.metric for row in result.rows})
    if unknown:
        raise InputError(
            f"{spec.describe()} reports no metric {', '.join(unknown)}",
            f"it reports: {', '.join(row.metric for row in result.rows)}",
        )
    checks: list[GateCheck] = []
    for row in result.rows:
        limit = per_metric.get(row.metric, config.max_accuracy_drop)
        if limit is None:
            continue
        base_value = row.reference if row.reference is not None else _PERFECT_VS_BASELINE.get(row.metric)
        if base_value is None:
            continue
        drop = metric_drop(row.metric, base_value, row.value)
        verdict = "pass" if not math.isnan(drop) and drop <= limit + 1e-12 else "fail"
        note = row.note or ("vs the baseline model's score" if row.reference is not None else "")
        note = "; ".join([note, *(f"warning: {w}" for w in result.warnings)]).strip("; ")
        checks.append(
            GateCheck(
                name=f"accuracy: {row.metric}",
                verdict=verdict,
                baseline=base_value,
                candidate=row.value,
                change=f"drop {drop:+.4g}",
                limit=f"drop <= {limit:g}",
                detail=f"{spec.describe()}; {note}".rstrip("; "),
                seconds=0.0 if checks else seconds,
            )
        )  # one evaluation: its time counted once
    if not checks:
        raise InputError(
            f"{spec.describe()} gave no metric that compares the two models",
            "choose a metric with a baseline value (top1 with labels, cosine, mse)",
        )
    return checks
