"""The row-norm kernels with per-row valid lengths (`row_norm.layer_norm_lengths`,
`rms_norm_lengths`, what `lengths=` runs on the kernel path) in interpret mode (Triton's,
and Mosaic GPU's interpreter on JAX 0.12+) against the reference's masked normalization,
and their lowering for GPU and TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_support as ks
from eqxnorm import functional
from eqxnorm.kernels import _common, _mosaic_gpu, pallas, reference, row_norm

OPS = ("layer_norm", "rms_norm")
EPS = 1e-5
# Each of the row counts and widths of the other kernel tests (`ks.ROWS`, widths 160 and 760)
# and float32 and bfloat16, each at least once.
CASES = [(1, 760, jnp.float32), (37, 160, jnp.bfloat16), (199, 760, jnp.bfloat16)]


def _ids(case):
    rows, width, dtype = case
    return f"{rows}x{width}-{jnp.dtype(dtype).name}"


def _lengths(rows, width, seed=0):
    """Random lengths in [1, width), with empty rows (0) and full ones (width)."""
    lengths = np.random.default_rng(seed).integers(1, width, rows)
    lengths[1::5] = width
    lengths[2::7] = 0
    return jnp.asarray(lengths, jnp.int32)


def _value_and_grads(fn):
    """`(y, (dx, dweight, dbias))` of `sum(y * cotangent)` for `fn(x, weight, bias)`."""

    @jax.jit
    def run(x, weight, bias, cotangent):
        def loss(x, weight, bias):
            y = fn(x, weight, bias)
            return jnp.sum(y.astype(jnp.float32) * cotangent), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weight, bias)
        return y, grads

    return run


def _pair(op, lengths, backend="auto"):
    """The kernel with `lengths`, and the reference with the mask `col < lengths`."""

    def kernel(x, weight, bias):
        fn = getattr(row_norm, f"{op}_lengths")
        return fn(x, lengths, weight, bias, eps=EPS, backend=backend)

    def masked(x, weight, bias):
        mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
        return getattr(reference, op)(x, weight, bias, eps=EPS, mask=mask)

    return kernel, masked


def _check(op, rows, width, dtype, seed=0, backend="auto"):
    x = ks.data((rows, width), dtype, seed=seed)
    weight, bias = ks.params(width, dtype)
    cotangent = ks.data((rows, width), jnp.float32, seed=seed + 1, loc=0.0, scale=1.0)
    lengths = _lengths(rows, width, seed)
    kernel, masked = _pair(op, lengths, backend)

    def run():
        return _value_and_grads(kernel)(x, weight, bias, cotangent)

    out = ks.run_mosaic_gpu(run) if backend == "mosaic_gpu" else run()
    if out is None:
        return
    y, grads = out
    y_ref, grads_ref = _value_and_grads(masked)(x, weight, bias, cotangent)
    assert y.dtype == dtype
    ks.assert_matches(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        ks.assert_matches(grad, grad_ref)
    empty = np.asarray(lengths) == 0
    if empty.any():  # a row of no valid column is its bias, and passes no gradient to x
        np.testing.assert_array_equal(np.asarray(y)[empty], np.broadcast_to(bias, y.shape)[empty])
        assert not np.asarray(grads[0], np.float32)[empty].any()


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("op", OPS)
def test_lengths_match_the_masked_reference(op, case):
    _check(op, *case)


@pytest.mark.parametrize("op", OPS)
def test_chunked_rows(op, monkeypatch):
    # Rows wider than a block, read in chunks (Chan's combination of the valid columns):
    # a small block here, so that 760 columns are 6 chunks, the last one partial.
    monkeypatch.setattr(_common, "MAX_BLOCK_ELEMENTS", 128)
    monkeypatch.setattr(_common, "CHUNK_COLS", 128)
    assert _common.block_config(_common.INTERPRET, 9, 760).chunks == 6
    _check(op, 9, 760, jnp.float32, seed=3)


def test_persistent_backward_loops_over_blocks(monkeypatch):
    # One SM: the backward is one program of 32 warps looping over 3 blocks of 16 rows (the
    # parameter gradients summed in its loop's carry), and over 2 blocks of chunked rows (its
    # partial row read, added to and written back per chunk).
    monkeypatch.setattr(_mosaic_gpu, "_sm_count", lambda: 1)
    plan = _common.persistent_config(_common.block_config(_common.INTERPRET, 37, 160), 37)
    assert (plan.programs, plan.iterations) == (1, 3)
    _check("layer_norm", 37, 160, jnp.bfloat16, seed=5)
    monkeypatch.setattr(_common, "MAX_BLOCK_ELEMENTS", 128)
    monkeypatch.setattr(_common, "CHUNK_COLS", 128)
    monkeypatch.setattr(_common, "PERSISTENT_RESIDENT_WARPS", 2)  # one program of 2 warps
    plan = _common.persistent_config(_common.block_config(_common.INTERPRET, 9, 760), 9)
    assert (plan.programs, plan.iterations, plan.config.chunks) == (1, 2, 6)
    _check("rms_norm", 9, 760, jnp.float32, seed=6)


def test_forward_mode_and_vmap():
    rows, width = 8, 160
    x = ks.data((rows, width), jnp.float32)
    weight, bias = ks.params(width)
    lengths = _lengths(rows, width)
    kernel, masked = _pair("layer_norm", lengths)
    tangents = tuple(ks.data(a.shape, jnp.float32, seed=5 + i) for i, a in enumerate((x, weight)))
    t = jax.jvp(lambda x, w: kernel(x, w, bias), (x, weight), tangents)[1]
    t_ref = jax.jvp(lambda x, w: masked(x, w, bias), (x, weight), tangents)[1]
    ks.assert_matches(t, t_ref)

    # One example at a time (a module's call): the vmap folds the examples into the rows,
    # and their lengths with them.
    def one(xi, li):
        return functional.layer_norm(xi, weight, bias, lengths=li, eps=EPS, impl="pallas")

    ks.assert_matches(jax.jit(jax.vmap(one))(x, lengths), masked(x, weight, bias))


def test_functional_lengths_over_several_axes_run_the_kernels():
    # `lengths` of the batch shape, over the normalized axes flattened row-major.
    x = ks.data((2, 3, 4, 40), jnp.float32)
    lengths = jnp.asarray([[0, 160, 17], [1, 80, 159]], jnp.int32)
    args = dict(shape=(4, 40), lengths=lengths, eps=EPS)
    y = jax.jit(lambda x: functional.layer_norm(x, impl="pallas", **args))(x)
    ks.assert_matches(y, functional.layer_norm(x, impl="reference", **args))
    text = ks.lowered(lambda x: functional.rms_norm(x, impl="pallas", **args), [x], "cuda")
    assert "eqxnorm_rms_norm_lengths_fwd" in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("mosaic", [False, True], ids=["default", "mosaic-gpu-auto"])
def test_lowers_to_the_kernels_with_gradient(platform, mosaic, request):
    # On a GPU or TPU, `lengths=` runs the two kernels and nothing else: no mask array, no
    # reference. On cuda, Triton's (measured faster, `row_norm.MOSAIC_GPU_AUTO`), or Mosaic
    # GPU's where `impl="auto"` takes them and JAX has them (0.12+).
    if mosaic:
        request.getfixturevalue("mosaic_gpu_auto")

    def value_and_grads(x, lengths, weight, bias):
        def loss(x, weight, bias):
            y = functional.layer_norm(x, weight, bias, lengths=lengths, impl="pallas")
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, weight, bias)

    shapes = [((37, 760), jnp.bfloat16), ((37,), jnp.int32), ((760,), jnp.bfloat16)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes + shapes[2:]]
    text = ks.lowered(value_and_grads, args, platform)
    assert ks.kernel_count(text, platform) == 2
    assert "eqxnorm_layer_norm_lengths_fwd" in text and "eqxnorm_layer_norm_lengths_bwd" in text
    if platform == "cuda":
        runs = mosaic and _mosaic_gpu.usable()
        assert text.count(ks.MOSAIC_GPU_CALL) == (2 if runs else 0)


@pytest.mark.parametrize(
    "op, case", [("layer_norm", (199, 160, jnp.float32)), ("rms_norm", (1, 760, jnp.bfloat16))]
)
def test_mosaic_gpu_kernels(op, case):
    # The Mosaic GPU kernels (`_row_norm_mosaic_gpu.lengths_forward_on`/`_backward_on`) in
    # its interpreter on JAX 0.12+; on older JAX the pinned call raises, naming the JAX needed.
    _check(op, *case, backend="mosaic_gpu")


def test_float64_runs_the_reference_with_the_mask():
    with jax.enable_x64(True):
        x = ks.data((5, 16), jnp.float64)
        lengths = jnp.asarray([0, 3, 16, 9, 1], jnp.int32)
        mask = jnp.arange(16, dtype=jnp.int32)[None, :] < lengths[:, None]
        y = jax.jit(lambda x: pallas.layer_norm(x, None, None, eps=EPS, lengths=lengths))(x)
        assert y.dtype == jnp.float64
        expected = jax.jit(lambda x: reference.layer_norm(x, None, None, eps=EPS, mask=mask))(x)
        np.testing.assert_array_equal(y, expected)


def test_sharded_rows_stay_local():
    # Rows split over the 8 host devices (conftest): the lengths split with them by the
    # kernels' sharding rule, each device normalizing its own rows (no all-gather).
    from jax.sharding import NamedSharding, PartitionSpec as P

    rows = 16
    split = NamedSharding(jax.make_mesh((8,), ("batch",)), P("batch"))
    x, lengths = ks.data((rows, 160), jnp.float32), _lengths(rows, 160)

    def loss(impl):
        def fn(x, lengths):
            y = functional.layer_norm(x, lengths=lengths, eps=EPS, impl=impl)
            return jnp.sum(jnp.sin(2 * y))

        return jax.jit(jax.value_and_grad(fn))

    args = (jax.device_put(x, split), jax.device_put(lengths, split))
    compiled = loss("pallas").lower(*args).compile()
    assert " all-gather(" not in compiled.as_text()
    for a, e in zip(compiled(*args), loss("reference")(x, lengths), strict=True):
        ks.assert_matches(a, e)


@pytest.mark.parametrize("xla", [True, False], ids=["xla", "kernels"])
def test_auto_with_the_tuning_cache_takes_lengths(xla, monkeypatch):
    # impl="auto" on a GPU/TPU asks the tuning cache (traced on the folded rows, lengths
    # included); where it prefers XLA, the reference gets the lengths as their mask.
    from eqxnorm import _dispatch
    from eqxnorm.kernels import _tuning

    monkeypatch.setattr(_tuning, "prefers_xla", lambda trace: trace() is not None and xla)
    x = ks.data((6, 32), jnp.float32)
    lengths = jnp.asarray([0, 32, 5, 1, 17, 9], jnp.int32)
    mask = jnp.arange(32)[None, :] < lengths[:, None]

    def one(xi, li):
        return _dispatch.MEASURED.layer_norm(xi[None], None, None, eps=EPS, lengths=li[None])[0]

    y = jax.jit(jax.vmap(one))(x, lengths)
    ks.assert_matches(y, reference.layer_norm(x, None, None, eps=EPS, mask=mask))
