"""sparsify: unstructured magnitude sparsity, the smallest-|w| weights of Conv / Gemm / MatMul / Linear set to zero.

The layer machinery (finding weighted layers on both IRs, the classifier, ``ignore``, shared weights, writing
weights back, the per-layer report) is :mod:`graphopt.sparsity`, shared with ``sparsify-2-4``
(:mod:`graphopt_plugins.sparsify_2_4`), which only chooses the zeros differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from graphopt import Equivalence, Pass, PassResult, hookimpl
from graphopt.sparsity import (
    SPARSIFIED,
    ZEROED,
    FxWeights,
    Layer,
    OnnxWeights,
    check_common_options,
    magnitudes,
    sparsify,
)

__all__ = ["SPARSIFIED", "ZEROED", "SparsifyMagnitude", "round_half_up", "smallest"]


class SparsifyMagnitude(Pass):
    """Unstructured magnitude sparsity: set the smallest-magnitude weights of each layer (or of the whole model)
    to zero.

    Layers: ONNX Conv, ConvTranspose, Gemm and MatMul whose weight (input B) is a float constant (an initializer
    or a Constant node); FX ``nn.Conv*d`` / ``nn.ConvTranspose*d`` / ``nn.Linear`` module calls and
    ``F.conv*`` / ``F.conv_transpose*`` / ``F.linear`` (and their ATen forms, from torch.export) on a parameter
    (not matched: a decomposed linear, ``aten.addmm`` on a permuted weight). Only weights are sparsified; biases
    never are.

    ``sparsity`` (0 <= s < 1) is the fraction of zeros wanted. ``scope=layer``: every layer gets
    ``round(s * n)`` zeros, its ``round(s * n)`` smallest |w|. ``scope=global``: one threshold over all the
    layers sparsified, so the zeros total ``round(s * N)`` of their ``N`` weights and fall where |w| is smallest
    (layers with small weights lose more). Exactly that many weights are chosen, ties broken by position, so
    equal magnitudes never overshoot the target. Weights that are already zero count: a layer (or, globally, the
    model) that already has at least the target number of zeros is left as is, so a second run on the output
    changes nothing, and ``sparsity=0`` changes nothing at all. Zeros are never made nonzero again.

    Dense by default: the classifier, i.e. the layer(s) nearest a graph output with no other layer between
    (``include_classifier=true`` sparsifies it too); layers matched by ``ignore``; layers with fewer than
    ``min_params`` weights (default 0: none skipped; small layers such as a first conv on 3 input channels are
    cheap and sensitive, ``min_params=2000`` keeps them dense). Each ``ignore`` item matches a layer whose name
    equals it, lies below it (the name continues with ``/`` or ``.``: ``ignore=/layer1`` on ONNX node names,
    ``ignore=layer1`` on FX module paths), or matches it as an fnmatch glob (``*``, ``?``: from Python, since
    the pipeline text has no such characters). Names are ONNX node names and weight names (``conv1.weight``,
    so ``ignore=conv1`` works on an exported PyTorch model) and FX module paths and node names. An item that
    matches nothing is warned about.

    A weight read by several layers (tied weights) is sparsified once, reported as one layer named
    ``a+b``. ONNX: the new values go into the weight's own ``gs.Constant`` (a new array in it: graph copies
    share arrays, never Constants), so names stay; only when the weight is also read by something left dense
    do the sparsified layers get a new initializer ``<name>_sparse``. FX: parameters are zeroed in place in the
    pass's graph module (the manager hands passes a copy they own); a parameter also read by something left
    dense is replaced by a new one on the sparsified layers.

    Report: ``ctx.state["sparsity"]`` is a list of rows, one per layer the pass sparsifies (in graph order,
    including layers already at the target), ``{"layer", "op", "params", "zeros_before", "zeros_after",
    "sparsity"}`` (``sparsity = zeros_after / params``); each run replaces it. The notes give the overall and
    per-layer percentages (``/conv1/Conv: 50.0% zeros``) and the layers left dense, by reason; the stats count
    sparsified layers and newly zeroed weights. Equivalence none: the outputs are meant to change (fine-tune
    after, or measure accuracy with ``graphopt compare``).
    """

    name = "sparsify"
    irs = frozenset({"onnx", "fx"})
    equivalence = Equivalence.NONE
    recovery = ("fine-tune after sparsifying (graphopt.optimize(..., finetune=your_loop)), or sparsify less "
                "(sparsify:sparsity=..., ignore=...)")

    @dataclass(frozen=True)
    class Options:
        sparsity: float = 0.5
        scope: Literal["layer", "global"] = "layer"
        ignore: tuple[str, ...] = ()
        include_classifier: bool = False
        min_params: int = 0

        def __post_init__(self):
            if not 0 <= self.sparsity < 1:
                raise ValueError(f"sparsity must be at least 0 and below 1 (the fraction of weights set to zero), "
                                 f"got {self.sparsity}")
            if self.scope not in ("layer", "global"):
                raise ValueError(f"scope must be layer or global, got {self.scope!r}")
            check_common_options(self)

    def run_onnx(self, graph, ctx) -> PassResult:
        return sparsify(self, OnnxWeights(graph), ctx, self.zeros)

    def run_fx(self, graph, ctx) -> PassResult:
        return sparsify(self, FxWeights(graph), ctx, self.zeros)

    def zeros(self, layers: list[Layer]) -> list[np.ndarray]:
        """The weights that are zero after the pass, per layer (a boolean mask of the weight's shape)."""
        s = self.options.sparsity
        if self.options.scope == "layer":
            return [smallest(magnitudes(layer.values), round_half_up(s * layer.values.size)) for layer in layers]
        if not layers:
            return []
        dtype = np.float64 if any(layer.values.dtype == np.float64 for layer in layers) else np.float32
        flat = np.concatenate([magnitudes(layer.values, dtype).ravel() for layer in layers])
        chosen = smallest(flat, round_half_up(s * flat.size))
        bounds = np.cumsum([0] + [layer.values.size for layer in layers])
        return [chosen[a:b].reshape(layer.values.shape) for layer, a, b in zip(layers, bounds[:-1], bounds[1:])]


# -- the choice of zeros --------------------------------------------------------------------------------------------
def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def smallest(mags: np.ndarray, k: int) -> np.ndarray:
    """Mask of exactly the ``k`` smallest entries; when ``k`` or more are zero already, of the zeros alone (so
    nothing changes). Ties at the threshold go by position; zeros, the smallest, are always among the chosen."""
    zero = mags == 0
    if k <= int(np.count_nonzero(zero)):
        return zero
    mask = np.zeros(mags.size, dtype=bool)
    mask[np.argpartition(mags.ravel(), k - 1)[:k]] = True
    return mask.reshape(mags.shape)


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(SparsifyMagnitude)
