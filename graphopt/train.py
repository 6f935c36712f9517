"""Training loops that win accuracy back after a pass changed a PyTorch model: plain fine-tuning and knowledge
distillation from the original (Hinton et al., 2015), with optional feature (hint) losses (FitNets).

    student = graphopt.optimize(module, "prune:ratio=0.5", example_inputs=(x,),
                                finetune=graphopt.train.distiller(module, (x_train, y_train), epochs=3)).model

:func:`distill` minimizes ``(1 - alpha) * CE(y, student) + alpha * T**2 * KL(softmax(teacher / T) || softmax(student
/ T))`` (the ``T**2`` keeps the soft term's gradients on the scale of the hard one's as ``T`` grows), plus
``hint_weight`` times the mean squared error between named layers' outputs (a 1x1 adapter, trained with the
student, maps the student's channels to the teacher's when pruning made them differ). The teacher is any
``nn.Module``; it runs in eval mode without gradients. :func:`fit` is the loop both share (Adam, one-cycle
learning rate, fixed seed): with the same arguments, distillation and fine-tuning differ only in their loss. Both
train torch.export and PT2E-prepared (QAT) modules too (:func:`set_mode`).

When distillation pays (measured on the digits CNN, benchmarks/RESULTS.md): the teacher must be better than what
the student reaches by fine-tuning alone (a teacher that fine-tuning overtakes drags the student down), and the
budget must let the student come near the teacher. From a student that pruning left at chance, the soft targets
at ``T = 4`` (close to a regression on all the logits) win accuracy back more slowly than the labels within a
few epochs; distillation tolerates a higher learning rate than cross-entropy (Hinton et al., section 2), so a
short budget favours it as ``lr`` grows.

``data`` is ``(inputs, labels)`` (arrays or tensors; batched here, shuffled with ``seed``) or an iterable of
``(inputs, labels)`` batches that can be iterated once per epoch (a ``DataLoader``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from graphopt.errors import GraphoptError, UnsupportedError, UsageError, first_line


def trained_module(returned: Any, who: str) -> Any:
    """What a training loop (``finetune=``, ``qat=``) returned: None (it trained in place) or the GraphModule it
    was given or replaced it with; anything else is the caller's mistake, said in one line."""
    import torch

    if returned is None or isinstance(returned, torch.fx.GraphModule):
        return returned
    raise UsageError(f"{who} returned a {type(returned).__name__}: a training loop trains the torch.fx.GraphModule "
                     f"it is given, in place (return None) or returning that module")


def distillation_loss(student_logits, teacher_logits, labels, *, T: float = 4.0, alpha: float = 0.7):
    """``(1 - alpha) * CE(labels, student) + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))``,
    averaged over the batch."""
    import torch.nn.functional as F

    if teacher_logits.shape != student_logits.shape:
        raise UsageError(f"distill: the teacher's outputs {tuple(teacher_logits.shape)} and the student's "
                         f"{tuple(student_logits.shape)} differ (the same classes, in the same order, are needed)")
    hard = classification_loss(student_logits, labels)
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * T * T * soft


def fit(model, data, loss: Callable, *, epochs: int = 3, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
        extra_parameters: Iterable = ()) -> Any:
    """Train ``model`` for ``epochs`` passes over ``data`` with Adam and a one-cycle learning rate peaking at
    ``lr``; ``loss(model, inputs, labels)`` gives the batch's loss. Returns the model in eval mode (a torch.export
    module too: see :func:`set_mode`)."""
    import torch

    _check_positive(epochs=epochs, lr=lr, batch_size=batch_size)
    torch.manual_seed(seed)
    per_epoch, batches = _batches(data, batch_size, seed)
    steps = epochs * per_epoch
    parameters = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters)
    if not parameters:
        raise UsageError("the model has no trainable parameters (nothing to fine-tune)")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    set_mode(model, True)
    for epoch in range(epochs):
        for inputs, labels in batches(epoch):
            optimizer.zero_grad()
            loss(model, inputs, labels).backward()
            optimizer.step()
            schedule.step()
    return set_mode(model, False)


def classification_loss(logits, labels):
    """The cross-entropy of ``labels`` (class indices) under ``logits``; labels that are no class index of the
    logits are the caller's mistake, said in one line."""
    import torch
    import torch.nn.functional as F

    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UsageError(f"training data: labels must be integer class indices, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
        raise UsageError(f"training data: labels must be class indices in [0, {logits.shape[-1]}) (the model's "
                         f"outputs), got {int(labels.min())}..{int(labels.max())}")
    return F.cross_entropy(logits, labels)


def finetune(model, data, *, epochs: int = 3, lr: float = 3e-3, batch_size: int = 32, seed: int = 0):
    """Plain fine-tuning: :func:`fit` with the cross-entropy of the labels."""
    return fit(model, data, lambda m, x, y: classification_loss(m(x), y), epochs=epochs, lr=lr,
               batch_size=batch_size, seed=seed)


def distill(student, teacher, data, *, T: float = 4.0, alpha: float = 0.7, epochs: int = 3, lr: float = 3e-3,
            batch_size: int = 32, seed: int = 0, hints: dict[str, str] | None = None, hint_weight: float = 1.0):
    """Train ``student`` on ``data`` with :func:`distillation_loss` against ``teacher``'s logits, plus, with
    ``hints`` (``{student layer: teacher layer}``, module names), the mean squared error between those layers'
    outputs. Returns the student in eval mode. The teacher runs in eval mode without gradients (its BatchNorm
    statistics and weights never change) and is left in the mode it came in; a teacher already in eval mode,
    or a torch.export module whose graph already runs BatchNorm/dropout in eval mode, is not touched."""
    import torch

    if not 0 < T < math.inf:
        raise UsageError(f"distill: T must be a finite number > 0, got {T}")
    if not 0 <= alpha <= 1:
        raise UsageError(f"distill: alpha must be in [0, 1], got {alpha}")
    if teacher is student:
        raise UsageError("distill: the teacher is the student (pass a copy of the model before it changed)")
    restore_teacher = _in_eval(teacher)
    taps = _Hints(student, teacher, hints or {}, hint_weight)

    def loss(model, inputs, labels):
        with torch.no_grad():
            target = teacher(inputs)
        value = distillation_loss(model(inputs), target, labels, T=T, alpha=alpha)
        return value + taps.loss()

    try:
        taps.start(data, batch_size, seed)
        return fit(student, data, loss, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                   extra_parameters=taps.adapter_parameters())
    finally:
        taps.stop()
        restore_teacher()


def distiller(teacher, data, **options) -> Callable:
    """``student -> distill(student, teacher, data, **options)``: a ``finetune=`` function for
    ``graphopt.optimize`` (the teacher is usually the module before pruning: pass a copy if the same module is
    what is optimized)."""
    return lambda student: distill(student, teacher, data, **options)


# -- hints ------------------------------------------------------------------------------------------------------
class _Hints:
    """Forward hooks that keep the named layers' outputs of the last forward pass, and the adapters (a 1x1 Conv2d
    on NCHW feature maps, a Linear on the last axis otherwise) from the student's channels to the teacher's,
    built on a first forward pass before training so that the optimizer trains them with the student."""

    def __init__(self, student, teacher, pairs: dict[str, str], weight: float):
        self.student, self.teacher, self.pairs, self.weight = student, teacher, dict(pairs), weight
        self.outputs: dict[tuple[str, str], Any] = {}
        self.handles: list = []
        self.adapters: dict[str, Any] = {}

    def start(self, data, batch_size: int, seed: int) -> None:
        import torch

        if not self.pairs:
            return
        for side, model in (("student", self.student), ("teacher", self.teacher)):
            modules = dict(model.named_modules())
            for name in (self.pairs if side == "student" else self.pairs.values()):
                if name not in modules:
                    raise UsageError(f"distill: hint layer '{name}' is not a module of the {side} (names as in "
                                     f"named_modules(), e.g. {', '.join(list(modules)[1:4])})")
                self.handles.append(modules[name].register_forward_hook(self._keep(side, name)))
        inputs, _ = next(iter(_batches(data, batch_size, seed)[1](0)))
        with torch.no_grad():
            set_mode(self.student, False)(inputs)
            self.teacher(inputs)
        for side, model in (("student", self.student), ("teacher", self.teacher)):
            for name in (self.pairs if side == "student" else self.pairs.values()):
                if (side, name) not in self.outputs:
                    raise UsageError(f"distill: hint layer '{name}' of the {side} never runs in its forward "
                                     f"({_called_modules(model)})")
        for s_name, t_name in self.pairs.items():
            got, want = self.outputs[("student", s_name)], self.outputs[("teacher", t_name)]
            axis = 1 if got.dim() == 4 else -1  # channels: NCHW feature maps, or the last axis
            rest = [d for i, d in enumerate(got.shape) if i != axis % got.dim()]
            if got.dim() != want.dim() or rest != [d for i, d in enumerate(want.shape) if i != axis % want.dim()]:
                raise UsageError(f"distill: hint '{s_name}' -> '{t_name}': outputs {tuple(got.shape)} and "
                                 f"{tuple(want.shape)} differ in more than their channels")
            if got.shape[axis] != want.shape[axis]:
                self.adapters[s_name] = torch.nn.Conv2d(got.shape[1], want.shape[1], 1) if axis == 1 else \
                    torch.nn.Linear(got.shape[-1], want.shape[-1])

    def _keep(self, side: str, name: str):
        def hook(module, args, output):
            self.outputs[(side, name)] = output
        return hook

    def adapter_parameters(self) -> list:
        return [p for adapter in self.adapters.values() for p in adapter.parameters()]

    def loss(self):
        import torch.nn.functional as F

        total = 0.0
        for s_name, t_name in self.pairs.items():
            got = self.outputs[("student", s_name)]
            adapter = self.adapters.get(s_name)
            if adapter is not None:
                got = adapter(got)
            total = total + F.mse_loss(got, self.outputs[("teacher", t_name)].detach())
        return self.weight * total

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# -- train / eval modes -----------------------------------------------------------------------------------------
def set_mode(model, training: bool):
    """``model.train(training)``, returning ``model``, for ATen graphs too. An FX graph from torch.export (or
    graphopt's own capture when symbolic_trace fails, or PT2E's QAT preparation) fixed the mode of its BatchNorm
    and dropout nodes when it was captured: ``train()``/``eval()`` either refuse (``ExportedProgram.module()``),
    return None (after torchao's ``allow_exported_model_train_eval``) or change nothing. Such a graph is
    rewritten with torchao's ``move_exported_model_to_train`` / ``_eval``, only when it does not already run in
    that mode; a mode it could not switch is an error, never a silent training-mode BatchNorm at evaluation."""
    import torch

    if getattr(model, "graphopt_switches_mode", False):  # graphopt's QAT module: its train() keeps frozen BatchNorm
        model.train(training)
        return model
    if "train" not in vars(model):  # nn.Module's own: submodules' flags (a symbolic_trace graph's BatchNorms)
        model.train(training)
    if not isinstance(model, torch.fx.GraphModule) or _graph_training(model) in (None, training):
        return model
    try:
        from graphopt.pt2e.torchao import pt2e, quiet_torch_logs

        ns = pt2e()
    except GraphoptError as exc:
        raise UnsupportedError(f"switching a torch.export graph to {'train' if training else 'eval'} mode needs "
                               f"torchao ({first_line(exc)})") from None
    with quiet_torch_logs():
        (ns.move_exported_model_to_train if training else ns.move_exported_model_to_eval)(model)
    if _graph_training(model) not in (None, training):
        raise UnsupportedError(f"could not switch the torch.export graph's BatchNorm/dropout to "
                               f"{'train' if training else 'eval'} mode (torchao rewrites only BatchNorm with the "
                               f"default momentum and eps): export the model in the mode it should run in")
    return model


def _graph_training(gm) -> bool | None:
    """Whether an ATen graph's BatchNorm / dropout nodes run in training mode; None when it has none."""
    import torch

    aten = torch.ops.aten
    where = {aten.batch_norm.default: 5, aten.dropout.default: 2, aten.feature_dropout.default: 2}
    modes = {bool(n.args[where[n.target]]) for n in gm.graph.nodes
             if n.op == "call_function" and n.target in where and len(n.args) > where[n.target]}
    return None if not modes else True in modes


def _in_eval(model) -> Callable[[], None]:
    """Put ``model`` in eval mode where it is not (its ATen graph's BatchNorm/dropout, else its modules' flags);
    returns the function that puts it back as it was. A model already evaluating is not touched."""
    import torch

    if isinstance(model, torch.fx.GraphModule) and _graph_training(model) is not None:
        if not _graph_training(model):
            return lambda: None
        set_mode(model, False)
        return lambda: set_mode(model, True)
    was = {m: m.training for m in model.modules()}
    if not any(was.values()):
        return lambda: None
    set_mode(model, False)

    def restore() -> None:
        for m, training in was.items():
            m.training = training
    return restore


def _called_modules(model) -> str:
    """For a hint error: which module names run (an FX graph inlines containers' forward; torch.export, all)."""
    import torch

    if not isinstance(model, torch.fx.GraphModule):
        return "names as in named_modules()"
    called = [str(n.target) for n in model.graph.nodes if n.op == "call_module"]
    if not called:
        return "a torch.export graph calls no submodules: hints need an nn.Module or a symbolic_trace graph"
    return f"an FX graph runs only the modules it calls, e.g. {', '.join(called[:4])}"


# -- data -------------------------------------------------------------------------------------------------------
def _batches(data, batch_size: int, seed: int) -> tuple[int, Callable[[int], Iterable]]:
    """``(batches per epoch, epoch -> (inputs, labels) batches)``: ``(inputs, labels)`` arrays shuffled per epoch
    (from ``seed``), or the batches an iterable yields (iterated again each epoch when it has a length)."""
    import numpy as np
    import torch

    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        xs, ys = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in data)
        if xs.is_floating_point() and xs.dtype != torch.float32:  # numpy's default float64: the model's float32
            xs = xs.float()
        if len(xs) != len(ys):
            raise UsageError(f"training data: {len(xs)} inputs but {len(ys)} labels")
        if len(xs) == 0:
            raise UsageError("training data is empty")

        def shuffled(epoch: int):
            order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            return ((xs[i], ys[i]) for i in order.split(batch_size))

        return -(-len(xs) // batch_size), shuffled
    if not hasattr(data, "__iter__") or isinstance(data, (np.ndarray, torch.Tensor)):
        raise UsageError(f"training data must be (inputs, labels) or an iterable of such batches, got "
                         f"{type(data).__name__}")
    if hasattr(data, "__len__"):
        if not len(data):
            raise UsageError("training data is empty")
        return len(data), lambda epoch: data
    items = list(data)  # a one-shot iterator: kept, so every epoch sees its batches
    if not items:
        raise UsageError("training data is empty")
    return len(items), lambda epoch: items


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not value > 0 or (name in ("epochs", "batch_size") and value != int(value)):
            raise UsageError(f"{name} must be a {'whole ' if name in ('epochs', 'batch_size') else ''}number > 0, "
                             f"got {value!r}")
