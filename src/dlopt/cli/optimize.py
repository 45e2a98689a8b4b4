"""dlopt optimize: search candidate recipes, print the Pareto front, write the best as a verified bundle."""

from __future__ import annotations

import click

from dlopt.cli._common import COUNT, DATA_SOURCES_HELP, POSITIVE, TOLERANCE, cache_dir_option, data_options, echo_err
from dlopt.console import heartbeat


@click.command("optimize", short_help="Search quantization recipes; Pareto front, verified bundle, HTML report.")
@click.argument("model")
@click.option("--target", default="cpu", show_default=True, help="Where the model will run (cpu).")
@click.option(
    "--max-accuracy-drop",
    type=TOLERANCE,
    required=True,
    help="Accuracy budget: the largest drop of the evaluator's metric against the FP32 source, in the "
    "metric's own unit as in quantize and gate (docs/metrics.md: agreement metrics are fractions, so "
    "0.01 = one sample or box in a hundred; accuracy 0.005 = half a point). For an LM folder: the relative "
    "perplexity increase over the FP32 folder on --eval-data text (0.03 = +3 %).",
)
@click.option(
    "--time-budget",
    default="20m",
    show_default=True,
    help="Deadline for the whole search (e.g. 20m, 90s); what does not fit is reported as skipped.",
)
@click.option(
    "--max-latency",
    type=POSITIVE,
    default=None,
    metavar="MS",
    help="Latency limit (ms, wall clock, p90 of a batch call) for the batch/thread throughput search; "
    "also the most a chosen candidate may take at batch 1.",
)
@click.option(
    "--calibration",
    default=None,
    help=f".onnx models: calibration data: {DATA_SOURCES_HELP}. LM folders: UTF-8 text (GPTQ, 8-bit layer choice).",
)
@click.option(
    "--eval-data",
    default=None,
    help=".onnx models: held-out data candidates are scored on (as --calibration takes it, read with the "
    "same data options). LM folders: held-out UTF-8 text, perplexity is measured on (required).",
)
@click.option(
    "--evaluator",
    default=None,
    help="A metric of docs/metrics.md vs the FP32 outputs (auto, detection, map, sequence, top1, topk, "
    "cosine, embedding, perplexity, probability, sqnr), FILE.py:FUNCTION (your metric) or model:NAME[:metric] "
    "[default: a reference model's own metric, else auto: the task metric chosen from the outputs].",
)
@click.option(
    "--executor",
    "executor_kind",
    default="local",
    show_default=True,
    type=click.Choice(["local", "ray"]),
    help="Where transforms and scoring run.",
)
@click.option("--address", default=None, help="Ray cluster address (with --executor ray).")
@click.option("--workers", type=COUNT, default=None, help="Parallel workers [default: the machine's cores].")
@click.option("-o", "--output", required=True, type=click.Path(), help="The bundle folder to write.")
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a self-contained HTML report here.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at -o.")
@click.option(
    "--prune",
    "search_pruning",
    is_flag=True,
    help="Also search prune ratios (25 %, 50 %) with distillation (reference models with training "
    "data; minutes of training per ratio: ~100 s for fashion-cnn, over 10 min for minilm here).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON (schema dlopt/schemas/optimize.schema.json)."
)
@cache_dir_option
@data_options
def command(
    model,
    target,
    max_accuracy_drop,
    time_budget,
    max_latency,
    calibration,
    eval_data,
    evaluator,
    executor_kind,
    address,
    workers,
    output,
    report_path,
    overwrite,
    search_pruning,
    as_json,
    cache_dir,
    declared,
):
    """Search candidate recipes for MODEL (a reference model name, file.py:build, or an .onnx with
    --calibration/--eval-data) on TARGET: FP32, INT8 dynamic and static (minmax, entropy, percentile),
    kernel choices (node forms, LayerNorm form), INT4, FP16, and float-node exclusions for INT8
    candidates over budget. Each is scored on held-out data; those that can reach the front are timed
    interleaved against FP32 (one thread, thread CPU time, real inputs). Prints the Pareto front of
    latency x accuracy drop x size, writes the fastest candidate within the budget (ties: the smaller)
    as a verified bundle, and searches its batch size and thread count for throughput under
    --max-latency. Every stage output and evaluation is cached: a re-run redoes nothing.

    MODEL may be an exported LM folder (dlopt export --task text-generation) with --calibration TEXT and
    --eval-data HELD_OUT_TEXT: the search runs over int4 schemes (RTN, GPTQ) x block size (32, 64, 128) x
    4/8-bit mix, scores perplexity on the held-out text (--max-accuracy-drop: relative perplexity increase,
    0.03 = +3 %), times decode tokens/s interleaved with the FP32 folder (onnxruntime-genai, one thread)
    and bundles the fastest within the budget for onnxruntime-genai (docs/optimize.md).
    """
    from dlopt.api import OptimizeConfig, json_text, optimize_model, optimize_text, parse_duration

    calibration, eval_data = declared.specs(calibration, eval_data)

    config = OptimizeConfig(
        target=target,
        max_accuracy_drop=max_accuracy_drop,
        time_budget_s=parse_duration(time_budget),
        max_latency_ms=max_latency,
        evaluator=evaluator,
        calibration=calibration,
        eval_data=eval_data,
        overwrite=overwrite,
        search_pruning=search_pruning,
    )
    with heartbeat("optimize", echo_err) as log:
        outcome = optimize_model(
            model,
            output,
            config,
            executor=executor_kind,
            address=address,
            workers=workers,
            cache_dir=cache_dir,
            report_path=report_path,
            log=log,
        )
    if as_json:
        click.echo(json_text(outcome.result), nl=False)
        return
    click.echo(optimize_text(outcome.result))
