"""dlopt cache: list and trim the stage cache of `dlopt run`."""

from __future__ import annotations

import click

from dlopt.cli._common import cache_dir_option


@click.group(
    "cache", short_help="List (ls) or trim (prune) the stage cache of `dlopt run` and quantize's kernel decisions."
)
def command():
    """The stage cache of `dlopt run`, which also holds quantize's timed kernel decisions per CPU model
    (kind kernel-decision) (default ~/.cache/dlopt/stages, or $DLOPT_CACHE_DIR)."""


@command.command("ls")
@cache_dir_option
def ls(cache_dir):
    """One row per cached stage output or kernel decision, oldest first."""
    from dlopt.api import cache_ls
    from dlopt.cli.results import cache_text

    click.echo(cache_text(cache_ls(cache_dir)))


@command.command("prune")
@click.option("--older-than", default=None, metavar="AGE", help="Remove entries older than this (e.g. 7d, 12h).")
@click.option("--max-size", default=None, metavar="SIZE", help="Then remove the oldest until the rest fit (e.g. 2GB).")
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@cache_dir_option
def prune(older_than, max_size, everything, cache_dir):
    """Remove cached stage outputs by age, total size, or all of them."""
    from dlopt.api import cache_prune

    pruned = cache_prune(older_than=older_than, max_size=max_size, all=everything, cache_dir=cache_dir)
    left_bytes = sum(e.bytes for e in pruned.left)
    click.echo(
        f"removed {len(pruned.removed)} entries ({sum(e.bytes for e in pruned.removed) / 1e6:.2f} MB); "
        f"{len(pruned.left)} left ({left_bytes / 1e6:.2f} MB) in {pruned.root}"
    )
