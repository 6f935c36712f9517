"""Calibration data sources (graphopt.calib.sources): every source kind, batching, validation, synthetic data."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.calib import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYNTHETIC_WARNING,
    CalibrationData,
    CalibrationDataError,
    CalibrationInputError,
    EmptyCalibrationDataError,
    ImageOptions,
    InputSpec,
    MissingDependencyError,
    input_specs,
    load_calibration,
    synthetic,
)
from graphopt.errors import GraphoptError

HAS_PIL = importlib.util.find_spec("PIL") is not None
ONE = [InputSpec("input", ("batch", 3, 4, 4), np.float32)]
TWO = [InputSpec("image", (None, 3, 4, 4), np.float32), InputSpec("mask", (None, 5), np.int64)]


def _samples(n=21, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def _read(data, **kwargs):
    batches = list(data.batches(**kwargs))
    return batches, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# -- .npz ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_batches_cover_every_sample_in_order(tmp_path, save):
    x = _samples()
    save(tmp_path / "d.npz", input=x, labels=np.arange(21))
    data = load_calibration(tmp_path / "d.npz", ONE, batch_size=8, progress=False)
    assert data.num_samples == 21 and not data.synthetic and data.reiterable
    batches, joined = _read(data)
    assert [b["input"].shape[0] for b in batches] == [8, 8, 5]
    assert np.array_equal(joined["input"], x) and joined["input"].dtype == np.float32
    assert any("labels" in note for note in data.notes)  # extra arrays are ignored, and said so
    assert np.array_equal(_read(data)[1]["input"], x)  # re-iterable


def test_npz_is_streamed_not_loaded_whole(tmp_path):
    x = np.zeros((4000, 3, 16, 16), np.float32)  # 12 MB
    np.savez_compressed(tmp_path / "big.npz", input=x)
    data = load_calibration(tmp_path / "big.npz", [InputSpec("input", (None, 3, 16, 16), np.float32)], batch_size=8)
    tracemalloc.start()
    try:
        first = next(iter(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first["input"].shape == (8, 3, 16, 16)
    assert peak < 1_000_000  # one batch is 24 KB; the member is 12 MB


def test_npz_with_two_inputs_and_mismatched_counts(tmp_path):
    image, mask = _samples(10), np.arange(50).reshape(10, 5)
    np.savez(tmp_path / "two.npz", image=image, mask=mask)
    _, joined = _read(load_calibration(tmp_path / "two.npz", TWO, batch_size=4))
    assert np.array_equal(joined["image"], image) and np.array_equal(joined["mask"], mask)
    np.savez(tmp_path / "bad.npz", image=image, mask=mask[:7])
    with pytest.raises(CalibrationInputError, match="different numbers of samples"):
        load_calibration(tmp_path / "bad.npz", TWO)


def test_folder_of_npz_files(tmp_path):
    x = _samples(10)
    np.savez(tmp_path / "part1.npz", input=x[:6])
    np.savez(tmp_path / "part2.npz", input=x[6:])
    data = load_calibration(tmp_path, ONE, batch_size=4)
    batches, joined = _read(data)
    assert data.num_samples == 10 and np.array_equal(joined["input"], x)
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2]


# -- .npy ------------------------------------------------------------------------------------------------------
def test_npy_folder_of_samples_and_stacks_in_natural_order(tmp_path):
    x = _samples(12)
    for i in range(9):
        np.save(tmp_path / f"s{i}.npy", x[i])  # one sample per file
    np.save(tmp_path / "s10.npy", x[9:12])  # a stack; "s10" sorts after "s9"
    data = load_calibration(tmp_path, ONE, batch_size=5)
    assert data.num_samples == 12
    batches, joined = _read(data)
    assert [b["input"].shape[0] for b in batches] == [5, 5, 2]
    assert np.array_equal(joined["input"], x)


def test_single_npy_file(tmp_path):
    x = _samples(6)
    np.save(tmp_path / "x.npy", x)
    _, joined = _read(load_calibration(tmp_path / "x.npy", ONE, batch_size=4))
    assert np.array_equal(joined["input"], x)
    with pytest.raises(CalibrationInputError, match="one-input"):
        load_calibration(tmp_path / "x.npy", TWO)


def test_npy_subfolders_feed_several_inputs(tmp_path):
    image, mask = _samples(6), np.arange(30).reshape(6, 5)
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    for i in range(6):
        np.save(tmp_path / "image" / f"{i:03d}.npy", image[i])
        np.save(tmp_path / "mask" / f"{i:03d}.npy", mask[i])
    _, joined = _read(load_calibration(tmp_path, TWO, batch_size=4))
    assert np.array_equal(joined["image"], image) and np.array_equal(joined["mask"], mask)
    (tmp_path / "mask" / "005.npy").rename(tmp_path / "mask" / "999.npy")
    with pytest.raises(CalibrationInputError, match="pair up by name"):
        load_calibration(tmp_path, TWO)


def test_npy_folder_for_a_two_input_model_needs_subfolders(tmp_path):
    np.save(tmp_path / "a.npy", _samples(2))
    with pytest.raises(CalibrationInputError, match="subfolder named after it"):
        load_calibration(tmp_path, TWO)


# -- images ----------------------------------------------------------------------------------------------------
def _write_pngs(folder, n=5, size=(40, 60), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = []
    (folder / "class_b").mkdir(parents=True)
    for i in range(n):
        a = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        Image.fromarray(a).save(folder / "class_b" / f"img{i}.png")
        arrays.append(a)
    return arrays


@pytest.mark.skipif(not HAS_PIL, reason="Pillow not installed (the test below checks the error instead)")
def test_image_folder_crop_scale_mean_std(tmp_path):
    arrays = _write_pngs(tmp_path)
    spec = [InputSpec("x", (None, 3, 32, 32), np.float32)]
    options = ImageOptions(crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    data = load_calibration(tmp_path, spec, batch_size=2, image_options=options)
    batches, joined = _read(data)
    assert [b["x"].shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    for got, a in zip(joined["x"], arrays):  # 40x60 image, 32x32 centre crop: rows 4..36, columns 14..46
        want = ((a[4:36, 14:46].astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.skipif(not HAS_PIL, reason="Pillow not installed")
def test_image_folder_defaults_bgr_nhwc_and_grayscale(tmp_path):
    arrays = _write_pngs(tmp_path, size=(32, 48))
    data = load_calibration(tmp_path, [InputSpec("x", (None, 3, 32, 32), np.float32)])
    assert any("resized to 32" in n for n in data.notes)  # shorter side to the model's size, centre crop
    first = next(iter(data))["x"][0]
    np.testing.assert_allclose(first, (arrays[0][:, 8:40] / 255.0).transpose(2, 0, 1), atol=1e-6)
    nhwc = ImageOptions(layout="NHWC", channel_order="BGR", scale=False)
    first = next(iter(load_calibration(tmp_path, [InputSpec("x", (1, 32, 32, 3), np.float32)],
                                       image_options=nhwc)))["x"][0]
    np.testing.assert_array_equal(first, arrays[0][:, 8:40, ::-1].astype(np.float32))
    gray = next(iter(load_calibration(tmp_path, [InputSpec("x", (None, 1, 16, 16), np.uint8)])))["x"]
    assert gray.shape == (5, 1, 16, 16) and gray.dtype == np.uint8


@pytest.mark.skipif(not HAS_PIL, reason="Pillow not installed")
def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = load_calibration(tmp_path, [InputSpec("x", (None, 3, 8, 8), np.float32)])
    with pytest.raises(CalibrationDataError, match="broken.png"):
        list(data)


def test_image_folder_without_pillow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed: `import PIL` fails
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(MissingDependencyError) as info:
        load_calibration(tmp_path, [InputSpec("x", (None, 3, 8, 8), np.float32)])
    message = str(info.value)
    assert "Pillow" in message and "graphopt[images]" in message and "\n" not in message


def test_image_options_are_validated(tmp_path):
    with pytest.raises(CalibrationDataError, match="layout"):
        ImageOptions(layout="CHW")
    with pytest.raises(CalibrationDataError, match="std"):
        ImageOptions(std=(1.0, 0.0, 1.0))
    np.save(tmp_path / "x.npy", _samples(2))
    with pytest.raises(CalibrationDataError, match="image options apply to folders of images"):
        load_calibration(tmp_path, ONE, image_options={"crop": 4})


# -- iterables -------------------------------------------------------------------------------------------------
def test_iterable_of_dicts_arrays_and_mixed_samples_and_batches():
    x = _samples(10)
    items = [{"input": x[0]}, x[1:4], x[4], {"input": x[5:10]}]  # sample, batch, bare sample, batch
    data = load_calibration(items, ONE, batch_size=4)
    assert data.num_samples is None
    batches, joined = _read(data)
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2]
    assert np.array_equal(joined["input"], x)


def test_tuples_feed_inputs_in_order_and_torch_tensors_work():
    torch = pytest.importorskip("torch")
    image, mask = _samples(3), np.arange(15).reshape(3, 5)
    items = [(torch.from_numpy(image[i]), mask[i]) for i in range(3)]
    _, joined = _read(load_calibration(items, TWO))
    assert np.array_equal(joined["image"], image) and np.array_equal(joined["mask"], mask)


def test_generator_reads_once_and_a_function_many_times():
    x = _samples(5)
    data = load_calibration((x[i] for i in range(5)), ONE)
    assert not data.reiterable
    assert np.array_equal(_read(data)[1]["input"], x)
    with pytest.raises(CalibrationDataError, match="read only once"):
        list(data)
    data = load_calibration(lambda: iter(x), ONE, batch_size=2)
    assert data.reiterable
    assert np.array_equal(_read(data)[1]["input"], x) and np.array_equal(_read(data)[1]["input"], x)


def test_batches_end_where_symbolic_dimensions_change():
    spec = [InputSpec("ids", ("batch", "seq"), np.int64)]
    items = [np.ones(7, np.int64), np.ones(7, np.int64), np.ones(9, np.int64), np.ones((3, 9), np.int64)]
    batches = list(load_calibration(items, spec, batch_size=8))
    assert [b["ids"].shape for b in batches] == [(2, 7), (4, 9)]


# -- batching and limit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size,limit,sizes", [(4, 10, [4, 4, 2]), (8, None, [8, 8, 5]), (1, 3, [1, 1, 1]),
                                                    (50, 7, [7])])
def test_batch_size_and_limit(batch_size, limit, sizes):
    x = _samples(21)
    data = load_calibration({"input": x}, ONE, batch_size=batch_size, limit=limit)
    batches, joined = _read(data)
    assert [b["input"].shape[0] for b in batches] == sizes
    assert data.num_samples == sum(sizes)
    assert np.array_equal(joined["input"], x[:sum(sizes)])


def test_a_fixed_batch_dimension_sets_the_batch_size():
    x = _samples(10)
    data = load_calibration({"input": x}, [InputSpec("input", (1, 3, 4, 4), np.float32)], batch_size=8)
    assert data.batch_size == 1 and len(list(data)) == 10
    assert any("fixed at 1" in n for n in data.notes)
    data = load_calibration({"input": x}, [InputSpec("input", (4, 3, 4, 4), np.float32)])
    assert data.num_samples == 8
    assert [b["input"].shape[0] for b in data] == [4, 4]
    assert any("dropped" in n for n in data.notes)
    with pytest.raises(EmptyCalibrationDataError, match="fewer than the model's fixed batch size"):
        list(load_calibration({"input": x[:3]}, [InputSpec("input", (4, 3, 4, 4), np.float32)]))


@pytest.mark.parametrize("kwargs,match", [({"batch_size": 0}, "batch_size"), ({"limit": 0}, "limit"),
                                          ({"batch_size": 2.5}, "batch_size")])
def test_bad_batching_options(kwargs, match):
    with pytest.raises(CalibrationDataError, match=match):
        load_calibration({"input": _samples(2)}, ONE, **kwargs)


def test_progress_bar_only_when_asked(capsys):
    data = load_calibration({"input": _samples(6)}, ONE, batch_size=2)
    list(data.batches(progress=True))
    assert "calibration" in capsys.readouterr().err
    list(data.batches(progress=False))
    list(data)  # default: only on a terminal, and pytest's stderr is not one
    assert capsys.readouterr().err == ""


# -- validation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arrays,match", [
    ({"inpt": _samples(2)}, "no data for model input 'input'"),
    ({"input": _samples(2)[:, :2]}, "input 'input' has samples of shape \\(2, 4, 4\\)"),
    ({"input": _samples(2)[:, 0, 0]}, "input 'input' has shape \\(2, 4\\)"),
    ({"input": (_samples(2) * 100).astype(np.uint8)}, "input 'input' is uint8 but the model takes float32"),
    ({"input": np.zeros((2, 3, 4, 4), bool)}, "input 'input' is bool"),
])
def test_mismatches_are_one_line_errors_naming_the_input(arrays, match):
    with pytest.raises(CalibrationInputError, match=match) as info:
        list(load_calibration(arrays, ONE))
    assert "\n" not in str(info.value) and isinstance(info.value, GraphoptError)


def test_errors_from_iterables_name_the_item():
    items = [_samples(1)[0], _samples(1)[0][:2]]
    with pytest.raises(CalibrationInputError, match="item 1: input 'input'"):
        list(load_calibration(items, ONE))
    with pytest.raises(CalibrationInputError, match="bare array feeds one-input models"):
        list(load_calibration([np.zeros((3, 4, 4))], TWO))


def test_float_data_are_cast_with_a_note_and_ints_checked():
    data = load_calibration({"input": _samples(3).astype(np.float64)}, ONE)
    batch = next(iter(data))
    assert batch["input"].dtype == np.float32
    assert any("float64 data cast to the model's float32" in n for n in data.notes)
    spec = [InputSpec("ids", (None, 4), np.int32)]
    assert next(iter(load_calibration({"ids": np.arange(8).reshape(2, 4)}, spec)))["ids"].dtype == np.int32
    with pytest.raises(CalibrationInputError, match="outside the model's int32"):
        list(load_calibration({"ids": np.full((2, 4), 2 ** 40)}, spec))
    with pytest.raises(CalibrationInputError, match="is float32 but the model takes int32"):
        list(load_calibration({"ids": np.zeros((2, 4), np.float32)}, spec))


def test_empty_and_missing_sources(tmp_path):
    np.savez(tmp_path / "empty.npz", input=np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(EmptyCalibrationDataError, match="no calibration samples"):
        load_calibration(tmp_path / "empty.npz", ONE)
    with pytest.raises(EmptyCalibrationDataError, match="no calibration samples"):
        list(load_calibration([], ONE))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EmptyCalibrationDataError, match="no .npy, .npz or image files"):
        load_calibration(tmp_path / "nothing", ONE)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration(tmp_path / "missing.npz", ONE)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(CalibrationDataError, match="unsupported calibration file type '.csv'"):
        load_calibration(tmp_path / "data.csv", ONE)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CalibrationDataError, match="not a readable .npz"):
        load_calibration(tmp_path / "bad.npz", ONE)


# -- synthetic data ----------------------------------------------------------------------------------------------
def test_synthetic_data_is_flagged_fixed_seed_and_independent_of_batch_size():
    data = synthetic(TWO, n=10, seed=3, batch_size=4)
    assert data.synthetic and SYNTHETIC_WARNING in data.notes and data.num_samples == 10
    batches, joined = _read(data)
    assert [b["image"].shape for b in batches] == [(4, 3, 4, 4), (4, 3, 4, 4), (2, 3, 4, 4)]
    assert joined["mask"].dtype == np.int64 and set(np.unique(joined["mask"])) <= {0, 1}
    again = _read(synthetic(TWO, n=10, seed=3, batch_size=3))[1]
    assert np.array_equal(again["image"], joined["image"]) and np.array_equal(again["mask"], joined["mask"])
    other = _read(synthetic(TWO, n=10, seed=4))[1]
    assert not np.array_equal(other["image"], joined["image"])
    rebound = load_calibration(data, TWO, batch_size=10)
    assert rebound.synthetic and len(list(rebound)) == 1


def test_synthetic_symbolic_dimensions():
    spec = [InputSpec("ids", ("batch", "seq"), np.int64)]
    assert next(iter(synthetic(spec, n=2, dims={"seq": 16})))["ids"].shape == (2, 16)
    data = synthetic(spec, n=2)
    assert next(iter(data))["ids"].shape == (2, 1) and any("seq" in n for n in data.notes)


# -- model inputs ------------------------------------------------------------------------------------------------
def _tiny_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x, ids, w], [y],
                              [helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_input_specs_from_models_sessions_and_tuples(tmp_path):
    model = _tiny_model()
    specs = input_specs(model)  # the initializer listed as an input is skipped
    assert [(s.name, s.shape, s.dtype) for s in specs] == [("x", ("N", 3, 8, 8), np.float32),
                                                           ("ids", ("N", 5), np.int64)]
    onnx.save(model, tmp_path / "m.onnx")
    assert input_specs(str(tmp_path / "m.onnx")) == specs
    assert input_specs({"x": (("N", 3, 8, 8), "float32"), "ids": (("N", 5), np.int64)}) == specs
    assert input_specs([("x", ("N", 3, 8, 8), np.float32), ("ids", ("N", 5), "int64")]) == specs
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [(s.name, s.dtype) for s in input_specs(session)] == [("x", np.float32), ("ids", np.int64)]


def test_calibration_data_from_an_onnx_model_feeds_onnxruntime(tmp_path):
    import onnxruntime as ort

    model = _tiny_model()
    onnx.save(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = _samples(5, seed=1).repeat(2, axis=2).repeat(2, axis=3)  # (5, 3, 8, 8)
    data = CalibrationData.from_arrays({"x": x, "ids": np.zeros((5, 5), np.int64)}, model, batch_size=2)
    outputs = np.concatenate([session.run(None, batch)[0] for batch in data])
    np.testing.assert_allclose(outputs, 2 * x, rtol=1e-6)
