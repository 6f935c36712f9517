"""graphopt.train on ATen graphs: fine-tuning and distillation switch an exported (or PT2E QAT-prepared, or captured
by graphopt with torch.export) module's BatchNorm/dropout between train and eval by rewriting its graph, leave the
teacher as it came, and name the hint layers that cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt import train, zoo
from graphopt.errors import UsageError


class _Small(nn.Module):
    """conv-BN-ReLU twice, dropout, fc: one nn.ReLU per use (X86InductorQuantizer rejects a shared one)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.drop, self.fc = nn.Dropout(0.3), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(self.drop(torch.flatten(x, 1)))


@pytest.fixture(scope="module")
def digits():
    data = zoo.digits_data(0)
    torch.manual_seed(0)
    return zoo.train_digits_cnn(epochs=2, seed=0, data=data, model=zoo.DigitsCNN(width=8)), data


def _exported(model, x):
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()


def _stats(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _torchao():
    """torchao, a dependency of graphopt[torch]: quietly imported (its absence is a failure, not a skip)."""
    from graphopt.pt2e.torchao import pt2e

    return pt2e()


def test_finetune_switches_an_exported_modules_batchnorm_and_dropout(digits):
    """An ExportedProgram.module() refuses train()/eval(): fit trains it with BatchNorm on batch statistics (its
    running statistics move) and returns it evaluating (dropout off: two calls agree; statistics frozen)."""
    _torchao()
    _, (x_train, y_train, x_test, _) = digits
    torch.manual_seed(0)
    module = _exported(_Small().train(), torch.from_numpy(x_train[:2]))
    with pytest.raises(NotImplementedError):
        module.eval()
    before = _stats(module)
    assert train.finetune(module, (x_train[:256], y_train[:256]), epochs=1) is module
    assert train._graph_training(module) is False
    assert any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    x, frozen = torch.from_numpy(x_test[:16]), _stats(module)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module(x))
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in frozen.items())


class _Loop(nn.Module):
    """A Python loop over a shape: symbolic_trace cannot capture it, so graphopt captures it with torch.export."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2, self.fc = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), \
            nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        for _ in range(x.shape[1]):
            y = torch.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def test_finetune_after_pruning_a_torch_export_capture_trains_its_batchnorm(digits):
    """graphopt captured the module in eval mode with torch.export and pruned it (a GraphModule whose train()
    changes nothing): the finetune= loop trains its BatchNorm on batch statistics and returns it evaluating."""
    import graphopt

    _torchao()
    _, (x_train, y_train, _, _) = digits
    x = torch.from_numpy(x_train[:32])  # the capture keeps the example's batch size: train in batches of 32
    moved = {}

    def loop(module):
        before = _stats(module)
        train.finetune(module, (x_train[:64], y_train[:64]), epochs=1, batch_size=32)
        moved["stats"] = any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())
        return module

    torch.manual_seed(0)
    result = graphopt.optimize(_Loop(), "prune:ratio=0.5", example_inputs=(x,), check=False, finetune=loop)
    assert result.model.bn.weight.shape == (4,) and moved["stats"]
    assert train._graph_training(result.model) is False


def test_distill_trains_a_qat_prepared_module_and_leaves_the_teacher_as_it_came(digits):
    """The QAT route: a PT2E fake-quantized student (prepare_qat_pt2e with X86InductorQuantizer's QAT config)
    distilled from an eager teacher that came in train mode: the distillation loss halves and the student goes
    from chance to most of the batch right; it comes back in eval mode, and the teacher comes back in train mode
    with its BatchNorm statistics untouched (it ran in eval mode)."""
    ns = _torchao()
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    teacher, (x_train, y_train, _, _) = digits
    torch.manual_seed(0)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    student = ns.prepare_qat_pt2e(_exported(_Small().train(), torch.from_numpy(x_train[:2])), quantizer)
    assert any(isinstance(m, ns.FakeQuantizeBase) for m in student.modules())
    x, y = torch.from_numpy(x_train[:256]), torch.from_numpy(y_train[:256])

    def loss() -> float:
        with torch.no_grad():
            return float(train.distillation_loss(train.set_mode(student, False)(x), teacher(x), y))

    start = loss()
    teacher.train()
    stats = _stats(teacher)
    assert train.distill(student, teacher, (x_train[:768], y_train[:768]), epochs=2) is student
    assert all(m.training for m in teacher.modules())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in stats.items())
    teacher.eval()
    assert train._graph_training(student) is False
    assert loss() < 0.6 * start, (start, loss())  # 1.0 -> 0.49 here
    with torch.no_grad():
        right = float((student(x).argmax(1) == y).float().mean())
    assert right > 0.5, right  # 0.77 here; chance is 0.1


def test_exported_teachers_are_switched_only_when_their_graph_trains(digits):
    """A teacher exported in eval mode runs as it is (its graph is not rewritten); one exported in train mode runs
    in eval mode during distillation and goes back to train mode after."""
    _torchao()
    _, (x_train, y_train, _, _) = digits
    data = (x_train[:64], y_train[:64])
    x = torch.from_numpy(x_train[:2])
    evaluating, training = _exported(_Small().eval(), x), _exported(_Small().train(), x)
    code = evaluating.code
    train.distill(_Small(), evaluating, data, epochs=1)
    assert evaluating.code == code
    stats = _stats(training)
    train.distill(_Small(), training, data, epochs=1)
    assert train._graph_training(training) is True
    assert all(torch.equal(v, training.state_dict()[k]) for k, v in stats.items())


def test_allowed_train_eval_and_plain_modules_come_back_from_set_mode(digits):
    """torchao's allow_exported_model_train_eval makes train()/eval() return None: set_mode returns the module."""
    ns = _torchao()
    _, (x_train, _, _, _) = digits
    module = ns.allow_exported_model_train_eval(_exported(_Small().train(), torch.from_numpy(x_train[:2])))
    assert train.set_mode(module, False) is module and train._graph_training(module) is False
    assert train.set_mode(module, True) is module and train._graph_training(module) is True
    plain = _Small()
    assert train.set_mode(plain, False) is plain and not plain.training


def test_hints_name_modules_that_run(digits):
    """symbolic_trace inlines a container's forward: a hint on 'block1' of a traced student never fires, and the
    error names modules the graph does call."""
    teacher, (x_train, y_train, _, _) = digits
    student = torch.fx.symbolic_trace(zoo.DigitsCNN(width=4))
    with pytest.raises(UsageError, match="hint layer 'block1' of the student never runs.*e.g. stem.0"):
        train.distill(student, teacher, (x_train[:64], y_train[:64]), epochs=1, hints={"block1": "block1"})
    train.distill(student, teacher, (x_train[:64], y_train[:64]), epochs=1, hints={"block1.bn2": "block1.bn2"})
    with pytest.raises(UsageError, match="the teacher is the student"):
        train.distill(teacher, teacher, (x_train[:64], y_train[:64]))


def test_an_exact_pass_named_in_finetune_after_is_not_held_to_the_outputs_before_training(digits):
    """finetune_after=["prune", "fold-bn"] (the README's example) trains after fold-bn, an exact pass: the numeric
    check measures that step instead of failing it as "declares itself exact but changed the outputs"."""
    import graphopt

    _, (x_train, y_train, x_test, _) = digits
    torch.manual_seed(0)
    result = graphopt.optimize(zoo.DigitsCNN().eval(), "fold,prune:ratio=0.5",
                               example_inputs=(torch.from_numpy(x_test[:1]),), finetune_after=["prune", "fold-bn"],
                               finetune=lambda m: train.finetune(m, (x_train[:128], y_train[:128]), epochs=1))
    fold_bn = next(r for r in result.report.records if r.name == "fold-bn")
    assert fold_bn.modified and fold_bn.checks["fine_tuned"] and fold_bn.checks["max_rel_err"] > 1e-2
