"""What graphopt measures about models: accuracy-side metrics (SQNR, cosine, relative error, top-1 agreement
and accuracy, per output and per layer). Latency and size come from the backends (:mod:`graphopt.backends`)."""

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
    "Comparison", "LayerSQNR", "LayerTable", "OutputComparison", "compare_models", "compare_outputs",
    "cosine_similarity", "match_tensors", "max_rel_error", "per_layer_sqnr", "sqnr_db", "top1_accuracy",
    "top1_agreement",
]
