"""The reference (`eqxnorm.kernels.reference`) against the independent float64 NumPy oracle,
and the numerical guarantees of its one statistics helper, `moments`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import oracle
from eqxnorm.kernels import reference

ROWS = (1, 37, 199)
WIDTHS = (1, 3, 160, 760, 4096)


def _data(shape, dtype, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(loc, scale, size=shape).astype(np.float32)).astype(dtype)


def _affine(width, seed=1):
    rng = np.random.default_rng(seed)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, size=width).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=width).astype(np.float32))
    return weight, bias


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_norms_match_oracle(op, rows, width, dtype):
    x = _data((rows, width), dtype, seed=rows * width)
    weight, bias = _affine(width)
    y = jax.jit(getattr(reference, op), static_argnames="eps")(x, weight, bias, eps=1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape
    oracle.assert_close(y, getattr(oracle, op)(x, weight, bias, 1e-5))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_norms_without_affine(op):
    x = _data((37, 160), jnp.float32)
    y = getattr(reference, op)(x, None, None, eps=1e-3)
    oracle.assert_close(y, getattr(oracle, op)(x, None, None, 1e-3))


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "batch,channels,spatial,groups", [(1, 4, 1, 2), (3, 6, 37, 3), (2, 32, 160, 8), (37, 3, 5, 3)]
)
def test_group_norm_matches_oracle(batch, channels, spatial, groups, dtype):
    x = _data((batch, channels, spatial), dtype)
    weight, bias = _affine(channels)
    y = reference.group_norm(x, weight, bias, groups=groups, eps=1e-5)
    assert y.dtype == x.dtype
    oracle.assert_close(y, oracle.group_norm(x, groups, weight, bias, 1e-5))


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("batch,channels,spatial", [(2, 3, 1), (37, 4, 5), (8, 16, 49)])
def test_batch_norm_matches_oracle(batch, channels, spatial, dtype):
    x = _data((batch, channels, spatial), dtype, loc=3.0)
    weight, bias = _affine(channels)
    y, mean, var = reference.batch_norm(x, weight, bias, eps=1e-5)
    y_np, mean_np, var_np = oracle.batch_norm(x, weight, bias, 1e-5)
    oracle.assert_close(y, y_np)
    assert mean.dtype == var.dtype == jnp.float32
    oracle.assert_close(mean, mean_np, jnp.float32)
    oracle.assert_close(var, var_np, jnp.float32)
    y_inf = reference.batch_norm_inference(x, mean, var, weight, bias, eps=1e-5)
    oracle.assert_close(y_inf, y_np)


def test_batch_norm_pools_over_axis_name():
    """Statistics of 4 vmapped shards equal the statistics of the concatenated batch."""
    x = _data((4, 2, 3, 5), jnp.float32, loc=10.0)
    per_member = jax.vmap(
        lambda xs: reference.batch_norm(xs, None, None, eps=1e-5, axis_name="b"),
        axis_name="b",
    )
    y, mean, var = per_member(x)
    whole, mean_all, var_all = reference.batch_norm(x.reshape(8, 3, 5), None, None, eps=1e-5)
    np.testing.assert_allclose(y.reshape(8, 3, 5), whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean[0], mean_all, rtol=1e-6)
    np.testing.assert_allclose(var[1], var_all, rtol=1e-6)


# --- the statistics helper -------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_variance_accurate_at_large_mean(offset):
    """Unit-variance data around a large mean: the corrected two-pass variance keeps its
    relative accuracy, where E[x²] − E[x]² in float32 loses every digit."""
    x = _data((16, 4096), jnp.float32, loc=offset)
    stats = jax.jit(reference.moments, static_argnums=1)(x, 1)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(stats.mean[:, 0], x64.mean(1), rtol=1e-7)
    np.testing.assert_allclose(stats.var[:, 0], x64.var(1), rtol=2e-5)
    naive = jnp.mean(x * x, axis=1) - jnp.mean(x, axis=1) ** 2
    assert np.max(np.abs(np.asarray(naive) - x64.var(1))) > 0.1
    # The output too keeps float32's accuracy: centring with the two parts of the mean avoids
    # the half-ulp-of-the-mean error (~5e-4 at 1e4) that a single rounded mean would add.
    y = jax.jit(reference.layer_norm, static_argnames="eps")(x, None, None, eps=1e-5)
    oracle.assert_close(y, oracle.layer_norm(x, None, None, 1e-5))


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("value", [0.0, 0.1, -3.3, 1e4, 6.0e4])
@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "batch_norm"])
def test_constant_input_gives_exactly_the_bias(op, value, dtype):
    c = jnp.asarray(value, jnp.float32).astype(dtype)
    weight, bias = _affine(37)
    if op == "layer_norm":
        x = jnp.full((5, 37), c)
        y = reference.layer_norm(x, weight, bias, eps=1e-5)
        expected = jnp.broadcast_to(bias, y.shape)
    else:
        x = jnp.full((3, 37, 7), c)
        if op == "group_norm":
            y = reference.group_norm(x, weight, bias, groups=37, eps=1e-5)
        else:
            y = reference.batch_norm(x, weight, bias, eps=1e-5)[0]
        expected = jnp.broadcast_to(bias[None, :, None], y.shape)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected.astype(dtype)))


def test_float16_near_max_does_not_overflow():
    x = (6.0e4 + _data((4, 760), jnp.float32, scale=100.0)).astype(jnp.float16)
    assert np.isfinite(np.asarray(x)).all()
    for op in ("layer_norm", "rms_norm"):
        y = getattr(reference, op)(x, None, None, eps=1e-5)
        assert np.isfinite(np.asarray(y)).all()
        oracle.assert_close(y, getattr(oracle, op)(x, None, None, 1e-5))


def test_nan_and_inf_propagate_within_their_row_only():
    """A NaN poisons its whole row; an Inf gives NaN exactly where the float64 maths does
    (the whole row for LayerNorm; for RMSNorm the Inf itself, the row's other outputs are 0).
    Other rows are untouched."""
    x = _data((4, 160), jnp.float32)
    x = x.at[1, 7].set(jnp.nan).at[2, 3].set(jnp.inf)
    for op in ("layer_norm", "rms_norm"):
        y = np.asarray(getattr(reference, op)(x, None, None, eps=1e-5))
        with np.errstate(invalid="ignore"):
            expected = getattr(oracle, op)(x, None, None, 1e-5)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
        assert np.isnan(y[1]).all() and np.isnan(y[2, 3])
        assert np.isfinite(y[[0, 3]]).all()


def test_variance_is_never_negative():
    # Values one ulp apart: rounding must never make the variance negative.
    x = jnp.asarray(np.nextafter(np.float32(1e4), np.float32(2e4), dtype=np.float32))
    x = jnp.stack([jnp.full((199,), 1e4, jnp.float32), jnp.full((199,), x)], axis=0)
    x = jnp.tile(x.T.reshape(-1), (3, 1))
    assert (np.asarray(reference.moments(x, 1).var) >= 0).all()


def test_statistics_dtype():
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        stats = reference.moments(jnp.ones((2, 3), dtype), 1)
        assert stats.shift.dtype == stats.offset.dtype == stats.var.dtype == jnp.float32
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)))
        stats = reference.moments(x, 1)
        assert stats.mean.dtype == jnp.float64
        np.testing.assert_allclose(stats.var[:, 0], np.asarray(x).var(1), rtol=1e-14)


def test_uncentered_moment_is_the_mean_square():
    x = _data((3, 760), jnp.bfloat16, loc=2.0)
    stats = reference.moments(x, 1, center=False)
    np.testing.assert_array_equal(np.asarray(stats.mean), 0.0)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(stats.var[:, 0], (x64**2).mean(1), rtol=1e-6)


@given(
    rows=st.integers(1, 9),
    width=st.integers(1, 300),
    dtype=st.sampled_from(oracle.DTYPES),
    loc=st.sampled_from([0.0, 5.0, -300.0]),
    op=st.sampled_from(["layer_norm", "rms_norm"]),
)
def test_row_norms_property(rows, width, dtype, loc, op):
    x = _data((rows, width), dtype, seed=rows + width, loc=loc)
    weight, bias = _affine(width)
    y = getattr(reference, op)(x, weight, bias, eps=1e-5)
    oracle.assert_close(y, getattr(oracle, op)(x, weight, bias, 1e-5))
