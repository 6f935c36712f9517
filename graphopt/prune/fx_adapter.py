"""Show an FxGraph to the pruning engine and apply its plan.

Torch ops are named in ONNX's vocabulary (``nn.Conv2d`` → ``Conv`` with inputs ``[x, weight, bias]``, ``torch.cat``
→ ``Concat``, ``x.view`` → ``Reshape``, activations → ``Unary``); a module or function it does not know keeps its
type or function name, which has no handler, so the channels reaching it are blocked. Parameters are values
named by their qualified name; shapes come from ShapeProp. Applying a plan replaces parameters and buffers with
sliced ones, updates module attributes (``in_channels``, ``num_features``, ``normalized_shape``, ``groups``, ...),
rewrites literal ints in ``view``/``reshape`` targets and turns a ``chunk`` whose parts changed into a ``split``.
A graph ``torch.export`` captured (ATen ops on ``get_attr`` parameters) is read through :mod:`graphopt.prune.fx_aten`.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from graphopt.ir.fx_graph import _torch
from graphopt.ir.fx_ops import arg, get_attr
from graphopt.ir.identity import storage_key
from graphopt.prune import fx_aten
from graphopt.prune.propagate import internal_reason
from graphopt.prune.view import ChannelView, Plan, PNode

torch = _torch()
nn, F = torch.nn, torch.nn.functional

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh,
                  nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Dropout, nn.Dropout2d, nn.Identity,
                  nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                  nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_UNARY_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.hardswish,
                    F.hardsigmoid, F.dropout, torch.softmax, F.softmax, F.adaptive_avg_pool2d, F.avg_pool2d,
                    F.max_pool2d, torch.exp, torch.sqrt, torch.abs, F.leaky_relu, F.mish}
_UNARY_METHODS = {"relu", "sigmoid", "tanh", "softmax", "contiguous", "exp", "sqrt", "abs", "float", "clone"}
_BINARY = {operator.add: "Add", torch.add: "Add", operator.sub: "Sub", torch.sub: "Sub", operator.mul: "Mul",
           torch.mul: "Mul", operator.truediv: "Div", torch.div: "Div", "add": "Add", "sub": "Sub", "mul": "Mul",
           "div": "Div"}


class FxChannels:
    def __init__(self, graph):
        self.graph = graph
        self.gm = graph.gm
        self.by_name: dict[str, Any] = {}  # PNode name -> fx node
        self.consts: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple] = {}

    # -- values -------------------------------------------------------------------------------------------
    def _value(self, arg, owner: str, i: int) -> str | None:
        """The value name of an fx argument: a node, or a constant made for a Python number."""
        if arg is None:
            return None
        if isinstance(arg, torch.fx.Node):
            if arg.op == "get_attr":
                return self._param(arg.target)
            if arg.op == "call_function" and arg.target is operator.getitem and _is_tuple(arg.args[0]):
                return f"{arg.args[0].name}[{arg.args[1]}]"
            return arg.name
        if isinstance(arg, (int, float, bool)):
            name = f"{owner}#{i}"
            self.consts[name] = np.asarray(arg)
            self.shapes[name] = ()
            return name
        return None

    def _param(self, qualified: str) -> str:
        tensor = get_attr(self.gm, qualified)  # a parameter, a buffer or a constant torch.export lifted
        self.consts[qualified] = tensor.detach().cpu().numpy()
        self.shapes[qualified] = tuple(tensor.shape)
        return qualified

    def _record_shape(self, node) -> None:
        meta = node.meta.get("tensor_meta")
        if meta is None:
            return
        if hasattr(meta, "shape"):
            self.shapes[node.name] = tuple(int(d) for d in meta.shape)
        elif isinstance(meta, (tuple, list)):
            for i, m in enumerate(meta):
                if hasattr(m, "shape"):
                    self.shapes[f"{node.name}[{i}]"] = tuple(int(d) for d in m.shape)

    # -- the view -----------------------------------------------------------------------------------------
    def view(self) -> ChannelView:
        self.graph.infer_shapes()
        nodes, inputs, outputs = [], [], []
        for node in self.gm.graph.nodes:
            self._record_shape(node)
            if node.op == "placeholder":
                inputs.append(node.name)
            elif node.op == "output":
                flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
                outputs += [self._value(a, node.name, i) for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
            elif node.op in ("call_module", "call_function", "call_method"):
                try:
                    pnode = self._describe(node)
                except Exception as exc:  # a node this adapter misreads: the channels reaching it are kept
                    pnode = PNode(node.name, "<unreadable>", self._tensor_args(node), [node.name],
                                  {"internal": f"{internal_reason(exc)} (reading '{node.name}')"})
                if pnode is not None:
                    if pnode.name in self.by_name:
                        pnode.name = f"{pnode.name}@{node.name}"
                    self.by_name[pnode.name] = node
                    nodes.append(pnode)
        return ChannelView(nodes, self.shapes, self.consts, inputs, outputs, "fx")

    def _tensor_args(self, node) -> list[str | None]:
        """Every node among the arguments, also inside lists and keywords (``einsum(eq, [q, k])``): what an op
        without a handler must block."""
        flat = torch.utils._pytree.tree_flatten((node.args, node.kwargs))[0]
        return [self._value(a, node.name, i) for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]

    def _describe(self, node) -> PNode | None:
        val = lambda a, i=0: self._value(a, node.name, i)  # noqa: E731
        out = [node.name]
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if type(mod).__name__ == "GuardsFn":
                return None  # torch.export's checks of the input shapes
            name, x = node.target, val(node.args[0])
            p = lambda attr: self._param(f"{node.target}.{attr}") if getattr(mod, attr, None) is not None else None  # noqa: E731
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return PNode(name, "Conv", [x, p("weight"), p("bias")], out, {"group": mod.groups})
            if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                return PNode(name, "ConvTranspose", [x, p("weight"), p("bias")], out, {"group": mod.groups})
            if isinstance(mod, nn.Linear):
                return PNode(name, "Linear", [x, p("weight"), p("bias")], out)
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                return PNode(name, "BatchNormalization",
                             [x, p("weight"), p("bias"), p("running_mean"), p("running_var")], out)
            if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
                return PNode(name, "LayerNormalization", [x, p("weight"), p("bias")], out,
                             {"axis": -len(mod.normalized_shape)})
            if isinstance(mod, nn.GroupNorm) and mod.affine:
                return PNode(name, "GroupNorm", [x, p("weight"), p("bias")], out, {"num_groups": mod.num_groups})
            if isinstance(mod, nn.Embedding):
                return PNode(name, "Gather", [p("weight"), x], out, {"axis": 0})
            if isinstance(mod, nn.Flatten):
                return PNode(name, "Flatten", [x], out)
            if isinstance(mod, _UNARY_MODULES):
                return PNode(name, "Unary", [x], out)
            return PNode(name, type(mod).__name__, self._tensor_args(node), out)
        target = node.target
        if node.meta.get("tensor_meta") is None:
            return None  # sizes and other Python values: no channels to follow
        if node.op == "call_function" and target is operator.getitem:
            if _is_tuple(node.args[0]):
                return None  # a part of a split/chunk: the split's outputs already name it
            return PNode(node.name, "Index", [val(node.args[0])], out, {"index": node.args[1]})
        if node.op == "call_function" and fx_aten.op_of(target) is not None:
            return fx_aten.describe(self, node)
        x = val(node.args[0]) if node.args else None
        if target in _BINARY:
            return PNode(node.name, _BINARY[target], [val(a, i) for i, a in enumerate(node.args[:2])], out)
        if (node.op == "call_function" and target in _UNARY_FUNCTIONS) or (node.op == "call_method" and
                                                                          target in _UNARY_METHODS):
            return PNode(node.name, "Unary", [x], out)
        if target in (torch.cat, torch.concat):
            return PNode(node.name, "Concat", [val(a, i) for i, a in enumerate(node.args[0])], out,
                         {"axis": arg(node, 1, "dim", 0)})
        if target is F.scaled_dot_product_attention:
            return PNode(node.name, "ScaledDotProductAttention", [val(a, i) for i, a in enumerate(node.args[:3])],
                         out, {"scale": node.kwargs.get("scale")})
        if target in (torch.matmul, operator.matmul, torch.bmm, "matmul"):
            return PNode(node.name, "MatMul", [x, val(node.args[1], 1)], out)
        if target in (torch.flatten, "flatten", "view", "reshape", torch.reshape, "unsqueeze", "squeeze",
                      torch.unsqueeze, torch.squeeze):
            pnode = PNode(node.name, "Reshape" if target in ("view", "reshape", torch.reshape) else "Flatten", [x], out)
            if pnode.op == "Reshape":
                dims = node.args[1:] if not isinstance(arg(node, 1, "shape"), (tuple, list)) else node.args[1]
                name = f"{node.name}#shape"
                self.consts[name] = np.array([d if isinstance(d, int) else 0 for d in dims], dtype=np.int64)
                pnode.inputs.append(name)
            return pnode
        if target in ("permute", torch.permute, "transpose", torch.transpose):
            rank = len(self.shapes[node.args[0].name])
            if target in ("transpose", torch.transpose):
                perm = list(range(rank))
                a, b = node.args[1] % rank, node.args[2] % rank
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm = list(node.args[1]) if isinstance(arg(node, 1, "dims"), (tuple, list)) else list(node.args[1:])
            return PNode(node.name, "Transpose", [x], out, {"perm": [p % rank for p in perm]})
        if target in ("mean", torch.mean, "sum", torch.sum):
            dims = arg(node, 1, "dim")
            return PNode(node.name, "ReduceMean", [x], out, {"axes": [dims] if isinstance(dims, int) else dims,
                                                             "keepdims": int(bool(arg(node, 2, "keepdim", False)))})
        if target in ("chunk", torch.chunk, "split", torch.split):
            parts = len(node.meta["tensor_meta"])
            return PNode(node.name, "Split", [x], [f"{node.name}[{i}]" for i in range(parts)],
                         {"axis": arg(node, 2, "dim", 0)})
        if target in ("expand", "expand_as"):
            return PNode(node.name, "Expand", [x], out)
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        return PNode(node.name, name, self._tensor_args(node), out)

    # -- applying a plan ----------------------------------------------------------------------------------
    def fork(self) -> "FxChannels":
        """An adapter over a copy of the graph as :meth:`view` saw it (same node names), to apply a plan to."""
        twin = FxChannels(self.graph.copy())
        by_name = {node.name: node for node in twin.gm.graph.nodes}
        twin.by_name = {name: by_name[node.name] for name, node in self.by_name.items()}
        return twin

    def apply(self, plan: Plan) -> None:
        replaced: dict[tuple, tuple] = {}  # the old weight's storage -> (old, new): a weight tied to others stays tied
        for qualified, array in plan.consts.items():
            owner_name, _, attr = qualified.rpartition(".")
            owner = self.gm.get_submodule(owner_name) if owner_name else self.gm
            old = getattr(owner, attr)
            new = torch.from_numpy(np.ascontiguousarray(array)).to(old.dtype)
            if storage_key(old) in replaced:  # the same weight under another name (an embedding tied to the classifier)
                twin = replaced[storage_key(old)][1]
                if twin.shape != new.shape or not torch.equal(twin.data, new):
                    raise ValueError(f"'{qualified}' is a weight tied to another that this plan prunes differently")
                setattr(owner, attr, twin)
            elif isinstance(old, nn.Parameter):
                replaced[storage_key(old)] = (old, nn.Parameter(new, requires_grad=old.requires_grad))
                setattr(owner, attr, replaced[storage_key(old)][1])
            elif attr in owner._buffers:
                owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)
            else:  # a plain tensor attribute (a constant torch.export lifted)
                setattr(owner, attr, new)
        for (name, key), value in plan.attrs.items():
            node = self.by_name[name]
            if node.op == "call_function" and fx_aten.op_of(node.target) is not None:
                if not fx_aten.apply_edit(node, key, value):
                    raise ValueError(f"the FX pruning adapter cannot set '{key}' on '{name}'")
            elif key == "group":
                self.gm.get_submodule(node.target).groups = int(value)
            elif key == "shape":
                dims = list(node.args[1]) if isinstance(arg(node, 1, "shape"), (tuple, list)) else list(node.args[1:])
                dims = [int(v) if isinstance(d, int) else d for d, v in zip(dims, value)]
                packed = isinstance(arg(node, 1, "shape"), (tuple, list))
                node.args = (node.args[0], tuple(dims)) if packed else (node.args[0], *dims)
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "shape"}
            elif key == "scale":  # scaled_dot_product_attention keeps the scale of the head size it had
                node.kwargs = {**node.kwargs, "scale": float(value)}
            elif key == "split":
                node.target, node.op = "split", "call_method"
                node.args, node.kwargs = (node.args[0], [int(v) for v in value]), {"dim": arg(node, 2, "dim", 0)}
            else:
                raise ValueError(f"the FX pruning adapter cannot set '{key}' on '{name}'")
        for name, param in self.gm.named_parameters(remove_duplicate=False):  # a tied weight's every name
            if storage_key(param) in replaced:
                raise ValueError(f"'{name}' is a weight tied to one this plan prunes, and is not pruned with it")
        for module in self.gm.modules():
            _fix_sizes(module)
        fx_aten.fix_sizes(self.gm)
        self.gm.recompile()

    def check(self, view: ChannelView) -> None:
        self.graph.verify()
        self.graph.infer_shapes()
        outputs = self.graph.run(self.graph.sample_inputs())
        for name, out in zip(view.outputs, outputs):
            if view.shapes.get(name) not in (None, tuple(out.shape)):
                raise ValueError(f"output '{name}' changed shape {view.shapes[name]} -> {tuple(out.shape)}")

    def gradients(self, calibration, batches: int = 8) -> dict[str, np.ndarray]:
        """d loss / d parameter over a few calibration batches: cross-entropy against the model's own top-1
        for a (batch, classes) output, else half the squared output."""
        names = self.graph.input_names()
        self.gm.zero_grad()
        for i, batch in enumerate(calibration.batches()):
            if i == batches:
                break
            out = self.gm(*[torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names])
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.dim() == 2:
                loss = F.cross_entropy(out, out.detach().argmax(1))
            else:
                loss = 0.5 * out.pow(2).mean()
            loss.backward()
        grads = {n: p.grad.detach().numpy().copy() for n, p in self.gm.named_parameters() if p.grad is not None}
        self.gm.zero_grad()
        return grads


def _is_tuple(node) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return isinstance(meta, (tuple, list)) and not hasattr(meta, "shape")  # TensorMetadata is a NamedTuple


def _fix_sizes(module) -> None:
    """Module attributes that describe parameter shapes, after the parameters were sliced."""
    w = getattr(module, "weight", None)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        module.num_features = (w if w is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.LayerNorm) and w is not None:
        module.normalized_shape = tuple(w.shape)
    elif isinstance(module, nn.GroupNorm) and w is not None:
        module.num_channels = w.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = w.shape[1]
