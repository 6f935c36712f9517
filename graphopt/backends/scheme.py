"""The int8 quantization scheme as data: what a backend runs fast (:class:`QuantScheme`, one :class:`TensorQuant`
per class of tensors) and what the user asked for (:class:`QuantRequest`).

What the user asks for (:class:`QuantRequest`: int8 activations, per-tensor weights, only these op types) stays
separate from what a backend runs well (:class:`QuantScheme`). ``backend.scheme(request)`` reconciles the two:
a request it can honour changes the scheme, one it can honour only at a cost comes back with the cost in
``scheme.warnings``, and one it cannot honour raises :class:`UnsupportedRequestError`; nothing is dropped
silently. ``place-qdq`` reads the scheme and never asks which backend it is talking to, so a backend with another
scheme (TensorRT: symmetric int8 activations, bias left float) plugs in without changing it or its callers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Literal, Mapping

import numpy as np

from graphopt.calib.qparams import affine_params, is_float8, np_quant_dtype, quant_range, quantize
from graphopt.errors import UsageError

__all__ = [
    "BIAS_MODES", "FP8", "FP8_OPSET", "INT8_DTYPES", "QUANT_DTYPES", "FrozenDict", "Placement", "QuantRequest",
    "QuantScheme", "TensorQuant", "UnsupportedRequestError", "restrict_ops",
]

INT8_DTYPES = ("uint8", "int8")
FP8 = "float8e4m3fn"  # ONNX's FLOAT8E4M3FN (QuantizeLinear/DequantizeLinear from opset 19)
QUANT_DTYPES = (*INT8_DTYPES, FP8)
FP8_OPSET = 19  # the first opset whose QuantizeLinear/DequantizeLinear take float8
BIAS_MODES = ("float", "int32")


class UnsupportedRequestError(UsageError):
    """The user asked for quantization the backend cannot honour."""


@dataclass(frozen=True)
class TensorQuant:
    """How one class of tensors (activations or weights) is quantized.

    ``dtype``: ``"uint8"``, ``"int8"`` or ``"float8e4m3fn"`` (float8 E4M3: symmetric only, zero point a float8
    zero, ``scale = amax / 448``; values round to the nearest float8, see :mod:`graphopt.calib.qparams`).
    ``symmetric``: zero point fixed at the middle of the grid (0 for
    int8, 128 for uint8) and the range centred on zero; otherwise the range is [min(lo, 0), max(hi, 0)] with a
    computed zero point (the rule: :func:`graphopt.calib.qparams.affine_params`). ``per_channel``: one scale
    per output channel (weights; the axis comes from :meth:`QuantScheme.channel_axis`). ``narrow_range``: int8
    in [-127, 127] (uint8 [0, 254]), the range symmetric weights use so that negation cannot overflow.
    ``reduce_range``: int8 in [-64, 64] (uint8 [0, 127]), for kernels that add two uint8 x int8 products in an
    int16 (x86 ``vpmaddubsw`` without VNNI), which saturate on full-range weights.
    """

    dtype: str
    symmetric: bool
    per_channel: bool = False
    narrow_range: bool = False
    reduce_range: bool = False

    def __post_init__(self):
        if self.dtype not in QUANT_DTYPES:
            raise ValueError(f"quantized dtype must be one of {QUANT_DTYPES}, got {self.dtype!r}")
        if self.is_float8 and not self.symmetric:
            raise ValueError(f"{self.dtype} is quantized symmetrically only (zero point 0)")
        if self.is_float8 and self.reduce_range:
            raise ValueError(f"reduce_range is an int8 kernel's limit, not a {self.dtype} grid")

    @property
    def is_float8(self) -> bool:
        return is_float8(self.dtype)

    @property
    def qrange(self) -> tuple[int, int]:
        return quant_range(self.dtype, narrow=self.narrow_range, reduced=self.reduce_range)

    @property
    def qmin(self) -> int:
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        return self.qrange[1]

    @property
    def np_dtype(self) -> np.dtype:
        return np_quant_dtype(self.dtype)

    def params(self, lo, hi) -> tuple[np.ndarray, np.ndarray]:
        """Scale (float32) and zero point (this dtype) for real ranges [lo, hi] (scalars, or arrays per channel),
        by :func:`graphopt.calib.qparams.affine_params` on this grid: the range widened to contain 0 (zero
        padding and Relu's zeros exact), the scale rounded up so every value of it is on the grid, an empty
        range (lo = hi = 0) with scale 1."""
        scale, zero = affine_params(lo, hi, self.qmin, self.qmax, self.symmetric)
        return scale, zero.astype(self.np_dtype)

    def quantize(self, values, scale, zero, axis: int | None = None) -> np.ndarray:
        """``values`` on this grid (ONNX QuantizeLinear, saturating to [qmin, qmax]); per channel along ``axis``."""
        return quantize(values, scale, zero, self.dtype, axis, self.qrange)

    def describe(self) -> str:
        parts = [self.dtype, "symmetric" if self.symmetric else "asymmetric"]
        if self.per_channel:
            parts.append("per-channel")
        if (self.narrow_range or self.reduce_range) and not self.is_float8:
            parts.append(f"[{self.qmin}, {self.qmax}]")
        return " ".join(parts)


class FrozenDict(dict):
    """A read-only dict: hashable, picklable and deep-copyable (unlike ``MappingProxyType``)."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("a QuantScheme's tables are read-only; make a new scheme with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        return (type(self), (dict(self),))


@dataclass(frozen=True)
class QuantScheme:
    """What a backend runs fast in int8, as data. ``place-qdq`` reads it; it never branches on the backend.

    Op roles (ONNX op types; an op in none of them stays float, and the report lists it):

    - ``weight_channel_axis``: ops whose weight (input 1) is quantized, with the weight's output-channel axis:
      Conv 0, ConvTranspose 1, Gemm 1 (``transB=0``; 0 when ``transB=1``, see :meth:`channel_axis`),
      MatMul -1 (last). Negative axes count from the end.
    - ``quantized_ops``: ops with an int8 kernel: Q/DQ on their float inputs, a Q on their output with its own
      scale (they requantize). Weighted ops take int8 weights besides.
    - ``passthrough_ops``: ops that move int8 values without changing them (MaxPool, Reshape, Transpose, ...):
      their output shares the input's scale and zero point, so no requantization happens around them.
    - ``fused_activations``: activations (Relu, Clip) absorbed by the quantization of the op before them: that
      op's output Q is calibrated on the activation's output, whose clamp the Q's range performs.

    Placement: ``residual_add_qdq`` — both inputs of an Add (the residual one too) get Q/DQ, as the backend's
    int8 Add / fusion needs. ``fused_add`` — an Add that reads the output of a weighted op (read by nothing else)
    runs as that op's post-op (oneDNN's ``sum``, TensorRT's residual fusion): that input stays float and only the
    other, residual, input gets Q/DQ. ``requantize_outputs`` — True: every quantized op writes an int8 output with a
    scale of its own (a Q after it, after its fused activation), as onnxruntime's QLinear kernels do; False: an
    output is quantized only where an op that takes int8 reads it (Q/DQ on the *inputs* of quantized ops; an op
    whose readers are float writes float, which x86's oneDNN and TensorRT kernels do without a Q/DQ pair).
    ``requantize_graph_outputs`` (requantizing form only) — False: a model output stays float even where a
    quantized op writes it (the last classifier's logits are not rounded to 8 bits: +3.5 dB output SQNR on the
    zoo's CNNs), for a backend whose int8 kernels write float outputs at no cost; True where the int8 kernel
    needs the output's scale (onnxruntime fuses DQ -> Gemm -> Q into QGemm; without the Q it dequantizes the
    weights every run).
    ``signed_activations``: the grid for an activation tensor whose calibrated range is signed, instead of
    ``activations`` (None: ``activations`` for every tensor). OpenVINO's: int8 symmetric, so a convolution reading
    a signed tensor (the model's input) runs without a zero point to compensate, as NNCF's graph does (the stem
    of ResNet-18-like on a Xeon with AMX: 0.71 ms with uint8 and a zero point against NNCF's 0.54 in one profile,
    0.39 against 0.39 after); a non-negative tensor (after a Relu) keeps the uint8 grid, whose zero point is 0.
    ``min_channels``: weighted ops too small for the backend's int8 kernels stay float (0: none):
    :func:`graphopt.backends.qdq_plan.too_small` says which (a Conv with fewer input or output channels, a
    Gemm/MatMul with K or N under it: TensorRT's tensor cores, ModelOpt's exclusions).
    ``bias``: ``"float"`` — the bias of Conv/Gemm stays float and the backend folds it
    to int32 itself (scale = input scale × weight scale, zero point 0); ``"int32"`` — place-qdq writes it as
    int32 behind a DequantizeLinear with that scale. ``format`` is ``"QDQ"`` (QuantizeLinear/DequantizeLinear
    pairs in a float graph, which the backend fuses); ``min_opset`` is the opset the placement needs (13:
    per-channel DequantizeLinear; 19 when a tensor class is float8). ``warnings`` carry the cost of a request
    honoured against the backend's advice; a pass copies them into its context (``ctx.warn``) so the user sees them.
    ``float_readers``: ops that read a quantized tensor unrounded — the float tensor, not its DequantizeLinear —
    in the requantizing form too, where the backend computes them wrongly from int8 (OpenVINO's: see its scheme).
    """

    backend: str
    activations: TensorQuant
    weights: TensorQuant
    weight_channel_axis: Mapping[str, int]
    quantized_ops: frozenset[str]
    passthrough_ops: frozenset[str] = frozenset()
    fused_activations: frozenset[str] = frozenset()
    residual_add_qdq: bool = True
    fused_add: bool = False
    requantize_outputs: bool = True
    requantize_graph_outputs: bool = True
    bias: str = "float"
    format: str = "QDQ"
    min_opset: int = 13
    min_channels: int = 0
    signed_activations: TensorQuant | None = None
    warnings: tuple[str, ...] = ()
    conv_dims: frozenset[int] = frozenset()  # spatial dims of the convs with int8 kernels (x86: 2); empty: any
    float_readers: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "weight_channel_axis", FrozenDict(self.weight_channel_axis))
        for name in ("quantized_ops", "passthrough_ops", "fused_activations", "conv_dims", "float_readers"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        if self.min_channels < 0:
            raise ValueError(f"min_channels must be >= 0, got {self.min_channels}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.activations.per_channel:
            raise ValueError("per-channel activations are not a scheme graphopt places (weights only)")
        missing = set(self.weight_channel_axis) - self.quantized_ops
        if missing:
            raise ValueError(f"weighted ops {sorted(missing)} must also be in quantized_ops")
        if (self.activations.is_float8 or self.weights.is_float8) and self.min_opset < FP8_OPSET:
            raise ValueError(f"float8 Q/DQ needs min_opset {FP8_OPSET}+, got {self.min_opset}")
        both = self.quantized_ops & self.passthrough_ops
        if both:
            raise ValueError(f"ops {sorted(both)} cannot both requantize and pass int8 through")

    # -- questions place-qdq asks -------------------------------------------------------------------------
    @property
    def weighted_ops(self) -> frozenset[str]:
        return frozenset(self.weight_channel_axis)

    def takes_int8(self, op_type: str) -> bool:
        """Whether ``op_type`` runs on int8 inputs (requantizing or passing them through)."""
        return op_type in self.quantized_ops or op_type in self.passthrough_ops

    def activation_params(self, lo, hi) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point of an activation tensor calibrated to [lo, hi], on ``signed_activations``' grid
        where the range is signed and the scheme has one, else on ``activations``'."""
        grid = self.signed_activations if self.signed_activations is not None and lo < 0 else self.activations
        return grid.params(lo, hi)

    def channel_axis(self, op_type: str, attrs: Mapping[str, Any] | None = None, weight_rank: int | None = None
                     ) -> int | None:
        """The weight's output-channel axis for per-channel scales (None: per-tensor, or not a weighted op).

        Gemm's weight is ``B``: (K, N) with ``transB=0`` -> axis 1, (N, K) with ``transB=1`` -> axis 0.
        A negative axis is made positive when ``weight_rank`` is given.
        """
        if not self.weights.per_channel or op_type not in self.weight_channel_axis:
            return None
        axis = self.weight_channel_axis[op_type]
        if op_type == "Gemm" and attrs and int(attrs.get("transB", 0)):
            axis = 0
        if axis < 0 and weight_rank is not None:
            axis += weight_rank
        return axis

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "activations": asdict(self.activations), "weights": asdict(self.weights),
                "weight_channel_axis": dict(self.weight_channel_axis), "quantized_ops": sorted(self.quantized_ops),
                "passthrough_ops": sorted(self.passthrough_ops), "fused_activations": sorted(self.fused_activations),
                "residual_add_qdq": self.residual_add_qdq, "fused_add": self.fused_add,
                "requantize_outputs": self.requantize_outputs,
                "requantize_graph_outputs": self.requantize_graph_outputs, "bias": self.bias, "format": self.format,
                "min_opset": self.min_opset, "min_channels": self.min_channels,
                "signed_activations": asdict(self.signed_activations) if self.signed_activations else None,
                "float_readers": sorted(self.float_readers), "warnings": list(self.warnings)}

    def describe(self) -> str:
        return (f"{self.backend}: activations {self.activations.describe()}, weights {self.weights.describe()}, "
                f"{self.format}, bias {'folded to int32 by the backend' if self.bias == 'float' else 'int32'}")


@dataclass(frozen=True)
class QuantRequest:
    """What the user asked for. ``None`` means "the backend's choice".

    ``op_types``: quantize only these op types; ``exclude_op_types``: keep these float. (Excluding single nodes,
    and keeping the first/last layer float, are placement options of the pass, not part of the scheme.)
    """

    activation_dtype: str | None = None
    activation_symmetric: bool | None = None
    weight_dtype: str | None = None
    weight_symmetric: bool | None = None
    per_channel: bool | None = None
    op_types: frozenset[str] | None = None
    exclude_op_types: frozenset[str] = frozenset()

    def __post_init__(self):
        for name in ("activation_dtype", "weight_dtype"):
            value = getattr(self, name)
            if value is not None and value not in QUANT_DTYPES:
                raise UnsupportedRequestError(f"{name.replace('_', ' ')} must be one of {QUANT_DTYPES}, got {value!r}")
        if self.op_types is not None:
            object.__setattr__(self, "op_types", frozenset(self.op_types))
        object.__setattr__(self, "exclude_op_types", frozenset(self.exclude_op_types))


@dataclass(frozen=True)
class Placement:
    """Where int8 goes, as the user asks for it: the options of every pass that places Q/DQ (place-qdq, qat).

    ``ops``: quantize only these op types (empty: every type the backend quantizes); ``exclude_ops``: keep these
    types float; ``exclude_nodes``: keep these nodes float (ONNX node names; on FX, node names or module paths);
    ``keep_first`` / ``keep_last``: the first / last weighted layer stays float; ``activations`` / ``symmetric``:
    the activation type and symmetry (``fp8``: float8 E4M3 activations, and the backend's float8 weights with
    them: a backend without float8 kernels refuses), ``per_channel`` one weight scale per output channel or per
    tensor, when not the backend's choice (the backend honours, warns or refuses).
    """

    ops: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    activations: Literal["backend", "uint8", "int8", "fp8"] = "backend"
    symmetric: Literal["backend", "yes", "no"] = "backend"
    per_channel: Literal["backend", "yes", "no"] = "backend"

    def request(self) -> QuantRequest:
        """The part of it that is a request to the backend's scheme."""
        return QuantRequest(
            op_types=frozenset(self.ops) or None, exclude_op_types=frozenset(self.exclude_ops),
            activation_dtype={"backend": None, "fp8": FP8}.get(self.activations, self.activations),
            activation_symmetric=None if self.symmetric == "backend" else self.symmetric == "yes",
            per_channel=None if self.per_channel == "backend" else self.per_channel == "yes")


def restrict_ops(scheme: QuantScheme, request: QuantRequest, why_not: Mapping[str, str] = MappingProxyType({})
                 ) -> QuantScheme:
    """``scheme`` limited to the op types ``request`` allows. Asking for an op type the scheme has no int8
    kernel for raises (``why_not`` may explain a particular op); excluding one is always possible."""
    known = scheme.quantized_ops | scheme.passthrough_ops | scheme.fused_activations
    keep = known
    if request.op_types is not None:
        unsupported = sorted(request.op_types - known)
        if unsupported:
            reasons = "; ".join(f"{op}: {why_not[op]}" for op in unsupported if op in why_not)
            raise UnsupportedRequestError(
                f"backend '{scheme.backend}' has no int8 kernel for {', '.join(unsupported)}"
                + (f" ({reasons})" if reasons else "")
                + f"; it quantizes {', '.join(sorted(known))}")
        keep = frozenset(request.op_types)
    keep = keep - request.exclude_op_types
    axes = {op: axis for op, axis in scheme.weight_channel_axis.items() if op in keep}
    return replace(scheme, weight_channel_axis=axes, quantized_ops=scheme.quantized_ops & keep,
                   passthrough_ops=scheme.passthrough_ops & keep, fused_activations=scheme.fused_activations & keep)
