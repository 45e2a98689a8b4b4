"""Timed kernel choices that come out the same on every run on one CPU model.

Timing on the spot made quantize's output depend on the machine's load: two quantizes of one OCR model
with the same data wrote two graphs, and 8 concurrent identical quantizes gave 2 model hashes. So each
choice here (INT8 or float for a node class, the mixed model or all INT8, LayerNorm fused or not):
- is timed on the calling thread's CPU time (load on other cores barely moves it, wall time does), in
  interleaved rounds, and picks the alternative only when it is faster by the rule's margin *and* the
  bootstrap CI of the speed ratio lies above 1; a tie or an uncertain result gives the fixed default;
- is recorded with its figures (medians, CI, rounds, margin) in the quantize report;
- is cached per CPU (model name, ISA flags, ONNX Runtime version) and per signature of what was timed
  (op types, shapes, attributes, dtypes; never node names) in the stage cache's folder, so that later
  runs, and concurrent ones (one times under the key's lock, the others wait and read its entry), take
  the same decision; `dlopt cache ls` lists the entries;
- can be replayed from a report (`--node-forms FILE.quantize.json`) on another machine, without timing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.errors import InputError

DECISION_KIND = "kernel-decision"
DECISION_FILE = "decision.json"
DECISION_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class DecisionRule:
    """When the alternative form replaces the default: its speed-up (default time / alternative time,
    median of the per-round ratios) is at least `margin` and the `confidence` CI's lower end is above 1.
    A look of `rounds` rounds whose estimate clears the margin while its CI still reaches 1 is followed by
    another, pooled with it, up to `looks` in all: a 15-round look on a loaded machine left EfficientNet-Lite0's
    stem padding at 1.11x (CI 1.00-1.23) and the default (Xeon with AMX)."""

    margin: float
    confidence: float = 0.95
    rounds: int = 15
    runs_per_round: int = 3
    looks: int = 3


def cpu_identity() -> dict[str, Any]:
    """What decides which kernel is faster: the CPU model, its ISA flags, ONNX Runtime's version."""
    import platform

    import onnxruntime

    from dlopt.targets.cpu import host_cpu

    cpu = host_cpu()
    return {
        "cpu_model": cpu.label,
        "machine": cpu.machine or platform.machine(),
        "isa_flags": list(cpu.isa_flags),
        "onnxruntime": onnxruntime.__version__,
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def judge(default_us: Sequence[float], alternative_us: Sequence[float], rule: DecisionRule) -> dict[str, Any]:
    """The figures of one decision from paired per-round times (microseconds, one round each index) and
    whether the alternative wins under `rule`."""
    from dlopt.stats import ratio_ci

    a = np.atleast_1d(np.asarray(default_us, dtype=np.float64))
    b = np.atleast_1d(np.asarray(alternative_us, dtype=np.float64))
    b = np.maximum(b, 1e-9)
    if a.size >= 2 and a.size == b.size:
        # speed-up of the alternative: default / alternative = "other / baseline" with the alternative as baseline
        ci = ratio_ci(b, a, confidence=rule.confidence, seed=0)
        estimate, low, high = ci.estimate, ci.low, ci.high
    else:  # one figure each (a caller's own timer): no spread to judge, the estimate is all there is
        estimate = low = high = float(np.median(a / b)) if a.size == b.size else float(np.median(a) / np.median(b))
    wins = bool(estimate >= rule.margin and low > 1.0)
    return {
        "clock": "thread CPU time",
        "rounds": int(a.size),
        "runs_per_round": rule.runs_per_round,
        "default_us": round(float(np.median(a)), 3),
        "alternative_us": round(float(np.median(b)), 3),
        "speedup": round(float(estimate), 4),
        "ci": [round(float(low), 4), round(float(high), 4)],
        "confidence": rule.confidence,
        "margin": rule.margin,
        "alternative_wins": wins,
    }


class DecisionStore:
    """Where decisions come from: a report being replayed, the decision cache, or a timing now (then
    cached). `replay`: the decisions of a report, by signature digest; `cache_dir`: the stage cache's
    folder (default: $DLOPT_CACHE_DIR, else ~/.cache/dlopt/stages)."""

    def __init__(
        self,
        *,
        replay: Mapping[str, Mapping[str, Any]] | None = None,
        replay_source: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        from dlopt.stagecache import StageCache, default_cache_dir

        self.replay = dict(replay) if replay is not None else None
        self.replay_source = replay_source
        self.cache = StageCache(cache_dir or default_cache_dir())
        self._identity: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = cpu_identity()
        return self._identity

    def decide(
        self,
        question: str,
        signature: Mapping[str, Any],
        rule: DecisionRule,
        *,
        default: str,
        alternative: str,
        measure: Callable[[], tuple[Sequence[float], Sequence[float]]],
    ) -> dict[str, Any]:
        """The decision record for `question` about what `signature` describes: `choice` (default or
        alternative), `source` (replayed, cache, timed), the figures and the keys. `measure` returns
        paired per-round microseconds (default form, alternative form); it is called only on a miss."""
        signature_sha = _digest(
            {"question": question, "signature": signature, "rule": asdict(rule), "forms": [default, alternative]}
        )
        base = {"question": question, "default": default, "alternative": alternative, "signature_sha256": signature_sha}
        if self.replay is not None:
            recorded = self.replay.get(signature_sha)
            if recorded is None:
                return {
                    **base,
                    "choice": default,
                    "source": "default",
                    "why": f"not among the decisions of {self.replay_source}: the default",
                }
            timed_on = (recorded.get("cpu") or {}).get("cpu_model")
            return {
                **base,
                "choice": recorded["choice"],
                "source": "replayed",
                "why": f"replayed from {self.replay_source} (decided on {timed_on})",
                "figures": recorded.get("figures"),
                "cpu": recorded.get("cpu"),
            }
        from dlopt.stagecache import cache_key

        identity = self.identity
        inputs = {"kind": DECISION_KIND, "format": DECISION_FORMAT, "cpu": identity, "signature_sha256": signature_sha}
        key = cache_key(inputs)
        found = self._read(key)
        if found is not None:
            return {**base, **found, "source": "cache", "cache_key": key}
        try:
            with self.cache.building(key) as staging:
                found = self._read(key)  # another process may have decided while this one waited for the lock
                if found is not None:
                    return {**base, **found, "source": "cache", "cache_key": key}
                record = self._timed(base, rule, measure, identity)
                (staging / DECISION_FILE).write_text(json.dumps(record, sort_keys=True, indent=1))
                self.cache.commit(
                    key,
                    staging,
                    {"kind": DECISION_KIND, "artifact": DECISION_FILE, "source": question, "inputs": inputs},
                )
        except (InputError, OSError) as e:  # a cache that cannot be written: decide now, say it is not kept
            record = self._timed(base, rule, measure, identity)
            record["why"] += f"; not cached ({e})"
            return {**record, "source": "timed", "cache_key": None}
        return {**record, "source": "timed", "cache_key": key}

    def _read(self, key: str) -> dict[str, Any] | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        try:
            record = json.loads((entry.path / DECISION_FILE).read_text())
        except (OSError, ValueError):
            return None
        return {k: record[k] for k in ("choice", "why", "figures", "cpu") if k in record}

    @staticmethod
    def _timed(base: Mapping[str, Any], rule: DecisionRule, measure, identity) -> dict[str, Any]:
        default_us, alternative_us = (list(np.atleast_1d(times)) for times in measure())
        figures = judge(default_us, alternative_us, rule)
        looks = 1
        # promising but uncertain: more rounds, pooled (each look's sessions are new, so the pooled rounds
        # also span where the sessions' buffers land); a tie or a loss ends at the first look
        while not figures["alternative_wins"] and figures["speedup"] >= rule.margin and looks < rule.looks:
            more_default, more_alternative = measure()
            default_us += list(np.atleast_1d(more_default))
            alternative_us += list(np.atleast_1d(more_alternative))
            figures = judge(default_us, alternative_us, rule)
            looks += 1
        figures["looks"] = looks
        choice = base["alternative"] if figures["alternative_wins"] else base["default"]
        if figures["alternative_wins"]:
            why = (
                f"{base['alternative']} {figures['speedup']:.2f}x faster (CI {figures['ci'][0]:.2f}-"
                f"{figures['ci'][1]:.2f}, margin {rule.margin}x)"
            )
        else:
            why = (
                f"{base['default']} (the default): {base['alternative']} measured {figures['speedup']:.2f}x "
                f"(CI {figures['ci'][0]:.2f}-{figures['ci'][1]:.2f}), needs >= {rule.margin}x with the CI above 1"
            )
        return {**base, "choice": choice, "why": why, "figures": figures, "cpu": identity}


def load_replay(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The decisions recorded in a quantize report (FILE.quantize.json), by signature digest."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as e:
        raise InputError(
            f"{path}: cannot read the report to replay ({e.strerror or e})",
            "pass the FILE.quantize.json a quantize wrote, or --node-forms auto",
        ) from e
    except ValueError as e:
        raise InputError(f"{path} is not JSON: {e}", "pass the FILE.quantize.json a quantize wrote") from e
    decisions = {}
    for section in ("node_forms", "kernel_choice", "gelu_form"):
        for record in ((report.get(section) or {}) if isinstance(report, dict) else {}).get("decisions", []) or []:
            if isinstance(record, dict) and "signature_sha256" in record and "choice" in record:
                decisions[record["signature_sha256"]] = record
    if not isinstance(report, dict) or ("node_forms" not in report and "kernel_choice" not in report):
        raise InputError(
            f"{path} records no kernel decisions (no node_forms or kernel_choice)",
            "pass the FILE.quantize.json of a static INT8 quantize for target cpu",
        )
    return decisions


def is_replay(node_forms: str) -> bool:
    """Whether --node-forms names a report to replay rather than a mode."""
    return node_forms.endswith(".json")


__all__ = ["DECISION_KIND", "DecisionRule", "DecisionStore", "cpu_identity", "is_replay", "judge", "load_replay"]
