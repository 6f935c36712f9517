"""prune-channels on graphs torch.export captured (ATen ops on get_attr parameters), where symbolic_trace fails.

A forward with Python control flow on a shape (``if x.shape[-1] > 16:``) cannot be symbolically traced, so FxGraph
captures it with torch.export. Each model here has a twin without the control flow (same weights) that takes the
symbolic_trace route: both routes must remove the same channels and compute the same outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from graphopt import optimize
from graphopt.ir.fx_graph import FxGraph
from graphopt.prune import BUILTIN_HANDLERS, prune_view
from graphopt.prune.fx_adapter import FxChannels
from graphopt.prune.importance import l1
from tests.prune_patterns import PATTERNS

aten = torch.ops.aten
TOL = dict(rtol=1e-4, atol=1e-4)
# copying an exported module trips a deprecation inside torch's pytree code, not graphopt's
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")


class Net(nn.Module):
    """conv-BN-ReLU stem, a residual block, a depthwise and a grouped conv, global pool, Linear."""

    def __init__(self, branchy: bool = True):
        super().__init__()
        self.branchy = branchy
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.bn_a = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn_dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.head = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        y = F.relu(self.bn0(self.stem(x)))
        if not self.branchy or x.shape[-1] > 16:  # the twin always takes the branch (and never reads a shape)
            y = F.max_pool2d(y, 2)
        y = F.relu(y + self.bn_b(self.b(F.relu(self.bn_a(self.a(y))))))
        y = F.relu6(self.bn_dw(self.dw(y)))
        y = F.relu(self.head(F.relu(self.grouped(y))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Attention(nn.Module):
    """embed -> LayerNorm -> q/k/v (2 heads of 8: view, transpose, matmul, softmax) -> out, residual, head."""

    heads, head_dim = 2, 8

    def __init__(self, branchy: bool = True):
        super().__init__()
        self.branchy = branchy
        self.embed, self.norm = nn.Linear(12, 16), nn.LayerNorm(16)
        self.q, self.k, self.v, self.out = (nn.Linear(16, 16) for _ in range(4))
        self.fc = nn.Linear(16, 4)

    def _heads(self, t):
        return t.view(1, 6, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        x = self.embed(x)
        h = self.norm(x)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        scale = self.head_dim ** -0.5 if not self.branchy or x.shape[1] > 4 else 1.0
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
        ctx = torch.matmul(att, v).transpose(1, 2).reshape(1, 6, self.heads * self.head_dim)
        return self.fc(x + self.out(ctx))


def _twins(cls, seed: int = 0):
    torch.manual_seed(seed)
    branchy = cls(branchy=True).eval()
    for m in branchy.modules():  # non-trivial norms, so their slices matter
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    plain = cls(branchy=False).eval()
    plain.load_state_dict(branchy.state_dict())
    return branchy, plain


def _shapes(module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def _both_routes(cls, x, passes="prune"):
    branchy, plain = _twins(cls)
    assert FxGraph.from_module(branchy, (x,)).captured_with == "torch.export"
    assert FxGraph.from_module(plain, (x,)).captured_with == "symbolic_trace"
    exported = optimize(branchy, passes, example_inputs=(x,), check=False)
    traced = optimize(plain, passes, example_inputs=(x,), check=False)
    with torch.no_grad():
        want, got, reference = branchy(x), exported.model(x), traced.model(x)
    assert exported.report.records[-1].stats["pruned channel"] > 0
    assert got.shape == want.shape
    assert _shapes(exported.model) == _shapes(traced.model)
    torch.testing.assert_close(got, reference, **TOL)
    return exported


def _calls(gm, *targets):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def test_exported_cnn_prunes_like_the_traced_twin():
    result = _both_routes(Net, torch.randn(1, 3, 32, 32))
    params = _shapes(result.model)
    assert params["stem.weight"][0] < 16 and params["head.weight"][0] < 12 and params["fc.weight"] == (10, 6)
    convs = {n.args[1].target: n for n in _calls(result.model, aten.conv2d.default)}
    assert convs["dw.weight"].args[6] == params["dw.weight"][0]  # depthwise: groups follow the kept channels
    assert convs["grouped.weight"].args[6] == params["grouped.weight"][0] // params["grouped.weight"][1]


def test_exported_attention_prunes_head_size_and_whole_heads():
    x = torch.randn(1, 6, 12)
    size = _both_routes(Attention, x)
    assert _shapes(size.model)["q.weight"] == (8, 8)  # 2 heads, each 4 wide; the hidden size 16 -> 8
    views = _calls(size.model, aten.view.default)
    assert views and all(list(n.args[1]) == [1, 6, 2, 4] for n in views), [n.args for n in views]
    norm = _calls(size.model, aten.layer_norm.default)[0]
    assert list(norm.args[1]) == [8]  # normalized_shape follows the sliced weight
    count = _both_routes(Attention, x, "prune:split=count")
    assert all(list(n.args[1]) == [1, 6, 1, 8] for n in _calls(count.model, aten.view.default))


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_prunes_the_same_through_torch_export(name):
    cls, shape, _ = PATTERNS[name]
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    exported = optimize(FxGraph(torch.export.export(model, (x,)).module(), (x,), "torch.export"), "prune",
                        check=False)
    traced = optimize(model, "prune", example_inputs=(x,), check=False)
    assert _shapes(exported.model) == _shapes(traced.model)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), traced.model(x), **TOL)


class Sliced(nn.Module):
    """A constant per-channel scale, a channel slice, padding, a token select: ATen-only shapes of these ops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.scale = torch.rand(12, 1, 1) + 0.5  # a plain tensor attribute: torch.export lifts it as a constant
        self.fc1, self.fc = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = F.relu(self.conv1(x) * self.scale)[:, 2:10]
        y = F.relu(self.conv2(F.pad(y, (1, 1, 1, 1))))
        z = F.gelu(self.fc1(y.flatten(2).transpose(1, 2)))
        return self.fc(z[:, 0])


def test_slice_pad_select_and_constants_match_the_masked_original():
    """Zeroing the removed channels in place computes what the pruned module computes (ReLU/GELU keep 0 at 0)."""
    torch.manual_seed(0)
    model, x = Sliced().eval(), torch.randn(1, 3, 8, 8)
    graph = FxGraph(torch.export.export(model, (x,)).module(), (x,), "torch.export")
    view = FxChannels(graph).view()
    outcome = prune_view(view, handlers=BUILTIN_HANDLERS, criterion=l1, fallback=l1, ratio=0.5)
    masked = graph.copy().gm
    for (value, axis), keep in outcome.plan.kept.items():
        owner, _, attr = value.rpartition(".")
        tensor = getattr(masked.get_submodule(owner) if owner else masked, attr)
        index = [slice(None)] * tensor.ndim
        index[axis] = np.setdiff1d(np.arange(tensor.shape[axis]), keep)
        with torch.no_grad():
            tensor[tuple(index)] = 0
    result = optimize(graph, "prune", check=False)
    assert _shapes(result.model)["conv2.weight"][1] < 8 and result.model.scale.shape[0] < 12
    sliced = _calls(result.model, aten.slice.Tensor)[0]
    assert sliced.args[3] - sliced.args[2] == _shapes(result.model)["conv2.weight"][1]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), masked(x), rtol=1e-5, atol=1e-6)


def test_core_aten_graph_prunes_everything_before_the_decomposed_linear():
    """After ``run_decompositions``: ``convolution``, ``_native_batch_norm_legit_no_training`` and
    ``max_pool2d_with_indices`` (tuples of outputs) are followed; ``addmm`` (a decomposed Linear) is not, so the
    channels feeding it stay, as ``ignore=head`` keeps them on the traced twin."""
    branchy, plain = _twins(Net)
    x = torch.randn(1, 3, 32, 32)
    gm = torch.export.export(branchy, (x,)).run_decompositions().module()
    assert _calls(gm, aten.convolution.default, aten._native_batch_norm_legit_no_training.default)
    decomposed = optimize(FxGraph(gm, (x,), "torch.export"), "prune", check=False)
    traced = optimize(plain, "prune:ignore=head", example_inputs=(x,), check=False)
    assert decomposed.report.records[-1].stats["pruned channel"] > 0
    assert "addmm" in " ".join(decomposed.report.records[-1].notes)
    assert _shapes(decomposed.model) == _shapes(traced.model)
    with torch.no_grad():
        torch.testing.assert_close(decomposed.model(x), traced.model(x), **TOL)


class GroupNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.gn(self.c1(x)))).mean((2, 3)))


def test_group_norm_keeps_its_groups_on_both_fx_captures():
    torch.manual_seed(0)
    model = GroupNormed().eval()
    x = torch.randn(1, 3, 10, 10)
    traced = optimize(model, "prune", example_inputs=(x,), check=False)
    gn = traced.model.get_submodule("gn")
    assert (gn.num_groups, gn.num_channels, tuple(gn.weight.shape)) == (4, 8, (8,))  # 4 groups of 2
    exported = optimize(FxGraph(torch.export.export(model, (x,)).module(), (x,), "torch.export"), "prune",
                        check=False)
    assert _shapes(exported.model) == _shapes(traced.model)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(x), traced.model(x), **TOL)

