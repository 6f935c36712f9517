"""The measured-latency guard for int8: keep float the fusion groups whose int8 kernel is slower than their float one
on this backend and this CPU, so that graphopt's int8 is never slower than the model it started from.

Int8 does not win everywhere on a CPU: a depthwise convolution or a small GEMM does too little arithmetic per
element for int8 kernels to repay the quantize / requantize around them, and an op the backend quantizes on its own
(onnxruntime's QLinearAdd, QLinearConcat...) adds conversions. onnxruntime also rewrites layouts (NCHWc, NHWC)
differently for float and int8 graphs, so a kernel timed alone, outside the graph the backend optimizes, says
little: kernels are profiled inside that graph, and a choice is only made on the *whole model*, one placement
timed against another, as the backend runs it.

Keeping groups float costs what int8 was for (a smaller model, int8's accuracy already measured), so it is done
only for a gain that is clearly there: the whole model faster than int8 by more than the noise of the same run
*and* by more than ``min_gain`` of its time (5 % by default: smaller gains come and go between runs of a loaded
CPU, and a decision that flips between runs is worse than none).

The guard, on a :class:`~graphopt.report.sensitivity.Study` (a calibrated float graph, its groups, the backend),
takes the backend's own view where the backend can profile its optimized graph (``backend.profile_kernels``:
onnxruntime's profiler, per kernel of the graph it actually runs, NCHWc / NHWC layouts and fusions included):

1. **Profile** (a trial that times nothing). The float and the fully-int8 model are profiled; each kernel is mapped
   back to a group (:func:`~graphopt.report.kernel_profile.kernel_groups`: by the node or tensor it is named after;
   Q/DQ, layout Transposes and Reorders to the group they serve), and a group one placement fuses into a
   neighbour's kernel joins that neighbour (:func:`~graphopt.report.kernel_profile.profile_units`). Candidates are
   the units whose int8 kernels are not faster than their float ones by more than ``margin``. What keeping them
   float could gain at most is their int8 minus float kernel time (no conversions counted): if that is not more
   than ``min_gain`` of the int8 model's kernel time, no group is worth keeping float.
2. **Profile in context** (a trial that times nothing, only if step 1 left a possible gain). The model with every
   candidate float is profiled: each candidate's kernels in float *among int8 neighbours*, the Q/DQ it then needs
   included. The winners are the candidates faster there than in int8 by ``margin``; if what they gain there
   together is not more than ``min_gain`` of the int8 model, no group is kept float.
3. **Time** (a trial, only if there are winners, or if the profile does not show int8 clearly faster than fp32: its
   kernels' total below ``1 - margin`` of fp32's. A profile charges a cost per kernel and an int8 graph has more
   kernels, so that comparison leans against int8: on the ResNet-18-, MobileNetV2- and BERT-like models its
   int8 / fp32 ratio was the timed one or above). Interleaved rounds (each round runs every
   model once, in a rotated order; CPU time per run, ``time.process_time``, one intra-op thread, batch 1) of
   int8 twice (an A/A pair: the noise of this run), the model with the winners float, and fp32 where the profile
   was not clear. The winners are kept float only if that model is faster than the faster of the A/A pair by more
   than the A/A difference and than ``min_gain`` of it. If what is kept is slower than fp32 beyond the noise, the
   guard says so and keeps the model in float.

So a model that int8 speeds up throughout costs two profiles and no timing; at most three trials, one timed,
whatever the number of groups. Without a profiler (other backends) the candidates come from a proxy and each is
timed on the whole model:

1. **Proxy.** Each group's arithmetic intensity: multiply-accumulates per activation element it reads and writes
   (a depthwise 3x3 convolution: ~4; a 3x3 convolution of 64 channels: ~300; an Add: 0). Groups at or below
   ``max_intensity`` are the candidates, least intense first; the others are assumed to win in int8 (0: every group
   is a candidate).
2. **Probe.** One trial builds and times the fully-int8 model, to size what fits the time cap (``seconds``): the
   least intense candidates that fit are timed, the rest stay int8 (and the result says how many).
3. **Screen.** One trial times, interleaved over ``rounds`` rounds: the fully-int8 model twice (an A/A pair) and,
   per candidate, the model with only that group float. A group is a winner when the faster of the A/A pair is
   slower than the float one by more than the A/A difference.
4. **Confirm.** One trial times fp32 twice (A/A), the fully-int8 model and the one with the winners float. The
   winners are kept float only if that model is faster than int8 by more than the noise and ``min_gain``; if what
   is kept is slower than fp32 beyond the noise, the guard says so and keeps the model in float.

Timed trials stop their rounds early (after ``MIN_ROUNDS``) once the comparisons they exist for are clear (twice
the A/A noise away from what decides them): a model twice as fast as another needs no twenty rounds to show it.

Each step is a *latency* trial of a module-level function (:func:`profile_placements`, :func:`time_placements`)
run through an executor (``executor.map(fn, items, kind="latency")``: alone, and content-addressed): its item names
the study (a folder named by the hash of the model, ranges, backend and placing pass), the backend with its
settings, this CPU's model and flags and, through the trial key, graphopt's version. A second run on the same
model, backend and CPU measures nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from graphopt.backends.cpu import cpu_identity
from graphopt.executors import InProcess
from graphopt.numeric import fmt_ms
from graphopt.report.kernel_profile import Unit, kernel_groups, profile_units

__all__ = ["GuardResult", "backend_identity", "guard_latency", "intensities", "profile_placements",
           "time_placements"]

FP32 = "fp32"  # a placement that is the float model itself (no placing pass)
THREADS = 1
MIN_ROUNDS = 5  # rounds a trial runs before it may stop early (see time_placements)
PROFILE_RUNS = 3  # profiled runs per placement (after an untimed one)
clock = time.process_time  # CPU time of this process (tests replace it with a fake clock)


# -- what the cache key holds besides the study ------------------------------------------------------------------
def backend_identity(backend) -> str:
    """The backend's name and its settings (options; what its constructor was given: providers, graph optimisation
    level...), as text."""
    from graphopt.report.study_files import backend_record

    return json.dumps(backend_record(backend), sort_keys=True)


# -- the proxy ---------------------------------------------------------------------------------------------------
def intensities(study) -> dict[str, float]:
    """Each group's multiply-accumulates per activation element read and written (0 for an op without weights;
    inf where shapes are unknown), from the float graph's inferred shapes at batch 1."""
    import onnx_graphsurgeon as gs

    graph = study.graph
    try:
        known = graph.inferred_shapes()
    except Exception:  # shape inference refuses some graphs: every group is then a candidate of unknown intensity
        return {grp.name: math.inf for grp in study.groups}
    shapes = {name: _batch_one(dims) for name, (dims, _) in known.items()}
    shapes.update({t.name: _batch_one(t.shape) for t in graph.gs.inputs if t.shape is not None})
    nodes = {n.name: n for n in graph.gs.nodes}
    out = {}
    for grp in study.groups:
        node = nodes.get(grp.name)
        elements = [shapes.get(t) for t in (*grp.inputs, grp.output)]
        if node is None or any(s is None for s in elements):
            out[grp.name] = math.inf
            continue
        size = sum(int(np.prod(s)) for s in elements)
        w = node.inputs[1].shape if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) else None
        out_shape = shapes.get(node.outputs[0].name)
        if w is None or out_shape is None or len(out_shape) < 2:
            out[grp.name] = 0.0 if w is None else math.inf
            continue
        channels = out_shape[1] if node.op in ("Conv", "ConvTranspose") else out_shape[-1]
        macs = int(np.prod(out_shape)) * int(np.prod(w)) / max(channels, 1)
        out[grp.name] = macs / max(size, 1)
    return out


def _batch_one(dims) -> tuple[int, ...]:
    """A shape with its unknown (symbolic) dimensions at 1."""
    return tuple(d if isinstance(d, int) else 1 for d in dims)


# -- the trials --------------------------------------------------------------------------------------------------
def profile_placements(item: dict) -> dict:
    """A latency trial that times nothing: each placement of ``item["placements"]`` (``"fp32"``, or the group names
    kept float in an otherwise int8 model) profiled by ``backend.profile_kernels`` (``item["runs"]`` runs after an
    untimed one, one intra-op thread, batch 1). Returns ``{"kernels": [kernels, per placement]}``."""
    from graphopt.report.sensitivity import Study

    study = Study.load(item["study"])
    feeds = {k: v[:1] for k, v in study.data.items()}
    return {"kernels": [study.backend.profile_kernels(_placed(study, p), feeds, int(item["runs"]), THREADS)
                        for p in item["placements"]]}


def time_placements(item: dict) -> dict:
    """A latency trial: build each placement of ``item["placements"]`` (as in :func:`profile_placements`; a
    placement listed twice is placed once, with two sessions) as a session with one intra-op thread, then time them
    interleaved (:func:`time_interleaved`: ``warmup`` untimed runs each, then up to ``rounds`` rounds, batch 1).
    ``item["stop"]`` (optional, ``{"aa": [i, j], "pairs": [[a, b, gain], ...], "min_rounds": k}``) ends the
    rounds early, after ``k``, once for every pair the difference of the medians (``a`` less ``b``) is more than
    twice the A/A pair's difference (at least 1 % of its median) away from ``gain`` (a share of the faster median,
    0 if omitted): the decisions to come are then clear. Returns ``{"ms": [per-round CPU ms, per placement],
    "build_s": [seconds to place and load, per placement]}``. ``item["cpu"]`` and ``item["backend"]`` are not
    read: they are part of the trial's content address."""
    from graphopt.report.sensitivity import Study

    study = Study.load(item["study"])
    backend = study.backend
    sessions, build = [], []
    for placement in item["placements"]:
        start = time.perf_counter()
        sessions.append(backend.session(_placed(study, placement), THREADS))
        build.append(time.perf_counter() - start)
    feeds = {k: v[:1] for k, v in study.data.items()}
    stop = item.get("stop")
    times = time_interleaved(backend, sessions, feeds, int(item["rounds"]), int(item["warmup"]),
                             until=(lambda r, t: r >= int(stop["min_rounds"]) and _clear(t, stop)) if stop else None)
    return {"ms": times, "build_s": build}


def time_interleaved(backend, sessions: list, feeds: dict, rounds: int, warmup: int, until=None) -> list[list[float]]:
    """Per session, its CPU ms per run (:data:`clock`) in each round: ``warmup`` untimed runs each, then up to
    ``rounds`` rounds that run every session once in a rotated order (so drift and cache effects fall on all of them
    alike); ``until(rounds_done, times)`` may end the rounds early."""
    for session in sessions:
        for _ in range(warmup):
            backend.run(session, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    for r in range(rounds):
        for j in range(n):
            i = (r + j) % n
            start = clock()
            backend.run(sessions[i], feeds)
            times[i].append((clock() - start) * 1e3)
        if until is not None and until(r + 1, times):
            break
    return times


_PLACED: dict[tuple[str, str], bytes] = {}  # the last placements made in this process (a guard's trials share them)


def _placed(study, placement) -> bytes:
    """The serialized model of a placement (fp32: the study's own file), made once for the trials that share it."""
    key = (study.folder, json.dumps(sorted(placement) if placement != FP32 else placement))
    if key not in _PLACED:
        while len(_PLACED) >= 3:
            _PLACED.pop(next(iter(_PLACED)))
        if placement == FP32:
            with open(os.path.join(study.folder, "model.onnx"), "rb") as f:
                _PLACED[key] = f.read()
        else:
            _PLACED[key] = study.quantized(placement).to_model().SerializeToString()
    return _PLACED[key]


def _clear(times: list[list[float]], stop: dict) -> bool:
    a, b = (_median(times[i]) for i in stop["aa"])
    noise = max(abs(a - b), 0.01 * min(a, b))
    for i, j, *gain in stop["pairs"]:
        x, y = _median(times[i]), _median(times[j])
        if abs(x - y - (gain[0] if gain else 0.0) * min(x, y)) <= 2 * noise:
            return False
    return True


# -- the guard ---------------------------------------------------------------------------------------------------
@dataclass
class GuardResult:
    """``float_groups``: the groups kept float (``float_nodes``: the nodes to exclude for that); ``kept``: "int8",
    "guarded" (int8 with some groups float) or "fp32" (int8 was slower than float: nothing quantized);
    ``profile``: per unit of groups, its kernels' µs per run in the float and the int8 profile, and float among
    int8 neighbours (``mixed_us``) where that was profiled; ``kernels_ms``: the fp32 and int8 profiles' kernel
    totals (ms per run); ``possible_ms``: what keeping groups float could gain at most, by the profiles;
    ``screen``: without a profiler, per timed candidate, its median ms with the group in int8 and float;
    ``noise_ms``: the A/A noise of the timed trial; ``confirm``: median ms of int8, what is kept and, where timed,
    fp32, and that trial's noise (empty: nothing was timed, the profile decided); ``untimed``: candidates the time
    cap left int8; ``timed_runs``: trials actually run (0: all from the cache); ``seconds``: wall time."""

    float_groups: list[str]
    float_nodes: tuple[str, ...]
    kept: str
    candidates: int
    screen: dict[str, dict[str, float]] = field(default_factory=dict)
    noise_ms: float = 0.0
    confirm: dict[str, float] = field(default_factory=dict)
    untimed: int = 0
    profile: dict[str, dict[str, float]] = field(default_factory=dict)
    kernels_ms: dict[str, float] = field(default_factory=dict)
    possible_ms: float = 0.0
    min_gain: float = 0.0
    timed_runs: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        c, k = self.confirm, self.kernels_ms
        fp32 = f"fp32 {c['fp32_ms']:.3f}, " if "fp32_ms" in c else ""
        ms = (f"; whole model, ms/run (CPU, 1 thread): {fp32}int8 {c['int8_ms']:.3f}, guarded {c['guarded_ms']:.3f} "
              f"(noise {c['noise_ms']:.3f})") if c else ""
        kernels = f"; kernels, ms/run (profile): fp32 {k['fp32']:.3f}, int8 {k['int8']:.3f}" if k else ""
        cap = f", {self.untimed} left int8 by the time cap" if self.untimed else ""
        floats = f": {', '.join(self.float_groups)}" if self.float_groups and self.kept != FP32 else ""
        what = {"int8": "every group stays int8", "guarded": f"{len(self.float_groups)} group(s) kept float",
                FP32: "int8 was slower than fp32: the model stays float"}[self.kept]
        cached = " (from the cache)" if not self.timed_runs else ""
        tried = sum("mixed_us" in row for row in self.profile.values())
        found = f"{len(self.screen)} of {self.candidates} candidate(s) timed{cap}"
        if self.profile:
            found = (f"{self.candidates} candidate(s) of {len(self.profile)} unit(s) profiled, {tried} profiled "
                     f"float among int8 neighbours, at most {self.possible_ms:.3f} ms to gain; min_gain "
                     f"{self.min_gain:.0%}")
        return f"latency guard: {what}{floats} ({found}){kernels}{ms}; {self.seconds:.1f} s{cached}"


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def guard_latency(study, *, seconds: float = 60.0, rounds: int = 20, warmup: int = 1, max_intensity: float = 32.0,
                  margin: float = 0.1, min_gain: float = 0.05, profile: bool | None = None,
                  executor=None) -> GuardResult:
    """Decide which of ``study``'s groups to keep float for speed (see the module docstring). ``profile``: use the
    backend's profiles (None: where the backend has ``profile_kernels``), else time candidates found by
    ``max_intensity`` one by one (``seconds``: the time cap of that way; the profiled one runs at most three
    trials); ``margin``: in a profile, a unit is a candidate unless its int8 kernels are faster than its float ones
    by more than this share, and a winner if faster among int8 neighbours by as much; ``min_gain``: groups are kept
    float only if the whole model is then faster than int8 by more than this share (and the noise).
    ``executor``: where the latency trials run (default: in this process, cached under the study's folder)."""
    began = time.perf_counter()
    executor = executor or InProcess(os.path.join(study.folder, "runs"))
    calls = executor.calls
    key = {"study": study.folder, "cpu": cpu_identity(), "backend": backend_identity(study.backend)}

    def timed(placements: list, rounds_: int = rounds, **extra) -> dict:
        item = {**key, "placements": placements, "rounds": int(rounds_), "warmup": int(warmup), **extra}
        (result,) = executor.map(time_placements, [item], kind="latency")
        return result

    def profiled(placements: list) -> list[list[dict]]:
        item = {**key, "placements": placements, "runs": PROFILE_RUNS}
        (result,) = executor.map(profile_placements, [item], kind="latency")
        return result["kernels"]

    if profile is None:
        profile = callable(getattr(study.backend, "profile_kernels", None))
    if profile:
        result = _guard_by_profile(study, profiled, timed, margin, min_gain)
    else:
        result = _guard_by_timing(study, timed, seconds, rounds, warmup, max_intensity, min_gain)
    result.min_gain = min_gain
    result.float_nodes = study.members(result.float_groups)
    result.timed_runs = executor.calls - calls
    result.seconds = time.perf_counter() - began
    return result


def _guard_by_profile(study, profiled, timed, margin: float, min_gain: float) -> GuardResult:
    """The backend's view (module docstring, steps 1-3 with a profiler): two profiles, a third and one timed trial
    only where they could change the decision."""
    float_kernels, int8_kernels = profiled([FP32, []])
    units = profile_units(study, float_kernels, int8_kernels)
    result = GuardResult([], (), "int8", 0)
    result.profile = {u.name: {"float_us": u.float_us, "int8_us": u.int8_us} for u in units}
    result.kernels_ms = {"fp32": _total_ms(float_kernels), "int8": _total_ms(int8_kernels)}
    floor = min_gain * result.kernels_ms["int8"]  # what a float group must gain, at least, to be kept float
    candidates = [u for u in units if u.int8_us > (1 - margin) * u.float_us]
    result.candidates = len(candidates)
    result.possible_ms = sum(u.int8_us - u.float_us for u in candidates) / 1e3
    winners: list[Unit] = []
    if candidates and result.possible_ms > floor:  # each candidate float among int8 neighbours, conversions included
        (mixed,) = profiled([_groups(candidates)])
        in_context: dict[str | None, float] = {}
        for k, grp in zip(mixed, kernel_groups(study, mixed)):
            in_context[grp] = in_context.get(grp, 0.0) + float(k["us"])
        for u in candidates:
            result.profile[u.name]["mixed_us"] = sum(in_context.get(g, 0.0) for g in u.groups)
        winners = [u for u in candidates if result.profile[u.name]["mixed_us"] < (1 - margin) * u.int8_us]
        result.possible_ms = sum(u.int8_us - result.profile[u.name]["mixed_us"] for u in winners) / 1e3
        winners = winners if result.possible_ms > floor else []
    fp32_clear = result.kernels_ms["int8"] <= (1 - margin) * result.kernels_ms["fp32"]
    if not winners and fp32_clear:
        return result  # int8 throughout, from the profiles alone: nothing to time
    groups = _groups(winners)
    placements: list = [[], []] + ([groups] if groups else []) + ([] if fp32_clear else [FP32])
    pairs = ([[0, 2, min_gain]] if groups else []) + ([] if fp32_clear else [[len(placements) - 1, 0]])
    ms = [_median(t) for t in timed(placements, stop={"aa": [0, 1], "pairs": pairs, "min_rounds": MIN_ROUNDS})["ms"]]
    a, b = ms[0], ms[1]
    result.noise_ms = noise = abs(a - b)
    guarded = (a + b) / 2
    if groups and min(a, b) - ms[2] > max(noise, min_gain * min(a, b)):  # faster than int8 beyond noise and min_gain
        result.float_groups, guarded = groups, ms[2]
    result.confirm = {"int8_ms": (a + b) / 2, "guarded_ms": guarded, "noise_ms": noise}
    result.kept = "guarded" if result.float_groups else "int8"
    if not fp32_clear:
        result.confirm["fp32_ms"] = ms[-1]
        _final_check(study, result, ms[-1], guarded, noise)
    return result


def _groups(units: list[Unit]) -> list[str]:
    return sorted(g for u in units for g in u.groups)


def _total_ms(kernels: list[dict]) -> float:
    return sum(float(k["us"]) for k in kernels) / 1e3


def _guard_by_timing(study, timed, seconds, rounds, warmup, max_intensity, min_gain) -> GuardResult:
    """Without a profiler (module docstring, the proxy's steps): candidates by arithmetic intensity, each timed
    on the whole model, then confirmed."""
    proxy = intensities(study)
    order = sorted((g.name for g in study.groups if max_intensity <= 0 or proxy[g.name] <= max_intensity),
                   key=lambda n: proxy[n])
    result = GuardResult([], (), "int8", len(order))
    if order:
        probe = timed([[]], 3)
        per_model = probe["build_s"][0] + (warmup + rounds) * _median(probe["ms"][0]) / 1e3
        spent = probe["build_s"][0] + (warmup + 3) * _median(probe["ms"][0]) / 1e3  # from the probe's (cached) result
        fits = int((seconds - spent) / max(per_model, 1e-6)) - 2 - 4  # less the A/A pair and the confirming trial
        screened, result.untimed = order[:max(fits, 0)], len(order) - max(min(fits, len(order)), 0)
        if screened:
            screen = timed([[], []] + [[name] for name in screened])
            base, again, *each = [_median(ms) for ms in screen["ms"]]
            result.noise_ms = abs(base - again)
            int8 = min(base, again)  # the faster of the A/A pair: float must beat both
            for name, ms in zip(screened, each):
                result.screen[name] = {"int8_ms": int8, "float_ms": ms}
                if int8 - ms > result.noise_ms:  # int8 slower than float beyond the noise
                    result.float_groups.append(name)
    confirm = timed([FP32, FP32, [], sorted(result.float_groups)])
    fp32, fp32_again, int8, guarded = [_median(ms) for ms in confirm["ms"]]
    noise, fp32 = abs(fp32 - fp32_again), (fp32 + fp32_again) / 2
    result.confirm = {"fp32_ms": fp32, "int8_ms": int8, "guarded_ms": guarded, "noise_ms": noise}
    if result.float_groups and int8 - guarded <= max(noise, min_gain * int8):
        if guarded - int8 > noise:
            result.warnings.append(f"keeping {len(result.float_groups)} group(s) float was slower on the whole "
                                   f"model ({guarded:.3f} vs {int8:.3f} ms): all int8 kept")
        result.float_groups, guarded = [], int8  # the gains did not add up to min_gain: all int8
    _final_check(study, result, fp32, guarded, noise)
    return result


def _final_check(study, result: GuardResult, fp32: float, guarded: float, noise: float) -> None:
    """What is kept must not be slower than fp32 beyond the noise: else the model stays float."""
    result.kept = "guarded" if result.float_groups else "int8"
    noise = max(noise, 0.01 * fp32)  # one A/A pair of medians can differ by nothing: 1 % is the least noise
    if guarded - fp32 > noise:
        result.warnings.append(f"int8, guarded ({fmt_ms(guarded)}/run), is slower than fp32 ({fmt_ms(fp32)}/run) "
                               f"beyond the noise ({fmt_ms(noise)}) on this backend and CPU: the model stays float")
        result.float_groups, result.kept = [g.name for g in study.groups], FP32
