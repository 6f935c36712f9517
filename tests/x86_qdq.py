"""A PT2E Q/DQ model in the x86 scheme's form, for the x86 backend's tests (until graphopt's own FX quantizer
lands, this throwaway annotator stands in for it: uint8 activations on the inputs of conv2d / linear, int8
per-channel weights in [-64, 64], a residual Add's non-conv input quantized, pooling and flatten sharing their
input's scale)."""

from __future__ import annotations

import torch

from graphopt.ir.fx_graph import FxGraph
from graphopt.pt2e.torchao import pt2e, quiet_torch_logs


def _annotator(weight_max: int = 64):
    ns = pt2e()
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver

    aten = torch.ops.aten
    act = ns.QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                              observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    weight = ns.QuantizationSpec(dtype=torch.int8, quant_min=-weight_max, quant_max=weight_max,
                                 qscheme=torch.per_channel_symmetric, ch_axis=0,
                                 observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(eps=2 ** -12))
    weighted = {aten.conv2d.default, aten.linear.default}
    shared = {aten.max_pool2d.default, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
              aten.flatten.using_ints}

    def fused(x):
        return isinstance(x, torch.fx.Node) and x.target in weighted and len(x.users) == 1

    class Annotator(ns.Quantizer):
        def annotate(self, gm):
            for n in gm.graph.nodes:
                spec = None
                if n.target in weighted:
                    spec = {n.args[0]: act, n.args[1]: weight}
                elif n.target is aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in n.args):
                    a, b = n.args
                    spec = {b: act} if fused(a) else {a: act} if fused(b) else {a: act, b: act}
                if spec is not None:
                    n.meta["quantization_annotation"] = ns.QuantizationAnnotation(input_qspec_map=spec,
                                                                                  _annotated=True)
            for n in gm.graph.nodes:
                if n.target in shared:
                    n.meta["quantization_annotation"] = ns.QuantizationAnnotation(
                        input_qspec_map={n.args[0]: act}, output_qspec=ns.SharedQuantizationSpec((n.args[0], n)),
                        _annotated=True)
            return gm

        def validate(self, gm):
            pass

    return Annotator()


def qdq_graph(module, example_inputs, calibration, weight_max: int = 64) -> FxGraph:
    """``module`` exported, annotated, calibrated on ``calibration`` (a list of input tuples) and converted: the
    Q/DQ GraphModule ``convert_pt2e`` gives, as an FxGraph with ``example_inputs``."""
    ns = pt2e()
    with quiet_torch_logs():
        gm = torch.export.export(module.eval(), tuple(example_inputs)).module()
        prepared = ns.prepare_pt2e(gm, _annotator(weight_max))
        with torch.no_grad():
            for batch in calibration:
                prepared(*batch)
        converted = ns.convert_pt2e(prepared)
    return FxGraph(converted, tuple(example_inputs), "torch.export")


class SmallNet(torch.nn.Module):
    """A residual CNN on 3-channel 16x16 images: conv-relu, maxpool, a residual block (conv-relu-conv + add +
    relu), a 1x1 conv with ReLU6, average pooling, flatten, linear (BatchNorm already folded, as after ``fold``)."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.stem, self.pool = nn.Conv2d(3, width, 3, padding=1), nn.MaxPool2d(2)
        self.conv1, self.conv2 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.expand, self.fc = nn.Conv2d(width, 2 * width, 1), nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        x = torch.nn.functional.relu6(self.expand(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_qdq(batch: int = 2, seed: int = 0) -> FxGraph:
    """:class:`SmallNet` (fixed seed) quantized by :func:`qdq_graph`, example inputs of ``batch`` samples."""
    torch.manual_seed(seed)
    shape = (batch, 3, 16, 16)
    return qdq_graph(SmallNet().eval(), (torch.randn(*shape),), [(torch.randn(*shape),) for _ in range(4)])
