"""dlopt gate: exit non-zero when a candidate model is slower, less accurate or larger than its baseline."""

from __future__ import annotations

import os
import re
from typing import overload

import click

from dlopt.cli._common import (
    COUNT,
    DATA_SOURCES_HELP,
    FRACTION,
    NON_NEGATIVE_INT,
    data_options,
    echo_err,
    input_shape_option,
)
from dlopt.console import progress_bar


@overload
def parse_fraction(text: str, option: str) -> float: ...
@overload
def parse_fraction(text: None, option: str) -> None: ...
def parse_fraction(text: str | None, option: str) -> float | None:
    """'5%' -> 0.05; '0.05' -> 0.05. A bare number of 1 or more is refused as ambiguous."""
    from dlopt.errors import InputError

    if text is None:
        return None
    match = re.fullmatch(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(%?)\s*", str(text))
    if not match:
        raise InputError(f"cannot read {option} {text!r}", f"write a percentage, e.g. {option} 5%")
    value = float(match.group(1))
    if match.group(2):
        return value / 100
    if abs(value) >= 1:
        raise InputError(
            f"{option} {text} is ambiguous (percent or fraction?)",
            f"write {option} {text}% for percent, or a fraction below 1 such as 0.05",
        )
    return value


def parse_accuracy_drops(values: tuple[str, ...]) -> tuple[float | None, tuple[tuple[str, float], ...]]:
    """('0.01', 'top1=0.005') -> (0.01, (('top1', 0.005),))."""
    from dlopt.errors import InputError

    default = None
    per_metric = []
    for value in values:
        name, _, number = value.rpartition("=")
        try:
            drop = float(number)
        except ValueError:
            raise InputError(
                f"cannot read --max-accuracy-drop {value!r}",
                "write a number (every metric) or METRIC=NUMBER, e.g. top1=0.01",
            ) from None
        if name:
            per_metric.append((name.strip(), drop))
        elif default is not None:
            raise InputError(
                "--max-accuracy-drop given twice without a metric name",
                "give one default, and METRIC=NUMBER for the others",
            )
        else:
            default = drop
    return default, tuple(per_metric)


@click.command("gate", short_help="CI gate: fail on a real latency, accuracy or size regression, not on noise.")
@click.option(
    "--baseline",
    required=True,
    type=click.Path(dir_okay=True),
    help="The baseline: a model (.onnx, re-measured here, interleaved with the candidate: the reliable "
    "way) or a stored baseline (.json from `dlopt bench --save-baseline`).",
)
@click.option("--candidate", required=True, type=click.Path(dir_okay=True), help="The candidate model (.onnx).")
@click.option(
    "--max-slowdown",
    default="5%",
    show_default=True,
    help="Latency regression allowed: the candidate / baseline ratio may exceed 1 by this much.",
)
@click.option(
    "--max-accuracy-drop",
    "accuracy_drops",
    multiple=True,
    help="Largest drop allowed in each evaluator metric, in the metric's own unit, as in quantize and "
    "optimize (docs/metrics.md: agreement metrics are fractions of the baseline's answers, so 0.01 "
    "= one sample or box in a hundred; accuracy 0.01 = one point; for mse or perplexity, a rise), "
    "or METRIC=X for one metric (repeatable; metrics without a limit are not gated). Needs --eval "
    "or --eval-data.",
)
@click.option("--max-size-growth", default=None, help="Largest growth of the model's bytes on disk, e.g. 10%.")
@click.option(
    "--eval",
    "eval_model",
    default=None,
    help="Accuracy with a reference model's real evaluator and data (e.g. minilm).",
)
@click.option(
    "--eval-data",
    default=None,
    help="Accuracy on this data (as --data takes it; an .npz may hold `labels`); the candidate is compared "
    "with the baseline.",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="With --eval-data: top1, cosine, mse, or a task metric "
    "against the baseline's outputs: auto, detection, map, sequence, topk, embedding, perplexity, probability (repeat "
    "or comma-separate). [default: top1]",
)
@click.option("--eval-output", default=None, help="Which output the accuracy metrics read (default: the first).")
@click.option("--target", default="cpu", show_default=True, help="Execution target: cpu or cuda.")
@click.option("--threads", type=COUNT, default=None, help="Intra-op threads. [default: 1, or the stored baseline's]")
@click.option("--batch", type=COUNT, default=None, help="Batch size. [default: 1, or the stored baseline's first]")
@click.option(
    "--seq-len",
    type=COUNT,
    default=None,
    help="Length of dynamic non-batch, non-image axes of generated inputs. [default: 128, or the stored baseline's]",
)
@click.option(
    "--prompt-len",
    type=int,
    default=None,
    help="LM folders: prompt tokens (seeded random ids). [default: 128, at most half the context]",
)
@click.option("--new-tokens", type=int, default=None, help="LM folders: greedy tokens per generation. [default: 32]")
@click.option(
    "--data",
    default=None,
    help=f"Time the models on real inputs instead of generated ones: {DATA_SOURCES_HELP}; one batch of "
    "--batch samples per call, in turn.",
)
@click.option(
    "--clock",
    type=click.Choice(["auto", "cpu", "wall"]),
    default="auto",
    show_default=True,
    help="auto: thread CPU time for one thread on the CPU target (steady on shared machines), else wall.",
)
@click.option(
    "--budget",
    default="60s",
    show_default=True,
    help="Longest time for warm-up and sampling (model loading and accuracy not counted).",
)
@click.option(
    "--confidence",
    type=FRACTION,
    default=0.95,
    show_default=True,
    help="Confidence of the decision over all looks together.",
)
@click.option(
    "--looks",
    type=COUNT,
    default=8,
    show_default=True,
    help="Planned looks at the data (geometric over the budget); each uses a Bonferroni-corrected CI.",
)
@click.option(
    "--on-inconclusive",
    type=click.Choice(["exit-3", "fail", "pass"]),
    default="exit-3",
    show_default=True,
    help="What an undecided check does when the budget is spent: exit 3, exit 1, or exit 0.",
)
@click.option(
    "--allow-cross-machine",
    is_flag=True,
    help="Compare against a stored baseline measured on another machine or setup (unreliable).",
)
@click.option("--allow-fallback", is_flag=True, help="If the target cannot run here, measure on the CPU.")
@click.option(
    "--graph-opt",
    type=click.Choice(["disable", "basic", "extended", "all"]),
    default="all",
    show_default=True,
    help="ONNX Runtime graph optimization level.",
)
@click.option(
    "--seed", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Seed of generated inputs and the bootstrap."
)
@click.option(
    "--summary",
    "summary_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a Markdown report here. Without it, the report is appended to $GITHUB_STEP_SUMMARY when that is set.",
)
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a JUnit XML report (one test case per check).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the full result (every look of the sequential test) as JSON.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@input_shape_option
@data_options
@click.pass_context
def command(
    ctx,
    baseline,
    candidate,
    max_slowdown,
    accuracy_drops,
    max_size_growth,
    eval_model,
    eval_data,
    metrics,
    eval_output,
    target,
    threads,
    batch,
    seq_len,
    prompt_len,
    new_tokens,
    data,
    clock,
    budget,
    confidence,
    looks,
    on_inconclusive,
    allow_cross_machine,
    allow_fallback,
    graph_opt,
    seed,
    summary_path,
    junit_path,
    json_path,
    no_progress,
    input_shapes,
    declared,
):
    """Gate a CANDIDATE model against a BASELINE: exit 0 pass, 1 regression, 2 usage or input error,
    3 inconclusive (with the default --on-inconclusive exit-3).

    Latency: both models run interleaved on this machine and the decision comes from the confidence
    interval of the latency ratio candidate / baseline: pass when its upper bound is within
    1 + max-slowdown, fail when its lower bound is above it, and otherwise keep sampling, up to the
    budget. Looks are planned in advance and Bonferroni-corrected, so stopping at the first decisive
    look keeps the error rates at (1 - confidence) / 2 each.

    With a stored baseline (.json) only the candidate is measured, against stored samples; the file
    records the machine (CPU model and flags, cores, onnxruntime version, threads) and the gate
    refuses another machine's numbers unless --allow-cross-machine.

    Two exported LM folders (dlopt export --task text-generation, quantized or not) are gated on
    decode tokens/s (decode time per token, interleaved greedy generation, the same sequential test)
    and, with --max-accuracy-drop perplexity=X and evaluation text (--eval-data TEXT.txt or --eval
    smollm2), on perplexity: the candidate's over the baseline's, minus 1.

    \b
    Examples:
      dlopt gate --baseline main.onnx --candidate pr.onnx
      dlopt gate --baseline fp32.onnx --candidate int8.onnx --max-slowdown 0% \\
                 --eval minilm --max-accuracy-drop 0.01 --junit gate.xml
      dlopt bench main.onnx --save-baseline base.json
      dlopt gate --baseline base.json --candidate pr.onnx --max-size-growth 10%
      dlopt gate --baseline lm/ --candidate lm4/ --max-slowdown 0% --eval-data text.txt \\
                 --max-accuracy-drop perplexity=0.03
    """
    from dlopt.api import EvalSpec, GateConfig, format_gate, gate, parse_duration
    from dlopt.errors import InputError

    names = tuple(m.strip() for part in metrics for m in part.split(",") if m.strip())
    data, eval_data = declared.specs(data, eval_data)
    if names and eval_data is None:
        raise InputError("--metric applies to --eval-data", "pass --eval-data DATA.npz, or drop --metric")
    max_accuracy_drop, metric_drops = parse_accuracy_drops(accuracy_drops)
    evaluator = None
    if eval_model is not None or eval_data is not None:
        if not accuracy_drops:
            raise InputError(
                "--eval/--eval-data given without --max-accuracy-drop",
                "say how much drop is allowed, e.g. --max-accuracy-drop 0.01",
            )
        evaluator = EvalSpec(
            reference_model=eval_model, data=eval_data, metrics=names or ("top1",), output=eval_output, target=target
        )
    config = GateConfig(
        max_slowdown=parse_fraction(max_slowdown, "--max-slowdown"),
        max_accuracy_drop=max_accuracy_drop,
        metric_drops=metric_drops,
        max_size_growth=parse_fraction(max_size_growth, "--max-size-growth"),
        budget_s=parse_duration(budget),
        confidence=confidence,
        looks=looks,
        on_inconclusive=on_inconclusive,
        target=target,
        threads=threads,
        clock=clock,
        batch=batch,
        seq_len=seq_len,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        input_shapes=input_shapes,
        seed=seed,
        graph_opt_level=graph_opt,
        allow_cross_machine=allow_cross_machine,
        allow_fallback=allow_fallback,
    )
    with progress_bar(enabled=not no_progress) as progress:
        gated = gate(
            baseline,
            candidate,
            config,
            evaluator=evaluator,
            data=data,
            summary=summary_path,
            junit=junit_path,
            json_path=json_path,
            github_summary=os.environ.get("GITHUB_STEP_SUMMARY") or None,
            progress=progress,
        )
    click.echo(format_gate(gated.result))
    for path in gated.written:
        echo_err(f"wrote {path}")
    ctx.exit(gated.result.exit_code)
