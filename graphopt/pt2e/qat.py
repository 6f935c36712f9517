"""Quantization-aware training on an ATen graph: torchao's ``prepare_qat_pt2e`` with graphopt's fake quantizers,
the user's training loop, a freezing schedule, and ``convert_pt2e``.

``prepare_qat_pt2e`` rewrites each conv -> BatchNorm into the training form of PT2E's QAT (the conv runs on weights
scaled by the BatchNorm's running statistics and fake-quantized, then the BatchNorm normalizes with the batch's
statistics and updates its running ones), so BatchNorm trains as it should; ``convert_pt2e`` folds it into the
conv. What this module adds:

- ``train()`` / ``eval()`` that work on the exported module (an exported module refuses them): dropout and
  BatchNorm switch between their training and inference forms (torchao's graph rewrites);
- a schedule counted in training steps (forward passes in training mode): after ``freeze_observers_after`` steps
  the weight ranges stop following the weights (scales frozen); after ``freeze_bn_after`` steps BatchNorm uses its
  running statistics and stops updating them, also when the loop calls ``train()`` again — the recipe PyTorch's
  QAT tutorials follow to let the network settle on fixed statistics before conversion;
- after the loop, the checks that conversion did what it must: no ``batch_norm`` and no fake quantizer left.
"""

from __future__ import annotations

import contextlib
import types

import torch

from graphopt.pt2e.observers import FakeQuant
from graphopt.pt2e.prepare import batch_norms, inference_module
from graphopt.pt2e.torchao import pt2e, quiet_torch_logs


class QatSchedule:
    """Counts training steps on ``model`` and freezes its observers / BatchNorms after the given counts (0:
    never). ``steps``: how many training steps ran."""

    def __init__(self, model, freeze_observers_after: int = 0, freeze_bn_after: int = 0):
        self.model, self.steps = model, 0
        self.freeze_observers_after, self.freeze_bn_after = freeze_observers_after, freeze_bn_after
        self.observers_frozen = self.bn_frozen = False
        self._handle = model.register_forward_pre_hook(self._step)

    def _step(self, module, args) -> None:
        if not module.training:
            return
        self.steps += 1
        if self.freeze_observers_after and self.steps >= self.freeze_observers_after and not self.observers_frozen:
            freeze_observers(module)
            self.observers_frozen = True
        if self.freeze_bn_after and self.steps >= self.freeze_bn_after and not self.bn_frozen:
            self.bn_frozen = True
            _set_mode(module, module.training, bn_frozen=True)

    def remove(self) -> None:
        self._handle.remove()


def freeze_observers(model) -> None:
    """Stop every fake quantizer's range from following its tensor (fixed scales from now on)."""
    for module in model.modules():
        if isinstance(module, FakeQuant):
            module.disable_observer()


def _set_mode(model, training: bool, bn_frozen: bool = False):
    """Dropout in the form of ``training``; BatchNorm too, unless frozen (then always its inference form)."""
    from torchao.quantization.pt2e.export_utils import _replace_batchnorm, _replace_dropout

    with quiet_torch_logs():
        if getattr(model, "_graphopt_dropout_training", None) != training:
            _replace_dropout(model, train_to_eval=not training)
            model._graphopt_dropout_training = training
        bn_training = training and not bn_frozen
        if getattr(model, "_graphopt_bn_training", None) != bn_training:
            _replace_batchnorm(model, train_to_eval=not bn_training)
            model._graphopt_bn_training = bn_training
    return torch.nn.Module.train(model, training)  # the flag, and submodules' (fake quantizers ignore it)


def prepare(gm, quantizer, init_inputs, *, freeze_observers_after: int = 0, freeze_bn_after: int = 0):
    """The fake-quantized training module for ATen graph ``gm`` and the :class:`QatSchedule` counting its steps.
    Weight scales (and activations no calibration ranged) are initialized on ``init_inputs`` in inference mode."""
    ao = pt2e()
    with quiet_torch_logs():
        model = ao.prepare_qat_pt2e(gm, quantizer)
    model._graphopt_dropout_training = model._graphopt_bn_training = True  # prepare_qat_pt2e leaves both training
    schedule = QatSchedule(model, freeze_observers_after, freeze_bn_after)
    model.train = types.MethodType(lambda self, mode=True: _set_mode(self, mode, schedule.bn_frozen), model)
    model.eval = types.MethodType(lambda self: _set_mode(self, False, schedule.bn_frozen), model)
    model.graphopt_switches_mode = True  # graphopt.train.set_mode calls these instead of rewriting the graph itself
    model.eval()
    with torch.no_grad():
        model(*init_inputs)
    model.train()
    return model, schedule


def convert(model):
    """The Q/DQ graph of a trained QAT module (BatchNorm folded into the convs), after checking nothing of the
    training form is left: returns ``(graph module, what was left)`` — an empty list when conversion is clean."""
    ao = pt2e()
    model.eval()
    with quiet_torch_logs(), _fold_only_present_convs(model):
        converted = ao.convert_pt2e(model)
    fake = (FakeQuant, ao.FakeQuantizeBase)
    left = batch_norms(converted) + [name for name, m in converted.named_modules() if isinstance(m, fake)]
    return inference_module(converted), left


@contextlib.contextmanager
def _fold_only_present_convs(model):
    """torchao's ``convert_pt2e`` folds QAT's conv + BatchNorm by matching patterns for every conv kind (conv1d,
    conv2d, conv_transpose1d, conv_transpose2d) in 12 variants each, each pattern exported with torch.export: about
    a minute on two cores. Only the kinds the model has are matched here (the same rewrite, a quarter of the time
    for a CNN)."""
    import torch.nn.functional as F
    from torchao.quantization.pt2e import qat_utils

    aten = torch.ops.aten
    kinds = {aten.conv1d: F.conv1d, aten.conv2d: F.conv2d, aten.conv_transpose1d: F.conv_transpose1d,
             aten.conv_transpose2d: F.conv_transpose2d}
    present = {kinds[n.target.overloadpacket] for n in model.graph.nodes
               if n.op == "call_function" and getattr(n.target, "overloadpacket", None) in kinds}
    helper = qat_utils._fold_conv_bn_qat_helper

    def only_present(m, conv_fn, example_inputs, is_cuda):
        return helper(m, conv_fn, example_inputs, is_cuda) if conv_fn in present else m

    qat_utils._fold_conv_bn_qat_helper = only_present
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = helper
