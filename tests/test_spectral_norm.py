"""`eqxnorm.SpectralNorm` against the exact (NumPy SVD) spectral norm and `eqx.nn.SpectralNorm`."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.test_util import check_grads

import eqxnorm
import oracle


@functools.cache
def _float32_layer(name):
    """Built once per kind: each eager `jax.random` call at a new shape costs a compilation."""
    if name == "linear":
        return eqx.nn.Linear(8, 6, key=jr.key(0))
    return eqx.nn.Conv2d(2, 4, 3, key=jr.key(0))


def _slow_matrix(out, fan_in, ratio, seed=0):
    """A matrix with singular values 1, ratio, ratio/2, ...: power iteration converges like
    ratio**(2k), so with ratio close to 1 the 15 iterations at construction are not enough
    and the training calls have visible work left."""
    rng = np.random.default_rng(seed)
    k = min(out, fan_in)
    left, _ = np.linalg.qr(rng.standard_normal((out, k)))
    right, _ = np.linalg.qr(rng.standard_normal((fan_in, k)))
    singular = np.array([1.0, ratio] + [ratio / (i + 2) for i in range(k - 2)])
    return 3 * (left * singular) @ right.T


def _layer(name, ratio=0.95, dtype=jnp.float32):
    layer = _float32_layer(name)
    weight = _slow_matrix(layer.weight.shape[0], layer.weight[0].size, ratio)
    return eqx.tree_at(
        lambda m: m.weight, layer, jnp.asarray(weight.reshape(layer.weight.shape), dtype)
    )


def _example(name, batch=None):
    shape = (8,) if name == "linear" else (2, 5, 5)
    shape = shape if batch is None else (batch, *shape)
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)


def _leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


@eqx.filter_jit
def _train_calls(model, state, x, n):
    """`n` training calls in a row, threading the state."""

    def body(state, _):
        _, state = model(x, state)
        return state, None

    state, _ = jax.lax.scan(body, state, length=n)
    return model(x, state)


@pytest.mark.parametrize("name", ["linear", "conv2d"])
def test_converges_to_largest_singular_value(name):
    layer = _layer(name)
    model, state = eqx.nn.make_with_state(eqxnorm.SpectralNorm)(layer, key=jr.key(1))
    exact = oracle.spectral_norm(layer.weight)
    assert abs(float(model.sigma(state)) - exact) > 1e-3 * exact  # not converged at start
    x = _example(name)
    y, state = _train_calls(model, state, x, 200)
    oracle.assert_close(model.sigma(state), exact, jnp.float32)
    oracle.assert_close(model.exact_sigma(), exact, jnp.float32)
    # The output is the wrapped layer's with W / sigma_max(W).
    normalized = jnp.asarray(oracle.f64(layer.weight) / exact, jnp.float32)
    oracle.assert_close(y, eqx.tree_at(lambda m: m.weight, layer, normalized)(x))


def test_state_updates_in_training_only():
    model, state = eqx.nn.make_with_state(eqxnorm.SpectralNorm)(_layer("linear"), key=jr.key(1))
    x = _example("linear")
    before = _leaves(state)
    _, state = model(x, state)
    trained = _leaves(state)
    assert all(not np.array_equal(a, b) for a, b in zip(before, trained, strict=True))

    for frozen_model, kwargs in [(model, {"inference": True}), (eqx.nn.inference_mode(model), {})]:
        y, same = frozen_model(x, state, **kwargs)
        for a, b in zip(trained, _leaves(same), strict=True):
            np.testing.assert_array_equal(a, b)
        state = same
        # In inference the weight is divided by the stored estimate.
        expected = oracle.f64(model.layer.weight) / float(model.sigma(state))
        expected = expected @ oracle.f64(x) + oracle.f64(model.layer.bias)
        oracle.assert_close(y, expected, jnp.float32)

    # `inference=False` overrides an inference-mode layer.
    _, state = eqx.nn.inference_mode(model)(x, state, inference=False)
    assert all(not np.array_equal(a, b) for a, b in zip(trained, _leaves(state), strict=True))

    # A layer constructed in inference mode starts frozen.
    frozen, state = eqx.nn.make_with_state(eqxnorm.SpectralNorm)(
        _layer("linear"), inference=True, key=jr.key(1)
    )
    np.testing.assert_array_equal(_leaves(state)[0], before[0])
    _, new_state = frozen(x, state)
    for a, b in zip(before, _leaves(new_state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["linear", "conv2d"])
def test_drop_in_for_eqx(name):
    layer = _float32_layer(name)
    ours, our_state = eqx.nn.make_with_state(eqxnorm.SpectralNorm)(layer, key=jr.key(3))
    theirs, their_state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        layer, "weight", key=jr.key(3)
    )
    for field in ("weight_name", "num_power_iterations", "eps", "inference"):
        assert getattr(ours, field) == getattr(theirs, field)
    assert bool(eqx.tree_equal(ours.layer, theirs.layer))
    np.testing.assert_array_equal(_leaves(our_state)[0], _leaves(their_state)[0])
    x = _example(name)
    for kwargs in [{}, {}, {"key": jr.key(0)}, {"inference": True}, {}]:
        y_ours, our_state = ours(x, our_state, **kwargs)
        y_theirs, their_state = theirs(x, their_state, **kwargs)
        np.testing.assert_array_equal(y_ours, y_theirs)
        for a, b in zip(_leaves(our_state), _leaves(their_state), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_gradient_flows_through_weight_float64():
    with jax.enable_x64(True):
        layer = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            _float32_layer("linear"),
            (jnp.asarray(_slow_matrix(6, 8, 0.5)), jnp.zeros(6, jnp.float64)),
        )
        model, state = eqx.nn.make_with_state(eqxnorm.SpectralNorm)(layer, key=jr.key(1))
        x = jnp.asarray(np.random.default_rng(1).standard_normal(8))
        assert model.sigma(state).dtype == jnp.float64

        def f(weight, inference):
            m = eqx.tree_at(lambda m: m.layer.weight, model, weight)
            state_ = jax.tree.map(lambda a: a, state)  # a fresh copy per call
            return m(x, state_, inference=inference)[0]

        # With u, v fixed (inference), the function of W is smooth and exactly differentiable.
        check_grads(lambda w: f(w, True), (layer.weight,), order=1, modes=["rev"])
        # In training, u and v are constants of the gradient: it equals the inference-mode
        # gradient at the u, v that the training call computes.
        _, trained = model(x, jax.tree.map(lambda a: a, state))
        trained_model = eqx.tree_at(lambda m: m.layer.weight, model, layer.weight)

        def g(weight):
            m = eqx.tree_at(lambda m: m.layer.weight, trained_model, weight)
            return jnp.sum(m(x, jax.tree.map(lambda a: a, trained), inference=True)[0] ** 2)

        grad_train = jax.grad(lambda w: jnp.sum(f(w, False) ** 2))(layer.weight)
        np.testing.assert_allclose(grad_train, jax.grad(g)(layer.weight), rtol=1e-12)
        assert float(jnp.max(jnp.abs(grad_train))) > 1e-3


def test_half_precision_weight_keeps_float32_estimate():
    layer = eqx.tree_at(
        lambda m: m.bias,
        _layer("linear", ratio=0.6, dtype=jnp.bfloat16),
        jnp.zeros(6, jnp.bfloat16),
    )
    model, state = eqx.nn.make_with_state(eqxnorm.SpectralNorm)(layer, key=jr.key(1))
    assert [leaf.dtype for leaf in jax.tree.leaves(state)] == [jnp.float32, jnp.float32]
    y, state = _train_calls(model, state, _example("linear").astype(jnp.bfloat16), 30)
    assert y.dtype == jnp.bfloat16
    # The bfloat16 weight is exact in float32, so the estimate converges to float32 accuracy.
    exact = oracle.spectral_norm(layer.weight)
    oracle.assert_close(model.sigma(state), exact, jnp.float32)
    oracle.assert_close(model.exact_sigma(), exact, jnp.float32)
    assert model.exact_sigma().dtype == jnp.float32


def test_exact_sigma_matches_numpy():
    for layer in (_float32_layer("linear"), _float32_layer("conv2d")):
        model = eqxnorm.SpectralNorm(layer, key=jr.key(0))
        sigma = model.exact_sigma()
        assert sigma.shape == () and sigma.dtype == jnp.float32
        oracle.assert_close(sigma, oracle.spectral_norm(layer.weight), jnp.float32)
        oracle.assert_close(
            eqxnorm.functional.spectral_norm(layer.weight),
            oracle.spectral_norm(layer.weight),
            jnp.float32,
        )


def test_make_with_state_in_sequential_under_vmap():
    key1, key2, key3 = jr.split(jr.key(0), 3)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqxnorm.SpectralNorm(_layer("linear"), key=key1),
            eqx.nn.Lambda(jax.nn.relu),
            eqxnorm.SpectralNorm(eqx.nn.Linear(6, 3, key=key2), num_power_iterations=2, key=key3),
        ]
    )
    u, v = state.get(model.layers[0].uv_index)
    assert u.shape == (6,) and v.shape == (8,)
    np.testing.assert_allclose([jnp.linalg.norm(u), jnp.linalg.norm(v)], 1, rtol=1e-6)

    # u and v depend on the weights only, so the state is shared across the batch.
    @eqx.filter_jit
    def batched(model, x, state):
        return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)

    y, new_state = batched(model, _example("linear", batch=4), state)
    assert y.shape == (4, 3)
    assert not np.array_equal(_leaves(new_state)[0], _leaves(state)[0])


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: eqx.nn.LayerNorm(4), {}, ValueError, r"at least two axes.*shape=\(4,\)"),
        (
            lambda: _float32_layer("linear"),
            {"weight_name": "kernel"},
            ValueError,
            r"Linear has no attribute 'kernel'; its array attributes are \['weight', 'bias'\]",
        ),
        (
            lambda: eqx.tree_at(lambda m: m.bias, _float32_layer("linear"), None),
            {"weight_name": "bias"},
            ValueError,
            r"Linear.bias is None",
        ),
        (lambda: _float32_layer("linear"), {"num_power_iterations": -1}, ValueError, ">= 0"),
        (lambda: _float32_layer("linear"), {"num_power_iterations": 1.0}, TypeError, "int"),
        (lambda: _float32_layer("linear"), {"eps": 0.0}, ValueError, "eps=0.0"),
        (lambda: _float32_layer("linear"), {"impl": "cuda"}, ValueError, "impl"),
    ],
    ids=["1d", "missing", "none", "iterations-neg", "iterations-float", "eps-0", "impl"],
)
def test_bad_inputs(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        eqxnorm.SpectralNorm(make(), key=jr.key(0), **kwargs)


def test_functional_bad_inputs():
    weight = jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"`v` must have shape \(4,\)"):
        eqxnorm.functional.spectral_normalize(weight, jnp.ones(3), jnp.ones(5))
    with pytest.raises(ValueError, match="at least two axes"):
        eqxnorm.functional.spectral_norm(jnp.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        eqxnorm.functional.spectral_normalize(weight, jnp.ones(3, int), jnp.ones(4))
