"""dlopt models: the reference models that ship with dlopt, and their FP32 metrics on real data."""

from __future__ import annotations

import click

from dlopt.cli._common import echo_err


@click.command("models", short_help="List the reference models (size, inputs, metrics, installed or not).")
@click.argument("names", nargs=-1)
@click.option(
    "--evaluate",
    "run_evaluation",
    is_flag=True,
    help="Build each named model in torch (FP32) and run its evaluator on its real data.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(names, run_evaluation, as_json):
    """List the reference models, or only NAMES.

    \b
    dlopt models                          name, parameters, FP32 size, inputs, metrics, installed
    dlopt models fashion-cnn --evaluate   also its FP32 metrics (builds the model: seconds to a minute)

    A model whose packages are missing is listed with the pip (or apt) names to install.
    """
    import json

    from dlopt.api import models
    from dlopt.cli.results import models_text

    entries = models(names, evaluate=run_evaluation, log=echo_err)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    click.echo(models_text(entries))
    if any(not e.summary["installed"] for e in entries):
        echo_err(
            "hint: pip install 'dlopt[models]' (torch==2.13.0 first, for the CPU build); "
            "apt-get install dataset-fashion-mnist for fashion-cnn's data"
        )
