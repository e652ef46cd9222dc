"""Padding masks (`mask=`, `lengths=`) in the statistics of every norm: the functional ops
and the layers against the float64 masked oracle, against `flax.nnx` (whose `mask=` they
mirror), gradients, empty slices, `jit`/`vmap` and the errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from flax import nnx

import eqxnorm
import eqxnorm.functional as F
import oracle


def _data(shape, seed=0):
    kx, km = jr.split(jr.key(seed))
    return jr.normal(kx, shape) * 2 + 1, jr.bernoulli(km, 0.6, shape)


def _params(channels, seed=1):
    kw, kb = jr.split(jr.key(seed))
    return 1 + 0.5 * jr.normal(kw, (channels,)), jr.normal(kb, (channels,))


@pytest.mark.parametrize("center", [True, False], ids=["layer_norm", "rms_norm"])
def test_row_norms_match_the_masked_oracle(center):
    x, mask = _data((5, 3, 8))
    mask = mask.at[1].set(False)  # an example with no valid element: its bias
    w, b = (p.reshape(3, 8) for p in _params(24))
    fn = F.layer_norm if center else F.rms_norm
    y = jax.jit(lambda x, m: fn(x, w, b, shape=(3, 8), mask=m))(x, mask)
    expected = oracle.masked_norm(x, mask, (1, 2), w, b, 1e-5, center)
    oracle.assert_close(y, expected)
    np.testing.assert_array_equal(y[1], b)


def test_row_norm_statistics_pooled_over_feature_shards():
    """With `axis_name` (features split across members), the counts and sums of every member
    are pooled: the members' numbers of valid elements may differ."""
    x, mask = _data((3, 8))
    mask = mask.at[0, :4].set(False)  # row 0: member 0 holds no valid element
    w, b = _params(8)

    def split(a):
        return jnp.moveaxis(a.reshape(*a.shape[:-1], 2, 4), -2, 0)

    norm = jax.vmap(lambda *a: F.layer_norm(*a[:3], mask=a[3], axis_name="f"), axis_name="f")
    y = jax.jit(norm)(split(x), split(w), split(b), split(mask))
    y = jnp.moveaxis(y, 0, -2).reshape(x.shape)
    oracle.assert_close(y, oracle.masked_norm(x, mask, (1,), w, b, 1e-5))


def test_channel_norms_match_the_masked_oracle():
    x, mask = _data((3, 6, 4, 5))
    w, b = _params(6)
    wc, bc = w.reshape(1, 6, 1, 1), b.reshape(1, 6, 1, 1)

    @jax.jit
    def run(x, mask):
        return (
            F.group_norm(x, 3, w, b, mask=mask),
            F.instance_norm(x, w, b, mask=mask),
            *F.batch_norm(x, w, b, mask=mask),
        )

    group, instance, batch, mean, var = run(x, mask)
    g = oracle.masked_norm(x.reshape(3, 3, 2, 20), mask.reshape(3, 3, 2, 20), (2, 3), 1, 0, 1e-5)
    oracle.assert_close(group, g.reshape(x.shape) * np.asarray(wc) + np.asarray(bc))
    oracle.assert_close(instance, oracle.masked_norm(x, mask, (2, 3), wc, bc, 1e-5))
    oracle.assert_close(batch, oracle.masked_norm(x, mask, (0, 2, 3), wc, bc, 1e-5))
    xs, ms = np.moveaxis(np.asarray(x), 1, 0), np.moveaxis(np.asarray(mask), 1, 0)
    oracle.assert_close(mean, [xs[c][ms[c]].mean() for c in range(6)])
    oracle.assert_close(var, [xs[c][ms[c]].var() for c in range(6)])


def test_lengths_equal_their_mask():
    x, _ = _data((3, 4, 10))
    lengths = jnp.array([10, 3, 0])
    rows = jnp.array([[10, 7, 1, 0], [2, 2, 5, 9], [4, 10, 10, 6]])

    def norms(**kw):
        row_kw = {k: rows if k == "lengths" else v[1] for k, v in kw.items()}
        kw = {k: v if k == "lengths" else v[0] for k, v in kw.items()}
        return (
            F.group_norm(x, 2, **kw),
            F.instance_norm(x, **kw),
            F.batch_norm(x, **kw)[0],
            F.rms_norm(x, **row_kw),
        )

    frames = jnp.arange(10)[None] < lengths[:, None]
    masks = (frames[:, None, :], jnp.arange(10)[None, None] < rows[..., None])
    by_lengths = jax.jit(lambda: norms(lengths=lengths))()
    by_mask = jax.jit(lambda: norms(mask=masks))()
    for a, e in zip(by_lengths, by_mask, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_masked_elements_do_not_touch_the_statistics():
    """Valid outputs do not depend on masked inputs (NaN included); the gradients of a loss
    of the valid outputs are those of the norm of the valid elements alone, and exactly zero
    at the masked ones (padding must be finite for the weight's: a masked output is
    normalized too, and `0 · NaN` is NaN)."""
    x, _ = _data((2, 9))
    lengths = jnp.array([6, 9])
    valid = jnp.arange(9)[None] < lengths[:, None]
    w, b = _params(9)
    probe = jr.normal(jr.key(3), x.shape)

    @jax.jit
    def run(x, w, b):
        def loss(x, w, b):
            y = F.layer_norm(x, w, b, lengths=lengths)
            return jnp.sum(jnp.where(valid, y, 0) * probe), y

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, b)

    (dx, dw, db), y = run(jnp.where(valid, x, 1e6), w, b)
    _, y_nan = run(jnp.where(valid, x, jnp.nan), w, b)
    np.testing.assert_array_equal(jnp.where(valid, y_nan, 0), jnp.where(valid, y, 0))
    np.testing.assert_array_equal(dx[~valid], 0)

    def compact(x, w, b):
        return jnp.sum(F.layer_norm(x, w[:6], b[:6]) * probe[0, :6])

    ex, ew, eb = jax.jit(jax.grad(compact, argnums=(0, 1, 2)))(x[0, :6], w, b)
    assert np.all(np.isfinite(dw))
    np.testing.assert_allclose(dx[0, :6], ex, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db[6:], probe[1, 6:], rtol=1e-6)


def test_masked_positions_get_the_direct_gradient_only():
    """A masked position's output is normalized with its slice's statistics: its gradient
    reaches its own input through 1/σ·γ alone."""
    x, _ = _data((1, 8))
    mask = jnp.arange(8) < 5
    w, b = _params(8)
    rstd = 1 / np.sqrt(np.var(np.asarray(x[0, :5], np.float64)) + 1e-5)
    g = jax.jit(jax.grad(lambda x: F.layer_norm(x, w, b, mask=mask)[0, 6]))(x)
    np.testing.assert_allclose(g[0, 6], rstd * w[6], rtol=1e-5)
    np.testing.assert_array_equal(g[0, 5:][np.arange(3) != 1], 0)


def test_empty_slices_are_finite_under_grad():
    x = jnp.full((2, 3, 4), jnp.nan)
    w, b = _params(3)

    def loss(x, w, b):
        y = F.group_norm(x, 3, w, b, lengths=jnp.array([0, 0]))
        return jnp.sum(y**2), y

    grads, y = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)
    np.testing.assert_array_equal(y[1, :, 0], b)
    for g in grads:
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("impl", ["pallas", "triton"])
def test_kernel_impls_give_the_reference(impl):
    x, mask = _data((2, 4, 6))

    def norms(impl):
        return (
            F.layer_norm(x, mask=mask, impl=impl),
            F.rms_norm(x, mask=mask, impl=impl),
            F.group_norm(x, 2, mask=mask, impl=impl),
        )

    run = jax.jit(norms, static_argnums=0)
    for a, e in zip(run(impl), run("reference"), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_layers_match_flax_nnx():
    """LayerNorm, RMSNorm, GroupNorm, InstanceNorm (features last in Flax, first here) and
    BatchNorm's batch statistics, on the same data and mask (no slice empty: there Flax
    divides 0 by 0)."""
    rngs = nnx.Rngs(0)
    x, mask = _data((4, 6, 5))
    mask = mask.at[:, :, 0].set(True)  # no slice empty
    xt, mt = jnp.swapaxes(x, 1, 2), jnp.swapaxes(mask, 1, 2)
    flax_layers = (
        nnx.LayerNorm(
            5,
            reduction_axes=(-2, -1),
            feature_axes=-1,
            use_fast_variance=False,
            epsilon=1e-5,
            rngs=rngs,
        ),
        nnx.RMSNorm(5, epsilon=1e-5, rngs=rngs),
        nnx.GroupNorm(6, num_groups=3, use_fast_variance=False, epsilon=1e-5, rngs=rngs),
        nnx.InstanceNorm(6, use_fast_variance=False, epsilon=1e-5, rngs=rngs),
        nnx.BatchNorm(6, use_fast_variance=False, momentum=0.0, epsilon=1e-5, rngs=rngs),
    )

    @nnx.jit
    def theirs(layers):
        ln, rms, *channels_last = layers
        return (
            ln(x, mask=mask),
            rms(x, mask=mask),
            *(jnp.swapaxes(layer(xt, mask=mt), 1, 2) for layer in channels_last),
        )

    bn, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)(6, "batch")
    ln, rms, gn, inorm = (
        eqxnorm.LayerNorm((6, 5)),
        eqxnorm.RMSNorm(5, use_bias=False),
        eqxnorm.GroupNorm(3, 6),
        eqxnorm.InstanceNorm(6, channelwise_affine=True),
    )

    @jax.jit
    def ours(state):
        y, state = jax.vmap(
            lambda x, m, s: bn(x, s, mask=m),
            axis_name="batch",
            in_axes=(0, 0, None),
            out_axes=(0, None),
        )(x, mask, state)
        return (
            jax.vmap(lambda x, m: ln(x, mask=m))(x, mask),
            jax.vmap(jax.vmap(lambda x, m: rms(x, mask=m)))(x, mask),
            jax.vmap(lambda x, m: gn(x, mask=m))(x, mask),
            jax.vmap(lambda x, m: inorm(x, mask=m))(x, mask),
            y,
        ), state.get(bn.running_index)[0]

    outputs, running_mean = ours(state)
    for a, e in zip(outputs, theirs(flax_layers), strict=True):
        oracle.assert_close(a, e, scale=2)
    oracle.assert_close(running_mean, flax_layers[-1].mean[...], scale=2)


def test_batch_norm_running_statistics_skip_padded_examples():
    """A batch with padded examples updates the running statistics as the batch of its valid
    examples alone does (the variance unbiased by the valid count)."""
    x, _ = _data((5, 3, 4))
    keep = jnp.array([True, False, True, True, False])
    bn, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)(3, "batch", momentum=0.5)
    run = jax.jit(jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))
    masked = jax.jit(
        jax.vmap(
            lambda x, s, m: bn(x, s, mask=m),
            axis_name="batch",
            in_axes=(0, None, 0),
            out_axes=(0, None),
        )
    )
    y_all, s_masked = masked(x, state, keep[:, None, None])
    y_kept, s_kept = run(x[keep], state)
    for _ in range(2):  # twice: the debiased EMA's second step too
        y_all, s_masked = masked(x, s_masked, keep[:, None, None])
        y_kept, s_kept = run(x[keep], s_kept)
    np.testing.assert_allclose(y_all[keep], y_kept, rtol=1e-5, atol=1e-6)
    for a, e in zip(s_masked.get(bn.running_index), s_kept.get(bn.running_index), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6)
    none = jnp.zeros((5, 3, 1), bool).at[:, 0].set(True)
    _, s_none = masked(x, state, none)
    mean, var = s_none.get(bn.running_index)
    np.testing.assert_array_equal(mean[1:], 0)
    np.testing.assert_array_equal(var[1:], 1)


def test_layers_under_jit_and_vmap():
    x, mask = _data((3, 4, 6))
    ln, gn, inorm = eqxnorm.LayerNorm((4, 6)), eqxnorm.GroupNorm(2, 4), eqxnorm.InstanceNorm(4)
    frames = mask[:, :1, :]  # one mask for every channel, broadcast

    @jax.jit
    def run(x, mask, frames):
        return (
            jax.vmap(lambda x, m: ln(x, mask=m))(x, mask),
            jax.vmap(lambda x, m: gn(x, mask=m))(x, frames),
            jax.vmap(lambda x, m: inorm(x, mask=m))(x, mask),
        )

    layer, group, instance = run(x, mask, frames)
    oracle.assert_close(layer, oracle.masked_norm(x, mask, (1, 2), None, None, 1e-5))
    grouped = np.broadcast_to(frames, x.shape).reshape(3, 2, 12)
    expected = oracle.masked_norm(x.reshape(3, 2, 12), grouped, (2,), None, None, 1e-5)
    oracle.assert_close(group, expected.reshape(x.shape))
    oracle.assert_close(instance, oracle.masked_norm(x, mask, (2,), None, None, 1e-5))


def test_mask_errors():
    x = jnp.ones((2, 4))
    with pytest.raises(TypeError, match="mask.*boolean.*float32"):
        F.layer_norm(x, mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"broadcast to x.shape=\(2, 4\).*\(3,\)"):
        F.layer_norm(x, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="not both"):
        F.layer_norm(x, mask=jnp.ones(4, bool), lengths=jnp.ones(2, jnp.int32))
    with pytest.raises(ValueError, match=r"lengths.*shape \(2,\).*\(4,\)"):
        F.group_norm(jnp.ones((2, 4, 3)), 2, lengths=jnp.ones(4, jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        F.batch_norm(jnp.ones((2, 4, 3)), lengths=jnp.ones(2))
    with pytest.raises(ValueError, match="broadcast"):
        eqxnorm.GroupNorm(2, 4)(jnp.ones((4, 3)), mask=jnp.ones((4, 2), bool))
