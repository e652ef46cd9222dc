import dataclasses
import inspect
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from hypothesis import given, strategies as st
from jax.test_util import check_grads
from jaxtyping import TypeCheckError, jaxtyped

import eqxnorm
import kernel_support as ks
import oracle
from eqxnorm import GroupNorm, functional

# (channels, groups, spatial, batch): every channel count with groups=1 and groups=channels,
# every spatial shape twice, every batch size four times.
CASES = [
    (1, 1, (), 3),
    (1, 1, (37,), 37),
    (1, 1, (3, 4, 5), 1),
    (3, 3, (), 37),
    (3, 1, (1,), 1),
    (3, 3, (5, 7), 3),
    (32, 32, (1,), 3),
    (32, 8, (37,), 1),
    (32, 1, (160,), 37),
    (64, 64, (5, 7), 37),
    (64, 4, (3, 4, 5), 3),
    (64, 1, (160,), 1),
]


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _input(seed, shape, dtype, offset=0.5, scale=2.0):
    """Random input built on the host (no compile per shape), rounded to `dtype`."""
    x = scale * np.random.default_rng(seed).standard_normal(shape) + offset
    return jnp.asarray(x.astype(dtype))


def _with_params(norm, seed):
    """`norm` with random weight (around 1) and bias, in the parameters' dtype."""
    rng = np.random.default_rng(seed)
    shape, dtype = norm.weight.shape, norm.weight.dtype
    weight = jnp.asarray((1 + 0.5 * rng.standard_normal(shape)).astype(dtype))
    bias = jnp.asarray(rng.standard_normal(shape).astype(dtype))
    return eqx.tree_at(lambda m: (m.weight, m.bias), norm, (weight, bias))


# Everything runs jitted: one XLA compile per test instead of one per primitive.
@eqx.filter_jit
def _apply(norms, xs):
    return [jax.vmap(norm)(x) for norm, x in zip(norms, xs, strict=True)]


def _vmap(norm, x):
    return _apply([norm], [x])[0]


_group_norm = jax.jit(functional.group_norm, static_argnames=("groups", "eps", "impl"))


# --- Against the float64 oracle --------------------------------------------------------------


@pytest.mark.parametrize("channels,groups,spatial,batch", CASES)
def test_matches_oracle(channels, groups, spatial, batch):
    shape = (batch, channels, *spatial)
    norms = [
        _with_params(GroupNorm(groups, channels, dtype=d), i) for i, d in enumerate(oracle.DTYPES)
    ]
    xs = [_input(i, shape, d) for i, d in enumerate(oracle.DTYPES)]
    for dtype, norm, x, out in zip(oracle.DTYPES, norms, xs, _apply(norms, xs), strict=True):
        assert out.dtype == dtype and out.shape == shape
        expected = oracle.group_norm(x, groups, norm.weight, norm.bias, 1e-5)
        oracle.assert_close(out, expected, dtype)


def test_inferred_channels_without_affine():
    norms = [GroupNorm(g, channelwise_affine=False) for g in (2, 3, 8)]
    assert all(n.weight is None and n.bias is None and n.channels is None for n in norms)
    xs = [_input(0, (5, 4), jnp.float32), _input(1, (3, 6, 37), jnp.float32)]
    xs.append(_input(2, (2, 8, 3, 4, 5), jnp.float32))
    for norm, x, out in zip(norms, xs, _apply(norms, xs), strict=True):
        oracle.assert_close(out, oracle.group_norm(x, norm.groups, None, None, 1e-5))


@pytest.mark.parametrize(
    "shape,groups,affine",
    [
        ((2, 6), 3, True),
        ((3, 4, 37), 1, False),
        ((1, 32, 5, 7), 8, True),
        ((2, 8, 3, 4, 5), 8, True),
    ],
)
def test_functional_on_batched_arrays(shape, groups, affine):
    x = _input(0, shape, jnp.float32)
    weight = _input(1, shape[1:2], jnp.float32, offset=1.0, scale=0.5) if affine else None
    bias = _input(2, shape[1:2], jnp.float32) if affine else None
    for impl in ("auto", "reference"):
        out = _group_norm(x, groups, weight, bias, eps=1e-3, impl=impl)
        oracle.assert_close(out, oracle.group_norm(x, groups, weight, bias, 1e-3))


def test_functional_empty_batch():
    assert _group_norm(jnp.ones((0, 4, 3)), 2).shape == (0, 4, 3)


@given(data=st.data())
def test_property_matches_oracle(data):
    channels = data.draw(st.integers(1, 12), label="channels")
    groups = data.draw(st.sampled_from(_divisors(channels)), label="groups")
    spatial = tuple(data.draw(st.lists(st.integers(1, 6), max_size=3), label="spatial"))
    batch = data.draw(st.integers(1, 3), label="batch")
    dtype = data.draw(st.sampled_from(oracle.DTYPES), label="dtype")
    affine = data.draw(st.booleans(), label="channelwise_affine")
    param_dtype = data.draw(st.sampled_from([jnp.float32, dtype]), label="param dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    norm = GroupNorm(groups, channels if affine else None, 1e-5, affine, param_dtype)
    if affine:
        norm = _with_params(norm, seed)
    x = _input(seed + 1, (batch, channels, *spatial), dtype)
    out = _vmap(norm, x)
    assert out.dtype == dtype
    oracle.assert_close(out, oracle.group_norm(x, groups, norm.weight, norm.bias, 1e-5), dtype)


def test_float64_and_gradients():
    with jax.enable_x64(True):
        norm = _with_params(GroupNorm(3, 6), 0)
        x = _input(1, (2, 6, 5), jnp.float64)
        assert norm.weight.dtype == jnp.float64
        out = _vmap(norm, x)
        assert out.dtype == jnp.float64
        oracle.assert_close(out, oracle.group_norm(x, 3, norm.weight, norm.bias, 1e-5))

        @jax.jit
        def f(x, weight, bias):
            return jax.vmap(eqx.tree_at(lambda m: (m.weight, m.bias), norm, (weight, bias)))(x)

        check_grads(f, (x, norm.weight, norm.bias), order=1, modes=["rev"])


# --- Numerics ---------------------------------------------------------------------------------


def test_constant_input_gives_exactly_the_bias():
    # A different awkward constant per group (channels 0-1, 2-3, 4-5), 2 * 37 values each.
    norms = [_with_params(GroupNorm(3, 6, dtype=d), i) for i, d in enumerate(oracle.DTYPES)]
    constants = np.repeat(np.asarray([0.1, -1 / 3, 6e3]), 2)
    xs = [
        jnp.asarray(np.broadcast_to(constants[:, None], (2, 6, 37)).astype(d))
        for d in oracle.DTYPES
    ]
    for norm, out in zip(norms, _apply(norms, xs), strict=True):
        expected = np.broadcast_to(np.asarray(norm.bias)[:, None], (2, 6, 37))
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_large_mean_keeps_the_variance_accurate():
    # 1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 would lose every digit of the variance.
    x = _input(0, (3, 4, 50), jnp.float32, offset=1e4, scale=1.0)
    out = np.asarray(_vmap(GroupNorm(2, 4, channelwise_affine=False), x), np.float64)
    out = out.reshape(3, 2, 100)
    expected = oracle.group_norm(x, 2, None, None, 1e-5).reshape(3, 2, 100)
    np.testing.assert_allclose(out.var(axis=2), expected.var(axis=2), rtol=1e-5)
    # The mean is a float32 near 1e4, within one ulp (~1e-3) of the exact one: the output is
    # the oracle's shifted by that error times 1/std, and otherwise as accurate.
    shift = (out - expected).mean(axis=2, keepdims=True)
    np.testing.assert_allclose(out - shift, expected, rtol=1e-5, atol=1e-5)
    std = np.asarray(x, np.float64).reshape(3, 2, 100).std(axis=2, keepdims=True)
    assert np.all(np.abs(shift) * std <= 1.01 * np.spacing(np.float32(1e4)))


def test_nan_propagates_only_within_its_group():
    norm = _with_params(GroupNorm(3, 6), 0)
    x = np.array(_input(1, (3, 6, 5), jnp.float32))
    x[1, 2, 3] = np.nan
    out = np.asarray(_vmap(norm, jnp.asarray(x)))
    poisoned = np.zeros(out.shape, bool)
    poisoned[1, 2:4] = True  # example 1, group 1 = channels 2 and 3
    np.testing.assert_array_equal(np.isnan(out), poisoned)
    expected = oracle.group_norm(x, 3, norm.weight, norm.bias, 1e-5)
    oracle.assert_close(out[~poisoned], expected[~poisoned], jnp.float32)


# --- Drop-in for eqx.nn.GroupNorm ---------------------------------------------------------


DROP_IN_ARGS = [
    dict(groups=2, channels=4),
    dict(groups=3, channels=6, channelwise_affine=False),
    dict(groups=2, channelwise_affine=False),
    dict(groups=4, channels=8, eps=1e-3, dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("kwargs", DROP_IN_ARGS)
def test_drop_in_parameters(kwargs):
    ours, theirs = GroupNorm(**kwargs), eqx.nn.GroupNorm(**kwargs)
    for field in dataclasses.fields(eqx.nn.GroupNorm):
        a, b = getattr(ours, field.name), getattr(theirs, field.name)
        if eqx.is_array(b):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), field.name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            assert a == b, field.name
    leaves = [(x.shape, x.dtype) for x in jax.tree.leaves(ours)]
    assert leaves == [(x.shape, x.dtype) for x in jax.tree.leaves(theirs)]


def test_drop_in_positional_arguments_and_x64_default():
    ours = GroupNorm(2, 4, 1e-3, True, jnp.float16)
    theirs = eqx.nn.GroupNorm(2, 4, 1e-3, True, jnp.float16)
    assert (ours.groups, ours.channels, ours.eps, ours.channelwise_affine) == (2, 4, 1e-3, True)
    assert ours.weight.dtype == theirs.weight.dtype == jnp.float16
    with jax.enable_x64(True):
        assert GroupNorm(2, 4).bias.dtype == eqx.nn.GroupNorm(2, 4).bias.dtype == jnp.float64


def test_drop_in_signatures():
    def params(fn, drop=()):
        sig = inspect.signature(fn)
        return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name not in drop]

    assert params(GroupNorm.__init__, drop=("impl",)) == params(eqx.nn.GroupNorm.__init__)
    assert [(n, k) for n, k, _ in params(GroupNorm.__call__, drop=("mask",))] == [
        (n, k) for n, k, _ in params(eqx.nn.GroupNorm.__call__)
    ]


@eqx.filter_jit
def _both(ours, theirs, x, key):
    return ours(x), theirs(x), ours(x, key=key), theirs(x, key=key)


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(groups=2, channels=4), (4, 5, 7)),
        (dict(groups=6, channels=6), (6,)),
        (dict(groups=4, channels=8, eps=1e-3), (8, 3, 4, 5)),
        (dict(groups=3, channelwise_affine=False), (9, 11)),
    ],
)
def test_drop_in_same_output(kwargs, shape):
    ours = GroupNorm(**kwargs)
    if ours.channelwise_affine:
        ours = _with_params(ours, 0)
    theirs = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        eqx.nn.GroupNorm(**kwargs),
        (ours.weight, ours.bias),
        is_leaf=lambda v: v is None,
    )
    out, expected, out_key, expected_key = _both(
        ours, theirs, _input(1, shape, jnp.float32), jax.random.key(0)
    )
    oracle.assert_close(out, expected)
    oracle.assert_close(out_key, expected_key)


def test_drop_in_state_pass_through():
    _, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    x = _input(0, (4, 3), jnp.float32)
    ours = GroupNorm(2, 4)
    out, out_state = ours(x, state)
    expected, expected_state = eqx.nn.GroupNorm(2, 4)(x, state)
    assert out_state is state and expected_state is state
    oracle.assert_close(out, expected)
    oracle.assert_close(ours(x, state, key=jax.random.key(1))[0], expected)


def test_drop_in_numpy_input_and_parameters():
    # eqx.nn.GroupNorm takes NumPy arrays, as input and as parameters alike.
    ours = _with_params(GroupNorm(2, 4), 0)
    params = (np.asarray(ours.weight), np.asarray(ours.bias))
    numpy_params = eqx.tree_at(lambda m: (m.weight, m.bias), ours, params)
    x = np.asarray(_input(1, (4, 3), jnp.float32))
    out = numpy_params(x)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    oracle.assert_close(out, oracle.group_norm(x[None], 2, *params, 1e-5)[0])
    oracle.assert_close(out, eqx.nn.GroupNorm(2, 4)(x) * params[0][:, None] + params[1][:, None])


# --- Contract: annotations, scope, state ----------------------------------------------------


def test_annotation_ties_x_to_channels():
    # Checked without the precheck, so the jaxtyping annotation itself is what is tested.
    checked = jaxtyped(typechecker=beartype)(inspect.unwrap(GroupNorm.__call__))
    with pytest.raises(TypeCheckError, match="parameter 'x'"):
        checked(GroupNorm(2, 4), jnp.ones((6, 3)))
    assert checked(GroupNorm(2, 4), jnp.ones((4, 3))).shape == (4, 3)
    # channels=None falls back to "channels *spatial": any channel count is accepted.
    assert checked(GroupNorm(2, channelwise_affine=False), jnp.ones((6, 3))).shape == (6, 3)


def test_annotation_checks_the_return(monkeypatch):
    def wrong_shape(x, *args, **kwargs):
        return x[:, :-1]

    monkeypatch.setattr(
        eqxnorm._group_norm, "functional", types.SimpleNamespace(_group_norm=wrong_shape)
    )
    with pytest.raises(TypeCheckError, match="return"):
        GroupNorm(2, 4)(jnp.ones((4, 3)))


def test_named_scope():
    norm = GroupNorm(2, 4)
    text = jax.jit(lambda m, x: m(x)).lower(norm, jnp.ones((4, 3))).as_text(debug_info=True)
    assert "eqxnorm.GroupNorm" in text


def test_impl_is_a_static_field():
    norm = GroupNorm(2, 4, impl="reference")
    assert norm.impl == "reference" and jax.tree.leaves(norm) == [norm.weight, norm.bias]
    x = _input(0, (1, 4, 10), jnp.float32)
    oracle.assert_close(_vmap(norm, x), oracle.group_norm(x, 2, norm.weight, norm.bias, 1e-5))


# --- Bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(groups=5, channels=32),
            ValueError,
            r"groups=5 must divide channels=32.*1, 2, 4, 8, 16, 32\.",
        ),
        (dict(groups=2), ValueError, r"channelwise_affine=True needs .* channels=None"),
        (dict(groups=0, channels=4), ValueError, r"`groups` must be at least 1, but got groups=0"),
        (
            dict(groups=-2, channels=4),
            ValueError,
            r"`groups` must be at least 1, but got groups=-2",
        ),
        (dict(groups=2.0, channels=4), TypeError, r"`groups` must be a Python int, but got 2.0"),
        (dict(groups=True, channels=4), TypeError, r"`groups` must be a Python int, but got True"),
        (dict(groups=1, channels=0), ValueError, r"`channels` must be at least 1"),
        (
            dict(groups=2, channels=4, eps=0.0),
            ValueError,
            r"`eps` must be a finite number greater than 0.*eps=0\.0",
        ),
        (dict(groups=2, channels=4, eps=-1e-5), ValueError, r"greater than 0.*eps=-1e-05"),
        (dict(groups=2, channels=4, eps=float("nan")), ValueError, r"eps=nan"),
        (
            dict(groups=2, channels=4, impl="cuda"),
            ValueError,
            r"`impl` must be one of .*impl='cuda'",
        ),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GroupNorm(**kwargs)


@pytest.mark.parametrize(
    "norm,x,error,match",
    [
        (
            GroupNorm(2, 4),
            jnp.ones((4, 3), jnp.int32),
            TypeError,
            r"`x` must have a floating-point dtype.*int32",
        ),
        (GroupNorm(2, 4), jnp.ones((4, 3), bool), TypeError, r"floating-point dtype.*bool"),
        (GroupNorm(2, 4), [[1.0]] * 4, TypeError, r"`x` must be a JAX array.*list"),
        (GroupNorm(2, 4), jnp.ones(()), ValueError, r"got a scalar \(x.shape=\(\)\)"),
        (
            GroupNorm(2, 4),
            jnp.ones((6, 3)),
            ValueError,
            r"channels=4.*x.shape=\(6, 3\), whose axis 0 has size 6\. "
            r"Construct the layer with channels=6",
        ),
        (
            GroupNorm(2, 4),
            jnp.ones((8, 4, 3)),
            ValueError,
            r"x.shape=\(8, 4, 3\), whose axis 1 holds the 4 channels.*`jax.vmap\(norm\)\(x\)`",
        ),
        (
            GroupNorm(2, 4),
            jnp.ones((2, 4)),
            ValueError,
            r"whose axis 1 holds the 4 channels.*jax.vmap",
        ),
        (GroupNorm(2, 4), jnp.ones((4, 0)), ValueError, r"x.shape=\(4, 0\) has an empty axis"),
        (
            GroupNorm(3, channelwise_affine=False),
            jnp.ones((4,)),
            ValueError,
            r"channels=4, which groups=3 does not divide.*1, 2, 4\.$",
        ),
        (
            GroupNorm(3, channelwise_affine=False),
            jnp.ones((8, 6)),
            ValueError,
            r"channels=8, which groups=3 does not divide.*1, 2, 4, 8\. "
            r"If axis 0 is a batch axis.*jax.vmap",
        ),
        (GroupNorm(1, channelwise_affine=False), jnp.ones((0, 3)), ValueError, r"empty axis"),
    ],
)
def test_bad_call(norm, x, error, match):
    with pytest.raises(error, match=match):
        norm(x)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (
            (jnp.ones((4,)), 2),
            {},
            ValueError,
            r"expects x of shape \(batch, channels, \*spatial\).*x\[None\]",
        ),
        (
            (jnp.ones((1, 6, 3)), 4),
            {},
            ValueError,
            r"groups=4 must divide .*channels=6.*1, 2, 3, 6\.",
        ),
        ((jnp.ones((1, 6, 3)), 0), {}, ValueError, r"`groups` must be at least 1"),
        ((jnp.ones((1, 6, 3), jnp.int32), 2), {}, TypeError, r"floating-point dtype.*int32"),
        ((jnp.ones((1, 6, 0)), 2), {}, ValueError, r"empty channel or spatial axis"),
        (
            (jnp.ones((1, 6, 3)), 2, jnp.ones(4)),
            {},
            ValueError,
            r"`weight` must have shape \(6,\).*\(4,\)",
        ),
        (
            (jnp.ones((1, 6, 3)), 2, None, jnp.ones(5)),
            {},
            ValueError,
            r"`bias` must have shape \(6,\).*\(5,\)",
        ),
        ((jnp.ones((1, 6, 3)), 2), dict(eps=0.0), ValueError, r"`eps` must be a finite number"),
        (
            (jnp.ones((1, 6, 3)), 2),
            dict(impl="cuda"),
            ValueError,
            r"`impl` must be one of \('auto', 'pallas', 'reference', 'triton', 'mosaic_gpu'\), "
            r"but got impl='cuda'",
        ),
    ],
)
def test_bad_functional_call(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        functional.group_norm(*args, **kwargs)


def test_pallas_matches_reference():
    x = jax.random.normal(jax.random.key(1), (4, 6, 5, 7)) + 2

    def build(impl):
        layer = eqxnorm.GroupNorm(3, 6, impl=impl)
        return eqx.tree_at(lambda m: m.weight, layer, jnp.linspace(0.5, 1.5, 6))

    ks.assert_impls_agree(build, lambda layer, x: jax.vmap(layer)(x), x)


def test_channels_last_input_is_named():
    norm = eqxnorm.GroupNorm(3, 3)
    with pytest.raises(ValueError, match=r"x.shape=\(12, 12, 3\).*channels-last.*moveaxis"):
        norm(jnp.ones((12, 12, 3)))


def test_vmap_lowers_without_a_unit_batch_axis():
    """One example reaches the reference as it is: `jax.vmap(GroupNorm)` lowers to the
    batched view `(batch, groups, channels/groups, spatial)`, not `(batch, 1, ...)`, which
    XLA's CPU backend reduces several times slower, and equals the batched call."""
    norm = GroupNorm(2, 4)
    x = _input(0, (5, 4, 6), jnp.float32)
    text = jax.jit(jax.vmap(norm)).lower(x).as_text()
    assert "5x2x2x6xf32" in text and "5x1x" not in text
    expected = eqxnorm.functional.group_norm(x, 2, norm.weight, norm.bias)
    np.testing.assert_allclose(jax.vmap(norm)(x), expected, rtol=1e-6, atol=1e-6)
