"""The PyTorch route reaches onnxruntime: after FX passes (fp32 fold, pruning), ``save("x.onnx")`` writes a
model onnxruntime runs within 1e-4 relative of the FX module (issue #9, item 6; the int8 Q/DQ part needs the
x86 route)."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.numeric import max_difference


@pytest.mark.parametrize("passes", ["fold", "fold,prune:ratio=0.5"])
def test_fx_result_saved_as_onnx_matches_on_onnxruntime(passes, tmp_path):
    torch.manual_seed(0)
    module = zoo.DigitsCNN().eval()
    x = torch.randn(4, 1, 16, 16)
    result = graphopt.optimize(module, passes, example_inputs=(x[:1],), check=False)
    path = str(tmp_path / "m.onnx")
    result.save(path)
    with torch.no_grad():
        want = result.model(x[:1]).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]
    diff = max_difference([want], [got])
    assert diff.max_rel_err <= 1e-4, diff
    if "prune" in passes:  # the written model is the pruned one: fewer weights than the original's
        params = sum(p.numel() for p in module.parameters())
        import onnx

        written = sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer)
        assert written < 0.5 * params, (written, params)


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.logits, self.embedding = torch.nn.Linear(8, 3), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"logits": self.logits(h), "embedding": self.embedding(h)}


@pytest.mark.parametrize("passes", ["fold", "fold,prune:ratio=0.5", "int8"])
def test_written_onnx_takes_any_batch_and_names_its_outputs(passes, tmp_path):
    """Captured at batch 1, the written model runs a batch of 5 (its batch dim is called ``batch``), and its outputs
    are named after the module's: a dict's keys, ``output`` for one tensor."""
    torch.manual_seed(0)
    cnn = "prune" in passes
    module = (zoo.DigitsCNN() if cnn else TwoHeads()).eval()
    x = torch.randn(5, 1, 16, 16) if cnn else torch.randn(5, 6)
    extra = dict(calibration=x.numpy()) if passes == "int8" else {}
    result = graphopt.optimize(module, passes, example_inputs=(x[:1],), **extra)
    path = str(tmp_path / "m.onnx")
    result.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.name == "x" and given.shape[0] == "batch"
    names = [o.name for o in session.get_outputs()]
    assert names == (["output"] if cnn else ["logits", "embedding"])
    assert all(o.shape[0] == "batch" for o in session.get_outputs())
    got = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        out = result.model(x)
    want = [out.numpy()] if cnn else [out[k].numpy() for k in names]
    diff = max_difference(want, got)
    assert diff.max_rel_err <= 1e-4 if passes != "int8" else diff.sqnr_db >= 30, diff


def test_a_trace_that_keeps_its_batch_is_written_static(tmp_path):
    class PadsWithOneRow(torch.nn.Module):
        def forward(self, x):  # takes a batch of 1 only: the row it appends has one
            return torch.cat([torch.relu(x), torch.zeros(1, 1, 4)], dim=1)

    result = graphopt.optimize(PadsWithOneRow(), "fold", example_inputs=(torch.randn(1, 3, 4),))
    path = str(tmp_path / "m.onnx")
    result.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 4]
    x = np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float32)
    want = np.concatenate([np.maximum(x, 0), np.zeros((1, 1, 4), np.float32)], axis=1)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-6)


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return {"pair": (h, h * 2), "last": h + 1, "x": x - 1}  # nested, and a key that is an input's name


@pytest.mark.parametrize("passes", ["fold", "int8"])
def test_nested_outputs_and_clashing_keys_get_flat_names(passes, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    extra = dict(calibration=x.numpy()) if passes == "int8" else {}
    path = str(tmp_path / "m.onnx")
    result = graphopt.optimize(Nested().eval(), passes, example_inputs=(x,), output=path, **extra)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == [f"output_{i}" for i in range(4)]
    with torch.no_grad():
        want = [t.numpy() for t in torch.utils._pytree.tree_leaves(result.model(x))]
    diff = max_difference(want, session.run(None, {"x": x.numpy()}))
    assert diff.max_rel_err <= 1e-4 if passes == "fold" else diff.sqnr_db >= 30, diff


class PositionTable(torch.nn.Module):
    """Token ids whose sequence length the position table fixes (7); any batch."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.head = torch.nn.Embedding(50, 16), torch.nn.Parameter(torch.randn(7, 16)), \
            torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.head((self.emb(ids) + self.pos).mean(1))


@pytest.mark.parametrize("passes", ["fold", "int8"])
def test_a_fixed_sequence_leaves_the_batch_dynamic(passes, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    extra = dict(calibration=[torch.randint(0, 50, (4, 7))]) if passes == "int8" else {}
    path = str(tmp_path / "m.onnx")
    graphopt.optimize(PositionTable().eval(), passes, example_inputs=(ids,), output=path, **extra)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 7]
    assert session.run(None, {"ids": torch.randint(0, 50, (5, 7)).numpy()})[0].shape == (5, 4)


def test_dynamic_int8_is_refused_as_onnx_in_one_line_naming_the_path(tmp_path):
    from graphopt.errors import UnsupportedError

    module = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    result = graphopt.optimize(module, "int8-dynamic", example_inputs=(torch.randn(2, 8),))
    target = str(tmp_path / "dyn.onnx")
    with pytest.raises(UnsupportedError) as caught:
        result.save(target)
    message = str(caught.value)
    assert message.startswith(f"{target}: a PyTorch model with dynamic int8") and "\x1b" not in message
    assert "\n" not in message and os.listdir(tmp_path) == []
