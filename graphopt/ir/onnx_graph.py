"""OnnxGraph: an ONNX model held as an onnx-graphsurgeon graph.

Loading checks the file (exists, parses, passes the onnx checker) and reads external data; saving writes
external data beside the output when the input had it or the model is over protobuf's 2 GB limit. Passes edit
``graph.gs`` with onnx-graphsurgeon; they never change a ``gs.Constant``'s array in place (``copy()`` shares
weights), they put a new Constant in its slot.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from graphopt.errors import ModelLoadError, first_line
from graphopt.ir.base import Graph
from graphopt.ir.feeds import Spec, feeds, input_roles
from graphopt.ir.ops import OpKind, onnx_kind

_PROTOBUF_LIMIT = 2**31 - 1
_PROTOBUF_MARGIN = 64 * 2**20  # room for everything in a model that is not a weight
_SKELETON_BYTES = 1024
_META_FIELDS = ("doc_string", "domain", "model_version")


class OnnxGraph(Graph):
    ir = "onnx"

    def __init__(self, graph: gs.Graph, meta: onnx.ModelProto | None = None, external_data: bool = False):
        self.gs = graph
        self._meta = meta if meta is not None else onnx.ModelProto()  # model-level fields gs does not carry
        self.external_data = external_data

    # -- loading and saving ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "OnnxGraph":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ModelLoadError(f"{path}: no such file")
        if os.path.isdir(path):
            raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
        try:
            model = onnx.load(path, load_external_data=False)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(exc)}); truncated or not ONNX?")
        if not model.graph.node and not model.graph.output:
            raise ModelLoadError(f"{path}: not an ONNX model (no graph, no outputs)")
        external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
        if external:
            try:
                onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
            except Exception as exc:  # onnx raises OSError, ValueError or its own ValidationError here
                raise ModelLoadError(f"{path}: external data could not be read ({first_line(exc)})")
        try:
            onnx.checker.check_model(path)  # by path: reads external data itself, no 2 GB limit
        except (onnx.checker.ValidationError, ValueError) as exc:
            raise ModelLoadError(f"{path}: invalid ONNX graph: {first_line(exc)}")
        return cls.from_model(model, external_data=external)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, external_data: bool = False) -> "OnnxGraph":
        meta = onnx.ModelProto()
        for name in _META_FIELDS:
            setattr(meta, name, getattr(model, name))
        meta.metadata_props.extend(model.metadata_props)
        try:
            graph = gs.import_onnx(model)
        except Exception as exc:
            raise ModelLoadError(f"onnx-graphsurgeon could not import the model: {first_line(exc)}")
        return cls(graph, meta, external_data)

    def to_model(self) -> onnx.ModelProto:
        model = gs.export_onnx(self.gs, do_type_check=False)
        for name in _META_FIELDS:
            setattr(model, name, getattr(self._meta, name))
        del model.metadata_props[:]
        model.metadata_props.extend(self._meta.metadata_props)
        return model

    def save(self, path: str) -> None:
        model = self.to_model()
        path = os.fspath(path)
        if self.external_data or self.too_big_for_protobuf():
            location = os.path.basename(path) + ".data"
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location, size_threshold=1024)
        else:
            onnx.save_model(model, path)

    def copy(self) -> "OnnxGraph":
        return OnnxGraph(self.gs.copy(), self._meta, self.external_data)

    # -- the protocol -------------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return int(self.gs.opset)

    def kind(self, node: gs.Node) -> OpKind:
        return onnx_kind(node.op) if node.domain in ("", "ai.onnx", None) else OpKind.OTHER

    def op_counts(self) -> Counter:
        return Counter(node.op for node in self.gs.nodes)

    def num_parameters(self) -> int:
        return int(sum(t.values.size for t in self.gs.tensors().values() if isinstance(t, gs.Constant)))

    def too_big_for_protobuf(self) -> bool:
        """Whether the weights alone come near protobuf's 2 GB limit (cheaper than serializing to ask)."""
        weights = sum(_nbytes(t) for t in self.gs.tensors().values() if isinstance(t, gs.Constant))
        return weights > _PROTOBUF_LIMIT - _PROTOBUF_MARGIN

    def skeleton(self, exported: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """The model with every initializer over 1 KB turned into a graph input of the same type and shape: the
        same structure for the checker and shape inference at a fraction of the bytes. Weights are numpy arrays
        onnx-graphsurgeon encodes, so their bytes need no checking; small initializers (shapes, axes) stay, for
        shape inference's data propagation. Built from ``exported`` (this graph's :meth:`to_model`) when the
        caller has it, else from the graph without encoding any weight."""
        if exported is None:
            g = self.gs.copy()
            for tensor in list(g.tensors().values()):
                if isinstance(tensor, gs.Constant) and _nbytes(tensor) > _SKELETON_BYTES and tensor not in g.outputs:
                    stand_in = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
                    for consumer in list(tensor.outputs):
                        replace_input(consumer, tensor, stand_in)
                    g.inputs.append(stand_in)
            return gs.export_onnx(g, do_type_check=False)
        skeleton = onnx.ModelProto()
        for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
            setattr(skeleton, name, getattr(exported, name))
        skeleton.opset_import.extend(exported.opset_import)
        skeleton.functions.extend(exported.functions)
        src, dst = exported.graph, skeleton.graph
        dst.name = src.name
        for field in ("node", "input", "output", "value_info", "sparse_initializer"):
            getattr(dst, field).extend(getattr(src, field))
        for init in src.initializer:
            if _proto_nbytes(init) > _SKELETON_BYTES:
                dst.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            else:
                dst.initializer.append(init)
        return skeleton

    def inferred_shapes(self) -> dict[str, tuple[list, np.dtype]]:
        """Shape and dtype of every tensor ONNX shape inference can type (run on :meth:`skeleton`)."""
        model = onnx.shape_inference.infer_shapes(self.skeleton(), check_type=True, data_prop=True)
        out = {}
        for vi in [*model.graph.value_info, *model.graph.output]:
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
                out[vi.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        return out

    def infer_shapes(self) -> None:
        known = self.inferred_shapes()
        for name, tensor in self.gs.tensors().items():
            if not isinstance(tensor, gs.Constant) and name in known:
                tensor.shape, tensor.dtype = known[name]

    def forget_shapes(self) -> None:
        """Drop the shapes of intermediate tensors (after a change that resized them); inputs and outputs keep
        theirs. The next inference starts afresh instead of keeping stale, or symbolic, dimensions."""
        ends = {t.name for t in [*self.gs.inputs, *self.gs.outputs]}
        for name, tensor in self.gs.tensors().items():
            if isinstance(tensor, gs.Variable) and name not in ends:
                tensor.shape = None

    def fold_constant_subgraphs(self) -> None:
        """Evaluate every subgraph computed from constants alone — with static input shapes, Shape ops too —
        with onnx-graphsurgeon's ``fold_constants`` on onnxruntime. What onnxruntime cannot evaluate stays."""
        import onnxruntime

        self.infer_shapes()
        onnxruntime.set_default_logger_severity(4)  # its optimizer's warnings on the subgraphs are noise here
        self.gs.fold_constants(error_ok=True).cleanup()
        self.forget_shapes()

    def export(self) -> onnx.ModelProto:
        return self.to_model()

    def verify(self, exported: onnx.ModelProto | None = None) -> None:
        """The onnx checker's full check (with strict shape inference), on :meth:`skeleton`."""
        try:
            onnx.checker.check_model(self.skeleton(exported), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ValueError(first_line(exc)) from exc

    def input_specs(self) -> list[Spec]:
        return [Spec(t.name, tuple(t.shape or ()), np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32))
                for t in self.gs.inputs]

    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Fixed-seed inputs (:func:`graphopt.ir.feeds.feeds`): data random, indices/shapes/axes valid."""
        return feeds(self.input_specs(), seed, roles=input_roles(self.gs))

    def session(self, threads: int = 0, *, optimized: bool = True, path: str | None = None):
        """An onnxruntime CPU session on the current graph (through a temporary file past 2 GB), or on the file
        at ``path`` that holds it. ``optimized=False``: onnxruntime's graph optimizations off (quicker to build;
        for comparisons that need no fused kernels)."""
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # failures come back as exceptions, not also as a log line
        options = ort.SessionOptions()
        options.log_severity_level = 4
        if threads:
            options.intra_op_num_threads = threads
        if not optimized:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if path is not None:
            return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        model = self.to_model()
        if not self.too_big_for_protobuf():
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs on onnxruntime. Float inputs are cast to the input's declared float type, so one set of
        inputs serves a model before and after a pass that changed its I/O precision (fp16)."""
        declared = {t.name: t.dtype for t in self.gs.inputs if t.dtype is not None}
        feeds = {}
        for name, value in inputs.items():
            dtype = np.dtype(declared[name]) if name in declared else value.dtype
            cast = value.dtype != dtype and value.dtype.kind == "f" and dtype.kind == "f"
            feeds[name] = value.astype(dtype) if cast else value
        return [np.asarray(o) for o in self.session().run(None, feeds)]

    # -- helpers passes share -----------------------------------------------------------------------------
    @staticmethod
    def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
        """The value of a tensor known at compile time: an initializer, or the output of a Constant node."""
        if isinstance(tensor, gs.Constant):
            return tensor.values
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
            attrs = tensor.inputs[0].attrs
            if isinstance(attrs.get("value"), gs.Constant):
                return attrs["value"].values
        return None

    def fold_to_constant(self, node: gs.Node, values: np.ndarray) -> bool:
        """Replace single-output ``node`` by its value: every reader reads an initializer of the output's name
        holding ``values``; the node is left disconnected (``gs.cleanup()`` drops it). Returns False, changing
        nothing, when the output is a graph output (an initializer cannot be one here)."""
        out = node.outputs[0]
        if out in self.gs.outputs:
            return False
        constant = gs.Constant(out.name, np.asarray(values))
        for consumer in list(out.outputs):
            replace_input(consumer, out, constant)
        node.outputs.clear()
        return True

    def can_splice_out(self, node: gs.Node, keep: gs.Tensor) -> bool:
        """Whether :meth:`splice_out` can remove ``node``: not when its output is a graph output and ``keep`` is a
        graph input, an initializer or itself an output (only a copy can give it the output's name)."""
        if node.outputs[0] not in self.gs.outputs:
            return True
        return len(keep.inputs) == 1 and keep not in self.gs.outputs and keep not in self.gs.inputs

    def splice_out(self, node: gs.Node, keep: gs.Tensor) -> bool:
        """Disconnect ``node`` whose (first) output equals its input ``keep``, rewiring every use to ``keep``;
        graph output names are preserved. The node is left with no inputs or outputs: the caller drops it from
        ``graph.gs.nodes`` (or ``gs.cleanup()`` does). Returns False, leaving the graph alone, when that cannot
        be done without an Identity: the output is a graph output and ``keep`` is a graph input, an initializer
        or itself an output."""
        if not self.can_splice_out(node, keep):
            return False
        out = node.outputs[0]
        producer = keep.inputs[0] if len(keep.inputs) == 1 else None
        node.inputs.clear()
        node.outputs.clear()
        if out in self.gs.outputs:
            # the producer now writes the graph output directly; other readers of `keep` read it too
            for consumer in list(keep.outputs):
                replace_input(consumer, keep, out)
            producer.outputs[producer.outputs.index(keep)] = out
        else:
            for consumer in list(out.outputs):
                replace_input(consumer, out, keep)
        return True


def _proto_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return _SKELETON_BYTES + 1
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _nbytes(tensor: gs.Constant) -> int:
    return int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize


def fresh_name(names: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first not in ``names``, which it is then added to (pass the
    set of the graph's tensor and node names, so new tensors never collide with existing ones)."""
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new
