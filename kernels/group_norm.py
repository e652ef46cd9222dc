r"""Fused Pallas kernels for GroupNorm (and InstanceNorm, its case `groups == channels`) over a
`(batch, channels, spatial)` array, the spatial axes flattened, and for its adaptive (FiLM,
adaLN) modulation.

The kernels view `x` as `(batch·groups, channels/groups, spatial)`: each *row* is one
`(example, group)` slice, normalized with the statistics of its `n = channels/groups ×
spatial` elements. The affine parameters are expanded to one `(channels/groups, 1)` column per
row (`batch × channels` values, tiny next to `x`), so a block of rows reads the parameters of
its own groups. They may be per channel, `(channels,)`, or *per example*, `(batch, channels)`:
the kernels are the same, only the expansion is not a broadcast.

**Adaptive modulation.** $(\hat{x}\gamma + \beta)(1 + s) + t$ with per-example `scale` $s$ and
`shift` $t$ is a GroupNorm with the per-example parameters $W = \gamma(1 + s)$, $B = \beta(1 +
s) + t$ (`eqxnorm.kernels.reference.modulation`, float32 in XLA; `batch × channels` values).
The kernels take $W, B$; autodiff through `modulation` turns their per-example gradients
(below, without the sum over examples) into those of `scale`, `shift`, $\gamma$ and $\beta$.

Layers, from the bottom up:

1. `_group_norm_fwd_kernel`, `_group_norm_bwd_kernel`: kernel bodies on refs.
2. `_forward_on`, `_backward_on`: the `pallas_call` wrappers for one compilation target.
3. `_forward`, `_backward`: staged per platform and `custom_vmap`ped, so a `jax.vmap` of a
   one-example module folds the vmapped axis into the kernel's batch instead of launching one
   program per example.
4. `_group_norm`: the differentiable function (`eqxnorm.kernels._autodiff.norm_with_jvp`):
   the forward kernel with a JVP rule whose tangent is transposed by the backward kernel.
5. `group_norm`, `adaptive_group_norm`: the entry points, with the reference's signatures.

**Forward.** One pass over HBM when the padded slice fits a block (see
`eqxnorm.kernels._common.block_config`): read `x` once, write `y` once, and save the mean (as
`shift + offset`) and `rstd` in float32, one value each per row. Larger slices are read twice
in `(channel, spatial-chunk)` pieces (statistics, then output), the pieces' statistics
combined with Chan's update.

**Backward.** With $\hat{x} = (x - \mu)\,r$, $r = (\sigma^2 + \varepsilon)^{-1/2}$ and
$g = \partial L/\partial y \odot \gamma_c$ (the weight of each element's channel $c$), and
$\overline{\,\cdot\,}$ the mean over the $n$ elements of a row:

$$\frac{\partial L}{\partial x} = r\left(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}
\right),$$

$$\frac{\partial L}{\partial \gamma_c} = \sum_\text{examples}\sum_\text{spatial}
\frac{\partial L}{\partial y}\odot\hat{x}, \qquad \frac{\partial L}{\partial \beta_c} =
\sum_\text{examples}\sum_\text{spatial}\frac{\partial L}{\partial y}.$$

The kernel is row-parallel: each program writes `dx` for its rows and, per row and channel,
the float32 sums over `spatial` of $\partial y \odot \hat{x}$ and $\partial y$. These partials
are per example already, so the parameter gradients are their sum over examples in a fixed
order outside the kernel (and a `vmap` of the gradient gets its per-example gradients without
another pass); per-example parameters take them as they are. There are no atomics, so two
runs give bitwise-equal results. The backward keeps only `x`, the parameters and the per-row
statistics as residuals.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from .._checking import typechecked
from . import _autodiff, _common as c, _group_norm_mosaic_gpu as _mgpu, reference
from ._common import F32, Target

# --- launch geometry ---------------------------------------------------------------------------


class _Layout(NamedTuple):
    """A launch over `rows` slices of `(channels, spatial)` elements.

    The block is `(config.block_rows, *block)`: the padded slice. A program reads it in
    pieces of `piece = (channels, spatial)` elements, `counts` of them along each axis (one
    piece covering the block when the slice fits on chip, `config.chunks == 1`)."""

    config: c.BlockConfig
    rows: int
    channels: int
    spatial: int
    block: tuple[int, int]
    piece: tuple[int, int]
    counts: tuple[int, int]

    @property
    def size(self) -> int:
        """The number of elements of a slice."""
        return self.channels * self.spatial


def _layout(target: Target, rows: int, channels: int, spatial: int) -> _Layout:
    block = (c.padded(target, channels), c.padded(target, spatial))
    config = c.block_config(target, rows, block[0] * block[1])
    if config.chunks == 1:
        piece = block
    elif target.masked:
        # Chunks of `block_cols` elements: spatial runs of up to `block_cols`, several
        # channels per piece when the spatial axis is shorter. Powers of two, so the pieces
        # tile the padded block exactly.
        spatial_piece = min(block[1], config.block_cols)
        piece = (min(block[0], config.block_cols // spatial_piece), spatial_piece)
    elif spatial % config.block_cols == 0:
        # Mosaic slices the lane (spatial) axis at aligned offsets only, keeping the channels.
        piece = (channels, config.block_cols)
    else:
        piece = (channels, spatial)
    counts = (c.ceil_div(channels, piece[0]), c.ceil_div(spatial, piece[1]))
    return _Layout(config, rows, channels, spatial, block, piece, counts)


class _Masks(NamedTuple):
    """The valid positions of a piece of a block: `rows` `(block_rows, 1, 1)`, `params`
    (rows and channels) `(block_rows, channels, 1)` and `values` (all three axes)."""

    rows: jax.Array
    params: jax.Array
    values: jax.Array


def _masks(layout: _Layout, first_row: Any, start: tuple[Any, Any] = (0, 0)) -> _Masks:
    """The masks of the piece starting at `start = (channel, spatial)` in the block of rows
    from `first_row`."""
    br, (pc, ps) = layout.config.block_rows, layout.piece
    rows = c.iota((br, 1, 1), 0, first_row) < layout.rows
    channels = c.iota((1, pc, 1), 1, start[0]) < layout.channels
    spatial = c.iota((1, 1, ps), 2, start[1]) < layout.spatial
    params = rows & channels
    return _Masks(rows, params, params & spatial)


def _start(index: Any, size: int, count: int) -> Any:
    """The offset of piece `index` of `size` along an axis cut into `count` pieces (a static
    0 when there is one piece, so Mosaic never sees a dynamic offset on a sublane axis)."""
    if count == 1:
        return 0
    start = index * size
    # `pl.multiple_of` of a Python int breaks Triton's lowering.
    return start if isinstance(start, int) else pl.multiple_of(start, size)


def _piece(ref: Any, layout: _Layout, start: tuple[Any, Any], params: bool = False) -> Any:
    """The view of the piece at `start` of a block ref (of a `(rows, channels, 1)` parameter
    block when `params`)."""
    if layout.config.chunks == 1:
        return ref
    channels = pl.ds(start[0], layout.piece[0])
    return (
        ref.at[:, channels, :] if params else ref.at[:, channels, pl.ds(start[1], layout.piece[1])]
    )


def _piece_starts(layout: _Layout, k: Any) -> tuple[Any, Any]:
    """The `(channel, spatial)` start of the `k`-th piece, spatial pieces innermost."""
    (nc, ns), (pc, ps) = layout.counts, layout.piece
    if isinstance(k, int):
        return _start(k // ns, pc, nc), _start(k % ns, ps, ns)
    # `lax.div`/`lax.rem` (`k >= 0`): jnp's floor division lowers to a select Triton rejects.
    return _start(jax.lax.div(k, ns), pc, nc), _start(jax.lax.rem(k, ns), ps, ns)


# --- in-kernel statistics ----------------------------------------------------------------------


def _chunked_moments(x_ref, layout: _Layout, first_row, target: Target) -> c.Stats:
    """Row statistics over the pieces of a block: every piece's [`c.Partial`][] of `(x -
    shift) - d₀` (see [`c.chunked_shift`][]) combined with Chan's update."""

    def piece_values(k):
        start = _piece_starts(layout, k)
        mask = _masks(layout, first_row, start).values
        return c.load(_piece(x_ref, layout, start), mask, target), mask

    x0, mask0 = piece_values(0)
    first_count = min(layout.piece[0], layout.channels) * min(layout.piece[1], layout.spatial)
    shift, d0 = c.chunked_shift(x0, mask0, first_count)

    def body(k, part):
        x, mask = piece_values(k)
        return c.chan_combine(part, c.chunk_partial(jnp.where(mask, (x - shift) - d0, 0.0), mask))

    zero = jnp.zeros((layout.config.block_rows, 1, 1), F32)
    pieces = layout.counts[0] * layout.counts[1]
    part = jax.lax.fori_loop(0, pieces, body, c.Partial(zero, zero, zero))
    return c.Stats(shift, d0 + part.mean, jnp.maximum(part.m2 / layout.size, 0.0))


# --- block access ------------------------------------------------------------------------------


def _load_param(ref, layout, start, mask, target):
    return None if ref is None else c.load(_piece(ref, layout, start, params=True), mask, target)


# --- forward -----------------------------------------------------------------------------------


def _group_norm_fwd_kernel(x_ref, *refs, target, layout, eps, has_weight, has_bias):
    r"""$y = ((x - \text{shift}) - \text{offset})\, r\, \gamma_c + \beta_c$ for a block of
    rows, saving shift, offset and $r = (\sigma^2 + \varepsilon)^{-1/2}$ per row."""
    w_ref, b_ref, y_ref, shift_ref, offset_ref, rstd_ref = c.split_refs(refs, has_weight, has_bias)
    # The program id is read here, outside the loops, where every target supports it.
    first_row = pl.program_id(0) * layout.config.block_rows

    def write(start, stats, rstd, x=None):
        masks = _masks(layout, first_row, start)
        if x is None:
            x = c.load(_piece(x_ref, layout, start), masks.values, target)
        w, b = (_load_param(r, layout, start, masks.params, target) for r in (w_ref, b_ref))
        y = c.affine(c.centred(x, masks.values, stats) * rstd, w, b)
        c.store(_piece(y_ref, layout, start), y, masks.values, target)

    if layout.config.chunks == 1:
        masks = _masks(layout, first_row)
        x = c.load(x_ref, masks.values, target)
        stats = c.block_moments(x, masks.values, layout.size, center=True)
        rstd = reference.inverse_std(stats.var, eps)
        write((0, 0), stats, rstd, x)
    else:
        stats = _chunked_moments(x_ref, layout, first_row, target)
        rstd = reference.inverse_std(stats.var, eps)

        @pl.loop(0, layout.counts[0] * layout.counts[1])
        def _(k):
            write(_piece_starts(layout, k), stats, rstd)

    row_mask = _masks(layout, first_row).rows
    for ref, value in ((shift_ref, stats.shift), (offset_ref, stats.offset), (rstd_ref, rstd)):
        c.store(ref, value, row_mask, target)


def _row_params(param, batch: int, groups: int):
    """A `(channels,)` parameter, or per-example `(batch, channels)` parameters, as one
    `(channels/groups, 1)` column per `(example, group)` row: `(batch·groups, channels/groups,
    1)`."""
    per_group = param.reshape(-1, groups, param.shape[-1] // groups, 1)
    return jnp.broadcast_to(per_group, (batch, *per_group.shape[1:])).reshape(batch * groups, -1, 1)


def _specs(layout: _Layout):
    """BlockSpecs of a row block of values, of parameters (or per-channel partials), and of
    per-row statistics."""
    br, (pc, ps) = layout.config.block_rows, layout.block
    index = lambda i: (i, 0, 0)  # noqa: E731
    return (
        pl.BlockSpec((br, pc, ps), index),
        pl.BlockSpec((br, pc, 1), index),
        pl.BlockSpec((br, 1, 1), index),
    )


def _forward_on(target: Target, x, weight, bias, *, groups: int, eps: float):
    """`(y, shift, offset, rstd)` of `x` with one `pallas_call` on `target`; the statistics
    are `(batch, groups)` float32. The parameters are `(channels,)` or `(batch, channels)`."""
    batch, channels, spatial = x.shape
    rows = batch * groups
    layout = _layout(target, rows, channels // groups, spatial)
    params = [_row_params(p, batch, groups) for p in (weight, bias) if p is not None]
    value_block, param_block, stat_block = _specs(layout)
    stat_shape = jax.ShapeDtypeStruct((rows, 1, 1), F32)
    kernel = functools.partial(
        _group_norm_fwd_kernel,
        target=target,
        layout=layout,
        eps=eps,
        has_weight=weight is not None,
        has_bias=bias is not None,
    )
    xr = x.reshape(rows, layout.channels, spatial)
    y, *stats = c.pallas_call(
        kernel,
        target,
        layout.config,
        grid=(c.ceil_div(rows, layout.config.block_rows),),
        in_specs=[value_block] + [param_block] * len(params),
        out_specs=[value_block, stat_block, stat_block, stat_block],
        out_shape=[jax.ShapeDtypeStruct(xr.shape, x.dtype), stat_shape, stat_shape, stat_shape],
        name="eqxnorm_group_norm_fwd",
    )(xr, *params)
    return (y.reshape(x.shape), *(s.reshape(batch, groups) for s in stats))


# --- backward ----------------------------------------------------------------------------------


def _group_norm_bwd_kernel(x_ref, *refs, target, layout, has_weight, param_grads):
    r"""$\partial x = r(g - \overline{g} - \hat{x}\,\overline{g\hat{x}})$, $g = \partial y
    \odot \gamma_c$, for a block of rows, and per row and channel the float32 sums over
    `spatial` of $\partial y \odot \hat{x}$ and $\partial y$."""
    w_ref, dy_ref, shift_ref, offset_ref, rstd_ref, dx_ref, *partial_refs = c.split_refs(
        refs, has_weight
    )
    first_row = pl.program_id(0) * layout.config.block_rows
    row_mask = _masks(layout, first_row).rows
    stats = c.Stats(*(c.load(r, row_mask, target) for r in (shift_ref, offset_ref)), None)
    rstd = c.load(rstd_ref, row_mask, target)

    def piece_values(start):
        masks = _masks(layout, first_row, start)
        x = c.load(_piece(x_ref, layout, start), masks.values, target)
        xhat = c.centred(x, masks.values, stats) * rstd
        dy = c.load(_piece(dy_ref, layout, start), masks.values, target)
        w = _load_param(w_ref, layout, start, masks.params, target)
        return xhat, dy, dy if w is None else dy * w, masks

    def write_dx(start, values, means):
        xhat, dy, g, masks = values
        dx = (g - means[1] - xhat * means[0]) * rstd
        c.store(_piece(dx_ref, layout, start), dx, masks.values, target)
        return jnp.sum(dy * xhat, axis=2, keepdims=True), jnp.sum(dy, axis=2, keepdims=True)

    def write_partials(start, partials):
        if param_grads:
            mask = _masks(layout, first_row, start).params
            for ref, value in zip(partial_refs, partials, strict=True):
                c.store(_piece(ref, layout, start, params=True), value, mask, target)

    if layout.config.chunks == 1:
        values = piece_values((0, 0))
        xhat, _, g, _ = values
        means = (c.row_sum(g * xhat) / layout.size, c.row_sum(g) / layout.size)
        write_partials((0, 0), write_dx((0, 0), values, means))
        return

    def reduce_body(k, sums):
        xhat, _, g, _ = piece_values(_piece_starts(layout, k))
        return sums[0] + c.row_sum(g * xhat), sums[1] + c.row_sum(g)

    zero = jnp.zeros((layout.config.block_rows, 1, 1), F32)
    (nc, ns), (pc, ps) = layout.counts, layout.piece
    sums = jax.lax.fori_loop(0, nc * ns, reduce_body, (zero, zero))
    means = tuple(s / layout.size for s in sums)

    # Channels outermost: a channel piece's partials are summed over its spatial pieces in
    # the loop carry and stored once.
    @pl.loop(0, nc)
    def _(i):
        start_channel = _start(i, pc, nc)

        def spatial_body(j, partials):
            start = (start_channel, _start(j, ps, ns))
            piece_sums = write_dx(start, piece_values(start), means)
            return tuple(p + s for p, s in zip(partials, piece_sums, strict=True))

        zeros = jnp.zeros((layout.config.block_rows, pc, 1), F32)
        write_partials((start_channel, 0), jax.lax.fori_loop(0, ns, spatial_body, (zeros, zeros)))


def _backward_on(target: Target, x, weight, dy, shift, offset, rstd, *, groups, param_grads):
    """`(dx, dweight, dbias)` with one `pallas_call` on `target`; `dweight`/`dbias` are the
    float32 per-example gradients, `(batch, channels)` (`None` unless `param_grads`), whether
    `weight` is `(channels,)` or `(batch, channels)`."""
    batch, channels, spatial = x.shape
    rows = batch * groups
    layout = _layout(target, rows, channels // groups, spatial)
    value_block, param_block, stat_block = _specs(layout)
    params = [] if weight is None else [_row_params(weight, batch, groups)]
    out_specs = [value_block]
    partial_shape = jax.ShapeDtypeStruct((rows, layout.channels, 1), F32)
    out_shape = [jax.ShapeDtypeStruct((rows, layout.channels, spatial), x.dtype)]
    if param_grads:
        out_specs += [param_block] * 2
        out_shape += [partial_shape] * 2
    kernel = functools.partial(
        _group_norm_bwd_kernel,
        target=target,
        layout=layout,
        has_weight=weight is not None,
        param_grads=param_grads,
    )
    dx, *partials = c.pallas_call(
        kernel,
        target,
        layout.config,
        grid=(c.ceil_div(rows, layout.config.block_rows),),
        in_specs=[value_block] + [param_block] * len(params) + [value_block] + [stat_block] * 3,
        out_specs=out_specs,
        out_shape=out_shape,
        name="eqxnorm_group_norm_bwd",
    )(
        x.reshape(rows, layout.channels, spatial),
        *params,
        dy.reshape(rows, layout.channels, spatial),
        *(s.reshape(rows, 1, 1) for s in (shift, offset, rstd)),
    )
    dw, db = (p.reshape(batch, channels) for p in partials) if param_grads else (None, None)
    return dx.reshape(x.shape), dw, db


# --- staging per platform, batching, differentiation -------------------------------------------


def _fold(axis_size: int, batched: bool, x):
    return None if x is None else c.fold(axis_size, batched, x)


def _folding_per_example(fn):
    """`fn(x, weight, bias)` with per-example `(batch, channels)` parameters as a `custom_vmap`
    function that folds the vmapped axis of every argument (broadcasting the unbatched ones)
    into the batch: ONE call whichever of `x` and the parameters are batched."""
    forward = custom_vmap(fn)

    @forward.def_vmap
    def _(axis_size, in_batched, *args):
        if axis_size == 0:
            return c.empty_batch(forward, in_batched, args)
        folded = forward(*(_fold(axis_size, b, a) for b, a in zip(in_batched, args, strict=True)))
        out = tuple(c.unfold(axis_size, o) for o in folded)
        return out, (True,) * len(out)

    return forward


@functools.cache
def _forward(groups: int, eps: float, per_example: bool, backend: str):
    """`(x, weight, bias) -> (y, shift, offset, rstd)`, batching by folding into the batch
    (parameters per channel, or `per_example`), on the GPU `backend` (`c.GPU_BACKENDS`)."""

    def forward(x, weight, bias):
        fn = functools.partial(_forward_on, groups=groups, eps=eps)
        mosaic_gpu = c.MosaicGPU(
            functools.partial(_mgpu.forward_on, groups=groups, eps=eps),
            functools.partial(_mgpu.forward_supported, groups),
        )
        rule = c.Rule("b c s, b? c, b? c -> b c s, b g, b g, b g", split="b")
        return c.per_platform(
            fn, x, weight, bias, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend
        )

    return (_folding_per_example if per_example else c.folding_forward)(forward)


@functools.cache
def _backward(groups: int, per_example: bool, backend: str, param_grads: bool):
    """`(x, weight, dy, shift, offset, rstd) -> (dx, dweight, dbias)` (per-example float32
    parameter gradients, `None` unless `param_grads`), batching by folding into the batch."""

    @custom_vmap
    def backward(x, weight, dy, shift, offset, rstd):
        kwargs = dict(groups=groups, param_grads=param_grads)
        fn = functools.partial(_backward_on, **kwargs)
        mosaic_gpu = c.MosaicGPU(
            functools.partial(_mgpu.backward_on, **kwargs),
            functools.partial(_mgpu.backward_supported, groups),
        )
        rule = c.Rule("b c s, b? c, b c s, b g, b g, b g -> b c s, b c, b c", split="b")
        args = (x, weight, dy, shift, offset, rstd)
        return c.per_platform(fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend)

    @backward.def_vmap
    def _(axis_size, in_batched, x, weight, dy, shift, offset, rstd):
        args = (x, weight, dy, shift, offset, rstd)
        if axis_size == 0:
            return c.empty_batch(backward, in_batched, args)
        out_batched = (True, True if param_grads else None, True if param_grads else None)
        if in_batched[1] and not per_example:
            axes = tuple(0 if b else None for b in in_batched)
            return jax.vmap(backward.fun, in_axes=axes)(*args), out_batched
        # The parameter gradients are per example, so folding keeps them per vmapped example
        # too: `(axis_size, batch, channels)`. Per-example parameters fold with `x`.
        folded = [
            a if i == 1 and not per_example else _fold(axis_size, in_batched[i], a)
            for i, a in enumerate(args)
        ]
        out = backward(*folded)
        return tuple(c.unfold(axis_size, o) for o in out), out_batched

    return backward


@functools.cache
def _group_norm(groups: int, eps: float, per_example: bool, backend: str):
    """The differentiable function `(x, weight, bias) -> y` (see
    `eqxnorm.kernels._autodiff.norm_with_jvp`) on the GPU `backend`; the backward's parameter
    gradients are per example, summed here unless the parameters are `per_example`."""
    return _autodiff.norm_with_jvp(
        _forward(groups, eps, per_example, backend),
        functools.partial(_backward, groups, per_example, backend),
        _identity if per_example else _sum_over_examples,
        _layout_of_groups(groups),
    )


def _layout_of_groups(groups: int) -> _autodiff.Layout:
    """`(batch, channels, spatial)` viewed as the reference's `(batch, groups,
    channels/groups, spatial)`, reduced over its last two axes; parameters `(channels,)` or
    per example `(batch, channels)`, statistics `(batch, groups)`."""

    def view(a):
        batch, channels, spatial = a.shape
        return a.reshape(batch, groups, channels // groups, spatial)

    def param(p):
        if p is None:
            return None
        p = p if p.ndim == 2 else p[None]
        return p.reshape(p.shape[0], groups, p.shape[1] // groups, 1)

    return _autodiff.Layout(
        axis=(2, 3),
        center=True,
        x=view,
        unview=lambda t, shape: t.reshape(shape),
        param=param,
        stat=lambda s: s[:, :, None, None],
        unstat=lambda s: s[:, :, 0, 0],
    )


def _sum_over_examples(grad):
    return jnp.sum(grad, axis=0)


def _identity(grad):
    return grad


# --- entry point -------------------------------------------------------------------------------


@typechecked()
def group_norm(
    x: Float[Array, "batch channels spatial"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
    backend: str = "auto",
) -> Float[Array, "batch channels spatial"]:
    r"""GroupNorm as a fused Pallas kernel; the same maths and signature as
    `eqxnorm.kernels.reference.group_norm`: the channels are split into `groups` contiguous
    groups and each `(example, group)` slice of `channels/groups × spatial` elements is
    normalized with its own statistics,
    $y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}}\gamma_c + \beta_c$.

    InstanceNorm is the case `groups == channels`.

    **Arguments:**

    - `x`: `(batch, channels, spatial)`, the spatial axes flattened (`spatial` may be 1).
    - `weight`, `bias`: `(channels,)` or `None`.
    - `groups`: divides `channels`.
    - `eps`: added to the variance.
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(batch, channels, spatial)` in `x.dtype`.
    """
    return _group_norm(int(groups), float(eps), False, backend)(x, weight, bias)


@typechecked()
def adaptive_group_norm(
    x: Float[Array, "batch channels spatial"],
    scale: Float[Array, "batch channels"],
    shift: Float[Array, "batch channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
    backend: str = "auto",
) -> Float[Array, "batch channels spatial"]:
    r"""Adaptive GroupNorm (FiLM, the diffusion U-Net's conditioning) as a fused Pallas kernel;
    the same maths and signature as `eqxnorm.kernels.reference.adaptive_group_norm`:
    $y = (\hat{x}\gamma + \beta)(1 + s_{b,c}) + t_{b,c}$ with $\hat{x}$ the GroupNorm of
    [`group_norm`][], per example $b$ and channel $c$, computed in float32 and rounded once.

    The kernel is GroupNorm's with the per-example parameters $W = \gamma(1 + s)$, $B =
    \beta(1 + s) + t$, formed in float32 outside it; under `jax.vmap` (of a one-example call)
    the vmapped examples and their parameters are folded into one launch.

    **Arguments:**

    - `x`: `(batch, channels, spatial)`, the spatial axes flattened (`spatial` may be 1).
    - `scale`, `shift`: `(batch, channels)`, $s$ and $t$.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `groups`: divides `channels`.
    - `eps`: added to the variance.
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(batch, channels, spatial)` in `x.dtype`.
    """
    w, b = reference.modulation(scale, shift, weight, bias, F32)
    return _group_norm(int(groups), float(eps), True, backend)(x, w, b)


__all__ = ["group_norm", "adaptive_group_norm"]
