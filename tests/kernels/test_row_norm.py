"""The row-norm kernels (`eqxnorm.kernels.row_norm`) in interpret mode against the reference,
and their lowering for GPU (Triton) and TPU (Mosaic) from this CPU machine."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_support as ks
import oracle
from eqxnorm.kernels import _common, reference, row_norm

OPS = ("layer_norm", "rms_norm")
EPS = 1e-5
# Every rows × widths pair in float32; in half precision a selection that still covers
# every row count and every width; the chunked kernel (a wide row) in float32 and bfloat16.
CASES = [(r, w, jnp.float32) for r, w in itertools.product(ks.ROWS, ks.WIDTHS)]
HALF_SHAPES = [(1, 760), (37, 4096), (199, 160), (37, 1)]
CASES += [(r, w, d) for r, w in HALF_SHAPES for d in oracle.DTYPES[1:]]
CASES += [(3, ks.WIDE, jnp.float32), (2, ks.WIDE, jnp.bfloat16)]


def _ids(case):
    rows, width, dtype = case
    return f"{rows}x{width}-{jnp.dtype(dtype).name}"


def _value_and_grads(module, op, affine=True):
    """`(y, (dx, dweight, dbias))` of `sum(y * cotangent)`, jitted once."""
    fn = getattr(module, op)

    @jax.jit
    def run(x, weight, bias, cotangent):
        def loss(x, weight, bias):
            y = fn(x, weight, bias, eps=EPS)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        argnums = (0, 1, 2) if affine else 0
        (_, y), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(x, weight, bias)
        return y, grads

    return run


def _inputs(rows, width, dtype, seed=0):
    x = ks.data((rows, width), dtype, seed=seed)
    weight, bias = ks.params(width, dtype)
    cotangent = ks.data((rows, width), jnp.float32, seed=seed + 1, loc=0.0, scale=1.0)
    return x, weight, bias, cotangent


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("op", OPS)
def test_forward_and_gradients_match_reference(op, case):
    rows, width, dtype = case
    args = _inputs(rows, width, dtype, seed=rows + width)
    y, grads = _value_and_grads(row_norm, op)(*args)
    y_ref, grads_ref = _value_and_grads(reference, op)(*args)
    assert y.dtype == dtype and y.shape == (rows, width)
    ks.assert_matches(y, y_ref)
    for grad, grad_ref, arg in zip(grads, grads_ref, args[:3], strict=True):
        assert grad.dtype == arg.dtype
        ks.assert_matches(grad, grad_ref)


@pytest.mark.parametrize("op", OPS)
def test_against_float64_oracle(op):
    x, weight, bias, _ = _inputs(37, 760, jnp.float32)
    y = getattr(row_norm, op)(x, weight, bias, eps=EPS)
    oracle.assert_close(y, getattr(oracle, op)(x, weight, bias, EPS))


@pytest.mark.parametrize("op", OPS)
def test_without_affine(op):
    x, _, _, cotangent = _inputs(37, 160, jnp.float32)
    y, dx = _value_and_grads(row_norm, op, affine=False)(x, None, None, cotangent)
    y_ref, dx_ref = _value_and_grads(reference, op, affine=False)(x, None, None, cotangent)
    ks.assert_matches(y, y_ref)
    ks.assert_matches(dx, dx_ref)


@pytest.mark.parametrize("width", [160, ks.WIDE])
def test_large_mean_keeps_float32_accuracy(width):
    # Mean 1e4, std 1: one rounded float32 mean would cost ~5e-4 in the output; the kernels
    # keep the mean as shift + offset like the reference (chunked rows too).
    x = ks.data((2, width), jnp.float32, loc=1e4, scale=1.0)
    y = row_norm.layer_norm(x, None, None, eps=EPS)
    np.testing.assert_allclose(y, oracle.layer_norm(x, None, None, EPS), atol=5e-6)


def test_constant_row_gives_exactly_the_bias():
    x = jnp.full((3, 760), 7.25, jnp.float32)
    _, bias = ks.params(760)
    y = row_norm.layer_norm(x, jnp.ones(760), bias, eps=EPS)
    np.testing.assert_array_equal(y, jnp.broadcast_to(bias, y.shape))


def test_deterministic():
    args = _inputs(199, 760, jnp.bfloat16)
    run = _value_and_grads(row_norm, "layer_norm")
    first, second = run(*args), run(*args)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# --- transformations ---------------------------------------------------------------------------


def _one_example(module, op, weight, bias):
    """The Equinox convention: a function of one example (here one row)."""
    return lambda x: getattr(module, op)(x[None], weight, bias, eps=EPS)[0]


@pytest.mark.parametrize("op", OPS)
def test_vmap_of_one_example_and_its_gradients(op):
    x, weight, bias, cotangent = _inputs(37, 160, jnp.float32)

    def loss(module, weight, bias):
        y = jax.vmap(_one_example(module, op, weight, bias))(x)
        return jnp.sum(y * cotangent)

    grads = jax.jit(jax.grad(lambda w, b: loss(row_norm, w, b), argnums=(0, 1)))(weight, bias)
    grads_ref = jax.grad(lambda w, b: loss(reference, w, b), argnums=(0, 1))(weight, bias)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        ks.assert_matches(grad, grad_ref)
    y = jax.jit(jax.vmap(_one_example(row_norm, op, weight, bias)))(x)
    ks.assert_matches(y, reference.__dict__[op](x, weight, bias, eps=EPS))


def test_per_example_gradients():
    # vmap of grad: each example's own weight gradient (the batched backward must not return
    # the sum over examples).
    x, weight, bias, cotangent = _inputs(5, 160, jnp.float32)

    def per_example(module):
        def grad_one(xi, ci):
            def loss(w, b):
                return jnp.sum(_one_example(module, "layer_norm", w, b)(xi) * ci)

            return jax.grad(loss, argnums=(0, 1))(weight, bias)

        return jax.jit(jax.vmap(grad_one))(x, cotangent)

    for grad, grad_ref in zip(per_example(row_norm), per_example(reference), strict=True):
        assert grad.shape == (5, 160)
        ks.assert_matches(grad, grad_ref)


def test_nested_vmap_and_batched_parameters():
    x, weight, bias, _ = _inputs(12, 160, jnp.float32)
    x = x.reshape(3, 4, 160)
    nested = jax.vmap(jax.vmap(_one_example(row_norm, "rms_norm", weight, bias)))
    expected = reference.rms_norm(x.reshape(12, 160), weight, bias, eps=EPS)
    ks.assert_matches(jax.jit(nested)(x), expected.reshape(3, 4, 160))
    # An ensemble: every example with its own weight (Pallas batches these itself).
    weights = jnp.stack([weight, 2 * weight, 0.5 * weight])

    def ensemble(module):
        return jax.vmap(lambda xi, wi: module.layer_norm(xi, wi, bias, eps=EPS))(x, weights)

    ks.assert_matches(jax.jit(lambda: ensemble(row_norm))(), ensemble(reference))


# --- lowering for GPU and TPU ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("width", [760, ks.WIDE, 262144])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("op", OPS)
def test_lowers_with_gradient(op, platform, width, dtype):
    def value_and_grads(x, weight, bias):
        def loss(x, weight, bias):
            return jnp.sum(getattr(row_norm, op)(x, weight, bias, eps=EPS).astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, weight, bias)

    args = [jax.ShapeDtypeStruct(s, dtype) for s in [(37, width), (width,), (width,)]]
    text = ks.lowered(value_and_grads, args, platform)
    assert ks.kernel_count(text, platform) == 2  # forward and backward, nothing else
    assert f"eqxnorm_{op}_fwd" in text and f"eqxnorm_{op}_bwd" in text


def test_vmap_tiles_rows_in_the_gpu_launch():
    # 64 one-row examples of width 160: the folded launch holds 16 rows per program, so the
    # grid is 4 programs, not 64 (Pallas' own batching would add a grid axis of 64).
    weight, bias = (jax.ShapeDtypeStruct((160,), jnp.bfloat16),) * 2
    x = jax.ShapeDtypeStruct((64, 160), jnp.bfloat16)

    def forward_and_backward(x, weight, bias):
        def loss(x, weight, bias):
            y = jax.vmap(_one_example(row_norm, "layer_norm", weight, bias))(x)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(x, weight, bias)

    text = ks.lowered(forward_and_backward, [x, weight, bias], "cuda")
    block_rows = _common.block_config(_common.TRITON, 64, 160).block_rows
    assert block_rows == 16
    assert ks.triton_grids(text) == [(64 // block_rows, 1, 1)] * 2


def test_bad_input_is_rejected_like_the_reference():
    x = jnp.ones((4, 160))
    for fn in (reference.layer_norm, row_norm.layer_norm):
        with pytest.raises(Exception, match="dim"):
            fn(x, jnp.ones(100), None, eps=EPS)
