"""`eqxnorm.AdaptiveLayerNorm`, `AdaptiveRMSNorm`, `AdaptiveGroupNorm` and the functional
`adaptive_*_norm` against the float64 oracle and against the unfused Equinox sequence."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqxnorm
import kernel_support as ks
import oracle
from eqxnorm import functional as F


def _cond_projected(layer, cond):
    out = np.asarray(layer.modulation(layer.activation(cond)), np.float64)
    return np.split(out, 2)


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "cls,op", [("AdaptiveLayerNorm", "layer_norm"), ("AdaptiveRMSNorm", "rms_norm")]
)
def test_row_modules_match_oracle(cls, op, dtype):
    layer = getattr(eqxnorm, cls)(16, 6, use_weight=True, zero_init=False, key=jr.key(0))
    x = (jr.normal(jr.key(1), (3, 7, 16)) + 0.5).astype(dtype)
    cond = jr.normal(jr.key(2), (3, 6))
    y = jax.jit(jax.vmap(layer))(x, cond)
    assert y.dtype == dtype and y.shape == x.shape
    for i in range(3):
        scale, shift = _cond_projected(layer, cond[i])
        normed = getattr(oracle, op)(x[i], layer.weight, None, 1e-5)
        oracle.assert_close(y[i], normed * (1 + scale) + shift, scale=4)


def test_layer_norm_module_equals_the_unfused_equinox_sequence():
    """DiT's `modulate(norm(x), shift, scale)` written with eqx.nn, token by token."""
    layer = eqxnorm.AdaptiveLayerNorm((4, 8), 5, zero_init=False, key=jr.key(3))
    x, cond = jr.normal(jr.key(4), (2, 9, 4, 8)), jr.normal(jr.key(5), (2, 5))
    plain = eqx.nn.LayerNorm((4, 8), use_weight=False, use_bias=False)

    def unfused(x, c):
        scale, shift = jnp.split(layer.modulation(jax.nn.silu(c)), 2)
        return jax.vmap(plain)(x) * (1 + scale.reshape(1, 4, 8)) + shift.reshape(1, 4, 8)

    np.testing.assert_allclose(
        jax.vmap(layer)(x, cond), jax.vmap(unfused)(x, cond), rtol=1e-5, atol=1e-5
    )


def test_zero_init_starts_as_the_plain_norm():
    layer = eqxnorm.AdaptiveRMSNorm(8, 3, key=jr.key(0))
    assert not np.asarray(layer.modulation.weight).any()
    x, cond = jr.normal(jr.key(1), (5, 8)), jr.normal(jr.key(2), (3,))
    np.testing.assert_allclose(layer(x, cond), F.rms_norm(x), rtol=1e-6, atol=1e-6)
    group = eqxnorm.AdaptiveGroupNorm(2, 4, 3, key=jr.key(0))
    xg = jr.normal(jr.key(3), (4, 5, 5))
    np.testing.assert_allclose(group(xg, cond), F.group_norm(xg[None], 2)[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_group_module_matches_oracle(dtype):
    layer = eqxnorm.AdaptiveGroupNorm(
        3, 6, 4, channelwise_affine=True, zero_init=False, key=jr.key(0)
    )
    x = (jr.normal(jr.key(1), (2, 6, 5, 7)) * 2 + 1).astype(dtype)
    cond = jr.normal(jr.key(2), (2, 4))
    y = jax.vmap(layer)(x, cond)
    assert y.dtype == dtype
    for i in range(2):
        scale, shift = _cond_projected(layer, cond[i])
        normed = oracle.group_norm(x[i][None], 3, layer.weight, layer.bias, 1e-5)[0]
        expected = normed * (1 + scale[:, None, None]) + shift[:, None, None]
        oracle.assert_close(y[i], expected, scale=4)


def test_gradients_reach_the_projection():
    layer = eqxnorm.AdaptiveLayerNorm(8, 3, key=jr.key(0))
    x, cond = jr.normal(jr.key(1), (2, 5, 8)), jr.normal(jr.key(2), (2, 3))
    target = jr.normal(jr.key(3), (2, 5, 8))

    @eqx.filter_grad
    def grads(layer):
        return jnp.mean((jax.vmap(layer)(x, cond) - target) ** 2)

    g = grads(layer)
    # At zero init the output is the plain norm, and the loss still moves the projection.
    assert np.abs(np.asarray(g.modulation.weight)).max() > 1e-3
    assert np.abs(np.asarray(g.modulation.bias)).max() > 1e-3


@pytest.mark.parametrize("cls", ["AdaptiveLayerNorm", "AdaptiveRMSNorm"])
def test_pallas_matches_reference(cls):
    cond = jr.normal(jr.key(3), (3, 4))
    ks.assert_impls_agree(
        lambda impl: getattr(eqxnorm, cls)(160, 4, zero_init=False, impl=impl, key=jr.key(0)),
        lambda layer, x: jax.vmap(layer)(x, cond),
        jr.normal(jr.key(1), (3, 7, 160)),
    )


def test_group_pallas_matches_reference():
    cond = jr.normal(jr.key(3), (2, 4))
    ks.assert_impls_agree(
        lambda impl: eqxnorm.AdaptiveGroupNorm(2, 6, 4, zero_init=False, impl=impl, key=jr.key(0)),
        lambda layer, x: jax.vmap(layer)(x, cond),
        jr.normal(jr.key(1), (2, 6, 9)),
    )


def test_group_channels_last_kernel_equals_channels_first_reference():
    x = jax.random.normal(jax.random.key(1), (3, 8, 5, 4)) + 1
    cond = jax.random.normal(jax.random.key(2), (3, 6))

    def build(**kwargs):
        return eqxnorm.AdaptiveGroupNorm(
            4, 8, 6, channelwise_affine=True, zero_init=False, key=jax.random.key(3), **kwargs
        )

    ks.assert_layouts_agree(build, lambda layer, x: jax.vmap(layer)(x, cond), x)


def test_errors_name_the_fix():
    layer = eqxnorm.AdaptiveLayerNorm(8, 3, key=jr.key(0))
    x = jnp.ones((5, 8))
    with pytest.raises(ValueError, match=r"cond.shape=\(2, 3\).*jax.vmap\(norm\)\(x, cond\)"):
        layer(x, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"cond_size=4 or pass"):
        layer(x, jnp.ones(4))
    with pytest.raises(ValueError, match=r"x.shape=\(5, 7\)"):
        layer(jnp.ones((5, 7)), jnp.ones(3))
    with pytest.raises(TypeError, match="floating"):
        layer(jnp.ones((5, 8), jnp.int32), jnp.ones(3))
    with pytest.raises(ValueError, match="groups=4 must divide channels=6"):
        eqxnorm.AdaptiveGroupNorm(4, 6, 3, key=jr.key(0))
    group = eqxnorm.AdaptiveGroupNorm(2, 6, 3, key=jr.key(0))
    with pytest.raises(ValueError, match="channels-last|batch axis"):
        group(jnp.ones((4, 4, 6)), jnp.ones(3))
    with pytest.raises(ValueError, match="cond_size"):
        eqxnorm.AdaptiveLayerNorm(8, 0, key=jr.key(0))


def test_functional_broadcasts_over_the_middle_axes():
    x = jr.normal(jr.key(0), (2, 3, 4, 8))
    scale, shift = jr.normal(jr.key(1), (2, 8)), jr.normal(jr.key(2), (2, 8))
    y = F.adaptive_layer_norm(x, scale, shift)
    expected = F.layer_norm(x) * (1 + scale[:, None, None]) + shift[:, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # One vector per example and token: no middle axes.
    y2 = F.adaptive_rms_norm(x[0, 0], scale[:1].repeat(4, 0), shift[:1].repeat(4, 0))
    np.testing.assert_allclose(
        y2, F.rms_norm(x[0, 0]) * (1 + scale[:1]) + shift[:1], rtol=1e-5, atol=1e-5
    )


def test_functional_errors():
    x = jnp.ones((2, 5, 8))
    with pytest.raises(ValueError, match=r"scale.shape=\(2, 8\) and shift.shape=\(2, 1, 8\)"):
        F.adaptive_layer_norm(x, jnp.ones((2, 8)), jnp.ones((2, 1, 8)))
    with pytest.raises(ValueError, match=r"leading axes \(3,\).*x.shape=\(2, 5, 8\)"):
        F.adaptive_layer_norm(x, jnp.ones((3, 8)), jnp.ones((3, 8)))
    with pytest.raises(ValueError, match=r"end in the normalized shape \(8,\)"):
        F.adaptive_rms_norm(x, jnp.ones((2, 7)), jnp.ones((2, 7)))
    with pytest.raises(ValueError, match=r"\(batch, channels\) = \(2, 5\)"):
        F.adaptive_group_norm(x, 5, jnp.ones((2, 5, 8)), jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match="impl"):
        F.adaptive_layer_norm(x, jnp.ones((2, 8)), jnp.ones((2, 8)), impl="cuda")


def test_weight_offset_and_out_dtype():
    norm = eqxnorm.AdaptiveRMSNorm(
        16, 4, use_weight=True, weight_offset=1.0, out_dtype=jnp.bfloat16, key=jr.key(0)
    )
    assert not np.any(np.asarray(norm.weight))
    x, cond = jr.normal(jr.key(1), (3, 16)), jr.normal(jr.key(2), (4,))
    y = norm(x, cond)
    plain = eqxnorm.AdaptiveRMSNorm(16, 4, use_weight=True, key=jr.key(0))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, plain(x, cond).astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="float8 dtype"):
        eqxnorm.AdaptiveLayerNorm(16, 4, out_dtype=jnp.float8_e5m2, key=jr.key(0))
