"""sparsify-2-4: 2:4 semi-structured sparsity, two zeros in every four weights along the reduction dimension.

The layer machinery (layers, reduction axes, ``ignore``, shared weights, write-back, the report) is
:mod:`graphopt.sparsity`, shared with ``sparsify``; this pass chooses the zeros and which layers suit 2:4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.sparsity import FxWeights, Layer, OnnxWeights, check_common_options, magnitudes, sparsify

NOT_MULTIPLE = "reduction dimension not a multiple of 4"
AXES_DIFFER = "weight shared by layers that reduce along different axes"


class Sparsify24(Pass):
    """2:4 semi-structured sparsity: in every group of 4 consecutive weights along the reduction (input-channel)
    dimension keep the 2 largest |w| and set the other 2 to zero, the pattern sparse tensor cores (NVIDIA
    Ampere and later, TensorRT, cuSPARSELt) run at up to twice the dense speed. The result is 50% zeros.

    The axis per op (a group is 4 consecutive indices on it, every other index fixed):

    - ONNX Conv weight (O, I/g, kh, kw): along I (axis 1), the input channels of one group.
    - ONNX ConvTranspose weight (I, O/g, kh, kw): along I (axis 0); I/g must be a multiple of 4, so that no
      group of four straddles two convolution groups.
    - ONNX Gemm: B (K, N) along K (axis 0); with ``transB=1`` B is (N, K), along K (axis 1).
    - ONNX MatMul with a constant weight B (..., K, N): along K (axis -2).
    - FX ``nn.Conv*d`` (O, I/g, k...) along axis 1; ``nn.ConvTranspose*d`` (I, O/g, k...) along axis 0;
      ``nn.Linear`` (out, in) along in (axis 1); the same for ``F.conv*`` / ``F.conv_transpose*`` / ``F.linear``
      and their ATen forms on a parameter.

    Layers whose reduction length (per group) is not a multiple of 4 — a first conv on 3 input channels, a
    depthwise conv — stay dense and are listed in a note, as is a weight shared by ops that reduce it along
    different axes. Which layers are sparsified, ``ignore``, ``include_classifier``, ``min_params``, shared
    weights, how new values are written and the report (``ctx.state["sparsity"]``: a list of rows
    ``{"layer", "op", "params", "zeros_before", "zeros_after", "sparsity"}``, one per layer sparsified, plus
    per-layer notes) are as in ``sparsify`` (see ``graphopt passes sparsify``). Ties keep the earlier weight.
    Zeros already there count as weights: a group with two or more zeros is left as is, so a second run changes
    nothing. Biases are never sparsified. Equivalence none: the outputs are meant to change.
    """

    name = "sparsify-2-4"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.NONE
    recovery = ("fine-tune after sparsifying (graphopt.optimize(..., finetune=your_loop)), or keep sensitive layers "
                "dense (ignore=...)")

    @dataclass(frozen=True)
    class Options:
        ignore: tuple[str, ...] = ()
        include_classifier: bool = False
        min_params: int = 0

        def __post_init__(self):
            check_common_options(self)

    def run_onnx(self, graph, ctx) -> PassResult:
        return sparsify(self, OnnxWeights(graph), ctx, self.zeros, self.skip)

    def run_fx(self, graph, ctx) -> PassResult:
        return sparsify(self, FxWeights(graph), ctx, self.zeros, self.skip)

    @staticmethod
    def skip(layer: Layer) -> str | None:
        if len({(s.axis, s.run) for s in layer.sites}) > 1:
            return AXES_DIFFER
        if layer.run % 4:
            return NOT_MULTIPLE
        return None

    @staticmethod
    def zeros(layers: list[Layer]) -> list[np.ndarray]:
        return [two_of_four(layer.values, layer.axis) for layer in layers]


def two_of_four(values: np.ndarray, axis: int) -> np.ndarray:
    """Mask of the weights that are zero after 2:4 along ``axis`` (whose length is a multiple of 4): in each
    group of 4 all but the 2 largest |w| (ties: the earlier index wins), and any weight already zero."""
    moved = np.moveaxis(magnitudes(values), axis, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // 4, 4))
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.moveaxis(~keep.reshape(moved.shape), -1, axis) | (values == 0)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(Sparsify24)
