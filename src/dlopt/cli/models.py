"""dlopt models: the reference models that ship with dlopt, and their FP32 metrics on real data."""

from __future__ import annotations

import click

from dlopt.cli._common import echo_err


@click.command("models", short_help="List the reference models (size, inputs, metrics, installed or not).")
@click.argument("names", nargs=-1)
@click.option("--evaluate", "run_evaluation", is_flag=True,
              help="Build each named model in torch (FP32) and run its evaluator on its real data.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(names, run_evaluation, as_json):
    """List the reference models, or only NAMES.

    \b
    dlopt models                          name, parameters, FP32 size, inputs, metrics, installed
    dlopt models fashion-cnn --evaluate   also its FP32 metrics (builds the model: seconds to a minute)

    A model whose packages are missing is listed with the pip (or apt) names to install.
    """
    import json

    from dlopt.errors import InputError
    from dlopt.models import REFERENCE_MODELS, get_reference_model
    from dlopt.report import format_table

    if run_evaluation and not names:
        raise InputError("--evaluate needs model names", f"e.g. dlopt models fashion-cnn --evaluate "
                         f"(models: {', '.join(REFERENCE_MODELS)})")
    models = [get_reference_model(n) for n in names] if names else list(REFERENCE_MODELS.values())
    entries = []
    for ref in models:
        missing = ref.missing_requirements()
        entry = {"name": ref.name, "description": ref.description, "parameters_millions": ref.parameters_millions,
                 "fp32_megabytes": round(ref.parameters_millions * 4, 2), "inputs": ref.inputs,
                 "outputs": ref.outputs, "metrics": list(ref.metrics), "heavy": ref.heavy,
                 "installed": not missing, "missing": missing, "extra": ref.extra}
        if run_evaluation:
            entry["evaluation"] = _evaluate(ref)
        entries.append(entry)

    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    rows = [[e["name"], e["parameters_millions"], e["fp32_megabytes"], e["inputs"], ", ".join(e["metrics"]),
             "yes" if e["installed"] else "missing: " + ", ".join(e["missing"])] for e in entries]
    click.echo(format_table(["model", "params (M)", "fp32 MB", "inputs", "metrics", "installed"], rows))
    for e in entries:
        if "evaluation" in e:
            ev = e["evaluation"]
            click.echo(f"\n{e['name']} (torch FP32): built in {ev['build_seconds']:.1f} s, "
                       f"evaluated in {ev['evaluate_seconds']:.1f} s")
            click.echo(format_table(["metric", "value"], list(ev["metrics"].items())))
    if any(not e["installed"] for e in entries):
        echo_err("hint: pip install 'dlopt[models]' (torch==2.13.0 first, for the CPU build); "
                 "apt-get install dataset-fashion-mnist for fashion-cnn's data")


def _evaluate(ref) -> dict:
    import time

    from dlopt.models import torch_runner

    echo_err(f"building {ref.name} …")
    start = time.perf_counter()
    module, _ = ref.build()
    built = time.perf_counter() - start
    output_names = tuple(ref.export_options().get("output_names", ("output",)))
    echo_err(f"evaluating {ref.name} on its real data …")
    start = time.perf_counter()
    metrics = ref.evaluate(torch_runner(module, output_names))
    return {"metrics": metrics, "build_seconds": built, "evaluate_seconds": time.perf_counter() - start}
