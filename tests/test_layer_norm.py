"""`eqxnorm.LayerNorm` against the float64 oracle, `eqx.nn.LayerNorm` and `torch.nn.LayerNorm`."""

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
    """Random (non-trivial) weight and bias, so drop-in comparisons test the affine part."""
    key_w, key_b = jr.split(jr.key(seed))
    return eqx.tree_at(
        lambda m: (m.weight, m.bias),
        layer,
        (
            1 + 0.5 * jr.normal(key_w, layer.weight.shape, layer.weight.dtype),
            jr.normal(key_b, layer.bias.shape, layer.bias.dtype),
        ),
    )


@pytest.mark.parametrize("dtype", oracle.DTYPES, ids=lambda d: jnp.dtype(d).name)
# Every shape at a batch of 37, and a batch of one (the batch is `vmap`'s axis, the same
# program at any size).
@pytest.mark.parametrize(
    "batch,shape", [(37, 1), (37, 3), (37, 160), (37, (3, 5)), (37, (2, 3, 4)), (1, (2, 3, 4))]
)
def test_matches_oracle(batch, shape, dtype):
    layer = _randomize(eqxnorm.LayerNorm(shape))
    x = jr.normal(jr.key(1), (batch, *layer.shape)).astype(dtype) + 2
    y = jax.jit(jax.vmap(layer))(x)
    assert y.dtype == dtype and y.shape == x.shape
    oracle.assert_close(y, oracle.layer_norm(x, layer.weight, layer.bias, 1e-5, len(layer.shape)))


@pytest.mark.parametrize("use_weight,use_bias", [(True, False), (False, True), (False, False)])
def test_optional_affine(use_weight, use_bias):
    layer = eqxnorm.LayerNorm(6, use_weight=use_weight, use_bias=use_bias)
    assert (layer.weight is None) != use_weight and (layer.bias is None) != use_bias
    x = jr.normal(jr.key(0), (6,))
    oracle.assert_close(layer(x), oracle.layer_norm(x, layer.weight, layer.bias, 1e-5))


def test_drop_in_for_eqx():
    ours = _randomize(eqxnorm.LayerNorm((3, 4), eps=1e-3, dtype=jnp.float32))
    theirs = eqx.nn.LayerNorm((3, 4), eps=1e-3, dtype=jnp.float32)
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (ours.weight, ours.bias))
    for name in ("shape", "eps", "use_weight", "use_bias"):
        assert getattr(ours, name) == getattr(theirs, name)
    fresh = eqxnorm.LayerNorm((3, 4))
    reference = eqx.nn.LayerNorm((3, 4))
    for name in ("weight", "bias"):
        a, b = getattr(fresh, name), getattr(reference, name)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    x = jr.normal(jr.key(2), (5, 3, 4)) * 3 + 1
    np.testing.assert_allclose(jax.vmap(ours)(x), jax.vmap(theirs)(x), rtol=1e-5, atol=1e-5)
    # Same call conventions: `key` is accepted, `state` is passed through.
    state = eqx.nn.State(eqx.nn.BatchNorm(3, "b", mode="batch"))
    y, same_state = ours(x[0], state, key=jr.key(0))
    assert same_state is state
    np.testing.assert_allclose(y, theirs(x[0]), rtol=1e-5, atol=1e-5)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    ours = _randomize(eqxnorm.LayerNorm((4, 6)))
    theirs = torch.nn.LayerNorm((4, 6))
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(np.asarray(ours.weight)))
        theirs.bias.copy_(torch.tensor(np.asarray(ours.bias)))
    x = np.random.default_rng(0).normal(size=(7, 4, 6)).astype(np.float32)
    expected = theirs(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(jax.vmap(ours)(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_gradients_float64():
    with jax.enable_x64(True):
        layer = _randomize(eqxnorm.LayerNorm((3, 5)))
        x = jr.normal(jr.key(3), (2, 3, 5), jnp.float64)

        def f(x, weight, bias):
            layer_ = eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, bias))
            return jax.vmap(layer_)(x)

        check_grads(f, (x, layer.weight, layer.bias), order=1, modes=["rev"])


def test_transformations():
    layer = _randomize(eqxnorm.LayerNorm(8))
    x = jr.normal(jr.key(4), (2, 3, 8))
    expected = oracle.layer_norm(x, layer.weight, layer.bias, 1e-5)
    oracle.assert_close(jax.jit(jax.vmap(jax.vmap(layer)))(x), expected)
    loss = eqx.filter_jit(eqx.filter_grad(lambda m, x: jnp.sum(jax.vmap(m)(x[0]) ** 2)))
    grads = loss(layer, x)
    assert grads.weight.shape == (8,) and np.isfinite(np.asarray(grads.weight)).all()


def test_low_precision_input_with_float32_parameters():
    layer = _randomize(eqxnorm.LayerNorm(160))
    x = jr.normal(jr.key(5), (160,)).astype(jnp.bfloat16)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    oracle.assert_close(y, oracle.layer_norm(x, layer.weight, layer.bias, 1e-5))


def test_shape_errors_name_axes_and_suggest_vmap():
    layer = eqxnorm.LayerNorm(4)
    with pytest.raises(ValueError, match=r"axis 0 \(dim\) has size 5 but 4 is expected"):
        layer(jnp.ones(5))
    with pytest.raises(ValueError, match=r"x.shape=\(3, 4\).*jax.vmap\(norm\)\(x\)"):
        layer(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"rank 2 with shape \(shape\[0\]=2, shape\[1\]=3\)"):
        eqxnorm.LayerNorm((2, 3))(jnp.ones(6))
    with pytest.raises(ValueError, match="axis 1"):
        eqx.filter_jit(eqxnorm.LayerNorm((2, 3)))(jnp.ones((2, 4)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_floating_input(dtype):
    with pytest.raises(TypeError, match=f"dtype {jnp.dtype(dtype).name}.*astype"):
        eqxnorm.LayerNorm(4)(jnp.ones(4, dtype))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"eps=0.*eps=1e-5"):
        eqxnorm.LayerNorm(4, eps=0.0)
    with pytest.raises(ValueError, match=r"eps=-1"):
        eqxnorm.LayerNorm(4, eps=-1)
    with pytest.raises(ValueError, match=r"at least one element.*shape=\(3, 0\)"):
        eqxnorm.LayerNorm((3, 0))
    with pytest.raises(TypeError, match="sequence of ints"):
        eqxnorm.LayerNorm("4")
    with pytest.raises(
        ValueError,
        match=r"one of \('auto', 'pallas', 'reference', 'triton', 'mosaic_gpu'\), "
        r"but got impl='cuda'",
    ):
        eqxnorm.LayerNorm(4, impl="cuda")
    assert eqxnorm.LayerNorm(4, impl="pallas").impl == "pallas"


def test_scalar_shape_gives_the_bias():
    layer = _randomize(eqxnorm.LayerNorm(()))
    np.testing.assert_array_equal(layer(jnp.asarray(3.0)), layer.bias)


def test_named_scope_in_lowered_program():
    for layer in (eqxnorm.LayerNorm(8), eqxnorm.RMSNorm(8)):
        lowered = jax.jit(lambda m, x: m(x)).lower(layer, jnp.ones(8))
        text = lowered.as_text(debug_info=True)
        assert f"eqxnorm.{type(layer).__name__}" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_pallas_matches_reference(dtype):
    x = jr.normal(jr.key(1), (37, 3, 40)).astype(dtype) + 2

    def build(impl):
        return _randomize(eqxnorm.LayerNorm((3, 40), dtype=dtype, impl=impl))

    ks.assert_impls_agree(build, lambda layer, x: jax.vmap(layer)(x), x)


# --- the fused residual add (`add_and_norm`, shared by LayerNorm and RMSNorm) ----------------


@pytest.mark.parametrize(
    "x_dtype,r_dtype",
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float16)],
    ids=lambda d: jnp.dtype(d).name,
)
@pytest.mark.parametrize("cls,op", [("LayerNorm", "layer_norm"), ("RMSNorm", "rms_norm")])
def test_add_and_norm_matches_oracle(cls, op, x_dtype, r_dtype):
    layer = _randomize(getattr(eqxnorm, cls)((3, 8)))
    x = jr.normal(jr.key(1), (5, 3, 8)).astype(x_dtype)
    residual = (jr.normal(jr.key(2), (5, 3, 8)) * 4 + 1).astype(r_dtype)
    y, h = jax.jit(jax.vmap(layer.add_and_norm))(x, residual)
    assert y.dtype == x_dtype and h.dtype == r_dtype and y.shape == h.shape == x.shape
    norm = getattr(oracle, op)
    y_np, h_np = oracle.add_norm(
        lambda h, w, b, eps: norm(h, w, b, eps, 2), x, residual, layer.weight, layer.bias, 1e-5
    )
    np.testing.assert_array_equal(np.asarray(h, np.float64), h_np)
    oracle.assert_close(y, y_np)
    # y is the norm of the stored h: the unfused sequence, up to float32 summation order.
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(jax.vmap(layer)(h).astype(x_dtype), np.float32),
        rtol=2e-6,
        atol=2e-6,
    )


def test_add_and_norm_gradients():
    """Gradients through both outputs, as a pre-norm block uses them, against the unfused
    sequence; and float64 finite differences."""
    layer = _randomize(eqxnorm.LayerNorm(16))
    x, residual = jr.normal(jr.key(1), (4, 16)), jr.normal(jr.key(2), (4, 16))
    ct_y, ct_h = jr.normal(jr.key(3), (4, 16)), jr.normal(jr.key(4), (4, 16))

    def fused(layer, x, residual):
        y, h = jax.vmap(layer.add_and_norm)(x, residual)
        return jnp.sum(y * ct_y) + jnp.sum(h * ct_h)

    def unfused(layer, x, residual):
        h = x + residual
        return jnp.sum(jax.vmap(layer)(h) * ct_y) + jnp.sum(h * ct_h)

    g = eqx.filter_grad(fused)(layer, x, residual)
    g_ref = eqx.filter_grad(unfused)(layer, x, residual)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with jax.enable_x64(True):
        layer64 = eqxnorm.RMSNorm(6, dtype=jnp.float64)
        args = tuple(jr.normal(jr.key(i), (3, 6), jnp.float64) for i in range(2))
        check_grads(
            lambda x, r: jax.vmap(layer64.add_and_norm)(jnp.asarray(x), jnp.asarray(r)),
            args,
            order=1,
            modes=["rev"],
        )


def test_add_and_norm_errors():
    layer = eqxnorm.LayerNorm(8)
    with pytest.raises(ValueError, match=r"residual.shape=\(4,\)"):
        layer.add_and_norm(jnp.ones(8), jnp.ones(4))
    with pytest.raises(ValueError, match="jax.vmap"):
        layer.add_and_norm(jnp.ones((2, 8)), jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="floating"):
        layer.add_and_norm(jnp.ones(8), jnp.ones(8, jnp.int32))


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_add_and_norm_pallas_matches_reference(cls):
    residual = jr.normal(jr.key(5), (37, 160))
    ks.assert_impls_agree(
        lambda impl: _randomize(getattr(eqxnorm, cls)(160, impl=impl)),
        lambda layer, x: jax.vmap(layer.add_and_norm)(x, residual)[0],
        jr.normal(jr.key(6), (37, 160)),
    )


@pytest.mark.parametrize("cls", [eqxnorm.LayerNorm, eqxnorm.RMSNorm])
def test_vmap_is_the_batched_call_without_a_unit_axis(cls):
    """`jax.vmap(layer)` lowers to what the batched functional call does: no unit axis
    (`(rows, 1, dim)` reductions ran ~2.5-20x slower on XLA's CPU backend), and its gradient
    equals the functional one. 4096x1024 with the layer closed over (its weight a constant)
    is the size at which one tangent's fusion crashed XLA's CPU backend."""
    norm = cls(1024)
    x = jr.normal(jr.key(0), (4096, 1024))

    def module(x):
        return jnp.sum(jax.vmap(norm)(x) ** 2)

    def batched(x):
        function = getattr(eqxnorm.functional, cls._function)
        return jnp.sum(function(x, norm.weight, norm.bias) ** 2)

    text = jax.jit(jax.grad(module)).lower(x).as_text()
    assert "4096x1x1024xf32" not in text  # the statistics keep their (4096, 1) shape
    np.testing.assert_allclose(
        jax.jit(jax.grad(module))(x), jax.jit(jax.grad(batched))(x), rtol=1e-5, atol=1e-6
    )


def test_filter_vmap_ensemble_of_vmapped_layers():
    """An `eqx.filter_vmap` ensemble (parameters batched over members) of a `jax.vmap`ped
    layer: no unit axis reaches XLA, and each member normalizes with its own parameters."""
    weight = 1 + 0.5 * jr.normal(jr.key(0), (3, 8))
    bias = jr.normal(jr.key(1), (3, 8))
    # What `eqx.filter_vmap(make_layer)(keys)` builds: one layer whose arrays are stacked.
    ensemble = eqx.tree_at(lambda m: (m.weight, m.bias), eqxnorm.LayerNorm(8), (weight, bias))
    x = jr.normal(jr.key(2), (3, 5, 8))
    lowered = eqx.filter_jit(eqx.filter_vmap(lambda layer, x: jax.vmap(layer)(x))).lower(
        ensemble, x
    )
    assert "3x5x1x8" not in lowered.as_text()
    expected = oracle.layer_norm(x, None, None, 1e-5)
    expected = expected * np.asarray(weight)[:, None] + np.asarray(bias)[:, None]
    oracle.assert_close(lowered.compile()(ensemble, x), expected)
