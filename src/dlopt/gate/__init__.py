"""`dlopt gate`: fail CI on a real latency, accuracy or size regression, and not on noise.

The latency decision is a sequential test on the confidence interval of the latency ratio
candidate / baseline (medians, dlopt.stats.ratio_ci):

- with a baseline *model*, both models run interleaved on this machine (dlopt.bench's
  InterleavedSampler) and the CI is a paired bootstrap over rounds: machine phases hit both models
  alike and cancel in the ratio;
- with a stored baseline (`dlopt bench ... --save-baseline base.json`), only the candidate runs and
  the CI is an unpaired bootstrap against the stored samples. Those were measured at another time,
  so the machine's drift between the two measurements is not in the CI: the interleaved mode is the
  reliable one, and a stored baseline from another machine is refused unless allowed.

Verdicts at each look: *pass* when the CI's upper bound is within 1 + max_slowdown, *fail* when its
lower bound is above it, otherwise keep sampling. Looks happen on a fixed geometric schedule over the
time budget (`looks` of them, the first after budget/32), and when the budget is spent undecided the
verdict is *inconclusive*; a policy says whether that exits 3, fails or passes.

Why the looks are Bonferroni-corrected: checking a 95 % CI again and again while sampling and
stopping at the first decisive one makes a wrong decision much likelier than 5 % (each look is
another chance for noise to cross the line). Each look therefore uses a CI at level
1 - (1 - confidence) / looks, which bounds the chance of a wrong "fail" (true ratio at the threshold
or below) and of a wrong "pass" (true ratio above it) over the whole run by (1 - confidence) / 2
each. The price is a slightly wider CI per look; since regressions worth catching are not at the
threshold to three decimals, decisions still come in seconds.

Exit codes: 0 pass, 1 regression, 2 usage or input error (dlopt.errors.InputError), 3 inconclusive
(with the default policy).

The package, by concern:
    config.py      GateConfig and its checks, verdicts, policies, exit codes
    sequential.py  the sequential latency test: look schedule, per-look confidence, judge
    baseline.py    stored baselines: save, load, check, machine fingerprint differences
    result.py      GateCheck, GateResult, the overall verdict
    accuracy.py    EvalSpec and the accuracy checks (metric drops against the baseline model)
    run.py         run_gate: interleaved against the baseline model, or against a stored baseline
    report.py      text, Markdown and JUnit reports, written atomically
"""

# Part of this module's API before it became a package (the gate drives the bench sampler).
from dlopt.bench import Repeated, runs_per_sample
from dlopt.gate.accuracy import EvalSpec, accuracy_checks, accuracy_gated, metric_drop, validate_eval_spec
from dlopt.gate.baseline import (
    FINGERPRINT_KEYS,
    STORED_SAMPLES_MAX,
    StoredBaseline,
    StoredBatch,
    baseline_document,
    fingerprint_differences,
    load_baseline,
    save_baseline,
    thin,
)
from dlopt.gate.config import (
    BASELINE_SCHEMA,
    BASELINE_VERSION,
    DEFAULT_BUDGET_S,
    DEFAULT_SEQ_LEN,
    EXIT_INCONCLUSIVE,
    EXIT_PASS,
    EXIT_REGRESSION,
    EXIT_USAGE,
    GATE_SCHEMA,
    GATE_VERSION,
    POLICIES,
    VERDICTS,
    GateConfig,
    ProgressFn,
    validate_config,
)
from dlopt.gate.outputs import format_gate, format_markdown, junit_xml, write_outputs
from dlopt.gate.result import GateCheck, GateResult, overall_verdict
from dlopt.gate.run import MIN_SAMPLE_S, is_baseline_file, run_gate
from dlopt.gate.sequential import LatencyOutcome, Look, judge, look_confidence, look_schedule, sequential_test
from dlopt.metrics import LOWER_IS_BETTER

__all__ = [
    "BASELINE_SCHEMA",
    "BASELINE_VERSION",
    "GateCheck",
    "EXIT_INCONCLUSIVE",
    "EXIT_PASS",
    "EXIT_REGRESSION",
    "EXIT_USAGE",
    "GateConfig",
    "GateResult",
    "LatencyOutcome",
    "Look",
    "POLICIES",
    "StoredBaseline",
    "baseline_document",
    "fingerprint_differences",
    "format_markdown",
    "format_gate",
    "is_baseline_file",
    "judge",
    "junit_xml",
    "load_baseline",
    "look_confidence",
    "look_schedule",
    "overall_verdict",
    "run_gate",
    "save_baseline",
    "sequential_test",
    "validate_config",
    "write_outputs",
    "accuracy_checks",
    "accuracy_gated",
    "DEFAULT_BUDGET_S",
    "DEFAULT_SEQ_LEN",
    "EvalSpec",
    "FINGERPRINT_KEYS",
    "GATE_SCHEMA",
    "GATE_VERSION",
    "LOWER_IS_BETTER",
    "metric_drop",
    "MIN_SAMPLE_S",
    "ProgressFn",
    "STORED_SAMPLES_MAX",
    "StoredBatch",
    "thin",
    "validate_eval_spec",
    "VERDICTS",
    "Repeated",
    "runs_per_sample",
]
