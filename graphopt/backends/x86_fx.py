"""The x86 backend's fx engines: a PT2E Q/DQ graph run on torch's deprecated eager quantized kernels, for comparison.

The graph graphopt quantizes for x86 (``quantized_decomposed`` Q/DQ ops around ATen ``conv2d`` / ``linear``, uint8
activations, int8 weights behind ``dequantize_per_channel``) is lowered to the native ops the way ``convert_fx``
lowers its reference model (``torch/ao/quantization/fx/_lower_to_native_backend.py``), on
``torch.backends.quantized.engine`` = ``x86`` / ``fbgemm`` / ``onednn``:

- ``dq -> conv2d / linear -> [relu | hardtanh] -> q`` becomes ``quantized.conv2d[_relu]`` / ``linear[_relu]`` with
  prepacked weights (a hardtanh is applied on the quantized output);
- ``dq -> conv2d -> add(., dq(r)) -> [relu] -> q`` (the x86 scheme's fused residual Add) becomes
  ``quantized.conv2d_add[_relu]`` on onednn; x86 and fbgemm have no conv + add kernel, so there the conv's output is
  quantized with a scale observed on the example inputs (the Q/DQ graph has none) and added by
  ``quantized.add[_relu]``;
- ``add(dq(a), dq(b)) -> [relu] -> q`` becomes ``quantized.add[_relu]``;
- max / average / adaptive pooling, mean, flatten, view, reshape, relu, hardtanh and cat (inputs of one scale) run on
  the quantized tensor (``dq -> op -> q`` of the same scale);
- a Linear whose output stays float becomes ``quantized.linear_with_input_q_dq_qweight_dq_output_fp32`` on x86 /
  fbgemm; anything else keeps its Q/DQ semantics in float (dequantized weights) and is listed in the notes.
"""

from __future__ import annotations

import operator
from collections import Counter

from graphopt.ir.fx_ops import get_attr


def lower_fx(gm, engine: str, example_inputs):
    """``(module, notes)``: ``gm`` (a Q/DQ GraphModule, not modified) lowered to ``engine``'s eager quantized
    kernels; ``notes`` say what stayed float and why."""
    import torch

    from graphopt.quiet import quiet_torch_logs

    old_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # packed weights are made for the engine that packs them
    try:
        with quiet_torch_logs():
            lowering = _Lowering(gm, engine, example_inputs)
            module = lowering.run()
    finally:
        torch.backends.quantized.engine = old_engine
    notes = [f"{n} {what}" for what, n in sorted(lowering.floats.items())]
    return module, notes


class _Lowering:
    def __init__(self, gm, engine: str, example_inputs):
        import torch

        self.torch, self.gm, self.engine, self.example_inputs = torch, gm, engine, example_inputs
        ops, qd = torch.ops.aten, torch.ops.quantized_decomposed
        self.Q, self.DQ, self.DQ_CHANNEL = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default, \
            qd.dequantize_per_channel.default
        self.CONV, self.LINEAR = ops.conv2d.default, ops.linear.default
        self.ACTS = {ops.relu.default, ops.relu_.default, ops.hardtanh.default, ops.hardtanh_.default}
        self.ADDS = {ops.add.Tensor, operator.add}
        self.PASSTHROUGH = {ops.max_pool2d.default, ops.avg_pool2d.default, ops.adaptive_avg_pool2d.default,
                            ops.mean.dim, ops.flatten.using_ints, ops.view.default, ops.reshape.default,
                            ops.relu.default, ops.hardtanh.default}
        self.CAT = ops.cat.default
        self.graph = torch.fx.Graph()
        self.env, self.qenv, self.floats = {}, {}, Counter()
        self.attrs: dict[str, object] = {}
        self.observed: dict = {}

    # -- pattern helpers ------------------------------------------------------------------------------------
    def qparams(self, node):
        """(scale, zero point) of a uint8 quantize / dequantize node with constant parameters, else None."""
        if node.op != "call_function" or node.target not in (self.Q, self.DQ) or len(node.args) < 6:
            return None
        _, scale, zp, _, _, dtype = node.args[:6]
        ok = dtype == self.torch.uint8 and isinstance(scale, float) and isinstance(zp, int)
        return (scale, zp) if ok else None

    def source_q(self, node):
        """The quantize node a ``dequantize`` of the same parameters reads, or None."""
        if self.qparams(node) is None or node.target != self.DQ:
            return None
        q = node.args[0]
        return q if isinstance(q, self.torch.fx.Node) and self.qparams(q) == self.qparams(node) else None

    def weight(self, node):
        """The quantized weight (qint8, per channel on axis 0 or per tensor) a dequantize node reads, or None."""
        torch = self.torch
        if node.op != "call_function" or node.target not in (self.DQ_CHANNEL, self.DQ) or len(node.args) < 6:
            return None
        w = node.args[0]
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr") or node.args[-1] != torch.int8:
            return None
        value = get_attr(self.gm, w.target)
        if node.target == self.DQ:
            scale, zp = node.args[1:3]
            return torch._make_per_tensor_quantized_tensor(value, float(scale), int(zp))
        scales, zps, axis = (get_attr(self.gm, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args[1:4])
        if axis != 0:
            return None
        return torch._make_per_channel_quantized_tensor(value, scales.double(), zps.long(), 0)

    def only_user(self, node, target_set):
        users = list(node.users)
        return users[0] if len(users) == 1 and users[0].op == "call_function" and users[0].target in target_set \
            else None

    def layer(self, node):
        """``(kind, quantized input node, packed weight)`` for a conv2d / linear reading ``dq(q)`` and a quantized
        weight, else None."""
        torch = self.torch
        if node.op != "call_function" or node.target not in (self.CONV, self.LINEAR):
            return None
        args = list(node.args) + [None] * 7
        q, qweight = (self.source_q(args[0]) if isinstance(args[0], torch.fx.Node) else None), \
            (self.weight(args[1]) if isinstance(args[1], torch.fx.Node) else None)
        if q is None or qweight is None:
            return None
        bias = get_attr(self.gm, args[2].target) if isinstance(args[2], torch.fx.Node) else None
        if node.target == self.LINEAR:
            return "linear", q, torch.ops.quantized.linear_prepack(qweight, bias)
        stride, padding, dilation, groups = (args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], args[6] or 1)
        return "conv", q, torch.ops.quantized.conv2d_prepack(qweight, bias, stride, padding, dilation, groups)

    # -- emitting ---------------------------------------------------------------------------------------------
    def constant(self, value) -> object:
        name = f"_x86_{len(self.attrs)}"
        self.attrs[name] = value
        return self.graph.get_attr(name)

    def call(self, target, *args):
        return self.graph.call_function(target, tuple(args))

    def value(self, node):
        """The float value of an old node in the new graph, emitted when first asked for: a dequantize of a
        lowered quantize, a conv / linear whose output stays float (:meth:`float_layer`), or a copy."""
        if not isinstance(node, self.torch.fx.Node):
            return node
        if node not in self.env:
            q = self.source_q(node)
            if q is not None and q in self.qenv:
                self.env[node] = self.graph.call_method("dequantize", (self.qenv[q],))
            elif node in self.qenv:  # read as it is: the uint8 values
                self.env[node] = self.graph.call_method("int_repr", (self.qenv[node],))
            elif node.op == "call_function" and node.target in (self.CONV, self.LINEAR) and self.layer(node):
                self.env[node] = self.float_layer(node)
            else:
                self.env[node] = self.graph.node_copy(node, self.value)
        return self.env[node]

    def run(self):
        """Quantize nodes in graph order (each one a fused kernel where it ends a pattern); the nodes a pattern may
        absorb (dequantize, conv, linear, activations, adds, pooling) only when a float consumer asks for them."""
        deferred = {self.DQ, self.DQ_CHANNEL, self.CONV, self.LINEAR, self.CAT} | self.ACTS | self.ADDS | \
            self.PASSTHROUGH
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and node.target == "_guards_fn" or node.op == "get_attr":
                continue
            if node.op == "call_function" and node.target == self.Q and self.qparams(node) is not None:
                self.qenv[node] = self.lower_q(node)
            elif not (node.op == "call_function" and node.target in deferred):
                self.value(node)  # placeholders in order, float ops, the output
        self.graph.eliminate_dead_code()
        self.graph.lint()
        owned = {n.target: self.attrs[n.target] if n.target in self.attrs else get_attr(self.gm, n.target)
                 for n in self.graph.nodes if n.op in ("get_attr", "call_module")}
        return self.torch.fx.GraphModule(owned, self.graph)

    def lower_q(self, q):
        """The quantized tensor a uint8 quantize node gives: a fused kernel when its input is a pattern above,
        else the float value quantized."""
        torch, (scale, zp) = self.torch, self.qparams(q)
        x = q.args[0]
        act = x if x.op == "call_function" and x.target in self.ACTS and len(x.users) == 1 else None
        core = act.args[0] if act is not None else x
        relu = act is not None and act.target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
        if len(core.users) == 1:
            fused = self.fused(core, scale, zp, relu)
            if fused is not None:
                return self.call(torch.ops.aten.hardtanh.default, fused, *act.args[1:]) if act is not None and \
                    not relu else fused
        passthrough = self.passthrough(x, scale, zp)
        if passthrough is not None:
            return passthrough
        return self.call(torch.quantize_per_tensor, self.value(x), scale, zp, torch.quint8)

    def fused(self, core, scale: float, zp: int, relu: bool):
        torch, qops = self.torch, self.torch.ops.quantized
        if core.op != "call_function":
            return None
        if core.target in (self.CONV, self.LINEAR):
            found = self.layer(core)
            if found is None:
                return None
            kind, q_in, packed = found
            op = {("conv", False): qops.conv2d, ("conv", True): qops.conv2d_relu,
                  ("linear", False): qops.linear, ("linear", True): qops.linear_relu}[kind, relu]
            return self.call(op, self.qenv[q_in], self.constant(packed), scale, zp)
        if core.target not in self.ADDS or len(core.args) != 2 or core.kwargs:
            return None
        a, b = core.args
        qa, qb = (self.source_q(n) if isinstance(n, torch.fx.Node) else None for n in (a, b))
        if qa is not None and qb is not None:
            op = qops.add_relu if relu else qops.add
            return self.call(op, self.qenv[qa], self.qenv[qb], scale, zp)
        conv, q_res = (b, qa) if qa is not None else (a, qb)
        if q_res is None or not isinstance(conv, torch.fx.Node) or len(conv.users) != 1 or conv.target != self.CONV:
            return None
        found = self.layer(conv)
        if found is None:
            return None
        _, q_in, packed = found
        if self.engine == "onednn":
            op = qops.conv2d_add_relu if relu else qops.conv2d_add
            return self.call(op, self.qenv[q_in], self.qenv[q_res], self.constant(packed), scale, zp)
        conv_scale, conv_zp = self.observe(conv)
        self.floats["conv output(s) before a residual Add quantized with scales observed on the example inputs "
                    f"({self.engine} has no conv + add kernel)"] += 1
        out = self.call(qops.conv2d, self.qenv[q_in], self.constant(packed), conv_scale, conv_zp)
        return self.call(qops.add_relu if relu else qops.add, out, self.qenv[q_res], scale, zp)

    def passthrough(self, x, scale: float, zp: int):
        """``dq -> op -> q`` for an op that runs on quantized tensors: the op on the quantized input."""
        torch = self.torch
        if x.op != "call_function" or len(x.users) != 1:
            return None
        if x.target in self.PASSTHROUGH and isinstance(x.args[0], torch.fx.Node):
            q_in = self.source_q(x.args[0])
            if q_in is None or q_in not in self.qenv:
                return None
            out = self.call(x.target, self.qenv[q_in], *x.args[1:])
            same = self.qparams(q_in) == (scale, zp)
        elif x.target == self.CAT:
            sources = [self.source_q(n) for n in x.args[0]]
            if any(s is None or s not in self.qenv for s in sources):
                return None
            out = self.call(x.target, [self.qenv[s] for s in sources], *x.args[1:])
            same = all(self.qparams(s) == (scale, zp) for s in sources)
        else:
            return None
        if same:  # these ops keep their input's scale
            return out
        return self.call(torch.quantize_per_tensor, self.graph.call_method("dequantize", (out,)), scale, zp,
                         torch.quint8)

    def float_layer(self, node):
        """A conv2d / linear on a quantized input whose output stays float: fbgemm's fp32-output linear, else the
        Q/DQ semantics in float (the weight dequantized once)."""
        torch = self.torch
        kind, q_in, packed = self.layer(node)
        if kind == "linear" and self.engine in ("x86", "fbgemm"):
            scale, zp = self.qparams(q_in)
            op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
            return self.call(op, self.value(node.args[0]), scale, zp, self.constant(packed))
        self.floats[f"{kind}(s) kept float (output not quantized; {self.engine} has no float-output int8 {kind})"] += 1
        weight = self.constant(self.weight(node.args[1]).dequantize())
        args = [self.value(node.args[0]), weight] + [self.value(a) for a in node.args[2:]]
        return self.graph.call_function(node.target, tuple(args), dict(node.kwargs))

    def observe(self, node) -> tuple[float, int]:
        """uint8 (scale, zero point) covering ``node``'s values on the example inputs (and 0)."""
        torch = self.torch
        if not self.observed:
            values = {}

            class Recorder(torch.fx.Interpreter):
                def run_node(self, n):
                    out = super().run_node(n)
                    if isinstance(out, torch.Tensor) and out.is_floating_point():
                        values[n.name] = (float(out.min()), float(out.max()))
                    return out

            with torch.no_grad():
                Recorder(self.gm).run(*self.example_inputs)
            self.observed = values
        lo, hi = self.observed[node.name]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        return scale, int(min(255, max(0, round(-lo / scale))))
