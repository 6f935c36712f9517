"""Placement rules: a static check of a quantized ONNX graph against what a backend fuses or accepts.

A backend lists its rules (:meth:`graphopt.backends.base.Backend.lint_rules`); :func:`lint` runs them on any ONNX
graph — graphopt's, another quantizer's — and returns :class:`Finding` s, each naming the node, the rule, what is
wrong and how to fix it. Nothing here knows a particular backend: a :class:`LintRule` carries its reason, the
documentation passage it rests on (quoted, with where it comes from) and its fix, so the catalogue
(:func:`catalogue`) is generated from the rules themselves. A rule may also offer a *safe* fix
(:meth:`LintRule.fix`): one that keeps the model's meaning (moving a Q/DQ past an op it commutes with) or changes it
only as quantization already does (a scale made wider, a tensor quantized from its calibrated range).

:class:`QdqView` answers the questions every rule asks of a Q/DQ graph (who writes this tensor, is it dequantized,
what are this Q/DQ's scale and zero point) over an onnx-graphsurgeon graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.onnx_graph import OnnxGraph, fresh_name, replace_input

__all__ = ["FixContext", "FixOutcome", "Finding", "LintRule", "QdqView", "apply_fixes", "calibrated_ranges",
           "catalogue", "lint", "summary_line"]

SEVERITIES = ("error", "warning")  # error: the backend rejects the graph; warning: it builds, but slower


@dataclass(frozen=True)
class Finding:
    """One problem at one node: ``rule`` (its id), ``node`` (the ONNX node name), ``message``, ``severity``
    (``"error"``: the backend rejects the graph; ``"warning"``: it builds but does not fuse / runs slower) and the
    ``fix`` to apply."""

    rule: str
    node: str
    message: str
    severity: str
    fix: str

    def line(self) -> str:
        return f"{self.node}: {self.rule}: {self.message} (fix: {self.fix})"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class FixOutcome:
    """What a rule's fix did (``applied``, one line per change) and what it left, with why (``left``)."""

    applied: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


@dataclass
class FixContext:
    """What a fix may need beyond the graph: ``ranges(names)`` -> ``{tensor name: (low, high)}`` from calibration
    data (None when no data was given: fixes that need it say so and leave the node)."""

    ranges: Callable[[Sequence[str]], Mapping[str, tuple[float, float]]] | None = None


class LintRule:
    """One placement rule. Subclasses set the class attributes and implement :meth:`check`.

    ``id`` (short, kebab-case), ``title``, ``severity`` (see :data:`SEVERITIES`), ``reason`` (why it matters, in
    the backend's terms), ``passage`` (the documentation text it rests on, quoted verbatim, or "no passage found;
    rule rests on ..."), ``source`` (where the passage is), ``fix`` (what the user does) and ``fixable`` (whether
    :meth:`fix` applies a safe fix).
    """

    id: str = ""
    title: str = ""
    severity: str = "warning"
    reason: str = ""
    passage: str = ""
    source: str = ""
    fix_text: str = ""
    fixable: bool = False

    def __init__(self, scheme: Any = None, through: Iterable[str] = ()):
        self.scheme = scheme  # the backend's QuantScheme: rules that follow from it read it
        self.through = frozenset(through)  # see QdqView

    def view(self, graph: OnnxGraph) -> "QdqView":
        return QdqView(graph, self.scheme, self.through)

    def check(self, view: "QdqView") -> list[Finding]:
        raise NotImplementedError

    def fix(self, view: "QdqView", context: FixContext) -> FixOutcome:
        return FixOutcome()

    def finding(self, node: gs.Node | str, message: str, fix: str | None = None) -> Finding:
        name = node if isinstance(node, str) else (node.name or f"<{node.op}>")
        return Finding(self.id, name, message, self.severity, fix or self.fix_text)


# -- the questions rules ask ---------------------------------------------------------------------------------------
class QdqView:
    """A Q/DQ graph as rules read it: an :class:`OnnxGraph` (its ``gs`` graph) and the backend's scheme.

    ``through``: op types a DequantizeLinear's value passes through unchanged in kind (data movement: Pad,
    Reshape, Transpose, ...): a tensor written by one of them from a dequantized tensor is itself dequantized for
    :meth:`dequantized`.
    """

    def __init__(self, graph: OnnxGraph, scheme: Any, through: Iterable[str] = ()):
        self.graph = graph
        self.gs = graph.gs
        self.scheme = scheme
        self.through = frozenset(through)
        self.outputs = {t.name for t in self.gs.outputs}
        self._shapes: dict | None = None

    # -- structure
    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if len(tensor.inputs) == 1 else None

    def producer_op(self, tensor: gs.Tensor) -> str | None:
        node = self.producer(tensor)
        return node.op if node is not None else None

    def nodes(self, *ops: str) -> list[gs.Node]:
        return [n for n in self.gs.nodes if not ops or n.op in ops]

    def is_constant(self, tensor: gs.Tensor) -> bool:
        return OnnxGraph.constant_value(tensor) is not None

    def dequantizer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The DequantizeLinear whose value ``tensor`` is: written by it, or by ops of ``through`` from it (a
        Concat of ``through`` counts when every input is dequantized: the first input's DequantizeLinear)."""
        node = self.producer(tensor)
        while node is not None and node.op in self.through and node.inputs:
            if node.op == "Concat":
                found = [self.dequantizer(t) for t in node.inputs]
                return found[0] if all(found) else None
            node = self.producer(node.inputs[0])
        return node if node is not None and node.op == "DequantizeLinear" else None

    def dequantized(self, tensor: gs.Tensor) -> bool:
        return self.dequantizer(tensor) is not None

    def is_weight_dq(self, dq: gs.Node) -> bool:
        """Whether DequantizeLinear ``dq`` dequantizes a constant (an int8 initializer, or a Q of a float one)."""
        source = dq.inputs[0]
        q = self.producer(source)
        if q is not None and q.op == "QuantizeLinear":
            source = q.inputs[0]
        return self.is_constant(source)

    # -- Q/DQ parameters
    @staticmethod
    def scale(node: gs.Node) -> np.ndarray | None:
        return OnnxGraph.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None

    @staticmethod
    def zero_point(node: gs.Node) -> np.ndarray | None:
        """The zero point's value (None when absent or not a constant)."""
        return OnnxGraph.constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None

    def quantized_dtype(self, node: gs.Node) -> str | None:
        """The integer type a Q writes or a DQ reads (ONNX's default, uint8, when a Q has no zero point)."""
        zero = self.zero_point(node)
        if zero is not None:
            return np.dtype(zero.dtype).name
        if node.op == "DequantizeLinear":
            value = OnnxGraph.constant_value(node.inputs[0])
            dtype = value.dtype if value is not None else node.inputs[0].dtype
            return np.dtype(dtype).name if dtype is not None else None
        to = node.attrs.get("output_dtype")
        return None if to else "uint8"

    def shapes(self) -> dict:
        """ONNX shape inference's shapes (``OnnxGraph.inferred_shapes``), computed once; empty when it fails."""
        if self._shapes is None:
            try:
                self._shapes = self.graph.inferred_shapes()
            except Exception:  # shape inference is help, not a requirement: a rule that needs it says nothing
                self._shapes = {}
        return self._shapes

    def shape(self, tensor: gs.Tensor) -> list | None:
        """A tensor's shape from ONNX shape inference (None where unknown; symbolic dims are None)."""
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        dims = self.shapes().get(tensor.name, (None,))[0]
        return None if dims is None else [d if isinstance(d, int) and d > 0 else None for d in dims]

    # -- editing (fixes)
    def names(self) -> set[str]:
        return set(self.gs.tensors()) | {n.name for n in self.gs.nodes}

    def insert_qdq(self, tensor: gs.Tensor, reader: gs.Node, scale: np.ndarray, zero: np.ndarray, base: str) -> None:
        """Quantize ``tensor`` for ``reader`` only: ``tensor -> Q -> DQ -> reader`` with these parameters."""
        names = self.names()
        s = gs.Constant(fresh_name(names, f"{base}_scale"), np.asarray(scale, np.float32))
        z = gs.Constant(fresh_name(names, f"{base}_zero"), np.asarray(zero))
        q_out = gs.Variable(fresh_name(names, f"{base}_q_out"), dtype=np.asarray(zero).dtype, shape=tensor.shape)
        dq_out = gs.Variable(fresh_name(names, f"{base}_dq_out"), dtype=np.float32, shape=tensor.shape)
        self.gs.nodes.append(gs.Node("QuantizeLinear", fresh_name(names, f"{base}_q"), inputs=[tensor, s, z],
                                     outputs=[q_out]))
        self.gs.nodes.append(gs.Node("DequantizeLinear", fresh_name(names, f"{base}_dq"), inputs=[q_out, s, z],
                                     outputs=[dq_out]))
        replace_input(reader, tensor, dq_out)

    def set_scale(self, node: gs.Node, scale: np.ndarray) -> None:
        """Give Q/DQ ``node`` a new scale (a new initializer: the old one may be shared)."""
        name = fresh_name(self.names(), f"{node.name or node.op}_scale")
        node.inputs[1] = gs.Constant(name, np.asarray(scale, np.float32))


# -- running rules ------------------------------------------------------------------------------------------------
def lint(graph: OnnxGraph, rules: Sequence[LintRule]) -> list[Finding]:
    """Every finding of ``rules`` on ``graph``, in rule order then node order. The graph is not changed."""
    findings: list[Finding] = []
    for rule in rules:
        findings.extend(rule.check(rule.view(graph)))
    return findings


def apply_fixes(graph: OnnxGraph, rules: Sequence[LintRule], context: FixContext) -> FixOutcome:
    """Apply the safe fixes of ``rules`` to ``graph`` (in place), in rule order; the graph is sorted and cleaned
    after each rule that changed it."""
    outcome = FixOutcome()
    for rule in rules:
        if not rule.fixable:
            continue
        done = rule.fix(rule.view(graph), context)
        if done.applied:
            graph.gs.cleanup().toposort()
        outcome.applied += done.applied
        outcome.left += done.left
    return outcome


def summary_line(findings: Sequence[Finding]) -> str:
    """``3 findings (2 errors, 1 warning): zero-point 2, weight-per-tensor 1`` or ``no findings``."""
    if not findings:
        return "no findings"
    severities = Counter(f.severity for f in findings)
    per_rule = Counter(f.rule for f in findings)
    parts = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in sorted(severities.items()))
    rules = ", ".join(f"{rule} {n}" for rule, n in per_rule.most_common())
    return f"{len(findings)} finding{'s' if len(findings) != 1 else ''} ({parts}): {rules}"


def calibrated_ranges(graph: OnnxGraph, names: Sequence[str], data) -> dict[str, tuple[float, float]]:
    """Min and max of the tensors ``names`` over calibration ``data`` (anything
    :func:`graphopt.calib.sources.load_calibration` reads), running ``graph`` unoptimized on onnxruntime."""
    from graphopt.calib.sources import load_calibration
    from graphopt.ir.expose import expose

    exposed = expose(graph, names)
    session = exposed.session(optimized=False)
    order = [o.name for o in session.get_outputs()]
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for batch in load_calibration(data, graph.input_specs(), progress=False):
        values = dict(zip(order, session.run(None, batch)))
        for n in names:
            lo[n] = min(lo[n], float(np.min(values[n])))
            hi[n] = max(hi[n], float(np.max(values[n])))
    return {n: (lo[n], hi[n]) for n in names}


# -- the catalogue --------------------------------------------------------------------------------------------------
def catalogue(backend: str, rules: Sequence[LintRule], intro: str = "") -> str:
    """The rules as a Markdown document: per rule its id, severity, reason, the passage it rests on, the fix."""
    lines = [f"# {backend} placement rules", "",
             f"Generated from the rule objects (`graphopt verify --backend {backend.lower()} MODEL` runs them); do not "
             "edit by hand.", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| rule | severity | safe fix | title |", "| --- | --- | --- | --- |"]
    lines += [f"| [`{r.id}`](#{r.id}) | {r.severity} | {'yes' if r.fixable else 'no'} | {r.title} |" for r in rules]
    for r in rules:
        fixable = "; `--fix` applies a safe fix" if r.fixable else ""
        lines += ["", f"## {r.id}", "", f"**{r.title}** ({r.severity}{fixable})", "", f"Why: {r.reason}", ""]
        lines += [f"> {line}" if line else ">" for line in r.passage.splitlines()]
        lines += ["", f"Source: {r.source}", "", f"Fix: {r.fix_text}"]
    return "\n".join(lines) + "\n"
