"""Export a zoo model to ONNX the way the anchors were measured: BatchNorm kept, no constant folding."""

from __future__ import annotations

import torch


def export_onnx(model: torch.nn.Module, path: str, input_shape=(1, 3, 224, 224), keep_bn: bool = True,
                opset: int = 17, dynamic_batch: bool = False) -> str:
    """TorchScript-based export with ``training=PRESERVE, do_constant_folding=False`` when ``keep_bn`` (the
    unoptimized graph a user gets before any cleanup), else the exporter's folded form."""
    model = model.eval()
    kwargs = dict(input_names=["input"], output_names=["output"], opset_version=opset, dynamo=False)
    if keep_bn:
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(model, (torch.randn(*input_shape),), path, **kwargs)
    return path
