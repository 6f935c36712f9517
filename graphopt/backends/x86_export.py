"""Exporting a PyTorch module for x86 lowering: which dims become dynamic, and checking that they really are.

:func:`export_dynamic` asks ``torch.export`` for graphopt's dynamic dims (:func:`dynamic_dims`: the batch of every
input, the sequence of token ids; the rule :func:`graphopt.ir.fx_export.export_dynamic` applies when the quantizer
captures a module), keeps only those that survive a probe run (an AOTInductor package checks no guard at run time)
and that inductor compiles right (:func:`_dynamic_hazard`), and says why the rest stayed static. torch is imported
inside functions only.
"""

from __future__ import annotations

import contextlib
from typing import Any

from graphopt.errors import UnsupportedError, first_line
from graphopt.ir.fx_ops import get_attr

INSTALL_HINT = "pip install 'graphopt[torch]'"


def torch_module():
    """torch, with inductor and the ``quantized_decomposed`` ops a PT2E graph holds (registered on import of
    ``torch.ao.quantization.fx._decomposed``); a one-line error naming the install when they are missing."""
    try:
        with quiet():
            import torch
            import torch._inductor  # noqa: F401
            import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError as exc:
        raise UnsupportedError(f"the x86 backend needs torch with inductor ({exc.msg}): {INSTALL_HINT}") from None
    return torch


@contextlib.contextmanager
def quiet():
    from graphopt.quiet import quiet_torch_logs

    with quiet_torch_logs():
        yield


# -- dynamic dims ------------------------------------------------------------------------------------------
def dynamic_dims(example_inputs) -> list[tuple[int, ...]]:
    """The dims asked to be dynamic, per input: graphopt's one rule (:func:`graphopt.ir.fx_export.dynamic_dims`: the
    batch of every input, and the sequence of integer (B, S) token ids). They are asked as ``Dim.AUTO`` and
    :func:`export_dynamic` keeps those that check out."""
    from graphopt.ir.fx_export import dynamic_dims as rule

    return [tuple(rule(x)) for x in example_inputs]


def strip_guards(gm) -> None:
    """Remove the ``_guards_fn`` call a ``torch.export(...).module()`` carries: it asserts the *original*
    export's input shapes (``x.size()[0] == 2``), which would fix every dim again on re-export."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def export_dynamic(gm, example_inputs) -> tuple[Any, dict[str, list[int]], str]:
    """``(exported program, input name -> dynamic dims, why a dim graphopt frees stays static, or "")``:
    :func:`graphopt.ir.fx_export.export_with_dims`
    with :func:`dynamic_dims`, then with the batch dims only (each program probed one size larger: an AOTInductor
    package checks no guard at run time, so a dim the graph does not really free must not reach it); static, with
    the reason, when every attempt fails or inductor would miscompile the dynamic form (:func:`_dynamic_hazard`)."""
    from graphopt.ir.fx_export import export_with_dims

    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    static = {n: [] for n in names}
    reason = _dynamic_hazard(gm)
    if reason:
        return export_static(gm, example_inputs), static, reason
    wanted = dynamic_dims(example_inputs)
    attempts = [wanted] + ([[d[:1] for d in wanted]] if any(len(d) > 1 for d in wanted) else [])
    reasons = []
    for dims in attempts:
        program, dynamic, reason = export_with_dims(gm, example_inputs, dims)
        if program is not None:  # the batch alone after the first attempt failed: the sequence is fixed, and why
            fixed = f"the token sequence is fixed: {reasons[0]}" if reasons else ""
            return program, {name: dynamic.get(i, []) for i, name in enumerate(names)}, fixed
        reasons.append(reason)
    return export_static(gm, example_inputs), static, reasons[-1]


def export_static(gm, example_inputs):
    torch = torch_module()
    try:
        return torch.export.export(gm, tuple(example_inputs))
    except Exception as exc:
        raise UnsupportedError(f"torch.export cannot capture the model for x86 ({first_line(exc)}) (check that the "
                               f"module runs on its example inputs)") from None


def _dynamic_hazard(gm) -> str:
    """Why dynamic dims would give wrong results, or "". torch 2.13's inductor assumes a *contiguous* output for a
    conv on a 1-channel input when shapes are dynamic (``mkldnn_ir._prepare_convolution_fusion_create``: such an
    input is both contiguous and channels-last), which holds for the float kernel but not for oneDNN's int8 conv,
    whose output is always channels-last: the next op reads it transposed (measured: SQNR < 15 dB against the Q/DQ
    graph). Such a graph is compiled with static shapes."""
    torch = torch_module()
    dq = torch.ops.quantized_decomposed.dequantize_per_tensor
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.ops.aten.conv2d.default,
                                                             torch.ops.aten.convolution.default):
            continue
        x, w = node.args[0], node.args[1]
        quantized = isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in (dq.default, dq.tensor)
        shape = _weight_shape(gm, w)
        groups = node.args[6] if node.target == torch.ops.aten.conv2d.default and len(node.args) > 6 else \
            (node.args[8] if len(node.args) > 8 else 1)
        if quantized and shape is not None and len(shape) > 1 and shape[1] * groups == 1:
            return (f"inductor miscompiles an int8 conv on a 1-channel input ('{node.name}') with dynamic shapes, "
                    f"torch {torch.__version__}")
    return ""


def _weight_shape(gm, node):
    """The shape of a conv's weight: its example value, or the tensor a (dequantized) get_attr reads."""
    val = getattr(node, "meta", {}).get("val")
    if val is not None:
        return tuple(val.shape)
    while getattr(node, "op", None) == "call_function" and node.args:  # dequantize_per_channel(get_attr, ...)
        node = node.args[0]
    value = get_attr(gm, node.target) if getattr(node, "op", None) == "get_attr" else None
    return tuple(value.shape) if value is not None and hasattr(value, "shape") else None
