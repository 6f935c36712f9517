"""torchao, imported lazily and quietly.

torchao's import tries to load its native CUDA extensions and logs a warning for each that does not load on a
CPU-only machine ("Failed to load ..._C_mxfp8...so"), and torch logs a deprecation for an Enum torchao registers
with pytree. Neither means anything to a graphopt user, so the import runs with those loggers silenced and the
CUDA extensions skipped (``TORCHAO_FORCE_SKIP_LOADING_SO_FILES``: the PT2E flow is pure Python and ATen). Without
torchao installed, the PyTorch route's quantization is one clear error naming the install command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from graphopt.errors import UnsupportedError

INSTALL_HINT = "pip install 'graphopt[torch]' (torchao >= 0.18, beside torch >= 2.11)"
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._inductor", "torch.fx.experimental")


@contextlib.contextmanager
def quiet_torch_logs():
    """torch / torchao loggers at ERROR and their Python warnings ignored, for the duration of the block."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
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


def pt2e():
    """``torchao.quantization.pt2e`` and its submodules loaded, as a namespace with the names graphopt uses:
    ``prepare_pt2e``, ``prepare_qat_pt2e``, ``convert_pt2e``, ``Quantizer``, ``QuantizationSpec``,
    ``SharedQuantizationSpec``, ``QuantizationAnnotation``, ``ObserverBase``, ``FakeQuantizeBase``,
    ``move_exported_model_to_eval`` / ``_to_train``, ``allow_exported_model_train_eval``. Raises
    :class:`UnsupportedError` when torchao is not installed."""
    global _PT2E
    if _PT2E is not None:
        return _PT2E
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # CUDA kernels: never used on this route
    try:
        with quiet_torch_logs():
            import torchao.quantization.pt2e as base
            from torchao.quantization.pt2e import quantize_pt2e, quantizer
            from torchao.quantization.pt2e.observer import ObserverBase
    except ImportError as exc:
        raise UnsupportedError(f"quantizing a PyTorch model needs torchao ({exc.msg}): {INSTALL_HINT}") from None

    class _Namespace:
        pass

    ns = _Namespace()
    for name in ("prepare_pt2e", "prepare_qat_pt2e", "convert_pt2e"):
        setattr(ns, name, getattr(quantize_pt2e, name))
    for name in ("Quantizer", "QuantizationSpec", "SharedQuantizationSpec", "QuantizationAnnotation",
                 "DerivedQuantizationSpec"):
        setattr(ns, name, getattr(quantizer, name))
    ns.ObserverBase = ObserverBase
    for name in ("FakeQuantizeBase", "move_exported_model_to_eval", "move_exported_model_to_train",
                 "allow_exported_model_train_eval", "disable_observer", "enable_observer", "disable_fake_quant",
                 "enable_fake_quant"):
        setattr(ns, name, getattr(base, name))
    ns.version = getattr(__import__("torchao"), "__version__", "?")
    _PT2E = ns
    return ns


_PT2E = None
