"""What graphopt measures about models: accuracy-side metrics (SQNR, cosine, relative error, top-1 agreement
and accuracy, per output and per layer) and costs (parameters and MACs per layer, :mod:`graphopt.report.cost`).
Latency and size come from the backends (:mod:`graphopt.backends`)."""

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
    cosine_similarity,
    match_tensors,
    max_rel_error,
    per_layer_sqnr,
    sqnr_db,
    top1_accuracy,
    top1_agreement,
)

__all__ = [
    "Comparison", "LayerCost", "LayerDelta", "LayerSQNR", "LayerTable", "ModelCosts", "OutputComparison",
    "compare_costs", "compare_models", "compare_outputs", "cosine_similarity", "cost_table", "layer_costs",
    "match_tensors", "max_rel_error", "model_costs", "per_layer_sqnr", "sqnr_db", "top1_accuracy", "top1_agreement",
    "total_costs",
]
