"""Per-fusion-group int8 sensitivity (ONNX route; the FX route's study is graphopt.report.sensitivity_fx); the
budget search built on it is graphopt.report.budget.

The unit of decision is a *group*: what the backend runs as one kernel, so that keeping part of it float would
only split a kernel. Groups come from :func:`graphopt.backends.fusion.fusion_groups` (a weighted op with its fused
bias Add, residual Add and activation); keeping one float excludes its anchor and its fused residual Add (the
nodes place-qdq quantizes; the fused activation and the Q/DQ follow them). An op the scheme quantizes that no group
takes is a group of its own: onnxruntime's scheme has no ``fused_add``, so a residual Add (both inputs quantized)
runs as its own QLinearAdd kernel, as do Mul, Concat, GlobalAveragePool...

A :class:`Study` is calibrated once (the prefix of the ``int8`` pipeline before its placing pass: the pass whose
options have ``exclude_nodes``), and scores a placement — a set of groups kept float — by the placing pass with
those exclusions, run on the backend over N samples against the float model: output SQNR and cosine (all float
outputs together) and, with labels, top-1 accuracy in points. A study may hold a *fallback format* (passes that
take ``exclude_nodes``: int8 weights with run-time activations, 4-bit weights...), run after the placing pass on
chosen groups only (:meth:`Study.fallback_passes`), so that a group kept out of static int8 runs in it instead of
float; the format decides which groups it takes (:meth:`Study.fallback_groups`). Every score is a *trial*: a
module-level function of a JSON-able item (:func:`run_trial`), run through an executor (``executor.map(fn,
items)``; in-process by default), so a process pool or Ray can run them and a content-addressed executor can resume
a sweep: the study is written to a folder named by the hash of everything it depends on.

The cheap proxy ranks groups from ONE fully-quantized build: each group's *own* noise, its int8 form run on the
float model's values of its inputs against its float output, in dB (lower: more sensitive;
:mod:`graphopt.report.group_noise`). A layer after a damaged one inherits its noise but makes little of its own,
so the proxy points at the layer that does the damage, not at everything after it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import numpy as np

from graphopt.backends.fusion import fusion_groups
from graphopt.calib.state import RANGES
from graphopt.errors import UsageError
from graphopt.executors import InProcess
from graphopt.ir.onnx_graph import OnnxGraph
from graphopt.ir.ops import is_standard_domain
from graphopt.report import study_files
from graphopt.report.study_files import Scored, calibration_arrays, load_once, read_study, study_folder, write_study

__all__ = ["Group", "SensitivityResult", "Study", "decision_groups", "groups_from_json", "prepare", "proxy_scores",
           "run_fallback", "run_trial", "sensitivity", "trials"]


@dataclass(frozen=True)
class Group:
    """A unit of decision. ``name``: its anchor's node name; ``members``: the nodes excluded to keep it float;
    ``inputs``: the activation tensors it reads; ``output``: the tensor it writes after its fused epilogue."""

    name: str
    op: str
    members: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str


def decision_groups(graph: OnnxGraph, scheme, ranges: dict | None = None) -> list[Group]:
    """The groups of a float graph under ``scheme`` (see the module docstring), in graph order; with ``ranges``,
    only those whose output was calibrated (an op on shapes or integers is never quantized)."""
    g = graph.gs
    by_name = {n.name: n for n in g.nodes}
    groups, taken = [], set()
    for fg in fusion_groups(graph, scheme):
        anchor = by_name[fg.anchor]
        last = by_name[fg.epilogue[-1]] if fg.epilogue else anchor
        inputs = [anchor.inputs[0].name] + ([fg.residual] if fg.residual else [])
        members = (fg.anchor,) + ((fg.add,) if fg.add else ())
        groups.append(Group(fg.anchor, fg.op, members, tuple(inputs), last.outputs[0].name))
        taken |= {fg.anchor, *fg.epilogue}
    for node in g.nodes:
        if node.name in taken or node.op not in scheme.quantized_ops or not is_standard_domain(node.domain):
            continue
        inputs = [t.name for t in node.inputs if t.name and not _constant(t)]
        if inputs:
            groups.append(Group(node.name, node.op, (node.name,), tuple(inputs), node.outputs[0].name))
    if any(not grp.name for grp in groups):
        raise UsageError("the model has unnamed nodes that int8 quantizes: groups are named by their node "
                         "(name the nodes, e.g. re-export the model)")
    order = {n.name: i for i, n in enumerate(g.nodes)}
    groups.sort(key=lambda grp: order[grp.name])
    return [grp for grp in groups if ranges is None or grp.output in ranges]


def groups_from_json(items: list[dict]) -> list[Group]:
    """Groups as study.json holds them (lists for tuples)."""
    return [Group(**{k: tuple(v) if isinstance(v, list) else v for k, v in grp.items()}) for grp in items]


def _constant(t) -> bool:
    return not hasattr(t, "inputs") or type(t).__name__ == "Constant" or (
        len(t.inputs) == 1 and t.inputs[0].op == "Constant")


# -- the study: calibrated once, scores placements ---------------------------------------------------------------
@dataclass
class Study(Scored):
    """A float graph, its calibrated ranges, N evaluation samples (and labels), the backend and the placing pass
    (as pipeline text), saved in ``folder``. :meth:`score` runs one trial in this process."""

    folder: str
    graph: OnnxGraph
    ranges: dict[str, tuple[float, float]]
    data: dict[str, np.ndarray]
    labels: np.ndarray | None
    backend_name: str
    place_text: str
    groups: list[Group]
    registry: Any = None
    backend: Any = None
    ir: ClassVar[str] = "onnx"  # the IR of the graphs this kind of study takes
    prefix_text: str = ""  # the passes before the placing one (calibration), as pipeline text: the recipe's
    fallback_text: str = ""  # the fallback format (passes that take exclude_nodes), as pipeline text; "": none
    unplaced: list[str] = field(default_factory=list)  # groups the placement leaves float here (not scored)
    _taken: tuple[str, ...] | None = field(default=None, repr=False)  # the nodes the fallback takes in the graph
    _reference: list[np.ndarray] | None = field(default=None, repr=False)
    _int8: OnnxGraph | None = field(default=None, repr=False)  # the fully-int8 graph, built once (int8())

    @classmethod
    def create(cls, graph: OnnxGraph, ranges: dict, data: dict, labels, *, backend, place_text: str, registry,
               folder: str | None = None, fallback_text: str = "") -> "Study":
        """A study of a calibrated float ``graph``, written under ``folder`` (default: a folder under the temp dir
        named by the hash of the model, ranges, data, backend, placing pass and fallback format: the same study,
        the same folder, so a rerun resumes; see :mod:`graphopt.report.study_files`)."""
        from graphopt.passes.pipeline import resolve

        ranges = {k: (float(v[0]), float(v[1])) for k, v in ranges.items()}
        data = {k: np.ascontiguousarray(v) for k, v in data.items()}
        place = _place_pass(resolve(place_text, registry))
        groups = cls.decision_groups(graph, backend.scheme(place.options.request()), ranges)
        if fallback_text:
            _fallback(fallback_text, registry)  # refused here, in one line, when it cannot be restricted
        prefix, model_file, model, extra = cls.serialize(graph)
        record = study_files.backend_record(backend)
        settings = [sorted(ranges.items()), record, place_text] + ([fallback_text] if fallback_text else [])
        folder = study_folder(prefix, cls.identity(graph, model), settings, data, labels, folder)
        write_study(folder, model_file, model, data, labels,
                    {**record, "place": place_text, "ranges": ranges,
                     "fallback": fallback_text,
                     "groups": [dataclasses.asdict(grp) for grp in groups], **extra})
        study = cls(folder, graph, ranges, data, None if labels is None else np.asarray(labels), backend.name,
                    place_text, groups, registry, backend, fallback_text=fallback_text)
        load_once(folder, cls.load, study)
        return study

    @staticmethod
    def decision_groups(graph, scheme, ranges: dict) -> list[Group]:
        """This kind's groups of ``graph`` under ``scheme`` (:func:`decision_groups`)."""
        return decision_groups(graph, scheme, ranges)

    @staticmethod
    def serialize(graph) -> tuple[str, str, bytes, dict]:
        """(folder-name prefix, model file name, its bytes, more for study.json) of this kind's ``graph``."""
        return "", "model.onnx", graph.to_model().SerializeToString(), {}

    @staticmethod
    def identity(graph, model: bytes) -> bytes:
        """What names this kind's study of ``graph`` (its folder's hash): the serialized model itself, here."""
        return model

    @classmethod
    def _read(cls, folder: str) -> "Study":
        meta, arrays, labels, registry, backend = read_study(folder)
        return cls(folder, OnnxGraph.load(os.path.join(folder, "model.onnx")),
                   {k: tuple(v) for k, v in meta["ranges"].items()}, arrays, labels, meta["backend"], meta["place"],
                   groups_from_json(meta["groups"]), registry, backend, fallback_text=meta.get("fallback", ""))

    def members(self, names: Iterable[str]) -> tuple[str, ...]:
        """The nodes to exclude to keep the groups ``names`` float."""
        by = {grp.name: grp for grp in self.groups}
        return tuple(sorted({m for n in names for m in by[n].members}))

    def quantized(self, float_groups: Iterable[str] = (), fallback_groups: Iterable[str] = ()) -> OnnxGraph:
        """The graph in int8 with the groups ``float_groups`` kept float and ``fallback_groups`` in the fallback
        format: the placing pass excludes both, then the fallback runs on the second only."""
        from graphopt.passes.base import PassContext
        from graphopt.passes.manager import PassManager
        from graphopt.passes.pipeline import resolve

        fallback_groups = list(fallback_groups)
        place = _place_pass(resolve(self.place_text, self.registry))
        exclude = (*place.options.exclude_nodes, *self.members([*float_groups, *fallback_groups]))
        place = type(place)(dataclasses.replace(place.options, exclude_nodes=tuple(dict.fromkeys(exclude))))
        ctx = PassContext(backend=self.backend, registry=self.registry, state={RANGES: dict(self.ranges)})
        out, _ = PassManager([place, *self.fallback_passes(fallback_groups)], [], ctx).run(self.graph, in_place=False)
        return out

    def int8(self) -> OnnxGraph:
        """The fully-int8 graph (:meth:`quantized` with no group kept float), built once: read, never edited."""
        if self._int8 is None:
            self._int8 = self.quantized()
        return self._int8

    def drop_unplaced(self) -> None:
        """Drop the groups that the placing pass leaves float on this backend even in the fully-int8 model (none of
        their nodes reads a DequantizeLinear: TensorRT's too-small convolutions, Adds it quantizes only inside a
        fused group): scoring them measures nothing. Their names go to ``unplaced``, in graph order."""
        fed = {n.name for n in self.int8().gs.nodes
               if any(getattr(t, "inputs", None) and t.inputs[0].op == "DequantizeLinear" for t in n.inputs)}
        self.unplaced = [grp.name for grp in self.groups if not fed & set(grp.members)]
        self.groups = [grp for grp in self.groups if grp.name not in self.unplaced]

    def fallback_groups(self) -> list[str]:
        """The groups the fallback format takes (their anchor), in graph order: it is run once on the float graph
        and decides itself (int8-dynamic takes MatMul/Gemm with a constant weight, ...); none without one."""
        if self._taken is None:
            self._taken = run_fallback(self.graph, _fallback(self.fallback_text, self.registry), self.backend,
                                       self.registry)[1] if self.fallback_text else ()
        return [grp.name for grp in self.groups if grp.name in self._taken]

    def fallback_passes(self, groups: Iterable[str]) -> list:
        """The fallback format's passes restricted to the anchors of ``groups``: each excludes, beside its own
        exclusions, every other node the format takes in the float graph. No groups: no passes."""
        chosen = set(groups)
        if not chosen:
            return []
        self.fallback_groups()
        others = [n for n in self._taken if n not in chosen]
        return [type(p)(dataclasses.replace(p.options, exclude_nodes=tuple(dict.fromkeys(
            (*p.options.exclude_nodes, *others))))) for p in _fallback(self.fallback_text, self.registry)]

    def reference(self) -> list[np.ndarray]:
        if self._reference is None:
            self._reference = self.backend.run_batched(self.graph.to_model(), self.data, 32)
        return self._reference

    def score(self, float_groups: Iterable[str] = (), fallback_groups: Iterable[str] = ()) -> dict[str, float | None]:
        """One trial: int8 except ``float_groups`` (float) and ``fallback_groups`` (the fallback format), run on
        the backend over the study's samples."""
        model = self.quantized(float_groups, fallback_groups).to_model()
        return self.metrics(self.backend.run_batched(model, self.data, 32))

    def proxy(self, samples: int = 32) -> dict[str, float]:
        """Each group's own int8 noise in the fully-quantized model, as an SQNR in dB: one int8 build, one float
        run, one small run per group (:func:`graphopt.report.group_noise.own_noise_db`); always finite."""
        from graphopt.passes.pipeline import resolve
        from graphopt.report.group_noise import own_noise_db

        scheme = self.backend.scheme(_place_pass(resolve(self.place_text, self.registry)).options.request())
        subset = {k: v[:samples] for k, v in self.data.items()}
        return own_noise_db(self.graph, self.int8(), self.groups, scheme, subset, self.backend)

    @staticmethod
    def trial_function():
        """The module-level function an executor runs for one trial of a study of this kind."""
        return run_trial


def run_trial(item: dict) -> dict:
    """A trial, for an executor: ``{"study": folder, "float": [group names]}`` (and ``"fallback": [group names]``
    where some run in the fallback format) -> the study's metrics."""
    return Study.load(item["study"]).score(item["float"], item.get("fallback", ()))


def _place_pass(passes: list):
    placing = [p for p in passes if hasattr(p.options, "exclude_nodes")]
    if not placing:
        raise UsageError("the pipeline has no pass that places int8 with node exclusions (exclude_nodes)")
    return placing[-1]


def placement_to_score(text: str, ctx, after) -> Any:
    """The place pass a decision made by pass ``after`` (a budget, the latency guard) is to be scored with: the
    one ``text`` names (e.g. ``place-qdq``), or, when the run's pipeline places with that pass later on, that
    very pass with the options the pipeline gave it (``int8-budget:per_channel=no`` reaches place-qdq, not
    the scoring; scored with the defaults, a budget held on a placement that was not the one written)."""
    from graphopt.passes.pipeline import resolve

    place = _place_pass(resolve(text, ctx.registry))
    pipeline = list(getattr(ctx, "pipeline", None) or [])
    later = pipeline[pipeline.index(after) + 1:] if after in pipeline else []
    return next((p for p in later if p.name == place.name), place)


def _fallback(text: str, registry) -> list:
    """The passes of a fallback format; each must take ``exclude_nodes`` (it runs on chosen groups only)."""
    from graphopt.passes.pipeline import resolve

    passes = resolve(text, registry)
    loose = [p.name for p in passes if not hasattr(p.options, "exclude_nodes") or "onnx" not in p.irs]
    if loose:
        raise UsageError(f"fallback '{text}': pass '{loose[0]}' takes no exclude_nodes on ONNX, so it cannot be "
                         f"run on the chosen groups only (a fallback format: e.g. int8-dynamic, int4-weight)")
    return passes


def run_fallback(graph: OnnxGraph, passes: list, backend, registry) -> tuple[OnnxGraph, tuple[str, ...]]:
    """``passes`` run on a copy of ``graph`` for ``backend``, and the nodes of ``graph`` they replaced or rewrote
    (their name, op or domain is gone), in order."""
    from graphopt.passes.base import PassContext
    from graphopt.passes.manager import PassManager

    out, _ = PassManager(passes, [], PassContext(backend=backend, registry=registry)).run(graph, in_place=False)
    after = {(n.name, n.op, n.domain or "") for n in out.gs.nodes}
    return out, tuple(n.name for n in graph.gs.nodes if (n.name, n.op, n.domain or "") not in after)


def trials(study: Study, executor, sets: list[list[str]], fallbacks: list[list[str]] | None = None) -> list[dict]:
    """Score each placement: ``sets[i]`` float and ``fallbacks[i]`` (if given) in the fallback format."""
    items = [{"study": study.folder, "float": sorted(s), **({"fallback": sorted(f)} if f else {})}
             for s, f in zip(sets, fallbacks or [()] * len(sets))]
    return (executor or InProcess(os.path.join(study.folder, "runs"))).map(study.trial_function(), items,
                                                                          kind="accuracy")


# -- the cheap proxy -----------------------------------------------------------------------------------------------
def proxy_scores(study: Study, samples: int = 32) -> dict[str, float]:
    """Each group's proxy score in dB (lower: more sensitive; see the module docstring), from the study's kind
    (:meth:`Study.proxy`)."""
    return study.proxy(samples)


# -- sensitivity: one group at a time ----------------------------------------------------------------------------
@dataclass
class SensitivityResult:
    """``rows``: one per group, most sensitive first (evaluated ones, then the rest by proxy): group, op, proxy_db,
    sqnr_db, cosine, accuracy (None where not evaluated). ``baseline``: the fully-int8 model's metrics."""

    mode: str
    samples: int
    rows: list[dict]
    baseline: dict
    fp32_accuracy: float | None
    evaluations: int

    def table(self) -> str:
        from graphopt.table import format_table

        what = "only this group int8" if self.mode == "one" else "all int8 but this group"
        head = ("#", "group", "op", "proxy dB", f"SQNR dB ({what})", "cosine", "accuracy")
        lines = [head]
        for i, r in enumerate(self.rows, 1):
            lines.append((str(i), r["group"], r["op"], _fmt(r["proxy_db"], ".1f"), _fmt(r["sqnr_db"], ".2f"),
                          _fmt(r["cosine"], ".5f"), _fmt(r["accuracy"], ".2f")))
        return format_table(lines)

    def to_dict(self) -> dict:
        from graphopt.report.layers import jsonable

        clean = [{k: jsonable(v) if isinstance(v, float) else v for k, v in r.items()} for r in self.rows]
        return {"mode": self.mode, "samples": self.samples, "evaluations": self.evaluations,
                "fp32_accuracy": self.fp32_accuracy,
                "baseline": {k: jsonable(v) if isinstance(v, float) else v for k, v in self.baseline.items()},
                "groups": clean}

    def plot(self, path: str) -> None:
        """A horizontal bar chart of the evaluated groups' output SQNR, most sensitive on top (PNG)."""
        from graphopt.report.plots import bars

        rows = [r for r in self.rows if r["sqnr_db"] is not None] or self.rows
        values = [r["sqnr_db"] if r["sqnr_db"] is not None else r["proxy_db"] for r in rows]
        bars([r["group"] for r in rows], values, path,
             xlabel="output SQNR vs fp32, dB (" + ("only this group int8" if self.mode == "one"
                                                   else "all int8 but this group") + ")",
             title=f"int8 sensitivity per fusion group ({self.samples} samples)")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else (f"{value:{spec}}" if math.isfinite(value) else str(value))


def cost_line(study: Study, mode: str, max_evals: int | None) -> str:
    g = len(study.groups)
    n = g if not max_evals else min(g, max_evals)
    bound = f" (--max-evals {max_evals}: the top {n} by a cheap proxy, from one fully-int8 run)" \
        if max_evals and max_evals < g else ""
    return (f"cost: {g} groups -> {n} evaluations{bound} on {study.samples} samples, "
            f"{'one group at a time' if mode == 'one' else 'all but one group'} in int8, and 1 of the fully-int8 "
            f"model (the baseline)")


def sensitivity(study: Study, *, mode: str = "one", max_evals: int | None = None, executor=None
                ) -> SensitivityResult:
    """Score each group: ``mode="one"``, the model with only that group in int8; ``"all-but-one"``, everything
    int8 but that group. ``max_evals``: evaluate only the most sensitive groups by the proxy."""
    if mode not in ("one", "all-but-one"):
        raise UsageError(f"mode must be 'one' or 'all-but-one', got {mode!r}")
    names = [grp.name for grp in study.groups]
    proxy = proxy_scores(study)
    chosen = sorted(names, key=lambda n: proxy[n])[:max_evals] if max_evals else names
    sets = [[n for n in names if n != c] if mode == "one" else [c] for c in chosen]
    baseline, *scores = trials(study, executor, [[]] + sets)
    by = dict(zip(chosen, scores))
    ops = {grp.name: grp.op for grp in study.groups}
    rows = [{"group": n, "op": ops[n], "proxy_db": proxy[n], **by.get(n, dict.fromkeys(baseline))} for n in names]
    sign = 1 if mode == "one" else -1  # all-but-one: the most sensitive is the one whose float-ing helps most

    def key(r):
        if r["sqnr_db"] is None:
            return (1, 0.0, r["proxy_db"])
        acc = r["accuracy"] if r["accuracy"] is not None else 0.0
        return (0, sign * acc, sign * r["sqnr_db"])

    rows.sort(key=key)
    return SensitivityResult(mode, study.samples, rows, baseline, study.fp32_accuracy(), len(sets) + 1)


def prepare(model, calibration, *, registry, backend, pipeline: str = "int8", eval_data: dict | None = None,
            labels=None, samples: int = 64, folder: str | None = None, kind: type | None = None,
            fallback: str = "") -> Study:
    """Calibrate ``model`` (a path or ModelProto) once, with the passes of ``pipeline`` before its placing pass,
    and make a :class:`Study` (``kind``: a subclass for another IR, e.g. the FX study,
    :func:`graphopt.report.sensitivity_fx.prepare_fx`) on the first ``samples`` samples of ``eval_data`` (else of
    the calibration data); ``fallback``: a fallback format (pipeline text; ONNX studies only)."""
    from graphopt.calib.sources import input_specs, load_calibration
    from graphopt.ir import load_model
    from graphopt.passes.base import PassContext
    from graphopt.passes.manager import PassManager
    from graphopt.passes.pipeline import format_passes, resolve

    graph = load_model(model)
    kind = kind or Study
    if graph.ir not in backend.irs or graph.ir != kind.ir:
        raise UsageError(f"backend {backend.name} does not run {graph.ir.upper()} models here (a PyTorch model: "
                         f"--backend x86; an ONNX model: --backend onnxruntime)")
    if fallback and kind.ir != "onnx":
        raise UsageError(f"a fallback format ({fallback}) is searched on ONNX models only: on {graph.ir.upper()} the "
                         f"budget keeps groups float (drop the fallback)")
    passes = resolve(pipeline, registry)
    place = _place_pass(passes)
    after = [p.name for p in passes[passes.index(place) + 1:]]
    if after:  # a study scores the placement: what would follow it is never run (it was dropped without a word)
        raise UsageError(f"pipeline '{pipeline}': {', '.join(after)} after its placing pass ({place.name}) would not "
                         f"be part of what is scored: give the pipeline up to the placement (run the rest after)")
    # what calibrates before the placing pass, without passes that decide by timing (the latency guard): their
    # choice is not the study's, and the recipe replaying the decision must not make another one
    prefix = [p for p in passes[:passes.index(place)] if not p.decides_by_timing]
    ctx = PassContext(backend=backend, registry=registry)
    ctx.calibration = load_calibration(calibration, input_specs(graph))
    calibrated, _ = PassManager(prefix, [], ctx).run(graph, in_place=True)
    if RANGES not in ctx.state:
        raise UsageError(f"pipeline '{pipeline}' calibrates nothing before its placing pass")
    if eval_data is None:
        eval_data = calibration_arrays(ctx.calibration)
    n = min(samples, len(next(iter(eval_data.values()))))
    data = {k: np.asarray(v)[:n] for k, v in eval_data.items()}
    labels = None if labels is None else np.asarray(labels).reshape(-1)[:n]
    study = kind.create(calibrated, ctx.state[RANGES], data, labels, backend=backend,
                        place_text=format_passes([place]), registry=registry, folder=folder,
                        **({"fallback_text": fallback} if fallback else {}))
    study.prefix_text = format_passes(prefix)
    if kind.ir == "onnx":
        study.drop_unplaced()
    return study
