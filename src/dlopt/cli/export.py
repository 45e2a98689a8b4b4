"""dlopt export: PyTorch -> ONNX, verified against torch."""

from __future__ import annotations

import click

from dlopt.cli._common import COUNT, TOLERANCE, echo_err


@click.command("export", short_help="Export a PyTorch model to ONNX, verified output-for-output against torch.")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the .onnx model.")
@click.option("--opset", type=COUNT, default=None, help="ONNX opset (default 18).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default=None,
              help="torch.onnx exporter (default: the model's preferred one, e.g. torchscript for minilm so that "
              "ONNX Runtime can fuse its attention; else dynamo); the other one is tried, announced, if it fails "
              "(unless --no-fallback).")
@click.option("--no-fallback", is_flag=True, help="Fail instead of trying the other exporter.")
@click.option("--static-shapes", is_flag=True, help="Fix every axis to the example's shape (default: dynamic batch, "
              "plus the sequence axis of token inputs).")
@click.option("--atol", type=TOLERANCE, default=None, help="Absolute tolerance of the check (default: the model's, 1e-4).")
@click.option("--rtol", type=TOLERANCE, default=None, help="Relative tolerance of the check (default: the model's, 1e-3).")
@click.option("--allow-mismatch", is_flag=True, help="Write the model even when its outputs differ from torch's.")
def command(source, output, opset, exporter, no_fallback, static_shapes, atol, rtol, allow_mismatch):
    """Export SOURCE to ONNX and prove it equal to its source.

    SOURCE is a reference model (see `dlopt models`), a factory in a file (path/to/file.py:build) or in
    a module (package.module:build). A factory takes no arguments and returns (module, example_inputs)
    or (module, example_inputs, options); see the README for the contract.

    The model is checked with onnx.checker and shape inference, then ONNX Runtime's outputs are compared
    with torch's on the example and on inputs of other batch sizes and sequence lengths. On a mismatch
    nothing is written and the exit code is 1. A JSON report is written beside the model.
    """
    from dlopt.api import DEFAULT_OPSET, ExportConfig, export_model

    config = ExportConfig(opset=opset or DEFAULT_OPSET, exporter=exporter, fallback=not no_fallback,
                          dynamic_shapes=not static_shapes, atol=atol, rtol=rtol, allow_mismatch=allow_mismatch)
    written = export_model(source, output, config, log=echo_err)
    report = written.report
    verdict = "verified" if report["verification"]["passed"] else "MISMATCH (written because of --allow-mismatch)"
    shapes = ", ".join(f"{i['name']}{i['shape']}" for i in report["inputs"])
    click.echo(f"wrote {written.model_path} ({written.report['bytes'] / 1e6:.1f} MB, {report['exporter']} exporter, "
               f"opset {report['opset']}, inputs {shapes}): {verdict}")
    click.echo(f"report: {written.report_path}")
