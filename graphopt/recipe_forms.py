"""One decision, every backend's form: the fusion groups a budget kept float, written as each backend takes them.

The analysis (:mod:`graphopt.report.sensitivity`) decides on the analysed backend's groups. Each backend's form is
derived from that one set of float groups, on the same float graph:

- **ONNX Q/DQ backends** (onnxruntime, openvino: onnxruntime's Q/DQ form; tensorrt: explicit quantization) — the
  nodes ``place-qdq`` must leave out (``exclude_nodes``) and the pipeline that replays them. A float group maps to
  the backend's own decision groups (its scheme: TensorRT fuses a residual Add into the conv before it and has no
  QLinearAdd, onnxruntime runs that Add as its own int8 kernel): a backend group whose anchor the float group holds
  stays float whole (part of a kernel in float only splits it); a node of the float group that sits in another
  backend group (TensorRT's fused Add) stays float alone. A float group with no such node has no counterpart there:
  the backend does not quantize that op on its own, or its kernels take it too small (``min_channels``), so it runs
  float there already; ``unmapped`` says which and why. With the nodes, onnxruntime's form gives the equivalent
  ``quantize_static(..., nodes_to_exclude=[...])`` and openvino's NNCF's ``nncf.IgnoredScope(names=[...])``, the
  same ONNX node names.
- **x86 (PyTorch)** — module paths, for a model exported by ``torch.onnx.export(..., dynamo=True)``: its nodes carry
  the module they ran in (``pkg.torch.onnx.name_scopes``, with ``pkg.torch.onnx.class_hierarchy``). A float group
  whose anchor ran as a Conv/ConvTranspose/Linear module maps to that module's path: graphopt's FX
  ``place-qdq:exclude_nodes=PATH`` and ``X86InductorQuantizer.set_module_name_qconfig(PATH, None)``. An op with no
  module of its own (an Add in a block's forward, a functional conv) cannot be named per module: ``unmapped``. An
  ONNX without that metadata (the TorchScript exporter's, or graphopt's own FX -> ONNX, which drops it) has no x86
  form, and the form says why.

**Fallback formats.** A budget may run some groups in a fallback format instead of float (int8 weights with run-time
activations, 4-bit weights: :mod:`graphopt.report.budget`). Those groups are left out of the backend's static int8
like float ones, and its form appends the fallback's passes, restricted to them, when the backend has the format:
the fallback pass is run on the float graph with that backend's scheme (int8-dynamic refuses a scheme without uint8
activations: TensorRT's) and must write only ops the backend reads (onnxruntime's ``com.microsoft`` contrib ops:
onnxruntime, and OpenVINO's ONNX front end, checked here on MatMulNBits and the dynamic int8 ops; TensorRT's parser
reads the standard domain only). Where it has not, the groups stay float there and ``fallback`` says why. The x86
form keeps them float (the FX budget searches no fallback format).
"""

from __future__ import annotations

import ast
import dataclasses

import onnx

from graphopt.errors import UsageError

__all__ = ["ONNX_FORMS", "backend_forms", "replay_passes"]

ONNX_FORMS = ("onnxruntime", "openvino", "tensorrt")
CONTRIB_READERS = frozenset({"onnxruntime", "openvino"})  # backends that run onnxruntime's com.microsoft ops
SCOPES, CLASSES = "pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"
MODULE_CLASSES = frozenset({"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                            "Linear"})
_NODE_NAME_OK = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./-@=")


def backend_forms(study, float_groups: list[str], model_path: str, fallback_groups: list[str] = ()) -> dict:
    """Each backend's form of keeping ``float_groups`` (names of ``study``'s groups) float and running
    ``fallback_groups`` in the study's fallback format: ``{backend: form}`` for :data:`ONNX_FORMS` and ``x86`` (see
    the module docstring). ``model_path``: the ONNX file analysed (its node metadata gives the module paths). A
    study of a PyTorch program has its own form only (the recipe's passes, for x86): the ONNX backends' forms come
    from analysing the ONNX file it exports to."""
    if study.graph.ir != "onnx":
        why = ("the analysis ran on the PyTorch program (its form is the recipe's passes, for x86); analyse its "
               "ONNX export (graphopt run ... -o m.onnx) for this backend's form")
        return {name: {"available": False, "why": why} for name in ONNX_FORMS}
    forms = {name: _onnx_form(study, float_groups, name, list(fallback_groups)) for name in ONNX_FORMS}
    forms["x86"] = _x86_form(study, [*float_groups, *fallback_groups], model_path)
    if fallback_groups:
        forms["x86"]["fallback"] = {"available": False, "format": study.fallback_text, "groups": [],
                                    "float": list(fallback_groups),
                                    "why": "the PyTorch budget searches no fallback format"}
    return forms


def replay_passes(study, exclude: list[str] | tuple[str, ...], registry=None, fallback: list = ()) -> str:
    """The pipeline that replays a decision: the study's calibration, then its placing pass excluding ``exclude``
    (node names, or on FX module paths), then the ``fallback`` passes (restricted: :meth:`Study.fallback_passes`)."""
    from graphopt.passes.pipeline import format_passes, resolve
    from graphopt.report.sensitivity import _place_pass

    named = [*exclude, *(n for p in fallback for n in p.options.exclude_nodes)]
    bad = [n for n in named if not set(n) <= _NODE_NAME_OK]
    if bad:
        raise UsageError(f"node '{bad[0]}' has characters a pipeline cannot hold (letters, digits and _./-@= only): "
                         f"rename the model's nodes to write a recipe")
    place = _place_pass(resolve(study.place_text, registry or study.registry))
    place = type(place)(dataclasses.replace(place.options, exclude_nodes=tuple(exclude)))
    return ",".join(t for t in (study.prefix_text, format_passes([place, *fallback])) if t)


def _fallback_here(study, backend, backend_name: str, groups: list[str]) -> tuple[list[str], str]:
    """The groups of ``groups`` the study's fallback format takes on ``backend`` and, where it cannot run there,
    why (then no groups)."""
    from graphopt.errors import GraphoptError
    from graphopt.report.sensitivity import run_fallback

    try:
        out, taken = run_fallback(study.graph, study.fallback_passes(groups), backend, study.registry)
    except GraphoptError as exc:  # the fallback pass refuses this backend's scheme
        return [], str(exc).splitlines()[0]
    domains = sorted({n.domain for n in out.gs.nodes} - {"", "ai.onnx", None})
    if domains and backend_name not in CONTRIB_READERS:
        return [], f"{backend_name} reads standard ONNX ops only; the format writes {', '.join(domains)} ops"
    return [g for g in groups if g in taken], ""


def _onnx_form(study, float_groups: list[str], backend_name: str, fallback_groups: list[str] = ()) -> dict:
    from graphopt.backends import get_backend
    from graphopt.backends.qdq_plan import too_small
    from graphopt.errors import GraphoptError
    from graphopt.passes.pipeline import resolve
    from graphopt.report.sensitivity import _place_pass, decision_groups

    try:
        backend = study.backend if backend_name == study.backend_name else get_backend(study.registry, backend_name)
        scheme = backend.scheme(_place_pass(resolve(study.place_text, study.registry)).options.request())
    except GraphoptError as exc:  # not registered, or the placement asks what this backend refuses
        return {"available": False, "why": str(exc).splitlines()[0]}
    fallback, no_format = _fallback_here(study, backend, backend_name, fallback_groups) if fallback_groups else ([], "")
    float_groups = [*float_groups, *(g for g in fallback_groups if g not in fallback)]  # no format there: float
    mine = {grp.name: grp for grp in study.groups}
    theirs = decision_groups(study.graph, scheme, study.ranges)
    nodes_by_name = {n.name: n for n in study.graph.gs.nodes}
    shapes = study.graph.inferred_shapes() if scheme.min_channels else None
    exclude, groups, unmapped = [], {}, {}
    for name in [*float_groups, *fallback]:
        members = set(mine[name].members)
        mapped = []
        for grp in theirs:
            if grp.name in members:
                mapped += grp.members
            else:
                mapped += [m for m in grp.members if m in members]
        mapped = list(dict.fromkeys(mapped))
        small = {m: why for m in mapped if shapes is not None and nodes_by_name[m].op in scheme.weighted_ops
                 and (why := too_small(nodes_by_name[m], scheme, shapes))}
        mapped = [m for m in mapped if m not in small]
        if mapped:
            groups[name] = mapped
            exclude += [m for m in mapped if m not in exclude]
        elif small:
            why = next(iter(small.values()))
            unmapped[name] = f"float on {backend_name} already, too small for its int8 kernels ({why})"
        else:
            unmapped[name] = (f"{backend_name}'s scheme does not quantize this {mine[name].op} on its own: it runs "
                              f"float there already")
    passes = study.fallback_passes(fallback)
    form = {"available": True, "exclude_nodes": exclude, "passes": replay_passes(study, exclude, fallback=passes),
            "groups": groups, "unmapped": unmapped}
    if fallback_groups:
        form["fallback"] = {"available": bool(fallback), "format": study.fallback_text, "groups": fallback}
        if len(fallback) < len(fallback_groups):
            form["fallback"]["float"] = [g for g in fallback_groups if g not in fallback]
            form["fallback"]["why"] = no_format or f"the format takes no such node on {backend_name}"
    listed = "[" + ", ".join(repr(n) for n in exclude) + "]"
    if backend_name == "onnxruntime":
        form["quantize_static"] = (f"onnxruntime.quantization.quantize_static(model_input, model_output, "
                                   f"calibration_data_reader, nodes_to_exclude={listed})")
    elif backend_name == "openvino":
        form["nncf"] = (f"nncf.quantize(onnx_model, calibration_dataset, "
                        f"ignored_scope=nncf.IgnoredScope(names={listed}))")
    return form


def _x86_form(study, float_groups: list[str], model_path: str) -> dict:
    model = onnx.load(model_path, load_external_data=False)
    meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in model.graph.node}
    if not any(SCOPES in m for m in meta.values()):
        return {"available": False,
                "why": f"the ONNX records no module paths (node metadata '{SCOPES}'): export the model with "
                       f"torch.onnx.export(..., dynamo=True), which writes them, and analyse that file"}
    paths, groups, unmapped = [], {}, {}
    for name in float_groups:
        scopes, classes = _literal(meta.get(name, {}).get(SCOPES)), _literal(meta.get(name, {}).get(CLASSES))
        module = scopes[-2] if len(scopes) >= 2 else ""
        leaf = classes[-2].rpartition(".")[2] if len(classes) >= 2 else ""
        if module and leaf in MODULE_CLASSES:
            groups[name] = module
            if module not in paths:
                paths.append(module)
        else:
            inside = f" inside module '{module}'" if module else ""
            unmapped[name] = (f"an op{inside} with no module of its own: X86InductorQuantizer takes configs per "
                              f"module, and the FX graph names it differently")
    calls = "; ".join(f"quantizer.set_module_name_qconfig({p!r}, None)" for p in paths)
    return {"available": True, "module_paths": paths, "passes": replay_passes(study, paths), "groups": groups,
            "unmapped": unmapped,
            "x86_inductor": ("quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_"
                             "config())" + (f"; {calls}" if calls else ""))}


def _literal(text: str | None) -> list:
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return value if isinstance(value, list) else []
