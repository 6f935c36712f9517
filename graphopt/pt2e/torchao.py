"""torchao, imported lazily and quietly.

torchao's import tries to load its native CUDA extensions and logs a warning for each that does not load on a
CPU-only machine ("Failed to load ..._C_mxfp8...so"), and torch logs a deprecation for an Enum torchao registers
with pytree. Neither means anything to a graphopt user, so the import runs with those loggers silenced and the
CUDA extensions skipped (``TORCHAO_FORCE_SKIP_LOADING_SO_FILES``: the PT2E flow is pure Python and ATen). Without
torchao installed, the PyTorch route's quantization is one clear error naming the install command.

torchao finds its rewrite patterns (conv + BatchNorm for QAT, BatchNorm and dropout for train / eval) by exporting
small Python functions with ``torch.export`` every time it needs them: ``convert_pt2e`` of a QAT model exports 96
of them, about a minute on two cores, whatever the model. The patterns are pure functions of their flags and
example shapes, so graphopt memoizes that export (:func:`_memoize_patterns`): one process pays for each pattern
once.
"""

from __future__ import annotations

import copy
import os

from graphopt.errors import UnsupportedError
from graphopt.quiet import quiet_torch_logs

INSTALL_HINT = "pip install 'graphopt[torch]' (torchao >= 0.18, beside torch >= 2.11)"
__all__ = ["INSTALL_HINT", "pt2e", "quiet_torch_logs"]


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
    ns.PlaceholderObserver = base.PlaceholderObserver
    for name in ("FakeQuantizeBase", "move_exported_model_to_eval", "move_exported_model_to_train",
                 "allow_exported_model_train_eval", "disable_observer", "enable_observer", "disable_fake_quant",
                 "enable_fake_quant"):
        setattr(ns, name, getattr(base, name))
    ns.version = getattr(__import__("torchao"), "__version__", "?")
    _memoize_patterns()
    _PT2E = ns
    return ns


def _memoize_patterns() -> None:
    """Replace torchao's ``_get_aten_graph_module_for_pattern`` (where ``qat_utils`` and ``export_utils`` find it)
    by a memoized one: keyed on the pattern function's code, closure and defaults and the example inputs' shapes
    and types; each call gets its own copy of the cached graph module."""
    from torchao.quantization.pt2e import qat_utils, utils

    current = utils._get_aten_graph_module_for_pattern
    original = getattr(current, "__wrapped__", current)
    cache: dict = {}

    def memoized(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in cache:
            cache[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(cache[key])

    memoized.__wrapped__ = original
    utils._get_aten_graph_module_for_pattern = memoized
    qat_utils._get_aten_graph_module_for_pattern = memoized


def _pattern_key(pattern, example_inputs, is_cuda, kwargs):
    """A hashable description of a pattern export, or None where the pattern is not a plain function of hashable
    closure values (then it is exported as torchao would)."""
    import torch

    fn = getattr(pattern, "fn", pattern)  # export_utils wraps functions in a WrapperModule
    code = getattr(fn, "__code__", None)
    if code is None:
        return None

    def describe(x):
        return ("tensor", tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", repr(x))

    try:
        key = (code, tuple(c.cell_contents for c in fn.__closure__ or ()), fn.__defaults__,
               tuple(describe(x) for x in example_inputs), bool(is_cuda),
               tuple(sorted((k, describe(v)) for k, v in kwargs.items())))
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


_PT2E = None
