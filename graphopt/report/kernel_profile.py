"""A backend's profile of the graph it optimized, mapped back to graphopt's fusion groups (for the latency guard,
:mod:`graphopt.report.latency_guard`).

A backend that profiles (``backend.profile_kernels(model, feeds, runs, threads)``: onnxruntime's profiler,
OpenVINO's performance counters) gives
the time of each kernel of the graph it actually runs: onnxruntime rewrites a float CNN into NCHWc convolutions
with their Add and activation fused, and between layout Reorders; an int8 one into QLinearConv / QLinearAdd in
NHWC between Transposes, with the Q/DQ it could not fuse. :func:`kernel_groups` says which group each kernel runs,
from the name onnxruntime gives it (the node it was built from, or the tensor it writes); :func:`profile_units`
sums them per group, in the float and the int8 profile, and joins a group that one placement fuses into a
neighbour's kernel with that neighbour, so that like is compared with like.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AUX", "Unit", "kernel_groups", "profile_units"]

QDQ = ("QuantizeLinear", "DequantizeLinear")
AUX = "<conversion>"  # a kernel the quantization or the backend inserted (Q/DQ, layout change): a neighbour's


def kernel_groups(study, kernels: list[dict]) -> list[str | None]:
    """The group each kernel of a profile (``backend.profile_kernels`` of the float or an int8 model of
    ``study``) runs: its ``node`` is a node of the float graph (a group's anchor or epilogue: that group; another:
    None, the same op in every placement), a tensor (the group that writes it), or ``<tensor>_<op>`` (a Q/DQ
    node of place-qdq, whatever op the backend ran it as: a Q belongs to the group writing the tensor, else the
    first reading it; a DQ to the first reading it, else the one writing it: the conversion is the cost of the
    group it serves). Any other kernel is a
    conversion the backend or the quantization inserted (a layout Transpose or Reorder, the model input's Q): it
    belongs to the next kernel that has a group, else the previous one."""
    producer, readers = _tensor_maps(study)
    owner = _node_owners(study, producer)
    node_names = {n.name for n in study.graph.gs.nodes}

    def of(name: str, op: str):
        if op not in QDQ:  # a Q/DQ node of place-qdq run as another op (OpenVINO: a FakeQuantize)
            op = next((q for q in QDQ if name.endswith("_" + q)), op)
        if name in owner:
            return owner[name]
        if name in producer:
            return owner.get(producer[name])
        if op and name.endswith("_" + op) and name[: -len(op) - 1] in readers:
            tensor = name[: -len(op) - 1]
            wrote = owner.get(producer.get(tensor, ""))
            read = next((owner[r] for r in readers[tensor] if r in owner), None)
            return (read or wrote) if op == "DequantizeLinear" else (wrote or read)
        return None if name in readers or name in node_names else AUX

    found = [of(k["node"], k.get("op", "")) for k in kernels]
    for i, grp in enumerate(found):
        if grp == AUX:
            found[i] = next((x for x in found[i + 1:] if x not in (None, AUX)), None) or next(
                (x for x in found[:i][::-1] if x not in (None, AUX)), None)
    return found


def _tensor_maps(study) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The float graph's tensor -> the node writing it, and tensor -> the nodes reading it."""
    producer, readers = {}, {}
    for n in study.graph.gs.nodes:
        producer.update(dict.fromkeys((t.name for t in n.outputs), n.name))
        for t in n.inputs:
            readers.setdefault(t.name, []).append(n.name)
    return producer, readers


def _node_owners(study, producer: dict[str, str]) -> dict[str, str]:
    """Node name -> group, for every group's members and its fused epilogue (the nodes between its anchor and
    the tensor it writes)."""
    nodes = {n.name: n for n in study.graph.gs.nodes}
    owner = {}
    for grp in study.groups:
        owner.update(dict.fromkeys(grp.members, grp.name))
        name = producer.get(grp.output)
        for _ in range(8):  # bias Add, residual Add, activation: a short chain back to a member
            if name is None or name in grp.members or name not in nodes:
                break
            owner[name] = grp.name
            name = next((producer[t.name] for t in nodes[name].inputs if t.name in producer), None)
    return owner


@dataclass
class Unit:
    """Groups compared together: ``float_us`` and ``int8_us``, their kernels' time per run in each profile (a group
    that one placement fuses into a neighbour's kernel joins that neighbour)."""

    groups: list[str]
    float_us: float
    int8_us: float

    @property
    def name(self) -> str:
        return " + ".join(self.groups)


def profile_units(study, float_kernels: list[dict], int8_kernels: list[dict]) -> list[Unit]:
    """The study's groups as units compared between the float and the fully-int8 profile, in graph order. A group
    with a kernel in one profile and none in the other was fused into a neighbour there (onnxruntime's NCHWc
    convolution takes the residual Add after it): it joins the group that writes one of its inputs for it alone,
    else those writing its inputs, else those reading its output, that have a kernel in that profile."""
    times = []
    for kernels in (float_kernels, int8_kernels):
        t: dict[str, float] = {}
        for k, grp in zip(kernels, kernel_groups(study, kernels)):
            if grp is not None:
                t[grp] = t.get(grp, 0.0) + float(k["us"])
        times.append(t)
    by = {grp.name: grp for grp in study.groups}
    writer = {grp.output: grp.name for grp in study.groups}
    _, readers = _tensor_maps(study)
    reads: dict[str, list[str]] = {}
    for grp in study.groups:
        for t in grp.inputs:
            reads.setdefault(t, []).append(grp.name)
    parent = {name: name for name in by}

    def root(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for t, other in (times, times[::-1]):
        for name in by:
            if name in t or name not in other:
                continue
            writers = [writer[i] for i in by[name].inputs if i in writer and writer[i] in t]
            alone = [w for w in writers if len(readers.get(by[w].output, ())) == 1]
            for n in alone or writers or [r for r in reads.get(by[name].output, []) if r in t]:
                parent[root(n)] = root(name)
    units: dict[str, Unit] = {}
    for name in by:
        if name in times[0] or name in times[1]:
            u = units.setdefault(root(name), Unit([], 0.0, 0.0))
            u.groups.append(name)
            u.float_us += times[0].get(name, 0.0)
            u.int8_us += times[1].get(name, 0.0)
    return list(units.values())
