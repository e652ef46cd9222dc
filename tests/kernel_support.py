"""What the kernel tests share: the awkward shapes, test data, the per-dtype tolerance table of
kernel against reference, and lowering for GPU/TPU without the hardware."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle

ROWS = (1, 37, 199)
WIDTHS = (1, 160, 760, 4096)
# Wider than one block (`_common.MAX_BLOCK_ELEMENTS`): the chunked kernels.
WIDE = 70000

# (rtol, atol) of the kernels against the reference, per dtype, for outputs and gradients
# (scaled by the magnitude of the quantity compared, see `assert_matches`). Both compute in
# float32 with the same algorithms but different summation orders, so float32 agrees to a few
# ulps of the statistics; half-precision outputs may differ by one ulp of their dtype where
# the float32 values straddle a rounding boundary.
TOLERANCES = {
    jnp.dtype(jnp.float32): (2e-5, 2e-5),
    jnp.dtype(jnp.bfloat16): oracle.TOLERANCES[jnp.dtype(jnp.bfloat16)],
    jnp.dtype(jnp.float16): oracle.TOLERANCES[jnp.dtype(jnp.float16)],
}

CUSTOM_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
MOSAIC_GPU_CALL = "mosaic_gpu_v2"  # a Mosaic GPU kernel's custom call (the row norms, JAX 0.12+)


def data(shape, dtype, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(loc, scale, size=shape).astype(np.float32)).astype(dtype)


def params(width, dtype=jnp.float32, seed=1):
    """A weight near 1 and a bias near 0 of `(width,)`."""
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.5, 1.5, size=width).astype(np.float32)
    bias = rng.normal(size=width).astype(np.float32)
    return jnp.asarray(weight).astype(dtype), jnp.asarray(bias).astype(dtype)


def assert_matches(actual, expected, dtype=None):
    """`actual` (kernel) against `expected` (reference) with the tolerance of `dtype`
    (default `actual.dtype`), the absolute part scaled by the largest |expected| so sums
    (weight gradients over many rows) are compared relative to their size."""
    dtype = jnp.dtype(actual.dtype if dtype is None else dtype)
    rtol, atol = TOLERANCES[dtype]
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    assert actual.shape == expected.shape
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol * scale
    )


def devices(n):
    """`n` devices of JAX's default backend, or the host's CPU devices where it has fewer (a
    GPU run of the suite, `JAX_PLATFORMS=cuda,cpu`: one GPU, and conftest's 8 CPU devices)."""
    found = jax.devices()
    return found[:n] if len(found) >= n else jax.devices("cpu")[:n]


def lowered(fn, args, platform):
    """The StableHLO text of `jax.jit(fn)` exported for `platform` ("cuda" or "tpu") from this
    CPU machine, with the kernels' custom calls allowed."""
    exported = jax.export.export(
        jax.jit(fn),
        platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALLS[platform])],
    )(*args)
    return exported.mlir_module()


def kernel_count(text, platform):
    """How many Pallas kernels `text` (from `lowered`) launches (on cuda, Triton's and Mosaic
    GPU's)."""
    mosaic_gpu = text.count(MOSAIC_GPU_CALL) if platform == "cuda" else 0
    return text.count(CUSTOM_CALLS[platform]) + mosaic_gpu


def triton_grids(text):
    """The `(grid_x, grid_y, grid_z)` of every Triton launch in `text`."""
    return [
        tuple(int(v) for v in m)
        for m in re.findall(r"grid_x = (\d+)[^}]*?grid_y = (\d+)[^}]*?grid_z = (\d+)", text)
    ]


def assert_impls_agree(build, run, x, seed=2):
    """A layer built by `build(impl)` and applied by `run(layer, x)` (to a batch) gives the
    same output, and the same gradients of `sum(output * cotangent)` with respect to its
    parameters and `x`, with `impl="pallas"` (interpret mode here) as with `"reference"`."""
    import equinox as eqx

    results = []
    for impl in ("pallas", "reference"):

        def loss(layer_and_x):
            y = run(*layer_and_x)
            cotangent = data(y.shape, jnp.float32, seed=seed, loc=0.0, scale=1.0)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        (_, y), grads = grad_fn((build(impl), x))
        results.append((y, jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype
    assert_matches(y, y_ref)
    assert len(grads) == len(grads_ref) >= 2
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_matches(grad, grad_ref)


def outputs_and_grads(fn):
    """`(params, *inputs) -> (outputs, gradients with respect to the params and inputs)` of
    `fn(params, *inputs)`, through the loss `sum(sin(2·output))`: not a plain sum, whose
    gradient through a normalization vanishes; elementwise, so it is the same function of
    each element wherever that element lives (on any device, in any process)."""

    def run(params, *inputs):
        def loss(params, *inputs):
            out = fn(params, *inputs)
            return sum(jnp.sum(jnp.sin(2 * o)) for o in jax.tree.leaves(out)), out

        argnums = tuple(range(1 + len(inputs)))
        (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(params, *inputs)
        return out, grads

    return run


def run_mosaic_gpu(fn):
    """`fn()` (a call of the kernels pinned to Mosaic GPU, run by its interpreter on CPU)
    where the installed JAX has Mosaic GPU's API (0.12+); elsewhere, assert it raises the
    `ValueError` naming the JAX needed, and return `None`."""
    from eqxnorm.kernels import _mosaic_gpu

    if _mosaic_gpu.usable():
        return fn()
    with pytest.raises(ValueError, match="Mosaic GPU kernels need JAX 0.12"):
        fn()
    return None


def assert_trees_match(actual, expected, dtype=None):
    """[`assert_matches`][] leaf by leaf over two pytrees of the same structure."""
    leaves = jax.tree.leaves(actual)
    assert len(leaves) == len(jax.tree.leaves(expected))
    for a, e in zip(leaves, jax.tree.leaves(expected), strict=True):
        assert_matches(a, e, dtype)


def assert_layouts_agree(build, run, x, seed=2):
    """A layer built channels-last by `build(channel_axis=-1, impl="pallas")` and applied by
    `run(layer, x)` to the channels-last batch gives the output, and the gradients of
    `sum(output * cotangent)` with respect to its parameters and `x`, of the channels-first
    reference layer `build(channel_axis=0, impl="reference")` on the channels-first batch `x`
    `(batch, channels, *spatial)`, moved: the kernels read the layout in place."""
    import equinox as eqx

    def outputs_and_grads(channel_axis, impl):
        move = (lambda a: jnp.moveaxis(a, 1, -1)) if channel_axis == -1 else (lambda a: a)
        back = (lambda a: jnp.moveaxis(a, -1, 1)) if channel_axis == -1 else (lambda a: a)

        def loss(layer_and_x):
            y = run(*layer_and_x)
            shape = y.shape if channel_axis == 0 else (y.shape[0], y.shape[-1], *y.shape[1:-1])
            cotangent = data(shape, jnp.float32, seed=seed, loc=0.0, scale=1.0)
            return jnp.sum(y.astype(jnp.float32) * move(cotangent)), y

        grad_fn = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        layer = build(channel_axis=channel_axis, impl=impl)
        (_, y), (grads, dx) = grad_fn((layer, move(x)))
        return back(y), back(dx), jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))

    y, dx, grads = outputs_and_grads(-1, "pallas")
    y_ref, dx_ref, grads_ref = outputs_and_grads(0, "reference")
    assert_matches(y, y_ref)
    assert_matches(dx, dx_ref)
    assert len(grads) == len(grads_ref) >= 2
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_matches(grad, grad_ref)


def bits(a):
    """The bytes of a float8 array, to compare bit for bit."""
    return np.asarray(a.view(jnp.uint8))


def assert_fp8_exact(q, amax, y32, scale, q_ref, amax_ref):
    """The FP8 contract: `(q, amax)` is `reference.quantize_fp8` of the kernel's own float32
    output `y32`, bit for bit (the clip, the rounding and the amax are the reference's); and
    against the reference's `(q_ref, amax_ref)`, whose float32 output differs from `y32` in
    the last bits (its statistics are summed in another order), the codes within one float8
    step, or where `y` nearly cancels to 0, within that float32 rounding scaled: a few
    float32 steps of the row's largest `|y|`, times `scale` (an H200 found a code two float8
    steps apart at `y` of 4e-7 among values of 7, scaled by 1e5)."""
    from eqxnorm.kernels import reference

    q_y32, amax_y32 = reference.quantize_fp8(y32.astype(jnp.float32), scale, q.dtype)
    np.testing.assert_array_equal(bits(q), bits(q_y32))
    assert float(amax) == float(amax_y32)
    assert np.mean(bits(q) != bits(q_ref)) < 0.01
    step = float(jnp.finfo(q.dtype).eps)
    rounding = 4 * float(jnp.finfo(jnp.float32).eps) * float(amax) * float(scale)
    np.testing.assert_allclose(
        q.astype(np.float32), q_ref.astype(np.float32), rtol=step, atol=rounding
    )
    np.testing.assert_allclose(amax, amax_ref, rtol=1e-6)
