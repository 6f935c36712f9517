"""The measured-latency guard for int8: keep float the fusion groups whose int8 kernel is slower than their float one
on this backend and this CPU, so that graphopt's int8 is never slower than the model it started from.

Int8 does not win everywhere on a CPU: a depthwise convolution or a small GEMM does too little arithmetic per
element for int8 kernels to repay the quantize / requantize around them, and an op the backend quantizes on its own
(onnxruntime's QLinearAdd, QLinearConcat...) adds conversions. onnxruntime also rewrites layouts (NCHWc, NHWC)
differently for float and int8 graphs, so a kernel timed alone, outside the graph the backend optimizes, says
little: kernels are profiled inside that graph, and every choice is confirmed on the *whole model*, one placement
against another, as the backend runs it.

The guard, on a :class:`~graphopt.report.sensitivity.Study` (a calibrated float graph, its groups, the backend),
takes the backend's own view where the backend can profile its optimized graph (``backend.profile_kernels``:
onnxruntime's profiler, per kernel of the graph it actually runs, NCHWc / NHWC layouts and fusions included):

1. **Profile.** One trial profiles the float and the fully-int8 model and times, on the whole model, fp32 once
   and int8 twice (an A/A pair of the cheaper model: the noise of this very run). Each kernel is mapped back to a
   group (:func:`~graphopt.report.kernel_profile.kernel_groups`: by the node or tensor it is named after; Q/DQ,
   layout Transposes and Reorders to the group they serve), and a group one placement fuses into a neighbour's
   kernel joins that neighbour (:func:`~graphopt.report.kernel_profile.profile_units`). Candidates are the units
   whose int8 kernels are not faster than their float ones by more than ``margin``. None, or all they could gain
   together (int8 minus float kernel time) within the noise: done, in one trial (its timings are the confirm).
2. **Screen in context.** One trial times int8 twice (A/A) and int8 with every candidate float, and profiles the
   latter: each candidate's kernels in float *among int8 neighbours*, the Q/DQ it then needs included. If that
   model is faster than int8 by more than the A/A difference (hysteresis: a difference within the noise keeps
   int8), it is kept. Else, once, the candidates that won by ``margin`` in that profile are tried alone the same way
   (if what they could gain there exceeds the noise).
3. **Confirm.** If what is kept (scaled by the first trial's int8) is slower than fp32 by more than the first
   trial's noise, the guard says so and keeps the model in float.

At most three trials, whatever the number of groups. Without a profiler (other backends) the candidates come from a
proxy and each is timed on the whole model:

1. **Proxy.** Each group's arithmetic intensity: multiply-accumulates per activation element it reads and writes
   (a depthwise 3x3 convolution: ~4; a 3x3 convolution of 64 channels: ~300; an Add: 0). Groups at or below
   ``max_intensity`` are the candidates, least intense first; the others are assumed to win in int8 (0: every group
   is a candidate).
2. **Probe.** One trial builds and times the fully-int8 model, to size what fits the time cap (``seconds``): the
   least intense candidates that fit are timed, the rest stay int8 (and the result says how many).
3. **Screen.** One trial times, interleaved over ``rounds`` rounds (each round runs every model once, in a rotated
   order; CPU time per run, ``time.process_time``, one intra-op thread, batch 1): the fully-int8 model twice (an
   A/A pair) and, per candidate, the model with only that group float. A group is kept float only when the faster
   of the A/A pair is slower than the float one by more than the A/A difference.
4. **Confirm.** One trial times fp32 twice (A/A), the fully-int8 model and the guarded one. If the guarded model is
   slower than the fully-int8 one by more than the noise (the gains did not add up), the fully-int8 model is kept;
   if what is kept is slower than fp32 by more than the noise, the guard says so and keeps the model in float.

Trials stop their rounds early (after ``MIN_ROUNDS``) once the comparisons they exist for are clear (twice the A/A
noise): a model twice as fast as another needs no twenty rounds to show it.

Each step is a *latency* trial of a module-level function (:func:`time_placements`) run through an executor
(``executor.map(fn, items, kind="latency")``: alone, and content-addressed): its item names the study (a folder
named by the hash of the model, ranges, backend and placing pass), the backend with its settings, this CPU's model
and flags and, through the trial key, graphopt's version. A second run on the same model, backend and CPU times
nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from graphopt.backends.cpu import cpu_flags
from graphopt.executors import InProcess
from graphopt.report.kernel_profile import Unit, kernel_groups, profile_units

__all__ = ["GuardResult", "backend_identity", "cpu_identity", "guard_latency", "intensities", "time_placements"]

FP32 = "fp32"  # a placement that is the float model itself (no placing pass)
THREADS = 1
MIN_ROUNDS = 5  # rounds a trial runs before it may stop early (see time_placements)
PROFILE_RUNS = 3  # profiled runs per placement (after an untimed one)
clock = time.process_time  # CPU time of this process (tests replace it with a fake clock)


# -- what the cache key holds besides the study ------------------------------------------------------------------
def cpu_identity() -> str:
    """This CPU's model name and a hash of its feature flags (a timing is only reused on the same kind of CPU)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    flags = cpu_flags()
    digest = hashlib.sha256(" ".join(sorted(flags or ())).encode()).hexdigest()[:16]
    return f"{model or platform.processor() or platform.machine()} flags:{digest}"


def backend_identity(backend) -> str:
    """The backend's name and its settings (options, providers, graph optimisation level...), as text."""
    simple = {k: v for k, v in sorted(vars(backend).items())
              if not k.startswith("_") and isinstance(v, (str, int, float, bool, tuple, type(None)))}
    return json.dumps([backend.name, repr(getattr(backend, "options", None)), {k: repr(v) for k, v in simple.items()}])


# -- the proxy ---------------------------------------------------------------------------------------------------
def intensities(study) -> dict[str, float]:
    """Each group's multiply-accumulates per activation element read and written (0 for an op without weights;
    inf where shapes are unknown), from the float graph's inferred shapes at batch 1."""
    import onnx

    model = study.graph.to_model()
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference refuses some graphs: every group is then a candidate of unknown intensity
        return {grp.name: math.inf for grp in study.groups}
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim)
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for grp in study.groups:
        node = nodes.get(grp.name)
        elements = [shapes.get(t) for t in (*grp.inputs, grp.output)]
        if node is None or any(s is None for s in elements):
            out[grp.name] = math.inf
            continue
        size = sum(int(np.prod(s)) for s in elements)
        w = next((weights[t] for t in node.input[1:2] if t in weights), None)
        out_shape = shapes.get(node.output[0])
        if w is None or out_shape is None or len(out_shape) < 2:
            out[grp.name] = 0.0 if w is None else math.inf
            continue
        channels = out_shape[1] if node.op_type in ("Conv", "ConvTranspose") else out_shape[-1]
        macs = int(np.prod(out_shape)) * int(np.prod(w)) / max(channels, 1)
        out[grp.name] = macs / max(size, 1)
    return out


# -- the trial ---------------------------------------------------------------------------------------------------
def time_placements(item: dict) -> dict:
    """A latency trial: build each placement of ``item["placements"]`` (``"fp32"``, or the group names kept float
    in an otherwise int8 model; a placement listed twice is placed once, with two sessions) as a session with one
    intra-op thread, then time them interleaved: ``warmup`` untimed runs each, then up to ``rounds`` rounds, each
    running every session once (rotated order), batch 1. ``item["stop"]`` (optional, ``{"aa": [i, j], "pairs":
    [[a, b], ...], "min_rounds": k}``) ends the rounds early, after ``k``, once every pair's medians differ by more
    than twice the A/A pair's (at least 1 % of its median): the decisions to come are then clear.
    ``item["profile"]`` (optional, indices): those placements' kernels from ``backend.profile_kernels``.
    Returns ``{"ms": [per-round CPU ms, per placement], "build_s": [seconds to place and load, per placement],
    "kernels": [kernels, per profiled placement]}``. ``item["cpu"]`` and ``item["backend"]`` are not read: they are
    part of the trial's content address."""
    from graphopt.report.sensitivity import Study

    study = Study.load(item["study"])
    backend = study.backend
    sessions, build, graphs = [], [], {}
    for placement in item["placements"]:
        start = time.perf_counter()
        key = json.dumps(placement)
        if key not in graphs:
            graphs[key] = _placed(study, placement)
        sessions.append(backend.session(graphs[key], THREADS))
        build.append(time.perf_counter() - start)
    feeds = {k: v[:1] for k, v in study.data.items()}
    kernels = [backend.profile_kernels(graphs[json.dumps(item["placements"][i])], feeds, PROFILE_RUNS, THREADS)
               for i in item.get("profile", ())]
    stop = item.get("stop")
    times = time_interleaved(backend, sessions, feeds, int(item["rounds"]), int(item["warmup"]),
                             until=(lambda r, t: r >= int(stop["min_rounds"]) and _clear(t, stop)) if stop else None)
    return {"ms": times, "build_s": build, "kernels": kernels}


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


_PLACED: dict[tuple[str, str], object] = {}  # the last placements built in this process (a guard's trials share them)


def _placed(study, placement) -> object:
    key = (study.folder, json.dumps(sorted(placement) if placement != FP32 else placement))
    if key not in _PLACED:
        while len(_PLACED) >= 3:
            _PLACED.pop(next(iter(_PLACED)))
        _PLACED[key] = (study.graph if placement == FP32 else study.quantized(placement)).to_model()
    return _PLACED[key]


def _clear(times: list[list[float]], stop: dict) -> bool:
    a, b = (_median(times[i]) for i in stop["aa"])
    noise = max(abs(a - b), 0.01 * min(a, b))
    return all(abs(_median(times[i]) - _median(times[j])) > 2 * noise for i, j in stop["pairs"])


# -- the guard ---------------------------------------------------------------------------------------------------
@dataclass
class GuardResult:
    """``float_groups``: the groups kept float (``float_nodes``: the nodes to exclude for that); ``kept``: "int8",
    "guarded" (int8 with some groups float) or "fp32" (int8 was slower than float: nothing quantized);
    ``profile``: per unit of groups, its kernels' µs per run in the float and the int8 profile (when the backend
    profiles); ``screen``: per timed candidate, its median ms with the group in int8 and float; ``noise_ms``: the
    screen's A/A noise; ``confirm``: median ms of fp32, int8 and guarded, and that trial's noise; ``untimed``:
    candidates the time cap left int8; ``timed_runs``: trials actually run (0: all from the cache); ``seconds``:
    wall time."""

    float_groups: list[str]
    float_nodes: tuple[str, ...]
    kept: str
    candidates: int
    screen: dict[str, dict[str, float]] = field(default_factory=dict)
    noise_ms: float = 0.0
    confirm: dict[str, float] = field(default_factory=dict)
    untimed: int = 0
    profile: dict[str, dict[str, float]] = field(default_factory=dict)
    timed_runs: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        c = self.confirm
        ms = (f"; whole model, ms/run (CPU, 1 thread): fp32 {c['fp32_ms']:.3f}, int8 {c['int8_ms']:.3f}, "
              f"guarded {c['guarded_ms']:.3f} (noise {c['noise_ms']:.3f})") if c else ""
        cap = f", {self.untimed} left int8 by the time cap" if self.untimed else ""
        floats = f": {', '.join(self.float_groups)}" if self.float_groups and self.kept != FP32 else ""
        what = {"int8": "every group stays int8", "guarded": f"{len(self.float_groups)} group(s) kept float",
                FP32: "int8 was slower than fp32: the model stays float"}[self.kept]
        cached = " (from the cache)" if not self.timed_runs else ""
        tried = sum("mixed_us" in row for row in self.profile.values())
        found = (f"{self.candidates} candidate(s) of {len(self.profile)} unit(s) profiled, {tried} timed float "
                 f"together") if self.profile else f"{len(self.screen)} of {self.candidates} candidate(s) timed{cap}"
        return (f"latency guard: {what}{floats} ({found})"
                f"{ms}; {self.seconds:.1f} s{cached}")


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def guard_latency(study, *, seconds: float = 60.0, rounds: int = 20, warmup: int = 1, max_intensity: float = 32.0,
                  margin: float = 0.1, profile: bool | None = None, executor=None) -> GuardResult:
    """Decide which of ``study``'s groups to keep float for speed (see the module docstring). ``profile``: use the
    backend's profiles (None: where the backend has ``profile_kernels``), else time candidates found by
    ``max_intensity`` one by one (``seconds``: the time cap of that way; the profiled one runs at most three
    trials); ``margin``: in a profile, a unit is a candidate unless its int8 kernels are faster than its float ones
    by more than this share, and keeps float only if faster among int8 neighbours by as much. ``executor``: where
    the latency trials run (default: in this process, cached under the study's folder)."""
    began = time.perf_counter()
    executor = executor or InProcess(os.path.join(study.folder, "runs"))
    calls = executor.calls
    key = {"study": study.folder, "cpu": cpu_identity(), "backend": backend_identity(study.backend),
           "rounds": int(rounds), "warmup": int(warmup)}

    def trial(placements: list, rounds_: int | None = None, **extra) -> dict:
        item = {**key, "placements": placements, **({"rounds": rounds_} if rounds_ is not None else {}), **extra}
        (result,) = executor.map(time_placements, [item], kind="latency")
        return result

    if profile is None:
        profile = callable(getattr(study.backend, "profile_kernels", None))
    if profile:
        result = _guard_by_profile(study, trial, margin)
    else:
        result = _guard_by_timing(study, trial, seconds, rounds, warmup, max_intensity)
    result.float_nodes = study.members(result.float_groups)
    result.timed_runs = executor.calls - calls
    result.seconds = time.perf_counter() - began
    return result


def _guard_by_profile(study, trial, margin: float) -> GuardResult:
    """The backend's view (module docstring, steps 1-3 with a profiler): at most three trials, whatever the number
    of candidates."""
    # fp32 and int8 twice (an A/A pair of the cheaper model: the noise), the first two profiled; also the confirm
    first = trial([FP32, [], []], profile=[0, 1], stop={"aa": [1, 2], "pairs": [[0, 1]], "min_rounds": MIN_ROUNDS})
    fp32, int8, int8_again = [_median(ms) for ms in first["ms"]]
    noise, int8 = abs(int8 - int8_again), (int8 + int8_again) / 2
    units = profile_units(study, *first["kernels"])
    result = GuardResult([], (), "int8", 0)
    result.profile = {u.name: {"float_us": u.float_us, "int8_us": u.int8_us} for u in units}
    candidates = [u for u in units if u.int8_us > (1 - margin) * u.float_us]
    result.candidates = len(candidates)
    guarded = int8
    # what keeping them float could gain at most (their kernels alone, no conversions) must exceed the noise
    keep: list[Unit] = candidates if sum(u.int8_us - u.float_us for u in candidates) / 1e3 > noise else []
    while keep:  # time int8 against int8 with `keep` float (an A/A pair of int8: the noise), and profile the latter
        groups = sorted(g for u in keep for g in u.groups)
        mixed = trial([[], [], groups], profile=[2], stop={"aa": [0, 1], "pairs": [[0, 2]], "min_rounds": MIN_ROUNDS})
        a, b, c = [_median(ms) for ms in mixed["ms"]]
        owner = kernel_groups(study, mixed["kernels"][0])
        in_context = {}
        for k, grp in zip(mixed["kernels"][0], owner):
            in_context[grp] = in_context.get(grp, 0.0) + float(k["us"])
        for u in keep:  # each kept unit's time in float among int8 neighbours (the conversions it needs included)
            result.profile[u.name]["mixed_us"] = sum(in_context.get(g, 0.0) for g in u.groups)
        result.noise_ms = abs(a - b)
        if min(a, b) - c > result.noise_ms:  # faster than int8 beyond the noise: keep it (in the first trial's ms)
            result.float_groups, guarded = groups, int8 * c / min(a, b)
            break
        winners = [u for u in keep if result.profile[u.name]["mixed_us"] < (1 - margin) * u.int8_us]
        gain = sum(u.int8_us - result.profile[u.name]["mixed_us"] for u in winners) / 1e3
        # one narrower try, with the units that won in context, if what they could gain exceeds the noise
        keep = winners if 0 < len(winners) < len(keep) and gain > result.noise_ms else []
    result.confirm = {"fp32_ms": fp32, "int8_ms": int8, "guarded_ms": guarded, "noise_ms": noise}
    _final_check(study, result, fp32, guarded, noise)
    return result


def _guard_by_timing(study, trial, seconds, rounds, warmup, max_intensity) -> GuardResult:
    """Without a profiler (module docstring, the proxy's steps): candidates by arithmetic intensity, each timed
    on the whole model, then confirmed."""
    proxy = intensities(study)
    order = sorted((g.name for g in study.groups if max_intensity <= 0 or proxy[g.name] <= max_intensity),
                   key=lambda n: proxy[n])
    result = GuardResult([], (), "int8", len(order))
    if order:
        probe = trial([[]], 3)
        per_model = probe["build_s"][0] + (warmup + rounds) * _median(probe["ms"][0]) / 1e3
        spent = probe["build_s"][0] + (warmup + 3) * _median(probe["ms"][0]) / 1e3  # from the probe's (cached) result
        fits = int((seconds - spent) / max(per_model, 1e-6)) - 2 - 4  # less the A/A pair and the confirming trial
        timed, result.untimed = order[:max(fits, 0)], len(order) - max(min(fits, len(order)), 0)
        if timed:
            screen = trial([[], []] + [[name] for name in timed])
            base, again, *each = [_median(ms) for ms in screen["ms"]]
            result.noise_ms = abs(base - again)
            int8 = min(base, again)  # the faster of the A/A pair: float must beat both
            for name, ms in zip(timed, each):
                result.screen[name] = {"int8_ms": int8, "float_ms": ms}
                if int8 - ms > result.noise_ms:  # int8 slower than float beyond the noise
                    result.float_groups.append(name)
    confirm = trial([FP32, FP32, [], sorted(result.float_groups)])
    fp32, fp32_again, int8, guarded = [_median(ms) for ms in confirm["ms"]]
    noise, fp32 = abs(fp32 - fp32_again), (fp32 + fp32_again) / 2
    result.confirm = {"fp32_ms": fp32, "int8_ms": int8, "guarded_ms": guarded, "noise_ms": noise}
    result.kept = "guarded" if result.float_groups else "int8"
    if result.float_groups and guarded - int8 > noise:
        result.warnings.append(f"keeping {len(result.float_groups)} group(s) float was slower on the whole model "
                               f"({guarded:.3f} vs {int8:.3f} ms): all int8 kept")
        result.float_groups, result.kept, guarded = [], "int8", int8
    _final_check(study, result, fp32, guarded, noise)
    return result


def _final_check(study, result: GuardResult, fp32: float, guarded: float, noise: float) -> None:
    """What is kept must not be slower than fp32 beyond the noise: else the model stays float."""
    result.kept = "guarded" if result.float_groups else "int8"
    if guarded - fp32 > noise:
        result.warnings.append(f"int8 ({guarded:.3f} ms/run) is slower than fp32 ({fp32:.3f} ms/run) beyond the "
                               f"noise ({noise:.3f} ms) on this backend and CPU: the model stays float")
        result.float_groups, result.kept = [g.name for g in study.groups], FP32
