"""Streaming observers (graphopt.calib.observers): exact merging, range methods against brute force, Q params."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphopt.calib import (
    HistogramObserver,
    MinMaxObserver,
    ObserverError,
    compute_range,
    dequantize,
    make_observer,
    quantize,
    scale_zero_point,
)
from graphopt.calib.observers import _expected_sq_errors, _kl_divergences
from graphopt.errors import GraphoptError


def _feed(observer, batches):
    for b in batches:
        observer.update(b)
    return observer


def _growing_batches(seed=0, n=40, size=5000):
    """Batches whose range keeps growing on both sides (forcing many re-binnings), centre drifting off 0."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(size) * (0.01 * 1.3 ** i) + 0.05 * i).astype(np.float32) for i in range(n)]


def _gauss_with_outliers(seed=0, n=200_000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    return np.concatenate([x, np.array([50.0, -45.0, 40.0, 48.0], np.float32)])


# -- MinMax -------------------------------------------------------------------------------------------------
def test_minmax_is_exact_and_skips_nonfinite():
    batches = _growing_batches()
    batches[3] = batches[3].copy()
    batches[3][:3] = [np.nan, np.inf, -np.inf]
    obs = _feed(MinMaxObserver(), batches)
    finite = np.concatenate(batches)
    finite = finite[np.isfinite(finite)]
    assert obs.range("minmax") == (float(finite.min()), float(finite.max()))
    m = float(np.abs(finite).max())
    assert obs.range("minmax", symmetric=True) == (-m, m)
    assert obs.count == finite.size and obs.nonfinite == 3
    assert obs.state_nbytes() == 0


def test_minmax_refuses_histogram_methods_and_empty_observers():
    obs = MinMaxObserver()
    with pytest.raises(ObserverError, match="no finite values"):
        obs.range()
    obs.update(np.arange(10.0))
    with pytest.raises(ObserverError, match="HistogramObserver"):
        compute_range(obs, "entropy")
    with pytest.raises(ObserverError, match="unknown calibration method"):
        compute_range(obs, "kl")
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert isinstance(make_observer("mse", bins=512), HistogramObserver)
    assert issubclass(ObserverError, GraphoptError)


# -- the histogram: exact merging, fixed state -----------------------------------------------------------------
def test_merged_histogram_equals_one_shot_histogram_of_all_data():
    batches = _growing_batches()
    obs = _feed(HistogramObserver(2048), batches)
    data = np.concatenate(batches)
    counts, _ = np.histogram(data, bins=obs.edges)
    assert obs.count == data.size
    assert np.array_equal(obs.counts, counts)  # exact, not just within a bin: edges of coarser grids are shared
    assert obs.min == float(data.min()) and obs.max == float(data.max())
    occupied = np.flatnonzero(obs.counts)
    assert occupied[-1] - occupied[0] + 1 > obs.bins // 2  # resolution: the data span over half the bins


def test_histogram_starting_from_a_constant_grows_exactly():
    batches = [np.zeros(1000, np.float32), np.full(10, 3.0, np.float32)] + _growing_batches(seed=1, n=10)
    obs = _feed(HistogramObserver(256), batches)
    counts, _ = np.histogram(np.concatenate(batches), bins=obs.edges)
    assert np.array_equal(obs.counts, counts)


def test_merge_of_two_observers_equals_one_observer_fed_everything():
    batches = _growing_batches(seed=2)
    a = _feed(HistogramObserver(), batches[::2])
    b = _feed(HistogramObserver(), batches[1::2])
    a.merge(b)
    data = np.concatenate(batches)
    counts, _ = np.histogram(data, bins=a.edges)
    assert np.array_equal(a.counts, counts)
    assert a.count == data.size and a.min == float(data.min()) and a.max == float(data.max())


@pytest.mark.parametrize("cls", [HistogramObserver, MinMaxObserver])
def test_state_size_is_flat_in_the_number_of_batches(cls):
    rng = np.random.default_rng(0)

    def run(n_batches):
        obs = cls()
        for i in range(n_batches):  # ranges keep growing, so the histogram keeps re-binning
            obs.update((rng.standard_normal(2000) * (1 + i / 8)).astype(np.float32))
        arrays = sum(v.nbytes for v in vars(obs).values() if isinstance(v, np.ndarray))
        return obs.state_nbytes(), arrays

    small, large = run(64), run(1024)
    assert small == large
    if cls is HistogramObserver:
        assert small[0] == 2048 * 8


# -- percentile ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_numpy(p):
    data = _gauss_with_outliers()
    obs = _feed(HistogramObserver(), np.array_split(data, 37))
    width = obs.bin_width
    low, high = obs.range("percentile", percentile=p)
    tail = (100.0 - p) / 2
    want_low, want_high = np.percentile(data.astype(np.float64), [tail, 100.0 - tail])
    assert abs(low - want_low) <= width and abs(high - want_high) <= width
    low, high = obs.range("percentile", symmetric=True, percentile=p)
    want = np.percentile(np.abs(data.astype(np.float64)), p)
    assert low == -high and abs(high - want) <= width
    assert high < 0.2 * np.abs(data).max()  # the outliers are cut off


def test_percentile_rejects_bad_values():
    obs = _feed(HistogramObserver(), [np.arange(100.0)])
    for bad in (0, -1, 100.5):
        with pytest.raises(ObserverError, match="percentile"):
            obs.range("percentile", percentile=bad)
    assert obs.range("percentile", percentile=100) == (0.0, 99.0)


# -- entropy -------------------------------------------------------------------------------------------------
def _kl_reference(hist, start, end, levels):
    """The KL objective written out bin by bin (the module docstring's definition), to check the vectorized one."""
    h = hist.astype(np.float64)
    inside = h[start:end]
    p = inside.copy()
    p[0] += h[:start].sum()
    p[-1] += h[end:].sum()
    q = np.zeros_like(p)
    bounds = [(k * inside.size) // levels for k in range(levels + 1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        filled = np.count_nonzero(p[a:b])
        if filled:
            q[a:b] = np.where(p[a:b] > 0, inside[a:b].sum() / filled, 0.0)
    p, q = p / p.sum(), q / q.sum()
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))


def test_vectorized_kl_matches_the_reference_definition():
    rng = np.random.default_rng(0)
    hist = np.histogram(rng.standard_normal(50_000), bins=700)[0]
    hist[650] = 0  # an empty end bin that clipped outliers land in
    starts = np.array([0, 0, 10, 100, 0, 300])
    ends = np.array([700, 128, 651, 700, 651, 428])
    got = _kl_divergences(hist, starts, ends, 128)
    want = [_kl_reference(hist, s, e, 128) for s, e in zip(starts, ends)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_entropy_threshold_cuts_outliers_of_a_gaussian():
    data = _gauss_with_outliers()
    obs = _feed(HistogramObserver(), np.array_split(data, 50))
    m = float(np.abs(data).max())
    low, high = obs.range("entropy", symmetric=True, num_levels=128)
    assert low == -high
    assert 3.0 < high < 0.25 * m  # well below the outliers (max 50), beyond the bulk (|x| < 3 for 99.7%)
    low, high = obs.range("entropy", symmetric=False, num_levels=256)
    assert -0.25 * m < low < -3.0 and 3.0 < high < 0.25 * m


def test_entropy_on_relu_like_data_keeps_zero_as_the_low_end():
    rng = np.random.default_rng(1)
    data = np.concatenate([np.maximum(rng.standard_normal(100_000), 0), [30.0, 25.0]]).astype(np.float32)
    obs = _feed(HistogramObserver(), np.array_split(data, 10))
    low, high = obs.range("entropy", symmetric=False, num_levels=256)
    assert low == 0.0 and 2.5 < high < 10.0


# -- mse -----------------------------------------------------------------------------------------------------
def _mse_symmetric(data, t, levels=128):
    step = t / (levels - 1)
    q = np.clip(np.round(data / step), -(levels - 1), levels - 1) * step
    return float(np.mean((data - q) ** 2))


def _mse_asymmetric(data, lo, hi, levels=256):
    step = (hi - lo) / (levels - 1)
    q = np.clip(np.round((data - lo) / step), 0, levels - 1) * step + lo
    return float(np.mean((data - q) ** 2))


def test_expected_error_formula_matches_numeric_integration():
    rng = np.random.default_rng(3)
    hist = np.histogram(rng.standard_normal(20_000), bins=300)[0]
    starts, ends = np.array([0, 40, 100]), np.array([300, 260, 180])
    got = _expected_sq_errors(hist, starts, ends, 64)
    xs = np.arange(300)[:, None] + (np.arange(400) + 0.5)[None, :] / 400  # midpoint rule inside each bin
    for value, a, b in zip(got, starts, ends):
        step = (b - a) / 63
        q = np.clip(np.round((xs - a) / step), 0, 63) * step + a
        want = (((xs - q) ** 2).mean(axis=1) * hist).sum() / hist.sum()
        assert value == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("kind", ["gauss+outliers", "laplace"])
def test_mse_threshold_matches_brute_force_search(kind):
    rng = np.random.default_rng(4)
    data = _gauss_with_outliers(n=100_000) if kind == "gauss+outliers" else rng.laplace(size=100_000)
    data = data.astype(np.float32)
    obs = _feed(HistogramObserver(), np.array_split(data, 20))
    _, t = obs.range("mse", symmetric=True, num_levels=128)
    d64 = data.astype(np.float64)
    grid = np.linspace(0.5, float(np.abs(d64).max()), 1200)
    errors = np.array([_mse_symmetric(d64, g) for g in grid])
    best = int(np.argmin(errors))
    assert abs(t - grid[best]) <= 0.03 * grid[best]
    assert _mse_symmetric(d64, t) <= 1.01 * errors[best]
    if kind == "laplace":
        assert t < 0.9 * np.abs(d64).max()  # heavy tails are clipped


def test_mse_asymmetric_on_relu_like_data_matches_brute_force():
    rng = np.random.default_rng(5)
    data = np.maximum(rng.laplace(size=100_000), 0).astype(np.float32)
    obs = _feed(HistogramObserver(), np.array_split(data, 10))
    low, high = obs.range("mse", symmetric=False, num_levels=256)
    d64 = data.astype(np.float64)
    grid = np.linspace(0.5, float(d64.max()), 1200)
    errors = np.array([_mse_asymmetric(d64, 0.0, g) for g in grid])
    best = int(np.argmin(errors))
    assert low == 0.0
    assert abs(high - grid[best]) <= 0.03 * grid[best]
    assert _mse_asymmetric(d64, 0.0, high) <= 1.01 * errors[best]


# -- scale and zero point ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", False), ("int8", True), ("uint8", True)])
@pytest.mark.parametrize("low,high", [(-1.0, 3.0), (-7.25, 0.5), (0.0, 6.0), (2.0, 5.0), (-1e-3, 1e-3)])
def test_scale_zero_point_round_trip(dtype, symmetric, low, high):
    scale, zp = scale_zero_point(low, high, dtype, symmetric)
    assert scale > 0 and float(np.float32(scale)) == scale  # exactly a float32
    info = np.iinfo(dtype)
    assert info.min <= zp <= info.max and isinstance(zp, int)
    if symmetric:
        assert zp == (0 if dtype == "int8" else 128)
    assert dequantize(quantize(0.0, scale, zp, dtype), scale, zp) == 0.0  # 0.0 exactly representable
    lo, hi = min(low, 0.0), max(high, 0.0)  # the range is widened to contain 0
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    x = np.linspace(lo, hi, 10_001)
    err = np.abs(dequantize(quantize(x, scale, zp, dtype), scale, zp) - x)
    assert err.max() <= scale / 2 * (1 + 1e-9)
    levels = (hi - lo) / scale
    assert levels <= (254 if symmetric else 255) + 1e-6 and levels > (253 if symmetric else 254)  # grid used fully


def test_scale_zero_point_edge_cases():
    assert scale_zero_point(0.0, 0.0) == (1.0, 0)
    assert scale_zero_point(0.0, 0.0, "int8", symmetric=True) == (1.0, 0)
    scale, zp = scale_zero_point(-2.0, -1.0, "uint8")
    assert zp == 255 and scale == pytest.approx(2.0 / 255, rel=1e-6)
    with pytest.raises(ObserverError, match="non-finite"):
        scale_zero_point(-math.inf, 1.0)
    with pytest.raises(ObserverError, match="above"):
        scale_zero_point(2.0, 1.0)
    with pytest.raises(ObserverError, match="uint8"):
        scale_zero_point(-1.0, 1.0, "int4")


def test_ranges_from_a_constant_tensor_are_usable():
    obs = _feed(HistogramObserver(), [np.zeros((4, 8), np.float32)] * 3)
    for method in ("minmax", "percentile", "entropy", "mse"):
        low, high = obs.range(method)
        assert (low, high) == (0.0, 0.0)
        assert scale_zero_point(low, high) == (1.0, 0)
