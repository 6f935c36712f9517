"""How far one model's outputs are from another's: SQNR, cosine similarity, max relative error, top-1 agreement
and accuracy, per output and per layer.

The measures are :mod:`graphopt.numeric`'s (SQNR, cosine and max relative error NaN-aware; top-1 agreement: the
fraction of samples whose argmax over the class axis, the last, is the same); this module applies them to whole
models.

Per-layer SQNR runs both models with their intermediate tensors exposed as extra graph outputs and matches
tensors **by name**, with this rule: for every tensor the reference model A computes (a node output that is not a
constant, a QuantizeLinear or a DequantizeLinear output), and each of A's graph inputs, B's counterpart is

1. the output of the DequantizeLinear in ``T -> QuantizeLinear -> DequantizeLinear`` when B quantizes the
   tensor ``T`` of the same name: that is the value B's next layer reads, so it includes the quantization of
   ``T`` itself (a QDQ model keeps the original name on the float tensor it quantizes, as onnxruntime's
   quantizer and graphopt's place-qdq do); when A quantizes ``T`` too, A's own DequantizeLinear output is the
   reference (like for like: a Q/DQ model against itself is inf dB on every layer);
2. otherwise B's own tensor of that name, made by the same op (not for graph inputs: both models read the same
   feeds; short names such as ``compact`` writes are positions, not identities);
3. otherwise nothing: tensors present in only one model (renamed, fused away, or B's Q/DQ tensors) are
   ignored, and counted as unmatched.

Intermediate tensors are exposed as graph outputs (:func:`graphopt.ir.expose.expose`), which can stop the backend
fusing the node that produces them (a QDQ Conv then runs as float Conv on dequantized int8 values): the values
differ from the fused kernel's only by float rounding of the accumulation, far below int8 noise. Final outputs are
compared on the unmodified models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import onnx

from graphopt.backends.base import Accuracy, BackendError, DataError, check_classes, check_feeds, iter_batches
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.errors import UsageError
from graphopt.ir.expose import expose as _expose
from graphopt.ir.feeds import samples as random_samples
from graphopt.ir.onnx_graph import OnnxGraph
from graphopt.numeric import (
    cosine_similarity,
    fmt_db,
    max_rel_error,
    sqnr_db,
    top1_accuracy,
    top1_agreement,
    top1_correct,
)
from graphopt.report.layers import LayerSQNR, LayerTable, jsonable
from graphopt.report.layers import count_samples as _count
from graphopt.table import format_table

# the measures are graphopt.numeric's; their names stay importable from here
__all__ = [
    "Comparison", "LayerSQNR", "LayerTable", "OutputComparison", "TensorMatch", "compare_models", "compare_outputs",
    "cosine_similarity", "expose", "fmt_db", "is_logits", "jsonable", "match_tensors", "max_rel_error",
    "outputs_table", "per_layer_sqnr", "sqnr_db", "top1_accuracy", "top1_agreement",
]

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def is_logits(array: np.ndarray) -> bool:
    """Whether an output looks like classification logits: (samples, classes) with more than one class."""
    return array.ndim == 2 and array.shape[1] > 1


# -- per output -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    sqnr_db: float
    cosine: float
    max_rel_err: float
    top1_agreement: float | None  # None when the output is not (samples, classes) logits

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "sqnr_db": jsonable(self.sqnr_db),
                "cosine": self.cosine, "max_rel_err": self.max_rel_err, "top1_agreement": self.top1_agreement}


def compare_outputs(reference: list[np.ndarray], test: list[np.ndarray], names: Iterable[str] | None = None
                    ) -> list[OutputComparison]:
    """One row per output, matched by position (the names are the reference's, for display)."""
    if len(reference) != len(test):
        raise ValueError(f"the models have {len(reference)} and {len(test)} outputs")
    names = list(names) if names is not None else [f"output {i}" for i in range(len(reference))]
    rows = []
    for name, r, x in zip(names, reference, test):
        r, x = np.asarray(r), np.asarray(x)
        if r.shape != x.shape:
            raise ValueError(f"output '{name}' has shape {r.shape} in one model and {x.shape} in the other")
        rows.append(OutputComparison(name, tuple(r.shape), sqnr_db(r, x), cosine_similarity(r, x),
                                     max_rel_error(r, x), top1_agreement(r, x) if is_logits(r) else None))
    return rows


def outputs_table(rows: list[OutputComparison], samples: int | None = None) -> str:
    table = [("output", "shape", "SQNR dB", "cosine", "max rel err", "top-1 agreement")]
    for r in rows:
        agree = "n/a (not logits)"
        if r.top1_agreement is not None:
            agree = f"{100 * r.top1_agreement:.2f}%"
            if samples:
                agree += f" ({round(r.top1_agreement * samples)}/{samples})"
        table.append((r.name, "x".join(map(str, r.shape)), fmt_db(r.sqnr_db), f"{r.cosine:.6f}",
                      f"{r.max_rel_err:.2e}", agree))
    return format_table(table)


# -- per layer ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMatch:
    tensor: str  # the name in the reference model A
    other: str  # the tensor compared in B (A's name, or the DequantizeLinear output that carries it)
    op_type: str  # the op that produces it in A ("input" for a graph input)
    index: int  # its position in A's node order (-1 for a graph input)
    read: str = ""  # the tensor of A read instead of ``tensor``: its own DequantizeLinear output, when A quantizes it
    quantized: bool = False  # B's value went through Q/DQ (also where B's DequantizeLinear keeps A's name: an output)


def match_tensors(model_a, model_b) -> tuple[list[TensorMatch], list[str]]:
    """B's counterpart of each tensor A computes, by the rule in the module docstring. Returns the matches and
    the names of A's tensors left unmatched."""
    a, b = _proto(model_a).graph, _proto(model_b).graph
    b_op = {o: n.op_type for n in b.node for o in n.output if o}
    b_names = set(b_op) | {i.name for i in b.input}
    in_a, in_b = _dequantized_in(a), _dequantized_in(b)

    initializers = {t.name for t in a.initializer}
    candidates = [(i.name, "input", -1) for i in a.input if i.name not in initializers]
    for index, node in enumerate(a.node):
        if node.op_type in QDQ_OPS or node.op_type == "Constant":
            continue
        candidates += [(o, node.op_type, index) for o in node.output if o]
    matches, unmatched = [], []
    for name, op, index in candidates:
        other = in_b.get(name)
        if other is None and op != "input" and name in b_names and b_op.get(name) in (op, *QDQ_OPS):
            other = name  # the same name made by the same op, or by the Q/DQ B put on it (a graph output's name);
            # a name alone says little: compact's short names are positions
        if other is None:
            if op != "input":  # an input B feeds as it is needs no row
                unmatched.append(name)
        else:  # A quantizes it too: its own value after Q/DQ is the reference (a model against itself: inf dB)
            matches.append(TensorMatch(name, other, op, index, in_a.get(name, "") if other != name else "",
                                       other != name or b_op.get(name) in QDQ_OPS))
    return matches, unmatched


def _dequantized_in(graph) -> dict[str, str]:
    """Tensor name -> the output of the DequantizeLinear in ``T -> QuantizeLinear -> DequantizeLinear``, for every
    tensor ``T`` the graph quantizes."""
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = {}
    for q in graph.node:
        if q.op_type == "QuantizeLinear" and q.input and q.input[0] not in found:
            dq = next((d for d in consumers.get(q.output[0], []) if d.op_type == "DequantizeLinear"
                       and d.input[0] == q.output[0]), None)
            if dq is not None:
                found[q.input[0]] = dq.output[0]
    return found


def _proto(model) -> onnx.ModelProto:
    if hasattr(model, "to_model"):  # OnnxGraph
        return model.to_model()
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(model)


def expose(model, names: Iterable[str]):
    """A ModelProto of ``model`` (a path, ModelProto or OnnxGraph) with the tensors ``names`` added as graph
    outputs: :func:`graphopt.ir.expose.expose` for callers that hold a ModelProto."""
    return _expose(OnnxGraph.from_model(_proto(model)), names).to_model()


def per_layer_sqnr(model_a, model_b, batches: Iterable[Mapping[str, np.ndarray]], backend=None,
                   threads: int = 0) -> LayerTable:
    """Per-layer SQNR of B against A (A is the reference), accumulated over ``batches`` of feeds (each a dict
    input name -> array, or ``(feeds, n)`` where only the first ``n`` samples are real and tensors whose first
    dimension is the batch are cut to them); SQNR is total signal over total noise, not a mean of per-batch
    values. Two PyTorch graphs (FX) are compared node by node instead (:mod:`graphopt.report.fx_layers`)."""
    if getattr(model_a, "ir", None) == "fx" and getattr(model_b, "ir", None) == "fx":
        from graphopt.report.fx_layers import per_layer_sqnr_fx

        return per_layer_sqnr_fx(model_a, model_b, (item[0] if isinstance(item, tuple) else item for item in batches))
    backend = backend or OnnxRuntimeBackend()
    a, b = _proto(model_a), _proto(model_b)
    matches, unmatched = match_tensors(a, b)
    sess_a = backend.session(_expose(OnnxGraph.from_model(a), [m.read or m.tensor for m in matches]), threads)
    sess_b = backend.session(_expose(OnnxGraph.from_model(b), [m.other for m in matches]), threads)
    names_a, names_b = backend.output_names(sess_a), backend.output_names(sess_b)
    acc = {m.tensor: LayerSQNR(m.tensor, m.other, m.op_type, m.index, quantized=m.quantized) for m in matches}
    skipped: dict[str, str] = {}
    samples = 0
    for item in batches:
        feeds, real = item if isinstance(item, tuple) else (item, None)
        outs_a = dict(zip(names_a, backend.run(sess_a, feeds)))
        outs_b = dict(zip(names_b, backend.run(sess_b, feeds)))
        batch = _count(feeds)
        samples += batch if real is None else real
        for m in matches:
            if m.tensor in skipped:
                continue
            ra, xb = outs_a[m.read or m.tensor], outs_b[m.other]
            if real is not None and real < batch and ra.ndim and ra.shape[0] == batch and xb.shape[:1] == (batch,):
                ra, xb = ra[:real], xb[:real]
            if not (np.issubdtype(ra.dtype, np.floating) and np.issubdtype(xb.dtype, np.floating)):
                skipped[m.tensor] = f"not float ({ra.dtype} / {xb.dtype})"
            elif ra.shape != xb.shape:
                skipped[m.tensor] = f"shapes differ ({ra.shape} / {xb.shape})"
            else:
                acc[m.tensor].add(ra, xb)
    rows = [r for name, r in acc.items() if name not in skipped]
    rows.sort(key=lambda r: (r.sqnr_db, r.index))
    return LayerTable(rows, unmatched, skipped, samples)


def check_labels(labels, samples: int, where: str = "") -> np.ndarray:
    """Labels checked as every path that scores accuracy reads them (``--eval``, ``eval=``, ``compare``): one
    integer class per sample (a (N, 1) column is taken as N), as many as ``samples``; returned 1-D. DataError,
    prefixed with ``where``."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        raise DataError(f"{where}labels must be one integer class per sample; got {labels.dtype} of shape "
                        f"{labels.shape}")
    if labels.shape[0] != samples:
        raise DataError(f"{where}{labels.shape[0]} labels for {samples} samples")
    return labels


def check_labelled(data: Mapping[str, np.ndarray], labels, where: str) -> np.ndarray:
    """Labelled evaluation data (input arrays and their labels): the labels as :func:`check_labels` takes them, one
    per sample of every input, and finite float inputs (NaN in, NaN out: every score would read as chance)."""
    counts = {name: len(v) for name, v in data.items() if np.ndim(v)}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}the inputs hold different numbers of samples: "
                        + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for name, values in data.items():
        if np.issubdtype(np.asarray(values).dtype, np.floating) and not np.isfinite(values).all():
            raise DataError(f"{where}array '{name}' holds NaN or infinite values")
    return check_labels(labels, next(iter(counts.values()), 0), where)


# -- a whole comparison ---------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """The result of :func:`compare_models`."""

    inputs: str  # where the inputs came from, said in words
    samples: int
    outputs: list[OutputComparison]
    accuracy: dict[str, Any] | None = None  # {"a": Accuracy, "b": Accuracy, "labels": key} when labels are given
    per_layer: LayerTable | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"inputs": self.inputs, "samples": self.samples,
                                "outputs": [o.to_dict() for o in self.outputs]}
        if self.accuracy is not None:
            data["accuracy"] = {"labels": self.accuracy["labels"], "a": self.accuracy["a"].to_dict(),
                                "b": self.accuracy["b"].to_dict()}
        if self.per_layer is not None:
            data["per_layer"] = self.per_layer.to_dict()
        return data


def compare_models(model_a, model_b, data: Mapping[str, np.ndarray] | None = None, labels=None, *,
                   labels_key: str = "labels", samples: int = 16, seed: int = 0, per_layer: bool = False,
                   per_layer_samples: int = 64, batch_size: int = 32, backend=None, threads: int = 0,
                   data_label: str = "the given data") -> Comparison:
    """Compare B against the reference A on ``data`` (one array per input name, samples on the first axis) or,
    without data, on ``samples`` fixed-seed random samples. With ``labels`` also the top-1 accuracy of both
    (first output). ``per_layer`` adds the per-layer SQNR table on the first ``per_layer_samples`` samples."""
    backend = backend or OnnxRuntimeBackend()
    a, b = (_proto(model_a), _proto(model_b)) if "onnx" in backend.irs else (model_a, model_b)
    if per_layer and "onnx" not in backend.irs:
        raise UsageError(f"per-layer SQNR compares ONNX models' tensors by name; backend {backend.name} runs "
                         f"{', '.join(sorted(backend.irs))} models (compare the outputs only)")
    sess_a, sess_b = backend.session(a, threads), backend.session(b, threads)
    specs_a, specs_b = backend.input_specs(sess_a), backend.input_specs(sess_b)
    if sorted(s.name for s in specs_a) != sorted(s.name for s in specs_b):
        raise DataError(f"the models have different inputs: {', '.join(s.name for s in specs_a)} vs "
                        f"{', '.join(s.name for s in specs_b)}")
    if data is None:
        data = random_samples(specs_a, samples, seed)
        inputs = f"{samples} fixed-seed random samples (seed {seed}; no data given)"
    else:
        data = {k: np.asarray(v) for k, v in data.items()}
        inputs = data_label
    n = check_feeds(specs_a, data)
    out_a = backend.run_batched(sess_a, data, batch_size)
    out_b = backend.run_batched(sess_b, data, batch_size)
    try:
        rows = compare_outputs(out_a, out_b, backend.output_names(sess_a))
    except ValueError as exc:
        raise BackendError(f"the models cannot be compared: {exc}") from None
    result = Comparison(inputs, n, rows)
    if labels is not None:
        labels = check_labels(labels, n)
        if not is_logits(out_a[0]):
            raise DataError(f"accuracy needs (samples, classes) logits as the first output; it has shape "
                            f"{out_a[0].shape}")
        check_classes(labels, out_a[0])
        result.accuracy = {"labels": labels_key, "a": Accuracy(top1_correct(out_a[0], labels), n),
                           "b": Accuracy(top1_correct(out_b[0], labels), n)}
    if per_layer:
        subset = {s.name: data[s.name][:per_layer_samples] for s in specs_a}
        batches = iter_batches(specs_a, subset, batch_size)
        result.per_layer = per_layer_sqnr(a, b, batches, backend, threads)
    return result
