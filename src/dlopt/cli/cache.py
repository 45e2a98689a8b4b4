"""dlopt cache: list and trim the stage cache of `dlopt run`."""

from __future__ import annotations

import click

from dlopt.cli.run import cache_dir_option


@click.group("cache", short_help="List (ls) or trim (prune) the stage cache of `dlopt run`.")
def command():
    """The stage cache of `dlopt run` (default ~/.cache/dlopt/stages, or $DLOPT_CACHE_DIR)."""


@command.command("ls")
@cache_dir_option
def ls(cache_dir):
    """One row per cached stage output, oldest first."""
    import time

    from dlopt.report import format_table
    from dlopt.stagecache import StageCache, age_text, default_cache_dir

    cache = StageCache(cache_dir or default_cache_dir())
    entries = cache.entries()
    now = time.time()
    rows = [[e.key[:12], e.kind, f"{e.bytes / 1e6:.2f} MB", age_text(now - e.created), e.info.get("source", "?")]
            for e in entries]
    click.echo(format_table(["key", "stage", "size", "age", "source"], rows))
    click.echo(f"{len(entries)} entries, {sum(e.bytes for e in entries) / 1e6:.2f} MB in {cache.root}")


@command.command("prune")
@click.option("--older-than", default=None, metavar="AGE", help="Remove entries older than this (e.g. 7d, 12h).")
@click.option("--max-size", default=None, metavar="SIZE", help="Then remove the oldest until the rest fit (e.g. 2GB).")
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@cache_dir_option
def prune(older_than, max_size, everything, cache_dir):
    """Remove cached stage outputs by age, total size, or all of them."""
    from dlopt.errors import InputError
    from dlopt.stagecache import StageCache, default_cache_dir, parse_age, parse_size

    if not (older_than or max_size or everything):
        raise InputError("nothing to prune by", "pass --older-than AGE, --max-size SIZE or --all")
    cache = StageCache(cache_dir or default_cache_dir())
    removed = cache.prune(older_than_s=parse_age(older_than) if older_than else None,
                          max_bytes=parse_size(max_size) if max_size else None, everything=everything)
    left = cache.entries()
    click.echo(f"removed {len(removed)} entries ({sum(e.bytes for e in removed) / 1e6:.2f} MB); "
               f"{len(left)} left ({sum(e.bytes for e in left) / 1e6:.2f} MB) in {cache.root}")
