"""dlopt run: a recipe's stages, each output cached by content."""

from __future__ import annotations

import click

from dlopt.cli._common import cache_dir_option, echo_err
from dlopt.console import heartbeat


@click.command("run", short_help="Run a recipe (source, data, target, stages) with a content-addressed stage cache.")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Where to write the result: an .onnx model, a bundle folder when the last stage is package (or "
    "package-lm), an LM folder when it is int4-lm.",
)
@click.option(
    "--force",
    default=None,
    metavar="STAGE",
    help="Redo this stage (its kind or 1-based index) and every stage after it, cached or not.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder at -o.")
@cache_dir_option
def command(recipe, output, force, overwrite, cache_dir):
    """Run RECIPE (TOML): a source model, its data, a target and an ordered list of [[stage]] tables
    (export, quantize, package) with their config keys. See recipes/ and docs/run.md.

    Each stage's output is cached under a key made of the sha256 of its input artifact, its config,
    its data and the host facts that change it (ISA class, onnxruntime and dlopt versions); a re-run
    takes cached stages from there. A final package stage records every stage in the manifest's lineage.
    """
    from dlopt.api import cache_root, run
    from dlopt.cli.results import run_text

    with heartbeat("run", echo_err) as log:
        result = run(recipe, output, force=force, overwrite=overwrite, cache_dir=cache_dir, log=log)
    click.echo(run_text(result))
    click.echo(f"wrote {result.output} (cache {cache_root(cache_dir)})")
