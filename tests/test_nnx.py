"""`eqxnorm.nnx` against `flax.nnx`: outputs, gradients, state, and the NNX transforms."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import eqxnorm.nnx  # noqa: E402

# name: (class name, constructor arguments, input shape)
CASES = {
    "layer_norm": ("LayerNorm", dict(num_features=6), (3, 4, 6)),
    "layer_norm_two_axes": (
        "LayerNorm",
        dict(num_features=6, reduction_axes=(-2, -1), feature_axes=-1),
        (3, 4, 6),
    ),
    "rms_norm": ("RMSNorm", dict(num_features=6), (3, 4, 6)),
    "group_norm": ("GroupNorm", dict(num_features=6, num_groups=3), (2, 4, 6)),
    "instance_norm": ("InstanceNorm", dict(num_features=6), (2, 5, 6)),
    "batch_norm": ("BatchNorm", dict(num_features=6, momentum=0.9), (4, 3, 6)),
    "batch_norm_eval": (
        "BatchNorm",
        dict(num_features=6, use_running_average=True),
        (4, 3, 6),
    ),
}


def _random_state(module, seed):
    """`module`'s state with random values, so that every parameter and statistic matters."""
    state = nnx.state(module)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(1 + 0.5 * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    return jax.tree.unflatten(treedef, leaves)


def _pair(case, impl="auto"):
    name, kwargs, shape = CASES[case]
    theirs = getattr(nnx, name)(**kwargs, rngs=nnx.Rngs(0))
    ours = getattr(eqxnorm.nnx, name)(**kwargs, rngs=nnx.Rngs(0), impl=impl)
    state = _random_state(theirs, seed=1)
    nnx.update(theirs, state)
    # The state round-trip: Flax's state loads into the twin unchanged.
    nnx.update(ours, state)
    x = jnp.asarray(np.random.default_rng(2).normal(0.5, 2.0, shape), jnp.float32)
    return ours, theirs, x


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "case, impl",
    [(case, "auto") for case in CASES] + [("layer_norm", "pallas"), ("batch_norm", "pallas")],
)
def test_matches_flax(case, impl):
    # "auto" is the reference on CPU; "pallas" runs the kernels (in interpret mode).
    ours, theirs, x = _pair(case, impl)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))

    @nnx.jit
    def step(model, x):
        def loss(model, x):
            return jnp.sum(jnp.sin(model(x)))

        return nnx.value_and_grad(loss, argnums=(0, 1))(model, x)

    (value, (grads, dx)), (expected, (expected_grads, expected_dx)) = step(ours, x), step(theirs, x)
    _close(value, expected)
    _close(dx, expected_dx, 1e-4)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        _close(g, e, 1e-4)
    # BatchNorm's running statistics, updated in place by the training call.
    for s, e in zip(
        jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(theirs)), strict=True
    ):
        _close(s, e)


@pytest.mark.parametrize(
    "name, layer",
    [
        ("WeightNorm", lambda: nnx.Linear(5, 4, rngs=nnx.Rngs(0))),
        ("SpectralNorm", lambda: nnx.Linear(5, 4, rngs=nnx.Rngs(0))),
        ("SpectralNorm", lambda: nnx.Conv(5, 4, (3,), rngs=nnx.Rngs(0))),
    ],
)
def test_wrappers_match_flax(name, layer):
    # The twins override Flax's per-parameter hook, so it must still exist under that name.
    hook = {"WeightNorm": "_weightnorm_inplace", "SpectralNorm": "_spectral_normalize_inplace"}
    assert getattr(getattr(nnx, name), hook[name]) is not getattr(
        getattr(eqxnorm.nnx, name), hook[name]
    )
    ours = getattr(eqxnorm.nnx, name)(layer(), rngs=nnx.Rngs(1))
    theirs = getattr(nnx, name)(layer(), rngs=nnx.Rngs(1))
    state = _random_state(theirs, seed=3)
    nnx.update(theirs, state)
    nnx.update(ours, state)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 7, 5)), jnp.float32)

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    grad = nnx.jit(nnx.grad(loss))
    grads, expected_grads = grad(ours, x), grad(theirs, x)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        _close(g, e, 1e-4)
    # The normalized weights (and SpectralNorm's `u` and `sigma`) the calls left behind.
    for s, e in zip(
        jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(theirs)), strict=True
    ):
        _close(s, e, 1e-5)


def test_vmap_and_scan_over_layers():
    # A stack of 3 LayerNorms made with nnx.vmap and applied with nnx.scan, as in a
    # transformer's scanned blocks; equal to Flax's stack with the same state.
    def stack(cls):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return cls(6, rngs=rngs)

        return make(nnx.Rngs(0))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def apply(x, layer):
        return jnp.tanh(layer(x))

    ours, theirs = stack(eqxnorm.nnx.LayerNorm), stack(nnx.LayerNorm)
    state = _random_state(theirs, seed=5)
    nnx.update(theirs, state)
    nnx.update(ours, state)
    assert nnx.state(ours)["scale"][...].shape == (3, 6)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 6)), jnp.float32)
    _close(nnx.jit(apply)(x, ours), apply(x, theirs))


def test_batch_norm_axis_name_and_groups_under_vmap():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((4, 2, 3)), jnp.float32)

    def run(cls, x, **kwargs):
        graphdef, state = nnx.split(cls(3, axis_name="batch", rngs=nnx.Rngs(0), **kwargs))

        def member(state, x):
            bn = nnx.merge(graphdef, state)
            return bn(x), nnx.state(bn, nnx.BatchStat)

        return jax.jit(jax.vmap(member, in_axes=(None, 0), axis_name="batch"))(state, x)

    grouped = run(eqxnorm.nnx.BatchNorm, x, axis_index_groups=[[0, 3], [1, 2]])
    for group in ([0, 3], [1, 2]):
        # Flax's own groups are `pmap`'s only: compare with each group's batch alone.
        expected = run(nnx.BatchNorm, x[np.array(group)])
        for ours, theirs in zip(jax.tree.leaves(grouped), jax.tree.leaves(expected), strict=True):
            _close(ours[np.array(group)], theirs)


def test_layer_norm_features_split_over_members_in_groups():
    # Tensor parallelism: each of 4 members holds 3 of a token's features; the groups
    # {0, 1} and {2, 3} each normalize their 6 features together.
    x = jnp.asarray(np.random.default_rng(8).normal(1.0, 2.0, (4, 5, 3)), jnp.float32)
    norm = eqxnorm.nnx.LayerNorm(
        3, axis_name="model", axis_index_groups=[[0, 1], [2, 3]], rngs=nnx.Rngs(0)
    )
    y = nnx.jit(lambda norm, x: jax.vmap(norm, axis_name="model")(x))(norm, x)
    for group in (slice(0, 2), slice(2, 4)):
        tokens = jnp.moveaxis(x[group], 0, 1).reshape(5, 6)
        expected = eqxnorm.functional.layer_norm(tokens, eps=norm.epsilon)
        _close(jnp.moveaxis(y[group], 0, 1).reshape(5, 6), expected)


@pytest.mark.parametrize(
    "case, mask_shape",
    [
        ("layer_norm", (3, 4, 6)),
        ("layer_norm_two_axes", (3, 1, 6)),
        ("rms_norm", (3, 4, 6)),
        ("group_norm", (2, 4, 6)),  # Flax reshapes the mask: x's full shape
        ("batch_norm", (4, 3, 1)),
    ],
)
def test_mask_matches_flax(case, mask_shape):
    # Flax's `mask=`, broadcast and laid out as x: outputs, gradients, running statistics.
    ours, theirs, x = _pair(case)
    mask = np.random.default_rng(3).random(mask_shape) < 0.6
    mask[(0,) * len(mask_shape)] = True
    mask[..., 0] = True  # every slice keeps a counted element (Flax gives NaN for none)
    mask = jnp.asarray(mask)

    @nnx.jit
    def step(model, x):
        def loss(model, x):
            return jnp.sum(jnp.sin(model(x, mask=mask)))

        return nnx.value_and_grad(loss, argnums=(0, 1))(model, x)

    (value, (grads, dx)), (expected, (expected_grads, expected_dx)) = step(ours, x), step(theirs, x)
    _close(value, expected, 1e-4)
    _close(dx, expected_dx, 1e-4)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        _close(g, e, 1e-4)
    states = (jax.tree.leaves(nnx.state(m)) for m in (ours, theirs))
    for s, e in zip(*states, strict=True):
        _close(s, e)


def test_errors():
    with pytest.raises(ValueError, match=r"`impl` must be one of.*impl='cuda'"):
        eqxnorm.nnx.LayerNorm(4, rngs=nnx.Rngs(0), impl="cuda")
    norm = eqxnorm.nnx.GroupNorm(4, num_groups=2, axis_name="d", rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="axis_name='d'.*not supported"):
        norm(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"mask.shape=\(3,\) does not broadcast to x.shape"):
        eqxnorm.nnx.LayerNorm(4, rngs=nnx.Rngs(0))(jnp.ones((2, 4)), mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match=r"num_features=4, but x.shape=\(2, 3\) has 3"):
        eqxnorm.nnx.LayerNorm(4, rngs=nnx.Rngs(0))(jnp.ones((2, 3)))


def test_import_eqxnorm_does_not_import_flax_and_nnx_names_the_extra():
    code = (
        "import sys\n"
        "import eqxnorm\n"
        "assert 'flax' not in sys.modules, 'import eqxnorm imported flax'\n"
        "sys.modules['flax'] = None\n"
        "try:\n"
        "    import eqxnorm.nnx\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    # `-P`: the working directory (the repository root in CI) must not shadow the installed
    # package, whose `eqxnorm.kernels` is the checkout's `kernels/`.
    command = [sys.executable, "-P", "-c", code]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "pip install eqxnorm[flax]" in out.stdout
