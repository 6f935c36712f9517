"""onnx's backend test cases, found and fed the way onnx's own runner (onnx/backend/test/runner) feeds them.

Folders (``FOLDERS``):

- ``simple``, ``pytorch-converted``, ``pytorch-operator``: shipped in the onnx wheel under
  ``onnx/backend/test/data/<folder>/<test>/``: ``model.onnx`` and ``test_data_set_N/{input,output}_K.pb``.
- ``light``: the nine ``onnx/backend/test/data/light/light_<model>.onnx`` files, which onnx runs only through the
  ``real`` kind (``data/real/test_<model>/data.json`` names the file and the tolerances; ``real`` has no model of its
  own, so each is counted once, here, under onnx's test name). They are IR version 3: every initializer is also a
  graph input, and the weights are ``ConstantOfShape`` of shape initializers. Like onnx's runner, only the graph
  inputs that are not initializers are fed, with ``Runner.generate_dummy_data`` (``arange(n) / n``), and the
  expected output is ``light_<model>_output_0.pb``.
- ``node``: not shipped in the wheel. Generated once per onnx version with onnx's own generator
  (``onnx.backend.test.case.node.collect_testcases``; ``cmd_tools.py generate-data`` writes only ``simple`` and
  ``real`` in onnx 1.23) into ``~/.cache/graphopt-conformance/<onnx version>/node`` (``GRAPHOPT_CONFORMANCE_CACHE``
  moves it), in the same layout as the shipped folders, written the way ``cmd_tools.generate_data`` writes them.

Outputs are compared with onnx's ``Runner.assert_similar_outputs`` (same count, shape, dtype, then
``assert_allclose`` at the case's ``rtol``/``atol``: 1e-3 / 1e-7 unless its data.json says otherwise).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

SHIPPED = ("simple", "pytorch-converted", "pytorch-operator")
FOLDERS = ("node", *SHIPPED, "light")
ALIASES = {"real": "light"}
RTOL, ATOL = 1e-3, 1e-7


@dataclass(frozen=True)
class Case:
    folder: str
    name: str
    model: str  # path of the model file
    data: tuple[str, ...]  # test_data_set_N folders; empty for `light`: dummy input, expected output in `expected`
    rtol: float = RTOL
    atol: float = ATOL
    expected: str = ""  # light: light_<model>_output_0.pb

    @property
    def id(self) -> str:
        return f"{self.folder}/{self.name}"

    def to_dict(self) -> dict:
        return {**asdict(self), "data": list(self.data)}

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(**{**d, "data": tuple(d["data"])})


def data_dir() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")


def cache_dir() -> str:
    root = os.environ.get("GRAPHOPT_CONFORMANCE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "graphopt-conformance")
    return os.path.join(root, onnx.__version__)


def generator_available() -> str | None:
    """None when onnx's node-case generator can be imported, else why not (a skip reason)."""
    try:
        import onnx.backend.test.case.node  # noqa: F401
    except Exception as exc:  # the wheel may be built without the test cases
        return f"onnx {onnx.__version__} has no backend test case generator ({type(exc).__name__}: {exc})"
    if not os.path.isdir(data_dir()):
        return f"onnx {onnx.__version__} ships no backend test data at {data_dir()}"
    return None


# -- collecting -------------------------------------------------------------------------------------------------
def collect(folders=FOLDERS, log=print, node_root: str | None = None) -> list[Case]:
    """Every case of ``folders``; node cases from ``node_root`` when given, else from the cache (made if absent)."""
    cases: list[Case] = []
    for folder in folders:
        folder = ALIASES.get(folder, folder)
        if folder == "node":
            cases += _dir_cases("node", node_root or ensure_node_cases(log))
        elif folder == "light":
            cases += _light_cases()
        elif folder in SHIPPED:
            cases += _dir_cases(folder, os.path.join(data_dir(), folder))
        else:
            raise ValueError(f"unknown folder {folder!r} (known: {', '.join(FOLDERS)}, real)")
    return cases


def _dir_cases(folder: str, root: str) -> list[Case]:
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "model.onnx")
        if os.path.exists(path):
            sets = tuple(sorted(glob.glob(os.path.join(root, name, "test_data_set_*"))))
            rtol, atol = _tolerances(os.path.join(root, name, "data.json"))
            out.append(Case(folder, name, path, sets, rtol, atol))
    return out


def _tolerances(path: str) -> tuple[float, float]:
    if not os.path.exists(path):
        return RTOL, ATOL
    with open(path) as f:
        data = json.load(f)
    return data.get("rtol", RTOL), data.get("atol", ATOL)


def _light_cases() -> list[Case]:
    out = []
    real = os.path.join(data_dir(), "real")
    for name in sorted(os.listdir(real)):
        with open(os.path.join(real, name, "data.json")) as f:
            data = json.load(f)
        url = data["url"]  # "onnx/backend/test/data/light/light_<model>.onnx"
        if not url.startswith("onnx/backend/test/data/light/"):
            continue  # a model onnx would download: nothing here downloads
        path = os.path.join(data_dir(), "light", os.path.basename(url))
        expected = os.path.splitext(path)[0] + "_output_0.pb"
        out.append(Case("light", name, path, (), data.get("rtol", RTOL), data.get("atol", ATOL), expected))
    return out


def ensure_node_cases(log=print) -> str:
    """The folder of generated node cases, generating it first when this onnx version has none cached."""
    root = os.path.join(cache_dir(), "node")
    if os.path.exists(os.path.join(root, ".complete")):
        return root
    log(f"generating onnx {onnx.__version__}'s node test cases into {root} (once)")
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".node-", dir=cache_dir())
    count = write_node_cases(tmp)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(f"{count}\n")
    try:
        if os.path.exists(root):
            shutil.rmtree(root)  # an incomplete earlier attempt
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_node_cases(root: str, names: set[str] | None = None) -> int:
    """Write onnx's node test cases (those in ``names``, or all) into ``root``; returns how many."""
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings():  # the generators' own numpy warnings (1 / 0 on purpose, ...)
        warnings.simplefilter("ignore")
        generated = node_cases.collect_testcases()
    count = 0
    for case in generated:
        if names is None or case.name in names:
            _write_case(os.path.join(root, case.name), case.model, case.data_sets)
            count += 1
    return count


def _write_case(folder: str, model: onnx.ModelProto, data_sets) -> None:
    os.makedirs(folder)
    with open(os.path.join(folder, "model.onnx"), "wb") as f:
        f.write(model.SerializeToString())
    for i, (inputs, outputs) in enumerate(data_sets):
        sets = os.path.join(folder, f"test_data_set_{i}")
        os.makedirs(sets)
        for kind, values, infos in (("input", inputs, model.graph.input), ("output", outputs, model.graph.output)):
            for j, value in enumerate(values):
                with open(os.path.join(sets, f"{kind}_{j}.pb"), "wb") as f:
                    f.write(_to_proto(value, infos[j]).SerializeToString())


def _to_proto(value, info: onnx.ValueInfoProto):
    """As ``cmd_tools.generate_data`` writes a value of the graph input/output ``info``."""
    kind = info.type.WhichOneof("value")
    if kind == "map_type":
        return numpy_helper.from_dict(value, info.name)
    if kind == "sequence_type":
        return numpy_helper.from_list(value, info.name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, info.name)
    if isinstance(value, onnx.TensorProto):
        return value
    return numpy_helper.from_array(np.asarray(value), info.name)


# -- feeding and comparing ----------------------------------------------------------------------------------------
def _from_proto(path: str, type_proto: onnx.TypeProto):
    """As onnx's ``Runner._load_proto`` reads a value of type ``type_proto``."""
    with open(path, "rb") as f:
        content = f.read()
    if type_proto.HasField("sequence_type"):
        proto = onnx.SequenceProto()
        proto.ParseFromString(content)
        return numpy_helper.to_list(proto)
    if type_proto.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(content)
        return numpy_helper.to_optional(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(content)
    return numpy_helper.to_array(proto)


def fed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds: those that are not initializers (IR < 4 lists initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def data_sets(case: Case, model: onnx.ModelProto) -> list[tuple[dict, list]]:
    """[(feeds by input name, expected outputs)] for each of the case's data sets."""
    inputs = fed_inputs(model)
    if case.folder == "light":
        from onnx.backend.test.runner import Runner

        feeds = {x.name: Runner.generate_dummy_data(x, seed=0, name=case.name, random=False) for x in inputs}
        return [(feeds, [_from_proto(case.expected, model.graph.output[0].type)])]
    out = []
    for folder in case.data:
        n_in = len(glob.glob(os.path.join(folder, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(folder, "output_*.pb")))
        # onnx's runner reads input_i with the type of graph.input[i] and feeds them in that order
        feeds = {model.graph.input[i].name: _from_proto(os.path.join(folder, f"input_{i}.pb"),
                                                       model.graph.input[i].type) for i in range(n_in)}
        expected = [_from_proto(os.path.join(folder, f"output_{i}.pb"), model.graph.output[i].type)
                    for i in range(n_out)]
        out.append((feeds, expected))
    return out


def run_onnxruntime(model_path: str, sets: list[tuple[dict, list]], rtol: float, atol: float) -> str | None:
    """None when onnxruntime builds a session for the model and matches every data set's expected outputs, else
    the one-line reason (``session: ...``, ``run: ...`` or ``outputs: ...``)."""
    import onnxruntime as ort
    from onnx.backend.test.runner import Runner

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"session: {_line(exc)}"
    for feeds, expected in sets:
        try:
            outputs = session.run(None, feeds)
        except Exception as exc:
            return f"run: {_line(exc)}"
        try:
            Runner.assert_similar_outputs(expected, outputs, rtol=rtol, atol=atol)
        except (AssertionError, TypeError, ValueError) as exc:
            return f"outputs: {_line(exc)}"
    return None


def _line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    text = " ".join(lines[:4]) if lines else type(exc).__name__
    return text[:400]
