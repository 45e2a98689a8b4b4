"""What a gate returns: its checks, their verdicts, and the exit code they make."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dlopt.errors import InputError
from dlopt.gate.config import (
    EXIT_INCONCLUSIVE,
    EXIT_PASS,
    EXIT_REGRESSION,
    GATE_SCHEMA,
    GATE_VERSION,
    POLICIES,
    GateConfig,
)
from dlopt.gate.sequential import LatencyOutcome


@dataclass(frozen=True, kw_only=True)
class GateCheck:
    name: str  # "latency", "size", "accuracy: <metric>"
    verdict: str  # "pass", "fail", "inconclusive"
    baseline: float | None
    candidate: float | None
    change: str  # e.g. "x1.021 [1.004, 1.039]" or "-0.004"
    limit: str  # e.g. "<= x1.050"
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class GateResult:
    config: GateConfig
    mode: str  # "interleaved" (baseline model) or "stored" (baseline file)
    baseline: str
    candidate: str
    checks: tuple[GateCheck, ...]
    verdict: str  # overall: "pass", "fail" or "inconclusive"
    exit_code: int
    latency: LatencyOutcome | None
    clock: str | None
    threads: int
    batch: int | None
    warmup: Mapping[str, Any] | None
    machine: Mapping[str, Any]
    cross_machine: tuple[str, ...]  # fingerprint differences accepted with allow_cross_machine
    notes: tuple[str, ...]
    seconds: float  # the whole decision, loading included
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        from dlopt.stage import config_to_dict
        from dlopt.tables import environment

        latency = None
        if self.latency is not None:
            o = self.latency
            latency = {
                "verdict": o.verdict,
                "limit": o.limit,
                "reason": o.reason,
                "rounds": o.rounds,
                "seconds": o.seconds,
                "look_confidence": o.look_confidence,
                "interval": o.interval.as_dict() if o.interval is not None else None,
                "looks": [
                    {
                        "seconds": k.seconds,
                        "rounds": k.rounds,
                        "verdict": k.verdict,
                        "low": k.interval.low,
                        "estimate": k.interval.estimate,
                        "high": k.interval.high,
                    }
                    for k in o.looks
                ],
            }
        return {
            "schema": GATE_SCHEMA,
            "schema_version": GATE_VERSION,
            "created": self.created,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "mode": self.mode,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "config": config_to_dict(self.config),
            "checks": [
                {
                    "name": c.name,
                    "verdict": c.verdict,
                    "baseline": c.baseline,
                    "candidate": c.candidate,
                    "change": c.change,
                    "limit": c.limit,
                    "detail": c.detail,
                    "seconds": c.seconds,
                }
                for c in self.checks
            ],
            "latency": latency,
            "clock": self.clock,
            "threads": self.threads,
            "batch": self.batch,
            "warmup": dict(self.warmup) if self.warmup is not None else None,
            "machine": dict(self.machine),
            "cross_machine": list(self.cross_machine),
            "notes": list(self.notes),
            "seconds": self.seconds,
            "environment": environment(),
        }


def overall_verdict(checks: Sequence[GateCheck], policy: str) -> tuple[str, int]:
    """Any failed check fails the gate (exit 1); else any inconclusive one is handled by the policy."""
    if policy not in POLICIES:
        raise InputError(f"unknown inconclusive policy {policy!r}", f"choose one of {', '.join(POLICIES)}")
    verdicts = {c.verdict for c in checks}
    if "fail" in verdicts:
        return "fail", EXIT_REGRESSION
    if "inconclusive" in verdicts:
        return "inconclusive", {"exit-3": EXIT_INCONCLUSIVE, "fail": EXIT_REGRESSION, "pass": EXIT_PASS}[policy]
    return "pass", EXIT_PASS
