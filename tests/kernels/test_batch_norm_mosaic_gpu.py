"""BatchNorm's Mosaic GPU kernels (`eqxnorm.kernels._batch_norm_mosaic_gpu`), run by Mosaic GPU's
interpreter on CPU (`impl="mosaic_gpu"`) against the reference: training (batch statistics,
their gradients) and inference; their choice when lowering for cuda."""

import jax
import jax.numpy as jnp
import pytest

import kernel_support as ks
from eqxnorm.kernels import _mosaic_gpu, pallas, reference

EPS = 1e-5
MOSAIC_GPU = pallas.backend("mosaic_gpu")
CASES = [((5, 12, 64), jnp.float32), ((3, 8, 760), jnp.bfloat16), ((37, 3, 16), jnp.float16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_training_matches_reference(case):
    shape, dtype = case
    # A large mean: the statistics keep float32 accuracy through the shift.
    x = ks.data(shape, dtype, loc=20.0)
    weight, bias = ks.params(shape[1])
    cotangent = ks.data(shape, jnp.float32, seed=7)

    def run(module):
        def loss(x, weight, bias):
            y, mean, var = module.batch_norm(x, weight, bias, eps=EPS)
            return jnp.sum(y.astype(jnp.float32) * cotangent) + jnp.sum(mean * var), (y, mean, var)

        fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, outs), grads = jax.jit(fn)(x, weight, bias)
        return (*outs, *grads)

    out = ks.run_mosaic_gpu(lambda: run(MOSAIC_GPU))
    if out is not None:
        for actual, expected in zip(out, run(reference), strict=True):
            ks.assert_matches(actual, expected, dtype if actual.dtype == dtype else None)


def test_inference_matches_reference():
    x = ks.data((4, 8, 64), jnp.bfloat16)
    mean, var = ks.data((8,), jnp.float32, seed=2), jnp.linspace(0.5, 2.0, 8)
    weight, bias = ks.params(8)

    def run(module):
        return module.batch_norm_inference(x, mean, var, weight, bias, eps=EPS)

    y = ks.run_mosaic_gpu(lambda: run(MOSAIC_GPU))
    if y is not None:
        ks.assert_matches(y, run(reference))


def test_pallas_chooses_mosaic_gpu_on_cuda_where_it_can():
    def calls(spatial):
        x = jnp.ones((4, 16, spatial), jnp.bfloat16)

        def step(x):
            return jax.grad(lambda x: pallas.batch_norm(x, None, None, eps=EPS)[0].sum())(x)

        text = ks.lowered(step, (x,), "cuda")
        return text.count(ks.MOSAIC_GPU_CALL), text.count(ks.CUSTOM_CALLS["cuda"])

    mosaic, triton = calls(64)
    assert (mosaic > 0 and triton == 0) if _mosaic_gpu.usable() else (mosaic == 0 and triton > 0)
    # BatchNorm over (batch, features): one element a row, which TMA cannot stage: Triton.
    assert calls(1)[0] == 0


def test_vmap_of_batches():
    # Independent batch statistics per vmapped member (the moments kernel batched by Mosaic
    # GPU's own grid axis).
    x = ks.data((2, 4, 8, 64), jnp.float32, loc=3.0)

    def run(module):
        def loss(x):
            norm = lambda xi: module.batch_norm(xi, None, None, eps=EPS)[0]  # noqa: E731
            return jnp.sum(jax.vmap(norm)(x) ** 2)

        return jax.jit(jax.value_and_grad(loss))(x)

    out = ks.run_mosaic_gpu(lambda: run(MOSAIC_GPU))
    if out is not None:
        ks.assert_trees_match(out, run(reference))


def _mosaic_gpu_operands(text):
    """The operand types of the Mosaic GPU launches in `text`."""
    calls = [line for line in text.splitlines() if ks.MOSAIC_GPU_CALL in line]
    return [call[call.rindex(": (") :].split("->")[0] for call in calls]


def test_per_channel_arrays_are_read_in_place_where_blocks_tile_the_channels():
    """A training step's kernels read the per-channel arrays (`(channels,)` float32) in place
    when a block's rows are consecutive channels of one example (8-row blocks of 16
    channels), with no per-row copies, which XLA would launch; with 12 channels (the
    control) the blocks straddle examples and read tables of one value per row. (A JAX
    without Mosaic GPU runs Triton's kernels: no Mosaic GPU launch.)"""
    for channels, in_place in ((16, True), (12, False)):
        x = jnp.ones((5, channels, 64), jnp.float32)

        def step(x, weight, bias):
            loss = lambda *a: pallas.batch_norm(*a, eps=EPS)[0].sum()  # noqa: E731
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, weight, bias)

        params = (jnp.ones((channels,)), jnp.zeros((channels,)))
        operands = _mosaic_gpu_operands(ks.lowered(step, (x, *params), "cuda"))
        assert len(operands) == (3 if _mosaic_gpu.usable() else 0)
        per_channel, per_row = f"tensor<{channels}xf32>", f"tensor<{5 * channels}xf32>"
        padded_rows = "tensor<64xf32>"
        for o in operands:
            assert (per_channel in o) == in_place
            assert (per_row in o or padded_rows in o) != in_place
