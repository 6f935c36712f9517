"""OnnxGraph: an ONNX model held as an onnx-graphsurgeon graph.

Loading (:mod:`graphopt.ir.onnx_io`) checks the file — it parses, its versions are known to onnx, its external data
is safe, the onnx checker accepts it — and leaves external weights on disk, memory-mapped when read. IR < 4 models
(which had to list every initializer as a graph input) are upgraded: the initializers are dropped from the inputs
and ``ir_version`` raised to the one their opsets need (at least 4). In IR >= 4 an initializer that is also a graph
input is an input with a default value: it stays a graph input here (passes see a run-time input, not a constant, as
onnxruntime does) and is written back with its default. Saving (:mod:`graphopt.ir.onnx_write`) is atomic and writes
external data (``<out>.data``) when the input had it or the weights come near protobuf's 2 GB limit.

Passes edit ``graph.gs`` with onnx-graphsurgeon; they never change a ``gs.Constant``'s array in place (``copy()``
shares weights; mapped weights are read-only), they put a new Constant in its slot.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.logger import G_LOGGER

from graphopt.errors import ModelLoadError, UnsupportedError, first_line
from graphopt.ir import onnx_checks, onnx_external, onnx_io, onnx_write
from graphopt.ir.base import Graph
from graphopt.ir.contrib_shapes import STAND_IN_SUFFIX, packed_input, packed_weights, with_stand_ins
from graphopt.ir.feeds import InputSpec, feeds, input_roles
from graphopt.ir.gs_gaps import copy_gs, export_optional_types, gs_graphs
from graphopt.ir.onnx_io import fresh_name  # noqa: F401  (its home is loading, which names unnamed nodes; passes import it here)
from graphopt.ir.ops import OpKind, onnx_kind
from graphopt.ir.ort_quirks import create_session

# graphsurgeon's warnings (a subgraph onnxruntime could not fold, ...) are printed, not raised: graphopt reports
# what matters in its own notes, so only its errors get through
G_LOGGER.severity = max(G_LOGGER.severity, G_LOGGER.ERROR)

_PROTOBUF_MARGIN = 64 * 2**20  # room for everything in a model that is not a weight
_SKELETON_BYTES = 1024
_META_FIELDS = ("doc_string", "domain", "model_version")
_IN_MEMORY = "graphopt-in-memory"  # the location of weights handed to onnxruntime as arrays (never read)


class OnnxGraph(Graph):
    ir = "onnx"

    def __init__(self, graph: gs.Graph, meta: onnx.ModelProto | None = None, external_data: bool = False,
                 defaults: dict | None = None, notes: list[str] | None = None):
        self.gs = graph
        self._meta = meta if meta is not None else onnx.ModelProto()  # model-level fields gs does not carry
        self.external_data = external_data
        # graph inputs that have a default value (IR >= 4 initializers listed as inputs): name -> gs values
        self.defaults: dict = defaults if defaults is not None else {}
        self.notes: list[str] = notes if notes is not None else []  # what loading changed, for the report

    # -- loading and saving ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "OnnxGraph":
        path = os.fspath(path)
        model, sources = onnx_io.read_model(path)
        return cls._import(model, path, sources)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, external_data: bool = False) -> "OnnxGraph":
        """An OnnxGraph of an in-memory model (not modified; its tensors are shared until a pass replaces them)."""
        if onnx_external.has_external_data(model):
            raise ModelLoadError("ModelProto: its tensors refer to external data, which cannot be found without "
                                 "the model's folder (load the model by path, or with onnx.load(path))")
        onnx_io.check_versions(model, "ModelProto")
        onnx_checks.check_tensor_sizes(model, "ModelProto")
        onnx_checks.check_value_types(model, "ModelProto")
        return cls._import(model, "ModelProto", {}, external_data)

    @classmethod
    def _import(cls, model: onnx.ModelProto, where: str, sources: dict, external_data: bool = False) -> "OnnxGraph":
        meta = onnx.ModelProto()
        for name in _META_FIELDS:  # only those the model has: an empty one written out is bytes for nothing
            if model.HasField(name):
                setattr(meta, name, getattr(model, name))
        meta.metadata_props.extend(model.metadata_props)
        graph, defaults, notes = onnx_io.import_graph(model, where, sources)
        return cls(graph, meta, external_data or bool(sources), defaults, notes)

    def to_model(self) -> onnx.ModelProto:
        """The model as one self-contained ModelProto (external weights read into it: under 2 GB only)."""
        return self._export(self._default_constants())

    def _export(self, defaults: list[gs.Constant]) -> onnx.ModelProto:
        model = export_optional_types(self.gs)
        for name in _META_FIELDS:
            if self._meta.HasField(name):
                setattr(model, name, getattr(self._meta, name))
        del model.metadata_props[:]
        model.metadata_props.extend(self._meta.metadata_props)
        model.graph.initializer.extend(OnnxExporter.export_tensor_proto(c) for c in defaults)
        return model

    def _default_constants(self) -> list[gs.Constant]:
        """The default values of the graph inputs that have one, as Constants to export beside the graph."""
        inputs = {t.name for t in self.gs.inputs}
        return [gs.Constant(name, values) for name, values in self.defaults.items() if name in inputs]

    def _reads(self) -> set[str]:
        """The files this graph's weights are read from."""
        values = [c._values for c in onnx_io.constants(self.gs)] + list(self.defaults.values())
        return {s.path for s in map(onnx_external.file_source, values) if s is not None}

    def save(self, path: str, before_move=None) -> None:
        """Write the model to ``path`` atomically (temporary files beside it, then moved into place), with its
        weights in ``<path>.data`` when the input had external data or they come near 2 GB. OutputError with
        the path when it cannot be written. ``before_move(temporary_path)`` may check the written file (run
        it, say) before it is moved into place: if it raises, nothing is written."""
        defaults = self._default_constants()
        external = self.external_data or self.too_big_for_protobuf()
        onnx_write.write_files(path, [*onnx_io.constants(self.gs), *defaults], lambda: self._export(defaults),
                            external, self._reads(), before_move)

    def copy(self) -> "OnnxGraph":
        return OnnxGraph(copy_gs(self.gs), self._meta, self.external_data, dict(self.defaults), list(self.notes))

    # -- the protocol -------------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return int(self.gs.opset)

    def kind(self, node: gs.Node) -> OpKind:
        return onnx_kind(node.op) if node.domain in ("", "ai.onnx", None) else OpKind.OTHER

    def op_counts(self) -> Counter:
        return Counter(node.op for node in self.gs.nodes)

    def num_parameters(self) -> int:
        """Elements of every initializer (default values of graph inputs included), counted without reading them; a
        packed weight of onnxruntime's 4-/8-bit contrib ops as the values it holds (:func:`packed_weights`)."""
        consts = list({id(t): t for g in gs_graphs(self.gs) for t in g.tensors().values()  # If/Loop bodies too
                       if isinstance(t, gs.Constant)}.values()) + self._default_constants()
        total, seen = int(sum(np.prod(t.shape, dtype=np.int64) for t in consts)), set()
        for node in self.gs.nodes:
            packed = packed_input(node)
            if isinstance(packed, gs.Constant) and packed.name not in seen:
                held = packed_weights(node, lambda t: int(np.prod(t.shape, dtype=np.int64)), lambda t: t.dtype)
                if held is not None:
                    seen.add(packed.name)
                    total += held - int(np.prod(packed.shape, dtype=np.int64))
        return total

    def too_big_for_protobuf(self) -> bool:
        """Whether the weights alone come near protobuf's 2 GB limit (cheaper than serializing to ask)."""
        weights = sum(onnx_write.nbytes(c) for c in [*onnx_io.constants(self.gs), *self._default_constants()])
        return weights > onnx_io.PROTOBUF_LIMIT - _PROTOBUF_MARGIN

    def skeleton(self, exported: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """The model with every initializer over 1 KB turned into a graph input of the same type and shape: the
        same structure for the checker and shape inference at a fraction of the bytes. Weights are numpy arrays
        onnx-graphsurgeon encodes, so their bytes need no checking; small initializers (shapes, axes) stay, for
        shape inference's data propagation. Built from ``exported`` (this graph's :meth:`to_model`) when the
        caller has it, else from the graph without encoding any weight."""
        if exported is None:
            return export_optional_types(self._skeleton_graph()[0])
        skeleton = onnx.ModelProto()
        for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
            setattr(skeleton, name, getattr(exported, name))
        skeleton.opset_import.extend(exported.opset_import)
        skeleton.functions.extend(exported.functions)
        src, dst = exported.graph, skeleton.graph
        dst.name = src.name
        for field in ("node", "input", "output", "value_info", "sparse_initializer"):
            getattr(dst, field).extend(getattr(src, field))
        inputs = {vi.name for vi in src.input}  # an input with a default is an input already
        for init in src.initializer:
            if _proto_nbytes(init) > _SKELETON_BYTES:
                if init.name not in inputs:
                    dst.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            else:
                dst.initializer.append(init)
        return skeleton

    def _skeleton_graph(self) -> tuple[gs.Graph, dict]:
        """A copy of the graph whose initializers over 1 KB are graph inputs; and their values by name."""
        g = copy_gs(self.gs)
        values = {}
        for tensor in list(g.tensors().values()):
            big = isinstance(tensor, gs.Constant) and onnx_write.nbytes(tensor) > _SKELETON_BYTES
            if big and tensor not in g.outputs:
                stand_in = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
                for consumer in list(tensor.outputs):
                    replace_input(consumer, tensor, stand_in)
                g.inputs.append(stand_in)
                values[tensor.name] = tensor._values
        return g, values

    def upgrade_opset(self, target: int) -> str:
        """Convert the graph to default-domain opset ``target`` with onnx.version_converter, in place; returns a
        one-line note. The converter sees the graph without its weights (initializers over 1 KB stand in as
        inputs; they are put back after), so the model's size does not matter. Ops in other domains are left as
        they are. UnsupportedError (with what to do) when it cannot convert."""
        current = self.opset
        if target <= current:
            return f"opset {current}: not converted (already >= {target})"
        newest = onnx.defs.onnx_opset_version()
        if target > newest:
            raise UnsupportedError(f"opset {current} -> {target}: onnx {onnx.__version__} knows opsets up to "
                                   f"{newest} (upgrade onnx)")
        others = sorted({n.domain for n in self.gs.nodes if n.domain not in ("", "ai.onnx", None)})
        skeleton, weights = self._skeleton_graph()
        try:
            converted = onnx.version_converter.convert_version(export_optional_types(skeleton), target)
            onnx.checker.check_model(converted)
        except Exception as exc:  # the converter raises RuntimeError, ConvertError, IndexError, ...
            domains = f"; it converts only the default domain, the model also has {', '.join(others)}" if others else ""
            raise UnsupportedError(f"opset {current} -> {target}: onnx.version_converter failed: {first_line(exc)}"
                                   f"{domains} (re-export the model at opset {target} or newer)") from None
        try:
            graph = gs.import_onnx(converted)
        except Exception as exc:
            raise UnsupportedError(f"opset {current} -> {target}: the converted model could not be imported "
                                   f"({first_line(exc)}) (re-export the model at opset {target})") from None
        tensors = graph.tensors()
        for name, values in weights.items():
            if isinstance(tensors.get(name), gs.Variable):
                tensors[name].to_constant(values)
        graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
        graph.ir_version = max(converted.ir_version, onnx_io.min_ir_version(converted.opset_import))
        self.gs = graph
        return f"opset {current} -> {target} (onnx.version_converter)"

    def inferred_shapes(self) -> dict[str, tuple[list, np.dtype]]:
        """Shape and dtype of every tensor ONNX shape inference can type (run on :meth:`skeleton`, with standard
        stand-ins for onnxruntime's contrib ops whose shapes :mod:`graphopt.ir.contrib_shapes` knows, so that what
        follows them is typed too)."""
        model = onnx.shape_inference.infer_shapes(with_stand_ins(self.skeleton()), check_type=True, data_prop=True)
        out = {}
        for vi in [*model.graph.value_info, *model.graph.output]:
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.HasField("shape") and not vi.name.endswith(STAND_IN_SUFFIX):
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
        """Evaluate every subgraph computed from constants alone — with static input shapes, Shape ops too (by
        the ONNX spec, :func:`graphopt.ir.onnx_shapes.fold_shapes`: onnx-graphsurgeon's own shape folding ignores
        Shape's start/end) — with onnx-graphsurgeon's ``fold_constants`` on onnxruntime. What onnxruntime cannot
        evaluate stays."""
        import onnxruntime

        from graphopt.ir.onnx_shapes import fold_shapes

        known = self.inferred_shapes()
        for _ in range(4):  # a folded shape can make another Shape's input static
            if not fold_shapes(self, known.get):
                break
            self.gs.cleanup()
        onnxruntime.set_default_logger_severity(4)  # its optimizer's warnings on the subgraphs are noise here
        self.gs.fold_constants(fold_shapes=False, error_ok=True).cleanup()
        self.forget_shapes()

    def export(self) -> onnx.ModelProto:
        return self.to_model()

    def verify(self, exported: onnx.ModelProto | None = None, full: bool = True) -> None:
        """The onnx checker's full check (with strict shape inference; ``full=False``: without), on
        :meth:`skeleton`."""
        try:
            onnx.checker.check_model(self.skeleton(exported), full_check=full)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ValueError(first_line(exc)) from exc

    def input_specs(self) -> list[InputSpec]:
        """The inputs to feed (those with a default value run with it), as :class:`graphopt.ir.feeds.InputSpec`."""
        return [InputSpec(t.name, tuple(t.shape or ()), _numpy_dtype(t.dtype)) for t in self.gs.inputs
                if t.name not in self.defaults]

    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Fixed-seed inputs (:func:`graphopt.ir.feeds.feeds`): data random, indices/shapes/axes valid."""
        return feeds(self.input_specs(), seed, roles=input_roles(self.gs))

    def session(self, threads: int = 0, options=None, providers=("CPUExecutionProvider",), *, optimized: bool = True,
                path: str | None = None):
        """An onnxruntime session on the current graph, built without copying the model in memory: weights still
        in their (validated) data file are referred to there, so onnxruntime maps them; weights in memory are
        handed over as arrays (``add_external_initializers``; onnxruntime copies them once). No 2 GB limit.
        Without ``options``: a session for a few runs (checks), so weights are not pre-packed (that would copy
        every MatMul weight again). ``optimized=False``: onnxruntime's graph optimizations off (quicker to build,
        for comparisons that need no fused kernel). ``path``: the file that holds this very graph, run from there.
        UnsupportedError when onnxruntime cannot build it (an op without a kernel)."""
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # failures come back as exceptions, not also as a log line
        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.add_session_config_entry("session.disable_prepacking", "1")
            if threads:
                options.intra_op_num_threads = threads
            if not optimized:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if path is not None:
            return create_session(ort, os.fspath(path), options, providers)
        defaults = self._default_constants()
        initializers = [t for t in self.gs.tensors().values() if isinstance(t, gs.Constant)]  # not in subgraphs
        big = [c for c in [*initializers, *defaults] if onnx_write.nbytes(c) > _SKELETON_BYTES]
        files = {s.path for s in map(onnx_external.file_source, (c._values for c in big)) if s is not None}
        folder = os.path.commonpath([os.path.dirname(f) for f in files]) if files else None
        arrays: dict[str, np.ndarray] = {}

        def refer(const, data_type, nbytes):
            source = onnx_external.file_source(const._values)
            if source is not None:
                return os.path.relpath(source.path, folder), source.offset
            arrays[const.name] = np.ascontiguousarray(const.values)
            return _IN_MEMORY, 0

        big = [c for c in big
               if onnx_external.file_source(c._values) or onnx_write.raw_type(c) in onnx_external.RAW_NUMPY]
        model = onnx_write.export_with_references(big, lambda: self._export(defaults), refer)
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
        if values:
            options.add_external_initializers(list(arrays), values)
        if folder:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        session = create_session(ort, model.SerializeToString(), options, providers)
        session._graphopt_arrays = (values, arrays)  # onnxruntime reads them in place: they must outlive it
        return session

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


def _numpy_dtype(dtype) -> np.dtype:
    """A tensor's dtype as numpy's (onnx-graphsurgeon leaves the ONNX type number where numpy has no dtype:
    float8, int4, ...; ml_dtypes has one); float32 when unknown."""
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, (int, np.integer)):
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
        except (KeyError, ValueError, TypeError):
            return np.dtype(np.float32)
    return np.dtype(dtype)


def _proto_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return _SKELETON_BYTES + 1
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new
