"""One small error hierarchy; the CLI maps each class to a one-line message and an exit code."""


class DlOptError(Exception):
    """Base of every error dlopt raises on purpose. `hint` says what the user can do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


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
