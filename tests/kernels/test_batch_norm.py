"""The BatchNorm Pallas kernels (`eqxnorm.kernels.batch_norm`, interpret mode on CPU) against
the reference: outputs, statistics and every gradient, under jit, vmap, grad, shard_map and pmap,
and lowered for GPU and TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import TypeCheckError

import kernel_support as ks
import oracle
from eqxnorm.kernels import _common as c, batch_norm as bn, reference

EPS = 1e-5
# (batch, channels, spatial): a one-example batch, BatchNorm1d's spatial 1 with many channels,
# odd sizes, a slab wider than one block (split over channels), a batch over several blocks,
# and space split into blocks with a partial last one.
SHAPES = [(1, 3, 37), (37, 160, 1), (4, 13, 199), (2, 8, 4096), (199, 5, 1), (3, 6, 5000)]
HALF = [jnp.bfloat16, jnp.float16]


def _cotangents(shape, dtype, seed=7):
    """Random cotangents for `(y, mean, var)`."""
    rng = np.random.default_rng(seed)
    dy = jnp.asarray(rng.normal(size=shape).astype(np.float32)).astype(dtype)
    dmean, dvar = (jnp.asarray(rng.normal(size=shape[1]).astype(np.float32)) for _ in "mv")
    return dy, dmean, dvar


@functools.cache
def _training(module, affine=True):
    """Jitted `(x, weight, bias, cotangents) -> ((y, mean, var), (dx, dweight, dbias))`."""

    def run(x, weight, bias, cotangents):
        fn = functools.partial(module.batch_norm, eps=EPS)
        if not affine:
            out, vjp = jax.vjp(lambda x: fn(x, None, None), x)
            return out, vjp(cotangents)
        out, vjp = jax.vjp(fn, x, weight, bias)
        return out, vjp(cotangents)

    return jax.jit(run)


@functools.cache
def _inference(module):
    """Jitted `(x, mean, var, weight, bias, dy) -> (y, (dx, dmean, dvar, dweight, dbias))`."""

    def run(x, mean, var, weight, bias, dy):
        y, vjp = jax.vjp(
            functools.partial(module.batch_norm_inference, eps=EPS), x, mean, var, weight, bias
        )
        return y, vjp(dy)

    return jax.jit(run)


def _assert_tree_matches(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        ks.assert_matches(a, e)


@pytest.mark.parametrize(
    "shape,dtype",
    [(s, jnp.float32) for s in SHAPES]
    + [(s, d) for s in ((4, 13, 199), (37, 160, 1)) for d in HALF],
    ids=str,
)
def test_training_matches_reference(shape, dtype):
    x = ks.data(shape, dtype, seed=sum(shape))
    weight, bias = ks.params(shape[1], dtype)
    cotangents = _cotangents(shape, dtype)
    actual = _training(bn)(x, weight, bias, cotangents)
    expected = _training(reference)(x, weight, bias, cotangents)
    _assert_tree_matches(actual, expected)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
def test_gradient_parts_do_not_cancel_in_half_precision(dtype):
    """For `L = Σ y²` the parts of `∂L/∂x` through `y` and through the statistics nearly
    cancel; they must be summed in float32 and rounded once, as the reference does."""
    shape = (8, 6, 50)
    x = ks.data(shape, dtype)
    weight, bias = ks.params(shape[1], dtype)
    bias = bias + 3

    def grad(module):
        def loss(x):
            y = module.batch_norm(x, weight, bias, eps=EPS)[0]
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        return jax.jit(jax.grad(loss))(x)

    ks.assert_matches(grad(bn), grad(reference))


def test_training_without_affine():
    shape = (4, 13, 199)
    x = ks.data(shape, jnp.float32)
    cotangents = _cotangents(shape, jnp.float32)
    actual = _training(bn, affine=False)(x, None, None, cotangents)
    expected = _training(reference, affine=False)(x, None, None, cotangents)
    _assert_tree_matches(actual, expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_inference_matches_reference(dtype):
    shape = (4, 13, 199)
    x = ks.data(shape, dtype)
    weight, bias = ks.params(shape[1], dtype)
    mean, var = (jnp.asarray(a, jnp.float32) for a in (bias, weight))
    dy = _cotangents(shape, dtype)[0]
    args = (x, mean, var, weight, bias, dy)
    _assert_tree_matches(_inference(bn)(*args), _inference(reference)(*args))
    y = bn.batch_norm_inference(x, mean, var, None, None, eps=EPS)
    ks.assert_matches(y, reference.batch_norm_inference(x, mean, var, None, None, eps=EPS))


def test_matches_oracle_at_large_mean():
    """Mean 1e4, std 1: the variance (no `E[x²] − E[x]²` cancellation) and the output keep
    float32 accuracy, like the reference's."""
    x = ks.data((8, 4, 300), jnp.float32, loc=1e4, scale=1.0)
    weight, bias = ks.params(4)
    y, mean, var = jax.jit(functools.partial(bn.batch_norm, eps=EPS))(x, weight, bias)
    y_ref, mean_ref, var_ref = reference.batch_norm(x, weight, bias, eps=EPS)
    y_np, mean_np, var_np = oracle.batch_norm(x, weight, bias, EPS)
    for actual, expected in ((y, y_ref), (mean, mean_ref), (var, var_ref)):
        ks.assert_matches(actual, expected)
    oracle.assert_close(var, var_np)
    # Half an ulp of 1e4 in float32 is 5e-8 of it: the rounding of `shift + offset`.
    np.testing.assert_allclose(mean, mean_np, rtol=1e-7)
    oracle.assert_close(y, y_np)


def test_vmap_one_example_pools_over_axis_name():
    """The one-example pattern of a vmapped module with `axis_name` equals the batched call,
    and its gradients equal the reference's under the same vmap."""
    shape = (6, 5, 37)
    x = ks.data(shape, jnp.float32)
    weight, bias = ks.params(shape[1])
    cot = _cotangents(shape, jnp.float32)[0][:, None]

    def per_example(module):
        def loss(x, weight, bias):
            fn = functools.partial(module.batch_norm, eps=EPS, axis_name="b")
            y, mean, var = jax.vmap(lambda x: fn(x[None], weight, bias), axis_name="b")(x)
            return jnp.sum(y * cot) + jnp.sum(jnp.sin(mean)) + jnp.sum(jnp.cos(var)), (y, mean, var)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    (_, (y, mean, var)), grads = per_example(bn)(x, weight, bias)
    y_all, mean_all, var_all = bn.batch_norm(x, weight, bias, eps=EPS)
    ks.assert_matches(y[:, 0], y_all)
    for stat, stat_all in ((mean, mean_all), (var, var_all)):
        ks.assert_matches(stat, jnp.broadcast_to(stat_all, stat.shape))
    _assert_tree_matches(grads, per_example(reference)(x, weight, bias)[1])


@pytest.mark.parametrize("axis_name", ["inner", ["outer", "inner"]], ids=str)
def test_nested_vmap(axis_name):
    """Two vmaps, pooling over the inner one's name or over both (a list of names); the loss
    uses `x` besides the outputs."""
    x = ks.data((2, 3, 4, 5, 9), jnp.float32)
    weight, bias = ks.params(5)

    def run(module):
        fn = functools.partial(module.batch_norm, eps=EPS, axis_name=axis_name)

        def loss(x, weight, bias):
            inner = jax.vmap(lambda x: fn(x, weight, bias), axis_name="inner")
            y, mean, var = jax.vmap(inner, axis_name="outer")(x)
            return jnp.sum(y * y * x) + jnp.sum(mean * var), (y, mean, var)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, weight, bias)

    (_, (y, mean, var)), grads = run(bn)
    (_, expected), expected_grads = run(reference)
    _assert_tree_matches(((y, mean, var), grads), (expected, expected_grads))
    # Pooling gives the statistics of the concatenated batches.
    groups = 2 if axis_name == "inner" else 1
    y_all, mean_all, var_all = jax.vmap(functools.partial(bn.batch_norm, eps=EPS), (0, None, None))(
        x.reshape(groups, -1, 5, 9), weight, bias
    )
    ks.assert_matches(y.reshape(y_all.shape), y_all)
    for stat, stat_all in ((mean, mean_all), (var, var_all)):
        stat = stat.reshape(groups, -1, 5)
        ks.assert_matches(stat, jnp.broadcast_to(stat_all[:, None], stat.shape))


def test_vmap_over_parameters():
    """An ensemble: vmap over weights and biases with shared data (unbatched `x`), so the
    per-member input gradients are summed into one."""
    x = ks.data((4, 5, 37), jnp.float32)
    members = [ks.params(5, seed=seed) for seed in range(3)]
    weights, biases = (jnp.stack([m[i] for m in members]) for i in range(2))

    def run(module):
        def loss(x, weights, biases):
            fn = functools.partial(module.batch_norm, x, eps=EPS)
            y, mean, var = jax.vmap(fn)(weights, biases)
            return jnp.sum(jnp.sin(y) * x[None]) + jnp.sum(mean * var), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            x, weights, biases
        )

    _assert_tree_matches(run(bn), run(reference))


def _sharded_loss(module, mesh, cot):
    """A loss of `(y, mean, var)` with `x` split over the mesh's devices and the statistics
    pooled over them."""
    fn = jax.shard_map(
        functools.partial(module.batch_norm, eps=EPS, axis_name="d"),
        mesh=mesh,
        in_specs=(P("d"), P(), P()),
        out_specs=(P("d"), P(), P()),
        check_vma=False,
    )

    def loss(x, weight, bias):
        y, mean, var = fn(x, weight, bias)
        return jnp.sum(y * cot) + jnp.sum(mean * mean) + jnp.sum(var), (y, mean, var)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def test_shard_map_equals_single_device():
    shape = (8, 6, 25)
    x = ks.data(shape, jnp.float32)
    weight, bias = ks.params(shape[1])
    cot = _cotangents(shape, jnp.float32)[0]
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    (_, sharded), grads = _sharded_loss(bn, mesh, cot)(x, weight, bias)
    _assert_tree_matches(sharded, bn.batch_norm(x, weight, bias, eps=EPS))

    def single(x, weight, bias):
        y, mean, var = reference.batch_norm(x, weight, bias, eps=EPS)
        return jnp.sum(y * cot) + jnp.sum(mean * mean) + jnp.sum(var)

    _assert_tree_matches(grads, jax.grad(single, argnums=(0, 1, 2))(x, weight, bias))
    _assert_tree_matches(grads, _sharded_loss(reference, mesh, cot)(x, weight, bias)[1])


def test_pmap_equals_single_device():
    x = ks.data((8, 3, 6, 11), jnp.float32)
    weight, bias = ks.params(6)
    fn = functools.partial(bn.batch_norm, eps=EPS, axis_name="p")
    pmapped = jax.pmap(fn, axis_name="p", in_axes=(0, None, None), devices=ks.devices(8))
    y, mean, var = pmapped(x, weight, bias)
    y_all, mean_all, var_all = bn.batch_norm(x.reshape(24, 6, 11), weight, bias, eps=EPS)
    ks.assert_matches(y.reshape(24, 6, 11), y_all)
    ks.assert_matches(mean, jnp.broadcast_to(mean_all, mean.shape))
    ks.assert_matches(var, jnp.broadcast_to(var_all, var.shape))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_lowers_to_kernels(platform, dtype):
    """Training forward and value_and_grad, and inference value_and_grad, lower to the
    platform's kernels at non-power-of-two sizes (one-pass and split slabs)."""
    for shape in ((37, 13, 199), (3, 24, 1500)):
        x = ks.data(shape, dtype)
        weight, bias = ks.params(shape[1], dtype)
        mean, var = weight.astype(jnp.float32), bias.astype(jnp.float32) ** 2

        def forward(x, weight, bias):
            return bn.batch_norm(x, weight, bias, eps=EPS)

        def loss(x, weight, bias):
            y, mean, var = forward(x, weight, bias)
            return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(mean * var)

        def inference_loss(x, weight, bias, mean=mean, var=var):
            y = bn.batch_norm_inference(x, mean, var, weight, bias, eps=EPS)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        counts = [
            ks.kernel_count(ks.lowered(fn, (x, weight, bias), platform), platform)
            for fn in (
                forward,
                jax.value_and_grad(loss, argnums=(0, 1, 2)),
                jax.value_and_grad(inference_loss, argnums=(0, 1, 2)),
            )
        ]
        # Statistics + normalization; + sums; normalization + sums.
        assert counts == [2, 3, 2]


@pytest.mark.parametrize("shape", [(37, 13, 199), (3, 24, 1500), (256, 64, 3136), (1, 3, 1)])
@pytest.mark.parametrize("target", [c.TRITON, c.MOSAIC], ids=lambda t: t.name)
def test_tiles_are_legal(target, shape):
    """Triton tiles are powers of two within the block budget; Mosaic tiles' minor dimensions
    are whole or multiples of (32, 128); the grid covers the array."""
    tiles = bn._tiles(target, shape)
    if target.masked:
        assert all(t & (t - 1) == 0 for t in tiles.tile)
        assert np.prod(tiles.tile) <= c.MAX_BLOCK_ELEMENTS
    else:
        (_, cb, cs), (_, channels, spatial) = tiles.tile, shape
        assert cb == channels or cb % c.MOSAIC_ROW_MULTIPLE == 0
        assert cs == spatial or cs % 128 == 0
    for n, t, g in zip(shape, tiles.tile, tiles.grid, strict=True):
        assert (g - 1) * t < n <= g * t


def test_deterministic():
    shape = (199, 5, 1)
    x = ks.data(shape, jnp.float32)
    weight, bias = ks.params(shape[1])
    cotangents = _cotangents(shape, jnp.float32)
    first, second = (_training(bn)(x, weight, bias, cotangents) for _ in range(2))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_rank_is_rejected():
    # The kernel takes `(batch, channels, spatial)`; the reference any leading axes, so a
    # rank-1 array is what both reject.
    with pytest.raises(TypeCheckError, match="batch channels spatial"):
        bn.batch_norm(jnp.ones((4, 3), jnp.float32), None, None, eps=EPS)
    for fn in (bn.batch_norm, reference.batch_norm):
        with pytest.raises(TypeCheckError, match="batch channels spatial"):
            fn(jnp.ones((3,), jnp.float32), None, None, eps=EPS)
