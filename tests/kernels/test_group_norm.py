"""The GroupNorm/InstanceNorm Pallas kernels (`eqxnorm.kernels.group_norm`) against the
reference, in Pallas' interpreter (the CPU target), and lowered for GPU and TPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import kernel_support as ks
import oracle
from eqxnorm.kernels import _common as c, pallas, reference
from eqxnorm.kernels.group_norm import (
    adaptive_group_norm,
    adaptive_group_norm_channels_last,
    group_norm,
    group_norm_channels_last,
)

EPS = 1e-5
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# (batch, channels, spatial, groups): one value per group, non-powers of two, many groups,
# InstanceNorm (groups == channels) over many short rows.
SHAPES = [(1, 4, 1, 2), (3, 6, 37, 3), (2, 32, 160, 8), (37, 3, 5, 3)]
# Slices larger than one block (`c.MAX_BLOCK_ELEMENTS` padded), read in pieces: long spatial
# runs (one channel per piece, several pieces per channel), and many short channels (several
# channels per piece).
CHUNKED = [(2, 8, 8200, 2), (1, 4096, 9, 2)]


def _inputs(batch, channels, spatial, dtype, loc=0.5):
    x = ks.data((batch, channels, spatial), dtype, loc=loc)
    weight, bias = ks.params(channels, dtype)
    cotangent = ks.data((batch, channels, spatial), dtype, seed=7)
    return x, weight, bias, cotangent


def _output_and_grads(fn, groups):
    """A jitted `(*inputs, cotangent) -> (y, *gradients)` of `fn`: `(x, weight, bias,
    cotangent) -> (y, dx, dweight, dbias)` for `group_norm`."""

    def run(*args):
        *inputs, cotangent = args
        y, vjp = jax.vjp(lambda *a: fn(*a, groups=groups, eps=EPS), *inputs)
        return (y, *vjp(cotangent))

    return jax.jit(run)


def _assert_all_match(actual, expected, dtype=None):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            ks.assert_matches(a, e, dtype)


def _assert_matches_reference(kernel, reference_fn, groups, args):
    """`kernel`'s output and gradients match `reference_fn`'s (see `_output_and_grads`) and
    are in the inputs' dtypes."""
    actual = _output_and_grads(kernel, groups)(*args)
    _assert_all_match(actual, _output_and_grads(reference_fn, groups)(*args))
    assert [a.dtype for a in actual] == [args[0].dtype, *(a.dtype for a in args[:-1])]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("batch,channels,spatial,groups", SHAPES + CHUNKED)
def test_matches_reference(batch, channels, spatial, groups, dtype):
    # A large mean in the chunked slices makes the shift of Chan's combination matter.
    loc = 50.0 if (batch, channels, spatial, groups) in CHUNKED else 0.5
    args = _inputs(batch, channels, spatial, dtype, loc=loc)
    _assert_matches_reference(group_norm, reference.group_norm, groups, args)


def test_matches_oracle():
    x, weight, bias, _ = _inputs(3, 6, 37, jnp.float32)
    y = group_norm(x, weight, bias, groups=3, eps=EPS)
    oracle.assert_close(y, oracle.group_norm(x, 3, weight, bias, EPS))


@pytest.mark.parametrize("has_weight,has_bias", [(False, False), (True, False), (False, True)])
def test_optional_params(has_weight, has_bias):
    x, weight, bias, cotangent = _inputs(3, 6, 37, jnp.float32)
    weight, bias = weight if has_weight else None, bias if has_bias else None

    def run(fn):
        y, vjp = jax.vjp(lambda x, w, b: fn(x, w, b, groups=3, eps=EPS), x, weight, bias)
        return (y, *vjp(cotangent))

    actual, expected = run(group_norm), run(reference.group_norm)
    _assert_all_match(actual, expected)


# --- batching ----------------------------------------------------------------------------------

B, CHANNELS, SPATIAL, GROUPS = 5, 6, 37, 3


def _one_example(fn):
    """`fn` on one `(channels, spatial)` example, the form `jax.vmap` of a module sees."""
    return lambda x, w, b: fn(x[None], w, b, groups=GROUPS, eps=EPS)[0]


def _loss(fn):
    return lambda x, w, b, ct: jnp.sum(_one_example(fn)(x, w, b) * ct)


def test_vmap_and_nested_vmap():
    x, weight, bias, _ = _inputs(2 * B, CHANNELS, SPATIAL, jnp.float32)
    expected = reference.group_norm(x, weight, bias, groups=GROUPS, eps=EPS)
    vmapped = jax.vmap(_one_example(group_norm), in_axes=(0, None, None))
    ks.assert_matches(jax.jit(vmapped)(x, weight, bias), expected)
    nested = jax.vmap(vmapped, in_axes=(0, None, None))
    y = jax.jit(nested)(x.reshape(2, B, CHANNELS, SPATIAL), weight, bias)
    ks.assert_matches(y.reshape(x.shape), expected)


def test_grad_of_vmap():
    x, weight, bias, cotangent = _inputs(B, CHANNELS, SPATIAL, jnp.float32)

    def grads(fn):
        loss = lambda *a: jnp.sum(jax.vmap(_loss(fn), in_axes=(0, None, None, 0))(*a))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, weight, bias, cotangent)

    _assert_all_match(grads(group_norm), grads(reference.group_norm))


def test_vmap_of_grad_gives_per_example_param_grads():
    x, weight, bias, cotangent = _inputs(B, CHANNELS, SPATIAL, jnp.float32)
    per_example = jax.vmap(jax.grad(_loss(group_norm), argnums=(0, 1, 2)), (0, None, None, 0))
    dx, dw, db = jax.jit(per_example)(x, weight, bias, cotangent)
    assert dw.shape == db.shape == (B, CHANNELS)
    reference_grad = jax.jit(jax.grad(_loss(reference.group_norm), argnums=(0, 1, 2)))
    for i in range(B):
        _assert_all_match((dx[i], dw[i], db[i]), reference_grad(x[i], weight, bias, cotangent[i]))


def test_vmap_with_per_example_params():
    """Batched parameters take the unfolded path: Pallas adds a grid axis over examples."""
    x, weight, bias, cotangent = _inputs(B, CHANNELS, SPATIAL, jnp.float32)
    weights = weight[None, :] * jnp.linspace(0.5, 1.5, B)[:, None]

    def run(fn):
        value_and_grad = jax.value_and_grad(_loss(fn), argnums=(0, 1, 2))
        return jax.jit(jax.vmap(value_and_grad, (0, 0, None, 0)))(x, weights, bias, cotangent)

    (value, grads), (expected_value, expected_grads) = run(group_norm), run(reference.group_norm)
    _assert_all_match((value, *grads), (expected_value, *expected_grads))


# --- lowering for GPU and TPU ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("batch,channels,spatial,groups", [(3, 6, 37, 3), CHUNKED[0]])
def test_lowers_for_gpu_and_tpu(batch, channels, spatial, groups, platform, dtype):
    x, weight, bias, _ = _inputs(batch, channels, spatial, dtype)
    forward = lambda x, w, b: group_norm(x, w, b, groups=groups, eps=EPS)  # noqa: E731
    loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32) ** 2)  # noqa: E731
    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    assert ks.kernel_count(ks.lowered(forward, (x, weight, bias), platform), platform) > 0
    assert ks.kernel_count(ks.lowered(value_and_grad, (x, weight, bias), platform), platform) > 1


def test_vmap_folds_examples_into_the_triton_grid():
    """A vmap of 16 one-example calls launches the kernels over the folded 16·groups rows, in
    blocks of rows, not one program per example (nor per row)."""
    examples = 16
    x, weight, bias, cotangent = _inputs(examples, CHANNELS, SPATIAL, jnp.float32)
    rows = examples * GROUPS
    width = c.padded(c.TRITON, CHANNELS // GROUPS) * c.padded(c.TRITON, SPATIAL)
    block_rows = c.block_config(c.TRITON, rows, width).block_rows
    folded = (c.ceil_div(rows, block_rows), 1, 1)
    assert folded[0] < examples
    vmapped = jax.vmap(_one_example(group_norm), in_axes=(0, None, None))
    value_and_grad = jax.value_and_grad(_loss(group_norm), argnums=(0, 1, 2))
    per_example_grads = jax.vmap(value_and_grad, in_axes=(0, None, None, 0))
    assert ks.triton_grids(ks.lowered(vmapped, (x, weight, bias), "cuda")) == [folded]
    grads_text = ks.lowered(per_example_grads, (x, weight, bias, cotangent), "cuda")
    assert ks.triton_grids(grads_text) == [folded, folded]


def _triton_param_operands(text, channels, groups):
    """The leading extents of the `(·, channels/groups, 1)` float32 operands of the Triton
    launches in `text`: `groups` for parameters read in place, `batch·groups` for ones
    expanded per row."""
    calls = [line for line in text.splitlines() if ks.CUSTOM_CALLS["cuda"] in line]
    operands = [call[call.rindex(": (") :].split("->")[0] for call in calls]
    pattern = rf"tensor<(\d+)x{channels // groups}x1xf32>"
    return {int(n) for o in operands for n in re.findall(pattern, o)}


def test_per_channel_params_are_read_in_place():
    """A training step reads per-channel parameters as `(groups, channels/groups, 1)`, a
    reshape, when a block of rows lies in one period of the groups (here 4-row blocks of 8
    groups, so the blocks of the second example wrap around to the first groups): no
    per-row copy, which XLA would launch. Where the blocks straddle the periods (16-row
    blocks of 3 groups: the control), the parameters are expanded per row."""
    for shape, in_place in (((2, 32, 160, 8), True), (SHAPES[1], False)):
        batch, channels, spatial, groups = shape
        x, weight, bias, _ = _inputs(batch, channels, spatial, jnp.float32)
        rows = batch * groups
        width = c.padded(c.TRITON, channels // groups) * c.padded(c.TRITON, spatial)
        assert (groups % c.block_config(c.TRITON, rows, width).block_rows == 0) == in_place
        # Triton's kernels (on JAX 0.12+ a cuda lowering would pick Mosaic GPU's).
        norm = pallas.backend("triton").group_norm
        loss = lambda *a: jnp.sum(norm(*a, groups=groups, eps=EPS) ** 2)  # noqa: B023, E731
        text = ks.lowered(jax.value_and_grad(loss, argnums=(0, 1, 2)), (x, weight, bias), "cuda")
        assert ks.kernel_count(text, "cuda") == 2
        assert _triton_param_operands(text, channels, groups) == {groups if in_place else rows}


# --- determinism and bad input -----------------------------------------------------------------


def test_deterministic():
    batch, channels, spatial, groups = CHUNKED[0]
    args = _inputs(batch, channels, spatial, jnp.float32)
    run = _output_and_grads(group_norm, groups)
    for first, second in zip(run(*args), run(*args), strict=True):
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_wrong_rank_is_rejected_like_the_reference():
    # The kernel takes `(batch, channels, spatial)`; the reference also takes one example
    # `(channels, spatial)` (any leading axes), so rank 1 is what both reject.
    with pytest.raises(TypeCheckError, match="parameter 'x'"):
        group_norm(jnp.ones((4, 6), jnp.float32), None, None, groups=3, eps=EPS)
    for fn in (group_norm, reference.group_norm):
        with pytest.raises(TypeCheckError, match="parameter 'x'"):
            fn(jnp.ones((6,), jnp.float32), None, None, groups=3, eps=EPS)


# --- adaptive modulation (adaLN, FiLM): per-example parameters ---------------------------------

# (batch, channels, spatial, groups): one example and one value per slice, non-powers of two,
# InstanceNorm, a 37×37 image in one pass (groups == channels), and 37×37 with 16 channels per
# group: a slice larger than one block, read in (channel, spatial-chunk) pieces.
ADAPTIVE_SHAPES = [(1, 6, 1, 2), (3, 6, 49, 3), (3, 32, 49, 32), (1, 32, 37 * 37, 32)]
ADAPTIVE_CHUNKED = (3, 32, 37 * 37, 2)
ADAPTIVE_CASES = [(*s, jnp.float32) for s in ADAPTIVE_SHAPES + [ADAPTIVE_CHUNKED]]
ADAPTIVE_CASES += [((3, 6, 49, 3, jnp.bfloat16)), (1, 32, 37 * 37, 32, jnp.float16)]
ADAPTIVE_CASES += [(*ADAPTIVE_CHUNKED, jnp.bfloat16)]


def _adaptive_inputs(batch, channels, spatial, dtype, loc=0.5):
    """`(x, scale, shift, weight, bias, cotangent)`; `scale` of either sign and `1 + scale`
    away from 0, all in `dtype` as a conditioning projection would give them."""
    x, weight, bias, cotangent = _inputs(batch, channels, spatial, dtype, loc=loc)
    scale = ks.data((batch, channels), dtype, seed=3, loc=0.0, scale=0.4)
    shift = ks.data((batch, channels), dtype, seed=4, loc=0.0, scale=1.0)
    return x, scale, shift, weight, bias, cotangent


def _case_id(case):
    *shape, dtype = case
    return "x".join(map(str, shape)) + "-" + jnp.dtype(dtype).name


@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=_case_id)
def test_adaptive_matches_reference(case):
    batch, channels, spatial, groups, dtype = case
    loc = 50.0 if case[:4] == ADAPTIVE_CHUNKED else 0.5
    args = _adaptive_inputs(batch, channels, spatial, dtype, loc=loc)
    assert all(a.dtype == jnp.dtype(dtype) for a in args)
    _assert_matches_reference(adaptive_group_norm, reference.adaptive_group_norm, groups, args)


def test_adaptive_matches_oracle():
    """Against float64 NumPy: GroupNorm without parameters, then `(x̂γ + β)(1 + s) + t`."""
    x, scale, shift, weight, bias, _ = _adaptive_inputs(3, 6, 49, jnp.float32)
    y = adaptive_group_norm(x, scale, shift, weight, bias, groups=3, eps=EPS)
    xhat = oracle.group_norm(x, 3, None, None, EPS)
    per_channel = lambda a: np.asarray(a, np.float64)[..., None]  # noqa: E731
    affine = xhat * per_channel(weight[None]) + per_channel(bias[None])
    oracle.assert_close(y, affine * (1 + per_channel(scale)) + per_channel(shift))


@pytest.mark.parametrize("has_weight,has_bias", [(False, False), (True, False)])
def test_adaptive_optional_params(has_weight, has_bias):
    x, scale, shift, weight, bias, cotangent = _adaptive_inputs(3, 6, 49, jnp.float32)
    weight, bias = weight if has_weight else None, bias if has_bias else None
    args = (x, scale, shift, weight, bias, cotangent)
    actual = _output_and_grads(adaptive_group_norm, 3)(*args)
    _assert_all_match(actual, _output_and_grads(reference.adaptive_group_norm, 3)(*args))


# The module's call: one example `(1, channels, spatial)` with its `(1, channels)` scale and
# shift, `jax.vmap`ped over a batch.


def _adaptive_one_example(fn):
    def one(x, scale, shift, weight, bias):
        return fn(x[None], scale[None], shift[None], weight, bias, groups=GROUPS, eps=EPS)[0]

    return one


def _adaptive_loss(fn):
    return lambda *a: jnp.sum(_adaptive_one_example(fn)(*a[:5]) * a[5])


MODULE_AXES = (0, 0, 0, None, None)


def test_adaptive_vmap_and_nested_vmap():
    x, scale, shift, weight, bias, _ = _adaptive_inputs(2 * B, CHANNELS, SPATIAL, jnp.float32)
    expected = reference.adaptive_group_norm(x, scale, shift, weight, bias, groups=GROUPS, eps=EPS)
    vmapped = jax.vmap(_adaptive_one_example(adaptive_group_norm), MODULE_AXES)
    ks.assert_matches(jax.jit(vmapped)(x, scale, shift, weight, bias), expected)
    nested = jax.vmap(vmapped, MODULE_AXES)
    split = lambda a: a.reshape(2, B, *a.shape[1:])  # noqa: E731
    y = jax.jit(nested)(split(x), split(scale), split(shift), weight, bias)
    ks.assert_matches(y.reshape(x.shape), expected)


def test_adaptive_grad_of_vmap():
    args = _adaptive_inputs(B, CHANNELS, SPATIAL, jnp.float32)

    def grads(fn):
        batched = jax.vmap(_adaptive_loss(fn), (*MODULE_AXES, 0))
        loss = lambda *a: jnp.sum(batched(*a))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)

    actual, expected = grads(adaptive_group_norm), grads(reference.adaptive_group_norm)
    assert actual[3].shape == actual[4].shape == (CHANNELS,)
    _assert_all_match(actual, expected)


def test_adaptive_vmap_of_grad_gives_per_example_param_grads():
    args = _adaptive_inputs(B, CHANNELS, SPATIAL, jnp.float32)

    def grads(fn):
        per_example = jax.grad(_adaptive_loss(fn), argnums=(0, 1, 2, 3, 4))
        return jax.jit(jax.vmap(per_example, (*MODULE_AXES, 0)))(*args)

    actual, expected = grads(adaptive_group_norm), grads(reference.adaptive_group_norm)
    assert actual[3].shape == actual[4].shape == (B, CHANNELS)
    _assert_all_match(actual, expected)


@pytest.mark.parametrize(
    "in_axes",
    [(0, None, None, None, None, 0), (None, 0, 0, 0, None, None)],
    ids=["shared-modulation", "shared-x-per-example-weight"],
)
def test_adaptive_vmap_of_value_and_grad(in_axes):
    """A batch of full `(batch, channels, spatial)` calls where only some arguments are
    vmapped: the unbatched ones are broadcast into the folded batch."""
    x, scale, shift, weight, bias, cotangent = _adaptive_inputs(3, CHANNELS, SPATIAL, jnp.float32)
    stack = lambda a, axis: a if axis is None else jnp.stack([a, 0.5 * a - 1])  # noqa: E731
    unbatched = (x, scale, shift, weight, bias, cotangent)
    args = [stack(a, axis) for a, axis in zip(unbatched, in_axes, strict=True)]

    def run(fn):
        def loss(x, scale, shift, weight, bias, cotangent):
            y = fn(x, scale, shift, weight, bias, groups=GROUPS, eps=EPS)
            return jnp.sum(y * cotangent)

        value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
        return jax.jit(jax.vmap(value_and_grad, in_axes))(*args)

    (value, grads), (expected_value, expected_grads) = (
        run(adaptive_group_norm),
        run(reference.adaptive_group_norm),
    )
    _assert_all_match((value, *grads), (expected_value, *expected_grads))


def test_adaptive_vmap_folds_examples_into_the_triton_grid():
    """A vmap of 16 one-example calls, per-example modulation included, launches each kernel
    once over the folded 16·groups rows, not with a grid axis per example."""
    examples = 16
    x, scale, shift, weight, bias, cotangent = _adaptive_inputs(
        examples, CHANNELS, SPATIAL, jnp.float32
    )
    rows = examples * GROUPS
    width = c.padded(c.TRITON, CHANNELS // GROUPS) * c.padded(c.TRITON, SPATIAL)
    folded = (c.ceil_div(rows, c.block_config(c.TRITON, rows, width).block_rows), 1, 1)
    vmapped = jax.vmap(_adaptive_one_example(adaptive_group_norm), MODULE_AXES)
    value_and_grad = jax.value_and_grad(
        _adaptive_loss(adaptive_group_norm), argnums=(0, 1, 2, 3, 4)
    )
    per_example_grads = jax.vmap(value_and_grad, (*MODULE_AXES, 0))
    args = (x, scale, shift, weight, bias)
    assert ks.triton_grids(ks.lowered(vmapped, args, "cuda")) == [folded]
    grads_text = ks.lowered(per_example_grads, (*args, cotangent), "cuda")
    assert ks.triton_grids(grads_text) == [folded, folded]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    "case", [(3, 6, 49, 3, jnp.float32), (*ADAPTIVE_CHUNKED, jnp.bfloat16)], ids=_case_id
)
def test_adaptive_lowers_for_gpu_and_tpu(case, platform):
    batch, channels, spatial, groups, dtype = case
    x, scale, shift, weight, bias, _ = _adaptive_inputs(batch, channels, spatial, dtype)
    args = (x, scale, shift, weight, bias)
    forward = lambda *a: adaptive_group_norm(*a, groups=groups, eps=EPS)  # noqa: E731
    loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32) ** 2)  # noqa: E731
    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    assert ks.kernel_count(ks.lowered(forward, args, platform), platform) == 1
    assert ks.kernel_count(ks.lowered(value_and_grad, args, platform), platform) == 2


def test_adaptive_deterministic():
    batch, channels, spatial, groups = ADAPTIVE_CHUNKED
    args = _adaptive_inputs(batch, channels, spatial, jnp.float32)
    run = _output_and_grads(adaptive_group_norm, groups)
    for first, second in zip(run(*args), run(*args), strict=True):
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_adaptive_wrong_scale_shape_is_rejected_like_the_reference():
    x = jnp.ones((2, 6, 5), jnp.float32)
    scale = jnp.ones((2, 3), jnp.float32)
    for fn in (adaptive_group_norm, reference.adaptive_group_norm):
        with pytest.raises(TypeCheckError, match="parameter 'scale'"):
            fn(x, scale, scale, None, None, groups=3, eps=EPS)


# --- channels-last input, read in place --------------------------------------------------------

# (batch, channels, spatial, groups): non-powers of two, InstanceNorm (one channel per group,
# a stride-`channels` column per slice), and a slice larger than one block: many short
# channel runs, read in (spatial, channel) pieces.
LAST_SHAPES = [(3, 6, 37, 3), (5, 4, 9, 4), CHUNKED[1]]


def _last(*arrays):
    """Channels-first `(batch, channels, spatial)` arrays moved channels-last."""
    return tuple(jnp.moveaxis(a, 1, -1) for a in arrays)


@pytest.mark.parametrize("batch,channels,spatial,groups", LAST_SHAPES)
def test_channels_last_matches_channels_first_on_moved_input(batch, channels, spatial, groups):
    """Outputs and gradients of the channels-last kernel are the channels-first reference's,
    moved: the same statistics, whichever axis holds the channels."""
    x, weight, bias, cotangent = _inputs(batch, channels, spatial, jnp.float32, loc=20.0)
    y, dx, dw, db = _output_and_grads(group_norm_channels_last, groups)(
        *_last(x), weight, bias, *_last(cotangent)
    )
    expected = _output_and_grads(reference.group_norm, groups)(x, weight, bias, cotangent)
    _assert_all_match((*_last(y, dx), dw, db), expected)
    assert [a.dtype for a in (y, dx, dw, db)] == [jnp.float32] * 4


def test_channels_last_half_precision_and_oracle():
    x, weight, bias, cotangent = _inputs(3, 6, 37, jnp.bfloat16)
    args = (*_last(x), weight, bias, *_last(cotangent))
    _assert_matches_reference(group_norm_channels_last, reference.group_norm_channels_last, 3, args)
    x, weight, bias, _ = _inputs(3, 6, 37, jnp.float32)
    y = group_norm_channels_last(*_last(x), weight, bias, groups=3, eps=EPS)
    oracle.assert_close(y, np.moveaxis(oracle.group_norm(x, 3, weight, bias, EPS), 1, -1))
    y = reference.group_norm_channels_last(*_last(x), weight, bias, groups=3, eps=EPS)
    oracle.assert_close(y, np.moveaxis(oracle.group_norm(x, 3, weight, bias, EPS), 1, -1))


def test_channels_last_vmap_and_grad_of_vmap():
    x, weight, bias, cotangent = _inputs(B, CHANNELS, SPATIAL, jnp.float32)
    x, cotangent = _last(x, cotangent)

    def one(fn):
        return lambda x, w, b: fn(x[None], w, b, groups=GROUPS, eps=EPS)[0]

    def grads(fn):
        loss = lambda x, w, b, ct: jnp.sum(one(fn)(x, w, b) * ct)  # noqa: E731
        batched = lambda *a: jnp.sum(jax.vmap(loss, in_axes=(0, None, None, 0))(*a))  # noqa: E731
        return jax.jit(jax.grad(batched, argnums=(0, 1, 2)))(x, weight, bias, cotangent)

    vmapped = jax.jit(jax.vmap(one(group_norm_channels_last), in_axes=(0, None, None)))
    expected = reference.group_norm_channels_last(x, weight, bias, groups=GROUPS, eps=EPS)
    ks.assert_matches(vmapped(x, weight, bias), expected)
    _assert_all_match(grads(group_norm_channels_last), grads(reference.group_norm_channels_last))


def test_adaptive_channels_last_matches_channels_first_on_moved_input():
    x, scale, shift, weight, bias, cotangent = _adaptive_inputs(3, 32, 49, jnp.float32)
    args = (*_last(x), scale, shift, weight, bias, *_last(cotangent))
    y, dx, *grads = _output_and_grads(adaptive_group_norm_channels_last, 4)(*args)
    expected = _output_and_grads(reference.adaptive_group_norm, 4)(
        x, scale, shift, weight, bias, cotangent
    )
    _assert_all_match((*_last(y, dx), *grads), expected)


def _transposes(text):
    return text.count("stablehlo.transpose")


def test_channels_last_lowers_without_a_transpose():
    """A training step on channels-last input lowers for cuda to the two Triton kernels and
    no transpose (moving the channels first, the alternative, is one: the control); on TPU,
    whose tiling cannot read a strided group in place, to the reference's reductions, again
    without a transpose."""
    x, weight, bias, _ = _inputs(4, 32, 64, jnp.bfloat16)
    (x,) = _last(x)

    def step(norm):
        loss = lambda *a: jnp.sum(norm(*a).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    in_place = step(lambda x, w, b: group_norm_channels_last(x, w, b, groups=8, eps=EPS))
    moved = step(
        lambda x, w, b: jnp.moveaxis(
            group_norm(jnp.moveaxis(x, -1, 1), w, b, groups=8, eps=EPS), 1, -1
        )
    )
    cuda = ks.lowered(in_place, (x, weight, bias), "cuda")
    assert ks.kernel_count(cuda, "cuda") == 2 and _transposes(cuda) == 0
    assert _transposes(ks.lowered(moved, (x, weight, bias), "cuda")) > 0
    tpu = ks.lowered(in_place, (x, weight, bias), "tpu")
    assert ks.kernel_count(tpu, "tpu") == 0 and _transposes(tpu) == 0


def test_channels_last_has_no_mosaic_gpu_kernel():
    x = jnp.ones((2, 9, 4), jnp.float32)
    with pytest.raises(ValueError, match="no channels-last GroupNorm kernel"):
        group_norm_channels_last(x, None, None, groups=2, eps=EPS, backend="mosaic_gpu")
