"""The PyTorch route reaches onnxruntime: after FX passes (fp32 fold, pruning), ``save("x.onnx")`` writes a
model onnxruntime runs within 1e-4 relative of the FX module (issue #9, item 6; the int8 Q/DQ part needs the
x86 route)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.numeric import max_difference


@pytest.mark.parametrize("passes", ["fold", "fold,prune:ratio=0.5"])
def test_fx_result_saved_as_onnx_matches_on_onnxruntime(passes, tmp_path):
    torch.manual_seed(0)
    module = zoo.DigitsCNN().eval()
    x = torch.randn(4, 1, 16, 16)
    result = graphopt.optimize(module, passes, example_inputs=(x[:1],), check=False)
    path = str(tmp_path / "m.onnx")
    result.save(path)
    with torch.no_grad():
        want = result.model(x[:1]).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]
    diff = max_difference([want], [got])
    assert diff.max_rel_err <= 1e-4, diff
    if "prune" in passes:  # the written model is the pruned one: fewer weights than the original's
        params = sum(p.numel() for p in module.parameters())
        import onnx

        written = sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer)
        assert written < 0.5 * params, (written, params)
