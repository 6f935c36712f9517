"""Reading ONNX files: safe external data, lazily mapped weights (writing them: :mod:`graphopt.ir.onnx_write`).

Loading parses the model without its external data, checks every external-data reference (a plain relative
path to a regular file in the model's folder or below, reached through no symlink, not hard-linked, offset and
length inside the file and matching the tensor's size) *before* onnx or onnxruntime reads any of it, then runs
the onnx checker on the file. Weights stay on disk: onnx-graphsurgeon sees :class:`ExternalValues`, which
memory-map the validated file when a pass asks for the values.
"""

from __future__ import annotations

import os

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.errors import ModelLoadError, UnsupportedError, first_line
from graphopt.ir.gs_gaps import restore_type_attributes
from graphopt.ir.onnx_checks import check_tensor_sizes, check_text, check_value_types
from graphopt.ir.onnx_external import (
    ExternalValues,
    Source,
    check_external_data,
    is_external,
    model_tensors,
    reference,
)
from graphopt.paths import require_regular

PROTOBUF_LIMIT = 2**31 - 1

# -- reading ------------------------------------------------------------------------------------------------------
def parse_model(path: str) -> onnx.ModelProto:
    """The ModelProto at ``path``, without external data; ModelLoadError for a file that is not one."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file (check the path)")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file (give the .onnx file)")
    require_regular(path, "model")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or exc}) (check its permissions)") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        hint = ("over protobuf's 2 GB limit: save the weights as external data" if len(data) > PROTOBUF_LIMIT
                else "truncated or not ONNX?")
        raise ModelLoadError(f"{path}: not a readable ONNX model ({first_line(exc)}) ({hint})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph, no outputs; is it an ONNX file?)")
    check_text(model, path)
    if not model.graph.output:  # onnx's checker lets it through; nothing can run it
        raise ModelLoadError(f"{path}: the graph has no outputs, so it computes nothing (re-export the model with "
                             f"its outputs)")
    return model


def external_data_files(model_path: str) -> list[str]:
    """The real paths of the data files the model at ``model_path`` reads, each validated as
    :func:`check_external_data` does (so no output can be written over them)."""
    model = parse_model(os.fspath(model_path))
    return sorted({s.path for s in check_external_data(model, os.fspath(model_path)).values()})


def check_versions(model: onnx.ModelProto, where: str) -> None:
    """UnsupportedError for an IR version or a standard opset newer than the installed onnx knows."""
    known_ir = onnx.IR_VERSION
    if model.ir_version > known_ir:
        raise UnsupportedError(f"{where}: IR version {model.ir_version} is newer than onnx {onnx.__version__} knows "
                               f"(up to {known_ir}) (upgrade onnx, or re-export the model for an older IR)")
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        known = [v for (d, v) in onnx.helper.OP_SET_ID_VERSION_MAP if d == (domain or "ai.onnx")]
        if known and opset.version > max(known):
            name = f"opset {opset.version}" if not domain else f"{domain} opset {opset.version}"
            raise UnsupportedError(f"{where}: {name} is newer than onnx {onnx.__version__} knows (up to "
                                   f"{max(known)}) (re-export the model at opset {max(known)} or lower, or upgrade "
                                   f"onnx and onnxruntime)")


def read_model(path: str) -> tuple[onnx.ModelProto, dict[tuple, Source]]:
    """Parse, version-check, validate the external data of, and run the onnx checker on the model at ``path``.
    External tensors that graphsurgeon would not import as Constants of their own are read in here (after
    validation); the rest stay on disk, described by the returned sources."""
    model = parse_model(path)
    check_versions(model, path)
    sources = check_external_data(model, path)
    check_tensor_sizes(model, path)
    check_value_types(model, path)
    try:
        onnx.checker.check_model(path)  # by path: it checks the external data references, no 2 GB limit
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"{path}: invalid ONNX graph: {first_line(exc)} (fix or re-export the model)") from None
    for t, own_constant in model_tensors(model):
        if is_external(t) and not own_constant:
            t.raw_data = sources[reference(t)].read()
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    return model, sources


def constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every Constant of ``graph``: its tensors, its nodes' tensor attributes, subgraphs and functions, once each."""
    seen: dict[int, gs.Constant] = {}

    def walk(g) -> None:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                seen.setdefault(id(t), t)
        for node in g.nodes:
            for value in node.attrs.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, gs.Constant):
                        seen.setdefault(id(item), item)
                    elif isinstance(item, gs.Graph):
                        walk(item)

    walk(graph)
    for function in getattr(graph, "functions", []):
        walk(function)
    return list(seen.values())


def attach_sources(graph: gs.Graph, sources: dict[tuple, Source], where: str) -> None:
    """Turn the Constants graphsurgeon imported from external tensors into :class:`ExternalValues`."""
    for const in constants(graph):
        values = const._values
        if isinstance(values, LazyValues) and not isinstance(values, ExternalValues) and is_external(values.tensor):
            key = reference(values.tensor)
            if key not in sources:  # read_model validated every reference it found; this one it did not see
                raise ModelLoadError(f"{where}: tensor '{const.name}' refers to external data that was not checked "
                                     f"(report this with the model)")
            const._values = ExternalValues(values.tensor, sources[key])
            const.data_location = None  # else graphsurgeon exports the values, once read, marked as external


def min_ir_version(opsets) -> int:
    """The lowest IR version onnx pairs with these opsets (unknown domains ignored), and at least 4."""
    return max(4, onnx.helper.find_min_ir_version_for(list(opsets), ignore_unknown=True))


def import_graph(model: onnx.ModelProto, where: str, sources: dict) -> tuple[gs.Graph, dict, list[str]]:
    """``model`` as a graphsurgeon graph (``model`` is not modified), with its external tensors left on disk; the
    default values of graph inputs that have one; and notes on what was changed. IR < 4 (every initializer had
    to be an input): initializers are initializers only and the IR version is raised to what the opsets need.
    IR >= 4: initializers also listed as inputs stay graph inputs, their values kept as defaults."""
    nested = [vi.name for vi in [*model.graph.input, *model.graph.output] if _nested_optional(vi.type)]
    if nested:
        raise UnsupportedError(f"{where}: graph input/output '{nested[0]}' has a type with an optional inside a "
                               f"sequence or map, which onnx-graphsurgeon (graphopt's ONNX IR) cannot carry (give "
                               f"the model tensor, sequence or optional inputs and outputs)")
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise ModelLoadError(f"{where}: onnx-graphsurgeon could not import the model ({first_line(exc)}) "
                             f"(check it with `graphopt verify`; report it if the checker accepts it)") from None
    restore_type_attributes(model.graph, graph)
    attach_sources(graph, sources, where)
    notes: list[str] = []
    inits = {t.name for t in model.graph.initializer}
    listed = [vi for vi in model.graph.input if vi.name in inits]
    defaults = {}
    if model.ir_version < 4:
        graph.ir_version = min_ir_version(model.opset_import)
        notes.append(f"IR version {model.ir_version} -> {graph.ir_version}: {len(listed)} initializer(s) are no "
                     f"longer also listed as graph inputs (IR < 4 required it)")
    elif listed:
        defaults = _inputs_with_defaults(graph, model, listed)
        notes.append(f"{len(listed)} graph input(s) have default values (initializers listed as inputs): kept as "
                     f"inputs, so passes treat them as run-time inputs and do not fold them (re-export without "
                     f"keep_initializers_as_inputs to let them be folded)")
    return graph, defaults, notes + _name_unnamed(graph)


def fresh_name(names: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first not in ``names``, which it is then added to (pass the
    set of the graph's tensor and node names, so new tensors never collide with existing ones)."""
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


def _name_unnamed(graph: gs.Graph) -> list[str]:
    """Name the nodes that have no name (ONNX allows it; hand-built graphs often do) after their first output (the
    name reports showed for them before; node and tensor names are separate namespaces), and rename all but the
    first of nodes that share a name (which onnxruntime refuses to load), so that ``exclude_nodes``, sensitivity
    groups and recipes can name every node, once; a note when it did."""
    seen: set[str] = set()
    unnamed, repeated = [], []
    for node in graph.nodes:
        if not node.name:
            unnamed.append(node)
        elif node.name in seen:
            repeated.append(node)
        seen.add(node.name)
    names = {n.name for n in graph.nodes}
    for node in unnamed:
        node.name = fresh_name(names, node.outputs[0].name if node.outputs else node.op)
    notes = [f"{len(unnamed)} unnamed node(s) named after their first output (e.g. '{unnamed[0].name}'), so that "
             f"options such as exclude_nodes can name them"] if unnamed else []
    if repeated:
        old = repeated[0].name
        for node in repeated:
            node.name = fresh_name(names, node.name)
        notes.append(f"{len(repeated)} node(s) named like an earlier one renamed (e.g. '{old}' -> "
                     f"'{repeated[0].name}'): node names must be unique")
    return notes


def _nested_optional(type_proto, inside: bool = False) -> bool:
    """Whether a value's type has an optional(...) inside a sequence or map (a plain optional is carried: see
    :func:`graphopt.ir.gs_gaps.export_optional_types`)."""
    kind = type_proto.WhichOneof("value")
    if kind == "optional_type":
        return inside
    if kind == "sequence_type":
        return _nested_optional(type_proto.sequence_type.elem_type, True)
    if kind == "map_type":
        return _nested_optional(type_proto.map_type.value_type, True)
    return False


def _inputs_with_defaults(graph: gs.Graph, model: onnx.ModelProto, listed) -> dict:
    """Make the initializers ``listed`` among ``model``'s inputs graph inputs again (graphsurgeon imported them as
    Constants only), typed as the input declares; returns their default values by name."""
    defaults = {}
    tensors = graph.tensors()
    for vi in listed:
        const = tensors.get(vi.name)
        if not isinstance(const, gs.Constant):
            continue
        declared = OnnxImporter.import_tensor(vi)
        defaults[vi.name] = const._values
        const.to_variable(dtype=declared.dtype if declared.dtype is not None else const.dtype,
                          shape=declared.shape if declared.shape is not None else list(const.shape))
        const.type = getattr(declared, "type", "tensor_type")
    order = {vi.name: i for i, vi in enumerate(model.graph.input)}
    graph.inputs = sorted([*graph.inputs, *(tensors[n] for n in defaults)], key=lambda t: order.get(t.name, 0))
    return defaults
