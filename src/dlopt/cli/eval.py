"""dlopt eval: accuracy metrics of a model on data or with a reference model's real evaluator."""

from __future__ import annotations

import click

from dlopt.cli._common import COUNT, DATA_SOURCES_HELP, NON_NEGATIVE_INT, data_options, echo_err


@click.command("eval", short_help="Accuracy of a model (top1, cosine, SQNR, MSE, or a reference model's task metrics).")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option(
    "--data",
    default=None,
    help=f"The inputs: {DATA_SOURCES_HELP}. An .npz may also hold `labels` (class indices) and the "
    "expected output (named like the output, or `expected`).",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="top1, cosine, sqnr, mse, or a task metric vs --reference (docs/metrics.md): auto (chosen from "
    "the outputs), detection, map, sequence, topk, embedding, perplexity, probability; repeat or comma-separate. "
    "[default: top1]",
)
@click.option(
    "--evaluator",
    default=None,
    help="Your metric vs --reference: FILE.py:FUNCTION(reference_outputs, outputs) -> float or {name: value} "
    "(dicts of output name -> array over all samples).",
)
@click.option(
    "--reference",
    type=click.Path(dir_okay=True),
    default=None,
    help="A reference .onnx (e.g. the FP32 source) run on the same inputs; metrics are shown beside its own.",
)
@click.option(
    "--model",
    "reference_model",
    default=None,
    help="Use this reference model's real evaluator and data instead of --data (e.g. minilm).",
)
@click.option("--output", default=None, help="Which model output the metrics read (default: the first).")
@click.option("--target", default="cpu", show_default=True, help="Execution target: cpu or cuda.")
@click.option("--threads", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Intra-op threads (0: all cores).")
@click.option("--batch-size", type=COUNT, default=32, show_default=True, help="Samples per run over --data.")
@click.option("--allow-fallback", is_flag=True, help="Run on the CPU if the target is not available here.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON."
)
@data_options
def command(
    model,
    data,
    metrics,
    evaluator,
    reference,
    reference_model,
    output,
    target,
    threads,
    batch_size,
    allow_fallback,
    json_path,
    declared,
):
    """Evaluate MODEL (.onnx) and print its metrics beside the reference's.

    \b
    On data:        dlopt eval int8.onnx --data val.npz --metric top1,sqnr --reference fp32.onnx
    Real evaluator: dlopt eval int8.onnx --model minilm --reference fp32.onnx

    \b
    top1     fraction of argmax equal to `labels` (and, with a reference, top1_agreement: argmax
             equal to the reference's)
    cosine   mean per-sample cosine similarity to the reference output
    sqnr     20*log10(|ref| / |ref - out|) in dB over the whole output
    mse      mean squared error to the reference output
    auto, detection, map, sequence, topk, embedding, perplexity
             task agreement with the reference model's outputs (dlopt.metrics; FP32 = 1.0)
    """
    from dlopt.api import EvalConfig, evaluate, format_eval, is_lm_folder, validate_metrics
    from dlopt.errors import InputError

    if is_lm_folder(model):  # an exported LM folder: --data is UTF-8 text, the LM row (perplexity, agreement)
        names = tuple(m.strip() for part in metrics for m in part.split(",") if m.strip())
        result = evaluate(
            model,
            data=data,
            reference=reference,
            json_path=json_path,
            config=EvalConfig(metrics=names or ("perplexity",), threads=threads, evaluator=evaluator),
        )
        click.echo(format_eval(result))
        if json_path:
            echo_err(f"wrote {json_path}")
        return
    # the flags' own rules, in the flags' words (the library checks the same in keyword arguments)
    (data,) = declared.specs(data)
    if (data is None) == (reference_model is None):
        raise InputError(
            "give either --data FILE.npz or --model NAME",
            "--data evaluates on your arrays; --model uses a reference model's evaluator",
        )
    names = tuple(m.strip() for part in metrics for m in part.split(",") if m.strip())
    if reference_model and (names or evaluator):
        raise InputError(
            f"--{'metric' if names else 'evaluator'} applies to --data",
            f"--model {reference_model} reports its own task metrics",
        )
    if evaluator and not reference:
        raise InputError(
            "--evaluator compares with a reference model's outputs, and there is none", "pass --reference FP32.onnx"
        )
    chosen = validate_metrics(names) if names else (() if evaluator else ("top1",))
    config = EvalConfig(
        metrics=chosen if data else ("top1",),
        target=target,
        threads=threads,
        batch_size=batch_size,
        output=output,
        allow_fallback=allow_fallback,
        evaluator=evaluator,
    )
    if threads < 0:
        raise InputError(f"--threads must be 0 or more, got {threads}", "0 uses all cores")
    if reference_model:
        echo_err(f"evaluating {model} with the {reference_model} evaluator")
    result = evaluate(
        model, data=data, reference_model=reference_model, reference=reference, config=config, json_path=json_path
    )
    click.echo(format_eval(result))
    for warning in result.warnings:
        echo_err(f"warning: {warning}")
    if json_path:
        echo_err(f"wrote {json_path}")
