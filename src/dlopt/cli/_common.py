"""Small helpers shared by the CLI verbs."""

import click


def echo_err(message: str) -> None:
    """Progress and diagnostics go to stderr so that stdout stays the result."""
    click.echo(message, err=True)
