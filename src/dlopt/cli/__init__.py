"""The `dlopt` command. Thin: each verb lives in its own module here, parses, calls the library, prints.

Verb modules are found by name (every module in this package that defines `command`), so adding a
verb is adding a file. They must import quickly: torch and onnxruntime are imported inside commands.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

import click

import dlopt
from dlopt.errors import DlOptError


class _VerbGroup(click.Group):
    def _verbs(self) -> dict[str, click.Command]:
        found: dict[str, click.Command] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            command = getattr(module, "command", None)
            if isinstance(command, click.Command):
                found[command.name] = command
        return found

    def list_commands(self, ctx):
        return sorted(self._verbs())

    def get_command(self, ctx, name):
        return self._verbs().get(name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DlOptError as e:
            debug = ctx.obj and ctx.obj.get("debug")
            if debug:
                traceback.print_exc()
            click.echo(f"error: {e.message}", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            ctx.exit(130)


@click.group(cls=_VerbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dlopt.__version__, prog_name="dlopt")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """dlopt: export, quantize, prune, distill, benchmark and package models for CPU, CUDA and mobile."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
