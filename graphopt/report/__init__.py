"""What graphopt measures about models: accuracy-side metrics (SQNR, cosine, relative error, top-1 agreement
and accuracy, from :mod:`graphopt.numeric`, per output and per layer) and costs (parameters and MACs per layer,
:mod:`graphopt.report.cost`). Latency and size come from the backends (:mod:`graphopt.backends`)."""

from graphopt.numeric import cosine_similarity, max_rel_error, sqnr_db, top1_accuracy, top1_agreement
from graphopt.report.cost import (
    LayerCost,
    LayerDelta,
    ModelCosts,
    compare_costs,
    cost_table,
    layer_costs,
    model_costs,
    total_costs,
)
from graphopt.report.metrics import (
    Comparison,
    LayerSQNR,
    LayerTable,
    OutputComparison,
    compare_models,
    compare_outputs,
    match_tensors,
    per_layer_sqnr,
)

__all__ = [
    "Comparison", "LayerCost", "LayerDelta", "LayerSQNR", "LayerTable", "ModelCosts", "OutputComparison",
    "compare_costs", "compare_models", "compare_outputs", "cosine_similarity", "cost_table", "layer_costs",
    "match_tensors", "max_rel_error", "model_costs", "per_layer_sqnr", "sqnr_db", "top1_accuracy", "top1_agreement",
    "total_costs",
]
