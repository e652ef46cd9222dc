"""The row-norm kernels (`eqxnorm.kernels.row_norm`) in interpret mode against the reference,
and their lowering for GPU (Triton) and TPU (Mosaic) from this CPU machine."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_support as ks
import oracle
from eqxnorm.kernels import _common, _mosaic_gpu, pallas, reference, row_norm

OPS = ("layer_norm", "rms_norm")
# The kernels pinned to Triton, for the tests of its launch geometry.
_TRITON = pallas.backend("triton")
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
    # 64 one-row examples of width 128: the folded launch holds 32 rows per program, so the
    # forward's grid is 2 programs, not 64 (Pallas' own batching would add a grid axis of 64),
    # and the backward's one program looping over the 2 blocks (too few to fill the GPU: its
    # partial sums kept few, `_common.partial_iterations`). The Triton launch
    # (`backend="triton"`); the Mosaic GPU one folds the same way. (A wider row has a forward
    # program of its own, `block_config`'s `one_row`: 64 programs.)
    weight, bias = (jax.ShapeDtypeStruct((128,), jnp.bfloat16),) * 2
    x = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)

    def forward_and_backward(x, weight, bias):
        def loss(x, weight, bias):
            y = jax.vmap(_one_example(_TRITON, "layer_norm", weight, bias))(x)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(x, weight, bias)

    text = ks.lowered(forward_and_backward, [x, weight, bias], "cuda")
    block_rows = _common.block_config(_common.TRITON, 64, 128, one_row=True).block_rows
    assert block_rows == 32
    assert ks.triton_grids(text) == [(64 // block_rows, 1, 1), (1, 1, 1)]


def test_bad_input_is_rejected_like_the_reference():
    x = jnp.ones((4, 160))
    for fn in (reference.layer_norm, row_norm.layer_norm):
        with pytest.raises(Exception, match="dim"):
            fn(x, jnp.ones(100), None, eps=EPS)


# --- fused residual add + norm -----------------------------------------------------------------

ADD_OPS = ("add_layer_norm", "add_rms_norm")
# (op, rows, width, x dtype, residual dtype): every row count and width, both ops, the chunked
# kernel, both half-precision dtypes and mixed dtypes (bfloat16 activations on a float32
# residual stream, and the reverse).
F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
ADD_CASES = [
    ("add_layer_norm", 1, 4096, F32, F32),
    ("add_rms_norm", 37, 160, F32, F32),
    ("add_layer_norm", 199, 760, F32, F32),
    ("add_rms_norm", 3, ks.WIDE, F32, F32),
    ("add_layer_norm", 2, ks.WIDE, BF16, BF16),
    ("add_rms_norm", 37, 760, BF16, BF16),
    ("add_layer_norm", 199, 160, F16, F16),
    ("add_layer_norm", 37, 760, BF16, F32),
    ("add_rms_norm", 37, 160, F32, BF16),
]


def _add_ids(case):
    op, rows, width, x_dtype, residual_dtype = case
    dtypes = f"{jnp.dtype(x_dtype).name}+{jnp.dtype(residual_dtype).name}"
    return f"{op}-{rows}x{width}-{dtypes}"


def _add_inputs(rows, width, x_dtype, residual_dtype, seed=0):
    x = ks.data((rows, width), x_dtype, seed=seed)
    residual = ks.data((rows, width), residual_dtype, seed=seed + 1, loc=-0.25)
    weight, bias = ks.params(width, x_dtype)
    dy, dh = (
        ks.data((rows, width), jnp.float32, seed=seed + s, loc=0.0, scale=1.0) for s in (2, 3)
    )
    return x, residual, weight, bias, dy, dh


def _add_value_and_grads(module, op, with_h=True):
    """`((y, h), (dx, dresidual, dweight, dbias))` of `sum(y·dy) + sum(h·dh)` (without the
    second term unless `with_h`, so h's cotangent is a symbolic zero), jitted."""
    fn = getattr(module, op)

    @jax.jit
    def run(x, residual, weight, bias, dy, dh):
        def loss(*args):
            y, h = fn(*args, eps=EPS)
            value = jnp.sum(y.astype(jnp.float32) * dy)
            if with_h:
                value = value + jnp.sum(h.astype(jnp.float32) * dh)
            return value, (y, h)

        (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            x, residual, weight, bias
        )
        return outs, grads

    return run


def _assert_add_grads_match(grads, grads_ref, args):
    x, residual = args[:2]
    # The reference rounds the input gradient to the residual's dtype on the way to x; the
    # kernel rounds once per output, so they agree to the coarser dtype's tolerance.
    coarse = min(x.dtype, residual.dtype, key=lambda d: jnp.finfo(d).bits)
    for grad, grad_ref, arg in zip(grads, grads_ref, args[:4], strict=True):
        assert grad.dtype == arg.dtype
        ks.assert_matches(grad, grad_ref, coarse if arg is x else None)


@pytest.mark.parametrize("case", ADD_CASES, ids=_add_ids)
def test_add_norm_matches_reference(case):
    op, *shape_and_dtypes = case
    args = _add_inputs(*shape_and_dtypes, seed=shape_and_dtypes[0])
    (y, h), grads = _add_value_and_grads(row_norm, op)(*args)
    (y_ref, h_ref), grads_ref = _add_value_and_grads(reference, op)(*args)
    x, residual = args[:2]
    assert y.dtype == x.dtype and h.dtype == residual.dtype
    np.testing.assert_array_equal(np.asarray(h, np.float64), np.asarray(h_ref, np.float64))
    ks.assert_matches(y, y_ref)
    _assert_add_grads_match(grads, grads_ref, args)


def _pallas_calls(jaxpr):
    """Every `pallas_call` in `jaxpr` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    yield from _pallas_calls(getattr(sub, "jaxpr", sub))


def _backward_operands(fn, *args):
    """The operand counts of the backward kernels `fn(*args)` launches (one per target)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return {len(e.invars) for e in _pallas_calls(jaxpr) if e.params["name"].endswith("_bwd")}


@pytest.mark.parametrize("op", ADD_OPS)
def test_add_norm_with_gradient_of_y_only(op):
    # h's cotangent is a symbolic zero: the backward kernel does not read it.
    args = _add_inputs(37, 760, jnp.float32, jnp.float32)
    (y, _), grads = _add_value_and_grads(row_norm, op, with_h=False)(*args)
    (y_ref, _), grads_ref = _add_value_and_grads(reference, op, with_h=False)(*args)
    ks.assert_matches(y, y_ref)
    _assert_add_grads_match(grads, grads_ref, args)
    read = [_backward_operands(_add_value_and_grads(row_norm, op, w), *args) for w in (0, 1)]
    assert read == [{6}, {7}]  # h, dy, shift, offset, rstd, weight (+ dh)


def test_add_norm_with_gradient_of_h_only():
    # y's cotangent is a symbolic zero: dx = dresidual = dh, no kernel runs backward.
    x, residual, weight, bias, _, dh = _add_inputs(37, 160, jnp.bfloat16, jnp.float32)

    def loss(x, residual, weight, bias):
        _, h = row_norm.add_layer_norm(x, residual, weight, bias, eps=EPS)
        return jnp.sum(h * dh)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, residual, weight, bias)
    np.testing.assert_array_equal(grads[0], dh.astype(jnp.bfloat16))
    np.testing.assert_array_equal(grads[1], dh)
    for grad in grads[2:]:
        np.testing.assert_array_equal(grad, jnp.zeros_like(weight))
    assert not _backward_operands(jax.grad(loss, argnums=(0, 1, 2, 3)), x, residual, weight, bias)


def _one_token(module, op, weight, bias):
    """A pre-norm block's add + norm of one token (the Equinox convention)."""

    def fn(x, residual):
        y, h = getattr(module, op)(x[None], residual[None], weight, bias, eps=EPS)
        return y[0], h[0]

    return fn


def test_add_norm_under_vmap_and_its_gradients():
    x, residual, weight, bias, dy, dh = _add_inputs(37, 160, jnp.bfloat16, jnp.float32)

    def loss(module, x, residual, weight, bias):
        y, h = jax.vmap(_one_token(module, "add_rms_norm", weight, bias))(x, residual)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(h * dh)

    # grad of vmap: shared parameters, their gradients summed over the tokens.
    grad = jax.grad(loss, argnums=(1, 2, 3, 4))
    grads = jax.jit(functools.partial(grad, row_norm))(x, residual, weight, bias)
    grads_ref = grad(reference, x, residual, weight, bias)
    _assert_add_grads_match(grads, grads_ref, (x, residual, weight, bias))
    y, h = jax.jit(jax.vmap(_one_token(row_norm, "add_layer_norm", weight, bias)))(x, residual)
    y_ref, h_ref = reference.add_layer_norm(x, residual, weight, bias, eps=EPS)
    ks.assert_matches(y, y_ref)
    np.testing.assert_array_equal(h, h_ref)

    # vmap of grad: every token's own parameter gradients.
    def per_token(module):
        def grad_one(xi, ri, dyi, dhi):
            def loss(w, b):
                y, h = _one_token(module, "add_layer_norm", w, b)(xi, ri)
                return jnp.sum(y.astype(jnp.float32) * dyi) + jnp.sum(h * dhi)

            return jax.grad(loss, argnums=(0, 1))(weight, bias)

        return jax.vmap(grad_one)(x, residual, dy, dh)

    grads, grads_ref = jax.jit(lambda: per_token(row_norm))(), per_token(reference)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert grad.shape == (37, 160)
        ks.assert_matches(grad, grad_ref)


def test_add_norm_with_float64_runs_the_reference():
    from eqxnorm.kernels import pallas

    with jax.enable_x64(True):
        x = ks.data((4, 160), jnp.float32)
        residual = ks.data((4, 160), jnp.float64, seed=1)
        for args in [(x, residual), (x.astype(jnp.float64), residual.astype(jnp.float32))]:
            y, h = pallas.add_layer_norm(*args, None, None, eps=EPS)
            y_ref, h_ref = reference.add_layer_norm(*args, None, None, eps=EPS)
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(h, h_ref)


# --- adaptive (adaLN) modulation ---------------------------------------------------------------

ADAPTIVE_OPS = ("adaptive_layer_norm", "adaptive_rms_norm")
# (op, groups, rows, width, dtype)
ADAPTIVE_CASES = [
    ("adaptive_layer_norm", 3, 37, 160, F32),
    ("adaptive_rms_norm", 2, 1, 4096, F32),
    ("adaptive_layer_norm", 1, 199, 760, F32),
    ("adaptive_rms_norm", 2, 37, 760, BF16),
    ("adaptive_layer_norm", 2, 37, 160, F16),
]


def _adaptive_inputs(groups, rows, width, dtype, seed=0):
    x = ks.data((groups, rows, width), dtype, seed=seed)
    scale = ks.data((groups, width), dtype, seed=seed + 1, loc=0.0, scale=0.5)
    shift = ks.data((groups, width), dtype, seed=seed + 2, loc=0.0, scale=1.0)
    weight, bias = ks.params(width, dtype)
    dy = ks.data((groups, rows, width), jnp.float32, seed=seed + 3, loc=0.0, scale=1.0)
    return x, scale, shift, weight, bias, dy


def _adaptive_value_and_grads(module, op):
    """`(y, (dx, dscale, dshift, dweight, dbias))` of `sum(y·dy)`, jitted once."""
    fn = getattr(module, op)

    @jax.jit
    def run(x, scale, shift, weight, bias, dy):
        def loss(*args):
            y = fn(*args, eps=EPS)
            return jnp.sum(y.astype(jnp.float32) * dy), y

        argnums = tuple(i for i, a in enumerate((x, scale, shift, weight, bias)) if a is not None)
        (_, y), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
            x, scale, shift, weight, bias
        )
        return y, grads

    return run


@pytest.mark.parametrize(
    "case", ADAPTIVE_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}x{c[3]}-{jnp.dtype(c[4]).name}"
)
def test_adaptive_norm_matches_reference(case):
    op, *shape, dtype = case
    args = _adaptive_inputs(*shape, dtype, seed=shape[1])
    y, grads = _adaptive_value_and_grads(row_norm, op)(*args)
    y_ref, grads_ref = _adaptive_value_and_grads(reference, op)(*args)
    assert y.dtype == dtype and y.shape == tuple(shape)
    ks.assert_matches(y, y_ref)
    for grad, grad_ref, arg in zip(grads, grads_ref, args[:5], strict=True):
        assert grad.dtype == arg.dtype and grad.shape == arg.shape
        ks.assert_matches(grad, grad_ref)


@pytest.mark.parametrize("op", ADAPTIVE_OPS)
def test_adaptive_norm_without_affine(op):
    x, scale, shift, _, _, dy = _adaptive_inputs(2, 37, 160, jnp.float32)
    y, grads = _adaptive_value_and_grads(row_norm, op)(x, scale, shift, None, None, dy)
    y_ref, grads_ref = _adaptive_value_and_grads(reference, op)(x, scale, shift, None, None, dy)
    ks.assert_matches(y, y_ref)
    assert len(grads) == 3
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        ks.assert_matches(grad, grad_ref)


@pytest.mark.parametrize("op", ADAPTIVE_OPS)
def test_adaptive_gradients_of_few_tokens_in_each_parameters_dtype(op):
    # A few tokens per example (one program and block per group): the gradients are written in
    # the parameters' dtypes, a float32 shift's in float32 beside a bfloat16 scale's (they
    # were both bfloat16: the shift's sum rounded before its cast back).
    x, scale, _, _, _, dy = _adaptive_inputs(8, 5, 160, jnp.bfloat16)
    shift = ks.data((8, 160), jnp.float32, seed=9)
    y, grads = _adaptive_value_and_grads(row_norm, op)(x, scale, shift, None, None, dy)
    _, grads_ref = _adaptive_value_and_grads(reference, op)(x, scale, shift, None, None, dy)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        ks.assert_matches(grad, grad_ref)


def _one_adaptive_example(module, op, weight, bias):
    """The adaptive module's convention: one example `(tokens, dim)` and its `(dim,)`
    modulation, as the kernel's one group."""
    return lambda x, s, t: getattr(module, op)(x[None], s[None], t[None], weight, bias, eps=EPS)[0]


def test_adaptive_norm_under_vmap_and_its_gradients():
    x, scale, shift, weight, bias, dy = _adaptive_inputs(4, 37, 160, jnp.float32)
    op = "adaptive_layer_norm"

    # vmap over the batch (scale per example): the examples fold into the kernel's groups.
    def loss(module, x, scale, shift, weight, bias):
        y = jax.vmap(_one_adaptive_example(module, op, weight, bias))(x, scale, shift)
        return jnp.sum(y * dy)

    grad = jax.grad(loss, argnums=(1, 2, 3, 4, 5))
    grads = jax.jit(functools.partial(grad, row_norm))(x, scale, shift, weight, bias)
    for g, g_ref in zip(grads, grad(reference, x, scale, shift, weight, bias), strict=True):
        ks.assert_matches(g, g_ref)

    # vmap of grad: per-example weight gradients.
    def per_example(module):
        def grad_one(xi, si, ti, dyi):
            def loss(w, b):
                return jnp.sum(_one_adaptive_example(module, op, w, b)(xi, si, ti) * dyi)

            return jax.grad(loss, argnums=(0, 1))(weight, bias)

        return jax.vmap(grad_one)(x, scale, shift, dy)

    grads, grads_ref = jax.jit(lambda: per_example(row_norm))(), per_example(reference)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == (4, 160)
        ks.assert_matches(g, g_ref)


def test_adaptive_norm_vmapped_over_tokens_with_shared_modulation():
    # A function of one token, vmapped over the tokens with one scale/shift for all: the tokens
    # fold into the kernel's rows; per-token weight gradients under vmap of grad.
    x, scale, shift, weight, bias, dy = _adaptive_inputs(1, 37, 160, jnp.float32)
    op = "adaptive_rms_norm"

    def one_token(module, w, b):
        return lambda xi: _one_adaptive_example(module, op, w, b)(xi[None], scale[0], shift[0])[0]

    y = jax.jit(jax.vmap(one_token(row_norm, weight, bias)))(x[0])
    ks.assert_matches(y, reference.adaptive_rms_norm(x, scale, shift, weight, bias, eps=EPS)[0])

    def per_token(module):
        def grad_one(xi, dyi):
            return jax.grad(lambda w: jnp.sum(one_token(module, w, bias)(xi) * dyi))(weight)

        return jax.vmap(grad_one)(x[0], dy[0])

    ks.assert_matches(jax.jit(lambda: per_token(row_norm))(), per_token(reference))


def test_adaptive_norm_launch_folds_examples_into_groups():
    # 8 examples of 37 tokens, width 160: one launch of (row blocks, 8 groups), not a Pallas
    # batch axis, forward (a row per program: `one_row`) and backward (whose one program per
    # group loops over its 3 blocks of 16 rows: 24 blocks do not fill the GPU,
    # `_common.partial_iterations`, and its partial rows are the group's gradients).
    x = jax.ShapeDtypeStruct((8, 37, 160), jnp.bfloat16)
    mod = jax.ShapeDtypeStruct((8, 160), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((160,), jnp.float32)

    def loss(x, scale, shift, weight):
        y = jax.vmap(_one_adaptive_example(_TRITON, "adaptive_layer_norm", weight, weight))(
            x, scale, shift
        )
        return jnp.sum(y.astype(jnp.float32) ** 2)

    text = ks.lowered(jax.grad(loss, argnums=(0, 1, 2, 3)), [x, mod, mod, weight], "cuda")
    fwd, bwd = (_common.block_config(_common.TRITON, 37, 160, one_row=r) for r in (True, False))
    assert (fwd.block_rows, bwd.block_rows) == (1, 16)
    assert ks.triton_grids(text) == [(37, 8, 1), (1, 8, 1)]


# --- both fused families: lowering, determinism, errors ------------------------------------------


def _fused_args(op, width, dtype):
    if op in ADD_OPS:
        shapes = [(37, width), (37, width), (width,), (width,)]
        # A float32 residual stream under bfloat16 activations.
        dtypes = [dtype, jnp.float32, dtype, dtype]
    else:
        shapes, dtypes = [(3, 37, width), (3, width), (3, width), (width,), (width,)], [dtype] * 5
    return [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes, strict=True)]


def _fused_loss(op):
    def loss(*args):
        out = getattr(row_norm, op)(*args, eps=EPS)
        return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in jax.tree.leaves(out))

    return loss


@pytest.mark.parametrize(
    ("op", "width"), [(op, 760) for op in ADD_OPS + ADAPTIVE_OPS] + [("add_layer_norm", ks.WIDE)]
)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_fused_ops_lower_in_one_kernel_each_way(op, width, platform):
    args = _fused_args(op, width, jnp.bfloat16)
    forward = ks.lowered(lambda *a: getattr(row_norm, op)(*a, eps=EPS), args, platform)
    assert ks.kernel_count(forward, platform) == 1  # the add and the norm in one kernel
    assert f"eqxnorm_{op}_fwd" in forward
    argnums = tuple(range(len(args)))
    both = ks.lowered(jax.value_and_grad(_fused_loss(op), argnums=argnums), args, platform)
    assert ks.kernel_count(both, platform) == 2
    assert f"eqxnorm_{op}_bwd" in both


def test_fused_ops_are_deterministic():
    add_args = _add_inputs(199, 760, jnp.bfloat16, jnp.float32)
    adaptive_args = _adaptive_inputs(3, 199, 760, jnp.bfloat16)
    for run, args in [
        (_add_value_and_grads(row_norm, "add_layer_norm"), add_args),
        (_adaptive_value_and_grads(row_norm, "adaptive_rms_norm"), adaptive_args),
    ]:
        first, second = run(*args), run(*args)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_fused_ops_reject_bad_input_like_the_reference():
    x = jnp.ones((4, 160))
    for module in (reference, row_norm):
        with pytest.raises(Exception, match="dim|rows"):
            module.add_layer_norm(x, jnp.ones((4, 100)), None, None, eps=EPS)
        with pytest.raises(Exception, match="groups|dim"):
            module.adaptive_layer_norm(
                x[None], jnp.ones((2, 160)), jnp.ones((2, 160)), None, None, eps=EPS
            )


# --- per-head QK-norm, gated RMSNorm, Dynamic Tanh --------------------------------------------


def _loss_and_grads(fn, argnums):
    """`(outputs, grads)` of `sum(y · sin(y))` over every output of `fn`, jitted."""

    def loss(*args):
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        total = sum(jnp.sum(y.astype(jnp.float32) * jnp.sin(y.astype(jnp.float32))) for y in outs)
        return total, outs

    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


def _assert_same_outputs_and_grads(kernel, ref, args, argnums):
    (_, outs), grads = _loss_and_grads(kernel, argnums)(*args)
    (_, outs_ref), grads_ref = _loss_and_grads(ref, argnums)(*args)
    for got, want in zip((*outs, *grads), (*outs_ref, *grads_ref), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        ks.assert_matches(got, want)


# The shared weight's path (its per-head sums added) runs in tests/test_qk_norm.py.
QK_CASES = [("rms_norm", "per_head", jnp.float32), ("layer_norm", None, jnp.bfloat16)]


@pytest.mark.parametrize("case", QK_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{jnp.dtype(c[2]).name}")
def test_qk_norm_matches_reference(case):
    # Grouped-query heads (3 and 2) and different token counts (cross-attention): the launch
    # covers q's blocks and k's, the programs past the shorter operand's doing nothing.
    norm, weights, dtype = case
    q, k = ks.data((37, 3, 16), dtype), ks.data((21, 2, 16), dtype, seed=1)
    shapes = {"per_head": ((3, 16), (2, 16)), "shared": ((16,), (16,)), None: (None, None)}
    qw, kw = (
        None if s is None else ks.data(s, dtype, seed=2, loc=1.0, scale=0.2)
        for s in shapes[weights]
    )
    args = (q, k, qw, kw)

    def fns(module):
        return lambda *a: module.qk_norm(*a, eps=1e-6, norm=norm)

    argnums = (0, 1) if weights is None else (0, 1, 2, 3)
    _assert_same_outputs_and_grads(fns(row_norm), fns(reference), args, argnums)


@pytest.mark.parametrize("weights, dtype", [("shared", jnp.float32), ("per_head", jnp.bfloat16)])
def test_qk_norm_weight_grads_of_equal_shapes(weights, dtype):
    # q and k of one shape: both weights' gradients come from one reduction (variadic for
    # float32 sums, else of the stacked partials), each its own.
    q, k = ks.data((37, 2, 16), dtype), ks.data((37, 2, 16), dtype, seed=1)
    shape = (2, 16) if weights == "per_head" else (16,)
    qw, kw = (ks.data(shape, dtype, seed=s, loc=1.0, scale=0.2) for s in (2, 3))

    def fns(module):
        return lambda *a: module.qk_norm(*a, eps=1e-6)

    _assert_same_outputs_and_grads(fns(row_norm), fns(reference), (q, k, qw, kw), (0, 1, 2, 3))


def test_qk_norm_on_tpu_is_xla_with_the_kernels_contract():
    # Mosaic cannot block one head's strided rows: on TPU the launch's outputs come from XLA.
    q, k = ks.data((9, 3, 16), jnp.float32), ks.data((9, 2, 16), jnp.float32, seed=1)
    qw, kw = ks.data((3, 16), jnp.float32, seed=2), ks.data((16,), jnp.float32, seed=3)
    dys = (ks.data(q.shape, jnp.float32, seed=4), ks.data(k.shape, jnp.float32, seed=5))

    @functools.partial(jax.jit, static_argnums=0)
    def launches(target):
        fwd = row_norm._qk_norm_fwd_on(target, q, k, qw, kw, eps=1e-6, center=True)
        bwd = row_norm._qk_norm_bwd_on(
            target, q, k, qw, kw, *dys, *fwd[2:], center=True, param_grads=True
        )
        return (*fwd, *bwd)

    def with_means(outs):
        # The mean's two parts differ (the kernel shifts by each row's first element, XLA by
        # the mean): the contract is their sum, and centring by them in turn.
        q_y, k_y, q_shift, k_shift, q_offset, k_offset, *rest = outs
        return q_y, k_y, q_shift + q_offset, k_shift + k_offset, *rest

    got, want = (with_means(launches(t)) for t in (_common.MOSAIC, _common.INTERPRET))
    for g, w in zip(got, want, strict=True):
        ks.assert_matches(g, w)


QK_PERSISTENT = {
    # 10 SMs: q's 13 token blocks of 16 rows by 4 programs per head (4, 3, 3, 3 blocks), k's 3
    # by 3 of them (the 4th works on no k block); in programs of (4, q heads + k heads).
    "one-pass": (10, ((199, 3, 160), (37, 2, 160)), ((4, 5), (4, 3), 4)),
    # Rows of 17000 in 17 chunks on 4 SMs: blocks of 8 rows, q's 3 by 2 programs per head, k's
    # 2 by 2, each adding its blocks' column sums to its partial rows in HBM (the unused
    # bias's too), chunk by chunk.
    "chunked": (4, ((17, 2, 17000), (9, 1, 17000)), ((2, 3), (2, 2), 2)),
}


@pytest.mark.parametrize("case", QK_PERSISTENT.values(), ids=QK_PERSISTENT.keys())
def test_persistent_qk_norm_backward(monkeypatch, case):
    # QK-norm's Triton backward is persistent like the row norms': a head's programs loop over
    # its token blocks, where one program per block wrote one partial row per block (37
    # tokens of one head of 760, bfloat16: 10 partial rows, 1.22x the ideal bytes).
    sms, (q_shape, k_shape), plan = case
    monkeypatch.setattr(_mosaic_gpu, "_sm_count", lambda: sms)
    launch = row_norm._qk_launch(_common.INTERPRET, q_shape, k_shape, (True, True), 8, False, 8)
    assert (launch.grid, launch.blocks, launch.iterations) == plan
    q, k = ks.data(q_shape, jnp.float32), ks.data(k_shape, jnp.float32, seed=1)
    qw = ks.data(q_shape[1:], jnp.float32, seed=2, loc=1.0, scale=0.2)
    kw = ks.data((q_shape[-1],), jnp.float32, seed=3, loc=1.0, scale=0.2)

    def fns(module):
        return lambda *a: module.qk_norm(*a, eps=1e-6, norm="layer_norm")

    _assert_same_outputs_and_grads(fns(row_norm), fns(reference), (q, k, qw, kw), (0, 1, 2, 3))


def test_qk_norm_one_program_writes_the_weight_gradients():
    # 37 tokens of one head of 760 bfloat16: one backward program per operand, whose partial
    # row is the weight's gradient, written by the kernel in bfloat16 (no reduction, no cast
    # after it: on JAX 0.12 those were two XLA launches); 199 tokens, 4 programs, keep their
    # one reduction.
    def grads(q, k, q_weight, k_weight, q_dy, k_dy):
        _, vjp = jax.vjp(lambda *a: _TRITON.qk_norm(*a, eps=1e-6), q, k, q_weight, k_weight)
        return vjp((q_dy, k_dy))

    weight = jax.ShapeDtypeStruct((760,), jnp.bfloat16)
    for tokens, programs, reductions in ((37, 1, 0), (199, 4, 1)):
        x = jax.ShapeDtypeStruct((tokens, 1, 760), jnp.bfloat16)
        text = ks.lowered(grads, [x, x, weight, weight, x, x], "cuda")
        assert ks.triton_grids(text)[1] == (programs, 2, 1)
        assert text.count("stablehlo.reduce") == reductions
        assert text.count("stablehlo.convert") == 2 * reductions


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_new_ops_lower_in_one_launch_each_way(platform):
    bf16 = jnp.bfloat16
    shapes = {
        "qk_norm": [(256, 8, 128), (256, 2, 128), (8, 128), (128,)],
        "gated_rms_norm": [(64, ks.WIDE), (64, ks.WIDE), (ks.WIDE,)],
        "dyt": [(64, 4096), (), (4096,), (4096,)],
    }
    kwargs = {"qk_norm": dict(eps=1e-6), "gated_rms_norm": dict(eps=1e-6), "dyt": {}}
    for op, arg_shapes in shapes.items():
        args = [jax.ShapeDtypeStruct(s, bf16 if s else jnp.float32) for s in arg_shapes]
        fn = functools.partial(getattr(row_norm, op), **kwargs[op])
        text = ks.lowered(_loss_and_grads(fn, tuple(range(len(args)))), args, platform)
        # QK-norm on TPU is XLA (see the test above); everything else one kernel each way.
        expected = 0 if (op, platform) == ("qk_norm", "tpu") else 2
        assert ks.kernel_count(text, platform) == expected, op
        if platform == "cuda" and op == "qk_norm":
            # (token blocks, q heads + k heads): q and k in one launch each way; the backward
            # persistent, 80 blocks too few to fill an H200, each of its programs two blocks.
            assert ks.triton_grids(text) == [(8, 10, 1), (4, 10, 1)]


GATED_CASES = [
    ((37, 160), True, jnp.bfloat16, True),
    ((37, 160), False, jnp.float32, False),
    ((2, 17000), False, jnp.float32, True),  # chunked: wider than one block
]


@pytest.mark.parametrize("case", GATED_CASES, ids=["before-bf16", "after-no-weight", "chunked"])
def test_gated_rms_norm_matches_reference(case):
    shape, norm_before_gate, dtype, use_weight = case
    x, z = ks.data(shape, dtype), ks.data(shape, dtype, seed=1, loc=0.0)
    weight = ks.params(shape[1], dtype)[0] if use_weight else None

    def fns(module):
        return lambda *a: module.gated_rms_norm(*a, eps=1e-6, norm_before_gate=norm_before_gate)

    argnums = (0, 1, 2) if use_weight else (0, 1)
    _assert_same_outputs_and_grads(fns(row_norm), fns(reference), (x, z, weight), argnums)


@pytest.mark.parametrize("shape", [(37, 160), (2, 17000)], ids=["one-block", "chunked"])
def test_dyt_matches_reference(shape):
    x = ks.data(shape, jnp.float32, scale=1.0)
    weight, bias = ks.params(shape[1]) if shape[1] < 1000 else (None, None)
    args = (x, jnp.asarray(0.7, jnp.float32), weight, bias)
    argnums = (0, 1, 2, 3) if weight is not None else (0, 1)
    _assert_same_outputs_and_grads(row_norm.dyt, reference.dyt, args, argnums)


def _tangent_and_vmapped_grad(module, x, z, weight, bias):
    """Forward mode through the gated norm; reverse mode through a `vmap` of DyT over rows
    with per-row weights (Pallas' own batching of the launch)."""
    alpha = jnp.asarray(0.5, jnp.float32)
    gated = functools.partial(module.gated_rms_norm, eps=1e-6, norm_before_gate=False)
    tangent = jax.jvp(lambda x: gated(x, z, weight), (x,), (z,))[1]
    per_row = jax.vmap(lambda xi, wi: module.dyt(xi[None], alpha, wi, bias)[0])
    grad = jax.grad(lambda w: jnp.sum(per_row(x, w) ** 2))(jnp.stack([weight] * x.shape[0]))
    return tangent, grad


def test_fused_gate_and_dyt_forward_mode_and_vmap():
    x, z = ks.data((4, 160), jnp.float32), ks.data((4, 160), jnp.float32, seed=1)
    weight, bias = ks.params(160)
    run = jax.jit(_tangent_and_vmapped_grad, static_argnums=0)
    expected = run(reference, x, z, weight, bias)
    for got, want in zip(run(row_norm, x, z, weight, bias), expected, strict=True):
        ks.assert_matches(got, want)


def _vmapped_per_row(module, x, z, weight, bias, alpha):
    """Gradients through a `vmap` of the one-example calls with shared parameters (how the
    modules run), of every input and parameter."""

    def loss(x, z, weight, bias, alpha):
        def gated(xi, zi):
            return module.gated_rms_norm(xi[None], zi[None], weight, eps=1e-6)[0]

        def dyt(xi):
            return module.dyt(xi.reshape(2, -1), alpha, weight[:80], bias[:80])

        y = jax.vmap(gated)(x, z)
        return jnp.sum(y * jnp.cos(x)) + jnp.sum(jax.vmap(dyt)(x) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, z, weight, bias, alpha)


def test_gated_and_dyt_vmap_folds_examples_into_the_rows():
    # 64 one-row examples of width 160: one launch each way, not Pallas' own batching (a
    # program per example): the forward 4 programs of 16 rows, the backward 2 looping over
    # those 4 blocks (too few to fill the GPU: its partial sums kept few,
    # `_common.partial_iterations`); the shared parameters' gradients per example from XLA,
    # summed. The Triton launch (the Mosaic GPU one folds the same way).
    bf16 = jnp.bfloat16
    rows, vector = jax.ShapeDtypeStruct((64, 160), bf16), jax.ShapeDtypeStruct((160,), bf16)

    def gated_step(x, z, weight):
        def loss(x, weight):
            y = jax.vmap(
                lambda xi, zi: _TRITON.gated_rms_norm(xi[None], zi[None], weight, eps=1e-6)
            )(x, z)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1))(x, weight)

    text = ks.lowered(gated_step, [rows, rows, vector], "cuda")
    assert ks.triton_grids(text) == [(4, 1, 1), (2, 1, 1)]
    x, z = ks.data((12, 160), jnp.float32), ks.data((12, 160), jnp.float32, seed=1)
    args = (x, z, *ks.params(160), jnp.asarray(0.6, jnp.float32))
    run = jax.jit(_vmapped_per_row, static_argnums=0)
    for got, want in zip(run(row_norm, *args), run(reference, *args), strict=True):
        ks.assert_matches(got, want)


# --- output options: weight offset, output dtype, FP8 output ---------------------------------


def _options_value_and_grads(module, op, **options):
    """`(y, grads of x, weight, bias)` of `sum(y · cotangent)` for a row norm with `options`."""
    fn = getattr(module, op)

    @jax.jit
    def run(x, weight, bias, cotangent):
        def loss(x, weight, bias):
            y = fn(x, weight, bias, eps=EPS, **options)
            y = y[0] if isinstance(y, tuple) else y
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weight, bias)
        return y, grads

    return run


@pytest.mark.parametrize(
    ("op", "dtype", "out_dtype"),
    [("layer_norm", jnp.float32, jnp.bfloat16), ("rms_norm", jnp.bfloat16, jnp.float32)],
)
def test_weight_offset_and_out_dtype_match_reference(op, dtype, out_dtype):
    x, weight, bias, cotangent = _inputs(37, 160, dtype)
    options = dict(weight_offset=1.0, out_dtype=out_dtype)
    y, grads = _options_value_and_grads(pallas, op, **options)(x, weight - 1, bias, cotangent)
    y_ref, grads_ref = _options_value_and_grads(reference, op, **options)(
        x, weight - 1, bias, cotangent
    )
    assert y.dtype == out_dtype
    ks.assert_matches(y, y_ref)
    ks.assert_trees_match(grads, grads_ref)


@pytest.mark.parametrize(
    ("op", "rows", "width", "dtype"),
    [
        ("layer_norm", 37, 160, jnp.float8_e4m3fn),
        ("rms_norm", 37, 160, jnp.float8_e5m2),
        ("layer_norm", 2, ks.WIDE, jnp.float8_e4m3fn),
    ],
)
def test_fp8_output_is_the_reference_quantization(op, rows, width, dtype):
    """One pass and a wide row's chunked kernel, a scale that saturates included."""
    x, weight, bias, _ = _inputs(rows, width, jnp.bfloat16)
    fn, fn_ref = getattr(pallas, op), getattr(reference, op)
    y32 = fn(x, weight, bias, eps=EPS, out_dtype=jnp.float32)
    for scale in (jnp.float32(3.0), jnp.float32(1e5)):
        q, amax = fn(x, weight, bias, eps=EPS, out_dtype=dtype, fp8_scale=scale)
        q_ref, amax_ref = fn_ref(x, weight, bias, eps=EPS, out_dtype=dtype, fp8_scale=scale)
        assert q.dtype == dtype and amax.shape == ()
        ks.assert_fp8_exact(q, amax, y32, scale, q_ref, amax_ref)


def test_fp8_forward_reads_the_scale_in_place():
    # The Triton forward takes the FP8 scale as the group's one value (1 × 1), where a row of
    # it, broadcast by XLA, was a launch before the kernel (deviceless H200, training step of
    # 4096 × 1024 bf16: 7 -> 6 launches).
    x = jax.ShapeDtypeStruct((37, 760), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((760,), jnp.bfloat16)
    fp8 = dict(out_dtype=jnp.float8_e4m3fn, fp8_scale=jnp.float32(3.0))
    text = ks.lowered(
        lambda x, w: _TRITON.rms_norm(x, w, None, eps=EPS, **fp8), [x, weight], "cuda"
    )
    [call] = [line for line in text.splitlines() if "@__gpu$xla.gpu.triton" in line]
    operands = call.rsplit(" : (", 1)[1].split(")")[0]
    assert operands == "tensor<1x37x760xbf16>, tensor<1x1x760xbf16>, tensor<1x1x1xf32>"


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_fused_add_fp8_and_out_dtype_match_reference(op):
    """`y` in FP8 or another dtype, `h` in the residual's dtype; and the gradients through
    the FP8 output (add + RMSNorm)."""
    x, weight, bias, cotangent = _inputs(37, 160, jnp.bfloat16)
    residual = ks.data((37, 160), jnp.float32, seed=5)
    scale = jnp.float32(2.0)
    fn, fn_ref = getattr(pallas, op), getattr(reference, op)
    args = (x, residual, weight - 1, bias)
    options = dict(eps=EPS, weight_offset=1.0, out_dtype=jnp.float8_e4m3fn, fp8_scale=scale)
    q, h, amax = fn(*args, **options)
    q_ref, h_ref, amax_ref = fn_ref(*args, **options)
    y32, _ = fn(*args, eps=EPS, weight_offset=1.0, out_dtype=jnp.float32)
    ks.assert_fp8_exact(q, amax, y32, scale, q_ref, amax_ref)
    assert h.dtype == jnp.float32
    np.testing.assert_array_equal(h, h_ref)

    def grads(module, **options):
        def loss(x, residual, weight, bias):
            y, h, *_ = getattr(module, op)(x, residual, weight, bias, eps=EPS, **options)
            return jnp.sum(y.astype(jnp.float32) * cotangent) + jnp.sum(h)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)

    if op == "add_rms_norm":
        options = dict(out_dtype=jnp.float8_e5m2, fp8_scale=scale)
        ks.assert_trees_match(grads(pallas, **options), grads(reference, **options))


def test_fp8_gradients_and_vmap_match_reference():
    """Reverse mode through the FP8 output (straight through: the norm's backward kernel with
    γ·s, reading the float8 cotangent), and a `vmap` over examples folding into the kernel."""
    x, weight, bias, cotangent = _inputs(37, 160, jnp.float32)
    options = dict(out_dtype=jnp.float8_e4m3fn, fp8_scale=jnp.float32(4.0))
    _, grads = _options_value_and_grads(pallas, "rms_norm", **options)(x, weight, bias, cotangent)
    _, grads_ref = _options_value_and_grads(reference, "rms_norm", **options)(
        x, weight, bias, cotangent
    )
    ks.assert_trees_match(grads, grads_ref)
    batched = jax.vmap(lambda r: pallas.layer_norm(r, weight, bias, eps=EPS, **options))
    q, amax = batched(x.reshape(37, 1, 160))
    q_whole, amax_whole = pallas.layer_norm(x, weight, bias, eps=EPS, **options)
    np.testing.assert_array_equal(ks.bits(q.reshape(37, 160)), ks.bits(q_whole))
    assert float(jnp.max(amax)) == float(amax_whole)


def test_adaptive_weight_offset_and_out_dtype_match_reference():
    op = "adaptive_layer_norm"
    x, weight, bias, cotangent = _inputs(37, 160, jnp.bfloat16)
    x, cotangent = x.reshape(1, 37, 160), cotangent.reshape(1, 37, 160)
    scale, shift = (ks.data((1, 160), jnp.float32, seed=s, loc=0.0, scale=0.1) for s in (7, 8))
    options = dict(weight_offset=1.0, out_dtype=jnp.float32, eps=EPS)

    def run(module):
        def loss(x, scale, weight):
            y = getattr(module, op)(x, scale, shift, weight, bias, **options)
            return jnp.sum(y * cotangent), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, weight)

    (_, y), grads = run(pallas)
    (_, y_ref), grads_ref = run(reference)
    assert y.dtype == jnp.float32
    ks.assert_matches(y, y_ref)
    ks.assert_trees_match(grads, grads_ref)


# --- the persistent backward (Triton and its interpreter) --------------------------------------

# (what, shape, dtype): plain norms over awkward row counts, a chunked row (wider than a block)
# with few rows, add+norm with h's gradient, adaLN with groups.
PERSISTENT_CASES = [
    ("layer_norm", (199, 160), jnp.float32),
    ("rms_norm", (37, 760), jnp.bfloat16),
    ("layer_norm", (1, 760), jnp.bfloat16),
    ("layer_norm", (37, 17000), jnp.bfloat16),
    ("add_layer_norm", (199, 160), jnp.bfloat16),
    ("adaptive_rms_norm", (2, 37, 160), jnp.float32),
]


def _persistent_run(module, op, shape, dtype):
    """The outputs and gradients of `op` on inputs of `shape` and `dtype` (a flat list)."""
    if op.startswith("add_"):
        args = _add_inputs(*shape, dtype, jnp.float32, seed=3)
        return jax.tree.leaves(_add_value_and_grads(module, op)(*args))
    if op.startswith("adaptive_"):
        return jax.tree.leaves(
            _adaptive_value_and_grads(module, op)(*_adaptive_inputs(*shape, dtype))
        )
    return jax.tree.leaves(_value_and_grads(module, op)(*_inputs(*shape, dtype)))


@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2].__name__}")
def test_persistent_backward_loops_over_blocks(case, monkeypatch):
    # Two SMs: 199 rows of 160 are 13 blocks of 16, run by 2 programs of 32 warps looping over
    # 7 blocks each (one past the end); the chunked rows 5 blocks of 8 rows by 3 programs of 2;
    # adaLN's 2 groups of 37 rows one program each. Every program sums its blocks' parameter
    # gradients (in the loop's carry, or read-added-written in its partial row when chunked).
    monkeypatch.setattr(_mosaic_gpu, "_sm_count", lambda: 2)
    plan = _common.persistent_config(_common.block_config(_common.INTERPRET, 199, 160), 199)
    assert (plan.programs, plan.iterations, plan.config.num_warps) == (2, 7, 32)
    plan = _common.persistent_config(_common.block_config(_common.INTERPRET, 37, 17000), 37)
    assert (plan.programs, plan.iterations) == (3, 2)
    op, shape, dtype = case
    out = _persistent_run(row_norm, op, shape, dtype)
    again = _persistent_run(row_norm, op, shape, dtype)
    for a, b in zip(out, again, strict=True):
        np.testing.assert_array_equal(ks.bits(a), ks.bits(b))
    expected = _persistent_run(reference, op, shape, dtype)
    for i, (a, b) in enumerate(zip(out, expected, strict=True)):
        # The input gradients of half-precision inputs agree to their dtype's tolerance.
        ks.assert_matches(a, b, a.dtype if a.dtype != jnp.float32 and i else None)


def _gated_and_dyt(shape, seed=0):
    """`(function, reference, args, argnums)` of gated RMSNorm (norm before the gate) and of
    DyT on float32 rows of `shape`."""
    x, z = ks.data(shape, jnp.float32, seed=seed), ks.data(shape, jnp.float32, seed=1, loc=0.0)
    weight, bias = ks.params(shape[1])

    def gated(module):
        return lambda *a: module.gated_rms_norm(*a, eps=1e-6, norm_before_gate=True)

    alpha = jnp.asarray(0.7, jnp.float32)
    return [
        (gated(row_norm), gated(reference), (x, z, weight), (0, 1, 2)),
        (row_norm.dyt, reference.dyt, (x, alpha, weight, bias), (0, 1, 2, 3)),
    ]


def test_few_rows_keep_gated_and_dyt_partials_few():
    # 37 rows of 760 bfloat16 are 10 blocks, too few to fill the GPU: gated RMSNorm's and
    # DyT's Triton backwards loop one program over them (`_common.partial_iterations`, as the
    # row norms'), where 10 programs wrote 10 partial rows, more bytes than the rows'
    # (deviceless H200, training step: DyT 2.05x -> 1.06x the ideal bytes, gated 1.13x ->
    # 1.01x).
    x = jax.ShapeDtypeStruct((37, 760), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((760,), jnp.bfloat16)
    alpha = jax.ShapeDtypeStruct((), jnp.bfloat16)

    def gated(x, z, weight):
        y = _TRITON.gated_rms_norm(x, z, weight, eps=1e-6)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    def dyt(x, alpha, weight, bias):
        return jnp.sum(_TRITON.dyt(x, alpha, weight, bias).astype(jnp.float32) ** 2)

    for loss, args in ((gated, (x, x, weight)), (dyt, (x, alpha, weight, weight))):
        grad = jax.grad(loss, argnums=tuple(range(len(args))))
        assert ks.triton_grids(ks.lowered(grad, list(args), "cuda")) == [(10, 1, 1), (1, 1, 1)]


def test_persistent_gated_and_dyt_backward(monkeypatch):
    # Gated RMSNorm's and DyT's backward, persistent the same way: on 2 SMs, gated over 199
    # rows of 160, 13 blocks run by 2 programs of 7; DyT over 37 rows of 760 in chunks of 128
    # (small blocks), 5 blocks by 2 programs of 3, each adding its blocks' column sums to its
    # partial rows.
    monkeypatch.setattr(_mosaic_gpu, "_sm_count", lambda: 2)
    _assert_same_outputs_and_grads(*_gated_and_dyt((199, 160))[0])
    monkeypatch.setattr(_common, "MAX_BLOCK_ELEMENTS", 128)
    monkeypatch.setattr(_common, "CHUNK_COLS", 128)
    monkeypatch.setattr(_common, "PERSISTENT_RESIDENT_WARPS", 2)
    plan = _common.persistent_config(_common.block_config(_common.INTERPRET, 37, 760), 37)
    assert (plan.programs, plan.iterations, plan.config.chunks) == (2, 3, 6)
    _assert_same_outputs_and_grads(*_gated_and_dyt((37, 760), seed=2)[1])
