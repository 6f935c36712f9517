"""Shared fixtures: zoo models exported once per session, the plugin registry, and graph helpers."""

from __future__ import annotations

import os

import onnx
import pytest

from graphopt.ir import OnnxGraph
from graphopt.plugins import load_registry

ZOO_SHAPES = {
    "tiny_resnet": (1, 3, 32, 32),
    "resnet18_like": (1, 3, 224, 224),
    "resnet50_like": (1, 3, 224, 224),
    "mobilenet_v2_like": (1, 3, 224, 224),
}


@pytest.fixture(autouse=True)
def fresh_study_folders(tmp_path, monkeypatch):
    """Sweeps cache their trials in study folders named by content (graphopt/report/study_files.py): each test
    gets its own root (tmp_path/graphopt-studies), so no test passes on a trial an earlier test or session cached."""
    monkeypatch.setenv("GRAPHOPT_STUDY_DIR", str(tmp_path / "graphopt-studies"))


@pytest.fixture(autouse=True)
def no_timing_choices(monkeypatch):
    """``int8`` runs the latency guard (guard=auto), whose choices come from timing on this machine: tests get the
    same graph on every run with ``$GRAPHOPT_NO_TIMING`` set; the guard's own tests (guard=on, or the variable
    removed) turn it back on."""
    monkeypatch.setenv("GRAPHOPT_NO_TIMING", "1")


@pytest.fixture(scope="session")
def registry():
    """Every plugin graphopt ships (third-party autoload off, so a stray installed plugin cannot interfere)."""
    return load_registry(autoload=False)


@pytest.fixture(scope="session")
def zoo_onnx(tmp_path_factory):
    """``zoo_onnx("resnet18_like")`` -> path of that zoo model exported with BatchNorm kept (cached)."""
    cache = tmp_path_factory.mktemp("zoo")
    made: dict[str, str] = {}

    def get(name: str, keep_bn: bool = True) -> str:
        key = f"{name}-{keep_bn}"
        if key not in made:
            from graphopt import zoo

            path = os.path.join(cache, f"{key}.onnx")
            zoo.export_onnx(getattr(zoo, name)(), path, ZOO_SHAPES[name], keep_bn=keep_bn)
            made[key] = path
        return made[key]

    return get


def graph_from_text(text: str) -> OnnxGraph:
    """An OnnxGraph from onnx.parser text (a model with its graph; initializers inline as in the parser docs)."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return OnnxGraph.from_model(model)


@pytest.fixture(scope="session")
def digits_trained():
    """The digits CNN trained once per test process (a few seconds), with its data split."""
    from graphopt import zoo

    data = zoo.digits_data()
    return zoo.train_digits_cnn(epochs=6, data=data), data


@pytest.fixture(scope="session")
def digits_files(digits_trained, tmp_path_factory):
    """A folder with digits.onnx (BatchNorm kept, dynamic batch), calib.npz (256 training images) and eval.npz
    (the 397 test images and their labels)."""
    import numpy as np

    from graphopt import zoo

    model, (x_train, _, x_test, y_test) = digits_trained
    folder = tmp_path_factory.mktemp("digits")
    zoo.export_onnx(model, str(folder / "digits.onnx"), (1, 1, 16, 16), dynamic_batch=True)
    np.savez(folder / "calib.npz", input=x_train[:256])
    np.savez(folder / "eval.npz", input=x_test, labels=y_test)
    return folder
