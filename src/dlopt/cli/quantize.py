"""dlopt quantize: INT8 (dynamic/static), INT4 weight-only, FP16."""

from __future__ import annotations

import click

from dlopt.cli._common import echo_err, image_options, image_preprocess, input_shape_option


def _names(values: tuple[str, ...]) -> tuple[str, ...]:
    """--exclude-nodes a,b --exclude-nodes c -> (a, b, c)."""
    return tuple(n.strip() for v in values for n in v.split(",") if n.strip())


@click.command("quantize", short_help="Quantize an ONNX model to INT8, INT4 or FP16, with a fidelity report.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--precision", default="int8", show_default=True, help="int8 | int4 | fp16.")
@click.option("--mode", default="auto", show_default=True,
              help="int8: auto (recipe from the model, target and CPU; printed) | dynamic | static | weight-only "
                   "(int8 weights, float compute: for size, needs no data).")
@click.option("--calibration", default=None,
              help="Calibration data: an .npz (arrays named by input, first axis = samples), a folder of "
                   ".npz/.npy files or of images (.jpg/.png, see --image-*), or model:NAME (a reference "
                   "model's own set).")
@click.option("--calibration-samples", type=int, default=None, help="Read at most N samples.")
@click.option("--method", default=None, help="Static calibration: minmax | entropy | percentile (default: recipe's).")
@click.option("--percentile", type=float, default=None,
              help="For --method percentile (default: 99.99 for CNNs, 99.999 otherwise).")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales.")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 block size.")
@click.option("--exclude-nodes", multiple=True, help="Node names to keep in float (comma-separated or repeated).")
@click.option("--exclude-ops", multiple=True, help="Op types to keep in float, e.g. Attention,Gather.")
@click.option("--target", default="cpu", show_default=True, help="cpu | cuda | arm64 | mobile.")
@click.option("--no-preprocess", is_flag=True, help="Skip fusions, constant folding and shape inference.")
@click.option("--max-accuracy-drop", type=float, default=None,
              help="Keep the most sensitive nodes in float until the evaluator drops by at most this much "
                   "(in the metric's units); exit 1 if no candidate meets it (the best is still written).")
@click.option("--evaluator", default=None,
              help="For the budget: cosine | top1 | sqnr (vs FP32 on the calibration data) or "
                   "model:NAME[:metric] (a reference model's real metric). Default cosine.")
@click.option("--smoothquant", "smoothing", type=float, default=None, metavar="ALPHA",
              help="int8 transformers: SmoothQuant with this alpha (e.g. 0.75) from the calibration data. "
                   "Off by default: on MiniLM it did not beat plain dynamic INT8 on the real metrics.")
@click.option("--weight-rounding", default="auto", show_default=True,
              help="Static int8 Conv/Gemm weights: auto (GPTQ with calibration data) | gptq | nearest (ORT's).")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Static int8: fold each Conv/Gemm's mean weight-rounding shift into its bias.")
@click.option("--layernorm", "layernorm_form", default="auto", show_default=True,
              help="Target cpu: auto (time ORT's fused SkipLayerNormalization against Sum + LayerNormalization "
                   "here and write the faster form) | fused | unfused.")
@input_shape_option
@image_options
def command(model, output, precision, mode, calibration, calibration_samples, method, percentile, per_channel,
            block_size, exclude_nodes, exclude_ops, target, no_preprocess, max_accuracy_drop, evaluator, smoothing,
            weight_rounding, bias_correction, layernorm_form, input_shapes, image_size, image_layout, image_scale,
            image_mean, image_std, image_bgr):
    """Quantize MODEL.onnx and write OUT.onnx plus OUT.quantize.json beside it (schema: dlopt/schemas/quantize.schema.json).

    Prints the recipe and why it was chosen, the size before and after, the quantized nodes by op
    type and the fidelity against the float model. The input model is never modified; the output is
    written atomically.
    """
    from dlopt.optimize.quantize import QuantizeConfig, quantize_file, summary_text

    config = QuantizeConfig(precision=precision, mode=mode, method=method, per_channel=per_channel,
                            block_size=block_size, exclude_nodes=_names(exclude_nodes),
                            exclude_ops=_names(exclude_ops), target=target, preprocess=not no_preprocess,
                            calibration_samples=calibration_samples, percentile=percentile,
                            max_accuracy_drop=max_accuracy_drop, evaluator=evaluator, smoothing=smoothing,
                            weight_rounding=weight_rounding, bias_correction=bias_correction,
                            layernorm_form=layernorm_form, input_shapes=input_shapes,
                            image=image_preprocess(image_size, image_layout, image_scale, image_mean, image_std,
                                                   image_bgr))
    outcome = quantize_file(model, output, config, calibration, progress=True, log=echo_err)
    click.echo(summary_text(outcome.report))
    click.echo(f"wrote {outcome.model_path} ({outcome.report['bytes_written'] / 1e6:.2f} MB)")
    click.echo(f"report: {outcome.report_path}")
    if not outcome.budget_met:
        echo_err(f"error: no candidate met --max-accuracy-drop {max_accuracy_drop}; "
                 "the best one found was written")
        raise click.exceptions.Exit(1)
