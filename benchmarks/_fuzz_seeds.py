"""The fuzzer's seeds: small valid models, built in code, each a set of files (the model and its companions).

ONNX seeds (onnx.helper, no torch): a conv net with BatchNorm, a MatMul/Gemm MLP, the MLP with its weights as
external data, a Shape->Gather->Reshape chain, a model with an If, an IR 3 model whose initializers are also
inputs, a custom-domain op, a float16 model. PyTorch seeds (torch): a torch.export ``.pt2`` program and a
``torch.save`` zip of a module. Every seed is valid: ``graphopt verify`` accepts the ONNX ones and ``graphopt run``
reads the ``.pt2``; the mutations in ``_fuzz_mutate.py`` make them bad.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

MODEL = "model.onnx"


@dataclass
class Seed:
    name: str
    kind: str  # "onnx" or "torch"
    main: str  # the model file's name
    files: dict[str, bytes] = field(default_factory=dict)  # every file of the seed, the model included


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(sum(map(ord, name)))


def _w(rng, *shape, dtype=np.float32):
    return (rng.standard_normal(shape) * 0.3).astype(dtype)


def _model(nodes, inputs, outputs, inits, opset=17, ir=8, extra_opsets=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir, producer_name="graphopt-fuzz")


def conv_bn():
    from onnx import TensorProto, helper, numpy_helper

    r = _rng("conv_bn")
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("W", _w(r, 4, 3, 3, 3)), ("B", _w(r, 4)), ("scale", 1 + _w(r, 4)), ("bias", _w(r, 4)),
        ("mean", _w(r, 4)), ("var", np.abs(_w(r, 4)) + 0.5), ("G", _w(r, 5, 4)), ("C", _w(r, 5))]]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)


def mlp():
    from onnx import TensorProto, helper, numpy_helper

    r = _rng("mlp")
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("W1", _w(r, 16, 32)), ("b1", _w(r, 32)), ("W2", _w(r, 32, 8)), ("b2", _w(r, 8))]]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["ha"]),
             helper.make_node("Relu", ["ha"], ["hr"]), helper.make_node("Identity", ["hr"], ["hi"]),
             helper.make_node("Gemm", ["hi", "W2", "b2"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)


def shape_chain():
    from onnx import TensorProto, helper, numpy_helper

    r = _rng("shape_chain")
    inits = [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array([0], np.int64),
                                                                                            "ax"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"), numpy_helper.from_array(_w(r, 12, 6), "W")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["nu"]),
             helper.make_node("Concat", ["nu", "m1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)


def with_if():
    from onnx import TensorProto, helper, numpy_helper

    r = _rng("with_if")
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 4])])
    inits = [numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(_w(r, 4, 4), "W")]
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
             helper.make_node("MatMul", ["b", "W"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)


def ir3():
    from onnx import TensorProto, helper, numpy_helper

    r = _rng("ir3")
    w, b = _w(r, 6, 4), _w(r, 6)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [6, 4]),
              helper.make_tensor_value_info("B", TensorProto.FLOAT, [6])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], inits, opset=8,
                  ir=3)


def custom_domain():
    from onnx import TensorProto, helper, numpy_helper

    r = _rng("custom")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Zap", ["h"], ["y"], domain="com.example", alpha=0.5, mode="fast")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                  [numpy_helper.from_array(_w(r, 8, 8), "W")], extra_opsets=[("com.example", 1)])


def float16():
    from onnx import TensorProto, helper, numpy_helper

    r = _rng("float16")
    inits = [numpy_helper.from_array(_w(r, 8, 16, dtype=np.float16), "W"),
             numpy_helper.from_array(_w(r, 16, dtype=np.float16), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 16])], inits)


def _serialized(model) -> dict[str, bytes]:
    return {MODEL: model.SerializeToString()}


def _external(model) -> dict[str, bytes]:
    """The model saved with every tensor over 1 KB in ``model.onnx.data``."""
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        onnx.save_model(model, os.path.join(folder, MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL + ".data", size_threshold=1024)
        return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def onnx_seeds() -> list[Seed]:
    out = [Seed(name, "onnx", MODEL, _serialized(make())) for name, make in [
        ("conv_bn", conv_bn), ("mlp", mlp), ("shape_chain", shape_chain), ("if", with_if), ("ir3", ir3),
        ("custom_domain", custom_domain), ("float16", float16)]]
    out.insert(2, Seed("external", "onnx", MODEL, _external(mlp())))
    return out


def torch_seeds() -> list[Seed]:
    """A torch.export program (.pt2) and a torch.save zip of a module (refused without --trust-pickle)."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                 torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    program = torch.export.export(module, (x,))
    pt2, saved = io.BytesIO(), io.BytesIO()
    torch.export.save(program, pt2)
    torch.save(module, saved)
    return [Seed("pt2", "torch", "model.pt2", {"model.pt2": pt2.getvalue()}),
            Seed("torch_save", "torch", "model.pt", {"model.pt": saved.getvalue()})]


def all_seeds(with_torch: bool = True) -> list[Seed]:
    return onnx_seeds() + (torch_seeds() if with_torch else [])
