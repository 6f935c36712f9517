"""One decision, every backend's form (graphopt.recipe_forms, graphopt sensitivity --recipe, graphopt run --recipe
--backend): a recipe made on onnxruntime replays on TensorRT with the float layer free of Q/DQ and a placement
graphopt verify passes, names the torch model's modules for x86, and says where a form does not exist."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml

from graphopt.backends import get_backend
from graphopt.cli import main
from graphopt.recipe_forms import backend_forms
from graphopt.report.sensitivity import prepare

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


class Net(torch.nn.Module):
    """conv_a (16 channels in; zero weights on channels 0 and 1, which hold outliers 3000x the rest) -> relu ->
    block (conv1, conv2, residual Add, relu) -> head (1x1 conv to 8 channels). Per-tensor int8 on the input spends
    its range on the outliers, so only conv_a's group (the one reading the input) needs to stay float; 16 channels,
    so TensorRT's kernels take every conv (ModelOpt's min_channels)."""

    def __init__(self):
        super().__init__()
        self.conv_a = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.block = Block()
        self.head = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.conv_a(x))))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """The model exported by torch.onnx.export(dynamo=True) (node metadata: module paths), calibration data, and
    the ONNX node name of each module's op."""
    from graphopt.quiet import quiet_torch_logs

    folder = tmp_path_factory.mktemp("forms")
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.conv_a.weight[:, :2] = 0.0
    path = str(folder / "net.onnx")
    with quiet_torch_logs():
        torch.onnx.export(model, (torch.randn(1, 16, 8, 8),), path, input_names=["x"], output_names=["y"],
                          dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    x = np.random.default_rng(0).normal(0, 1, (32, 16, 8, 8)).astype(np.float32)
    x[:, :2] *= 3000.0
    np.savez(folder / "calib.npz", x=x)
    node = {}
    for n in onnx.load(path).graph.node:
        scopes = [p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        if n.op_type == "Conv":  # name_scopes: ['', 'block', 'block.conv1', 'conv2d_1']: the module's path
            node[scopes[0].split(", ")[-2].strip("'")] = n.name
        elif n.op_type == "Add":
            node["add"] = n.name
    return path, str(folder / "calib.npz"), model, node


def test_recipe_made_on_onnxruntime_replays_on_tensorrt(net, tmp_path, capsys):
    path, calib, model, node = net
    recipe = tmp_path / "r.yaml"
    assert main(["sensitivity", path, "--calib", calib, "--min-cosine", "0.99", "--recipe", str(recipe),
                 "--executor", "inprocess"]) == 0
    data = yaml.safe_load(recipe.read_text())
    assert data["backend"] == "onnxruntime" and data["float_groups"] == [node["conv_a"]]
    forms = data["forms"]
    assert forms["onnxruntime"]["exclude_nodes"] == data["float_nodes"] == [node["conv_a"]]
    assert f"nodes_to_exclude=['{node['conv_a']}']" in forms["onnxruntime"]["quantize_static"]
    assert f"nncf.IgnoredScope(names=['{node['conv_a']}'])" in forms["openvino"]["nncf"]
    assert forms["tensorrt"]["exclude_nodes"] == [node["conv_a"]] and forms["tensorrt"]["unmapped"] == {}
    # x86: the module path of the float layer, which names that very module of the torch model
    assert forms["x86"]["module_paths"] == ["conv_a"]
    assert dict(model.named_modules())["conv_a"] is model.conv_a
    assert "set_module_name_qconfig('conv_a', None)" in forms["x86"]["x86_inductor"]
    assert forms["x86"]["passes"].endswith("place-qdq:exclude_nodes=conv_a")
    capsys.readouterr()

    out = tmp_path / "trt.onnx"
    assert main(["run", path, "--recipe", str(recipe), "--backend", "tensorrt", "--calib", calib, "-o", str(out),
                 "-q"]) == 0
    graph = onnx.load(str(out)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    reads_dq = {name: [producer.get(i) == "DequantizeLinear" for i in n.input[:2]] for name, n in convs.items()}
    assert reads_dq.pop(node["conv_a"]) == [False, False]  # the float layer: no Q/DQ on its input nor weight
    assert reads_dq and all(v == [True, True] for v in reads_dq.values())  # the others: int8
    add = next(n for n in graph.node if n.op_type == "Add")
    assert sorted(producer.get(i) for i in add.input) == ["Conv", "DequantizeLinear"]  # TensorRT's fused residual
    assert main(["verify", str(out), "--backend", "tensorrt", "--strict"]) == 0
    assert "no findings" in capsys.readouterr().out

    # x86's form is for the PyTorch model: one line, no run
    assert main(["run", path, "--recipe", str(recipe), "--backend", "x86", "--calib", calib,
                 "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conv_a" in err[0] and ".pt2" in err[0] and not (tmp_path / "x.onnx").exists()


def test_each_backend_maps_the_groups_its_own_way(registry, net, tmp_path):
    """onnxruntime runs the residual Add as its own int8 kernel, TensorRT fuses it into conv2: kept float on
    onnxruntime, on TensorRT it is that Add alone (conv2 stays int8); an Add has no module for x86."""
    path, calib, _, node = net
    study = prepare(path, calib, registry=registry, backend=get_backend(registry, "onnxruntime"),
                    folder=str(tmp_path / "study"), samples=8)
    assert {g.name for g in study.groups} == set(node.values())
    forms = backend_forms(study, [node["add"], node["block.conv2"]], path)
    assert forms["onnxruntime"]["exclude_nodes"] == [node["add"], node["block.conv2"]]
    trt = forms["tensorrt"]
    assert trt["groups"] == {node["add"]: [node["add"]], node["block.conv2"]: [node["block.conv2"], node["add"]]}
    assert trt["exclude_nodes"] == [node["add"], node["block.conv2"]]
    x86 = forms["x86"]
    assert x86["module_paths"] == ["block.conv2"] and list(x86["unmapped"]) == [node["add"]]
    assert "inside module 'block'" in x86["unmapped"][node["add"]]
    # the Add alone kept float: on TensorRT that Add alone (conv2, its anchor there, is not named)
    only_add = backend_forms(study, [node["add"]], path)["tensorrt"]
    assert only_add["exclude_nodes"] == [node["add"]]


def test_without_module_metadata_or_int8_kernels_the_form_says_why(registry, tmp_path, capsys):
    """A model built with onnx.helper (8 channels): no module paths, so no x86 form; TensorRT has no int8 kernel
    for conv_c (8 -> 4 channels, not on the input: ModelOpt's min_channels), so kept float it has no TensorRT
    counterpart (float there already), while conv_a (8 channels, on the input: TensorRT's int8 kernels take it)
    does. An old recipe with no forms replayed on another backend: one line."""
    from tests.test_sensitivity import fragile_model

    model = tmp_path / "fragile.onnx"
    np.savez(tmp_path / "calib.npz", x=fragile_model(model))
    study = prepare(str(model), str(tmp_path / "calib.npz"), registry=registry,
                    backend=get_backend(registry, "onnxruntime"), folder=str(tmp_path / "study"), samples=8)
    forms = backend_forms(study, ["conv_a", "conv_c"], str(model))
    assert forms["x86"]["available"] is False and "dynamo=True" in forms["x86"]["why"]
    assert forms["onnxruntime"]["exclude_nodes"] == ["conv_a", "conv_c"] and not forms["onnxruntime"]["unmapped"]
    assert forms["tensorrt"]["exclude_nodes"] == ["conv_a"] and list(forms["tensorrt"]["unmapped"]) == ["conv_c"]
    assert "too small" in forms["tensorrt"]["unmapped"]["conv_c"]
    recipe = tmp_path / "r.yaml"
    assert main(["sensitivity", str(model), "--calib", str(tmp_path / "calib.npz"), "--min-cosine", "0.99",
                 "--recipe", str(recipe), "--executor", "inprocess"]) == 0
    data = yaml.safe_load(recipe.read_text())
    del data["forms"]
    recipe.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["run", str(model), "--recipe", str(recipe), "--backend", "tensorrt", "-o",
                 str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tensorrt form" in err[0] and not (tmp_path / "t.onnx").exists()
