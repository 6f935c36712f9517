"""Keeping torch's and torchao's own log lines and warnings off a graphopt user's terminal.

torch and torchao log through their own handlers (``W1207 ... torch/utils/_pytree.py: <enum ...> is an Enum
subclass ...``, torch.onnx's "torchvision is not installed", torchao's failed CUDA extensions) and raise Python
warnings about their own internals. None of it is about the user's model; graphopt's errors and reports say what
is. ``graphopt run --debug`` shows the Python warnings (the CLI's filter), not these loggers.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._inductor", "torch.fx.experimental",
                 "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def quiet_torch_logs():
    """torch / torchao loggers at ERROR and their Python warnings ignored, for the duration of the block."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
