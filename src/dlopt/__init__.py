"""dlopt: take a trained model to a fast, small, verified on-device artifact."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("dlopt")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from dlopt.errors import DlOptError, InputError, StageError, TargetUnavailableError, VerificationError

__all__ = [
    "__version__",
    "DlOptError",
    "InputError",
    "StageError",
    "TargetUnavailableError",
    "VerificationError",
]
