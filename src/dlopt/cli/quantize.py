"""dlopt quantize: INT8 (dynamic/static), INT4 weight-only, FP16."""

from __future__ import annotations

import click

from dlopt.cli._common import (
    ANY_NUMBER,
    COUNT,
    DATA_SOURCES_HELP,
    FRACTION,
    PERCENTILE,
    TOLERANCE,
    data_options,
    echo_err,
    input_shape_option,
)
from dlopt.console import heartbeat


def _names(values: tuple[str, ...]) -> tuple[str, ...]:
    """--exclude-nodes a,b --exclude-nodes c -> (a, b, c)."""
    return tuple(n.strip() for v in values for n in v.split(",") if n.strip())


@click.command("quantize", short_help="Quantize an ONNX model to INT8, INT4 or FP16, with a fidelity report.")
@click.argument("model", type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Where to write the model (for an exported LM folder: a new folder).",
)
@click.option("--precision", default="int8", show_default=True, help="int8 | int4 | fp16.")
@click.option(
    "--mode",
    default="auto",
    show_default=True,
    help="int8: auto (recipe from the model, target and CPU; printed) | dynamic | static | weight-only "
    "(int8 weights, float compute: for size, needs no data).",
)
@click.option("--calibration", default=None, help=f"Calibration data: {DATA_SOURCES_HELP}.")
@click.option("--calibration-samples", type=COUNT, default=None, help="Read at most N samples.")
@click.option(
    "--eval-data",
    default=None,
    help="Held-out samples to measure fidelity on (same formats as --calibration). Default: the last "
    "samples of --calibration beyond its first 8 (at least 20 % and 4, at most half and --eval-samples) are "
    "held out and not calibrated on.",
)
@click.option(
    "--eval-samples",
    type=COUNT,
    default=32,
    show_default=True,
    help="Judge fidelity on at most N held-out samples (of --eval-data, or held out of --calibration). More "
    "samples narrow the verdict's bound; each costs one run of the float and the quantized model.",
)
@click.option(
    "--holdout",
    type=FRACTION,
    default=0.2,
    show_default=True,
    help="Least share of the --calibration samples held out for the fidelity check (without --eval-data).",
)
@click.option(
    "--verdict-confidence",
    type=FRACTION,
    default=0.95,
    show_default=True,
    help="The task metric's one-sided bound at this confidence, from a bootstrap over the held-out samples: "
    "reported beside a model's estimate (not confirmed where it is below the floor), and what decides for a "
    "model floor recovery chose among candidates compared on the same samples (Bonferroni over them). "
    "0: estimates only.",
)
@click.option(
    "--strict-verdict",
    is_flag=True,
    help="The bound decides for every model, not only for one recovery chose: refuse a model unless its "
    "bound clears the floor (needs more samples: with 32, one top-1 miss fails a 0.95 floor).",
)
@click.option(
    "--min-sqnr",
    "min_sqnr_db",
    type=ANY_NUMBER,
    default=None,
    metavar="DB",
    help="SQNR floor of every float output and channel group on the held-out samples, checked beside the "
    "task metric when given (the verdict when the metric is sqnr; default: int8 15, int4 10, fp16 30 "
    "dB). Below it int8 keeps the noisiest nodes in float until it "
    "holds; a result still below it is kept as OUT.failed.onnx and dlopt exits 1.",
)
@click.option("--no-recover", is_flag=True, help="Below the floor, fail at once instead of keeping nodes in float.")
@click.option("--method", default=None, help="Static calibration: minmax | entropy | percentile (default: recipe's).")
@click.option(
    "--percentile",
    type=PERCENTILE,
    default=None,
    help="For --method percentile (default: 99.99 for CNNs, 99.999 otherwise).",
)
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales.")
@click.option(
    "--block-size",
    type=COUNT,
    default=None,
    help="int4 block size [default: 32; an LM folder: chosen by calibration perplexity from 32, 64, 128].",
)
@click.option(
    "--max-size",
    "max_size_mb",
    type=ANY_NUMBER,
    default=None,
    metavar="MB",
    help="LM folder, int4: the weights' size budget in MB (1e6 bytes); the MatMuls whose 4-bit weights "
    "raise calibration perplexity most go to 8-bit while the model fits (listed in the report).",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="LM folder, int4: MatMulNBits compute type, 4 = int8 activations (the fast CPU path, default), 0 = float.",
)
@click.option("--exclude-nodes", multiple=True, help="Node names to keep in float (comma-separated or repeated).")
@click.option("--exclude-ops", multiple=True, help="Op types to keep in float, e.g. Attention,Gather.")
@click.option("--target", default="cpu", show_default=True, help="cpu | cuda | arm64 | mobile.")
@click.option("--no-preprocess", is_flag=True, help="Skip fusions, constant folding and shape inference.")
@click.option(
    "--max-accuracy-drop",
    type=TOLERANCE,
    default=None,
    help="Keep the most sensitive nodes in float until the task metric drops by at most this much "
    "(in the metric's unit: agreement metrics are fractions of FP32's answers, FP32 = 1.0); exit 1 "
    "if no candidate meets it (the best is still written).",
)
@click.option(
    "--metric",
    default=None,
    help="The task metric the verdict, recovery and budget are on (docs/metrics.md): detection | map | "
    "sequence | top1 | topk | cosine | embedding | perplexity | probability | sqnr. Default: chosen from the "
    "model's outputs (the report says which and why).",
)
@click.option(
    "--metric-floor",
    type=ANY_NUMBER,
    default=None,
    help="The metric's floor (default: the metric table's, e.g. detection Jaccard 0.9, map 0.99).",
)
@click.option(
    "--score-threshold",
    type=FRACTION,
    default=None,
    help="The score your post-processing keeps detections above (detection metric; e.g. 0.5), or binarizes a "
    "probability map at (map metric), so the verdict judges what you use. Default: 0.25 for detection, 0.3 "
    "for maps.",
)
@click.option(
    "--evaluator",
    default=None,
    help="Your metric: FILE.py:FUNCTION, called as FUNCTION(reference_outputs, outputs) (dicts of output "
    "name -> array) returning a float (higher is better) or {name: value}; or model:NAME[:metric] "
    "(a reference model's real metric, for the budget).",
)
@click.option(
    "--smoothquant",
    "smoothing",
    type=FRACTION,
    default=None,
    metavar="ALPHA",
    help="int8 transformers: SmoothQuant with this alpha (e.g. 0.75) from the calibration data. "
    "Off by default: on MiniLM it did not beat plain dynamic INT8 on the real metrics.",
)
@click.option(
    "--weight-rounding",
    default="auto",
    show_default=True,
    help="Static int8 Conv/Gemm weights: auto (GPTQ with calibration data) | gptq | nearest (ORT's).",
)
@click.option(
    "--bias-correction/--no-bias-correction",
    default=True,
    show_default=True,
    help="Static int8: fold each Conv/Gemm's mean weight-rounding shift into its bias.",
)
@click.option(
    "--layernorm",
    "layernorm_form",
    default="auto",
    show_default=True,
    help="Target cpu: auto (time ORT's fused SkipLayerNormalization against Sum + LayerNormalization "
    "here, or take the decision cached for this CPU, and write the faster form) | fused | unfused | "
    "FILE.quantize.json (replay that report's decision, no timing).",
)
@click.option(
    "--node-forms",
    "node_forms",
    default="auto",
    show_default=True,
    help="Target cpu, static int8: auto (time each node class, e.g. depthwise or 1-3-channel convs, in "
    "INT8 and float here, on thread CPU time, and keep float only where it is faster by a margin with "
    "a CI above 1x, if the whole model gains; each decision is cached per CPU model and node "
    "signature, listed by `dlopt cache ls`) | int8 | FILE.quantize.json (replay that report's "
    "decisions on this machine, no timing).",
)
@click.option(
    "--no-fuse-activations",
    is_flag=True,
    help="int8: leave decomposed hard-swish, SiLU and GELU as they are (by default each is fused into "
    "one op before calibration, checked against the unfused graph on the data).",
)
@click.option(
    "--trim-padding",
    "trim_padding",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "on", "off"]),
    help="Models with an attention mask: slice the token inputs to the batch's longest real length and pad "
    "per-token outputs back with zeros (same interface). auto: only where held-out inputs, padded, "
    "give the untrimmed model's outputs (cosine >= 0.999), else says why not.",
)
@input_shape_option
@data_options
def command(
    model,
    output,
    precision,
    mode,
    calibration,
    calibration_samples,
    eval_data,
    eval_samples,
    holdout,
    verdict_confidence,
    strict_verdict,
    min_sqnr_db,
    no_recover,
    method,
    percentile,
    per_channel,
    block_size,
    max_size_mb,
    accuracy_level,
    exclude_nodes,
    exclude_ops,
    target,
    no_preprocess,
    max_accuracy_drop,
    metric,
    metric_floor,
    score_threshold,
    evaluator,
    smoothing,
    weight_rounding,
    bias_correction,
    layernorm_form,
    node_forms,
    no_fuse_activations,
    trim_padding,
    input_shapes,
    declared,
):
    """Quantize MODEL.onnx and write OUT.onnx plus OUT.quantize.json beside it
    (schema: dlopt/schemas/quantize.schema.json).

    Prints the recipe and why it was chosen, the size before and after, the quantized nodes by op
    type and the fidelity against the float model on samples held out from calibration. The input
    model is never modified; the output is written atomically, and only when every float output meets
    the fidelity floor (and --max-accuracy-drop, if given): otherwise the best effort is kept as
    OUT.failed.onnx, a table says what failed and why, and the exit code is 1.
    """
    from dlopt.api import QuantizeConfig, is_lm_folder, quantize_failure, quantize_model, quantize_text
    from dlopt.errors import InputError

    if is_lm_folder(model):
        _quantize_lm_folder(model, output, precision, calibration, block_size, max_size_mb, accuracy_level)
        return
    for name, value in (("--max-size", max_size_mb), ("--accuracy-level", accuracy_level)):
        if value is not None:
            raise InputError(
                f"{name} applies to exported LM folders, and {model} is not one",
                "export one with: dlopt export SOURCE --task text-generation -o FOLDER",
            )
    block_size = block_size or 32
    config = QuantizeConfig(
        precision=precision,
        mode=mode,
        method=method,
        per_channel=per_channel,
        block_size=block_size,
        exclude_nodes=_names(exclude_nodes),
        exclude_ops=_names(exclude_ops),
        target=target,
        preprocess=not no_preprocess,
        calibration_samples=calibration_samples,
        percentile=percentile,
        max_accuracy_drop=max_accuracy_drop,
        evaluator=evaluator,
        metric=metric,
        metric_floor=metric_floor,
        score_threshold=score_threshold,
        smoothing=smoothing,
        weight_rounding=weight_rounding,
        bias_correction=bias_correction,
        layernorm_form=layernorm_form,
        node_forms=node_forms,
        trim_padding=trim_padding,
        fuse_activations=not no_fuse_activations,
        input_shapes=input_shapes,
        min_sqnr_db=min_sqnr_db,
        holdout=holdout,
        fidelity_samples=eval_samples,
        verdict_confidence=verdict_confidence,
        strict_verdict=strict_verdict,
        recover=not no_recover,
    )
    calibration, eval_data = declared.specs(calibration, eval_data)
    with heartbeat("quantize", echo_err) as log:
        outcome = quantize_model(model, output, config, calibration, eval_data=eval_data, progress=True, log=log)
    click.echo(quantize_text(outcome.report))
    click.echo(
        f"{'wrote' if outcome.passed else 'kept the best effort (FAILED) as'} {outcome.model_path} "
        f"({outcome.report['bytes_written'] / 1e6:.2f} MB)"
    )
    click.echo(f"report: {outcome.report_path}")
    if not outcome.passed:
        raise quantize_failure(outcome)


def _quantize_lm_folder(model, output, precision, calibration, block_size, max_size_mb, accuracy_level) -> None:
    """An exported LM folder (genai_config.json): 4-bit GPTQ, mixed 4/8-bit under --max-size (dlopt.api.quantize_lm)."""
    from dlopt.api import lm_quantize_config, quantize_lm, quantize_lm_text
    from dlopt.errors import InputError

    if precision != "int4":
        raise InputError(
            f"an exported LM folder is quantized to int4, not {precision}",
            "pass --precision int4 (with --max-size MB for mixed 4/8-bit)",
        )
    config = lm_quantize_config(
        block_size=block_size, max_size_mb=max_size_mb, accuracy_level=4 if accuracy_level is None else accuracy_level
    )
    report = quantize_lm(model, output, config, calibration, log=echo_err)
    click.echo(quantize_lm_text(report))
    click.echo(f"wrote {output}/ ({report['bytes_after'] / 1e6:.1f} MB); report: {output}/quantize.json")
