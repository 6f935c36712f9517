"""Executors: in-process, local processes and Ray give the same results in the same order, a resumed sweep reruns
no finished trial, latency trials never overlap, and a local Ray head is locked down (loopback, short temp dir,
token under the run's folder)."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphopt.errors import UnsupportedError, UsageError
from graphopt.executors import InProcess, LocalProcesses, get_executor, parse_executor, trial_key

HAVE_RAY = importlib.util.find_spec("ray") is not None
X = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)


def model_sum(item: dict) -> float:
    """A trial: build Relu(X * scale + 1) as ONNX, run it on onnxruntime (1 thread), return the output's sum. Leaves
    one marker file per call in ``item["marks"]`` (counted across processes); fails while ``stop`` is there."""
    marks = item["marks"]
    if os.path.exists(os.path.join(marks, "stop")) and item["scale"] >= 3:
        raise RuntimeError("interrupted")
    with open(os.path.join(marks, f"{item['scale']}-{os.getpid()}-{time.time_ns()}"), "w"):
        pass
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "one"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [item["scale"]]),
         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return float(session.run(None, {"x": X})[0].sum())


def refuse(item) -> None:
    raise UsageError(f"trial {item}: labels of the wrong length")


def expected(scale: float) -> float:
    return float(np.maximum(X * scale + 1, 0).sum())


def interval(seconds: float) -> list:
    """A latency trial: (start, end) of a busy wait of ``seconds``."""
    start = time.time()
    while time.time() - start < seconds:
        pass
    return [start, time.time(), os.getpid()]


def thread_share(item) -> list:
    """A trial: the intra-op threads a session made with threads=0 gets here, and $OMP_NUM_THREADS (torch's)."""
    from graphopt.backends.base import default_threads

    return [default_threads(), os.environ.get("OMP_NUM_THREADS")]


def calls(marks) -> int:
    return sum(1 for name in os.listdir(marks) if name != "stop")


def items(marks, scales=(0.5, 1.0, 2.0, 3.0, 0.5, 4.0)):
    return [{"scale": s, "marks": str(marks)} for s in scales]


def test_key_is_content_addressed():
    a, b = {"scale": 1.0, "marks": "m"}, {"marks": "m", "scale": 1.0}
    assert trial_key(model_sum, a) == trial_key(model_sum, b)
    assert trial_key(model_sum, a) != trial_key(model_sum, {"scale": 2.0, "marks": "m"})
    assert trial_key(model_sum, a) != trial_key(interval, a)


def test_in_process_and_processes_agree_and_repeat_nothing(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    got = InProcess(str(tmp_path / "a")).map(model_sum, items(marks))
    assert got == pytest.approx([expected(s) for s in (0.5, 1.0, 2.0, 3.0, 0.5, 4.0)], rel=1e-6)
    assert calls(marks) == 5  # the repeated item ran once
    with LocalProcesses(2, str(tmp_path / "b")) as ex:
        assert ex.map(model_sum, items(marks)) == got
    assert calls(marks) == 10
    # a trial that returns a tuple gives a list on every executor (results go through JSON)
    assert InProcess().map(interval, [0.0])[0].__class__ is list


def test_resumed_sweep_reruns_no_finished_trial(tmp_path):
    marks, run = tmp_path / "marks", str(tmp_path / "run")
    marks.mkdir()
    (marks / "stop").touch()  # trials with scale >= 3 fail: the sweep stops part-way
    with LocalProcesses(2, run) as ex, pytest.raises(RuntimeError, match="interrupted"):
        ex.map(model_sum, items(marks))
    finished = calls(marks)
    assert finished >= 3  # 0.5, 1.0, 2.0 ran (and are stored); 4.0 may have been cancelled or failed
    assert len(os.listdir(os.path.join(run, "trials"))) == finished
    (marks / "stop").unlink()
    resumed = InProcess(run)  # any executor resumes from the run's folder (the cache is shared code)
    got = resumed.map(model_sum, items(marks))
    assert resumed.calls == 2 and calls(marks) == finished + 2  # only 3.0 and 4.0 ran
    assert got == pytest.approx([expected(s) for s in (0.5, 1.0, 2.0, 3.0, 0.5, 4.0)], rel=1e-6)
    again = InProcess(run)
    assert again.map(model_sum, items(marks)) == got and again.calls == 0 and calls(marks) == finished + 2


def test_latency_trials_never_overlap(tmp_path):
    with LocalProcesses(2, str(tmp_path)) as ex:
        spans = ex.map(interval, [0.15, 0.16, 0.17, 0.18], kind="latency")
    spans.sort()
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:]))
    with pytest.raises(UsageError, match="trial kind"):
        InProcess().map(interval, [0.1], kind="speed")


def test_workers_get_their_share_of_the_cores(tmp_path, monkeypatch):
    # two workers side by side must not each start a pool of every core: a session with threads=0 follows the share
    from graphopt.executors.base import usable_cpus

    monkeypatch.delenv("GRAPHOPT_THREADS", raising=False)
    assert InProcess().map(thread_share, [0]) == [[0, os.environ.get("OMP_NUM_THREADS")]]
    with LocalProcesses(2, str(tmp_path)) as ex:
        share = max(1, usable_cpus() // 2)
        assert ex.map(thread_share, [1, 2]) == [[share, str(share)]] * 2


def nap(seconds: float) -> float:
    """A trial that sleeps ``seconds`` (a long one keeps its worker busy)."""
    time.sleep(seconds)
    return seconds


def test_ctrl_c_stops_the_workers_at_once(tmp_path, monkeypatch):
    """Ctrl-C during a sweep on processes: the workers (which leave SIGINT to the driver) are stopped at once, not
    waited for; a second Ctrl-C while the pool shut down left the driver waiting on its workers for good. What
    finished is stored."""
    from graphopt.executors.base import TrialCache

    real_put = TrialCache.put

    def put_then_interrupt(self, key, fn_name, item, result):
        real_put(self, key, fn_name, item, result)
        raise KeyboardInterrupt  # as if Ctrl-C came right after the first trial finished

    monkeypatch.setattr(TrialCache, "put", put_then_interrupt)
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        with LocalProcesses(2, str(tmp_path)) as ex:
            ex.map(nap, [0.0, 60.0])
    assert time.time() - start < 30  # the 60 s trial was not waited for
    assert ex._pool is None
    assert len(os.listdir(tmp_path / "trials")) == 1  # the finished trial is stored


def test_get_executor_specs(tmp_path):
    assert isinstance(get_executor(None, str(tmp_path)), LocalProcesses)
    assert get_executor("processes:3", str(tmp_path)).workers == 3
    assert isinstance(get_executor("inprocess", str(tmp_path)), InProcess)
    for bad in ("processes:0", "processes:²", "threads", "ray:localhost:6379", "ray://", "ray://:"):
        with pytest.raises(UsageError):  # "²".isdigit() is true: it was int()'s ValueError, exit 70
            get_executor(bad, str(tmp_path))
    assert parse_executor("ray://head.example:10001") == ("ray", "ray://head.example:10001")


def test_a_bad_executor_is_refused_before_any_work(tmp_path, capsys):
    """--executor is checked when the run is set up, not when a search first starts it (after calibration, the
    latency guard and writing a study), and also where no search would use it."""
    from graphopt.cli import main

    model = tmp_path / "m.onnx"
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4), np.float32))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    with open(model, "wb") as f:
        f.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    for argv in (["run", str(model), "--passes", "fold", "--executor", "bogus", "-o", str(tmp_path / "o.onnx")],
                 ["sensitivity", str(model), "--calib", str(tmp_path / "c.npz"), "--executor", "processes:0"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["c.npz", "m.onnx"]
    with pytest.raises(UsageError, match="module level"):
        InProcess().map(lambda x: x, [1])


def test_ray_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UnsupportedError) as info:
        get_executor("ray", str(tmp_path))
    assert "pip install 'graphopt[ray]'" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One local Ray head for this module's Ray tests (starting one takes several seconds)."""
    if not HAVE_RAY:
        pytest.skip("ray is not installed (pip install 'graphopt[ray]')")
    from graphopt.executors.ray import RayExecutor

    run = tmp_path_factory.mktemp("a-run-folder-with-a-long-name-like-pytest-makes-" + "x" * 40)
    ex = RayExecutor(None, str(run), num_cpus=2)
    yield ex, run
    ex.close()
    assert not ex.ray.is_initialized()


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) listening on TCP ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_ray_agrees_with_local_executors(ray_head, tmp_path):
    ex, _ = ray_head
    marks = tmp_path / "marks"
    marks.mkdir()
    local = InProcess().map(model_sum, items(marks))
    assert ex.map(model_sum, items(marks)) == local
    assert ex.map(thread_share, [3]) == [[1, "1"]]  # an accuracy task holds one CPU: one thread
    spans = sorted(ex.map(interval, [0.1, 0.11, 0.12], kind="latency"))
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:]))


def test_ray_local_head_is_locked_down(ray_head):
    ex, run = ray_head
    node = ex.ray._private.worker.global_worker.node
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 in /proc/net/tcp and tcp6
    for port in (int(node.gcs_address.rpartition(":")[2]), node.node_manager_port):
        assert _listening(port) and _listening(port) <= loopback
    sockets = [os.path.join(d, f) for d, _, files in os.walk(ex.temp_dir) for f in files
               if stat.S_ISSOCK(os.lstat(os.path.join(d, f)).st_mode)]
    assert sockets and max(len(s.encode()) for s in sockets) <= 107
    token = run / "ray_auth_token"
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600 and len(token.read_text()) == 64
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0" and os.environ["RAY_AUTH_MODE"] == "token"


def test_a_graphopt_error_in_a_ray_trial_reaches_the_user_as_itself(ray_head):
    """Not Ray's coloured RayTaskError with the worker's traceback (an 'internal error' on the command line): the
    one line the in-process executor gives."""
    ex, _ = ray_head
    with pytest.raises(UsageError, match="trial 3: labels of the wrong length"):
        InProcess().map(refuse, [3])
    with pytest.raises(UsageError) as caught:
        ex.map(refuse, [3])
    assert type(caught.value) is UsageError and str(caught.value) == "trial 3: labels of the wrong length"
