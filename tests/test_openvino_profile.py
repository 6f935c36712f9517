"""The openvino backend's kernel profile (``profile_kernels``, from OpenVINO's performance counters): what the
latency guard reads. Its layers map back to graphopt's fusion groups in the float and the int8 model, so ``int8``
(guard=auto) guards on OpenVINO as on onnxruntime."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from graphopt.backends import get_backend
from graphopt.report.kernel_profile import kernel_groups, profile_units
from tests.test_latency_guard import real_profiles, tiny_cnn

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'graphopt[openvino]')")


def test_profile_kernels_returns_the_executed_layers_with_their_times(registry, tmp_path):
    x = tiny_cnn(tmp_path / "tiny.onnx")
    kernels = get_backend(registry, "openvino").profile_kernels(str(tmp_path / "tiny.onnx"), {"x": x[:1]}, runs=2)
    convs = [k for k in kernels if k["op"] == "Convolution"]
    # three convolutions, each with its Relu fused (no Relu layer executed), the last named after the output
    assert [k["node"] for k in convs] == ["conv_a", "conv_b", "y"] and all(k["us"] > 0 for k in convs)
    assert not any(k["op"] in ("Relu", "Parameter", "Result") for k in kernels)
    assert all(set(k) == {"node", "op", "us"} and k["us"] >= 0 for k in kernels)


def test_a_real_profile_maps_every_conv_group(registry, zoo_onnx, tmp_path):
    study, fp32, int8, convs = real_profiles(registry, zoo_onnx, tmp_path, "openvino")
    assert len(convs) >= 5 and {k["op"] for k in int8} >= {"Convolution"}
    # OpenVINO names a convolution after the Conv node (less the /WithoutBiases it appends), or after its output
    assert convs <= set(kernel_groups(study, int8))
    assert convs <= set(kernel_groups(study, fp32))
    units = profile_units(study, fp32, int8)
    grouped = [g for u in units for g in u.groups]
    assert len(grouped) == len(set(grouped)) and convs <= set(grouped)
    assert all(u.float_us > 0 and u.int8_us > 0 for u in units if set(u.groups) & convs)


def test_int8_guards_on_openvino_and_the_result_runs_there(registry, monkeypatch, tmp_path):
    import graphopt
    from graphopt.numeric import sqnr_db

    monkeypatch.delenv("GRAPHOPT_NO_TIMING", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the study and its trial cache
    x = tiny_cnn(tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    result = graphopt.optimize(str(tmp_path / "tiny.onnx"), "int8", backend="openvino",
                               calibration=str(tmp_path / "calib.npz"), check=False)
    notes = [n for r in result.report.records if r.name == "latency-guard" for n in r.notes]
    # the guard ran on OpenVINO's profiles (not "latency guard: off ..."): it says what it profiled
    assert notes and not notes[0].startswith("latency guard: off") and "unit(s) profiled" in notes[0], notes
    backend = get_backend(registry, "openvino")
    (ref,) = backend.run(backend.session(str(tmp_path / "tiny.onnx"), 1), {"x": x[:2]})
    (out,) = backend.run(backend.session(result.graph.to_model(), 1), {"x": x[:2]})
    assert out.shape == ref.shape and sqnr_db(ref, out) > 20  # int8 (or float where the guard kept it) on OpenVINO
