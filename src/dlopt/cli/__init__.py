"""The `dlopt` command. Thin: each verb lives in its own module here, parses, calls the library, prints.

Verb modules are found by name (every module in this package that defines `command`), so adding a
verb is adding a file. They must import quickly: torch and onnxruntime are imported inside commands.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import pkgutil
import signal
import sys
import traceback

import click

import dlopt
from dlopt.errors import DlOptError, render


class _VerbGroup(click.Group):
    def _verbs(self) -> dict[str, click.Command]:
        found: dict[str, click.Command] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            command = getattr(module, "command", None)
            if isinstance(command, click.Command) and command.name:
                found[command.name] = command
        return found

    def list_commands(self, ctx):
        return sorted(self._verbs())

    def get_command(self, ctx, name):
        return self._verbs().get(name)

    def invoke(self, ctx):
        from dlopt.api import notes_to, reset_written

        reset_written()
        notes_to(lambda text: click.echo(f"note: {text}", err=True))
        with _sigterm_as_interrupt() as received:
            try:
                return super().invoke(ctx)
            except DlOptError as e:
                if _debug(ctx):
                    traceback.print_exc()
                click.echo(f"error: {render(e.message, 'cli')}", err=True)
                if e.hint:
                    click.echo(f"hint: {render(e.hint, 'cli')}", err=True)
                ctx.exit(e.exit_code)
            except KeyboardInterrupt:
                click.echo(f"interrupted{' (SIGTERM)' if received else ''}: {_written_text()}", err=True)
                ctx.exit(128 + (signal.SIGTERM if received else signal.SIGINT))
            except click.exceptions.UsageError as e:  # a bad option value: one line, as every other input error
                verb = " ".join(["dlopt", *(e.ctx.command_path.split()[1:] if e.ctx is not None else [])])
                click.echo(f"error: {e.format_message()}", err=True)
                click.echo(f"hint: see {verb} --help", err=True)
                ctx.exit(e.exit_code)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    _internal_error(ctx, e)
                # a full disk is the machine's state, not a bug (outputs are staged: nothing half-written stays)
                click.echo(f"error: no space left on the device{_device_of(e.filename)} ({e.strerror or e})", err=True)
                click.echo("hint: free some space, or choose another output folder with -o", err=True)
                ctx.exit(2)
            except BaseException as e:  # a bug (or SystemExit from library code): one line and a saved traceback
                _internal_error(ctx, e)


def _device_of(filename) -> str:
    """ " holding FOLDER": the nearest existing folder of a file that could not be written (its temp files
    are gone by now: the folder is where the user chose to write)."""
    import os

    if not filename:
        return ""
    folder = os.path.dirname(os.path.abspath(os.fsdecode(filename)))
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return f" holding {folder}"


def _internal_error(ctx, e: BaseException) -> None:
    """One line and a saved traceback, not a wall of text; exit 1."""
    if _debug(ctx):
        traceback.print_exc()
    verb = ctx.invoked_subcommand or "dlopt"
    text = (str(e).strip().splitlines() or [""])[0][:300]
    click.echo(f"internal error in {verb}: {type(e).__name__}: {text}", err=True)
    log = _save_debug_log(verb)
    click.echo(
        f"hint: this is a bug in dlopt; the full traceback is in {log}"
        + ("" if _debug(ctx) else " (or run again with --debug)"),
        err=True,
    )
    ctx.exit(1)


def _debug(ctx) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


def _written_text() -> str:
    from dlopt.api import written_paths

    written = written_paths()
    if not written:
        return "nothing was written"
    return "wrote only " + ", ".join(str(p) for p in written) + " (each complete; the other outputs were not written)"


def _save_debug_log(verb: str) -> str:
    """Write the current exception's traceback to $TMPDIR/dlopt-debug-<time>-<pid>.log; its path."""
    import os
    import platform
    import tempfile
    import time

    path = os.path.join(tempfile.gettempdir(), f"dlopt-debug-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    try:
        with open(path, "w") as f:
            f.write(f"dlopt {dlopt.__version__}, Python {platform.python_version()}, {platform.platform()}\n")
            f.write(f"command: {' '.join(sys.argv)}\nverb: {verb}\n\n")
            f.write(traceback.format_exc())
    except OSError as e:
        return f"(not saved: {e.strerror or e})"
    return path


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (kill, a CI timeout, docker stop) interrupts like SIGINT: temp files are removed and
    nothing half-written is left. Yields a list that holds the signal once one arrived."""
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


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
