"""`eqxnorm.RMSNorm` against the float64 oracle, `eqx.nn.RMSNorm` and `torch.nn.RMSNorm`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.test_util import check_grads

import eqxnorm
import kernel_support as ks
import oracle


def _randomize(layer, seed=0):
    key_w, key_b = jr.split(jr.key(seed))
    weight = 1 + 0.5 * jr.normal(key_w, layer.shape)
    bias = None if layer.bias is None else jr.normal(key_b, layer.shape)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias), layer, (weight, bias), is_leaf=lambda v: v is None
    )


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [1, 160, 760, (3, 5)])
def test_matches_oracle(shape, dtype):
    layer = _randomize(eqxnorm.RMSNorm(shape, use_bias=False))
    x = (jr.normal(jr.key(1), (37, *layer.shape)) + 1).astype(dtype)
    y = jax.jit(jax.vmap(layer))(x)
    assert y.dtype == dtype and y.shape == x.shape
    oracle.assert_close(y, oracle.rms_norm(x, layer.weight, None, 1e-5, len(layer.shape)))


def test_drop_in_for_eqx():
    # Equinox's RMSNorm has use_bias=True by default; so does ours.
    fresh, reference = eqxnorm.RMSNorm(8), eqx.nn.RMSNorm(8)
    for name in ("shape", "eps", "use_weight", "use_bias"):
        assert getattr(fresh, name) == getattr(reference, name)
    for name in ("weight", "bias"):
        a, b = getattr(fresh, name), getattr(reference, name)
        assert a.shape == b.shape and a.dtype == b.dtype
    ours = _randomize(eqxnorm.RMSNorm((2, 4), eps=1e-4))
    theirs = eqx.tree_at(
        lambda m: (m.weight, m.bias), eqx.nn.RMSNorm((2, 4), eps=1e-4), (ours.weight, ours.bias)
    )
    x = jr.normal(jr.key(2), (5, 2, 4)) * 3
    np.testing.assert_allclose(jax.vmap(ours)(x), jax.vmap(theirs)(x), rtol=1e-5, atol=1e-6)
    state = eqx.nn.State(eqx.nn.BatchNorm(3, "b", mode="batch"))
    y, same_state = ours(x[0], state, key=jr.key(0))
    assert same_state is state
    np.testing.assert_allclose(y, theirs(x[0]), rtol=1e-5, atol=1e-6)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    ours = _randomize(eqxnorm.RMSNorm(16, eps=1e-6, use_bias=False))
    theirs = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(np.asarray(ours.weight)))
    x = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32)
    expected = theirs(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(jax.vmap(ours)(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_gradients_float64():
    with jax.enable_x64(True):
        layer = _randomize(eqxnorm.RMSNorm(6))
        x = jr.normal(jr.key(3), (3, 6), jnp.float64) + 0.5

        def f(x, weight, bias):
            return jax.vmap(eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias)))(x)

        check_grads(f, (x, layer.weight, layer.bias), order=1, modes=["rev"])


def test_zero_input_gives_the_bias():
    layer = _randomize(eqxnorm.RMSNorm(5))
    np.testing.assert_array_equal(layer(jnp.zeros(5)), layer.bias)


def test_errors():
    with pytest.raises(ValueError, match=r"x.shape=\(2, 8\).*jax.vmap"):
        eqxnorm.RMSNorm(8)(jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="dtype int32"):
        eqxnorm.RMSNorm(8)(jnp.ones(8, jnp.int32))
    with pytest.raises(ValueError, match="eps=0"):
        eqxnorm.RMSNorm(8, eps=0.0)


def test_pallas_matches_reference():
    x = jr.normal(jr.key(1), (37, 160)) + 2

    def build(impl):
        return eqxnorm.RMSNorm(160, impl=impl)

    ks.assert_impls_agree(build, lambda layer, x: jax.vmap(layer)(x), x)


def test_zero_centred_weight_output_dtype_and_fp8():
    """`weight_offset=1.0`: the weight starts at zeros (Gemma's RMSNorm) and the layer is the
    plain norm with `1 + weight`; `out_dtype` sets the output's dtype, also of
    `add_and_norm` (whose `h` keeps the residual's); a float8 `out_dtype` takes `fp8_scale`
    and returns the amax."""
    gemma = eqxnorm.RMSNorm(160, eps=1e-6, use_bias=False, weight_offset=1.0)
    assert gemma.weight.shape == (160,) and not np.any(np.asarray(gemma.weight))
    gemma = eqx.tree_at(lambda m: m.weight, gemma, 0.1 * jr.normal(jr.key(2), (160,)))
    x = jr.normal(jr.key(1), (37, 160)) + 1
    plain = eqx.tree_at(
        lambda m: m.weight, eqxnorm.RMSNorm(160, 1e-6, use_bias=False), 1 + gemma.weight
    )
    np.testing.assert_allclose(jax.vmap(gemma)(x), jax.vmap(plain)(x), rtol=1e-6, atol=1e-6)

    half = eqxnorm.RMSNorm(160, use_bias=False, out_dtype=jnp.bfloat16)
    assert jax.vmap(half)(x).dtype == jnp.bfloat16
    y, h = jax.vmap(half.add_and_norm)(x.astype(jnp.bfloat16), x)
    assert (y.dtype, h.dtype) == (jnp.bfloat16, jnp.float32)

    fp8 = eqxnorm.RMSNorm(160, use_bias=False, out_dtype=jnp.float8_e4m3fn)
    q, amax = jax.vmap(lambda v: fp8(v, fp8_scale=jnp.float32(2.0)))(x)
    q_f, amax_f = eqxnorm.functional.rms_norm(
        x, fp8.weight, out_dtype=jnp.float8_e4m3fn, fp8_scale=2.0
    )
    np.testing.assert_array_equal(ks.bits(q), ks.bits(q_f))
    assert float(jnp.max(amax)) == float(amax_f)
    with pytest.raises(ValueError, match="float8 dtype, whose output needs a scale"):
        fp8(x[0])
    with pytest.raises(ValueError, match="weight_offset=1.0 is added to the weight"):
        eqxnorm.RMSNorm(160, use_weight=False, weight_offset=1.0)
    with pytest.raises(TypeError, match="`out_dtype` must be a floating dtype"):
        eqxnorm.RMSNorm(160, out_dtype=jnp.int8)
