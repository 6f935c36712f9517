"""Per-fusion-group int8 sensitivity on the PyTorch route (FX / torch.export, the x86 backend): the same study,
table and budget search as :mod:`graphopt.report.sensitivity` (ONNX), on an ATen graph.

Groups are what the x86 backend runs as one kernel, read off the placement the FX route's place-qdq makes
(:func:`graphopt.pt2e.quantizer.plan`, the scheme's own rules): a Conv or Linear with its fused epilogue — a
residual Add that reads the conv's output (``fused_add``: a oneDNN ``sum`` post-op) and the activation after it
(Relu, Clip, HardSwish) — or an op the scheme quantizes on its own. A group is named the way place-qdq's
``exclude_nodes`` names a node: by its **module path** (``layer1.0.conv1``) where that path picks exactly this op,
else by its FX node name (a functional op inside a module, a module called twice). Keeping a group float
excludes its anchor; its fused Add and activation follow (an Add is quantized only as a conv's post-op on x86,
``residual_add_qdq=False``, so with the conv float it stays float too).

The decision is therefore written as x86's per-module config: ``place-qdq:exclude_nodes=<module paths>``, which is
what ``X86InductorQuantizer.set_module_name_qconfig(path, None)`` says for torchao's own quantizer (each path
excluded from int8, the rest under the global config). A group named by an FX node name (no module path picks it
alone) has no module-level twin in X86InductorQuantizer; place-qdq takes it as it is.

A trial quantizes the calibrated float graph with those exclusions (the ranges calibrated once, by the same
place-qdq pass) and runs the Q/DQ graph in eager PyTorch on the study's samples. The eager Q/DQ graph is the
reference numerics of the lowered oneDNN kernels (the x86 backend checks its lowered package against it by SQNR
before writing it, and its tests do the same): compiling every trial with inductor would cost seconds to minutes
per trial and change no ranking. The study lives in a folder (``model.pt2``: the calibrated program,
``torch.export.save``; ``data.npz``; ``study.json``: ranges keyed by ATen node name, the groups), so trials run in
worker processes (``processes``, Ray) as on ONNX: a worker reloads the program with ``torch.export.load`` (no
pickled code) and runs one torch thread.

The proxy measures, in one fully-int8 run, each tensor's noise as the graph computes it (an op's own output, not
the dequantized copy its reader takes): x86 quantizes a group's *inputs*, so the noise a group adds shows at its
output and not at the tensor it reads.
"""

from __future__ import annotations

import io
import math
import os
from typing import Iterable

import numpy as np

from graphopt.backends.base import iter_batches
from graphopt.errors import UsageError
from graphopt.report.sensitivity import Group, Study, groups_from_json, prepare
from graphopt.report.study_files import read_study

__all__ = ["FxStudy", "fx_decision_groups", "prepare_fx", "run_fx_trial"]


def prepare_fx(model, calibration, **options) -> "FxStudy":
    """:func:`graphopt.report.sensitivity.prepare` for a PyTorch model (an ``nn.Module`` or FxGraph, a ``.pt2``
    path) on a PyTorch backend (``backend=`` x86): calibrate once, make an :class:`FxStudy`."""
    return prepare(model, calibration, kind=FxStudy, **options)


def fx_decision_groups(gm, scheme, ranges: dict | None = None) -> list[Group]:
    """The groups of calibrated ATen graph ``gm`` under ``scheme`` (see the module docstring), in graph order;
    with ``ranges``, only the ops whose inputs were calibrated (what place-qdq quantizes)."""
    from graphopt.ir.fx_ops import onnx_op_type
    from graphopt.pt2e.quantizer import _through_bn, plan

    placed = plan(gm, scheme, ranged=None if ranges is None else set(ranges))
    ops = {n: onnx_op_type(n) for n in gm.graph.nodes}
    quantized = set(placed.quantized)
    fused: dict = {}  # conv -> (the Add it takes as its post-op, the Add's residual input)
    for n in placed.quantized:
        if ops[n] == "Add" and scheme.fused_add:
            convs = [a for a in n.args[:2] if _through_bn(a, ops) in quantized and ops[_through_bn(a, ops)] == "Conv"
                     and len(a.users) == 1]
            if convs:
                residual = next(a for a in n.args[:2] if a is not convs[0])
                fused[_through_bn(convs[0], ops)] = (n, residual)
    adds = {add for add, _ in fused.values()}
    candidates = [n for n in gm.graph.nodes if ops[n] is not None]  # what exclude_nodes may touch
    groups = []
    for n in placed.quantized:
        if n in adds:
            continue
        if ops[n] in scheme.weighted_ops:
            inputs, out, members = [n.args[0]], n, [n]
            if n in fused:
                add, residual = fused[n]
                inputs.append(residual)
                out = add
                if scheme.residual_add_qdq:  # with the conv float the Add would be quantized on its own
                    members.append(add)
            users = list(out.users)
            if len(users) == 1 and ops[users[0]] in scheme.fused_activations:
                out = users[0]
        else:
            inputs, out, members = [a for a in n.all_input_nodes if ranges is None or a.name in ranges], n, [n]
        names = tuple(_decision_name(m, candidates) for m in members)
        groups.append(Group(names[0], ops[n], names, tuple(a.name for a in inputs), out.name))
    return groups


def _decision_name(node, candidates) -> str:
    """The name ``exclude_nodes`` keeps ``node`` float by: its module path when that picks no other op of the graph
    (x86's per-module config), else its FX node name."""
    from graphopt.pt2e.quantizer import matches, node_names

    for name in sorted(node_names(node) - {node.name}) + [node.name]:
        if not any(other is not node and matches(other, (name,)) for other in candidates):
            return name
    raise UsageError(f"node '{node.name}' has no name that picks it alone for exclude_nodes")


class FxStudy(Study):
    """A :class:`~graphopt.report.sensitivity.Study` of a calibrated ATen graph (an :class:`~graphopt.ir.FxGraph`)
    on a PyTorch backend: the same interface (``groups``, ``members``, ``quantized``, ``score``, ``metrics``,
    ``relative_noise``...), trials in eager PyTorch (see the module docstring)."""

    ir = "fx"

    @staticmethod
    def decision_groups(graph, scheme, ranges: dict) -> list[Group]:
        return fx_decision_groups(graph.gm, scheme, ranges)

    @staticmethod
    def serialize(graph) -> tuple[str, str, bytes, dict]:
        """The calibrated ATen program as ``torch.export.save`` writes it, and its activations' names in order."""
        import torch

        from graphopt.ir.fx_export import export_dynamic

        if not graph.is_aten():
            raise UsageError("an FX study needs the calibrated ATen graph (run insert-observers and calibrate)")
        buffer = io.BytesIO()
        torch.export.save(export_dynamic(graph.gm, graph.example_inputs), buffer)
        return "fx-", "model.pt2", buffer.getvalue(), {"ir": "fx", "activations": _activations(graph.gm)}

    @staticmethod
    def identity(graph, model: bytes) -> bytes:
        """The program's code and its tensors, by name: ``torch.export.save`` writes object ids and a random
        serialization id into the file, so its bytes differ on every run and a rerun never found its study."""
        import torch

        parts = [graph.gm.code.encode()]
        for name, t in sorted({**dict(graph.gm.named_parameters()), **dict(graph.gm.named_buffers())}.items()):
            parts += [name.encode(), str(t.dtype).encode(), str(tuple(t.shape)).encode(),
                      t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""]
        return b"\0".join(parts)

    @classmethod
    def _read(cls, folder: str) -> "FxStudy":
        """Ranges are keyed by ATen node name; a program that comes back with other names (same graph, same order)
        has them mapped by position."""
        from graphopt.ir.fx_graph import FxGraph

        meta, arrays, labels, registry, backend = read_study(folder)
        graph = FxGraph.load(os.path.join(folder, "model.pt2"))
        ranges = {k: tuple(v) for k, v in meta["ranges"].items()}
        now = _activations(graph.gm)
        if now != meta["activations"]:
            if len(now) != len(meta["activations"]):
                raise UsageError(f"{folder}: the saved program does not reload as the graph it was made from")
            rename = dict(zip(meta["activations"], now))
            ranges = {rename.get(k, k): v for k, v in ranges.items()}
        return cls(folder, graph, ranges, arrays, labels, meta["backend"], meta["place"],
                   groups_from_json(meta["groups"]), registry, backend)

    @staticmethod
    def trial_function():
        return run_fx_trial

    def reference(self) -> list[np.ndarray]:
        if self._reference is None:
            self._reference = _run_eager(self.graph, self.data)
        return self._reference

    def score(self, float_groups: Iterable[str] = ()) -> dict[str, float | None]:
        """One trial: the Q/DQ graph, int8 except ``float_groups``, run in eager PyTorch on the study's samples."""
        return self.metrics(_run_eager(self.quantized(float_groups), self.data))

    def relative_noise(self, samples: int = 32) -> dict[str, float]:
        """Each group input's and output's noise-to-signal ratio in the fully-int8 graph, as its op computes it."""
        import torch

        from graphopt.ir.expose import expose_fx

        names = list(dict.fromkeys(t for grp in self.groups for t in (*grp.inputs, grp.output)))
        quantized = self.quantized()
        present = {n.name for n in quantized.gm.graph.nodes}
        names = [n for n in names if n in present]
        run_a, run_b = expose_fx(self.graph.gm, names), expose_fx(quantized.gm, names)
        noise, signal = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        subset = {k: v[:samples] for k, v in self.data.items()}
        for feeds, real in iter_batches(self.graph.input_specs(), subset, 32):
            args = [torch.from_numpy(np.ascontiguousarray(feeds[k])) for k in self.graph.input_names()]
            with torch.no_grad():
                outs_a, outs_b = run_a(*args)[-len(names):], run_b(*args)[-len(names):]
            for name, a, b in zip(names, outs_a, outs_b):
                a, b = a[:real].double(), b[:real].double()
                signal[name] += float((a * a).sum())
                noise[name] += float(((a - b) ** 2).sum())
        return {n: noise[n] / signal[n] if signal[n] > 0 else 0.0 for n in names}

    def proxy(self, samples: int = 32) -> dict[str, float]:
        """Each group's *added* noise in the fully-int8 graph, in dB: the noise-to-signal ratio of its output minus
        the worst of its inputs' (a layer after a damaged one inherits its noise but adds little). Where that
        difference is not positive (a convolution averages its input's noise down), the output's whole noise
        stands in for it: an upper bound, so such a group ranks as more sensitive, never hidden at the end."""
        rel = self.relative_noise(samples)
        out = {}
        for grp in self.groups:
            total = rel.get(grp.output, 0.0)
            added = total - max([rel.get(t, 0.0) for t in grp.inputs] + [0.0])
            noise = added if added > 1e-15 else total
            out[grp.name] = -10.0 * math.log10(noise) if noise > 1e-15 else math.inf
        return out


def run_fx_trial(item: dict) -> dict:
    """A trial, for an executor: ``{"study": folder, "float": [group names]}`` -> the study's metrics (in an
    executor's worker, torch runs the worker's share of the cores: :mod:`graphopt.executors.local`)."""
    return FxStudy.load(item["study"]).score(item["float"])


def _activations(gm) -> list[str]:
    from graphopt.pt2e.prepare import float_activations

    return float_activations(gm)


def _run_eager(graph, data: dict, batch: int = 32) -> list[np.ndarray]:
    """``graph`` (an FxGraph) run on ``data`` in batches (of the graph's own batch size where it has a fixed one);
    outputs concatenated."""
    parts = [[out[:real] for out in graph.run(feeds)] for feeds, real in iter_batches(graph.input_specs(), data, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
