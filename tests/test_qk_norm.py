"""`eqxnorm.QKNorm` and `eqxnorm.functional.qk_norm` against the float64 oracle, across
implementations, and their errors."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import pytest

import eqxnorm
import kernel_support as ks
import oracle


def _randomize(layer, seed=0):
    key_q, key_k = jr.split(jr.key(seed))
    weights = tuple(
        1 + 0.2 * jr.normal(key, w.shape)
        for key, w in zip((key_q, key_k), (layer.q_weight, layer.k_weight), strict=True)
    )
    return eqx.tree_at(lambda m: (m.q_weight, m.k_weight), layer, weights)


def test_matches_oracle_with_grouped_query_heads():
    # Per-head weights (the shared ones: tests/kernels/test_reference.py).
    layer = _randomize(eqxnorm.QKNorm(4, 32, kv_heads=2, per_head=True, impl="reference"))
    q = jr.normal(jr.key(1), (2, 9, 4, 32)) + 1
    k = jr.normal(jr.key(2), (2, 9, 2, 32))
    qy, ky = eqx.filter_jit(layer)(q, k)
    q_ref, k_ref = oracle.qk_norm(q, k, layer.q_weight, layer.k_weight, 1e-6)
    oracle.assert_close(qy, q_ref)
    oracle.assert_close(ky, k_ref)


def test_pallas_matches_reference_in_one_launch():
    # A batch of examples (the leading axes are any) and the default shared weights: the
    # kernel's per-head weight sums add up to the shared weight's gradient.
    q = jr.normal(jr.key(1), (2, 8, 3, 16)) + 1
    k = jr.normal(jr.key(2), (2, 8, 3, 16))
    cotangents = [ks.data(a.shape, jnp.float32, seed=s) for s, a in enumerate((q, k))]

    def loss(layer, q, k):
        outs = layer(q, k)
        return sum(jnp.sum(y * c) for y, c in zip(outs, cotangents, strict=True)), outs

    results = []
    for impl in ("pallas", "reference"):
        layer = _randomize(eqxnorm.QKNorm(3, 16, impl=impl))
        grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        (_, outs), grads = grad_fn(layer, q, k)
        results.append((*outs, grads.q_weight, grads.k_weight))
    for got, want in zip(*results, strict=True):
        ks.assert_matches(got, want)


def test_errors():
    layer = eqxnorm.QKNorm(4, 32, kv_heads=2)
    with pytest.raises(ValueError, match=r"k must be \(\*tokens, 2, 32\).*k.shape=\(9, 4, 32\)"):
        layer(jnp.ones((9, 4, 32)), jnp.ones((9, 4, 32)))
    with pytest.raises(TypeError, match="dtype int32"):
        layer(jnp.ones((9, 4, 32), jnp.int32), jnp.ones((9, 2, 32)))
    with pytest.raises(ValueError, match="norm must be"):
        eqxnorm.QKNorm(4, 32, norm="batch_norm")
    with pytest.raises(ValueError, match=r"q_weight.*\(32,\).*\(4, 32\).*\(3, 32\)"):
        eqxnorm.functional.qk_norm(jnp.ones((9, 4, 32)), jnp.ones((9, 2, 32)), jnp.ones((3, 32)))
    with pytest.raises(ValueError, match="share head_dim"):
        eqxnorm.functional.qk_norm(jnp.ones((9, 4, 32)), jnp.ones((9, 2, 16)))
