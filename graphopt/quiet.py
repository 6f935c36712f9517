"""Keeping torch's and torchao's own log lines and warnings off a graphopt user's terminal.

torch and torchao log through their own handlers (``W1207 ... torch/utils/_pytree.py: <enum ...> is an Enum
subclass ...``, torch.onnx's "torchvision is not installed", torchao's failed CUDA extensions) and raise Python
warnings about their own internals. None of it is about the user's model; graphopt's errors and reports say what
is. ``graphopt run --debug`` shows the Python warnings (the CLI's filter), not these loggers. torch.export.load
also logs failed attempts with their tracebacks before it tries an older format.
"""

from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_torch_logs():
    """Log records below ERROR dropped (``logging.disable``: torch's and torchao's loggers are many and nested) and
    Python warnings ignored, for the duration of the block. Keep the block around the library call: graphopt's own
    warnings go to the run's report (``ctx.warn``), not through a logger inside it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
