"""`eqxnorm.WeightStandardization` against the float64 oracle and the wrapped layers."""

import functools

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

# The issue asks for ResNet-style use with GroupNorm: eqxnorm's own once it exists.
GroupNorm = getattr(eqxnorm, "GroupNorm", eqx.nn.GroupNorm)

# name: (in, out, kernel or None for a Linear, one example's shape)
LAYERS = {
    "linear": (5, 4, None, (5,)),
    "conv1d": (3, 4, (3,), (3, 7)),
    "conv2d": (2, 3, (3, 2), (2, 5, 4)),
}


@functools.cache
def _float32_layer(name):
    fan_in, out, kernel, _ = LAYERS[name]
    if kernel is None:
        return eqx.nn.Linear(fan_in, out, key=jr.key(0))
    return eqx.nn.Conv(len(kernel), fan_in, out, kernel, key=jr.key(0))


def _layer(name, dtype=jnp.float32, seed=0):
    """A layer whose weight has a different mean and scale per output unit, so that both
    centering and scaling are tested. Built from NumPy data: every eager `jax.random` call at
    a new shape and dtype costs a compilation."""
    layer = _float32_layer(name)
    rng = np.random.default_rng(seed)
    out = layer.weight.shape[0]
    scale = np.arange(1, out + 1).reshape(out, *(1,) * (layer.weight.ndim - 1))
    weight = rng.standard_normal(layer.weight.shape) * scale + scale
    bias = rng.standard_normal(layer.bias.shape)
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        layer,
        (jnp.asarray(weight, dtype), jnp.asarray(bias, dtype)),
    )


def _with_weight(layer, weight):
    return eqx.tree_at(lambda m: m.weight, layer, weight)


def _oracle_layer(layer, eps=1e-5):
    """`layer` with its weight standardized by the oracle."""
    weight = oracle.weight_standardize(layer.weight, eps)
    return _with_weight(layer, jnp.asarray(weight, layer.weight.dtype))


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", LAYERS)
def test_weight_matches_oracle(name, dtype):
    layer = _layer(name, dtype)
    ws = eqxnorm.WeightStandardization(layer)
    weight = eqx.filter_jit(ws.standardized_weight)()
    assert weight.dtype == dtype and weight.shape == layer.weight.shape
    oracle.assert_close(weight, oracle.weight_standardize(layer.weight, 1e-5))
    assert ws.layer.weight is layer.weight  # the raw weight stays the parameter


@pytest.mark.parametrize("name", LAYERS)
def test_output_is_layer_with_standardized_weight(name):
    layer = _layer(name)
    ws = eqxnorm.WeightStandardization(layer, eps=1e-3)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(LAYERS[name][3]), jnp.float32)
    y = ws(x)
    assert y.dtype == jnp.float32
    oracle.assert_close(y, _oracle_layer(layer, 1e-3)(x))


def test_invariant_to_shift_and_scale_of_each_output_unit():
    layer = _layer("conv2d")
    moved = _with_weight(layer, 3 * layer.weight - 2)
    standardize = eqx.filter_jit(lambda m: eqxnorm.WeightStandardization(m).standardized_weight())
    # Only eps breaks the scale invariance, by a relative 1e-5 / var(weight) at most.
    oracle.assert_close(standardize(moved), standardize(layer), scale=2)


def test_gradients_float64():
    with jax.enable_x64(True):
        layer = _float32_layer("conv1d")
        weight = jnp.asarray(np.random.default_rng(0).standard_normal(layer.weight.shape))
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, jnp.zeros((4, 1))))
        ws = eqxnorm.WeightStandardization(layer, eps=1e-3)
        x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)))
        assert ws.standardized_weight().dtype == jnp.float64

        def f(weight, x):
            return eqx.tree_at(lambda m: m.layer.weight, ws, weight)(x)

        check_grads(f, (weight, x), order=1, modes=["rev"])


def test_vmap_and_jit():
    layer = _layer("conv2d")
    ws = eqxnorm.WeightStandardization(layer)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 2, 5, 4)), jnp.float32)
    y = eqx.filter_jit(jax.vmap(ws))(x)
    oracle.assert_close(y, jax.vmap(_oracle_layer(layer))(x))

    # An ensemble: one WeightStandardization per member, vmapped over the weights as well.
    members = [_layer("linear", seed=i) for i in range(3)]
    ensemble = eqxnorm.WeightStandardization(
        jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    )
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5)), jnp.float32)
    ys = eqx.filter_jit(eqx.filter_vmap(lambda m, x: m(x)))(ensemble, xs)
    for i, member in enumerate(members):
        oracle.assert_close(ys[i], _oracle_layer(member)(xs[i]))


class _NoisyLinear(eqx.Module):
    """A layer that needs its key, to see that the wrapper passes it through."""

    weight: jax.Array

    def __call__(self, x, *, key=None):
        return self.weight @ x + jr.normal(key, (self.weight.shape[0],))


def test_state_and_key_pass_through():
    rng = np.random.default_rng(0)
    layer = _NoisyLinear(jnp.asarray(rng.standard_normal((3, 4)), jnp.float32))
    ws = eqxnorm.WeightStandardization(layer)
    x, key = jnp.asarray(rng.standard_normal(4), jnp.float32), jr.key(2)
    state = eqx.nn.State(eqx.nn.BatchNorm(3, "batch", mode="batch"))
    y, same_state = ws(x, state, key=key)
    assert same_state is state
    weight = jnp.asarray(oracle.weight_standardize(layer.weight, 1e-5), jnp.float32)
    oracle.assert_close(y, weight @ x + jr.normal(key, (3,)))


class _Block(eqx.Module):
    """A pre-activation-free ResNet basic block: (WS-conv → GroupNorm → ReLU) × 2 + skip."""

    conv1: eqxnorm.WeightStandardization
    norm1: eqx.Module
    conv2: eqxnorm.WeightStandardization
    norm2: eqx.Module

    def __init__(self, channels, key):
        key1, key2 = jr.split(key)

        def conv(k):
            return eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=k)

        self.conv1 = eqxnorm.WeightStandardization(conv(key1))
        self.norm1 = GroupNorm(2, channels)
        self.conv2 = eqxnorm.WeightStandardization(conv(key2))
        self.norm2 = GroupNorm(2, channels)

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        return jax.nn.relu(x + self.norm2(self.conv2(y)))


def test_resnet_block_trains_under_jit_and_grad():
    block = _Block(4, jr.key(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 4, 6, 6)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((3, 4, 6, 6)), jnp.float32)

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss(model, x):
        return jnp.mean((jax.vmap(model)(x) - target) ** 2)

    value, grads = loss(block, x)
    for conv, grad in ((block.conv1, grads.conv1), (block.conv2, grads.conv2)):
        g = grad.layer.weight.reshape(4, -1)
        assert g.shape == (4, 36) and bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.max(jnp.abs(g))) > 1e-4
        # Standardization removes each output unit's mean, so moving a whole row changes
        # nothing: the gradient with respect to the raw weight sums to zero along each row.
        np.testing.assert_allclose(g.sum(axis=1), 0, atol=1e-5 * float(jnp.max(jnp.abs(g))) * 36)
        assert conv.layer.weight.shape == (4, 4, 3, 3)

    # One SGD step reduces the loss: the gradients point the right way.
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, block, grads)
    new_value, _ = loss(stepped, x)
    assert float(new_value) < float(value)


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: eqx.nn.LayerNorm(4), {}, ValueError, r"at least two axes.*shape=\(4,\)"),
        (
            lambda: eqx.nn.Linear(3, 2, key=jr.key(0)),
            {"weight_name": "kernel"},
            ValueError,
            r"Linear has no attribute 'kernel'; its array attributes are \['weight', 'bias'\]",
        ),
        (
            lambda: eqx.nn.Linear(3, 2, use_bias=False, key=jr.key(0)),
            {"weight_name": "bias"},
            ValueError,
            r"Linear.bias is None",
        ),
        (lambda: eqx.nn.Linear(3, 2, key=jr.key(0)), {"weight_name": 0}, TypeError, "a str"),
        (lambda: eqx.nn.Linear(1, 2, key=jr.key(0)), {}, ValueError, "at least 2 element"),
        (lambda: eqx.nn.Linear(3, 2, key=jr.key(0)), {"eps": 0.0}, ValueError, "eps=0.0"),
        (lambda: eqx.nn.Linear(3, 2, key=jr.key(0)), {"eps": -1e-5}, ValueError, "greater"),
        (lambda: eqx.nn.Linear(3, 2, key=jr.key(0)), {"impl": "cuda"}, ValueError, "impl"),
        (
            lambda: _with_weight(eqx.nn.Linear(3, 2, key=jr.key(0)), jnp.ones((2, 3), int)),
            {},
            TypeError,
            "floating-point dtype",
        ),
    ],
    ids=["1d", "missing", "none", "name-type", "fan-in-1", "eps-0", "eps-neg", "impl", "int"],
)
def test_bad_inputs(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        eqxnorm.WeightStandardization(make(), **kwargs)


def test_functional_bad_inputs():
    with pytest.raises(ValueError, match="at least two axes"):
        eqxnorm.functional.weight_standardize(jnp.ones(3))
    with pytest.raises(ValueError, match="eps"):
        eqxnorm.functional.weight_standardize(jnp.ones((2, 3)), eps=0.0)


def test_pallas_matches_reference():
    x = jax.random.normal(jax.random.key(1), (4, 3, 9, 9))
    conv = eqx.nn.Conv2d(3, 8, 3, key=jax.random.key(0))

    def build(impl):
        return eqxnorm.WeightStandardization(conv, impl=impl)

    ks.assert_impls_agree(build, lambda layer, x: jax.vmap(layer)(x), x)
