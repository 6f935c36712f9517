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
