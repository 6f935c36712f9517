"""The measured-latency guard (graphopt.report.latency_guard, the latency-guard pass, int8-guarded): with a fake
backend whose clock says one group is slower in int8, that group alone is kept float; a difference within the A/A
noise, or a gain below min_gain, keeps int8; with a profiler, nothing is timed where the profiles show no gain
of min_gain possible and int8 clearly faster than fp32; a second run times nothing (the trial cache); int8 slower
than fp32 overall keeps the model float; and one real run on onnxruntime."""

from __future__ import annotations

import hashlib
import tempfile

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from graphopt.backends import get_backend
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.report import latency_guard
from graphopt.report.latency_guard import guard_latency
from graphopt.report.sensitivity import prepare

GROUPS = ("conv_a", "conv_b", "conv_c")


def tiny_cnn(path, seed: int = 0) -> np.ndarray:
    """x -> conv_a -> relu -> conv_b -> relu -> conv_c (8 channels, 8x8); returns calibration samples."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), f"w{c}") for c in "abc"]
    nodes = []
    x = "x"
    for c in "abc":
        nodes.append(h.make_node("Conv", [x, f"w{c}"], [f"{c}"], f"conv_{c}", pads=[1, 1, 1, 1]))
        x = f"{c}r" if c != "c" else "y"
        if c != "c":
            nodes.append(h.make_node("Relu", [c], [x], f"relu_{c}"))
    nodes[-1].output[0] = "y"
    graph = h.make_graph(nodes, "tiny", [h.make_tensor_value_info("x", 1, ["N", 8, 8, 8])],
                         [h.make_tensor_value_info("y", 1, ["N", 8, 8, 8])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return rng.normal(0, 1, (16, 8, 8, 8)).astype(np.float32)


def _proto(model) -> onnx.ModelProto:
    """What the guard hands a backend (a serialized model, or the study's file) as a ModelProto."""
    return onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.runs = 0

    def __call__(self) -> float:
        return self.now


class FakeBackend(OnnxRuntimeBackend):
    """onnxruntime's scheme, but a run only advances ``clock`` by a cost in ms: 1 + per group, ``int8[g]`` when the
    model runs that group in int8 (its weight comes from a DequantizeLinear), else ``float_ms`` (``boundary`` more
    in a model that has int8 groups: its conversions); a second session of the same model in one trial (the A/A
    pair) costs ``jitter`` more. It has no profiler (``profile_kernels``
    None): the guard finds its candidates by arithmetic intensity."""

    profile_kernels = None

    def __init__(self, clock: FakeClock, int8: dict[str, float], float_ms: float = 3.0, jitter: float = 0.1,
                 boundary: float = 0.0):
        super().__init__()
        self.clock, self.int8, self.float_ms, self.jitter, self.boundary = clock, dict(int8), float_ms, jitter, boundary
        self._seen: set[str] = set()
        self._ran = False

    def session(self, model, threads: int = 0):
        model = _proto(model)
        if self._ran:  # a new trial builds its sessions
            self._seen, self._ran = set(), False
        digest = hashlib.sha256(model.SerializeToString()).hexdigest()
        dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        quantized = {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq}
        cost = 1.0 + sum(self.int8[g] if g in quantized else self.float_ms for g in GROUPS)
        cost += self.boundary * (len(GROUPS) - len(quantized)) if quantized else 0.0  # float among int8: Q/DQ
        cost += self.jitter if digest in self._seen else 0.0
        self._seen.add(digest)
        return {"ms": cost}

    def run(self, session, feeds):
        self.clock.now += session["ms"] / 1e3
        self.clock.runs += 1
        self._ran = True
        return []


@pytest.fixture()
def clock(monkeypatch, tmp_path):
    fake = FakeClock()
    monkeypatch.setattr(latency_guard, "clock", fake)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # studies (and their trial caches) under tmp_path
    return fake


def _study(registry, tmp_path, backend):
    tmp_path.mkdir(parents=True, exist_ok=True)
    x = tiny_cnn(tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    return prepare(str(tmp_path / "tiny.onnx"), str(tmp_path / "calib.npz"), registry=registry, backend=backend,
                   samples=1, folder=str(tmp_path / "study"))


def test_the_group_slower_in_int8_is_kept_float_and_the_others_int8(registry, clock, tmp_path):
    backend = FakeBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0})
    study = _study(registry, tmp_path, backend)
    result = guard_latency(study, max_intensity=0, rounds=5)
    assert result.float_groups == ["conv_b"] and result.float_nodes == ("conv_b",) and result.kept == "guarded"
    assert result.noise_ms == pytest.approx(0.1)
    assert result.screen["conv_b"]["int8_ms"] - result.screen["conv_b"]["float_ms"] == pytest.approx(2.0)
    c = result.confirm  # fp32 1+3*3 (its A/A pair averaged), int8 1+1+5+1, guarded 1+1+3+1
    assert (c["fp32_ms"], c["int8_ms"], c["guarded_ms"]) == pytest.approx((10.05, 8.0, 6.0))
    assert not result.warnings


def test_a_difference_within_the_noise_keeps_int8(registry, clock, tmp_path):
    backend = FakeBackend(clock, {"conv_a": 1.0, "conv_b": 3.3, "conv_c": 1.0}, jitter=0.5)
    result = guard_latency(_study(registry, tmp_path, backend), max_intensity=0, rounds=5)
    assert result.float_groups == [] and result.kept == "int8" and result.noise_ms == pytest.approx(0.5)


def test_a_second_run_times_nothing(registry, clock, tmp_path):
    backend = FakeBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0})
    study = _study(registry, tmp_path, backend)
    first = guard_latency(study, max_intensity=0, rounds=5)
    runs = clock.runs
    second = guard_latency(study, max_intensity=0, rounds=5)
    assert first.timed_runs == 3 and second.timed_runs == 0 and clock.runs == runs  # probe, screen, confirm
    assert second.float_groups == first.float_groups and second.confirm == first.confirm


def test_int8_slower_than_fp32_on_the_whole_model_keeps_it_float(registry, clock, tmp_path):
    # each group is 0.4 ms slower in int8, within the 0.5 ms noise alone, 1.2 ms slower all together
    backend = FakeBackend(clock, dict.fromkeys(GROUPS, 3.4), jitter=0.5)
    result = guard_latency(_study(registry, tmp_path, backend), max_intensity=0, rounds=5)
    assert result.kept == "fp32" and sorted(result.float_nodes) == list(GROUPS)
    assert "slower than fp32" in result.warnings[0]


def test_the_time_cap_times_only_the_least_intense_candidates(registry, clock, tmp_path):
    backend = FakeBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0})
    result = guard_latency(_study(registry, tmp_path, backend), max_intensity=0, rounds=5, seconds=1e-6)
    assert result.screen == {} and result.untimed == 3 and result.float_groups == [] and result.confirm


def test_the_pass_adds_its_float_groups_for_place_qdq(registry, clock, tmp_path):
    from graphopt.calib.sources import input_specs, load_calibration
    from graphopt.ir import load_model
    from graphopt.passes.base import PassContext
    from graphopt.passes.manager import PassManager
    from graphopt.passes.pipeline import resolve

    np.savez(tmp_path / "calib.npz", x=tiny_cnn(tmp_path / "tiny.onnx"))
    backend = FakeBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0})
    graph = load_model(str(tmp_path / "tiny.onnx"))
    ctx = PassContext(backend=backend, registry=registry)
    ctx.calibration = load_calibration(str(tmp_path / "calib.npz"), input_specs(graph))
    passes = resolve("int8-guarded", registry)
    assert [p.name for p in passes] == ["insert-observers", "calibrate", "latency-guard", "place-qdq"]
    passes[2] = type(passes[2])(type(passes[2].options)(max_intensity=0, rounds=5, guard="on"))
    out, _ = PassManager(passes, [], ctx).run(graph, in_place=False)
    model = out.to_model()
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    int8 = {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq}
    assert int8 == {"conv_a", "conv_c"}


class FakeProfiledBackend(FakeBackend):
    """FakeBackend with a profiler: per group one kernel named as onnxruntime names it (float: the NCHWc
    convolution after its output tensor, the fused Relu's for conv_b; int8: QLinearConv after its node), costing
    what the clock charges, plus the conversions an int8 graph has (the input's Q, a layout Transpose, the
    output's DQ), which belong to their neighbouring groups."""

    def profile_kernels(self, model, feeds, runs=5, threads=1):
        model = _proto(model)
        dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        int8 = {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq}
        float_names = {"conv_a": "a", "conv_b": "br", "conv_c": "y"}
        convs = [{"node": g, "op": "QLinearConv", "us": 1e3 * self.int8[g]} if g in int8 else
                 {"node": float_names[g], "op": "Conv", "us": 1e3 * self.float_ms} for g in GROUPS]
        if not int8:
            return convs
        return [{"node": "x_QuantizeLinear", "op": "QuantizeLinear", "us": 10.0},
                {"node": "Transpose", "op": "Transpose", "us": 10.0}, *convs,
                {"node": "y_DequantizeLinear", "op": "DequantizeLinear", "us": 10.0}]


def test_the_group_whose_int8_kernels_profile_slower_is_the_one_candidate(registry, clock, tmp_path):
    backend = FakeProfiledBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0})
    result = guard_latency(_study(registry, tmp_path, backend), rounds=5)
    assert result.profile == {"conv_a": {"float_us": 3000.0, "int8_us": 1020.0},  # + the input's Q and Transpose
                              "conv_b": {"float_us": 3000.0, "int8_us": 5000.0, "mixed_us": 3000.0},
                              "conv_c": {"float_us": 3000.0, "int8_us": 1010.0}}  # + the output's DQ
    assert result.kernels_ms == pytest.approx({"fp32": 9.0, "int8": 7.03}) and result.possible_ms == pytest.approx(2.0)
    assert result.candidates == 1 and result.float_groups == ["conv_b"] and result.kept == "guarded"
    assert result.noise_ms == pytest.approx(0.1)  # the int8 A/A pair of the timed trial
    c = result.confirm  # int8 1+1+5+1 (its A/A pair averaged), guarded 1+1+3+1; fp32 not timed: the profile was clear
    assert c == pytest.approx({"int8_ms": 8.05, "guarded_ms": 6.0, "noise_ms": 0.1})
    assert result.timed_runs == 3  # fp32 and int8 profiled; conv_b float profiled; int8 twice and conv_b float timed


def test_a_profiled_candidate_below_min_gain_is_neither_profiled_in_context_nor_timed(registry, clock, tmp_path):
    # int8 conv_b 3.2 ms in its kernels vs 3 float: a candidate, but 0.2 ms is less than 5 % of int8's 5.23 ms
    backend = FakeProfiledBackend(clock, {"conv_a": 1.0, "conv_b": 3.2, "conv_c": 1.0}, jitter=0.5)
    result = guard_latency(_study(registry, tmp_path, backend), rounds=5)
    assert result.candidates == 1 and result.possible_ms == pytest.approx(0.2)
    assert result.float_groups == [] and result.kept == "int8" and result.confirm == {}
    assert result.timed_runs == 1 and clock.runs == 0 and "mixed_us" not in result.profile["conv_b"]
    # with min_gain 2 % (0.105 ms) and margin 5 % it is profiled in context (3 ms: a winner) and timed, and the
    # whole model's 0.2 ms gain is within the 0.5 ms noise: int8 kept
    result = guard_latency(_study(registry, tmp_path / "again", backend), rounds=5, min_gain=0.02, margin=0.05)
    assert result.timed_runs == 3 and result.profile["conv_b"]["mixed_us"] == 3000.0
    assert result.kept == "int8" and result.noise_ms == pytest.approx(0.5)


def test_a_profiled_candidate_slower_on_the_whole_model_stays_int8(registry, clock, tmp_path):
    # conv_b's kernels lose 2 ms in int8, but float among int8 neighbours its conversions cost 2.5 ms more
    backend = FakeProfiledBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0}, boundary=2.5)
    result = guard_latency(_study(registry, tmp_path, backend), rounds=5)
    assert result.candidates == 1 and result.profile["conv_b"]["mixed_us"] == 3000.0
    assert result.float_groups == [] and result.kept == "int8" and result.timed_runs == 3


def test_a_gain_below_min_gain_keeps_int8_and_stops_the_rounds_early(registry, clock, tmp_path):
    # conv_b float saves 2 ms of kernels but its conversions cost 1.9: the whole model is 0.1 ms (1.25 %) faster,
    # beyond the A/A noise (0.01 ms) but not min_gain (5 % of 8 ms), and clearly so after MIN_ROUNDS rounds
    backend = FakeProfiledBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0}, boundary=1.9, jitter=0.01)
    result = guard_latency(_study(registry, tmp_path, backend), rounds=20)
    assert result.float_groups == [] and result.kept == "int8" and result.timed_runs == 3
    assert result.confirm["int8_ms"] - result.confirm["guarded_ms"] == pytest.approx(0.0)
    assert clock.runs == 3 * 1 + 3 * latency_guard.MIN_ROUNDS  # one warm-up run each, then the shortest trial
    # a 1.2 ms (15 %) gain is kept
    backend = FakeProfiledBackend(clock, {"conv_a": 1.0, "conv_b": 5.0, "conv_c": 1.0}, boundary=0.8, jitter=0.01)
    result = guard_latency(_study(registry, tmp_path / "again", backend), rounds=20)
    assert result.float_groups == ["conv_b"] and result.confirm["guarded_ms"] == pytest.approx(6.8)


def test_no_profiled_candidate_is_one_trial_that_times_nothing(registry, clock, tmp_path):
    backend = FakeProfiledBackend(clock, dict.fromkeys(GROUPS, 1.0))
    result = guard_latency(_study(registry, tmp_path, backend), rounds=20)
    assert result.candidates == 0 and result.screen == {} and result.kept == "int8" and result.timed_runs == 1
    assert result.confirm == {} and clock.runs == 0  # int8's kernels (3.03 ms) clearly below fp32's (9 ms)


def test_fp32_is_timed_where_the_profile_does_not_show_int8_clearly_faster(registry, clock, tmp_path):
    # every int8 kernel 3.2 ms vs 3 float: 9.63 ms of kernels against 9, and 10.6 ms against 10 on the whole model
    backend = FakeProfiledBackend(clock, dict.fromkeys(GROUPS, 3.2))
    result = guard_latency(_study(registry, tmp_path, backend), rounds=5)
    assert result.kept == "fp32" and sorted(result.float_nodes) == list(GROUPS)
    assert result.confirm["fp32_ms"] == pytest.approx(10.0) and "slower than fp32" in result.warnings[0]
    # 2.9 ms each: 8.7 ms of kernels, not below 90 % of fp32's, so timed: 9.7 ms against 10, int8 kept
    backend = FakeProfiledBackend(clock, dict.fromkeys(GROUPS, 2.9))
    result = guard_latency(_study(registry, tmp_path / "again", backend), rounds=5)
    assert result.kept == "int8" and result.timed_runs == 2 and result.confirm["fp32_ms"] == pytest.approx(10.0)


def real_profiles(registry, zoo_onnx, tmp_path, backend_name: str):
    """``(study, fp32 kernels, int8 kernels, Conv group names)``: the tiny ResNet's study on ``backend_name`` and
    that backend's own profile of its float and int8 graphs (one sample, two runs)."""
    backend = get_backend(registry, backend_name)
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).normal(0, 1, (4, 3, 32, 32)).astype(np.float32))
    study = prepare(zoo_onnx("tiny_resnet", keep_bn=False), str(tmp_path / "calib.npz"), registry=registry,
                    backend=backend, samples=1, folder=str(tmp_path / "study"))
    feeds = {k: v[:1] for k, v in study.data.items()}
    fp32 = backend.profile_kernels(study.graph.to_model(), feeds, runs=2)
    int8 = backend.profile_kernels(study.quantized().to_model(), feeds, runs=2)
    return study, fp32, int8, {g.name for g in study.groups if g.op == "Conv"}


def test_a_real_profile_maps_every_conv_group(registry, zoo_onnx, tmp_path):
    from graphopt.report.kernel_profile import kernel_groups, profile_units

    study, fp32, int8, convs = real_profiles(registry, zoo_onnx, tmp_path, "onnxruntime")
    assert len(convs) >= 5 and {k["op"] for k in int8} >= {"QLinearConv"}
    assert convs <= set(kernel_groups(study, int8))  # each int8 convolution is its own QLinearConv
    assert convs <= set(kernel_groups(study, fp32))  # each float one an (NCHWc) Conv, named after its output
    units = profile_units(study, fp32, int8)
    grouped = [g for u in units for g in u.groups]
    assert len(grouped) == len(set(grouped)) and convs <= set(grouped)
    assert all(u.float_us > 0 and u.int8_us > 0 for u in units if set(u.groups) & convs)


def test_a_real_run_on_onnxruntime(registry, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    study = _study(registry, tmp_path, get_backend(registry, "onnxruntime"))
    result = guard_latency(study, rounds=5, seconds=30)
    c, k = result.confirm, result.kernels_ms
    assert set(result.profile) == set(GROUPS) and result.timed_runs in (1, 2, 3) and k["fp32"] > 0 and k["int8"] > 0
    assert all(c[k] > 0 for k in c if k != "noise_ms") and set(result.float_nodes) <= set(GROUPS) and not result.screen
    # the choice is consistent with the rules it states: candidates are the units int8 did not clearly win in the
    # profile; what is kept float was among them and made the whole model faster than int8 by min_gain; nothing is
    # timed where int8's kernels are clearly faster than fp32's and no candidate could gain min_gain
    losing = {name for name, row in result.profile.items() if row["int8_us"] > 0.9 * row["float_us"]}
    assert result.candidates == len(losing) and (set(result.float_groups) <= losing or result.kept == "fp32")
    if not c:
        assert k["int8"] <= 0.9 * k["fp32"] and result.kept == "int8"
    if result.kept == "guarded":
        assert c["guarded_ms"] < 0.95 * c["int8_ms"]
    assert guard_latency(study, rounds=5, seconds=30).timed_runs == 0


def test_a_real_run_without_the_profile(registry, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    study = _study(registry, tmp_path, get_backend(registry, "onnxruntime"))
    result = guard_latency(study, max_intensity=0, rounds=5, seconds=30, profile=False)
    assert set(result.screen) == set(GROUPS) and result.timed_runs == 3 and not result.profile
    assert all(result.confirm[k] > 0 for k in ("fp32_ms", "int8_ms", "guarded_ms"))


def test_min_gain_is_an_option_of_int8_guarded(registry):
    from graphopt.errors import GraphoptError
    from graphopt.passes.pipeline import resolve

    guard = [p for p in resolve("int8-guarded:min_gain=0.1", registry) if p.name == "latency-guard"][0]
    assert guard.options.min_gain == 0.1
    with pytest.raises(GraphoptError, match="min_gain"):
        resolve("int8-guarded:min_gain=1.5", registry)


def _run_int8(registry, tmp_path, backend, passes="int8", warnings: list | None = None):
    """``passes`` on the tiny CNN with ``backend``: (the latency guard's notes, the Convs left int8); the run's
    warnings go into ``warnings``."""
    from graphopt.calib.sources import input_specs, load_calibration
    from graphopt.ir import load_model
    from graphopt.passes.base import PassContext
    from graphopt.passes.manager import PassManager
    from graphopt.passes.pipeline import resolve

    np.savez(tmp_path / "calib.npz", x=tiny_cnn(tmp_path / "tiny.onnx"))
    graph = load_model(str(tmp_path / "tiny.onnx"))
    ctx = PassContext(backend=backend, registry=registry)
    ctx.calibration = load_calibration(str(tmp_path / "calib.npz"), input_specs(graph))
    out, report = PassManager(resolve(passes, registry), [], ctx).run(graph, in_place=False)
    notes = [n for r in report.records if r.name == "latency-guard" for n in r.notes]
    if warnings is not None:
        warnings.extend(ctx.warnings)
    model = out.to_model()
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return notes, {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq}


def test_int8_guards_by_default_where_the_backend_profiles(registry, clock, tmp_path, monkeypatch):
    # int8 = insert-observers,calibrate,latency-guard(guard=auto),place-qdq: on a backend that profiles the graph it
    # runs, the guard decides (here conv_b's int8 kernels are 5x slower, and so is the model: it stays float)
    monkeypatch.delenv("GRAPHOPT_NO_TIMING")
    notes, int8 = _run_int8(registry, tmp_path, FakeProfiledBackend(clock, {"conv_a": 1.0, "conv_b": 15.0,
                                                                             "conv_c": 1.0}))
    assert int8 == {"conv_a", "conv_c"} and "conv_b" in notes[0]


def test_guard_auto_makes_no_choice_by_timing_where_it_cannot_or_must_not(registry, clock, tmp_path, monkeypatch):
    slow_b = {"conv_a": 1.0, "conv_b": 15.0, "conv_c": 1.0}
    # $GRAPHOPT_NO_TIMING (the suite sets it): the same graph on every machine
    notes, int8 = _run_int8(registry, tmp_path, FakeProfiledBackend(clock, slow_b))
    assert int8 == set(GROUPS) and "GRAPHOPT_NO_TIMING" in notes[0] and clock.now == 0.0
    # a backend that cannot profile: nothing timed unless asked (guard=on)
    monkeypatch.delenv("GRAPHOPT_NO_TIMING")
    notes, int8 = _run_int8(registry, tmp_path, FakeBackend(clock, slow_b))
    assert int8 == set(GROUPS) and "guard=on" in notes[0] and clock.now == 0.0
    # int8:guard=off reaches the guard through the alias
    notes, int8 = _run_int8(registry, tmp_path, FakeProfiledBackend(clock, slow_b), "int8:guard=off")
    assert int8 == set(GROUPS) and "guard=off" in notes[0] and clock.now == 0.0


def test_int8_on_a_pytorch_model_skips_the_guard(registry):
    import torch

    import graphopt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    result = graphopt.optimize(model, "int8", example_inputs=(x,), calibration=torch.randn(8, 3, 16, 16).numpy(),
                               backend="x86", check=False)
    notes = [n for r in result.report.records if r.name == "latency-guard" for n in r.notes]
    assert notes and "PyTorch" in notes[0]



def test_a_callers_own_context_with_calibration_arrays_reaches_every_pass(tmp_path, monkeypatch):
    # graphopt.optimize(path, "fold,int8", ctx=PassContext(calibration={name: array})): the driver opens the arrays as
    # it opens calibration=, so the guard (which reads a sample from them) and the budget see CalibrationData too
    import graphopt
    from graphopt.passes.base import PassContext

    monkeypatch.delenv("GRAPHOPT_NO_TIMING")
    x = tiny_cnn(tmp_path / "tiny.onnx")
    for passes in ("fold,int8-guarded:seconds=5", "fold,int8-budget:min_cosine=0.9"):
        result = graphopt.optimize(str(tmp_path / "tiny.onnx"), passes, ctx=PassContext(calibration={"x": x}),
                                   check=False)
        guard = [r for r in result.report.records if r.name == "latency-guard"]
        assert guard and guard[0].notes, passes  # it ran and said what it decided (tiny convs may stay float)


def test_a_model_that_stays_float_gets_no_qdq_at_all(registry, clock, tmp_path, monkeypatch):
    """When int8 is slower than fp32 the model stays float: nothing is quantized, also outside the groups the guard
    studied (a BERT-like's bias Adds and Reshapes kept 15 Q/DQ pairs, 1.4x slower than fp32)."""
    monkeypatch.delenv("GRAPHOPT_NO_TIMING")
    decided = latency_guard.GuardResult(["conv_a"], ("conv_a",), latency_guard.FP32, 3)  # one group, as if studied
    monkeypatch.setattr(latency_guard, "guard_latency", lambda study, **options: decided)
    notes, int8 = _run_int8(registry, tmp_path, FakeProfiledBackend(clock, {}))
    assert int8 == set() and "stays float" in notes[0]


def test_every_group_kept_float_is_said_as_a_warning(registry, clock, tmp_path, monkeypatch):
    """Every group faster in float (each on its own, so the model is 'guarded', not 'fp32'): the int8 run writes a
    float model, and says so as a warning, not only in a note."""
    monkeypatch.delenv("GRAPHOPT_NO_TIMING")
    decided = latency_guard.GuardResult(list(GROUPS), GROUPS, "guarded", 3)
    monkeypatch.setattr(latency_guard, "guard_latency", lambda study, **options: decided)
    warnings: list[str] = []
    _, int8 = _run_int8(registry, tmp_path, FakeProfiledBackend(clock, {}), warnings=warnings)
    assert int8 == set()
    assert any("every group ran faster in float" in w and "guard=off" in w for w in warnings), warnings


def test_the_guard_times_the_placement_that_will_be_written(registry, clock, tmp_path, monkeypatch):
    """place-qdq's own exclusions (a replayed recipe, int8:exclude_nodes=...) are part of what the guard times: it
    timed the fully int8 placement, kept float what was excluded already, and let a slower model through."""
    monkeypatch.delenv("GRAPHOPT_NO_TIMING")
    seen = {}

    def guard(study, **options):
        seen["place"] = study.place_text
        return latency_guard.GuardResult([], (), "int8", 0)

    monkeypatch.setattr(latency_guard, "guard_latency", guard)
    _run_int8(registry, tmp_path, FakeProfiledBackend(clock, {}), "int8:exclude_nodes=conv_b")
    assert "exclude_nodes=conv_b" in seen["place"]
