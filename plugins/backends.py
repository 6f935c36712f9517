"""The backends graphopt ships: onnxruntime's CPU execution provider and OpenVINO's CPU plugin (the ``openvino``
extra, imported when used) for ONNX models, TensorRT's explicit quantization, and x86 (inductor with freezing,
oneDNN int8 kernels) for PyTorch models, with torch's deprecated eager int8 engines beside it for
comparison (``x86-fx-x86``, ``x86-fx-fbgemm``, ``x86-fx-onednn``: the same scheme and Q/DQ graph, run on
``torch.ops.quantized`` kernels in-process). Each one's int8 scheme is what the quantization passes place for it
(``--backend``)."""

from __future__ import annotations

from graphopt import hookimpl
from graphopt.backends.onnxruntime import OnnxRuntimeBackend
from graphopt.backends.openvino import OpenVINOBackend
from graphopt.backends.tensorrt import TensorRTBackend
from graphopt.backends.x86 import X86Backend


@hookimpl
def graphopt_register_backends(registry):
    registry.add_backend("onnxruntime", OnnxRuntimeBackend())
    registry.add_backend("openvino", OpenVINOBackend())  # imports openvino only when used
    registry.add_backend("tensorrt", TensorRTBackend())
    registry.add_backend("x86", X86Backend())
    for engine in ("fx-x86", "fx-fbgemm", "fx-onednn"):
        backend = X86Backend(engine=engine)
        registry.add_backend(backend.name, backend)
