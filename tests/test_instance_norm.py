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
from eqxnorm import GroupNorm, InstanceNorm, functional

# (channels, spatial, batch, channelwise_affine): every channel count, every spatial shape
# InstanceNorm accepts (at least one axis, more than one element), every batch size.
CASES = [
    (1, (37,), 1, True),
    (1, (3, 4, 5), 37, False),
    (3, (5, 7), 1, False),
    (3, (160,), 3, True),
    (32, (37,), 3, False),
    (32, (2, 1), 37, True),
    (64, (5, 7), 37, True),
    (64, (3, 4, 5), 3, False),
]


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


_instance_norm = jax.jit(functional.instance_norm, static_argnames=("eps", "impl"))


# --- Against the float64 oracle --------------------------------------------------------------


@pytest.mark.parametrize("channels,spatial,batch,affine", CASES)
def test_matches_oracle(channels, spatial, batch, affine):
    shape = (batch, channels, *spatial)
    norms = [InstanceNorm(channels, channelwise_affine=affine, dtype=d) for d in oracle.DTYPES]
    if affine:
        norms = [_with_params(norm, i) for i, norm in enumerate(norms)]
    xs = [_input(i, shape, d) for i, d in enumerate(oracle.DTYPES)]
    for dtype, norm, x, out in zip(oracle.DTYPES, norms, xs, _apply(norms, xs), strict=True):
        assert out.dtype == dtype and out.shape == shape
        expected = oracle.instance_norm(x, norm.weight, norm.bias, 1e-5)
        oracle.assert_close(out, expected, dtype)


@pytest.mark.parametrize(
    "shape,affine", [((2, 6, 2), True), ((3, 4, 37), False), ((1, 32, 5, 7), True)]
)
def test_functional_on_batched_arrays(shape, affine):
    x = _input(0, shape, jnp.float32)
    weight = _input(1, shape[1:2], jnp.float32, offset=1.0, scale=0.5) if affine else None
    bias = _input(2, shape[1:2], jnp.float32) if affine else None
    for impl in ("auto", "reference"):
        out = _instance_norm(x, weight, bias, eps=1e-3, impl=impl)
        oracle.assert_close(out, oracle.instance_norm(x, weight, bias, 1e-3))


def test_equals_group_norm_with_one_channel_per_group():
    instance = _with_params(InstanceNorm(6, channelwise_affine=True), 0)
    group = eqx.tree_at(
        lambda m: (m.weight, m.bias), GroupNorm(6, 6), (instance.weight, instance.bias)
    )
    x = _input(1, (2, 6, 5, 3), jnp.float32)
    out, expected = _apply([instance, group], [x, x])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@given(data=st.data())
def test_property_matches_oracle(data):
    channels = data.draw(st.integers(1, 8), label="channels")
    spatial = data.draw(
        st.lists(st.integers(1, 6), min_size=1, max_size=3).filter(lambda s: np.prod(s) > 1),
        label="spatial",
    )
    batch = data.draw(st.integers(1, 3), label="batch")
    dtype = data.draw(st.sampled_from(oracle.DTYPES), label="dtype")
    affine = data.draw(st.booleans(), label="channelwise_affine")
    param_dtype = data.draw(st.sampled_from([jnp.float32, dtype]), label="param dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    norm = InstanceNorm(channels, 1e-5, affine, param_dtype)
    if affine:
        norm = _with_params(norm, seed)
    x = _input(seed + 1, (batch, channels, *spatial), dtype)
    out = _vmap(norm, x)
    assert out.dtype == dtype
    oracle.assert_close(out, oracle.instance_norm(x, norm.weight, norm.bias, 1e-5), dtype)


def test_float64_and_gradients():
    with jax.enable_x64(True):
        norm = _with_params(InstanceNorm(3, channelwise_affine=True), 0)
        x = _input(1, (2, 3, 4, 2), jnp.float64)
        assert norm.weight.dtype == jnp.float64
        out = _vmap(norm, x)
        assert out.dtype == jnp.float64
        oracle.assert_close(out, oracle.instance_norm(x, norm.weight, norm.bias, 1e-5))

        @jax.jit
        def f(x, weight, bias):
            return jax.vmap(eqx.tree_at(lambda m: (m.weight, m.bias), norm, (weight, bias)))(x)

        check_grads(f, (x, norm.weight, norm.bias), order=1, modes=["rev"])


# --- Numerics ---------------------------------------------------------------------------------


def test_constant_input_gives_exactly_the_bias():
    # An awkward constant per channel, 37 values each.
    norms = [
        _with_params(InstanceNorm(3, channelwise_affine=True, dtype=d), i)
        for i, d in enumerate(oracle.DTYPES)
    ]
    constants = np.asarray([0.1, -1 / 3, 6e3])
    xs = [
        jnp.asarray(np.broadcast_to(constants[:, None], (2, 3, 37)).astype(d))
        for d in oracle.DTYPES
    ]
    for norm, out in zip(norms, _apply(norms, xs), strict=True):
        expected = np.broadcast_to(np.asarray(norm.bias)[:, None], (2, 3, 37))
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_large_mean_keeps_the_variance_accurate():
    # 1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 would lose every digit of the variance.
    x = _input(0, (3, 4, 50), jnp.float32, offset=1e4, scale=1.0)
    out = np.asarray(_vmap(InstanceNorm(4), x), np.float64)
    expected = oracle.instance_norm(x, None, None, 1e-5)
    np.testing.assert_allclose(out.var(axis=2), expected.var(axis=2), rtol=1e-5)
    # The mean is a float32 near 1e4, within one ulp (~1e-3) of the exact one: the output is
    # the oracle's shifted by that error times 1/std, and otherwise as accurate.
    shift = (out - expected).mean(axis=2, keepdims=True)
    np.testing.assert_allclose(out - shift, expected, rtol=1e-5, atol=1e-5)
    std = np.asarray(x, np.float64).std(axis=2, keepdims=True)
    assert np.all(np.abs(shift) * std <= 1.01 * np.spacing(np.float32(1e4)))


def test_nan_propagates_only_within_its_channel():
    norm = _with_params(InstanceNorm(4, channelwise_affine=True), 0)
    x = np.array(_input(1, (3, 4, 5, 2), jnp.float32))
    x[1, 2, 3, 0] = np.nan
    out = np.asarray(_vmap(norm, jnp.asarray(x)))
    poisoned = np.zeros(out.shape, bool)
    poisoned[1, 2] = True  # example 1, channel 2
    np.testing.assert_array_equal(np.isnan(out), poisoned)
    expected = oracle.instance_norm(x, norm.weight, norm.bias, 1e-5)
    oracle.assert_close(out[~poisoned], expected[~poisoned], jnp.float32)


# --- PyTorch semantics ----------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(37,), (5, 7), (3, 4, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_pytorch(spatial, affine):
    torch = pytest.importorskip("torch")
    cls = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}
    theirs = cls[len(spatial)](6, affine=affine)
    ours = InstanceNorm(6, channelwise_affine=affine)
    if affine:
        ours = _with_params(ours, 0)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(np.array(ours.weight)))
            theirs.bias.copy_(torch.from_numpy(np.array(ours.bias)))
    x = np.array(_input(1, (3, 6, *spatial), jnp.float32))
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        np.asarray(_vmap(ours, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5
    )


def test_pytorch_defaults():
    torch = pytest.importorskip("torch")
    theirs, ours = torch.nn.InstanceNorm2d(5), InstanceNorm(5)
    assert theirs.affine is False and ours.channelwise_affine is False
    assert ours.weight is None and ours.bias is None
    assert theirs.track_running_stats is False and jax.tree.leaves(ours) == []
    assert theirs.eps == ours.eps == 1e-5
    affine = InstanceNorm(5, channelwise_affine=True)
    torch_affine = torch.nn.InstanceNorm2d(5, affine=True)
    np.testing.assert_array_equal(np.asarray(affine.weight), torch_affine.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(affine.bias), torch_affine.bias.detach().numpy())


def test_single_spatial_element_refused_like_pytorch():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        torch.nn.InstanceNorm2d(3)(torch.ones(2, 3, 1, 1))
    with pytest.raises(ValueError, match="1 per channel, so every output would equal the bias"):
        InstanceNorm(3)(jnp.ones((3, 1, 1)))


# --- Contract: state, annotations, scope ----------------------------------------------------


def test_state_pass_through_and_key():
    _, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    norm = InstanceNorm(4)
    x = _input(0, (4, 3), jnp.float32)
    out = norm(x)
    out_state, new_state = norm(x, state, key=jax.random.key(0))
    assert new_state is state
    np.testing.assert_array_equal(np.asarray(out_state), np.asarray(out))
    oracle.assert_close(out, oracle.instance_norm(x[None], None, None, 1e-5)[0])


def test_numpy_input_and_parameters():
    ours = _with_params(InstanceNorm(4, channelwise_affine=True), 0)
    params = (np.asarray(ours.weight), np.asarray(ours.bias))
    numpy_params = eqx.tree_at(lambda m: (m.weight, m.bias), ours, params)
    x = np.asarray(_input(1, (4, 3), jnp.float32))
    out = numpy_params(x)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    oracle.assert_close(out, oracle.instance_norm(x[None], *params, 1e-5)[0])


def test_signature():
    params = inspect.signature(InstanceNorm.__init__).parameters
    assert [(p.name, p.default) for p in params.values()] == [
        ("self", inspect.Parameter.empty),
        ("channels", inspect.Parameter.empty),
        ("eps", 1e-5),
        ("channelwise_affine", False),
        ("dtype", None),
        ("impl", "auto"),
    ]
    assert params["impl"].kind is inspect.Parameter.KEYWORD_ONLY
    call = inspect.signature(InstanceNorm.__call__).parameters
    assert list(call) == ["self", "x", "state", "key", "mask"]
    assert call["key"].kind is call["mask"].kind is inspect.Parameter.KEYWORD_ONLY


def test_annotation_ties_x_to_channels():
    # Checked without the precheck, so the jaxtyping annotation itself is what is tested.
    checked = jaxtyped(typechecker=beartype)(inspect.unwrap(InstanceNorm.__call__))
    with pytest.raises(TypeCheckError, match="parameter 'x'"):
        checked(InstanceNorm(4), jnp.ones((6, 3)))
    assert checked(InstanceNorm(4), jnp.ones((4, 3))).shape == (4, 3)


def test_annotation_checks_the_return(monkeypatch):
    def wrong_shape(x, *args, **kwargs):
        return x[:, :-1]

    monkeypatch.setattr(
        eqxnorm._instance_norm, "functional", types.SimpleNamespace(_group_norm=wrong_shape)
    )
    with pytest.raises(TypeCheckError, match="return"):
        InstanceNorm(4)(jnp.ones((4, 3)))


def test_named_scope():
    norm = InstanceNorm(2)
    text = jax.jit(lambda m, x: m(x)).lower(norm, jnp.ones((2, 3))).as_text(debug_info=True)
    assert "eqxnorm.InstanceNorm" in text


def test_dtype_and_impl_fields():
    norm = InstanceNorm(3, channelwise_affine=True, dtype=jnp.bfloat16, impl="reference")
    assert norm.weight.dtype == norm.bias.dtype == jnp.bfloat16 and norm.impl == "reference"
    assert jax.tree.leaves(norm) == [norm.weight, norm.bias]
    with jax.enable_x64(True):
        assert InstanceNorm(3, channelwise_affine=True).weight.dtype == jnp.float64


# --- Bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((0,), {}, ValueError, r"`channels` must be at least 1, but got channels=0"),
        ((3.0,), {}, TypeError, r"`channels` must be a Python int, but got 3.0"),
        ((None,), {}, TypeError, r"`channels` must be a Python int, but got None"),
        (
            (3,),
            dict(eps=0.0),
            ValueError,
            r"`eps` must be a finite number greater than 0.*eps=0\.0",
        ),
        ((3,), dict(eps=-1.0), ValueError, r"greater than 0.*eps=-1\.0"),
        ((3,), dict(eps="1e-5"), TypeError, r"`eps` must be a real number"),
        ((3,), dict(impl="cuda"), ValueError, r"`impl` must be one of .*impl='cuda'"),
    ],
)
def test_bad_construction(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        InstanceNorm(*args, **kwargs)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (jnp.ones((4, 3), jnp.int32), TypeError, r"`x` must have a floating-point dtype.*int32"),
        (jnp.ones((4, 3), bool), TypeError, r"floating-point dtype.*bool"),
        (np.ones((4, 3), np.int64), TypeError, r"floating-point dtype.*int64"),
        (jnp.ones(()), ValueError, r"got a scalar \(x.shape=\(\)\)"),
        (jnp.ones((4,)), ValueError, r"at least one spatial axis, but got x.shape=\(4,\)"),
        (
            jnp.ones((4, 1)),
            ValueError,
            r"x.shape=\(4, 1\) has 1 per channel.*more than one spatial element",
        ),
        (jnp.ones((4, 1, 1, 1)), ValueError, r"x.shape=\(4, 1, 1, 1\) has 1 per channel"),
        (jnp.ones((4, 0, 3)), ValueError, r"x.shape=\(4, 0, 3\) has an empty axis"),
        (
            jnp.ones((3, 5)),
            ValueError,
            r"channels=4.*x.shape=\(3, 5\), whose axis 0 has size 3\. "
            r"Construct the layer with channels=3",
        ),
        (
            jnp.ones((8, 4, 5)),
            ValueError,
            r"x.shape=\(8, 4, 5\), whose axis 1 holds the 4 channels.*`jax.vmap\(norm\)\(x\)`",
        ),
    ],
)
def test_bad_call(x, error, match):
    with pytest.raises(error, match=match):
        InstanceNorm(4)(x)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (
            (jnp.ones((4, 5)),),
            {},
            ValueError,
            r"x.shape=\(4, 5\) has 1 spatial element\(s\) per channel",
        ),
        ((jnp.ones((4,)),), {}, ValueError, r"expects x of shape \(batch, channels, \*spatial\)"),
        ((jnp.ones((2, 4, 1, 1)),), {}, ValueError, r"has 1 spatial element\(s\).*PyTorch refuses"),
        (
            (jnp.ones((2, 4, 3), jnp.float16), jnp.ones(3)),
            {},
            ValueError,
            r"`weight` must have shape \(4,\)",
        ),
        (
            (jnp.ones((2, 4, 3)), None, jnp.ones((4, 1))),
            {},
            ValueError,
            r"`bias` must have shape \(4,\)",
        ),
        ((jnp.ones((2, 4, 3), jnp.int32),), {}, TypeError, r"floating-point dtype.*int32"),
        ((jnp.ones((2, 4, 3)),), dict(eps=0.0), ValueError, r"`eps` must be a finite number"),
        (
            (jnp.ones((2, 4, 3)),),
            dict(impl="cuda"),
            ValueError,
            r"`impl` must be one of \('auto', 'pallas', 'reference', 'triton', 'mosaic_gpu'\), "
            r"but got impl='cuda'",
        ),
    ],
)
def test_bad_functional_call(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        functional.instance_norm(*args, **kwargs)


def test_pallas_matches_reference():
    x = jax.random.normal(jax.random.key(1), (3, 4, 9)) + 2

    def build(impl):
        layer = eqxnorm.InstanceNorm(4, channelwise_affine=True, impl=impl)
        return eqx.tree_at(lambda m: m.weight, layer, jnp.linspace(0.5, 1.5, 4))

    ks.assert_impls_agree(build, lambda layer, x: jax.vmap(layer)(x), x)
