"""Pipeline aliases: short names for pass sequences graphopt ships (``--passes fold``)."""

from __future__ import annotations

from graphopt import hookimpl


@hookimpl
def graphopt_register_pipelines(registry):
    registry.add_pipeline(
        "fold",
        "eliminate-identity,fold-constants,fold-bn,eliminate-dead",
        "exact cleanup: drop Identity/inference Dropout, fold constant subgraphs, fold BatchNorm into the "
        "Conv/Gemm before it, remove what no output needs",
    )
    registry.add_pipeline(
        "int8",
        "insert-observers,calibrate,latency-guard,place-qdq",
        "static int8 in the target backend's scheme: observe activations, calibrate ranges on --calib data, "
        "keep float what the backend's own profile shows slower in int8 (the latency guard, where the backend "
        "profiles: onnxruntime, openvino; int8:guard=off to skip it), place Q/DQ where the backend runs int8",
    )
    registry.add_pipeline(
        "int8-budget",
        "insert-observers,calibrate,mixed-precision,latency-guard,place-qdq,place-fallback",
        "static int8 under an accuracy budget: calibrate, keep the most sensitive fusion groups float until "
        "min_cosine (outputs vs fp32) or max_drop (accuracy points, with eval=labelled.npz) holds, then the "
        "latency guard as in int8 (it only adds float groups: the budget still holds), place Q/DQ; "
        "with fallback=int8-dynamic (or int4-weight), the groups kept float that hold the budget in that format "
        "run in it instead; e.g. int8-budget:min_cosine=0.99:fallback=int8-dynamic",
    )
    registry.add_pipeline(
        "int8-guarded",
        "insert-observers,calibrate,latency-guard:guard=on,place-qdq",
        "static int8 guarded by measured latency on any backend: calibrate, find the groups whose int8 kernels are "
        "not faster (the backend's profile of its optimized graph; elsewhere the low-arithmetic groups, each timed), "
        "keep them float only if the whole model is then faster beyond the noise and min_gain, confirm against "
        "fp32, place Q/DQ; e.g. int8-guarded:min_gain=0.1",
    )
    registry.add_pipeline(
        "fp8",
        "insert-observers,calibrate,place-qdq:activations=fp8",
        "float8 E4M3 Q/DQ (opset 19): per-tensor activations and per-channel weights, symmetric, scale = amax / 448, "
        "where the target backend runs float8 (tensorrt; onnxruntime refuses)",
    )
    registry.add_pipeline(
        "int8-qat",
        "insert-observers:fold_bn=false,calibrate,qat",
        "int8 through quantization-aware training (PyTorch models, with optimize(..., qat=train)): observe and "
        "calibrate with BatchNorm kept, fake-quantize in the backend's scheme, train, fold BatchNorm, Q/DQ",
    )
    registry.add_pipeline(
        "prune",
        "prune-channels",
        "structured channel pruning with its defaults: l1 criterion, half of each group's channels, graph "
        "outputs (the classifier) kept; takes prune-channels' options (prune:ratio=0.3:round_to=8)",
    )
