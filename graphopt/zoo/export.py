"""Export a zoo model to ONNX as a user would before any cleanup: BatchNorm kept, no constant folding."""

from __future__ import annotations

import torch

EXPORTERS = ("torchscript", "dynamo")


def export_onnx(model: torch.nn.Module, path: str, input_shape=(1, 3, 224, 224), keep_bn: bool = True,
                opset: int = 17, dynamic_batch: bool = False, exporter: str = "torchscript") -> str:
    """Export ``model`` as a user would before any cleanup.

    ``exporter="torchscript"``: ``torch.onnx.export(dynamo=False)`` with ``training=PRESERVE,
    do_constant_folding=False`` when ``keep_bn`` (BatchNormalization kept: the raw form graph cleanup starts from).
    ``exporter="dynamo"``: torch's default exporter (needs onnxscript); ``keep_bn`` turns its graph optimizer off
    (``optimize=False``), which keeps BatchNormalization and the exporter's raw Constant/CastLike/Expand chains.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    model = model.eval()
    kwargs = dict(input_names=["input"], output_names=["output"], opset_version=opset)
    if exporter == "dynamo":
        kwargs.update(dynamo=True, optimize=not keep_bn, verbose=False)
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    else:
        kwargs["dynamo"] = False
        if keep_bn:
            kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(model, (torch.randn(*input_shape),), path, **kwargs)
    return path
