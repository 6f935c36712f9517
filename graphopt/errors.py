"""Every error graphopt raises on purpose, in six classes, each with its own exit code.

Each error carries a message written for the person at the terminal, ``<file or node>: <what> (<what to do>)``:
the CLI prints ``graphopt: error: <message>`` on one line and exits with the class's code; only ``--debug``
shows a traceback. Anything else that escapes is a bug in graphopt or a plugin ("internal error", exit 70).

- 2 :class:`UsageError` — the command line or API was used wrongly: unknown pass or option, a bad flag, an
  output path that is an input.
- 3 :class:`InputError` — an input cannot be read or is not valid: missing, truncated, not ONNX, unsafe external
  data, a pickle not trusted, bad calibration data.
- 4 :class:`UnsupportedError` — a valid input that graphopt or the backend cannot handle: an opset newer than
  onnxruntime's, an op no runtime here has, a pass on the wrong IR.
- 5 :class:`PassError` — a pass failed or left an invalid graph.
- 6 :class:`EquivalenceError` — a pass that declares itself exact changed the outputs (or ``--bisect`` found one).
- 7 :class:`OutputError` — an output could not be written (read-only folder, a directory in the way, disk full).
"""

from __future__ import annotations

import re

INTERNAL_ERROR_EXIT = 70  # an exception that is not a GraphoptError: a bug, reported as "internal error"
INTERRUPTED_EXIT = 130


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = _ANSI.sub("", str(exc)).strip() or type(exc).__name__  # torch.onnx colours its messages
    return text.splitlines()[0][:limit]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class GraphoptError(Exception):
    """Base class: an error with a message fit to show a user as it is. Raise one of the six classes below."""

    exit_code = 1


class UsageError(GraphoptError):
    """The command line or the API was used wrongly (unknown pass, malformed option, an output over an input)."""

    exit_code = 2


class InputError(GraphoptError):
    """An input (model, its external data, calibration or evaluation data) could not be read or is invalid."""

    exit_code = 3


class UnsupportedError(GraphoptError):
    """A valid input that graphopt, a pass or the backend cannot handle (and says what to do instead)."""

    exit_code = 4


class PassError(GraphoptError):
    """A pass failed; the message names the pass."""

    exit_code = 5

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class EquivalenceError(PassError):
    """The outputs moved where they must not: a pass declared exact changed them beyond tolerance."""

    exit_code = 6


class OutputError(GraphoptError):
    """An output file could not be written."""

    exit_code = 7


# -- the specific errors, each in one class ---------------------------------------------------------------------
class ModelLoadError(InputError):
    """The input could not be read as a model: missing, not ONNX, truncated, unsafe, or an invalid graph."""


class PipelineError(UsageError):
    """A textual pipeline could not be parsed or resolved."""


class PluginError(UsageError):
    """A plugin could not be loaded or registered something invalid."""


class UnsupportedIRError(UnsupportedError):
    """A pass was scheduled on an IR it does not declare."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class InstrumentError(PassError):
    """An instrument (``--instrument NAME``, ``instruments=``) failed; the message names it."""

    def __init__(self, instrument: str, message: str):
        self.pass_name = instrument
        GraphoptError.__init__(self, f"instrument '{instrument}': {message}")


class VerificationError(PassError):
    """The graph a pass produced failed verification (checker, shape inference, FX lint)."""


class NumericMismatchError(EquivalenceError):
    """A pass that declares itself exact changed the model's outputs beyond tolerance."""


ERROR_CLASSES = (UsageError, InputError, UnsupportedError, PassError, EquivalenceError, OutputError)
