"""Tiny nn.Modules, one per dependency pattern structured pruning must follow, for tests/test_prune_patterns.py.

Each is ``(module, input shape, expected shapes after pruning at ratio 0.5)``; expected shapes are keyed by
parameter name (the same in the FX graph and in the ONNX export, which keeps parameter names). Convs carry no
bias and there is no LayerNorm, so a pruned channel is exactly zero in the "masked" original (see the test).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _conv(cin, cout, k=3, groups=1):
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)


class ConvChain(nn.Module):
    """conv -> BN -> ReLU -> conv -> global pool -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.fc = _conv(3, 8), nn.BatchNorm2d(8), _conv(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Residual(nn.Module):
    """stem + two residual blocks: the stem and both blocks' second convs form one group."""

    def __init__(self):
        super().__init__()
        self.stem = _conv(3, 8)
        self.a1, self.b1, self.a2, self.b2 = _conv(8, 6), _conv(6, 8), _conv(8, 6), _conv(6, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b1(torch.relu(self.a1(x))))
        x = torch.relu(x + self.b2(torch.relu(self.a2(x))))
        return self.fc(x.mean((2, 3)))


class ConcatOffsets(nn.Module):
    """Concat of two branches of different widths feeding one conv: each input keeps its offset."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.mix = _conv(3, 4), _conv(3, 6, 1), _conv(10, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.mix(torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)))
        return self.fc(x.mean((2, 3)))


class SplitHalves(nn.Module):
    """chunk into halves, each half its own consumer."""

    def __init__(self):
        super().__init__()
        self.stem, self.top, self.bottom, self.fc = _conv(3, 8), _conv(4, 6), _conv(4, 6), nn.Linear(12, 4)

    def forward(self, x):
        a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
        y = torch.cat([torch.relu(self.top(a)), torch.relu(self.bottom(b))], 1)
        return self.fc(y.mean((2, 3)))


class FlattenGemm(nn.Module):
    """conv -> flatten -> Linear: one channel is H×W input features of the Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = _conv(3, 8), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = torch.flatten(torch.relu(self.conv(x)), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class DepthwiseSE(nn.Module):
    """expand -> depthwise -> squeeze-excite -> project (an EfficientNet MBConv without its residual)."""

    def __init__(self):
        super().__init__()
        self.expand, self.dw = _conv(3, 16, 1), _conv(16, 16, 3, groups=16)
        self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1, bias=False), nn.Conv2d(4, 16, 1, bias=False)
        self.project, self.fc = _conv(16, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.expand(x))))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.project(x * s).mean((2, 3)))


class Grouped(nn.Module):
    """1x1 -> grouped 3x3 (4 groups of 4) -> 1x1."""

    def __init__(self):
        super().__init__()
        self.reduce, self.grouped, self.restore = _conv(3, 16, 1), _conv(16, 16, 3, groups=4), _conv(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.reduce(x))))
        return self.fc(torch.relu(self.restore(x)).mean((2, 3)))


class Shuffle(nn.Module):
    """conv -> channel shuffle (view, transpose, view) -> conv, as in ShuffleNet."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = _conv(3, 12), _conv(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


class Upsample(nn.Module):
    """conv -> ConvTranspose -> grouped ConvTranspose (3 groups) -> conv, a decoder's shapes."""

    def __init__(self):
        super().__init__()
        self.conv, self.up = _conv(3, 8), nn.ConvTranspose2d(8, 6, 2, stride=2, bias=False)
        self.up_grouped = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=3, bias=False)
        self.head, self.fc = _conv(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.up_grouped(torch.relu(self.up(torch.relu(self.conv(x))))))
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention (4 heads of 8) without biases or LayerNorm, then a head."""

    heads, head_dim = 4, 8

    def __init__(self):
        super().__init__()
        hidden = self.heads * self.head_dim
        self.embed = nn.Linear(12, hidden, bias=False)
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.fc = nn.Linear(hidden, 4)

    def _split(self, x):
        return x.view(1, 6, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        x = self.embed(x)
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(1, 6, self.heads * self.head_dim)
        return self.fc(x + self.out(ctx))


class FusedAttention(Attention):
    """The same block through ``F.scaled_dot_product_attention`` (FX sees one call; ONNX, MatMuls)."""

    def forward(self, x):
        x = self.embed(x)
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        ctx = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 6, 32)
        return self.fc(x + self.out(ctx))


# name -> (module class, input shape, {parameter: shape after prune at ratio 0.5})
PATTERNS = {
    "conv-bn-conv": (ConvChain, (1, 3, 8, 8), {"conv1.weight": (4, 3, 3, 3), "bn1.weight": (4,),
                                               "conv2.weight": (4, 4, 3, 3), "fc.weight": (4, 4)}),
    "residual": (Residual, (1, 3, 8, 8), {"stem.weight": (4, 3, 3, 3), "a1.weight": (3, 4, 3, 3),
                                          "b1.weight": (4, 3, 3, 3), "b2.weight": (4, 3, 3, 3),
                                          "fc.weight": (4, 4)}),
    "concat": (ConcatOffsets, (1, 3, 8, 8), {"left.weight": (2, 3, 3, 3), "right.weight": (3, 3, 1, 1),
                                             "mix.weight": (4, 5, 3, 3)}),
    # each half loses its share of the stem's channels (the halves stay halves)
    "split": (SplitHalves, (1, 3, 8, 8), {"stem.weight": (4, 3, 3, 3), "top.weight": (3, 2, 3, 3),
                                          "bottom.weight": (3, 2, 3, 3), "fc.weight": (4, 6)}),
    "flatten-gemm": (FlattenGemm, (1, 3, 4, 4), {"conv.weight": (4, 3, 3, 3), "fc1.weight": (8, 64),
                                                 "fc2.weight": (4, 8)}),
    "depthwise-se": (DepthwiseSE, (1, 3, 8, 8), {"expand.weight": (8, 3, 1, 1), "dw.weight": (8, 1, 3, 3),
                                                 "se_reduce.weight": (2, 8, 1, 1), "se_expand.weight": (8, 2, 1, 1),
                                                 "project.weight": (4, 8, 1, 1)}),
    # 4 groups kept, each half as wide (split=count removes whole groups instead: test_prune_patterns.py)
    "grouped": (Grouped, (1, 3, 8, 8), {"reduce.weight": (8, 3, 1, 1), "grouped.weight": (8, 2, 3, 3),
                                        "restore.weight": (4, 8, 1, 1)}),
    "shuffle": (Shuffle, (1, 3, 8, 8), {"conv1.weight": (6, 3, 3, 3), "conv2.weight": (4, 6, 3, 3)}),
    # the grouped ConvTranspose (3 groups of 2) loses the same position in every group: up keeps 3 of 6
    "conv-transpose": (Upsample, (1, 3, 4, 4), {"conv.weight": (4, 3, 3, 3), "up.weight": (4, 3, 2, 2),
                                                "up_grouped.weight": (3, 1, 3, 3), "head.weight": (4, 3, 3, 3)}),
    "mlp": (Mlp, (1, 12), {"fc1.weight": (16, 12), "fc2.weight": (8, 16), "fc3.weight": (4, 8)}),
    "attention-fused": (FusedAttention, (1, 6, 12), {"q.weight": (16, 16), "k.weight": (16, 16),
                                                     "v.weight": (16, 16), "out.weight": (16, 16)}),
    "attention-size": (Attention, (1, 6, 12), {"q.weight": (16, 16), "k.weight": (16, 16), "v.weight": (16, 16),
                                               "out.weight": (16, 16), "embed.weight": (16, 12)}),
}


def if_model():
    """x[N,8] -> MatMul W0 -> Relu -> 'hid', read by name inside both branches of an If (cond, a scalar input):
    then MatMul W1, else MatMul W2 -> z[N,4]; beside it x -> MatMul A -> Relu -> MatMul B -> y2[N,4], an
    ordinary hidden layer of 16. A ModelProto (opset 17)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def branch(name, w, out):
        return helper.make_graph([helper.make_node("MatMul", ["hid", w], [out], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="mm0"),
             helper.make_node("Relu", ["h0"], ["hid"], name="relu0"),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch("then", "W1", "t"),
                              else_branch=branch("else", "W2", "e")),
             helper.make_node("MatMul", ["x", "A"], ["a"], name="mm_a"),
             helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             helper.make_node("MatMul", ["ar", "B"], ["y2"], name="mm_b")]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 4])],
                              [init("W0", 8, 16), init("W1", 16, 4), init("W2", 16, 4), init("A", 8, 16),
                               init("B", 16, 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
