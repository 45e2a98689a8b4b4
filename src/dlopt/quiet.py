"""Third-party chatter hidden while a library call runs.

ONNX Runtime's quantizer and transformer optimizer, torch.onnx and onnxconverter-common print to
stdout, log warnings and raise Python warnings that either do not apply under dlopt (ORT's "please
run pre-processing" after dlopt ran it) or are half-messages ("failed in shape inference <class
'TypeError'>"). dlopt reports what matters itself (recipes, fusions, fidelity), and stdout is kept for
results. With --debug the CLI shows tracebacks; this chatter is captured, not lost: the sink is
yielded to callers that want to attach it to an error."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_libraries(level: int = logging.WARNING) -> Iterator[io.StringIO]:
    """Within the block: stdout goes to the yielded buffer, log records at `level` and below are
    dropped, Python warnings are ignored. Restores everything on exit, errors included."""
    previous = logging.root.manager.disable
    sink = io.StringIO()
    logging.disable(level)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        logging.disable(previous)
