"""The group norms' Mosaic GPU kernels (`eqxnorm.kernels._group_norm_mosaic_gpu`), run by Mosaic
GPU's interpreter on CPU (`impl="mosaic_gpu"`) against the reference, forward and backward:
GroupNorm, InstanceNorm and adaptive GroupNorm; their choice when lowering for cuda."""

import jax
import jax.numpy as jnp
import pytest

import kernel_support as ks
from eqxnorm.kernels import _group_norm_mosaic_gpu, _mosaic_gpu, pallas, reference

EPS = 1e-5
MOSAIC_GPU = pallas.backend("mosaic_gpu")
# (batch, channels, spatial, groups, dtype): GroupNorm with 2 to 8 channels a group,
# InstanceNorm (groups == channels), one example; the parameters read in place (blocks of 4
# rows within the 8 groups, 2 boxes a channel) or from per-row tables (the others).
CASES = [
    (3, 12, 64, 4, jnp.float32),
    (2, 16, 256, 8, jnp.float32),
    (2, 32, 160, 8, jnp.bfloat16),
    (5, 6, 48, 6, jnp.float32),
    (1, 4, 96, 2, jnp.float16),
]


def _ids(case):
    *shape, dtype = case
    return "x".join(map(str, shape)) + "-" + jnp.dtype(dtype).name


def _output_and_grads(fn, *args):
    *inputs, cotangent = args
    y, vjp = jax.vjp(fn, *inputs)
    return (y, *vjp(cotangent))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_group_norm_matches_reference(case):
    batch, channels, spatial, groups, dtype = case
    x = ks.data((batch, channels, spatial), dtype)
    weight, bias = ks.params(channels, dtype)
    cotangent = ks.data(x.shape, dtype, seed=7)

    def run(module):
        fn = lambda *a: module.group_norm(*a, groups=groups, eps=EPS)  # noqa: E731
        return jax.jit(lambda *a: _output_and_grads(fn, *a))(x, weight, bias, cotangent)

    out = ks.run_mosaic_gpu(lambda: run(MOSAIC_GPU))
    if out is None:
        return
    for actual, expected, arg in zip(out, run(reference), (x, x, weight, bias), strict=True):
        assert actual.dtype == arg.dtype
        ks.assert_matches(actual, expected)


@pytest.mark.parametrize("batch, spatial, dtype", [(3, 64, jnp.bfloat16), (4, 256, jnp.float32)])
def test_adaptive_group_norm_matches_reference(batch, spatial, dtype):
    # 3 × 4 rows in a padded block: per-row tables; 4 × 4 rows in blocks of 4: read in place.
    x = ks.data((batch, 8, spatial), dtype)
    scale, shift = (ks.data((batch, 8), jnp.float32, seed=s, loc=0.0, scale=0.3) for s in (3, 4))
    weight, bias = ks.params(8)
    cotangent = ks.data(x.shape, dtype, seed=7)

    def run(module):
        fn = lambda *a: module.adaptive_group_norm(*a, groups=4, eps=EPS)  # noqa: E731
        args = (x, scale, shift, weight, bias, cotangent)
        return jax.jit(lambda *a: _output_and_grads(fn, *a))(*args)

    out = ks.run_mosaic_gpu(lambda: run(MOSAIC_GPU))
    if out is not None:
        for actual, expected in zip(out, run(reference), strict=True):
            ks.assert_matches(actual, expected)


def test_staging_keeps_each_box_in_one_channel():
    if not _mosaic_gpu.usable():
        return
    # spatial 48 in bfloat16: boxes of 16 columns (2 lanes × 8), three to a channel.
    x = jax.ShapeDtypeStruct((2, 8, 48), jnp.bfloat16)
    boxes = _group_norm_mosaic_gpu._staging(x, 4, 2)
    assert boxes.cols == 16 and 48 % boxes.cols == 0 and boxes.chunks == 6
    # 7 × 9 spatial positions of float32 (252 bytes a channel): TMA cannot stage the rows.
    odd = jax.ShapeDtypeStruct((2, 8, 63), jnp.float32)
    assert not _group_norm_mosaic_gpu.forward_supported(4, odd, None, None)
    # 760 float16 a channel: boxes of 8 columns (one lane), whose 128-row tiles do not fit.
    narrow = jax.ShapeDtypeStruct((1, 4, 760), jnp.float16)
    assert not _group_norm_mosaic_gpu.forward_supported(2, narrow, None, None)


def test_parameters_are_read_in_place_where_blocks_allow():
    if not _mosaic_gpu.usable():
        return
    x = jax.ShapeDtypeStruct((2, 16, 256), jnp.float32)
    boxes = _group_norm_mosaic_gpu._staging(x, 8, 4)
    assert boxes.block_rows == 4 and boxes.cols == 128
    weight, per_example = jnp.arange(16.0), jnp.arange(32.0).reshape(2, 16)
    table, per_box = _group_norm_mosaic_gpu._tables(weight, 2, 8, 256, boxes)
    assert table.shape == (1, 8, 2) and per_box == (2, 8)
    assert table[0, 3, 1] == weight[7]  # group 3's second channel
    table, per_box = _group_norm_mosaic_gpu._tables(per_example, 2, 8, 256, boxes)
    assert table.shape == (1, 16, 2) and per_box == (2, 0) and table[0, 11, 0] == 22.0
    # Groups a block straddles (2 groups, blocks of 4 rows): a per-row table, padded.
    table, per_box = _group_norm_mosaic_gpu._tables(weight, 3, 2, 256, boxes)
    assert table.shape == (1, 8, 8) and per_box == (2, 0) and table[0, 5, 7] == 15.0


def test_pallas_chooses_mosaic_gpu_on_cuda_where_it_can():
    def calls(spatial):
        x = jnp.ones((4, 16, spatial), jnp.bfloat16)
        weight, bias = ks.params(16)

        def step(x):
            y = pallas.group_norm(x, weight, bias, groups=4, eps=EPS)
            return jax.grad(lambda x: pallas.group_norm(x, weight, bias, groups=4, eps=EPS).sum())(
                x
            ), y

        text = ks.lowered(step, (x,), "cuda")
        return text.count(ks.MOSAIC_GPU_CALL), text.count(ks.CUSTOM_CALLS["cuda"])

    mosaic, triton = calls(64)
    assert (mosaic > 0 and triton == 0) if _mosaic_gpu.usable() else (mosaic == 0 and triton > 0)
    assert calls(63)[0] == 0  # rows TMA cannot stage: Triton


def test_ensemble_of_parameters():
    x = ks.data((3, 4, 8, 64), jnp.float32)
    weights = jnp.ones((3, 8)) * jnp.arange(1.0, 4.0)[:, None]

    def run(module):
        def loss(x, weights):
            norm = lambda xi, wi: module.group_norm(xi, wi, None, groups=2, eps=EPS)  # noqa: E731
            return jnp.sum(jax.vmap(norm)(x, weights) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, weights)

    out = ks.run_mosaic_gpu(lambda: run(MOSAIC_GPU))
    if out is not None:
        ks.assert_trees_match(out, run(reference))
