"""The layer machinery of the sparsity passes (``sparsify``, ``sparsify-2-4``): which weights they may zero and how
the zeros are written, on both IRs; each pass only chooses which weights are zero after it.

- :class:`OnnxWeights` / :class:`FxWeights` find the weighted layers (ONNX Conv, ConvTranspose, Gemm, MatMul on a
  constant weight; FX conv / conv-transpose / linear modules and function calls on a parameter), each weight's
  reduction (input-channel) axis, and the classifier (the layers nearest a graph output), and write new values
  back (in place, or into a copy where the weight is also read by something left dense).
- :func:`sparsify` applies the common options (``ignore``, ``include_classifier``, ``min_params``), groups the
  readers of a shared weight into one :class:`Layer`, asks the pass's ``choose`` for the zeros, writes them and
  builds the result: the per-layer rows in ``ctx.state["sparsity"]``, the notes and the stats.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.fx_graph import fresh_attr
from graphopt.ir.fx_ops import arg, get_attr, layer_call, set_arg
from graphopt.ir.onnx_graph import fresh_name
from graphopt.ir.ops import OpKind
from graphopt.passes.base import Pass, PassResult
from graphopt.passes.options import name_matches

SPARSIFIED = "sparsified layers"
ZEROED = "zeroed weights"
STATE_KEY = "sparsity"  # ctx.state[STATE_KEY]: one row per sparsified layer (see the pass docstrings)

ONNX_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Why a layer stays dense; the result's notes list the layers under each.
CLASSIFIER = "the classifier (nearest a graph output; include_classifier=true sparsifies it)"
IGNORED = "in ignore"
NOT_FLOAT = "weight not a float constant (computed, quantized or integer)"


# -- for the passes' choice of zeros ---------------------------------------------------------------------------------
def magnitudes(values: np.ndarray, dtype=None) -> np.ndarray:
    """|w| in a type that holds every value exactly (float16/bfloat16 in float32)."""
    dtype = dtype or (values.dtype if values.dtype in (np.float32, np.float64) else np.float32)
    return np.abs(values.astype(dtype, copy=False))


# -- layers -----------------------------------------------------------------------------------------------------------
def check_common_options(options) -> None:
    """Check the options every sparsity pass has (``ignore``, ``min_params``); for an Options' ``__post_init__``."""
    if options.min_params < 0:
        raise ValueError(f"min_params must be 0 or more, got {options.min_params}")
    if any(not item for item in options.ignore):
        raise ValueError("ignore has an empty item (items are joined with '+')")


@dataclass
class Site:
    """One op reading a weight."""

    node: Any  # the ONNX node / FX node
    name: str  # ONNX node name; FX module path (a function call: its weight's path, less any ".weight")
    op: str  # ONNX op type; torch module class or function name
    key: int  # id() of the weight: sites with one key share one weight
    axis: int  # the weight's reduction (input-channel) axis
    run: int  # the reduction's length within one convolution group
    aliases: tuple[str, ...] = ()  # other names `ignore` matches: ONNX weight name, FX node name
    classifier: bool = False


@dataclass
class Layer:
    """One weight and the sites that read it and are sparsified."""

    name: str
    op: str
    key: int
    sites: list[Site]
    values: np.ndarray  # the weight's values as they are now (read only)
    axis: int = 0
    run: int = 0


@dataclass
class Weights:
    """What an IR adapter finds: the sites, the weights' values by key, layers whose weight is unusable."""

    graph: Any = None
    sites: list[Site] = field(default_factory=list)
    values: dict[int, np.ndarray] = field(default_factory=dict)
    unusable: list[str] = field(default_factory=list)

    def write(self, layer: Layer, zeros: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """After the last write."""


def sparsify(pass_: Pass, weights: Weights, ctx, choose: Callable[[list[Layer]], list[np.ndarray]],
             skip: Callable[[Layer], str | None] | None = None) -> PassResult:
    """Pick the layers, ask ``choose`` which weights are zero after the pass, write the changed ones, report."""
    options = pass_.options
    used: set[str] = set()
    dense: dict[str, list[str]] = defaultdict(list)
    by_key: dict[int, list[Site]] = {}
    for site in weights.sites:
        hits = {item for item in options.ignore if any(name_matches(item, n) for n in (site.name, *site.aliases))}
        used |= hits
        if hits:
            dense[IGNORED].append(site.name)
        elif site.classifier and not options.include_classifier:
            dense[CLASSIFIER].append(site.name)
        elif weights.values[site.key].size < options.min_params:
            dense[f"under min_params={options.min_params} weights"].append(site.name)
        else:
            by_key.setdefault(site.key, []).append(site)
    unmatched = [item for item in options.ignore if item not in used]
    if unmatched:
        ctx.warn(f"{pass_.name}: ignore matches no layer: {', '.join(unmatched)}")
    if weights.unusable:
        dense[NOT_FLOAT] += weights.unusable

    layers = []
    for key, sites in by_key.items():
        layer = Layer("+".join(dict.fromkeys(s.name for s in sites)), "+".join(dict.fromkeys(s.op for s in sites)),
                      key, sites, weights.values[key], sites[0].axis, sites[0].run)
        why = skip(layer) if skip else None
        if why:
            dense[why].append(layer.name)
        else:
            layers.append(layer)

    rows, changed, zeroed = [], 0, 0
    for layer, zeros in zip(layers, choose(layers)):
        values = layer.values
        before = int(np.count_nonzero(values == 0))
        new = int(np.count_nonzero(zeros & (values != 0)))
        if new:
            weights.write(layer, zeros)
            changed, zeroed = changed + 1, zeroed + new
        after = before + new
        rows.append({"layer": layer.name, "op": layer.op, "params": int(values.size), "zeros_before": before,
                     "zeros_after": after, "sparsity": after / values.size})
    if changed:
        weights.finish()
    ctx.state[STATE_KEY] = rows

    notes = []
    if rows:
        total = sum(r["params"] for r in rows)
        layers_ = f"{len(rows)} layer{'s' if len(rows) > 1 else ''}"
        notes.append(f"{sum(r['zeros_after'] for r in rows) / total:.1%} zeros over {layers_} ({total:,} weights)")
        notes += [f"{r['layer']}: {r['sparsity']:.1%} zeros" for r in rows]
    notes += [f"left dense, {why}: {', '.join(names)}" for why, names in dense.items()]
    stats = {SPARSIFIED: changed, ZEROED: zeroed} if changed else {}
    return PassResult(weights.graph, changed > 0, stats, notes)


# -- ONNX --------------------------------------------------------------------------------------------------------------
class OnnxWeights(Weights):
    """Conv / ConvTranspose / Gemm / MatMul reading a float constant as input B.

    Reduction axis (for 2:4): Conv weight (O, I/g, k...) -> 1; ConvTranspose (I, O/g, k...) -> 0, I/g per group;
    Gemm B (K, N) -> 0, with transB (N, K) -> 1; MatMul B (..., K, N) -> -2.
    """

    def __init__(self, graph):
        super().__init__()
        self.graph, self.folded = graph, False
        self.tensors: dict[int, gs.Tensor] = {}
        self.names = set(graph.gs.tensors()) | {n.name for n in graph.gs.nodes}
        layer_nodes = set()
        for node in graph.gs.nodes:
            if node.domain not in ("", "ai.onnx", None) or node.op not in ONNX_LAYER_OPS or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            values = graph.constant_value(w)
            if node.op == "MatMul" and (values is None or values.ndim < 2):
                continue  # both inputs activations (attention), or a vector: not a layer
            layer_nodes.add(id(node))
            name = node.name or node.outputs[0].name
            if values is None or values.dtype.kind != "f" or values.size == 0 or values.ndim < 2:
                self.unusable.append(name)
                continue
            axis, run = _onnx_axis(node, values.shape)
            self.sites.append(Site(node, name, node.op, id(w), axis, run, (w.name,)))
            self.values[id(w)], self.tensors[id(w)] = values, w
        near = _nearest_output(graph.gs.outputs, lambda t: t.inputs, lambda n: n.inputs, layer_nodes)
        for site in self.sites:
            site.classifier = id(site.node) in near

    def write(self, layer: Layer, zeros: np.ndarray) -> None:
        w = self.tensors[layer.key]
        new = np.where(zeros, np.zeros((), layer.values.dtype), layer.values)
        ours = {id(s.node) for s in layer.sites}
        exclusive = all(id(n) in ours for n in w.outputs) and not any(o is w for o in self.graph.gs.outputs)
        if exclusive and isinstance(w, gs.Constant):
            w.values = new  # a new array in this graph's own Constant: the name stays
        elif exclusive and self.graph.fold_to_constant(w.inputs[0], new):  # a Constant node's output
            self.folded = True
        else:  # also read by something left dense: the sparsified layers get their own copy
            constant = gs.Constant(fresh_name(self.names, f"{w.name}_sparse"), new)
            for site in layer.sites:
                site.node.inputs[1] = constant

    def finish(self) -> None:
        if self.folded:
            self.graph.gs.cleanup()


def _onnx_axis(node, shape: tuple) -> tuple[int, int]:
    if node.op == "Conv":
        return 1, shape[1]
    if node.op == "ConvTranspose":
        return 0, shape[0] // max(int(node.attrs.get("group", 1)), 1)
    if node.op == "Gemm":
        return (1, shape[1]) if int(node.attrs.get("transB", 0)) else (0, shape[0])
    return len(shape) - 2, shape[-2]


def _nearest_output(outputs, producers, inputs, layer_ids: set[int]) -> set[int]:
    """ids of the layers reached walking back from the graph outputs without passing another layer."""
    found, seen, stack = set(), set(), list(outputs)
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        for node in producers(value):
            if id(node) in layer_ids:
                found.add(id(node))
            else:
                stack.extend(inputs(node))
    return found


# -- FX ----------------------------------------------------------------------------------------------------------------
class FxWeights(Weights):
    """``nn.Conv*d`` / ``nn.ConvTranspose*d`` / ``nn.Linear`` calls, and conv / conv_transpose / linear function
    calls (``F.*``, ATen) whose weight is a ``get_attr``.

    Reduction axis (for 2:4): Conv weight (O, I/g, k...) -> 1; ConvTranspose (I, O/g, k...) -> 0, I/g per group;
    Linear (out, in) -> 1.
    """

    def __init__(self, graph):
        import torch

        super().__init__()
        self.graph, self.gm, self.rewired = graph, graph.gm, False
        self.tensors: dict[int, Any] = {}
        nn = torch.nn
        layer_nodes = set()
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                kind = graph.kind(node)
                if kind not in (OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.GEMM):
                    continue
                mod = self.gm.get_submodule(node.target)
                weight, groups, name = getattr(mod, "weight", None), getattr(mod, "groups", 1), node.target
                op, aliases = type(mod).__name__, (node.name,)
            elif (layer := layer_call(node)) is not None:
                kind, names = layer
                kind = kind or OpKind.CONV  # an aten.convolution whose ``transposed`` is not a constant
                read = arg(node, names, "weight")
                groups = arg(node, names, "groups", 1)
                weight = get_attr(self.gm, read.target) if getattr(read, "op", None) == "get_attr" else None
                path = read.target if weight is not None else ""
                name = (path[: -len(".weight")] if path.endswith(".weight") else path) or node.name
                op, aliases = getattr(node.target, "__name__", str(node.target)), (node.name, path)
            else:
                continue
            layer_nodes.add(id(node))
            if not (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() >= 2
                    and weight.numel() > 0 and not isinstance(weight, nn.parameter.UninitializedParameter)):
                self.unusable.append(node.target if node.op == "call_module" else node.name)
                continue
            shape = tuple(weight.shape)
            groups = groups if isinstance(groups, int) and groups > 0 else 1
            axis, run = (0, shape[0] // groups) if kind == OpKind.CONV_TRANSPOSE else (1, shape[1])
            self.sites.append(Site(node, name, op, id(weight), axis, run, aliases))
            if id(weight) not in self.values:
                t = weight.detach().cpu()
                ok = t.dtype in (torch.float16, torch.float32, torch.float64)
                self.values[id(weight)] = (t if ok else t.float()).numpy()
                self.tensors[id(weight)] = weight
        output = [n for n in self.gm.graph.nodes if n.op == "output"]
        near = _nearest_output([a for n in output for a in n.all_input_nodes], lambda n: [n],
                               lambda n: n.all_input_nodes, layer_nodes)
        for site in self.sites:
            site.classifier = id(site.node) in near

    def write(self, layer: Layer, zeros: np.ndarray) -> None:
        import torch

        w = self.tensors[layer.key]
        mask = torch.from_numpy(zeros).to(w.device)
        ours = {s.node for s in layer.sites}
        if all(reader in ours for reader in self._readers(w)):
            with torch.no_grad():
                w.masked_fill_(mask, 0)  # this pass's own module: the caller's model was copied
            return
        new = w.detach().clone().masked_fill_(mask, 0)
        if isinstance(w, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=w.requires_grad)
        attr = None
        for site in layer.sites:
            if site.node.op == "call_module":
                setattr(self.gm.get_submodule(site.node.target), "weight", new)
                continue
            if attr is None:
                attr = fresh_attr(self.gm, site.name.replace(".", "_") + "_weight_sparse")
                (self.gm.register_parameter if isinstance(new, torch.nn.Parameter) else self.gm.register_buffer)(
                    attr, new)
            with self.gm.graph.inserting_before(site.node):
                read = self.gm.graph.get_attr(attr)
            set_arg(site.node, layer_call(site.node)[1], "weight", read)
            self.rewired = True

    def _readers(self, w) -> list:
        """The nodes that read tensor ``w``: calls of a module that owns it, users of a ``get_attr`` of it."""
        paths = [p for p, t in [*self.gm.named_parameters(remove_duplicate=False),
                                *self.gm.named_buffers(remove_duplicate=False)] if t is w]
        owners = [p.rpartition(".")[0] for p in paths]
        readers = []
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and any(o == node.target or o.startswith(node.target + ".") for o in owners):
                readers.append(node)
            elif node.op == "get_attr" and node.target in paths:
                readers += list(node.users)
        return readers

    def finish(self) -> None:
        if self.rewired:
            for node in list(self.gm.graph.nodes):
                if node.op == "get_attr" and not node.users:
                    self.gm.graph.erase_node(node)
            self.gm.graph.lint()
            self.gm.recompile()
