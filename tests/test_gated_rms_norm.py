"""`eqxnorm.GatedRMSNorm` (`RMSNormGated`) against the float64 oracle, across
implementations, and its errors."""

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import eqxnorm
import kernel_support as ks
import oracle


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_matches_oracle(norm_before_gate):
    layer = eqxnorm.GatedRMSNorm(160, norm_before_gate=norm_before_gate, impl="reference")
    layer = eqx_weight(layer, 1 + 0.3 * jr.normal(jr.key(0), (160,)))
    x, z = jr.normal(jr.key(1), (37, 160)) + 1, jr.normal(jr.key(2), (37, 160))
    y = jax.jit(jax.vmap(layer))(x, z)
    oracle.assert_close(y, oracle.gated_rms_norm(x, z, layer.weight, 1e-6, norm_before_gate))


def eqx_weight(layer, weight):
    import equinox as eqx

    return eqx.tree_at(lambda m: m.weight, layer, weight)


def test_pallas_matches_reference():
    x = jr.normal(jr.key(1), (8, 32)) + 1
    z = jr.normal(jr.key(2), (8, 32))

    def build(impl):
        return eqxnorm.GatedRMSNorm(32, norm_before_gate=False, impl=impl)

    ks.assert_impls_agree(build, lambda layer, x: jax.vmap(layer)(x, z), x)


def test_twin_name_and_errors():
    assert eqxnorm.RMSNormGated is eqxnorm.GatedRMSNorm
    layer = eqxnorm.GatedRMSNorm(8)
    with pytest.raises(ValueError, match=r"gate z must have x's shape \(8,\).*z.shape=\(4,\)"):
        layer(jnp.ones(8), jnp.ones(4))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 8\).*jax.vmap"):
        layer(jnp.ones((2, 8)), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="eps=0"):
        eqxnorm.GatedRMSNorm(8, eps=0.0)
    with pytest.raises(ValueError, match=r"z must have x's shape"):
        eqxnorm.functional.gated_rms_norm(jnp.ones((2, 8)), jnp.ones((2, 4)))
