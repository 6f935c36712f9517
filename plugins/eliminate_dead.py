"""eliminate-dead: remove what does not contribute to the graph's outputs; the model's inputs always stay."""

from __future__ import annotations

from graphopt import Pass, PassResult, hookimpl


class EliminateDead(Pass):
    """Remove nodes whose results reach no graph output, and the weights only they read.

    ONNX: onnx-graphsurgeon's ``cleanup`` (If/Loop bodies and local functions included), then a topological
    sort. Removes dead nodes (unused ``Constant`` nodes among them) and the initializers left unread. Graph
    inputs are never removed, even unused ones: they are the model's interface. Unused outputs of live nodes
    (a Dropout mask, BatchNormalization's training outputs) are left as they are. Note that initializers no
    node read in the *loaded* model are already gone: onnx-graphsurgeon does not import them, so they are not
    counted here.

    FX: ``Graph.eliminate_dead_code`` with placeholders, side-effecting ops (``Node.is_impure()``) and
    in-place ops (``x.add_()``, ``operator.iadd``, ``F.relu(x, inplace=True)``, modules with
    ``inplace=True``, which ``is_impure`` does not flag) kept; then parameters/buffers no ``get_attr`` reads
    any more and submodules nothing calls are deleted.

    Exact: only values the outputs never read are removed.
    """

    name = "eliminate-dead"
    irs = frozenset({"onnx", "fx"})

    # -- ONNX -------------------------------------------------------------------------------------------------
    def run_onnx(self, graph, ctx):
        g = graph.gs
        nodes_before, inits_before = _onnx_nodes(g), _onnx_initializers(g)
        order_before = [id(n) for n in g.nodes]
        g.cleanup(remove_unused_graph_inputs=False)
        g.toposort()
        nodes_after, inits_after = _onnx_nodes(g), _onnx_initializers(g)
        stats = {}
        if nodes_before - nodes_after:
            stats["removed nodes"] = len(nodes_before - nodes_after)
        if inits_before - inits_after:
            stats["removed initializers"] = len(inits_before - inits_after)
        reordered = [i for i in order_before if i in nodes_after] != [id(n) for n in g.nodes]
        notes = ["nodes were not in topological order; sorted"] if reordered else []
        return PassResult(graph, bool(stats) or reordered, stats, notes)

    # -- FX ---------------------------------------------------------------------------------------------------
    def run_fx(self, graph, ctx):
        gm = graph.gm
        nodes_before = sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
        modules_before = len(list(gm.named_modules()))
        read_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        gm.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or fx_may_mutate(node, gm))
        removed_nodes = nodes_before - sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
        removed_attrs = delete_unread_attributes(gm, read_before)
        gm.delete_all_unused_submodules()
        removed_modules = modules_before - len(list(gm.named_modules()))
        stats = {k: v for k, v in (("removed nodes", removed_nodes), ("removed parameters/buffers", removed_attrs),
                                   ("removed modules", removed_modules)) if v}
        if stats:
            gm.recompile()
        return PassResult(graph, bool(stats), stats)


# -- helpers (fold-constants and eliminate-identity use them too) ---------------------------------------------
def _onnx_graphs(g):
    return [g, *(sub for node in g.nodes for sub in node.subgraphs(recursive=True))]


def _onnx_nodes(g) -> set[int]:
    return {id(n) for sub in _onnx_graphs(g) for n in sub.nodes}


def _onnx_initializers(g) -> set[int]:
    import onnx_graphsurgeon as gs

    return {id(t) for sub in _onnx_graphs(g) for t in sub.tensors().values() if isinstance(t, gs.Constant)}


_INPLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul"})


def fx_may_mutate(node, gm) -> bool:
    """True when ``node`` may write to one of its inputs: an in-place method (``x.add_()``), function
    (``torch.relu_``, ``operator.iadd``, ``inplace=True``), ATen op with a mutable schema, or a module with
    ``inplace=True``. ``Node.is_impure()`` misses most of these; removing or reordering them is unsafe."""
    import inspect

    import torch

    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return getattr(mod, "inplace", False) is True
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS:
        return True
    if node.kwargs.get("inplace") is True:
        return True
    try:  # F.relu(x, True), F.hardtanh(x, 0, 6, True): bind positionally against the signature
        bound = inspect.signature(node.target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def delete_unread_attributes(gm, candidates) -> int:
    """Delete the tensors named in ``candidates`` (``get_attr`` targets) that no ``get_attr`` reads now and
    no called module owns. Returns how many were deleted."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    deleted = 0
    for target in sorted(set(candidates) - read):
        owner_path, _, attr = target.rpartition(".")
        if owner_path and any(owner_path == c or owner_path.startswith(c + ".") for c in called):
            continue  # the module still runs and reads its own parameters
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        if hasattr(owner, attr):
            delattr(owner, attr)
            deleted += 1
    return deleted


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(EliminateDead)
