"""The neutral graph structured pruning reads: nodes in ONNX's op vocabulary over named values.

Both IRs are shown to the pruning engine the same way. An adapter (``onnx_adapter``, ``fx_adapter``) turns its
graph into a :class:`ChannelView` — nodes in topological order, each with an ``op`` from ONNX's operator
vocabulary (an ``nn.Conv2d`` is a ``Conv`` whose inputs are ``[x, weight, bias]``), the static shape of every
value, and the arrays of the values that are constants (initializers, module parameters and buffers) — and later
applies the plan the engine returns: new arrays for constants, new values for node attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PNode:
    """One op. ``inputs`` may hold ``None`` for an absent optional input; constants are inputs too."""

    name: str
    op: str
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def input(self, i: int) -> str | None:
        return self.inputs[i] if i < len(self.inputs) else None


@dataclass
class ChannelView:
    nodes: list[PNode]
    shapes: dict[str, tuple]  # value -> static shape; unknown (symbolic) dims are None
    consts: dict[str, np.ndarray]  # constant values (weights, shape targets, scalars)
    inputs: list[str]
    outputs: list[str]
    ir: str = "onnx"
    grads: dict[str, np.ndarray] = field(default_factory=dict)  # d loss / d constant, for data-driven criteria

    def shape(self, value: str | None) -> tuple | None:
        return None if value is None else self.shapes.get(value)

    def const(self, value: str | None) -> np.ndarray | None:
        return None if value is None else self.consts.get(value)


@dataclass
class Plan:
    """What to change: new arrays for constants and new attribute values, keyed by node name."""

    consts: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[tuple[str, str], Any] = field(default_factory=dict)  # (node name, key) -> value
    kept: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (constant, axis) -> indices kept
