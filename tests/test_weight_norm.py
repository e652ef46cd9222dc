"""`eqxnorm.WeightNorm` and `eqxnorm.functional.weight_normalize` against `eqx.nn.WeightNorm`,
and the `torch.nn.utils.parametrizations.weight_norm` state dicts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqxnorm

# name: (layer factory, one example's shape)
LAYERS = {
    "linear": (lambda key: eqx.nn.Linear(5, 4, key=key), (5,)),
    "conv2d": (lambda key: eqx.nn.Conv2d(2, 3, (3, 2), use_bias=False, key=key), (2, 5, 4)),
}


def _pair(name, axis):
    make, shape = LAYERS[name]
    layer = make(jr.key(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, *shape)), jnp.float32)
    return eqxnorm.WeightNorm(layer, axis=axis), eqx.nn.WeightNorm(layer, axis=axis), x


@pytest.mark.parametrize("name, axis", [("linear", 0), ("linear", None), ("conv2d", 1)])
def test_matches_equinox(name, axis):
    ours, theirs, x = _pair(name, axis)
    np.testing.assert_allclose(ours.g, theirs.g, rtol=1e-6)
    assert ours.g.shape == theirs.g.shape and ours.weight_name == theirs.weight_name

    # A moved direction and magnitude, so that the norm and g both matter.
    def perturb(m):
        v = getattr(m.layer, m.weight_name)
        return eqx.tree_at(lambda n: (getattr(n.layer, n.weight_name), n.g), m, (2 * v, 3 * m.g))

    ours, theirs = perturb(ours), perturb(theirs)

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def loss(model, x):
        return jnp.sum(jnp.sin(jax.vmap(model)(x)))

    (value, grads), (expected, expected_grads) = loss(ours, x), loss(theirs, x)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    np.testing.assert_allclose(grads.g, expected_grads.g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.layer.weight, expected_grads.layer.weight, atol=1e-5)


def test_normalized_weight_and_state_pass_through():
    ours, _, x = _pair("linear", 0)
    weight = ours.normalized_weight()
    np.testing.assert_allclose(weight, ours.layer.weight, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(weight, axis=1, keepdims=True), ours.g, rtol=1e-6)
    state = eqx.nn.State(eqx.nn.Linear(1, 1, key=jr.key(0)))
    y, same = ours(x[0], state)
    assert same is state and y.shape == (4,)


def test_functional_bfloat16_keeps_dtype():
    v = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6)), jnp.bfloat16)
    g = jnp.full((4, 1), 2.0, jnp.bfloat16)
    w = eqxnorm.functional.weight_normalize(v, g)
    assert w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.linalg.norm(np.float32(w), axis=1), 2.0, rtol=1e-2)


def test_errors():
    linear = eqx.nn.Linear(5, 4, key=jr.key(0))
    with pytest.raises(ValueError, match=r"no attribute 'kernel'.*\['weight', 'bias'\]"):
        eqxnorm.WeightNorm(linear, "kernel")
    with pytest.raises(ValueError, match="axis=2 is out of range for a weight of rank 2"):
        eqxnorm.WeightNorm(linear, axis=2)
    with pytest.raises(TypeError, match="`axis` must be a Python int or None"):
        eqxnorm.WeightNorm(linear, axis=0.0)  # pyright: ignore
    with pytest.raises(ValueError, match=r"`g` must have shape \(4, 1\).*g.shape=\(4,\)"):
        eqxnorm.functional.weight_normalize(linear.weight, jnp.ones(4))


# --- PyTorch's parametrizations.weight_norm ----------------------------------------------------


def test_state_dict_keys_and_shapes():
    conv = eqxnorm.WeightNorm(eqx.nn.Conv2d(2, 3, 3, key=jr.key(0)), axis=None)
    sd = eqxnorm.torch_state_dict(conv, prefix="c.")
    assert {k: v.shape for k, v in sd.items()} == {
        "c.bias": (3,),
        "c.parametrizations.weight.original0": (),
        "c.parametrizations.weight.original1": (3, 2, 3, 3),
    }
    moved = {k: 2 * v for k, v in sd.items()}
    loaded = eqxnorm.load_torch_state_dict(conv, moved, prefix="c.")
    np.testing.assert_allclose(loaded.layer.bias, 2 * conv.layer.bias)
    np.testing.assert_allclose(loaded.g, 2 * conv.g)
    assert loaded.g.shape == (1, 1, 1, 1)
    legacy = {"weight_g": sd["c.parametrizations.weight.original0"], "bias": sd["c.bias"]}
    with pytest.raises(ValueError, match="legacy `torch.nn.utils.weight_norm`.*original0"):
        eqxnorm.load_torch_state_dict(conv, legacy)
    with pytest.raises(ValueError, match=r"original0` has shape \(3,\).*expects shape \(\)"):
        eqxnorm.load_torch_state_dict(
            conv, {**moved, "c.parametrizations.weight.original0": np.ones(3)}, prefix="c."
        )


@pytest.mark.parametrize("dim", [0, None])
def test_matches_torch(dim):
    torch = pytest.importorskip("torch")
    weight_norm = torch.nn.utils.parametrizations.weight_norm
    torch.manual_seed(0)
    theirs = weight_norm(torch.nn.Conv2d(2, 3, 3), dim=dim)
    with torch.no_grad():
        theirs.parametrizations.weight.original0.mul_(1.5)
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    ours = eqxnorm.WeightNorm(eqx.nn.Conv2d(2, 3, 3, key=jr.key(0)), axis=dim)
    ours = eqxnorm.load_torch_state_dict(ours, sd)
    x = np.random.default_rng(3).standard_normal((2, 2, 5, 6)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    y = eqx.filter_jit(jax.vmap(ours))(jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    exported = eqxnorm.torch_state_dict(ours)
    assert list(exported) == list(sd)
    fresh = weight_norm(torch.nn.Conv2d(2, 3, 3), dim=dim)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.from_numpy(x)).numpy(), expected, rtol=1e-6)
