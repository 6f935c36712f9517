"""Quantization-aware training (the qat pass, int8-qat): fake quantization with a straight-through estimator, fixed
or learned (LSQ) scales, BatchNorm trained then folded, the freezing schedule, and the user's loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt import zoo
from graphopt.errors import UnsupportedIRError, UsageError
from graphopt.numeric import sqnr_db
from graphopt.pt2e.observers import FakeQuant

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


@pytest.fixture(scope="module")
def digits():
    return zoo.digits_data(0)


def _loop(data, epochs=2, lr=3e-3, record=None, batch=64, samples=512):
    """A plain training loop (what a user writes): Adam, cross-entropy, mean loss per epoch into ``record``."""
    x_train, y_train = (torch.from_numpy(a[:samples]) for a in data[:2])

    def train(module):
        opt = torch.optim.Adam(module.parameters(), lr=lr)
        module.train()
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            losses = []
            for idx in torch.randperm(len(x_train), generator=gen).split(batch):
                opt.zero_grad()
                loss = F.cross_entropy(module(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if record is not None:
                record["loss"].append(float(np.mean(losses)))
        record is not None and record.setdefault("module", module)
    return train


def _fake_quants(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, FakeQuant)}


def _qat(model, data, passes="int8-qat", **kw):
    x_test = data[2]
    return graphopt.optimize(model, passes, example_inputs=(torch.from_numpy(x_test[:1]),),
                             calibration=data[0][:128], backend="x86", **kw)


def test_fake_quant_rounds_forward_and_passes_gradients_straight_through_inside_the_range():
    fq = FakeQuant(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine)
    fq.set_range(0.0, 2.55)  # scale 0.01, zero point 0
    x = torch.tensor([-1.0, 0.004, 0.006, 1.234, 3.0], requires_grad=True)
    y = fq(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.01, 1.23, 2.55]), atol=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # STE: 1 inside [0, 2.55], 0 where clamped


def test_learned_scale_gets_a_gradient():
    fq = FakeQuant(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine, learn=True)
    fq.set_range(0.0, 1.0)
    x = torch.linspace(0, 2.0, 50)  # half of it past the range: the loss wants a larger scale
    ((fq(x) - x) ** 2).mean().backward()
    assert fq.scale.grad is not None and fq.scale.grad.item() < 0


def test_qat_with_fixed_scales_trains_folds_batchnorm_and_keeps_activation_scales(digits):
    """From a digits CNN trained for one epoch: the loss falls across 3 epochs of QAT, activation scales stay the
    calibrated ones (fixed), and the converted graph holds no batch_norm and no fake quantizer, at useful
    accuracy."""
    record = {"loss": []}
    model = zoo.train_digits_cnn(epochs=1, data=digits)
    before = {}

    def train(module):
        before.update({n: m.scale.detach().clone() for n, m in _fake_quants(module).items() if not m.observe})
        _loop(digits, epochs=3, record=record)(module)
        module.eval()  # the trained fake-quantized model, BatchNorm on its running statistics
        with torch.no_grad():
            record["fake"] = module(torch.from_numpy(digits[2])).numpy()
        record["after"] = {n: m.scale.detach().clone() for n, m in _fake_quants(module).items() if not m.observe}

    result = _qat(model, digits, qat=train)
    assert record["loss"][2] < 0.7 * record["loss"][0], record["loss"]
    after = record["after"]
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    gm = result.model
    assert not any("batch_norm" in str(n.target) for n in gm.graph.nodes)
    assert not any(isinstance(m, FakeQuant) for m in gm.modules())
    assert any("quantize_per_tensor" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        logits = gm(torch.from_numpy(digits[2])).numpy()
    assert zoo.accuracy(logits, digits[3]) > 0.9
    # conversion (BatchNorm folded into the convs, fake quantizers to Q/DQ) computes what the trained model did
    assert sqnr_db(record["fake"], logits) >= 30
    assert "trained" in result.report.records[-1].notes[0]


def test_qat_with_learned_scales_moves_them(digits):
    record = {"loss": []}
    model = zoo.train_digits_cnn(epochs=1, data=digits)
    before = {}

    def train(module):
        before.update({n: m.scale.detach().clone() for n, m in _fake_quants(module).items()})
        _loop(digits, epochs=1, record=record)(module)

    _qat(model, digits, passes="int8-qat:learn_scales=true", qat=train)
    after = {n: m.scale.detach() for n, m in _fake_quants(record["module"]).items()}
    moved = [n for n in before if not torch.allclose(before[n], after[n])]
    assert len(moved) >= len(before) // 2, (len(moved), len(before))
    assert all(m.scale.requires_grad for m in _fake_quants(record["module"]).values())


def test_freeze_schedule_stops_weight_scales_and_batchnorm_statistics(digits):
    """After N steps the weight scales stop following the weights and BatchNorm's running statistics stop moving,
    also through the loop's own train() calls."""
    snapshots = {}

    def train(module):
        x, y = torch.from_numpy(digits[0][:32]), torch.from_numpy(digits[1][:32])
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        stats = [b for n, b in module.named_buffers() if n.endswith("running_mean")]
        weights = [m for m in _fake_quants(module).values() if m.observe]
        for step in range(6):
            module.train()
            opt.zero_grad()
            F.cross_entropy(module(x), y).backward()
            opt.step()
            snapshots[step] = ([s.clone() for s in stats], [w.scale.detach().clone() for w in weights])

    model = zoo.train_digits_cnn(epochs=1, data=digits)
    _qat(model, digits, passes="int8-qat:freeze_observers_after=3:freeze_bn_after=3", qat=train)
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert changed(snapshots[0][0], snapshots[1][0]) and changed(snapshots[0][1], snapshots[1][1])
    assert not changed(snapshots[3][0], snapshots[5][0])  # BatchNorm frozen from step 3
    assert not changed(snapshots[3][1], snapshots[5][1])  # weight scales frozen from step 3


def test_distillation_is_a_qat_loop_and_keeps_frozen_batchnorm_frozen(digits):
    """graphopt.train.distiller as qat=: fit switches the fake-quantized module with its own train()/eval(), so
    BatchNorm frozen by the schedule stays frozen through the epochs that follow; the teacher is untouched."""
    from graphopt import train

    teacher = zoo.train_digits_cnn(epochs=1, data=digits)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = {}

    def loop(module):
        stats = [b for n, b in module.named_buffers() if n.endswith("running_mean")]
        train.distill(module, teacher, (digits[0][:256], digits[1][:256]), epochs=1, lr=1e-3)
        seen["frozen"] = [s.clone() for s in stats]
        train.distill(module, teacher, (digits[0][:256], digits[1][:256]), epochs=1, lr=1e-3)
        seen["later"] = [s.clone() for s in stats]

    result = _qat(zoo.train_digits_cnn(epochs=1, data=digits), digits,
                  passes="int8-qat:freeze_bn_after=4", qat=loop)
    assert all(torch.equal(a, b) for a, b in zip(seen["frozen"], seen["later"]))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any("batch_norm" in str(n.target) for n in result.model.graph.nodes)


def test_qat_without_a_training_loop_is_a_usage_error(digits):
    with pytest.raises(UsageError, match="needs a training loop"):
        _qat(zoo.DigitsCNN().eval(), digits)


def test_a_training_loop_without_a_qat_pass_is_a_usage_error(digits):
    with pytest.raises(UsageError, match="no pass of 'fold,int8' trains"):
        _qat(zoo.DigitsCNN().eval(), digits, passes="fold,int8", qat=lambda m: m)


def test_qat_on_an_onnx_model_names_the_ir(zoo_onnx):
    with pytest.raises(UnsupportedIRError, match="runs on fx graphs"):
        graphopt.optimize(zoo_onnx("tiny_resnet"), "insert-observers,calibrate,qat", qat=lambda m: m)


def test_every_scale_comes_from_calibration_on_onnxruntimes_scheme(digits):
    """onnxruntime's scheme quantizes the BatchNorm outputs that feed residual Adds; QAT's conv-BN fusion rebuilds
    (and renames) those nodes, which left 2 of them without their calibrated range (taken from the first batch)."""
    result = graphopt.optimize(zoo.DigitsCNN().eval(), "int8-qat", example_inputs=(torch.from_numpy(digits[2][:1]),),
                               calibration=digits[0][:64], qat=_loop(digits, epochs=1, record={"loss": []}))
    notes = result.report.records[-1].notes
    assert notes and not any("no calibrated range" in n for n in notes), notes
