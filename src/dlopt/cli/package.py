"""dlopt package: an ONNX model -> a verified bundle for a target (mobile: ORT format)."""

from __future__ import annotations

import click

from dlopt.cli._common import (
    ANY_NUMBER,
    COUNT,
    DATA_SOURCES_HELP,
    TOLERANCE,
    data_options,
    echo_err,
    input_shape_option,
)


@click.command("package", short_help="Bundle a model for a target (mobile: ORT format), verified, with a manifest.")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--target", type=click.Choice(["mobile", "cpu", "cuda"]), default="mobile", show_default=True)
@click.option(
    "--intended-ep",
    type=click.Choice(["cpu", "xnnpack", "nnapi", "coreml"]),
    default=None,
    help="mobile: the EP the app will use; picks the ORT optimization style (Fixed for cpu/xnnpack, "
    "Runtime for nnapi/coreml). Default cpu.",
)
@click.option(
    "--fix-shape",
    "fix_shapes",
    multiple=True,
    metavar="NAME=DIMS",
    help="Make an input's shape static, e.g. --fix-shape input_ids=1x128 (repeatable).",
)
@click.option(
    "--type-reduction", is_flag=True, help="List kernel types in the operators config (smaller minimal build)."
)
@click.option("--no-coverage", is_flag=True, help="Skip the NNAPI/CoreML coverage report.")
@click.option(
    "--data", default=None, help=f"Sample inputs instead of generated ones, run as one batch: {DATA_SOURCES_HELP}."
)
@click.option("--samples", type=COUNT, default=2, show_default=True, help="Generated verification samples.")
@click.option(
    "--seq-len", type=COUNT, default=16, show_default=True, help="Size of dynamic non-batch, non-image axes in samples."
)
@click.option("--atol", type=TOLERANCE, default=1e-4, show_default=True, help="Packaged vs source model, absolute.")
@click.option("--rtol", type=TOLERANCE, default=1e-3, show_default=True, help="Packaged vs source model, relative.")
@click.option(
    "--measure",
    "measure_s",
    type=TOLERANCE,
    default=2.0,
    show_default=True,
    help="Seconds of latency measurement per target (0: none).",
)
@click.option("--threads", type=COUNT, default=None, help="Threads for the latency (default: phone-like for mobile).")
@click.option(
    "--torch-source",
    default=None,
    metavar="SOURCE",
    help="Torch model of MODEL (reference name or path/file.py:build): also lower it to ExecuTorch "
    ".pte programs for XNNPACK (needs dlopt[mobile]). An LM folder for mobile: the Hugging Face folder "
    "(default: the one its export.json names).",
)
@click.option(
    "--pte",
    "pte",
    default="fp32",
    show_default=True,
    help="Precisions of the .pte programs, comma-separated: fp32, int8 (static, calibrated: CNNs), "
    "int8-dynamic (linear layers, activations quantized per run: transformers); for an LM folder fp32 or "
    "8da4w (int4 weights in groups of 32, each on its min..max grid, int8 activations per run).",
)
@click.option(
    "--pte-int8-min-sqnr",
    type=ANY_NUMBER,
    default=15.0,
    show_default=True,
    help="Floor on the int8 .pte's SQNR (dB) against MODEL's outputs on the samples.",
)
@click.option(
    "--pte-weight-rounding",
    type=click.Choice(["gptq", "nearest"]),
    default="gptq",
    show_default=True,
    help="int8 .pte weights: GPTQ-rounded against each layer's inputs on the calibration data, or "
    "nearest (the stock XNNPACKQuantizer).",
)
@click.option(
    "--pte-no-bias-correction",
    is_flag=True,
    help="int8 .pte: do not fold each layer's mean weight-rounding shift into its bias.",
)
@click.option(
    "--calibration",
    default=None,
    help="Calibration data of MODEL (as --data takes it): hashed into the "
    "manifest with its data spec, and calibrates an int8 .pte.",
)
@click.option("--name", default=None, help="Model name in the manifest (default: the file's stem).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="KEY",
    help="Ed25519 private key (`dlopt keygen`): sign the manifest (manifest.sig).",
)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="LM folder: a sample prompt whose greedy output the manifest records and verify re-generates "
    "(repeatable; default: three built-in prompts).",
)
@click.option("--new-tokens", type=int, default=None, help="LM folder: greedy tokens per sample prompt. [default: 20]")
@click.option(
    "--reference",
    type=click.Path(file_okay=False),
    default=None,
    metavar="FOLDER",
    help="LM folder: the FP32 export it was made from; it generates for the same prompts, and the bundle "
    "records how many first tokens agree and its speed against it (interleaved). Default: the source its "
    "quantize.json names, where that folder is still there.",
)
@input_shape_option
@data_options
def command(
    model,
    output,
    target,
    intended_ep,
    fix_shapes,
    type_reduction,
    no_coverage,
    data,
    samples,
    seq_len,
    atol,
    rtol,
    measure_s,
    threads,
    torch_source,
    pte,
    pte_int8_min_sqnr,
    pte_weight_rounding,
    pte_no_bias_correction,
    calibration,
    name,
    overwrite,
    sign_key,
    prompts,
    new_tokens,
    reference,
    input_shapes,
    declared,
):
    """Package MODEL (.onnx) into a bundle folder for a target, verified before it is written.

    For --target mobile the bundle holds the ORT-format model with its reduced-operator config, an
    NNAPI/CoreML coverage report with advice, sample inputs with the source model's outputs, a model
    card and manifest.json (sha256 of every file, versions, configs, metrics with the machine they
    were measured on). The packaged model must match MODEL on the samples, else nothing is written
    (exit 1). Check a bundle later with `dlopt verify BUNDLE`.

    MODEL may be an exported LM folder (dlopt export --task text-generation, quantized or not): the
    bundle is that folder as onnxruntime-genai loads it (decoder, genai_config.json, tokenizer), with
    sample prompts and their greedy outputs in the manifest, a README with the Python that chats with
    it, and the generation speed.

    \b
    Examples:
      dlopt package model.onnx --target mobile -o bundle/
      dlopt package lm4/ --target cpu --reference lm/ -o lm4-cpu/ --sign-key dlopt-signing.key
    """
    from dlopt.api import PackageConfig, package_model
    from dlopt.cli.results import package_text

    data, calibration = declared.specs(data, calibration)

    config = PackageConfig(
        target=target,
        intended_ep=intended_ep,
        fix_shapes=tuple(fix_shapes),
        type_reduction=type_reduction,
        coverage=not no_coverage,
        samples=samples,
        seq_len=seq_len,
        atol=atol,
        rtol=rtol,
        measure_s=measure_s,
        threads=threads,
        torch_source=torch_source,
        pte_precisions=tuple(p.strip() for p in pte.split(",") if p.strip()),
        pte_int8_min_sqnr_db=pte_int8_min_sqnr,
        pte_weight_rounding=pte_weight_rounding,
        pte_bias_correction=not pte_no_bias_correction,
        calibration=calibration,
        name=name,
        overwrite=overwrite,
        input_shapes=input_shapes,
    )
    result = package_model(
        model,
        output,
        config,
        data=data,
        sign_key=sign_key,
        prompts=prompts,
        new_tokens=new_tokens,
        reference=reference,
        log=echo_err,
    )
    click.echo(package_text(result))
