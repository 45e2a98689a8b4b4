"""dlopt export: PyTorch -> ONNX, verified against torch."""

from __future__ import annotations

import click

from dlopt.cli._common import COUNT, TOLERANCE, echo_err


@click.command("export", short_help="Export a PyTorch model to ONNX, verified output-for-output against torch.")
@click.argument("source")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Where to write the .onnx model (with --task text-generation: a new folder).",
)
@click.option(
    "--task",
    type=click.Choice(["text-generation"]),
    default=None,
    help="text-generation: SOURCE is a Hugging Face causal-LM folder (Llama, Qwen, Phi ...) or smollm2; "
    "writes a folder onnxruntime-genai runs: an ONNX decoder with a KV cache (GroupQueryAttention, "
    "fused norms and QKV), tokenizer, genai_config.json, verified against transformers over the "
    "prefill and 8 decode steps.",
)
@click.option("--opset", type=COUNT, default=None, help="ONNX opset (default 18).")
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default=None,
    help="torch.onnx exporter (default: the model's preferred one, e.g. torchscript for minilm so that "
    "ONNX Runtime can fuse its attention; else dynamo); the other one is tried, announced, if it fails "
    "(unless --no-fallback).",
)
@click.option("--no-fallback", is_flag=True, help="Fail instead of trying the other exporter.")
@click.option(
    "--static-shapes",
    is_flag=True,
    help="Fix every axis to the example's shape (default: dynamic batch, plus the sequence axis of token inputs).",
)
@click.option(
    "--atol", type=TOLERANCE, default=None, help="Absolute tolerance of the check (default: the model's, 1e-4)."
)
@click.option(
    "--rtol", type=TOLERANCE, default=None, help="Relative tolerance of the check (default: the model's, 1e-3)."
)
@click.option("--allow-mismatch", is_flag=True, help="Write the model even when its outputs differ from torch's.")
def command(source, output, task, opset, exporter, no_fallback, static_shapes, atol, rtol, allow_mismatch):
    """Export SOURCE to ONNX and prove it equal to its source.

    SOURCE is a reference model (see `dlopt models`), a factory in a file (path/to/file.py:build) or in
    a module (package.module:build). A factory takes no arguments and returns (module, example_inputs)
    or (module, example_inputs, options); see docs/export.md for the contract.

    The model is checked with onnx.checker and shape inference, then ONNX Runtime's outputs are compared
    with torch's on the example and on inputs of other batch sizes and sequence lengths. On a mismatch
    nothing is written and the exit code is 1. A JSON report is written beside the model.

    With --task text-generation, SOURCE is a decoder LM (a Hugging Face folder with its tokenizer, or
    smollm2) and -o a new folder; logits and greedy tokens are compared with transformers at the prefill
    and each of 8 decode steps with the KV cache (fp32: max |diff| <= 1e-3 + 1e-3 * max |logit|).

    \b
    Examples:
      dlopt export minilm -o minilm.onnx
      dlopt export smollm2 --task text-generation -o lm/
      dlopt export path/to/hf_folder --task text-generation -o lm/
    """
    from pathlib import Path

    if task is None and (Path(source) / "config.json").is_file():
        from dlopt.api import InputError

        raise InputError(
            f"{source} is a Hugging Face model folder, not a factory",
            "a causal LM exports for generation with --task text-generation -o FOLDER",
        )
    if task == "text-generation":
        _export_lm(
            source,
            output,
            opset=opset,
            exporter=exporter,
            no_fallback=no_fallback,
            static_shapes=static_shapes,
            atol=atol,
            rtol=rtol,
            allow_mismatch=allow_mismatch,
        )
        return
    from dlopt.api import DEFAULT_OPSET, Export, export_model

    config = Export(
        opset=opset or DEFAULT_OPSET,
        exporter=exporter,
        fallback=not no_fallback,
        dynamic_shapes=not static_shapes,
        atol=atol,
        rtol=rtol,
        allow_mismatch=allow_mismatch,
    )
    written = export_model(source, output, config, log=echo_err)
    report = written.report
    verdict = "verified" if report["verification"]["passed"] else "MISMATCH (written because of --allow-mismatch)"
    shapes = ", ".join(f"{i['name']}{i['shape']}" for i in report["inputs"])
    click.echo(
        f"wrote {written.model_path} ({written.report['bytes'] / 1e6:.1f} MB, {report['exporter']} exporter, "
        f"opset {report['opset']}, inputs {shapes}): {verdict}"
    )
    click.echo(f"report: {written.report_path}")


def _export_lm(source, output, **graph_options):
    from dlopt.api import ExportLm, InputError, export_lm

    given = [name for name, value in graph_options.items() if value not in (None, False)]
    ignored = [name for name in given if name not in ("atol", "rtol")]
    if ignored:
        raise InputError(
            f"--task text-generation does not take --{ignored[0].replace('_', '-')}",
            "drop it: the decoder is built by onnxruntime-genai's model builder",
        )
    defaults = ExportLm()
    config = ExportLm(
        atol=graph_options["atol"] if graph_options["atol"] is not None else defaults.atol,
        rtol=graph_options["rtol"] if graph_options["rtol"] is not None else defaults.rtol,
    )
    written = export_lm(source, output, config, log=echo_err)
    report = written.report
    v = report["verification"]
    worst = max(s["max_abs_diff"] for s in v["steps"])
    fused = ", ".join(f"{op} x{n}" for op, n in report["graph"]["fused"].items() if n)
    click.echo(
        f"wrote {written.folder}/ ({report['bytes'] / 1e6:.1f} MB, {report['architecture']}, {report['exporter']}; "
        f"{fused}; KV cache {report['graph']['kv_cache']['tensors']} tensors): verified against transformers, "
        f"prefill + {v['decode_steps']} decode steps, max |logit diff| {worst:.2g}, greedy tokens equal"
    )
