"""onnx's backend conformance models through `graphopt run --passes fold`, as benchmarks/conformance.py runs them.

A fixed subset, chosen by name across every folder: plain element-wise and conv/gemm/batch-norm cases that fold,
Identity/Dropout/BatchNormalization in every mode the passes must leave alone, subgraphs (If, Loop), sequences and
optionals, and the known-hard ones: Shape with start/end, inputs that are shapes / axes / indices / scales (the
numeric check's random inputs), expanded functions whose constant folding breaks shape inference, IR version 3
models (initializers listed as graph inputs) and the `light` models (ConstantOfShape weights, BatchNorm to fold).
Each runs with the numeric check on and with --no-check; no run may be WRONG (a written model that is invalid or
gives other outputs than the case's expected ones, at onnx's tolerances) or CRASH (internal error, traceback,
timeout, input changed). Clean refusals (one `graphopt: error:` line, exit 2-7) are allowed.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import _conformance_cases as cc  # noqa: E402
import conformance  # noqa: E402

pytestmark = pytest.mark.slow

NODE = """
    test_abs test_add_bcast test_where_example test_gather_0 test_clip_default_min test_cast_FLOAT_to_FLOAT16
    test_conv_with_strides_padding test_convtranspose test_convtranspose_group_2
    test_gemm_default_single_elem_vector_bias test_gemm_all_attributes
    test_batchnorm_epsilon test_batchnorm_example test_batchnorm_epsilon_training_mode
    test_dropout_default test_dropout_default_mask test_identity test_identity_sequence test_identity_opt test_if_opt
    test_constant test_constantofshape_int_zeros test_shape test_shape_start_1 test_shape_end_negative_1
    test_reshape_negative_dim test_castlike_DOUBLE_to_FLOAT test_expand_dim_changed
    test_resize_downsample_scales_cubic test_reduce_sum_default_axes_keepdims_example test_mod_int64_fmod
    test_split_variable_parts_1d_opset18 test_slice test_squeeze test_unsqueeze_three_axes test_onehot_with_axis
    test_nonmaxsuppression_center_point_box_format test_cumsum_1d
    test_if test_loop11 test_sequence_insert_at_back
    test_attention_3d_causal_expanded test_group_normalization_example_expanded test_rotary_embedding_expanded
    test_layer_normalization_2d_axis0_expanded test_softmax_example_expanded
    test_range_float_type_positive_delta_expanded test_dynamicquantizelinear_expanded
""".split()
SHIPPED = """
    simple/test_expand_shape_model1 simple/test_sequence_model1 simple/test_shrink simple/test_sign_model
    simple/test_single_relu_model
    pytorch-converted/test_Conv1d pytorch-converted/test_Conv2d pytorch-converted/test_ConvTranspose2d
    pytorch-converted/test_Linear_no_bias pytorch-converted/test_PixelShuffle pytorch-converted/test_Embedding
    pytorch-converted/test_MaxPool2d
    pytorch-operator/test_operator_conv pytorch-operator/test_operator_repeat pytorch-operator/test_operator_chunk
    pytorch-operator/test_operator_flatten pytorch-operator/test_operator_symbolic_override
    pytorch-operator/test_operator_view
    light/test_squeezenet light/test_resnet50 light/test_shufflenet light/test_inception_v1
""".split()
SUBSET = [f"node/{name}" for name in NODE] + SHIPPED
# cases with nothing hard in them: each must fold correctly in both modes
PLAIN = """
    node/test_abs node/test_add_bcast node/test_conv_with_strides_padding node/test_convtranspose_group_2
    node/test_gemm_all_attributes node/test_batchnorm_example node/test_dropout_default node/test_identity
    node/test_constant node/test_if node/test_loop11 node/test_softmax_example_expanded simple/test_single_relu_model
    pytorch-converted/test_MaxPool2d pytorch-operator/test_operator_view
""".split()


@pytest.fixture(scope="module")
def subset_cases(tmp_path_factory):
    reason = cc.generator_available()
    if reason:
        pytest.skip(reason)
    full = os.path.join(cc.cache_dir(), "node")
    if os.path.exists(os.path.join(full, ".complete")):  # benchmarks/conformance.py generated every case
        node_root = full
    else:  # only the subset's, into a temporary folder
        node_root = str(tmp_path_factory.mktemp("node"))
        cc.write_node_cases(node_root, set(NODE))
    cases = conformance.select(cc.collect(cc.FOLDERS, node_root=node_root), names=set(SUBSET))
    missing = sorted(set(SUBSET) - {c.id for c in cases})
    assert not missing, f"this onnx has no such test cases: {missing}"
    return cases


def test_subset_is_spread_across_folders():
    folders = {cid.split("/")[0] for cid in SUBSET}
    assert folders == set(cc.FOLDERS), folders
    assert 60 <= len(set(SUBSET)) == len(SUBSET) <= 80
    assert set(PLAIN) <= set(SUBSET)


def test_fold_conformance_subset(subset_cases):
    results = conformance.run_suite(subset_cases, jobs=2, timeout=120)
    not_run = {cid: r["baseline"].get("reason") for cid, r in results.items() if not r["baseline"].get("runs")}
    assert not not_run, f"onnxruntime no longer runs these cases (replace them in the subset): {not_run}"
    summary = conformance.summarize(results)
    bad = {mode: [f"{cls} {cid}: {reason}" for cls, cid, reason in failures if cls in ("WRONG", "CRASH")]
           for mode, failures in summary["failures"].items()}
    if any(bad.values()):
        lines = [f"[{mode}] {line}" for mode, runs in bad.items() for line in runs]
        pytest.fail("WRONG / CRASH runs:\n" + "\n".join(lines))
    not_folded = [f"{cid} [{mode}] {run['class']}: {run['reason']}" for cid in PLAIN
                  for mode, run in results[cid]["runs"].items() if run["class"] != "folded"]
    assert not not_folded, not_folded
    # optional values, which onnx-graphsurgeon cannot export on its own, and Optional's type attribute, which it
    # drops on import: folded (the check cannot feed an optional input: a note there)
    for cid in ("node/test_identity_opt", "node/test_if_opt"):
        runs = results[cid]["runs"]
        assert runs["no-check"]["class"] == "folded" and runs["check"]["class"] in ("folded", "note"), (cid, runs)
    # the runs mean something: BatchNormalization folded away in the light ResNet-50, outputs still matching
    resnet = results["light/test_resnet50"]["runs"]["no-check"]
    assert resnet["class"] in ("folded", "note") and resnet["nodes_after"] < resnet["nodes_before"], resnet
