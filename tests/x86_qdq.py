"""PT2E Q/DQ models in the x86 scheme's form for the x86 backend's tests and benchmark, made by graphopt's own FX
quantizer (``fold,int8`` with backend x86: uint8 activations on the inputs of conv / linear, int8 per-channel
weights, in [-64, 64] on CPUs without VNNI, a residual Add fused into the conv before it)."""

from __future__ import annotations

import torch

from graphopt.ir.fx_graph import FxGraph


def qdq_graph(module, example_inputs, calibration) -> FxGraph:
    """``module`` through graphopt's ``fold,int8`` for the x86 backend, calibrated on ``calibration`` (a list of
    input tuples): the Q/DQ FxGraph (``convert_pt2e``'s form) the backend lowers."""
    import graphopt
    from graphopt.backends.x86 import X86Backend

    data = tuple(torch.cat([batch[i] for batch in calibration]) for i in range(len(example_inputs)))
    result = graphopt.optimize(module.eval(), "fold,int8", backend=X86Backend(), example_inputs=tuple(example_inputs),
                               calibration=data, check=False)
    return result.graph


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
