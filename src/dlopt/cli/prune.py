"""dlopt prune: structured pruning (channels, attention heads, FFN) with a measured speedup."""

from __future__ import annotations

import click

from dlopt.cli._common import ANY_NUMBER, COUNT, TOLERANCE, echo_err

STRUCTURES = ("auto", "channels", "heads", "ffn", "heads+ffn", "unstructured")  # dlopt.optimize.prune.STRUCTURES
IMPORTANCES = ("magnitude", "taylor", "lamp", "random")


@click.command("prune", short_help="Remove channels, attention heads or FFN units; measure the speedup.")
@click.argument("source")
@click.option(
    "--ratio",
    type=ANY_NUMBER,
    default=0.5,
    show_default=True,
    help="Fraction removed: of channels / heads / FFN units, or of weights with --structure unstructured.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory: pruned.pt (checkpoint), pruned.onnx (verified export), prune.json.",
)
@click.option(
    "--structure",
    type=click.Choice(STRUCTURES),
    default="auto",
    show_default=True,
    help="auto: heads+ffn for transformers with separate q/k/v layers, ffn for nn.TransformerEncoder, "
    "channels otherwise. unstructured: zero the smallest weights (smaller when compressed, "
    "not faster).",
)
@click.option(
    "--importance",
    type=click.Choice(IMPORTANCES),
    default="magnitude",
    show_default=True,
    help="How channels are ranked. taylor uses gradients on the model's calibration data.",
)
@click.option(
    "--global",
    "global_pruning",
    is_flag=True,
    help="Rank channels across layers (uneven widths) instead of the same ratio in every layer.",
)
@click.option(
    "--ignore",
    multiple=True,
    metavar="LAYER",
    help="Keep this layer's output channels (repeatable; names as in model.named_modules()). "
    "The output layer is always kept.",
)
@click.option("--round-to", type=COUNT, default=None, help="Keep channel counts multiples of this (e.g. 8).")
@click.option("--batch", type=COUNT, default=1, show_default=True, help="Batch size of the latency measurement.")
@click.option("--seq-len", type=COUNT, default=128, show_default=True, help="Sequence length (token models).")
@click.option(
    "--bench-seconds",
    type=TOLERANCE,
    default=15.0,
    show_default=True,
    help="Time budget of the interleaved latency measurement (one thread).",
)
@click.option("--no-bench", is_flag=True, help="Skip the latency measurement.")
def command(
    source,
    ratio,
    output,
    structure,
    importance,
    global_pruning,
    ignore,
    round_to,
    batch,
    seq_len,
    bench_seconds,
    no_bench,
):
    """Prune SOURCE (a reference model or a factory path/to/file.py:build) and export it to ONNX.

    Structured pruning removes whole channels, heads or FFN units with Torch-Pruning, so the model
    really gets smaller and faster; the latency ratio to the unpruned model is measured with one
    ONNX Runtime thread, interleaved. Prints parameters and MACs before and after. Fine-tune the
    result with `dlopt distill --student OUT/pruned.pt`.
    """
    from pathlib import Path

    from dlopt.api import Prune, prune_model

    config = Prune(
        ratio=ratio,
        structure=structure,
        importance=importance,
        global_pruning=global_pruning,
        ignore=tuple(ignore),
        round_to=round_to,
    )
    written = prune_model(
        source,
        Path(output),
        config,
        bench_seconds=None if no_bench else bench_seconds,
        batch=batch,
        seq_len=seq_len,
        log=echo_err,
    )
    click.echo(written.table)
    for line in written.notes:
        click.echo(line)
    click.echo(f"wrote {written.checkpoint}, {written.onnx}, {written.report_path}")
