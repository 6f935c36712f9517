"""What the FX route's int8 passes do to an ATen graph around torchao's prepare / convert: which tensors
calibration observes, BatchNorm folded as PT2E folds it, and the PTQ and QAT conversions themselves."""

from __future__ import annotations

import torch

from graphopt.errors import UnsupportedError, first_line
from graphopt.ir.fx_ops import aten_name, computes_float
from graphopt.pt2e.torchao import pt2e, quiet_torch_logs


def float_activations(gm) -> list[str]:
    """Names of the nodes of ``gm`` that compute a float tensor (and the float inputs): what calibration watches."""
    return [node.name for node in gm.graph.nodes if computes_float(node)]


def fold_batch_norms(gm) -> int:
    """Fold every BatchNorm that follows a conv / linear into its weights (torchao's fusion, the one PT2E's
    ``prepare_pt2e`` runs); returns how many were folded."""
    pt2e()  # torchao imported quietly first
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_, _fuse_linear_bn_

    before = len(batch_norms(gm))
    if not before:
        return 0
    try:
        with quiet_torch_logs():
            _fuse_conv_bn_(gm)
            _fuse_linear_bn_(gm)
    except RuntimeError as exc:  # torch's fuse_conv_bn_weights on a grouped ConvTranspose: shapes do not match
        raise UnsupportedError(f"torchao's conv + BatchNorm fusion fails on this model ({first_line(exc, 120)}; a "
                               f"grouped ConvTranspose before a BatchNorm does this): run 'fold' first (fold,int8: "
                               f"graphopt's own BatchNorm folding handles it)") from None
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return before - len(batch_norms(gm))


def batch_norms(gm) -> list[str]:
    """Names of the BatchNorm nodes of ATen graph ``gm`` (every ATen form of it)."""
    return [n.name for n in gm.graph.nodes if "batch_norm" in aten_name(n)]


def convert_ptq(gm, example_inputs, quantizer):
    """Post-training quantization of ATen graph ``gm`` as ``quantizer`` places it: observers from torchao's
    ``prepare_pt2e`` (graphopt's: activation ranges already calibrated), one run on ``example_inputs`` so the weight
    observers see the weights, then ``convert_pt2e``'s Q/DQ graph."""
    ao = pt2e()
    fold_batch_norms(gm)  # prepare_pt2e folds them too: here, a fusion torch cannot do is one line
    with quiet_torch_logs():
        prepared = ao.prepare_pt2e(gm, quantizer)
        with torch.no_grad():
            prepared(*example_inputs)
        return inference_module(ao.convert_pt2e(prepared))


def inference_module(gm):
    """A converted int8 graph as an inference module: ``train()`` / ``eval()`` only set the flag, as on any module
    (torchao makes them raise on an exported module, whose dropout and BatchNorm would not switch; a converted
    graph has no BatchNorm left, and a user's ``model.eval()`` must not fail on it), and the parameters and buffers
    no node reads any more are dropped: the float weights ``convert_pt2e`` replaced by their int8 copies would
    otherwise stay in the module, its parameter count and every file saved from it."""
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(n.target + "." for n in gm.graph.nodes if n.op == "call_module")
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in read and not name.startswith(called):
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
    return gm


def qdq_counts(gm) -> dict[str, int]:
    """Q/DQ ops of a converted graph: activation pairs (per tensor) and quantized weights (per channel or folded)."""
    names = [aten_name(n) for n in gm.graph.nodes]
    return {"quantize": sum(n.startswith("quantize_per") for n in names),
            "dequantize": sum(n.startswith("dequantize_per") for n in names)}
