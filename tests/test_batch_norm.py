import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import eqxnorm
import kernel_support as ks
import oracle

EPS = 1e-5


# --- helpers ---------------------------------------------------------------------------------


def _make(input_size, axis_name="batch", **kwargs):
    return eqx.nn.make_with_state(eqxnorm.BatchNorm)(input_size, axis_name, **kwargs)


def _vmapped(bn, x, state, **kwargs):
    """`bn` over the batch axis of `x`, named "batch", with one shared state."""
    call = functools.partial(bn, **kwargs)
    return jax.vmap(call, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


# Jitted: one compilation per shape instead of one per primitive.
_run = eqx.filter_jit(_vmapped)


def _with_params(bn, weight, bias):
    return eqx.tree_at(lambda b: (b.weight, b.bias), bn, (weight, bias))


def _data(rng, shape, dtype=jnp.float32, loc=0.0, scale=1.0):
    return jnp.asarray(rng.normal(loc, scale, shape).astype(np.float32), dtype)


def _random_params(rng, channels):
    return _data(rng, (channels,), loc=1.0, scale=0.5), _data(rng, (channels,))


def _running(bn, state):
    return state.get(bn.running_index)


def _normalize(x, mean, var, weight, bias):
    """Float64 normalization of `(batch, channels, *spatial)` with given statistics."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x = oracle.f64(x)
    y = (x - oracle.f64(mean).reshape(shape)) / np.sqrt(oracle.f64(var).reshape(shape) + EPS)
    if weight is not None:
        y = y * oracle.f64(weight).reshape(shape) + oracle.f64(bias).reshape(shape)
    return y


def _unbiased_var(x):
    axes = (0,) + tuple(range(2, x.ndim))
    return oracle.f64(x).var(axes, ddof=1)


def _channel_mean(x):
    return oracle.f64(x).mean((0,) + tuple(range(2, x.ndim)))


def _debiased_ema(values, momentum):
    """The average of `values` (oldest first) weighted by momentum**age, written directly."""
    weights = momentum ** np.arange(len(values) - 1, -1, -1, dtype=np.float64)
    return sum(w * v for w, v in zip(weights, values, strict=True)) / weights.sum()


# --- against the oracle ----------------------------------------------------------------------

# (batch, channels, spatial): each required batch, channel count and spatial rank appears.
CASES = [
    (1, 3, (5,)),
    (1, 16, (2, 3, 4)),
    (3, 1, ()),
    (3, 16, (4, 6)),
    (37, 3, ()),
    (37, 16, (5,)),
]


@eqx.filter_jit
def _train_then_infer(bn, x, state):
    """One training step, then inference with the updated state (one compilation)."""
    y, state = _vmapped(bn, x, state)
    y_inference, state_after = _vmapped(bn, x, state, inference=True)
    return y, state, y_inference, state_after


@pytest.mark.parametrize("dtype", oracle.DTYPES)
@pytest.mark.parametrize("batch, channels, spatial", CASES)
def test_matches_oracle(batch, channels, spatial, dtype):
    rng = np.random.default_rng(batch * 100 + channels)
    x = _data(rng, (batch, channels, *spatial), dtype, loc=3.0, scale=2.0)
    weight, bias = _random_params(rng, channels)
    bn, state = _make(channels)
    bn = _with_params(bn, weight, bias)

    y, state, y_inference, state_after = _train_then_infer(bn, x, state)
    expected, mean, var = oracle.batch_norm(x, weight, bias, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    oracle.assert_close(y, expected, dtype)
    running_mean, running_var = _running(bn, state)
    n = x.size // channels
    oracle.assert_close(running_mean, mean, jnp.float32)
    oracle.assert_close(running_var, var * n / (n - 1), jnp.float32)
    assert int(state.get(bn.count_index)) == 1

    oracle.assert_close(y_inference, _normalize(x, running_mean, running_var, weight, bias))
    np.testing.assert_array_equal(_running(bn, state_after)[1], running_var)


@pytest.mark.parametrize("mode, spatial", [("batch", ()), ("batch", (2, 3)), ("ema", (2, 3))])
def test_gradients(mode, spatial):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(1.0, 2.0, (3, 2, *spatial)))
        weight = jnp.asarray(rng.normal(1.0, 0.5, (2,)))
        bias = jnp.asarray(rng.normal(0.0, 1.0, (2,)))
        bn, state = _make(2, mode=mode, momentum=0.9)
        assert bn.weight.dtype == jnp.float64
        # One step first, so that in "ema" mode the running part (a constant) is nonzero.
        _, state = _run(bn, x[::-1] * 0.5, state)

        @jax.jit
        def f(x, weight, bias):
            return _run(_with_params(bn, weight, bias), x, state)[0]

        check_grads(f, (x, weight, bias), order=1, modes=["rev"])


# --- training, inference, state --------------------------------------------------------------


def test_running_statistics_are_the_debiased_ema_of_unbiased_variances():
    momentum, steps = 0.9, 50
    rng = np.random.default_rng(1)
    bn, state = _make(3, momentum=momentum)
    means, variances = [], []
    for i in range(steps):
        x = _data(rng, (6, 3, 4), loc=np.sin(i), scale=1.0 + i / 25)
        _, state = _run(bn, x, state)
        means.append(_channel_mean(x))
        variances.append(_unbiased_var(x))
        if i in (0, 2, steps - 1):
            running_mean, running_var = _running(bn, state)
            oracle.assert_close(running_mean, _debiased_ema(means, momentum), jnp.float32)
            oracle.assert_close(running_var, _debiased_ema(variances, momentum), jnp.float32)
    assert state.get(bn.count_index).dtype == jnp.int32
    assert int(state.get(bn.count_index)) == steps


def test_first_step_replaces_the_initial_values_exactly():
    x = _data(np.random.default_rng(2), (5, 3, 2), loc=1e4, scale=1e-3)
    bn_last, state_last = _make(3, momentum=0.0)
    _, state_last = _run(bn_last, x, state_last)
    # In float32, (1 - m) / (1 - m^1) rounds to 1 + 1 ulp for these momenta.
    for momentum in (0.9, 0.999):
        bn, state = _make(3, momentum=momentum)
        _, state = _run(bn, x, state)
        for ours, last in zip(_running(bn, state), _running(bn_last, state_last), strict=True):
            np.testing.assert_array_equal(ours, last)
    # momentum=0 keeps only the last batch, at every step.
    x2 = _data(np.random.default_rng(3), (5, 3, 2))
    _, state_last = _run(bn_last, x2, state_last)
    running_mean, running_var = _running(bn_last, state_last)
    oracle.assert_close(running_mean, _channel_mean(x2), jnp.float32)
    oracle.assert_close(running_var, _unbiased_var(x2), jnp.float32)


def test_training_versus_inference_and_inference_mode():
    rng = np.random.default_rng(4)
    bn, state = _make(3, momentum=0.5)
    assert bn.inference is False
    for _ in range(3):
        _, state = _run(bn, _data(rng, (8, 3, 5), loc=2.0), state)
    x = _data(rng, (4, 3, 5), loc=-1.0, scale=3.0)
    running_mean, running_var = _running(bn, state)

    y_train, _ = _run(bn, x, state)
    oracle.assert_close(y_train, oracle.batch_norm(x, bn.weight, bn.bias, EPS)[0])
    y_override, state_override = _run(bn, x, state, inference=True)
    expected = _normalize(x, running_mean, running_var, None, None)
    oracle.assert_close(y_override, expected)
    assert not np.allclose(y_train, y_override, atol=0.1)
    assert int(state_override.get(bn.count_index)) == 3

    inference_bn = eqx.nn.inference_mode(bn)
    assert inference_bn.inference is True
    y_inference, state_inference = _run(inference_bn, x, state)
    np.testing.assert_array_equal(y_inference, y_override)
    np.testing.assert_array_equal(_running(bn, state_inference)[0], running_mean)
    assert int(state_inference.get(bn.count_index)) == 3
    # The call's argument wins over the field, both ways.
    y_forced_train, _ = _run(inference_bn, x, state, inference=False)
    np.testing.assert_array_equal(y_forced_train, y_train)

    training_bn = eqx.nn.inference_mode(inference_bn, value=False)
    y_again, state_again = _run(training_bn, x, state)
    np.testing.assert_array_equal(y_again, y_train)
    assert int(state_again.get(bn.count_index)) == 4


def test_make_with_state_and_sequential():
    rng = np.random.default_rng(5)
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Lambda(lambda x: 2.0 * x),
            eqxnorm.BatchNorm(3, "batch", momentum=0.5),
            eqx.nn.Lambda(jax.nn.relu),
        ]
    )
    x = _data(rng, (4, 3, 2), loc=1.0)
    y, new_state = _run(model, x, state)
    expected, mean, var = oracle.batch_norm(2.0 * oracle.f64(x), None, None, EPS)
    oracle.assert_close(y, np.maximum(expected, 0.0))
    bn = model.layers[1]
    assert int(new_state.get(bn.count_index)) == 1
    oracle.assert_close(_running(bn, new_state)[0], mean, jnp.float32)
    assert int(state.get(bn.count_index)) == 0


def test_ema_mode_trains_with_the_updated_running_statistics():
    momentum = 0.8
    rng = np.random.default_rng(6)
    weight, bias = _random_params(rng, 3)
    bn, state = _make(3, mode="ema", momentum=momentum)
    bn = _with_params(bn, weight, bias)
    bn_batch, state_batch = _make(3, mode="batch", momentum=momentum)
    means, variances = [], []
    for i in range(3):
        x = _data(rng, (5, 3, 4), loc=float(i), scale=1.0 + i)
        means.append(_channel_mean(x))
        variances.append(_unbiased_var(x))
        y, state = _run(bn, x, state)
        mean, var = _debiased_ema(means, momentum), _debiased_ema(variances, momentum)
        oracle.assert_close(y, _normalize(x, mean, var, weight, bias))
        # The running statistics follow the same update in both modes.
        _, state_batch = _run(bn_batch, x, state_batch)
        for ema, batch in zip(_running(bn, state), _running(bn_batch, state_batch), strict=True):
            oracle.assert_close(ema, batch, jnp.float32)
    y_inference, _ = _run(bn, x, state, inference=True)
    oracle.assert_close(y_inference, _normalize(x, mean, var, weight, bias))


@pytest.mark.parametrize(
    "dtype, stats_dtype",
    [(None, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32)],
)
def test_state_dtype(dtype, stats_dtype):
    bn, state = _make(3, dtype=dtype)
    param_dtype = jnp.float32 if dtype is None else dtype
    assert bn.weight.dtype == param_dtype and bn.bias.dtype == param_dtype
    x = _data(np.random.default_rng(7), (4, 3), param_dtype)
    y, state = _run(bn, x, state)
    assert y.dtype == param_dtype
    assert state.get(bn.count_index).dtype == jnp.int32
    for stat in _running(bn, state):
        assert stat.dtype == stats_dtype


def test_state_dtype_float64():
    with jax.enable_x64(True):
        bn, state = _make(3, channelwise_affine=False)
        assert bn.weight is None and bn.bias is None
        _, state = _run(bn, jnp.ones((4, 3), jnp.float32).at[0].set(2.0), state)
        assert state.get(bn.count_index).dtype == jnp.int32
        for stat in _running(bn, state):
            assert stat.dtype == jnp.float64


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_gradient_does_not_flow_into_state(mode):
    rng = np.random.default_rng(8)
    bn, state = _make(3, mode=mode, momentum=0.9)
    _, state = _run(bn, _data(rng, (4, 3, 2)), state)
    x = _data(rng, (4, 3, 2), loc=1.0)

    def state_sum(args):
        x, bn = args
        _, new_state = _run(bn, x, state)
        mean, var = _running(bn, new_state)
        return jnp.sum(mean) + jnp.sum(var)

    def output_sum(args):
        x, bn = args
        return jnp.sum(_run(bn, x, state)[0] * x)

    grad_x, grad_bn = eqx.filter_grad(state_sum)((x, bn))
    np.testing.assert_array_equal(grad_x, jnp.zeros_like(x))
    np.testing.assert_array_equal(grad_bn.weight, jnp.zeros(3))
    # The outputs do carry a gradient, so the zero above is not vacuous.
    grad_x, grad_bn = eqx.filter_grad(output_sum)((x, bn))
    assert np.abs(grad_x).max() > 1e-3 and np.abs(grad_bn.weight).max() > 1e-3


# --- drop-in for eqx.nn.BatchNorm -----------------------------------------------------------


def test_signature_and_fields_match_equinox():
    ours = inspect.signature(eqxnorm.BatchNorm.__init__).parameters
    theirs = inspect.signature(eqx.nn.BatchNorm.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name in theirs:
        if name != "mode":
            assert ours[name].default == theirs[name].default, name
    assert ours["mode"].default == "batch" and ours["impl"].kind is inspect.Parameter.KEYWORD_ONLY
    call_ours = inspect.signature(eqxnorm.BatchNorm.__call__).parameters
    call_theirs = inspect.signature(eqx.nn.BatchNorm.__call__).parameters
    assert [(p.name, p.kind, p.default) for p in call_ours.values() if p.name != "mask"] == [
        (p.name, p.kind, p.default) for p in call_theirs.values()
    ]
    # Plus Flax's padding mask, keyword-only.
    assert (call_ours["mask"].kind, call_ours["mask"].default) == (
        inspect.Parameter.KEYWORD_ONLY,
        None,
    )

    ours_bn = eqxnorm.BatchNorm(5, "batch", dtype=jnp.bfloat16)
    theirs_bn = eqx.nn.BatchNorm(5, "batch", dtype=jnp.bfloat16, mode="batch")
    for name in ("weight", "bias"):
        a, b = getattr(ours_bn, name), getattr(theirs_bn, name)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for name in ("axis_name", "input_size", "eps", "channelwise_affine", "momentum", "inference"):
        assert getattr(ours_bn, name) == getattr(theirs_bn, name), name
    assert eqxnorm.BatchNorm(5, "batch", channelwise_affine=False).weight is None


@pytest.mark.parametrize("steps", [1, 3])
def test_equinox_inference_is_inflated_and_ours_is_not(steps):
    """Same training outputs as eqx.nn.BatchNorm(mode="batch"); at inference eqx's variance is
    the debiased EMA of *biased* variances plus m^t/(1 - m^t), ours the debiased EMA of
    unbiased variances: these two differences, and nothing else, separate the outputs."""
    momentum, channels = 0.99, 3
    rng = np.random.default_rng(9)
    weight, bias = _random_params(rng, channels)
    ours, ours_state = _make(channels, momentum=momentum)
    theirs, theirs_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, "batch", momentum=momentum, mode="batch"
    )
    ours, theirs = _with_params(ours, weight, bias), _with_params(theirs, weight, bias)
    means, variances = [], []
    for i in range(steps):
        x = _data(rng, (6, channels, 4), loc=float(i), scale=2.0)
        y_ours, ours_state = _run(ours, x, ours_state)
        y_theirs, theirs_state = _run(theirs, x, theirs_state)
        oracle.assert_close(y_ours, y_theirs, jnp.float32)
        means.append(_channel_mean(x))
        variances.append(_unbiased_var(x))
    n = 6 * 4
    mean = _debiased_ema(means, momentum)
    unbiased = _debiased_ema(variances, momentum)
    inflation = momentum**steps / (1 - momentum**steps)

    x = _data(rng, (6, channels, 4), loc=1.0, scale=2.0)
    y_ours, _ = _run(ours, x, ours_state, inference=True)
    y_theirs, _ = _run(theirs, x, theirs_state, inference=True)
    oracle.assert_close(y_ours, _normalize(x, mean, unbiased, weight, bias))
    theirs_var = unbiased * (n - 1) / n + inflation
    oracle.assert_close(y_theirs, _normalize(x, mean, theirs_var, weight, bias))
    # The inflation is not small: eqx's inference output has collapsed towards the bias.
    assert inflation > 30
    spread_ours = np.std(np.asarray(y_ours) - np.asarray(bias)[:, None])
    spread_theirs = np.std(np.asarray(y_theirs) - np.asarray(bias)[:, None])
    assert spread_theirs < 0.5 * spread_ours


# --- across devices --------------------------------------------------------------------------


def _assert_tight(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=2e-6, atol=2e-6)


def test_pmap_matches_vmap():
    devices = jax.device_count()
    assert devices == 8
    rng = np.random.default_rng(10)
    bn_device, state_device = _make(3, "device", momentum=0.9)
    bn, state = _make(3, momentum=0.9)
    step = jax.pmap(lambda x, state: bn_device(x, state), axis_name="device", in_axes=(0, None))
    for i in range(2):
        x = _data(rng, (devices, 3, 5), loc=float(i))
        y_device, states = step(x, state_device)
        y, state = _run(bn, x, state)
        _assert_tight(y_device, y)
        # Every device holds the same, pooled, running statistics.
        for ours, expected in zip(_running(bn_device, states), _running(bn, state), strict=True):
            for replica in ours:
                _assert_tight(replica, expected)
        state_device = jax.tree.map(lambda leaf: leaf[0], states)
    assert int(state_device.get(bn_device.count_index)) == 2


def test_shard_map_matches_vmap():
    mesh = jax.make_mesh((8,), ("device",))
    rng = np.random.default_rng(11)
    bn_sharded, state_sharded = _make(3, ("device", "batch"), momentum=0.9)
    bn, state = _make(3, momentum=0.9)

    def local(x, state):
        return _run(bn_sharded, x, state)

    # check_vma=False: in JAX 0.10.2 a vmap collective (here over "batch") inside shard_map
    # hits an internal AssertionError in `pvary` when the varying-axes check is on.
    step = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("device"), P()),
        out_specs=(P("device"), P()),
        check_vma=False,
    )
    for i in range(2):
        x = _data(rng, (32, 3, 2, 2), loc=float(i), scale=1.0 + i)
        y_sharded, state_sharded = step(
            jax.device_put(x, NamedSharding(mesh, P("device"))), state_sharded
        )
        y, state = _run(bn, x, state)
        _assert_tight(y_sharded, y)
        for sharded, expected in zip(
            _running(bn_sharded, state_sharded), _running(bn, state), strict=True
        ):
            _assert_tight(sharded, expected)
    assert int(state_sharded.get(bn_sharded.count_index)) == 2


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_axis_index_groups_pool_within_each_group_under_vmap(impl):
    # Flax's and Haiku's `axis_index_groups`: members {0, 2} and {1, 3} pooled apart, equal to
    # BatchNorm of each group's examples alone, outputs, running statistics and gradients.
    rng = np.random.default_rng(12)
    x = _data(rng, (4, 3, 5), loc=1.0)
    bn, state = _make(3, momentum=0.9, impl=impl, axis_index_groups=[[0, 2], [1, 3]])
    plain, plain_state = _make(3, momentum=0.9, impl=impl)
    # Each member's state holds its group's statistics, so the state comes out mapped.
    run = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, 0))
    y, states = eqx.filter_jit(run)(x, state)
    for group in ([0, 2], [1, 3]):
        y_group, group_state = _run(plain, x[np.array(group)], plain_state)
        _assert_tight(y[np.array(group)], y_group)
        for ours, expected in zip(_running(bn, states), _running(plain, group_state), strict=True):
            for member in group:
                _assert_tight(ours[member], expected)

    def loss(layer, x):
        run = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, 0))
        return jnp.sum(jnp.sin(run(x, plain_state)[0]))

    grad = eqx.filter_jit(jax.grad(loss, argnums=1))
    expected = jnp.zeros_like(x)
    for group in ([0, 2], [1, 3]):
        expected = expected.at[np.array(group)].set(grad(plain, x[np.array(group)]))
    _assert_tight(grad(bn, x), expected)


def test_axis_index_groups_under_shard_map_and_functional():
    mesh = jax.make_mesh((8,), ("device",))
    x = _data(np.random.default_rng(13), (16, 3, 2))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

    def local(x):
        return eqxnorm.functional.batch_norm(x, axis_name="device", axis_index_groups=groups)[0]

    step = jax.shard_map(local, mesh=mesh, in_specs=P("device"), out_specs=P("device"))
    y = np.asarray(step(jax.device_put(x, NamedSharding(mesh, P("device")))))
    for half in (slice(0, 8), slice(8, 16)):
        _assert_tight(y[half], eqxnorm.functional.batch_norm(x[half])[0])
    with pytest.raises(ValueError, match=r"split the 4 members of axis_name='b'.*\[\[0, 1\]\]"):
        jax.vmap(
            lambda x: eqxnorm.functional.batch_norm(x, axis_name="b", axis_index_groups=[[0, 1]]),
            axis_name="b",
        )(x[:4])
    with pytest.raises(ValueError, match="`axis_index_groups` groups the members.*axis_name=None"):
        eqxnorm.functional.batch_norm(x, axis_index_groups=[[0]])
    with pytest.raises(TypeError, match="sequence of sequences of member indices"):
        eqxnorm.BatchNorm(3, "batch", axis_index_groups=[0, 1])


# --- PyTorch ---------------------------------------------------------------------------------


def test_matches_pytorch():
    torch = pytest.importorskip("torch")
    momentum, channels = 0.9, 3
    rng = np.random.default_rng(12)
    weight, bias = _random_params(rng, channels)
    ours, state = _make(channels, momentum=momentum)
    ours = _with_params(ours, weight, bias)
    last, last_state = _make(channels, momentum=0.0)
    theirs = torch.nn.BatchNorm2d(channels, eps=EPS, momentum=1 - momentum)
    theirs_last = torch.nn.BatchNorm2d(channels, eps=EPS, momentum=1.0)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(np.array(weight)))
        theirs.bias.copy_(torch.tensor(np.array(bias)))
    theirs.train()
    theirs_last.train()
    steps = 4
    for i in range(steps):
        x = _data(rng, (5, channels, 3, 4), loc=float(i), scale=1.0 + i)
        y, state = _run(ours, x, state)
        _, last_state = _run(last, x, last_state)
        with torch.no_grad():
            y_torch = theirs(torch.tensor(np.array(x))).numpy()
            theirs_last(torch.tensor(np.array(x)))
        oracle.assert_close(y, y_torch, jnp.float32)
    # Same variance convention: with momentum 0 / 1.0 both hold the last batch, unbiased.
    for ours_stat, torch_stat in zip(
        _running(last, last_state),
        (theirs_last.running_mean, theirs_last.running_var),
        strict=True,
    ):
        oracle.assert_close(ours_stat, torch_stat.numpy(), jnp.float32)
    # PyTorch's plain EMA starts from 0 and 1; ours is its debiased form.
    decay = momentum**steps
    running_mean, running_var = _running(ours, state)
    oracle.assert_close((1 - decay) * running_mean, theirs.running_mean.numpy(), jnp.float32)
    oracle.assert_close(decay + (1 - decay) * running_var, theirs.running_var.numpy(), jnp.float32)
    assert int(state.get(ours.count_index)) == int(theirs.num_batches_tracked) == steps


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eps=0.0), ValueError, r"`eps` must be a finite number greater than 0.*eps=0\.0"),
        (dict(eps=-1e-5), ValueError, r"greater than 0.*eps=-1e-05"),
        (dict(momentum=1.0), ValueError, r"`momentum` must lie in \[0, 1\).*momentum=1\.0"),
        (dict(momentum=-0.1), ValueError, r"`momentum` must lie in \[0, 1\).*momentum=-0\.1"),
        (dict(momentum="0.9"), TypeError, r"`momentum` must be a Python float.*'0\.9'"),
        (dict(mode="legacy"), ValueError, r"`mode` must be one of \('batch', 'ema'\).*'legacy'"),
        (dict(mode="train"), ValueError, r"`mode` must be one of .*mode='train'"),
        (dict(impl="cuda"), ValueError, r"`impl` must be one of .*impl='cuda'"),
        (dict(dtype=jnp.int32), TypeError, r"`dtype` must be a floating-point dtype.*int32"),
        (dict(input_size=0), ValueError, r"`input_size` must be at least 1.*input_size=0"),
        (dict(input_size=2.0), TypeError, r"`input_size` must be a Python int"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    kwargs = {"input_size": 3, "axis_name": "batch", **kwargs}
    with pytest.raises(error, match=match):
        eqxnorm.BatchNorm(**kwargs)


def test_bad_call_arguments():
    bn, state = _make(3)
    x = jnp.ones((4, 3, 5))
    with pytest.raises(ValueError, match=r"named axis 'batch', but no enclosing transformation"):
        bn(x[0], state)
    with pytest.raises(ValueError, match=r"axis 0 has size 5 instead of 3\. If x is a whole"):
        _run(bn, jnp.ones((4, 5, 3, 2)), state)
    with pytest.raises(ValueError, match=r"axis 0 has size 4 instead of 3.*whole batch.*vmap"):
        bn(x, state)
    with pytest.raises(ValueError, match=r"axis 0 has size 5 instead of 3.*channels are last"):
        _run(bn, jnp.ones((4, 5, 3)), state)
    with pytest.raises(ValueError, match=r"shape \(channels=3, \*spatial\).*got a scalar x"):
        jax.vmap(lambda x: bn(x, state), axis_name="batch")(jnp.ones(4))
    with pytest.raises(TypeError, match=r"floating-point dtype.*int32"):
        _run(bn, jnp.ones((4, 3, 5), jnp.int32), state)
    with pytest.raises(ValueError, match=r"more than one value per channel.*gives 1\b"):
        _run(bn, jnp.ones((1, 3)), state)
    with pytest.raises(ValueError, match=r"more than one value per channel.*gives 1\b"):
        _run(bn, jnp.ones((1, 3, 1, 1)), state)
    # Inference needs neither a bound axis nor more than one value.
    y, _ = bn(jnp.ones((3,)), state, inference=True)
    np.testing.assert_allclose(y, 1.0 / np.sqrt(1.0 + EPS), rtol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_pallas_matches_reference(mode):
    x = jax.random.normal(jax.random.key(1), (6, 5, 7)) + 2

    def build(impl):
        return _make(5, mode=mode, impl=impl)

    def run(layer_and_state, x):
        bn, state = layer_and_state
        y, state = _vmapped(bn, x, state)
        # Train a step, then run in inference with the updated running statistics.
        y_inference, _ = _vmapped(bn, x, state, inference=True)
        return jnp.concatenate([y, y_inference])

    ks.assert_impls_agree(build, run, x)
