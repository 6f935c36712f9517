"""Rewrite rules: a pass as a set of small rewrites that each say why they did not apply.

After onnxscript's rewriter (``onnxscript/rewriter``: a pattern, a condition that fails with a reason, a
replacement; the rules of a set tried in order at each node, the first that applies wins; new nodes tagged with
the rule's name), without its pattern language and tracer: ``match`` is plain code over the IR, and what it finds
is counted for the report instead of printed.

- :class:`Rule` — ``name``, the ``irs`` it runs on, ``stat`` (the ``PassResult.stats`` key its applications count
  toward, ``"<verb> <object>"``), ``match(graph, node)`` and ``apply(graph, plan)``. ``match`` returns ``None`` when
  the node is none of the rule's business (silently), a :class:`Skip` when it is but the rule cannot apply (its
  ``reason`` is counted and shown), or a *plan*: anything else, holding all ``apply`` needs. Every check is made
  in ``match``, so ``apply`` rewrites and never refuses.
- :func:`apply_rules` runs rules over the nodes in order and returns a :class:`RuleOutcome`: applications per rule
  and per stats key, and the nodes left as they were counted per reason.
- :class:`RulePass` — a pass made of rules. Its result's ``stats`` count the applications
  (``{"folded BatchNormalization": 12}``), its notes the reasons ("3 BatchNormalization not after a foldable op
  (...): left as is"), and ``PassResult.skipped`` keeps those counts as data.

How a rule edits the graph, so that the runner can follow it:

- ONNX: remove a node by disconnecting it (clear its inputs and outputs; ``OnnxGraph.splice_out`` does): the
  runner skips disconnected nodes and drops them from the graph at the end. Add nodes with :meth:`Rule.onnx_node`
  (named ``<rule>/<op>``); the graph is sorted topologically at the end when a rule added any.
- FX: erase nodes with ``gm.graph.erase_node``; add them with :meth:`Rule.fx_node` at an insertion point the rule
  sets (named ``<rule>_<target>``, with ``node.meta["rule"]`` the rule's name). After any change, attribute reads
  nothing uses are erased, the graph is linted, submodules nothing calls or reads are deleted, and the module is
  recompiled.
- A sweep visits the nodes present when it starts, in order, skipping those removed on the way. In a
  topologically sorted graph, rules that rewrite only at or after the node they matched see every node in its
  final state, so one sweep is a fixpoint. ``repeat=True`` sweeps again while anything applied, for rules whose
  rewrites make new places to match (a node moved past another, a new node that is itself a match).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

from graphopt.errors import PluginError
from graphopt.ir.onnx_graph import fresh_name
from graphopt.passes.base import IRS, Pass, PassResult

RULE_META = "rule"  # FX: node.meta[RULE_META] is the name of the rule that made the node
MAX_SWEEPS = 100  # repeat=True: rules still applying after this many sweeps undo each other (a bug)
NAMED = 5  # a note names at most this many nodes per reason


@dataclass(frozen=True)
class Skip:
    """The node is the rule's business but the rule cannot apply to it. ``reason`` is counted (keep it free of
    node names); ``name``, when given, is listed in the note ("(bn3, bn7)")."""

    reason: str
    name: str = ""


class Rule:
    """One rewrite. Subclasses set ``name``, ``irs`` and ``stat`` (as class attributes or in ``__init__``) and
    implement ``match`` and ``apply``; a rule instance may keep what it computed once for a graph (names in use,
    shapes)."""

    name: str = ""  # letters, digits and '-': it names the nodes the rule makes
    irs: frozenset[str] = frozenset()
    stat: str = ""  # "<verb> <object>": the stats key one application counts toward
    subject: str = ""  # what a Skip leaves as is, in notes; default: the stat's object
    made: int = 0  # nodes made through onnx_node / fx_node

    def match(self, graph, node) -> Any:
        """None (not this rule's node), a :class:`Skip`, or the plan :meth:`apply` carries out."""
        raise NotImplementedError

    def apply(self, graph, plan) -> None:
        raise NotImplementedError

    def left(self) -> str:
        return self.subject or self.stat.partition(" ")[2]

    # -- making nodes: they carry the rule's name ---------------------------------------------------------------
    def onnx_node(self, graph, op: str, inputs: list, outputs: list, attrs: dict | None = None,
                  domain: str | None = None):
        """A new node appended to ``graph``, named ``<rule>/<op>`` (made unique)."""
        import onnx_graphsurgeon as gs

        names = getattr(self, "_node_names", None)
        if names is None or names[0] is not graph.gs:
            names = self._node_names = (graph.gs, {n.name for n in graph.gs.nodes})
        node = gs.Node(op, fresh_name(names[1], f"{self.name}/{op}"), attrs or {}, inputs, outputs, domain=domain)
        graph.gs.nodes.append(node)
        self.made += 1
        return node

    def fx_node(self, graph, op: str, target: Any, args: tuple = (), kwargs: dict | None = None):
        """A new FX node at the graph's insertion point, named ``<rule>_<target>``, ``meta["rule"]`` set."""
        base = target if isinstance(target, str) else getattr(target, "__name__", type(target).__name__)
        node = graph.gm.graph.create_node(op, target, tuple(args), dict(kwargs or {}),
                                          name=f"{self.name}_{base}".replace("-", "_").replace(".", "_"))
        node.meta[RULE_META] = self.name
        self.made += 1
        return node


@dataclass
class RuleOutcome:
    applied: Counter = field(default_factory=Counter)  # rule name -> applications
    stats: Counter = field(default_factory=Counter)  # stats key -> applications
    skipped: Counter = field(default_factory=Counter)  # "<subject> <reason>" -> nodes left as they were
    named: dict[str, list[str]] = field(default_factory=dict)  # same keys -> the names Skips gave
    sweeps: int = 0

    @property
    def modified(self) -> bool:
        return sum(self.applied.values()) > 0

    def notes(self) -> list[str]:
        notes = []
        for key, count in self.skipped.items():
            names = self.named.get(key, [])
            shown = ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
            notes.append(f"{count} {key}: left as is" + (f" ({shown})" if names else ""))
        return notes

    def result(self, graph) -> PassResult:
        return PassResult(graph, self.modified, dict(self.stats), self.notes(), dict(self.skipped))


def apply_rules(graph, rules: Iterable[Rule], nodes: Sequence | None = None, *, repeat: bool = False) -> RuleOutcome:
    """Run the ``rules`` that support ``graph.ir`` over ``nodes`` (default: all of the graph's, in order, taken
    afresh at each sweep): at each node the first rule with a plan applies it. A node no rule applied to and
    some rule skipped is counted under the first such rule's reason, as the last sweep left it."""
    rules = [r for r in rules if graph.ir in _checked(r).irs]
    twice = sorted({r.name for r in rules if [q.name for q in rules].count(r.name) > 1})
    if twice:
        raise PluginError(f"rules for {graph.ir} graphs share the name {twice[0]!r} (their counts would mix)")
    outcome = RuleOutcome()
    made = sum(r.made for r in rules)
    skips: dict[int, tuple[Any, str, str]] = {}
    while True:
        outcome.sweeps += 1
        skips, applied = {}, 0
        for node in list(nodes) if nodes is not None else _nodes(graph):
            if not _alive(graph, node):
                continue
            for rule in rules:
                plan = rule.match(graph, node)
                if plan is None:
                    continue
                if isinstance(plan, Skip):
                    skips.setdefault(id(node), (node, f"{rule.left()} {plan.reason}", plan.name))
                    continue
                rule.apply(graph, plan)
                skips.pop(id(node), None)
                outcome.applied[rule.name] += 1
                outcome.stats[rule.stat] += 1
                applied += 1
                break
        if not (repeat and applied):
            break
        if outcome.sweeps >= MAX_SWEEPS:
            raise RuntimeError(f"rules {', '.join(r.name for r in rules)} still apply after {MAX_SWEEPS} sweeps: "
                               "they undo each other")
    for node, key, name in skips.values():
        if _alive(graph, node):
            outcome.skipped[key] += 1
            if name:
                outcome.named.setdefault(key, []).append(name)
    if outcome.modified:
        _tidy(graph, sum(r.made for r in rules) > made)
    return outcome


class RulePass(Pass):
    """A pass whose work is :func:`apply_rules` with the rules :meth:`rules` gives for a graph; its result is the
    outcome's (stats, notes, ``skipped``). :meth:`finish` cleans up after a change (dead tensors, unused
    submodules)."""

    repeat: ClassVar[bool] = False

    def rules(self, graph, ctx) -> Sequence[Rule]:
        raise NotImplementedError

    def finish(self, graph, outcome: RuleOutcome) -> None:
        """Called when the rules changed ``graph``."""

    def run_onnx(self, graph, ctx) -> PassResult:
        return self.run_rules(graph, ctx)

    def run_fx(self, graph, ctx) -> PassResult:
        return self.run_rules(graph, ctx)

    def run_rules(self, graph, ctx) -> PassResult:
        outcome = apply_rules(graph, self.rules(graph, ctx), repeat=self.repeat)
        if outcome.modified:
            self.finish(graph, outcome)
        return outcome.result(graph)


def _checked(rule: Rule) -> Rule:
    where = type(rule).__qualname__
    if not rule.name or not all(c.isalnum() or c == "-" for c in rule.name):
        raise PluginError(f"{where}: rule name {rule.name!r} must be non-empty, letters, digits and '-'")
    if not rule.irs or not rule.irs <= IRS:
        raise PluginError(f"{where}: irs must be a non-empty subset of {sorted(IRS)}")
    if " " not in rule.stat.strip():
        raise PluginError(f"{where}: stat {rule.stat!r} must be '<verb> <object>'")
    return rule


def _nodes(graph) -> list:
    return list(graph.gs.nodes) if graph.ir == "onnx" else list(graph.gm.graph.nodes)


def _alive(graph, node) -> bool:
    if graph.ir == "onnx":
        return bool(node.outputs)  # a removed node is disconnected
    return not getattr(node, "_erased", False)  # torch.fx marks erased nodes so held handles can tell


def _tidy(graph, made: bool) -> None:
    if graph.ir == "onnx":
        graph.gs.nodes = [n for n in graph.gs.nodes if n.outputs]
        if made:
            graph.gs.toposort()
    else:
        gm = graph.gm
        for node in list(gm.graph.nodes):  # attribute reads are pure: unread ones (old weights, ...) go
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
