"""`eqxnorm.functional` on batched arrays: the row norms' shape resolution, NumPy inputs, and
the errors shared by every function; and empty batches through every layer, which reach the
same functions. (Each family's maths is tested in its module's file.)"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqxnorm
import kernel_support as ks
import oracle
from eqxnorm import functional as F


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_normalized_shape_resolution(op):
    fn, ref = getattr(F, op), getattr(oracle, op)
    x = _x((4, 3, 5))
    w = 1 + _x((3, 5), 1)
    oracle.assert_close(fn(x), ref(x, None, None, 1e-5, 1))  # default: last axis
    oracle.assert_close(fn(x, shape=(3, 5)), ref(x, None, None, 1e-5, 2))
    oracle.assert_close(fn(x, shape=5), ref(x, None, None, 1e-5, 1))
    oracle.assert_close(fn(x, w), ref(x, w, None, 1e-5, 2))  # from the weight
    oracle.assert_close(fn(x, None, w[0], eps=1e-2), ref(x, None, w[0], 1e-2, 1))  # from the bias


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_empty_batch_is_allowed(impl):
    assert F.layer_norm(jnp.ones((0, 7)), impl=impl).shape == (0, 7)
    assert F.rms_norm(jnp.ones((0, 7)), impl=impl).shape == (0, 7)
    assert F.group_norm(jnp.ones((0, 4, 3)), 2, impl=impl).shape == (0, 4, 3)
    y, _, _ = F.batch_norm(jnp.ones((0, 4, 3)), mean=jnp.zeros(4), var=jnp.ones(4), impl=impl)
    assert y.shape == (0, 4, 3)


def _over_batch(layer, *inputs):
    return jax.vmap(layer)(*inputs)


def _add_and_norm(layer, x, residual):
    return jax.vmap(layer.add_and_norm)(x, residual)


def _batch_norm_inference(layer, x):
    state = eqx.nn.State(layer)
    over_batch = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return over_batch(x, state)[0]


_KEY = jax.random.key(0)
# Each case: `impl -> (layer, call(layer, *inputs), the shape of one example of each input)`.
EMPTY_BATCH_LAYERS = {
    "layer_norm": lambda impl: (eqxnorm.LayerNorm(8, impl=impl), _over_batch, [(8,)]),
    "layer_norm_2d": lambda impl: (eqxnorm.LayerNorm((3, 8), impl=impl), _over_batch, [(3, 8)]),
    "rms_norm": lambda impl: (eqxnorm.RMSNorm(8, impl=impl), _over_batch, [(8,)]),
    "group_norm": lambda impl: (eqxnorm.GroupNorm(2, 4, impl=impl), _over_batch, [(4, 5)]),
    "instance_norm": lambda impl: (
        eqxnorm.InstanceNorm(4, channelwise_affine=True, impl=impl),
        _over_batch,
        [(4, 5)],
    ),
    "add_and_norm": lambda impl: (eqxnorm.LayerNorm(8, impl=impl), _add_and_norm, [(8,), (8,)]),
    "adaptive_layer_norm": lambda impl: (
        eqxnorm.AdaptiveLayerNorm(8, 3, zero_init=False, impl=impl, key=_KEY),
        _over_batch,
        [(8,), (3,)],
    ),
    "adaptive_group_norm": lambda impl: (
        eqxnorm.AdaptiveGroupNorm(2, 4, 3, zero_init=False, impl=impl, key=_KEY),
        _over_batch,
        [(4, 5), (3,)],
    ),
    "batch_norm_inference": lambda impl: (
        eqxnorm.BatchNorm(4, "batch", inference=True, impl=impl),
        _batch_norm_inference,
        [(4, 5)],
    ),
    "weight_standardization": lambda impl: (
        eqxnorm.WeightStandardization(eqx.nn.Linear(6, 3, key=_KEY), impl=impl),
        _over_batch,
        [(6,)],
    ),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("case", list(EMPTY_BATCH_LAYERS))
def test_empty_vmapped_batch_through_every_layer(case, impl, jit):
    layer, call, shapes = EMPTY_BATCH_LAYERS[case](impl)
    # What one example gives: the outputs' trailing shapes and dtypes.
    expected = eqx.filter_eval_shape(call, layer, *(jnp.ones((2, *s)) for s in shapes))
    inputs = [jnp.ones((0, *s)) for s in shapes]

    def loss(layer_and_inputs):
        layer, inputs = layer_and_inputs
        return sum(jnp.sum(o) for o in jax.tree.leaves(call(layer, *inputs)))

    run, grad = call, eqx.filter_grad(loss)
    if jit:
        run, grad = eqx.filter_jit(run), eqx.filter_jit(grad)
    out = run(layer, *inputs)
    for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        assert (o.shape, o.dtype) == ((0, *e.shape[1:]), e.dtype)
    layer_grad, input_grads = grad((layer, inputs))
    assert [g.shape for g in input_grads] == [i.shape for i in inputs]
    for g in jax.tree.leaves(layer_grad):
        np.testing.assert_array_equal(g, jnp.zeros_like(g))


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_empty_vmapped_batch_cannot_train_batch_norm(impl):
    norm, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)(4, "batch", impl=impl)
    over_batch = jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        over_batch(jnp.ones((0, 4, 5)), state)


def test_numpy_inputs():
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    w = np.full(6, 2.0, np.float32)
    y = F.layer_norm(x, w, w)
    assert isinstance(y, jax.Array)
    oracle.assert_close(y, oracle.layer_norm(x, w, w, 1e-5))


def test_under_jit_vmap_grad():
    x = _x((2, 3, 16))
    f = jax.jit(jax.vmap(lambda x: F.rms_norm(x, shape=16)))
    oracle.assert_close(f(x), oracle.rms_norm(x, None, None, 1e-5))
    ramp = jnp.broadcast_to(jnp.arange(16.0), x.shape)
    g = jax.grad(lambda x: jnp.sum(F.layer_norm(x) * ramp))(x)
    assert g.shape == x.shape and np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_norm_errors(op):
    fn = getattr(F, op)
    where = f"eqxnorm.functional.{op}"
    with pytest.raises(ValueError, match=rf"{where}: the trailing axes of x must be .*\(3,\)"):
        fn(jnp.ones((2, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*x.shape=\(4, 2\)"):
        fn(jnp.ones((4, 2)), shape=(2, 4))
    with pytest.raises(ValueError, match=r"`bias` must have shape \(4,\).*bias.shape=\(3,\)"):
        fn(jnp.ones((2, 4)), jnp.ones(4), jnp.ones(3))
    with pytest.raises(ValueError, match="x is a scalar"):
        fn(jnp.ones(()))
    with pytest.raises(ValueError, match="has no elements"):
        fn(jnp.ones((2, 0)))
    with pytest.raises(TypeError, match="dtype bool"):
        fn(jnp.ones((2, 4), jnp.bool_))
    with pytest.raises(TypeError, match="`weight` must have a floating-point dtype"):
        fn(jnp.ones((2, 4)), jnp.ones(4, jnp.int32))
    with pytest.raises(TypeError, match="must be a JAX array.*list"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"eps=-0.1"):
        fn(jnp.ones((2, 4)), eps=-0.1)
    with pytest.raises(TypeError, match=r"`eps` must be a real number"):
        fn(jnp.ones((2, 4)), eps="small")
    with pytest.raises(ValueError, match=r"impl='fast'"):
        fn(jnp.ones((2, 4)), impl="fast")


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_errors_do_not_depend_on_impl(impl):
    # The checks run before dispatch, so the kernels reject bad input with the same messages.
    with pytest.raises(ValueError, match=r"layer_norm: the trailing axes of x must be .*\(3,\)"):
        F.layer_norm(jnp.ones((2, 4)), jnp.ones(3), impl=impl)
    with pytest.raises(ValueError, match=r"groups=4 must divide the number of channels"):
        F.group_norm(jnp.ones((2, 6, 3)), 4, impl=impl)
    with pytest.raises(ValueError, match=r"batch statistics need more than one value"):
        F.batch_norm(jnp.ones((1, 3)), impl=impl)


def _hard_cases(values, width, impl):
    """`name -> (function of x, x)` for every layer family, on an x whose every slice is
    constant: one of `values` per row, example or channel, `width` elements (a multiple of 2)
    per row."""
    n = len(values)
    rows = jnp.broadcast_to(values[:, None], (n, width))
    return {
        "layer_norm": (lambda x: F.layer_norm(x, impl=impl), rows),
        "rms_norm": (lambda x: F.rms_norm(x, impl=impl), rows),
        "add_layer_norm": (lambda x: F.add_layer_norm(x, x, impl=impl)[0], rows),
        "group_norm": (
            lambda x: F.group_norm(x, 2, impl=impl),
            jnp.broadcast_to(values[:, None, None], (n, 4, width // 2)),
        ),
        "instance_norm": (
            lambda x: F.instance_norm(x, impl=impl),
            jnp.broadcast_to(values[:, None, None], (n, 3, width)),
        ),
        "batch_norm": (
            lambda x: F.batch_norm(x, impl=impl)[0],
            jnp.broadcast_to(values, (width, n)),
        ),
    }


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
def test_constant_slices_normalize_to_exactly_their_bias(dtype, impl):
    """Issue 15: `layer_norm(full((2, 60), 0.3))` gave 2.2e-12 and the Pallas BatchNorm of a
    constant 1e4 channel 0.14. Every layer, either impl, eager and jitted: exactly 0 (RMSNorm:
    one value for each row). The constants 0.3, 123.456 and 1e4 share one array (a row, an
    example or a channel each), so one compile checks them all."""
    values = jnp.asarray([0.3, 123.456, 1e4], dtype)
    # Pallas interprets on CPU, slowly: one width there (60: the width of the issue).
    for width in (2, 60, 1000) if impl == "reference" else (60,):
        for name, (fn, x) in _hard_cases(values, width, impl).items():
            for run in (fn, jax.jit(fn)):
                y = np.asarray(run(x))
                expected = y[:, :1] if name == "rms_norm" else 0
                assert (y == expected).all(), (name, width, run)


# --- channels-last layouts (`channel_axis=-1`) -----------------------------------------------


def test_channels_last_against_the_float64_oracle():
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 6)) + 1
    weight, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)
    first = np.moveaxis(np.asarray(x), -1, 1)
    cases = [
        (
            F.group_norm(x, 3, weight, bias, channel_axis=-1),
            oracle.group_norm(first, 3, weight, bias, 1e-5),
        ),
        (
            F.instance_norm(x, weight, bias, channel_axis=-1),
            oracle.instance_norm(first, weight, bias, 1e-5),
        ),
        (
            F.batch_norm(x, weight, bias, channel_axis=-1)[0],
            oracle.batch_norm(first, weight, bias, 1e-5)[0],
        ),
    ]
    for actual, expected in cases:
        oracle.assert_close(actual, np.moveaxis(expected, 1, -1))


def test_channels_last_vmap_of_one_example_and_statistics():
    """`vmap` over examples of a channels-last call; BatchNorm's statistics are per column of
    the `(batch·spatial, channels)` matrix."""
    x = jax.random.normal(jax.random.key(2), (4, 7, 6)) + 2
    y = jax.vmap(lambda e: F.group_norm(e[None], 2, channel_axis=-1)[0])(x)
    np.testing.assert_allclose(y, F.group_norm(x, 2, channel_axis=-1), rtol=1e-6, atol=1e-6)
    _, mean, var = F.batch_norm(x, channel_axis=-1)
    rows = np.asarray(x, np.float64).reshape(-1, 6)
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, rows.var(0), rtol=1e-5)


def test_channel_axis_errors():
    x = jnp.ones((2, 5, 4, 6))
    with pytest.raises(ValueError, match=r"channel_axis=2 must name.*jnp.moveaxis\(x, 2, -1\)"):
        F.group_norm(x, 3, channel_axis=2)
    with pytest.raises(TypeError, match="channel_axis must be an int"):
        F.batch_norm(x, channel_axis=None)
    with pytest.raises(ValueError, match=r"`weight` must have shape \(6,\)"):
        F.instance_norm(x, jnp.ones(5), channel_axis=-1)
    with pytest.raises(ValueError, match=r"scale must be \(batch, channels\) = \(2, 6\)"):
        F.adaptive_group_norm(x, 3, jnp.ones((2, 5)), jnp.ones((2, 5)), channel_axis=-1)


def test_channels_last_training_steps_lower_for_cuda_without_a_transpose():
    """The functional ops' channels-last path is reshapes around the kernels: a training step
    on `(batch, h, w, channels)` lowered for cuda launches the kernels and no transpose."""
    x = jnp.ones((4, 6, 5, 16), jnp.bfloat16)
    weight, bias = jnp.ones(16, jnp.bfloat16), jnp.zeros(16, jnp.bfloat16)
    norms = {
        "group_norm": lambda x, w, b: F.group_norm(x, 4, w, b, channel_axis=-1, impl="pallas"),
        "batch_norm": lambda x, w, b: F.batch_norm(x, w, b, channel_axis=-1, impl="pallas")[0],
    }
    for name, norm in norms.items():
        loss = lambda *a, norm=norm: jnp.sum(norm(*a).astype(jnp.float32) ** 2)  # noqa: E731
        text = ks.lowered(jax.value_and_grad(loss, argnums=(0, 1, 2)), (x, weight, bias), "cuda")
        assert ks.kernel_count(text, "cuda") >= 2, name
        assert "stablehlo.transpose" not in text, name
