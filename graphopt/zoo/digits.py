"""Real data that ships offline: scikit-learn's digits (1,797 8×8 images), and a small residual CNN for it.

The CNN: two residual blocks with BatchNorm on 16×16 upsampled inputs (a network of this shape reaches 99.7 % on
the held-out images when trained for minutes); the few epochs on the CPU used here reach about 99 % on the 397
held-out images. Used by tests and benchmarks that need accuracy on real data
(int8 accuracy budgets, pruning + fine-tuning).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TEST_SIZE = 397


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: images as float32 (N, 1, 16, 16), upsampled ×2 and scaled to
    zero mean / unit variance; labels int64. The split is fixed by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[:, None]  # (N, 1, 16, 16), nearest-neighbour upsampling
    x = (x - 0.3) / 0.4
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return x[train], y[train], x[test], y[test]


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class DigitsCNN(nn.Module):
    """stem conv (1 -> 16) -> residual block -> stride-2 conv (16 -> 32) -> residual block -> pool -> fc."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = _Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = _Block(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class DigitsMobileNet(nn.Module):
    """A narrow MobileNetV2-like net for the digits: inverted residuals with depthwise 3x3 convs and ReLU6. Depthwise
    convs are what per-tensor int8 weights hurt most (one scale for channels of very different ranges): the model
    the QAT benchmark uses."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        from graphopt.zoo.cnn import InvertedResidual, _conv_bn

        w = width
        self.features = nn.Sequential(
            _conv_bn(1, w, 3, act=nn.ReLU6), InvertedResidual(w, w, 1, 1), InvertedResidual(w, 2 * w, 2, 4),
            InvertedResidual(2 * w, 2 * w, 1, 4), InvertedResidual(2 * w, 4 * w, 2, 4),
            _conv_bn(4 * w, 8 * w, 1, act=nn.ReLU6))
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(torch.flatten(x, 1))


def train_digits_cnn(epochs: int = 6, seed: int = 0, model: nn.Module | None = None,
                     data: tuple | None = None, lr: float = 3e-3) -> nn.Module:
    """Train (or fine-tune ``model``) on the digits training split with Adam at ``lr``; returns the model in eval
    mode. Deterministic for a given seed on one machine; a few seconds on two cores."""
    torch.manual_seed(seed)
    x_train, y_train, _, _ = data if data is not None else digits_data(seed)
    model = model if model is not None else DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
    return model.eval()


def finetune_digits_cnn(model: nn.Module, epochs: int = 5, data: tuple | None = None, lr: float = 3e-3,
                        batch_size: int = 32, seed: int = 0) -> nn.Module:
    """Fine-tune a (pruned) digits CNN on the training split: :func:`graphopt.train.finetune` (Adam with a
    one-cycle learning rate). Returns the model in eval mode; usable as ``graphopt.optimize(..., finetune=...)``'s
    training loop."""
    from graphopt.train import finetune

    x_train, y_train, _, _ = data if data is not None else digits_data(seed)
    return finetune(model, (x_train, y_train), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(axis=1) == labels).mean())
