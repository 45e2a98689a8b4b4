"""One small error hierarchy; the CLI maps each class to a one-line message and an exit code.

Messages and hints are read by two audiences: CLI users, who know flags (`--calibration DATA`), and API
users, who know keyword arguments (`calibration=DATA`). Library code therefore never writes a flag: it
writes an option placeholder, `{calibration=DATA}` or `{resume}` (a switch), and `render` spells it for
the reader: `str(error)` (the API) as `calibration=DATA` / `resume=True`, the CLI as `--calibration DATA`
/ `--resume` (`error.cli_text()`).
"""

import re
from typing import overload

# {name} or {name=VALUE}: a Python identifier, optionally a value (any text without braces).
_OPTION = re.compile(r"\{([a-z_][a-z0-9_]*)(?:=([^{}]*))?\}")


@overload
def render(text: str, audience: str = "api") -> str: ...
@overload
def render(text: None, audience: str = "api") -> None: ...
def render(text: str | None, audience: str = "api") -> str | None:
    """Spell the option placeholders in `text` for "api" (keyword arguments) or "cli" (flags)."""
    if text is None:
        return None
    if audience not in ("api", "cli"):
        raise ValueError(f"audience must be 'api' or 'cli', not {audience!r}")

    def spell(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if audience == "cli":
            flag = "--" + name.replace("_", "-")
            return f"{flag} {value}" if value else flag
        return f"{name}={value if value else 'True'}"

    return _OPTION.sub(spell, text)


class DlOptError(Exception):
    """Base of every error dlopt raises on purpose. `hint` says what the user can do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.text("api")

    def text(self, audience: str = "api") -> str:
        """The message and hint with option placeholders spelled for "api" or "cli" readers."""
        message, hint = render(self.message, audience), render(self.hint, audience)
        return f"{message} ({hint})" if hint else message

    def cli_text(self) -> str:
        return self.text("cli")


class InputError(DlOptError):
    """Bad input from the user: a missing or corrupt file, an unknown name, a bad option value."""

    exit_code = 2


class MissingDependencyError(InputError):
    """An optional extra (torch, the reference models' packages, ExecuTorch …) is not installed."""


class TargetUnavailableError(DlOptError):
    """The execution target cannot run here (no GPU, provider missing, silent CPU fallback)."""

    exit_code = 2


class VerificationError(DlOptError):
    """An output did not match its source within tolerance, or an artifact failed its checks."""

    exit_code = 1


class StageError(DlOptError):
    """A transformation stage failed for a reason that is not the user's input."""

    exit_code = 1
