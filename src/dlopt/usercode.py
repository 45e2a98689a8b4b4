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
import hashlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from dlopt.errors import DlOptError, InputError


@contextlib.contextmanager
def user_code(
    what: str | Callable[[], str], *, hint: str = "run it by hand to debug", errors: bool = True
) -> Iterator[None]:
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
        raise InputError(
            f"{_name(what)} called sys.exit({e.code!r}) instead of returning",
            "user code must return or raise an exception, not exit the process",
        ) from e
    except Exception as e:
        if not errors:
            raise
        raise InputError(f"{_name(what)} raised {type(e).__name__}: {_first_line(e)}", hint) from e
    except BaseException as e:  # a BaseException subclass of the user's own (not an Exception)
        raise InputError(f"{_name(what)} raised {type(e).__name__} (a BaseException): {_first_line(e)}", hint) from e


def import_user_file(path: str | Path, *, role: str, hint: str = "fix the file", name: str | None = None) -> ModuleType:
    """Import the user's .py file `path` as a module (a factory, data reader or evaluator: `role` names it
    in messages), as user code. The module is registered in sys.modules under a name made from the file's
    path (dataclasses and pickling look their module up by name) and no __pycache__ is written beside the
    file: dlopt leaves its inputs' folders as it found them."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{role} file {file} does not exist", "check the path in FILE.py:FUNCTION")
    label = name or f"{role} file {file}"
    name = f"dlopt_user_{role.replace(' ', '_')}_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    found = importlib.util.spec_from_file_location(name, file)
    if found is None or found.loader is None:
        raise InputError(f"{role} file {file} cannot be imported as Python", "give a .py module")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        with user_code(f"importing {label}", hint=hint):
            found.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


def _name(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300] or repr(error)


__all__ = ["import_user_file", "user_code"]
