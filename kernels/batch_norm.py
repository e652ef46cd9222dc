r"""Fused Pallas kernels for BatchNorm over a `(batch, channels, spatial)` array: training mode
(batch statistics, optionally pooled over a named axis) and inference mode (given statistics).

Layers, from the bottom up:

1. `_batch_norm_moments_kernel`, `_batch_norm_normalize_kernel`, `_batch_norm_sums_kernel`:
   kernel bodies on refs.
2. `_moments_on`, `_normalize_on`, `_sums_on`: the `pallas_call` wrappers for one compilation
   target; the reductions end in a fixed-order `jnp` sum of the per-tile partials, so every
   target's branch returns the same shapes.
3. `_local_moments`, `_normalize`: kernel calls with JVP rules (`eqxnorm.kernels._autodiff`),
   each with its exact derivative; the normalization's tangent is a linear map transposed by
   the sums kernel.
4. `_batch_norm` (the shift, `_local_moments`, the pooling over `axis_name`, `_normalize`) and
   `_batch_norm_inference` (`_normalize` with the given statistics): per-channel `jnp` between
   the kernels, differentiated by JAX.
5. `batch_norm`, `batch_norm_inference`: the entry points, with the reference's signatures.

**Tiles.** The statistics of a channel are a reduction over `batch × spatial`, a column of the
array rather than a row, so `x` is cut into `(bb, cb, cs)` tiles on a grid over (batch
blocks, channel blocks, spatial blocks), and every reduction is finished outside the kernels.
The tile comes from the one heuristic, `c.block_config(target, batch, padded(channels) ×
padded(spatial))`, which treats an example's `(channels, spatial)` slab as a "row": a tile
holds `block_rows × block_cols` elements, `bb = min(block_rows, padded(batch))` examples of
`block_rows × block_cols / bb` elements each, filled spatial-first (`cs = min(padded(spatial),
·)`, then `cb = min(padded(channels), · / cs)`). A slab that fits one block is one tile per
block of examples; a wider one is split over channels and space. Triton tiles are powers of
two, masked at the edges. Mosaic tiles keep `bb` free (a leading dimension) and round `cs` to
the whole `spatial` or a multiple of 128 lanes, and `cb` to the whole `channels` or a multiple
of 32 sublanes; their edge tiles are padded by the pipeline and masked out of every sum.

**Forward.** Two passes over `x`:

1. Statistics kernel: every tile writes, per channel, the mean of $d = x - K$ and $M_2 =
   \sum (d - \bar{d})^2$ over its $n$ valid elements, in float32 (two passes over the tile
   on chip). The shift $K$ is the mean over the batch of `x[:, :, 0]` (over every member of
   `axis_name` too, so that every member shares it): values of the data keep $d$ at the
   scale of the spread, not of the mean; a mean over the batch, rather than one example's
   value, is also defined where the batch axis is split across devices. The kernels reduce
   $d = (x - K) - d_0$, with $d_0$ the $x - K$ of the largest of those values, so a constant
   channel gives exact zeros and an offset of exactly $d_0$ (see `_shift`).
2. Outside, in `jnp`: the partials are combined with Chan et al.'s parallel formula,
   $\bar{d} = \sum_k n_k \bar{d}_k / N$, $M_2 = \sum_k M_{2,k} + \sum_k n_k (\bar{d}_k -
   \bar{d})^2$, $\sigma^2 = M_2 / N$, never $E[x^2] - E[x]^2$. With `axis_name` the members,
   which hold equal counts, are combined the same way with `lax.pmean`: $\bar{d} \leftarrow
   \mathrm{pmean}(\bar{d})$, $\sigma^2 \leftarrow \mathrm{pmean}(\sigma^2 + (\bar{d}_\text{local}
   - \bar{d})^2)$. The mean is kept as `K + offset`, like the reference's `shift + offset`.
3. Normalization kernel: $y = ((x - K) - \bar{d})\, s + \beta$ with $s = r\gamma$,
   $r = (\sigma^2 + \varepsilon)^{-1/2}$. Inference mode is this kernel alone, with $K = \mu$
   the given mean and $\bar{d} = 0$.

**Backward.** With $c = (x - K) - \bar{d}$ and the sums over this member's data, the two
functions have the VJPs (the transposes of their tangent maps)

$$\text{normalize:}\quad \frac{\partial L}{\partial x} \mathrel{+}= s\,\frac{\partial L}
{\partial y}, \quad \frac{\partial L}{\partial \bar{d}} = \frac{\partial L}{\partial K} =
-s \sum \frac{\partial L}{\partial y}, \quad \frac{\partial L}{\partial s} = \sum
\frac{\partial L}{\partial y}\, c, \quad \frac{\partial L}{\partial \beta} = \sum
\frac{\partial L}{\partial y};$$

$$\text{moments:}\quad \frac{\partial L}{\partial x} \mathrel{+}= \frac{1}{n}
\frac{\partial L}{\partial \bar{d}_\text{local}} + \frac{2}{n}\frac{\partial L}{\partial
\sigma^2_\text{local}}\, c_\text{local}, \quad \frac{\partial L}{\partial K} =
-\frac{\partial L}{\partial \bar{d}_\text{local}}.$$

JAX differentiates the per-channel `jnp` between them: $s = r\gamma$ gives
$\partial L/\partial \gamma = r \sum \partial L/\partial y \cdot c$, the pooling's `pmean`
transposes into the sum over the members, and the returned mean and variance pass their
cotangents on. Together this is the usual $\partial L/\partial x = r(g - \overline{g} -
\hat{x}\,\overline{g \hat{x}})$ ($g = \gamma\,\partial L/\partial y$, $\hat{x} = c\,r$, means
over `batch × spatial` and every member) plus the mean's and variance's own terms. A sums
kernel writes per-tile float32 partials of $\sum \partial L/\partial y$ and $\sum
\partial L/\partial y \cdot c$, summed outside. The pooled coefficients exist only after the
collectives, which must run between the two backward rules: a collective inside one
kernel's backward would fail under `jax.grad` of `jax.vmap` (as in a `custom_vjp`,
jax-ml/jax#7047). Each rule
contributes one elementwise part of $\partial L/\partial x$; they are written in `jnp`, so
XLA fuses both and their sum into one pass over `x` and $\partial L/\partial y$ (as kernels
they would be two passes and an add). Both functions take `x` widened to float32, as the
reference does, so the two parts (which can cancel) are summed in float32 and rounded to
`x.dtype` once; the kernels read `x` itself (see `_widen`).

There are no atomics: every partial has its own slot and is reduced in a fixed order, so two
runs give bitwise-equal results. Under `jax.vmap` Pallas adds a grid axis over the examples
(tiles span channels × space, so a one-example call still fills its programs).

**Sharded.** Under `jax.jit` with `x` split across devices along the batch (or spatial) axis,
every kernel runs on each device's own slice (`_MOMENTS`, `_NORMALIZE`, `_SUMS`, see
`eqxnorm.kernels._sharding`): the statistics kernel's per-device `(offset, var)` are pooled
like `axis_name`'s members (`_pool_moments`), so the normalization uses the statistics of
the whole batch, as on one device, and the backward's sums are added with `psum`.

The kernels compute in float32; for float64 input the statistics are returned as float64 but
carry float32 accuracy (use the reference for float64).
"""

import functools
from typing import NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from .._checking import typechecked
from . import _autodiff, _batch_norm_mosaic_gpu as _mgpu, _common as c, reference
from ._common import F32, Target
from .reference import AxisName, compute_dtype

_SQUEEZED = pl.Squeezed() if hasattr(pl, "Squeezed") else None
# Mosaic tiles the two minor dimensions of a block in (sublanes, lanes); a block dimension
# that is not the whole array's must be a multiple of these (32 sublanes covers 8-, 16- and
# 32-bit types).
_MOSAIC_LANES = 128


class Tiles(NamedTuple):
    """The launch of a kernel over a `(batch, channels, spatial)` array: the block
    heuristic's `config` (Triton's launch settings), the tile `(bb, cb, cs)` and the grid of
    tiles `(batch blocks, channel blocks, spatial blocks)`."""

    config: c.BlockConfig
    tile: tuple[int, int, int]
    grid: tuple[int, int, int]

    @property
    def partials(self) -> int:
        """Tiles per channel: the number of partial statistics each channel gets."""
        return self.grid[0] * self.grid[2]


def _round_mosaic(extent: int, full: int, multiple: int) -> int:
    """`extent` as a legal Mosaic block dimension of an array dimension `full`: the whole
    dimension, or a multiple of `multiple` (at least one)."""
    if extent >= full:
        return full
    return min(full, max(multiple, extent // multiple * multiple))


def _tiles(target: Target, shape: tuple[int, int, int]) -> Tiles:
    """The tiles of `shape` on `target`, derived from `c.block_config` (see the module
    docstring)."""
    batch, channels, spatial = shape
    width = c.padded(target, channels) * c.padded(target, spatial)
    config = c.block_config(target, batch, width)
    bb = min(config.block_rows, c.padded(target, batch))
    per_example = config.block_rows * config.block_cols // bb
    cs = min(c.padded(target, spatial), per_example)
    cb = min(c.padded(target, channels), max(1, per_example // cs))
    if not target.masked:
        cs = _round_mosaic(cs, spatial, _MOSAIC_LANES)
        cb = _round_mosaic(cb, channels, c.MOSAIC_ROW_MULTIPLE)
    tile = (bb, cb, cs)
    return Tiles(config, tile, tuple(c.ceil_div(n, t) for n, t in zip(shape, tile, strict=True)))


def _counts(tiles: Tiles, shape: tuple[int, int, int]) -> np.ndarray:
    """The valid elements of each channel in every tile, `(partials, 1)` float32, in the
    order of the partials (`batch block × spatial blocks + spatial block`)."""
    (bb, _, cs), (nb, _, ns) = tiles.tile, tiles.grid
    rows = np.minimum(bb, shape[0] - bb * np.arange(nb))
    cols = np.minimum(cs, shape[2] - cs * np.arange(ns))
    return np.outer(rows, cols).reshape(-1, 1).astype(np.float32)


# --- kernel bodies -----------------------------------------------------------------------------


class _Block(NamedTuple):
    """Where a program is: its tile's mask `(bb, cb, cs)`, its channel mask `(cb, 1)` and its
    number of valid elements per channel (float32)."""

    mask: jax.Array
    channel_mask: jax.Array
    count: jax.Array


def _block(tiles: Tiles, shape: tuple[int, int, int]) -> _Block:
    # The program ids are read first, where every target supports them.
    i, j, k = (pl.program_id(axis) for axis in range(3))
    (bb, cb, cs), (batch, channels, spatial) = tiles.tile, shape
    rows = c.iota((bb, 1, 1), 0, i * bb) < batch
    chans = c.iota((1, cb, 1), 1, j * cb) < channels
    cols = c.iota((1, 1, cs), 2, k * cs) < spatial
    count = jnp.minimum(bb, batch - i * bb) * jnp.minimum(cs, spatial - k * cs)
    channel_mask = c.iota((cb, 1), 0, j * cb) < channels
    return _Block(rows & chans & cols, channel_mask, count.astype(F32))


def _channel(ref, block: _Block, target: Target) -> jax.Array:
    """A per-channel input `(cb, 1)` as float32, shaped `(1, cb, 1)` to broadcast over a tile."""
    return c.load(ref, block.channel_mask, target)[None]


def _channel_sum(x: jax.Array) -> jax.Array:
    """Per-channel sums `(cb, 1)` of a tile, axis by axis (Triton reduces one at a time)."""
    return jnp.sum(jnp.sum(x, axis=2, keepdims=True), axis=0)


def _batch_norm_moments_kernel(x_ref, shift_ref, d0_ref, mean_ref, m2_ref, *, target, tiles, shape):
    r"""Per channel of a tile, over its $n$ valid elements: the mean of $d = (x - K) - d_0$
    and $M_2 = \sum (d - \bar{d})^2$ (float32, two passes over the tile held on chip)."""
    block = _block(tiles, shape)
    x = c.load(x_ref, block.mask, target)
    shift, d0 = (_channel(r, block, target) for r in (shift_ref, d0_ref))
    d = jnp.where(block.mask, (x - shift) - d0, 0.0)
    mean = _channel_sum(d) / block.count
    dev = jnp.where(block.mask, d - mean[None], 0.0)
    c.store(mean_ref, mean, block.channel_mask, target)
    c.store(m2_ref, _channel_sum(dev * dev), block.channel_mask, target)


def _batch_norm_sums_kernel(
    x_ref, dy_ref, shift_ref, offset_ref, sum_dy_ref, sum_dyc_ref, *, target, tiles, shape
):
    r"""Per channel of a tile: $\sum \partial y$ and $\sum \partial y \cdot c$ with
    $c = (x - K) - \bar{d}$ (float32)."""
    block = _block(tiles, shape)
    x = c.load(x_ref, block.mask, target)
    shift, offset = (_channel(r, block, target) for r in (shift_ref, offset_ref))
    centred = jnp.where(block.mask, (x - shift) - offset, 0.0)
    dy = c.load(dy_ref, block.mask, target)
    c.store(sum_dy_ref, _channel_sum(dy), block.channel_mask, target)
    c.store(sum_dyc_ref, _channel_sum(dy * centred), block.channel_mask, target)


def _batch_norm_normalize_kernel(
    x_ref, shift_ref, offset_ref, scale_ref, bias_ref, y_ref, *, target, tiles, shape
):
    r"""$y = ((x - K) - \bar{d})\,s + \beta$ with per-channel $K, \bar{d}, s, \beta$."""
    block = _block(tiles, shape)
    x = c.load(x_ref, block.mask, target)
    shift, offset, scale, bias = (
        _channel(r, block, target) for r in (shift_ref, offset_ref, scale_ref, bias_ref)
    )
    c.store(y_ref, ((x - shift) - offset) * scale + bias, block.mask, target)


# --- pallas_call wrappers per target -----------------------------------------------------------


def _tile_call(kernel, target: Target, x, channel_arrays, *, outs, name: str, more=()):
    """`pallas_call` of `kernel` over the tiles of `x` (and of the same-shaped arrays `more`)
    and the float32 `(channels,)` arrays `channel_arrays`. Each of `outs` is an output dtype
    (a tile of `x`'s shape) or `None` (float32 per-channel partials, `(partials, channels,
    1)`). Returns the outputs and the `Tiles`."""
    shape = x.shape
    tiles = _tiles(target, shape)
    bb, cb, cs = tiles.tile
    spatial_blocks = tiles.grid[2]
    tile_spec = pl.BlockSpec((bb, cb, cs), lambda i, j, k: (i, j, k))
    channel_spec = pl.BlockSpec((cb, 1), lambda i, j, k: (j, 0))
    partial_spec = pl.BlockSpec((_SQUEEZED, cb, 1), lambda i, j, k: (i * spatial_blocks + k, j, 0))
    partial_shape = jax.ShapeDtypeStruct((tiles.partials, shape[1], 1), F32)
    tile_arrays = (x, *more)
    outputs = c.pallas_call(
        functools.partial(kernel, target=target, tiles=tiles, shape=shape),
        target,
        tiles.config,
        grid=tiles.grid,
        in_specs=[tile_spec] * len(tile_arrays) + [channel_spec] * len(channel_arrays),
        out_specs=[partial_spec if o is None else tile_spec for o in outs],
        out_shape=[partial_shape if o is None else jax.ShapeDtypeStruct(shape, o) for o in outs],
        name=name,
    )(*tile_arrays, *(a.reshape(-1, 1) for a in channel_arrays))
    return outputs, tiles


def _moments_on(target: Target, x, shift, d0):
    """`(offset, var)`, `(channels,)` float32: the mean of `(x - shift) - d0` and the biased
    variance per channel over this array's `batch × spatial`, the tiles' partials
    Chan-combined."""
    partials, tiles = _tile_call(
        _batch_norm_moments_kernel,
        target,
        x,
        [shift, d0],
        outs=[None, None],
        name="eqxnorm_batch_norm_moments",
    )
    means, m2s = (p[..., 0] for p in partials)
    counts = _counts(tiles, x.shape)
    total = x.shape[0] * x.shape[2]
    offset = jnp.sum(counts * means, axis=0, keepdims=True) / total
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(means - offset), axis=0)
    return offset[0], m2 / total


def _normalize_on(target: Target, x, shift, offset, scale, bias):
    """`((x - shift) - offset)·scale + bias` in `x.dtype`, the per-channel arrays float32
    (`bias` any float dtype: the kernel widens it)."""
    (y,), _ = _tile_call(
        _batch_norm_normalize_kernel,
        target,
        x,
        [shift, offset, scale, bias],
        outs=[x.dtype],
        name="eqxnorm_batch_norm_normalize",
    )
    return y


def _sums_on(target: Target, x, dy, shift, offset):
    """`(Σ dy, Σ dy·((x - shift) - offset))` per channel over this array, float32."""
    partials, _ = _tile_call(
        _batch_norm_sums_kernel,
        target,
        x,
        [shift, offset],
        outs=[None, None],
        name="eqxnorm_batch_norm_sums",
        more=(dy,),
    )
    return tuple(jnp.sum(p[..., 0], axis=0) for p in partials)


# --- sharding: each device's tiles ------------------------------------------------------------


def _pool_moments(moments: tuple, axis_name, pmean=lax.pmean) -> tuple:
    r"""The `(offset, var)` of the union of the members of `axis_name` from each member's,
    all of one count and one shift: Chan et al.'s combination for equal counts,
    $\bar{d} = \mathrm{pmean}(\bar{d}_k)$, $\sigma^2 = \mathrm{pmean}(\sigma^2_k +
    (\bar{d}_k - \bar{d})^2)$. `pmean` is `lax.pmean` for the devices of a partitioned call,
    [`reference.pool_members`][] (which a `vmap`ped axis needs) for the user's `axis_name`."""
    local, var = moments
    offset = pmean(local, axis_name)
    return offset, pmean(var + jnp.square(local - offset), axis_name)


# Batch-sharded under `jit`, each device runs the kernels on its own examples (and spatial
# positions): the statistics from its tiles are pooled across devices like `axis_name`'s
# members, the normalization is elementwise, and the backward's sums are added.
_MOMENTS = c.Rule("b c s, c, c -> c, c", split="b s", combine=_pool_moments)
_NORMALIZE = c.Rule("b c s, c, c, c, c -> b c s", split="b s")
_SUMS = c.Rule("b c s, b c s, c, c -> c, c", split="b s")


# --- differentiation ---------------------------------------------------------------------------


def _per_channel(v):
    """A `(channels,)` array shaped to broadcast over `(batch, channels, spatial)`."""
    return v[None, :, None]


def _centred(x, shift, offset):
    return (x.astype(F32) - _per_channel(shift)) - _per_channel(offset)


def _launch(fn, mosaic_gpu_fn, *args, tiled: int = 1, sharding, backend):
    """`fn(target, *args)` staged per platform; on cuda, `mosaic_gpu_fn` where `backend`
    chooses Mosaic GPU (`c.per_platform`) and it supports the first `tiled` arguments (the
    arrays of `x`'s shape)."""

    def supported(*operands):
        return _mgpu.supported(*operands[:tiled])

    mosaic_gpu = c.MosaicGPU(mosaic_gpu_fn, supported)
    return c.per_platform(fn, *args, sharding=sharding, mosaic_gpu=mosaic_gpu, backend=backend)


def _local_moments(xw, shift, d0, dtype, backend: str):
    """`(offset, var)`: the per-channel mean of `(x - shift) - d0` and biased variance of
    this array, given widened (`xw`) with its own dtype `dtype`: the statistics kernel, on
    the GPU `backend`."""
    return _local_moments_of(jnp.dtype(dtype), backend)(xw, shift, d0)


@functools.cache
def _local_moments_of(dtype: jnp.dtype, backend: str):
    def moments(xw, shift, d0):
        x = xw.astype(dtype)
        return _launch(
            _moments_on, _mgpu.moments_on, x, shift, d0, sharding=_MOMENTS, backend=backend
        )

    def jvp(primals, tangents):
        xw, shift, d0 = primals
        offset, var = local_moments(xw, shift, d0)
        t_x, t_shift, t_d0 = tangents
        count = xw.shape[0] * xw.shape[2]
        t_offset = jnp.zeros_like(offset) if t_x is None else jnp.sum(t_x, axis=(0, 2)) / count
        for t in (t_shift, t_d0):
            t_offset = t_offset if t is None else t_offset - t
        if t_x is None:
            return (offset, var), (t_offset, jnp.zeros_like(var))
        # Rematerialised, so that reverse mode keeps `x`, not the centred values.
        t_var = jax.checkpoint(_local_var_tangent, policy=jax.checkpoint_policies.nothing_saveable)
        return (offset, var), (t_offset, t_var(xw.astype(dtype), shift, d0 + offset, t_x))

    local_moments = _autodiff.with_jvp(moments, jvp)
    return local_moments


def _local_var_tangent(x, shift, offset, t_x):
    r"""$\dot{\sigma}^2 = \frac{2}{n} \sum ((x - K) - \bar{d})\,\dot{x}$ per channel."""
    count = x.shape[0] * x.shape[2]
    return jnp.sum(_centred(x, shift, offset) * t_x, axis=(0, 2)) * (2 / count)


def _normalize(xw, shift, offset, scale, bias, dtype, backend: str):
    """`((x - shift) - offset)·scale + bias` in `dtype`, `x` given widened (`xw`) with its
    own dtype `dtype`; the per-channel arrays are float32 (`bias` any float dtype, widened by
    the kernel): the normalization kernel, on the GPU `backend`."""
    return _normalize_of(jnp.dtype(dtype), backend)(xw, shift, offset, scale, bias)


def _normalize_tangent(residuals, tangents):
    """The tangent of [`_normalize`][] (XLA): `(t_x - t_shift - t_offset)·scale + c·t_scale +
    t_bias`, `c = (x - shift) - offset`."""
    x, shift, offset, scale = residuals
    t_x, t_shift, t_offset, t_scale, t_bias = tangents
    t_y = jnp.zeros(x.shape, F32)
    if t_x is not None:
        t_y = t_y + t_x.astype(F32) * _per_channel(scale)
    for t in (t_shift, t_offset):
        if t is not None:
            t_y = t_y - _per_channel(t * scale)
    if t_scale is not None:
        t_y = t_y + _centred(x, shift, offset) * _per_channel(t_scale)
    if t_bias is not None:
        t_y = t_y + _per_channel(t_bias.astype(F32))
    return t_y.astype(x.dtype)


def _normalize_transpose(backend: str, residuals, dy, like):
    """The transpose of [`_normalize_tangent`][]: the sums kernel (on the GPU `backend`), and
    per-channel `jnp`."""
    x, shift, offset, scale = residuals
    sum_dy, sum_dyc = _launch(
        _sums_on, _mgpu.sums_on, x, dy, shift, offset, tiled=2, sharding=_SUMS, backend=backend
    )
    dshift = -scale * sum_dy
    grads = (dy.astype(F32) * _per_channel(scale), dshift, dshift, sum_dyc, sum_dy)
    return tuple(None if a is None else g for a, g in zip(like, grads, strict=True))


@functools.cache
def _normalize_of(dtype: jnp.dtype, backend: str):
    transpose = functools.partial(_normalize_transpose, backend)

    def normalize(xw, shift, offset, scale, bias):
        x = xw.astype(dtype)
        args = (x, shift, offset, scale, bias)
        return _launch(
            _normalize_on, _mgpu.normalize_on, *args, sharding=_NORMALIZE, backend=backend
        )

    def jvp(primals, tangents):
        xw, shift, offset, scale, bias = primals
        residuals = (xw.astype(dtype), shift, offset, scale)
        t_y = _autodiff.linear(
            _normalize_tangent, transpose, _normalize_tangent, residuals, tangents
        )
        return normalized(*primals), t_y

    normalized = _autodiff.with_jvp(normalize, jvp)
    return normalized


def _scale_and_bias(rstd, weight, bias):
    """`(s, β)` of the normalization: `s = rstd·γ` in float32, `β` in its own dtype, which
    the kernels widen as they read it (a conversion in XLA would be one more launch)."""
    scale = rstd if weight is None else rstd * weight.astype(F32)
    return scale, jnp.zeros_like(rstd) if bias is None else bias


def _widen(x):
    """`x` in float32 (float64 stays), converted once, as in the reference: both differentiable
    functions take it, so their float32 cotangents are summed before the one cast back to
    `x.dtype` (two half-precision parts of `∂L/∂x` can cancel). Each converts it back to
    `x.dtype` for its kernels; XLA removes the lossless round trip, so the kernels read `x`
    itself and the widened copy is never written."""
    return x.astype(compute_dtype(x.dtype))


def _shift(x, axis_name) -> tuple[Array, Array]:
    """`(K, d₀)` per channel: $K$ the batch mean of `x[:, :, 0]` (over every member of
    `axis_name`), a sum of `x · (1/n)` so that it is a reduction's output, one rounded value
    XLA does not recompute inside a multiply-add; and $d_0 = x_\text{max} - K$ for the largest of
    those values (also a reduction, defined on a split batch), the `x - K` of one element.
    The kernels reduce `(x - K) - d₀`, exact zeros for a constant channel, whose `offset` is
    then `d₀` itself and whose centred values are exactly 0. The outputs do not depend on
    either, only their rounding does: no gradient through them."""
    first = lax.stop_gradient(x[:, :, 0].astype(F32))
    members = reference.axis_count(axis_name)
    shift = jnp.sum(first * (1 / (first.shape[0] * members)), axis=0)
    largest = jnp.max(first, axis=0)
    if axis_name is not None:
        shift = reference.pool_members("sum", shift, axis_name)
        largest = reference.pool_members("max", largest, axis_name)
    return shift, largest - shift


def _batch_norm(x, weight, bias, eps: float, axis_name, backend: str):
    """`(y, mean, var)` of `batch_norm`."""
    shift, d0 = _shift(x, axis_name)
    xw = _widen(x)
    offset, var = _local_moments(xw, shift, d0, x.dtype, backend)
    if axis_name is not None:
        pmean = functools.partial(reference.pool_members, "mean")
        offset, var = _pool_moments((offset, var), axis_name, pmean)
    offset = d0 + offset
    rstd = reference.inverse_std(var, eps)
    y = _normalize(xw, shift, offset, *_scale_and_bias(rstd, weight, bias), x.dtype, backend)
    cdt = compute_dtype(x.dtype)
    return y, (shift + offset).astype(cdt), var.astype(cdt)


def _batch_norm_inference(x, mean, var, weight, bias, eps: float, backend: str):
    """`y` of `batch_norm_inference`."""
    shift = mean.astype(F32)
    rstd = reference.inverse_std(var.astype(F32), eps)
    scale, bias = _scale_and_bias(rstd, weight, bias)
    return _normalize(_widen(x), shift, jnp.zeros_like(shift), scale, bias, x.dtype, backend)


# --- entry points ------------------------------------------------------------------------------


@typechecked()
def batch_norm(
    x: Float[Array, "batch channels spatial"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    eps: float,
    axis_name: AxisName | None = None,
    backend: str = "auto",
) -> tuple[
    Float[Array, "batch channels spatial"], Float[Array, " channels"], Float[Array, " channels"]
]:
    r"""BatchNorm with batch statistics as fused Pallas kernels; the same maths and signature
    as `eqxnorm.kernels.reference.batch_norm`: statistics per channel over `batch × spatial`
    (and over every member of `axis_name`, when given), $y = (x - \mu_c)/\sqrt{\sigma^2_c +
    \varepsilon}\,\gamma_c + \beta_c$.

    **Arguments:**

    - `x`: `(batch, channels, spatial)`, the spatial axes flattened.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance.
    - `axis_name`: a named axis (or names) whose members' batches are pooled into the
        statistics (`vmap`, `pmap`, `shard_map`).
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(y, mean, var)`: `y` of `x`'s shape and dtype; the batch `mean` and biased `var`,
    `(channels,)` in the statistics dtype (float32, or float64 for float64 input).
    """
    return _batch_norm(x, weight, bias, float(eps), axis_name, backend)


@typechecked()
def batch_norm_inference(
    x: Float[Array, "batch channels spatial"],
    mean: Float[Array, " channels"],
    var: Float[Array, " channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    eps: float,
    backend: str = "auto",
) -> Float[Array, "batch channels spatial"]:
    r"""BatchNorm with given (running) statistics as a fused Pallas kernel; the same maths
    and signature as `eqxnorm.kernels.reference.batch_norm_inference`:
    $y = (x - \mu_c)/\sqrt{\sigma^2_c + \varepsilon}\,\gamma_c + \beta_c$.

    **Arguments:**

    - `x`: `(batch, channels, spatial)`.
    - `mean`, `var`: `(channels,)`, the statistics to normalize with.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance.
    - `backend`: the GPU kernels, as for `batch_norm`.

    **Returns:**

    `(batch, channels, spatial)` in `x.dtype`.
    """
    return _batch_norm_inference(x, mean, var, weight, bias, float(eps), backend)


__all__ = ["batch_norm", "batch_norm_inference"]
