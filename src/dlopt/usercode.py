"""Calling the user's own Python: torch factories (file.py:build, package.module:build), the modules they
build, and the data readers and evaluators users plug in.

Such code may raise anything, including what no `except Exception` sees: `sys.exit(0)` would end dlopt
with exit 0 and no output, `sys.exit(3)` would read as gate's "inconclusive", and a `BaseException`
subclass would print a traceback. Every call into user code goes through `user_code`, which turns all of
that into an InputError (exit 2) naming the code, so the exit code always says what dlopt decided.
KeyboardInterrupt (Ctrl-C, and SIGTERM, which the CLI turns into one) passes through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from dlopt.errors import DlOptError, InputError


@contextlib.contextmanager
def user_code(what: str | Callable[[], str], *, hint: str = "run it by hand to debug",
              errors: bool = True) -> Iterator[None]:
    """Run the body as user code named `what` (e.g. "factory net.py:build"; a function when the name
    changes while it runs, e.g. "data reader r.py:samples at item 3").

    errors=True: every exception is the user's input's fault (an InputError naming `what`). errors=False:
    only what escapes `except Exception` (SystemExit, other BaseException subclasses) is converted, and
    ordinary exceptions reach the caller's own handling (an exporter's fallback, a stage's StageError)."""
    try:
        yield
    except (DlOptError, KeyboardInterrupt, GeneratorExit):
        raise
    except SystemExit as e:
        raise InputError(f"{_name(what)} called sys.exit({e.code!r}) instead of returning",
                         "user code must return or raise an exception, not exit the process") from e
    except Exception as e:
        if not errors:
            raise
        raise InputError(f"{_name(what)} raised {type(e).__name__}: {_first_line(e)}", hint) from e
    except BaseException as e:  # a BaseException subclass of the user's own (not an Exception)
        raise InputError(f"{_name(what)} raised {type(e).__name__} (a BaseException): {_first_line(e)}",
                         hint) from e


def _name(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300] or repr(error)


__all__ = ["user_code"]
