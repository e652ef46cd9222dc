"""`eqxnorm.DyT` against the float64 oracle, across implementations, the LayerNorm swap and
the errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import eqxnorm
import kernel_support as ks
import oracle


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_matches_oracle(dtype):
    layer = eqxnorm.DyT(160, alpha_init=0.8, impl="reference")
    layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (jnp.linspace(0.5, 1.5, 160),) * 2)
    x = (2 * jr.normal(jr.key(1), (37, 160))).astype(dtype)
    y = jax.jit(jax.vmap(layer))(x)
    assert y.dtype == dtype
    oracle.assert_close(y, oracle.dyt(x, 0.8, layer.weight, layer.bias))


def test_pallas_matches_reference_and_learns_alpha():
    x = 2 * jr.normal(jr.key(1), (8, 32))

    def build(impl):
        return eqxnorm.DyT(32, impl=impl)

    # The gradients compared include alpha's, a sum over every element.
    ks.assert_impls_agree(build, lambda layer, x: jax.vmap(layer)(x), x)


def test_convert_layer_norms_to_dyt():
    model = [
        eqx.nn.LayerNorm(8),
        eqxnorm.LayerNorm(4, use_bias=False, dtype=jnp.bfloat16, impl="reference"),
        eqxnorm.RMSNorm(4),
        eqx.nn.Linear(2, 2, key=jr.key(0)),
    ]
    converted = eqxnorm.convert_layer_norms_to_dyt(model, alpha_init=0.3)
    assert [type(m) for m in converted] == [
        eqxnorm.DyT,
        eqxnorm.DyT,
        eqxnorm.RMSNorm,
        eqx.nn.Linear,
    ]
    first, second = converted[:2]
    assert (
        first.shape == (8,) and first.bias is not None and float(first.alpha) == pytest.approx(0.3)
    )
    assert second.bias is None and second.weight.dtype == jnp.bfloat16
    assert second.impl == "reference"
    assert converted[3].weight is model[3].weight
    x = jnp.linspace(-3, 3, 8)
    assert jnp.allclose(first(x), jnp.tanh(0.3 * x))
    without = model[2:]
    assert eqxnorm.convert_layer_norms_to_dyt(without) is without
    with_rms = eqxnorm.convert_layer_norms_to_dyt(model, types=(eqxnorm.RMSNorm,))
    assert isinstance(with_rms[2], eqxnorm.DyT) and isinstance(with_rms[0], eqx.nn.LayerNorm)


def test_errors():
    with pytest.raises(ValueError, match=r"x.shape=\(2, 8\).*jax.vmap"):
        eqxnorm.DyT(8)(jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="alpha_init must be a number"):
        eqxnorm.DyT(8, alpha_init="0.5")
    with pytest.raises(ValueError, match=r"alpha must be a scalar.*alpha.shape=\(1,\)"):
        eqxnorm.functional.dyt(jnp.ones((2, 8)), jnp.ones(1))
