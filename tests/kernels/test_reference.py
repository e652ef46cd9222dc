"""The reference (`eqxnorm.kernels.reference`) against the independent float64 NumPy oracle,
and the numerical guarantees of its one statistics helper, `moments`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.test_util import check_grads

import kernel_support as ks
import oracle
from eqxnorm.kernels import reference

# The awkward shapes, each row count and each width at least once (the reference is one XLA
# program whatever the shape: the full product would compile 15 for what 6 check).
ROW_SHAPES = ((1, 1), (37, 3), (199, 160), (1, 760), (37, 4096), (199, 4096))


def _data(shape, dtype, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(loc, scale, size=shape).astype(np.float32)).astype(dtype)


def _affine(width, seed=1):
    rng = np.random.default_rng(seed)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, size=width).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=width).astype(np.float32))
    return weight, bias


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("rows,width", ROW_SHAPES)
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


def _constant_case(op, width):
    """`(function of x, the shape of x, expected)` for a constant input whose slices have
    `width` elements (a multiple of 3 for the group norm's 3 channels a group)."""
    if op == "layer_norm":
        weight, bias = _affine(width)
        return (
            lambda x: reference.layer_norm(x, weight, bias, eps=1e-5),
            (5, width),
            jnp.broadcast_to(bias, (5, width)),
        )
    weight, bias = _affine(6)
    if op == "group_norm":
        return (
            lambda x: reference.group_norm(x, weight, bias, groups=2, eps=1e-5),
            (3, 6, width // 3),
            jnp.broadcast_to(bias[None, :, None], (3, 6, width // 3)),
        )
    return (
        lambda x: reference.batch_norm(x, weight, bias, eps=1e-5)[0],
        (width, 6, 1),
        jnp.broadcast_to(bias[None, :, None], (width, 6, 1)),
    )


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("width", [3, 60, 1002])
@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "batch_norm"])
def test_constant_input_gives_exactly_the_bias(op, width, dtype):
    """Exactly the bias, eagerly and under `jit`, for every width, value and dtype: the
    mean's rounding (`sum · (1/n)` is rarely the value itself) must not leak into the centred
    values, which `1/sqrt(eps)` would amplify (1e-9 at 123.456 before `moments`' `d₀`). The
    values share one jitted function (one compile)."""
    fn, shape, expected = _constant_case(op, width)
    jitted = jax.jit(fn)
    expected = np.asarray(expected.astype(dtype))
    for value in (0.0, 0.1, 0.3, -3.3, 123.456, 1e4, 6.0e4, 7.77e6):
        if dtype == jnp.float16 and value > 6.5e4:
            continue  # not a float16 number
        x = jnp.full(shape, jnp.asarray(value, jnp.float32).astype(dtype))
        np.testing.assert_array_equal(np.asarray(fn(x)), expected, err_msg=f"{value}")
        np.testing.assert_array_equal(np.asarray(jitted(x)), expected, err_msg=f"{value} jit")


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "batch_norm"])
def test_jit_equals_eager_and_float64_at_large_values(op, dtype):
    """Issue 15: under `jit`, XLA fused the mean's `sum · (1/n)` with `x - shift` into one
    multiply-add, so a constant bfloat16 channel of 1e4 normalized to -0.047 (1e6: -4.7)
    instead of 0. Every mean is now a reduction's output, so `jit` gives the eager values
    bit for bit, at large constant values and for data of unit spread around them."""
    big = 6.0e4 if dtype == jnp.float16 else 1e6
    rng = np.random.default_rng(0)
    spread = jnp.asarray(rng.normal(size=(5, 3, 40)).astype(np.float32))
    cases = [jnp.full((5, 3, 40), big, dtype), (1e3 + spread).astype(dtype)]
    fns = {
        "layer_norm": lambda x: reference.layer_norm(x.reshape(15, 40), None, None, eps=1e-5),
        "rms_norm": lambda x: reference.rms_norm(x.reshape(15, 40), None, None, eps=1e-5),
        "group_norm": lambda x: reference.group_norm(x, None, None, groups=3, eps=1e-5),
        "batch_norm": lambda x: reference.batch_norm(x, None, None, eps=1e-5)[0],
    }
    oracles = {
        "layer_norm": lambda x: oracle.layer_norm(x.reshape(15, 40), None, None, 1e-5),
        "rms_norm": lambda x: oracle.rms_norm(x.reshape(15, 40), None, None, 1e-5),
        "group_norm": lambda x: oracle.group_norm(x, 3, None, None, 1e-5),
        "batch_norm": lambda x: oracle.batch_norm(x, None, None, 1e-5)[0],
    }
    for x in cases:
        eager, jitted = fns[op](x), jax.jit(fns[op])(x)
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
        else:
            # XLA's GPU reductions sum in another order when fused (an H200 differed in the
            # last bit of float32 RMSNorm and GroupNorm at 1e3 + spread): within rounding.
            ks.assert_matches(jitted, eager)
        oracle.assert_close(jitted, oracles[op](x))


def test_float16_near_max_does_not_overflow():
    x = (6.0e4 + _data((4, 760), jnp.float32, scale=100.0)).astype(jnp.float16)
    assert np.isfinite(np.asarray(x)).all()
    for op in ("layer_norm", "rms_norm"):
        y = getattr(reference, op)(x, None, None, eps=1e-5)
        assert np.isfinite(np.asarray(y)).all()
        oracle.assert_close(y, getattr(oracle, op)(x, None, None, 1e-5))


def test_nan_and_inf_propagate_within_their_row_only():
    """A NaN or an Inf poisons its whole row (an infinite variance or mean square gives NaN,
    see `inverse_std`); other rows are untouched."""
    x = _data((4, 160), jnp.float32)
    x = x.at[1, 7].set(jnp.nan).at[2, 3].set(jnp.inf)
    for op in ("layer_norm", "rms_norm"):
        y = np.asarray(getattr(reference, op)(x, None, None, eps=1e-5))
        assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
        assert np.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_overflowing_squares_give_nan_not_zeros(op):
    """Finite values whose squared deviations overflow float32 (|x| ≳ 1.8e19) give NaN for
    their row (as PyTorch does), never the silent zeros of `rsqrt(inf) = 0`."""
    x = jnp.stack([jnp.linspace(-3e19, 3e19, 8), jnp.linspace(-1.0, 1.0, 8)])
    for fn in (getattr(reference, op), jax.jit(getattr(reference, op), static_argnames="eps")):
        y = np.asarray(fn(x, None, None, eps=1e-5))
        assert np.isnan(y[0]).all()
        oracle.assert_close(y[1], getattr(oracle, op)(x[1:], None, None, 1e-5)[0])


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


# --- fused residual add + norm, adaptive modulation ------------------------------------------


@pytest.mark.parametrize(
    "x_dtype,r_dtype",
    [
        (jnp.float32, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.float16, jnp.float16),
        (jnp.bfloat16, jnp.float32),
    ],
    ids=lambda d: jnp.dtype(d).name,
)
@pytest.mark.parametrize("rows,width", [(1, 160), (37, 760), (199, 3)])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_add_norm_matches_oracle(op, rows, width, x_dtype, r_dtype):
    x = _data((rows, width), x_dtype, seed=1)
    residual = _data((rows, width), r_dtype, seed=2, loc=1.0)
    weight, bias = _affine(width)
    y, h = getattr(reference, "add_" + op)(x, residual, weight, bias, eps=1e-5)
    assert y.dtype == x.dtype and h.dtype == residual.dtype
    y_np, h_np = oracle.add_norm(getattr(oracle, op), x, residual, weight, bias, 1e-5)
    # h is the sum rounded once to the residual's dtype, exactly as an unfused add stores it.
    np.testing.assert_array_equal(np.asarray(h, np.float64), h_np)
    oracle.assert_close(y, y_np)
    # The pair equals the unfused sequence exactly.
    unfused = getattr(reference, op)(h, weight, bias, eps=1e-5).astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(unfused, np.float32))


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("groups,rows,width", [(1, 37, 160), (3, 1, 760), (2, 5, 3)])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_adaptive_row_norms_match_oracle(op, groups, rows, width, dtype):
    x = _data((groups, rows, width), dtype, seed=3, loc=0.5)
    scale = _data((groups, width), jnp.float32, seed=4, scale=0.3)
    shift = _data((groups, width), jnp.float32, seed=5)
    weight, bias = _affine(width)
    y = getattr(reference, "adaptive_" + op)(x, scale, shift, weight, bias, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    normed = getattr(oracle, op)(x, weight, bias, 1e-5)
    # One rounding at the end: |y| is up to ~(1 + |s|)·|norm| + |t|, hence scale=4.
    oracle.assert_close(y, oracle.modulate(normed, scale, shift), scale=4)


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("batch,channels,spatial,groups", [(1, 4, 1, 2), (3, 6, 37, 3)])
def test_adaptive_group_norm_matches_oracle(batch, channels, spatial, groups, dtype):
    x = _data((batch, channels, spatial), dtype, seed=6, loc=2.0)
    scale = _data((batch, channels), jnp.float32, seed=7, scale=0.3)
    shift = _data((batch, channels), jnp.float32, seed=8)
    weight, bias = _affine(channels)
    y = reference.adaptive_group_norm(x, scale, shift, weight, bias, groups=groups, eps=1e-5)
    assert y.dtype == dtype
    normed = oracle.group_norm(x, groups, weight, bias, 1e-5)
    s64, t64 = (np.asarray(a, np.float64)[:, :, None] for a in (scale, shift))
    oracle.assert_close(y, normed * (1 + s64) + t64, scale=4)


def test_modulation_without_affine_is_one_plus_scale():
    scale, shift = jnp.asarray([[0.5, -1.0]]), jnp.asarray([[2.0, 3.0]])
    w, b = reference.modulation(scale, shift, None, None, jnp.float32)
    np.testing.assert_array_equal(w, [[1.5, 0.0]])
    np.testing.assert_array_equal(b, [[2.0, 3.0]])
    w, b = reference.modulation(scale, shift, jnp.asarray([2.0, 2.0]), jnp.ones(2), jnp.float32)
    np.testing.assert_array_equal(w, [[3.0, 0.0]])
    np.testing.assert_array_equal(b, [[3.5, 3.0]])


def _on_arrays(fn, **kwargs):
    """`fn` called with JAX arrays (check_grads perturbs its inputs as NumPy arrays), jitted:
    check_grads calls it dozens of times, one compile each transformation instead of eager
    dispatch each call."""
    return jax.jit(lambda *args: fn(*(jnp.asarray(a) for a in args), **kwargs))


def test_fused_references_gradients_are_correct():
    """Reverse-mode gradients of the new references against finite differences, float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, r = (jnp.asarray(rng.normal(size=(3, 5))) for _ in range(2))
        w, b = jnp.asarray(rng.uniform(0.5, 1.5, 5)), jnp.asarray(rng.normal(size=5))
        s, t = jnp.asarray(rng.normal(size=(3, 5))), jnp.asarray(rng.normal(size=(3, 5)))
        for op in ("add_layer_norm", "add_rms_norm"):
            fn = _on_arrays(getattr(reference, op), eps=1e-5)
            check_grads(fn, (x, r, w, b), order=1, modes=["rev"])
        x3 = x.reshape(3, 1, 5)
        for op in ("adaptive_layer_norm", "adaptive_rms_norm"):
            fn = _on_arrays(getattr(reference, op), eps=1e-5)
            check_grads(fn, (x3, s, t, w, b), order=1, modes=["rev"])
        xg = jnp.asarray(rng.normal(size=(3, 4, 5)))
        sg, tg = s[:, :4], t[:, :4]
        check_grads(
            _on_arrays(reference.adaptive_group_norm, groups=2, eps=1e-5),
            (xg, sg, tg, w[:4], b[:4]),
            order=1,
            modes=["rev"],
        )


def test_normalized_derivatives_in_every_mode():
    """The custom JVP of `normalized` against finite differences: forward and reverse mode,
    second order, with weight and bias; and `jax.jacfwd` equals `jax.jacrev`."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(3, 6)) + 2)
        w, b = jnp.asarray(rng.uniform(0.5, 1.5, 6)), jnp.asarray(rng.normal(size=6))
        for op, order in (("layer_norm", 2), ("rms_norm", 1)):
            fn = _on_arrays(getattr(reference, op), eps=1e-3)
            check_grads(fn, (x, w, b), order=order, modes=["fwd", "rev"])
        xg = jnp.asarray(rng.normal(size=(2, 4, 3)))
        fn = _on_arrays(reference.group_norm, groups=2, eps=1e-3)
        check_grads(fn, (xg, w[:4], b[:4]), order=1, modes=["fwd", "rev"])
        forward = jax.jacfwd(fn)(xg, w[:4], b[:4])
        np.testing.assert_allclose(forward, jax.jacrev(fn)(xg, w[:4], b[:4]), rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_backward_keeps_only_the_input_and_statistics(dtype):
    """Reverse mode saves `x` in its own dtype, three float32 values per row and the weight:
    not a float32 copy of `x` or the normalized array."""
    x = _data((64, 256), dtype)
    weight, bias = (p.astype(dtype) for p in _affine(256))
    for op in ("layer_norm", "rms_norm"):
        _, vjp = jax.vjp(_on_arrays(getattr(reference, op), eps=1e-5), x, weight, bias)
        saved = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))
        assert saved <= x.nbytes + 3 * 4 * 64 + 2 * weight.nbytes, (op, saved, x.nbytes)


def test_batch_norm_derivatives_include_the_statistics():
    """`(y, mean, var)` all differentiate correctly (a loss may use the batch statistics),
    in both modes, pooled over an `axis_name` too; and reverse mode keeps only x and
    per-channel statistics."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.normal(size=(4, 3, 5)) + 1)
        w, b = jnp.asarray(rng.uniform(0.5, 1.5, 3)), jnp.asarray(rng.normal(size=3))
        fn = _on_arrays(reference.batch_norm, eps=1e-3)
        check_grads(fn, (x, w, b), order=1, modes=["fwd", "rev"])

        def pooled(x):
            return jax.vmap(
                lambda xs: reference.batch_norm(xs, w, b, eps=1e-3, axis_name="m"), axis_name="m"
            )(x.reshape(2, 2, 3, 5))

        def whole(x):
            y, mean, var = reference.batch_norm(x, w, b, eps=1e-3)
            return y.reshape(2, 2, 3, 5), jnp.stack([mean, mean]), jnp.stack([var, var])

        np.testing.assert_allclose(
            jax.jacrev(lambda x: pooled(x)[2])(x), jax.jacrev(lambda x: whole(x)[2])(x), atol=1e-12
        )
    x = _data((32, 16, 64), jnp.float32)
    _, vjp = jax.vjp(lambda x: reference.batch_norm(x, None, None, eps=1e-5), x)
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(vjp)) <= x.nbytes + 3 * 4 * 16


# --- per-head QK-norm, gated RMSNorm, Dynamic Tanh --------------------------------------------


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_qk_norm_matches_oracle(norm, dtype):
    # Grouped-query attention (4 query heads, 2 key heads), per-head q weight, shared k weight.
    q, k = _data((2, 5, 4, 64), dtype), _data((2, 7, 2, 64), dtype, seed=1, loc=0.5)
    q_weight = _data((4, 64), jnp.float32, seed=2, loc=1.0, scale=0.2)
    k_weight = _affine(64)[0]
    qy, ky = reference.qk_norm(q, k, q_weight, k_weight, eps=1e-6, norm=norm)
    q_ref, k_ref = oracle.qk_norm(q, k, q_weight, k_weight, 1e-6, norm)
    assert (qy.dtype, ky.dtype, qy.shape, ky.shape) == (dtype, dtype, q.shape, k.shape)
    oracle.assert_close(qy, q_ref)
    oracle.assert_close(ky, k_ref)


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_matches_oracle(norm_before_gate, dtype):
    x, z = _data((37, 160), dtype), _data((37, 160), dtype, seed=1)
    weight = _affine(160)[0]
    y = reference.gated_rms_norm(x, z, weight, eps=1e-6, norm_before_gate=norm_before_gate)
    assert y.dtype == dtype
    oracle.assert_close(y, oracle.gated_rms_norm(x, z, weight, 1e-6, norm_before_gate))


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dyt_matches_oracle(dtype):
    x = _data((37, 160), dtype, scale=3.0)
    weight, bias = _affine(160)
    y = reference.dyt(x, jnp.asarray(0.7), weight, bias)
    assert y.dtype == dtype
    oracle.assert_close(y, oracle.dyt(x, 0.7, weight, bias))
    oracle.assert_close(
        reference.dyt(x, jnp.asarray(0.7), None, None), oracle.dyt(x, 0.7, None, None)
    )


def test_gated_and_dyt_gradients_float64():
    with jax.enable_x64(True):
        x, z = (_data((3, 8), jnp.float64, seed=s) for s in (0, 1))
        weight = _affine(8)[0].astype(jnp.float64)
        # The gate inside the norm: its derivative has every term of the other order's.
        gated = _on_arrays(reference.gated_rms_norm, eps=1e-6, norm_before_gate=False)
        check_grads(gated, (x, z, weight), order=1, modes=["fwd", "rev"])
        alpha = jnp.asarray(0.7, jnp.float64)
        dyt = _on_arrays(reference.dyt)
        check_grads(dyt, (x, alpha, weight, weight - 1), order=1, modes=["fwd", "rev"])


# --- output options: weight offset, output dtype, FP8 output ---------------------------------


def _gemma_rms_norm(x, weight, eps):
    """Gemma's RMSNorm in float64 NumPy, as its PyTorch code writes it: the stored weight is
    zero-centred, `x / sqrt(mean(x²) + eps) * (1 + weight)`."""
    x = np.asarray(x, np.float64)
    rms = np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x / rms * (1.0 + np.asarray(weight, np.float64))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_centred_rms_norm_matches_float64_gemma(dtype):
    x = _data((37, 160), dtype)
    weight = jnp.asarray(np.random.default_rng(3).normal(0, 0.1, 160), dtype)
    y = reference.rms_norm(x, weight, None, eps=1e-6, weight_offset=1.0)
    assert y.dtype == dtype
    oracle.assert_close(y, _gemma_rms_norm(x, weight, 1e-6))
    # LayerNorm1p: the same offset on the centred norm.
    y = reference.layer_norm(x, weight, None, eps=1e-6, weight_offset=1.0)
    oracle.assert_close(y, oracle.layer_norm(x, 1.0 + oracle.f64(weight), None, 1e-6))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize(
    ("x_dtype", "out_dtype"), [("float32", "bfloat16"), ("bfloat16", "float32")]
)
def test_out_dtype_rounds_once_from_float32(op, x_dtype, out_dtype):
    """`y` in `out_dtype` is the float32 result rounded once: a float32 `y` cast."""
    x = _data((37, 160), x_dtype)
    w, b = jnp.linspace(0.5, 1.5, 160), jnp.linspace(-1, 1, 160)
    y = getattr(reference, op)(x, w, b, eps=1e-5, out_dtype=out_dtype)
    y32 = getattr(reference, op)(x.astype(jnp.float32), w, b, eps=1e-5)
    assert y.dtype == jnp.dtype(out_dtype)
    np.testing.assert_array_equal(y, y32.astype(out_dtype))
    h_dtype = jnp.float32
    y, h = reference.add_rms_norm(x, x.astype(h_dtype), w, None, eps=1e-5, out_dtype=out_dtype)
    assert (y.dtype, h.dtype) == (jnp.dtype(out_dtype), jnp.dtype(h_dtype))
    scale = jnp.zeros((160,))
    y = reference.adaptive_layer_norm(
        x[None], scale[None], scale[None], w, b, eps=1e-5, out_dtype=out_dtype
    )
    assert y.dtype == jnp.dtype(out_dtype)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_fp8_output_is_the_saturating_scaled_cast(dtype):
    """`q = cast(clip(y · s, ±max))` rounded to nearest even from the float32 `y`, and
    `amax = max |y|`; values beyond the range saturate instead of becoming NaN or inf."""
    x = _data((37, 160), jnp.bfloat16)
    w = jnp.linspace(0.5, 1.5, 160)
    y32 = reference.rms_norm(x, w, None, eps=1e-5, out_dtype=jnp.float32)
    fmax = float(jnp.finfo(dtype).max)
    for scale in (3.0, 1e6):
        q, amax = reference.rms_norm(
            x, w, None, eps=1e-5, out_dtype=dtype, fp8_scale=jnp.float32(scale)
        )
        expected = np.clip(np.asarray(y32) * np.float32(scale), -fmax, fmax).astype(dtype)
        assert q.dtype == dtype and amax.dtype == jnp.float32 and amax.shape == ()
        np.testing.assert_array_equal(q.view(jnp.uint8), expected.view(np.uint8))
        assert float(amax) == float(jnp.max(jnp.abs(y32)))
    assert float(jnp.max(q.astype(jnp.float32))) == fmax  # saturated, not NaN
    q, h, amax = reference.add_layer_norm(
        x, x.astype(jnp.float32), None, None, eps=1e-5, out_dtype=dtype, fp8_scale=jnp.float32(2.0)
    )
    assert (q.dtype, h.dtype, amax.shape) == (dtype, jnp.float32, ())


def test_options_derivatives():
    """The weight offset differentiates like `γ + offset`, and the FP8 output straight
    through its clip and rounding (`s` times the norm's derivative); the scale gets none."""
    x, w = _data((5, 16), jnp.float32), jnp.linspace(-0.1, 0.1, 16)
    g = jax.grad(
        lambda w: jnp.sum(reference.rms_norm(x, w, None, eps=1e-5, weight_offset=1.0) ** 2)
    )(w)
    g1 = jax.grad(lambda w: jnp.sum(reference.rms_norm(x, w + 1, None, eps=1e-5) ** 2))(w)
    np.testing.assert_allclose(g, g1, rtol=1e-6)

    def fp8(x, w, s):
        q, _ = reference.layer_norm(x, w, None, eps=1e-5, out_dtype=jnp.float8_e4m3fn, fp8_scale=s)
        return jnp.sum(q.astype(jnp.float32) * jnp.arange(16.0)[None] / 16)

    def plain(x, w):
        return jnp.sum(reference.layer_norm(x, w, None, eps=1e-5) * jnp.arange(16.0)[None] / 16)

    gx, gw, gs = jax.grad(fp8, argnums=(0, 1, 2))(x, w, jnp.float32(4.0))
    px, pw = jax.grad(plain, argnums=(0, 1))(x, w)
    # The cotangents k/16 are exact in float8_e4m3fn.
    np.testing.assert_allclose(gx, 4 * px, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, 4 * pw, rtol=1e-5, atol=1e-6)
    assert float(gs) == 0.0
