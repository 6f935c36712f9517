"""graphopt.train: the distillation loss is the standard one, distillation recovers a pruned digits CNN (as a
``finetune=`` function too), hint losses train their adapters, and bad arguments are one-line usage errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt import train, zoo
from graphopt.errors import UsageError


def test_loss_is_hintons():
    """(1 - a) CE + a T^2 KL(p_teacher || p_student), with the KL written out by hand."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 10, generator=gen), torch.randn(5, 10, generator=gen)
    y = torch.tensor([0, 3, 9, 1, 1])
    T, a = 3.0, 0.6
    p, q = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    want = (1 - a) * F.cross_entropy(s, y) + a * T * T * kl
    torch.testing.assert_close(train.distillation_loss(s, t, y, T=T, alpha=a), want)
    assert float(train.distillation_loss(t, t, y, T=T, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_soft_gradient_is_hintons():
    """Hinton et al. (2015), section 2: the soft term's gradient on a student logit is T (q_i - p_i) per example
    once the KL is scaled by T^2 (q: the student's softmax at T, p: the teacher's), averaged over the batch. The
    reverse KL, KL(q || p), has another gradient: the test tells the two directions apart."""
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=gen, requires_grad=True), 3 * torch.randn(4, 10, generator=gen)
    y, T = torch.tensor([1, 2, 3, 4]), 4.0
    train.distillation_loss(s, t, y, T=T, alpha=1.0).backward()
    want = T * (torch.softmax(s.detach() / T, 1) - torch.softmax(t / T, 1)) / len(s)
    torch.testing.assert_close(s.grad, want)
    s2 = s.detach().clone().requires_grad_()
    log_q = torch.log_softmax(s2 / T, 1)
    reverse = T * T * (log_q.exp() * (log_q - torch.log_softmax(t / T, 1))).sum(1).mean()
    assert float((torch.autograd.grad(reverse, s2)[0] - want).abs().max()) > 0.02


@pytest.fixture(scope="module")
def digits_teacher():
    data = zoo.digits_data(0)
    teacher = zoo.train_digits_cnn(epochs=6, seed=0, data=data)
    return teacher, data


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return zoo.accuracy(model(torch.from_numpy(x)).numpy(), y)


def test_distilling_a_pruned_cnn_wins_accuracy_back_through_finetune(digits_teacher):
    """Prune half of the digits CNN's channels (FX route), distill from the unpruned model for 2 epochs as the
    ``finetune=`` loop: the student's accuracy comes back to within 2 points of the teacher's, from far below,
    and the teacher is untouched."""
    teacher, (x_train, y_train, x_test, y_test) = digits_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.from_numpy(x_test[:2])
    pruned = graphopt.optimize(copy.deepcopy(teacher), "prune:ratio=0.5", example_inputs=(x,), check=False).model
    raw = _accuracy(pruned, x_test, y_test)
    student = graphopt.optimize(copy.deepcopy(teacher), "prune:ratio=0.5", example_inputs=(x,), check=False,
                                finetune=train.distiller(teacher, (x_train, y_train), epochs=2)).model
    got, ref = _accuracy(student, x_test, y_test), _accuracy(teacher, x_test, y_test)
    assert raw < ref - 0.1, (raw, ref)  # pruning alone loses a lot: the test can tell recovery from luck
    assert got >= ref - 0.02, (got, ref)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def _features(model, name, x):
    kept = {}
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: kept.setdefault("o", o))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return kept["o"]


def test_hints_pull_the_named_layers_toward_the_teachers(digits_teacher):
    """Same student, seed and epochs, with and without a hint on block2: with it, block2's features end closer
    to the teacher's."""
    teacher, (x_train, y_train, x_test, _) = digits_teacher
    x = torch.from_numpy(x_test[:128])
    errors = {}
    for hinted in (False, True):
        torch.manual_seed(1)
        student = zoo.DigitsCNN()
        train.distill(student, teacher, (x_train, y_train), epochs=2, seed=1,
                      hints={"block2": "block2"} if hinted else None, hint_weight=1.0)
        errors[hinted] = float(F.mse_loss(_features(student, "block2", x), _features(teacher, "block2", x)))
    assert errors[True] < 0.7 * errors[False], errors


def test_a_pruned_student_gets_an_adapter_to_the_teachers_channels(digits_teacher):
    teacher, (x_train, y_train, _, _) = digits_teacher
    student = zoo.DigitsCNN(width=8)  # block2 has 16 channels, the teacher's 32
    hints = train._Hints(student, teacher, {"block2": "block2", "fc": "fc"}, 1.0)
    hints.start((x_train[:64], y_train[:64]), 32, 0)
    hints.stop()
    adapter = hints.adapters["block2"]
    assert isinstance(adapter, torch.nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (16, 32)
    assert "fc" not in hints.adapters  # 10 logits on both sides: compared as they are
    assert float(hints.loss().detach()) > 0
    trained = train.distill(student, teacher, (x_train, y_train), epochs=1, hints={"block2": "block2"})
    assert np.isfinite(trained(torch.from_numpy(x_train[:4])).detach().numpy()).all()


def test_distillation_loss_falls(digits_teacher):
    teacher, (x_train, y_train, _, _) = digits_teacher
    student = zoo.DigitsCNN(width=8)
    x, y = torch.from_numpy(x_train[:256]), torch.from_numpy(y_train[:256])

    def loss():
        with torch.no_grad():
            return float(train.distillation_loss(student.eval()(x), teacher(x), y))

    start = loss()
    train.distill(student, teacher, (x_train, y_train), epochs=2)
    assert loss() < 0.7 * start  # from scratch, 2 epochs: 3.6 -> 2.1 here


@pytest.mark.parametrize("kwargs, message", [
    ({"T": 0}, "T must be a finite number > 0"),
    ({"alpha": 1.5}, "alpha must be in [0, 1]"),
    ({"epochs": 0}, "epochs must be a whole number > 0"),
    ({"hints": {"nope": "block2"}}, "hint layer 'nope' is not a module of the student"),
])
def test_bad_arguments_are_usage_errors(digits_teacher, kwargs, message):
    teacher, (x_train, y_train, _, _) = digits_teacher
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train.distill(zoo.DigitsCNN(width=4), teacher, (x_train[:64], y_train[:64]), **kwargs)


def test_bad_data_is_a_usage_error(digits_teacher):
    teacher, (x_train, y_train, _, _) = digits_teacher
    with pytest.raises(UsageError, match="64 inputs but 10 labels"):
        train.distill(zoo.DigitsCNN(width=4), teacher, (x_train[:64], y_train[:10]))
    with pytest.raises(UsageError, match="must be \\(inputs, labels\\)"):
        train.distill(zoo.DigitsCNN(width=4), teacher, 3)
    loader = [(torch.from_numpy(x_train[i:i + 32]), torch.from_numpy(y_train[i:i + 32])) for i in range(0, 128, 32)]
    student = train.distill(zoo.DigitsCNN(width=4), teacher, loader, epochs=1)  # an iterable of batches works
    assert not student.training
    assert np.isfinite(student(torch.from_numpy(x_train[:4])).detach().numpy()).all()
