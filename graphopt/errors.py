"""Every error graphopt raises on purpose.

Each carries a message written for the person at the terminal: the CLI prints ``graphopt: error: <message>``
on one line and exits non-zero; only ``--debug`` shows a traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


class GraphoptError(Exception):
    """Base class: an error with a message fit to show a user as it is."""

    exit_code = 1


class UsageError(GraphoptError):
    """The command line or the API was used wrongly (unknown pass, malformed option, bad path)."""

    exit_code = 2


class ModelLoadError(GraphoptError):
    """The input could not be read as a model: missing, not ONNX, truncated, or an invalid graph."""


class PipelineError(UsageError):
    """A textual pipeline could not be parsed or resolved."""


class PluginError(GraphoptError):
    """A plugin could not be loaded or registered something invalid."""


class PassError(GraphoptError):
    """A pass failed; the message names the pass."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class UnsupportedIRError(PassError):
    """A pass was scheduled on an IR it does not declare."""


class VerificationError(PassError):
    """The graph a pass produced failed verification (checker, shape inference, FX lint)."""


class NumericMismatchError(PassError):
    """A pass that declares itself exact changed the model's outputs beyond tolerance."""
