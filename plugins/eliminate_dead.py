"""eliminate-dead: remove what does not contribute to the graph's outputs; the model's inputs always stay."""

from __future__ import annotations

from graphopt import Pass, PassResult, hookimpl
from graphopt.ir.fx_graph import delete_unread_attributes, fx_may_mutate
from graphopt.ir.gs_gaps import gs_graphs


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


# -- helpers ------------------------------------------------------------------------------------------------
def _onnx_nodes(g) -> set[int]:
    return {id(n) for sub in gs_graphs(g) for n in sub.nodes}


def _onnx_initializers(g) -> set[int]:
    import onnx_graphsurgeon as gs

    return {id(t) for sub in gs_graphs(g) for t in sub.tensors().values() if isinstance(t, gs.Constant)}


@hookimpl
def graphopt_register_passes(registry):
    registry.add_pass(EliminateDead)
