r"""Fused Pallas kernels for GroupNorm (and InstanceNorm, its case `groups == channels`) over a
`(batch, channels, spatial)` array, the spatial axes flattened, and for its adaptive (FiLM,
adaLN) modulation.

The kernels view `x` as `(batch·groups, channels/groups, spatial)`: each *row* is one
`(example, group)` slice, normalized with the statistics of its `n = channels/groups ×
spatial` elements. A block of rows reads one `(channels/groups, 1)` column of the affine
parameters per row, those of its own groups. They may be per channel, `(channels,)`, or *per
example*, `(batch, channels)`: the kernels are the same, only the parameters' view differs.
Per-example parameters are one column per row already (a reshape); per-channel ones are read
in place as `(groups, channels/groups, 1)` when a block's rows lie in one period of the
groups, and otherwise expanded to one column per row in XLA (`batch × channels` values, tiny
next to `x`, but one more launch).

**Adaptive modulation.** $(\hat{x}\gamma + \beta)(1 + s) + t$ with per-example `scale` $s$ and
`shift` $t$ is a GroupNorm with the per-example parameters $W = \gamma(1 + s)$, $B = \beta(1 +
s) + t$ (`eqxnorm.kernels.reference.modulation`, float32 in XLA; `batch × channels` values).
The kernels take $W, B$; autodiff through `modulation` turns their per-example gradients
(below, without the sum over examples) into those of `scale`, `shift`, $\gamma$ and $\beta$.

**Channels-last input** `(batch, spatial, channels)` is read in place, never transposed: the
launch blocks the `(batch, spatial, groups, channels/groups)` view of `x` (a reshape) with
the group axis squeezed out, on a grid over (groups, example blocks), so a program holds
`(block_rows, spatial, channels/groups)`: the same slices with their two axes swapped (the
layout's `channels_last`; masks, pieces and the parameter gradients' spatial sums follow
it), the same kernel bodies. A group is then a strided set of `channels/groups`-element runs,
which Triton loads with masks; Mosaic GPU's TMA row staging and Mosaic TPU's (8, 128) tiling
cannot block it, so on cuda the channels-last kernels are Triton's, and on TPU the entry
points run the reference (which XLA reduces where it lies).

Layers, from the bottom up:

1. `_group_norm_fwd_kernel`, `_group_norm_bwd_kernel`: kernel bodies on refs.
2. `_forward_on`, `_backward_on`: the `pallas_call` wrappers for one compilation target.
3. `_forward`, `_backward`: staged per platform and `custom_vmap`ped, so a `jax.vmap` of a
   one-example module folds the vmapped axis into the kernel's batch instead of launching one
   program per example.
4. `_group_norm`: the differentiable function (`eqxnorm.kernels._autodiff.norm_with_jvp`):
   the forward kernel with a JVP rule whose tangent is transposed by the backward kernel.
5. `group_norm`, `adaptive_group_norm` and their `_channels_last` twins: the entry points,
   with the reference's signatures.

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
import math
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
    pieces of `piece` elements, `counts` of them along each axis (one piece covering the block
    when the slice fits on chip, `config.chunks == 1`). `block`, `piece` and `counts` follow
    the block's axes: `(channels, spatial)`, or `(spatial, channels)` when `channels_last`
    (the slice read in place from a `(batch, spatial, channels)` array)."""

    config: c.BlockConfig
    rows: int
    channels: int
    spatial: int
    block: tuple[int, int]
    piece: tuple[int, int]
    counts: tuple[int, int]
    channels_last: bool = False

    @property
    def size(self) -> int:
        """The number of elements of a slice."""
        return self.channels * self.spatial

    @property
    def extents(self) -> tuple[int, int]:
        """The slice's extents along the block's axes 1 and 2."""
        dims = (self.channels, self.spatial)
        return dims[::-1] if self.channels_last else dims

    @property
    def row_axis(self) -> int:
        """The grid axis over row blocks: 0, or 1 channels-last, whose grid is (groups,
        example blocks) so that consecutive programs read neighbouring column runs."""
        return int(self.channels_last)

    @property
    def channel_index(self) -> int:
        """Which of the block's axes 1 and 2 holds the channels, as 0 or 1."""
        return int(self.channels_last)


def _layout(
    target: Target,
    rows: int,
    channels: int,
    spatial: int,
    channels_last: bool = False,
    thread_elements: int = 16,
) -> _Layout:
    extents = (spatial, channels) if channels_last else (channels, spatial)
    block = (c.padded(target, extents[0]), c.padded(target, extents[1]))
    config = c.block_config(target, rows, block[0] * block[1], thread_elements=thread_elements)
    if config.chunks == 1:
        piece = block
    elif target.masked:
        # Chunks of `block_cols` elements: runs of up to `block_cols` along the block's last
        # axis, several of them per piece when that axis is shorter. Powers of two, so the
        # pieces tile the padded block exactly.
        lane_piece = min(block[1], config.block_cols)
        piece = (min(block[0], config.block_cols // lane_piece), lane_piece)
    elif extents[1] % config.block_cols == 0:
        # Mosaic slices the lane axis at aligned offsets only, keeping the sublane one whole.
        piece = (extents[0], config.block_cols)
    else:
        piece = extents
    counts = (c.ceil_div(extents[0], piece[0]), c.ceil_div(extents[1], piece[1]))
    return _Layout(config, rows, channels, spatial, block, piece, counts, channels_last)


class _Masks(NamedTuple):
    """The valid positions of a piece of a block: `rows` `(block_rows, 1, 1)`, `params`
    (rows and channels) `(block_rows, channels, 1)` and `values` (all three axes)."""

    rows: jax.Array
    params: jax.Array
    values: jax.Array


def _masks(layout: _Layout, first_row: Any, start: tuple[Any, Any] = (0, 0)) -> _Masks:
    """The masks of the piece starting at `start` (along the block's axes 1 and 2) in the
    block of rows from `first_row`."""
    br, (p1, p2) = layout.config.block_rows, layout.piece
    rows = c.iota((br, 1, 1), 0, first_row) < layout.rows
    axes = (
        c.iota((1, p1, 1), 1, start[0]) < layout.extents[0],
        c.iota((1, 1, p2), 2, start[1]) < layout.extents[1],
    )
    params = rows & axes[layout.channel_index]
    return _Masks(rows, params, params & axes[1 - layout.channel_index])


def _start(index: Any, size: int, count: int) -> Any:
    """The offset of piece `index` of `size` along an axis cut into `count` pieces (a static
    0 when there is one piece, so Mosaic never sees a dynamic offset on a sublane axis)."""
    if count == 1:
        return 0
    start = index * size
    # `pl.multiple_of` of a Python int breaks Triton's lowering.
    return start if isinstance(start, int) else pl.multiple_of(start, size)


def _piece(ref: Any, layout: _Layout, start: tuple[Any, Any], params: bool = False) -> Any:
    """The view of the piece at `start` of a block ref (of a parameter block, `(rows,
    channels, 1)` or channels-last `(rows, 1, channels)`, when `params`)."""
    if layout.config.chunks == 1:
        return ref
    axes = [pl.ds(s, p) for s, p in zip(start, layout.piece, strict=True)]
    if params:
        axes[1 - layout.channel_index] = slice(None)
    return ref.at[:, axes[0], axes[1]]


def _piece_starts(layout: _Layout, k: Any) -> tuple[Any, Any]:
    """The start of the `k`-th piece along the block's axes 1 and 2, the pieces along axis 2
    innermost."""
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
    first_count = math.prod(map(min, layout.piece, layout.extents))
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
    first_row = pl.program_id(layout.row_axis) * layout.config.block_rows

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
        # The slice's first element read on its own: a reduction over both axes saved.
        first = c.row_start(target, lambda view: c.load(view(x_ref), masks.rows, target))
        stats = c.block_moments(x, masks.values, layout.size, center=True, first=first)
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


def _specs_channels_last(layout: _Layout):
    """`_specs` of the channels-last launch: on a grid over (groups, example blocks), blocks
    of the `(batch, spatial, groups, channels/groups)` view of `x` with the group squeezed
    out, so a program reads its groups' `(spatial, channels/groups)` slices in place (strided
    runs of `channels/groups` elements), never a transposed copy. The groups vary fastest:
    programs launched together read neighbouring runs of the same rows, which share memory
    sectors."""
    br, (ps, pc) = layout.config.block_rows, layout.block
    index = lambda g, i: (i, 0, g, 0)  # noqa: E731
    return (
        pl.BlockSpec((br, ps, None, pc), index),
        pl.BlockSpec((br, 1, None, pc), index),
        pl.BlockSpec((br, 1, None, 1), index),
    )


class _Launch(NamedTuple):
    """A launch over `batch` examples `(channels, spatial)` in `groups` groups, or
    `(spatial, channels)` when `layout.channels_last`: its layout, grid, BlockSpecs (values,
    parameters, statistics) and the shapes of the arrays they block (`x`'s view, the expanded
    parameters' and per-channel partials', the statistics')."""

    layout: _Layout
    grid: tuple[int, ...]
    specs: tuple[Any, Any, Any]
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    batch: int
    groups: int

    def params(self, param) -> tuple[Any, Any]:
        """A `(channels,)` or `(batch, channels)` parameter as an operand and its BlockSpec:
        read in place (a reshape) by the blocks of its own groups when it is per channel and
        a block's rows lie in one period of the groups (`groups % block_rows == 0`: channels
        first), else expanded to `shapes[1]` (per-example parameters: a reshape too)."""
        br = self.layout.config.block_rows
        if not self.layout.channels_last:
            if param.ndim == 1 and self.groups % br == 0:
                # A block of rows from `i·br` holds groups `(i·br) mod groups` onwards.
                periods = self.groups // br
                block = (br, self.layout.block[0], 1)
                spec = pl.BlockSpec(block, lambda i: (jax.lax.rem(i, periods), 0, 0))
                return param.reshape(self.groups, -1, 1), spec
            return _row_params(param, self.batch, self.groups), self.specs[1]
        per_group = param.reshape(-1, 1, self.groups, self.layout.channels)
        return jnp.broadcast_to(per_group, self.shapes[1]), self.specs[1]

    def gradients(self, partials):
        """The per-channel partials as per-example `(batch, channels)` gradients."""
        return partials.reshape(self.batch, self.groups * self.layout.channels)


def _launch(
    target: Target,
    shape: tuple[int, int, int],
    groups: int,
    channels_last: bool,
    thread_elements: int = 16,
):
    """The [`_Launch`][] over `x` of `shape`, `(batch, channels, spatial)` or channels-last
    `(batch, spatial, channels)`: one row per `(example, group)` and a 1-D grid over row
    blocks; channels-last, blocks of examples on a grid over (groups, example blocks).
    `thread_elements` as `_common.block_config`'s."""
    if channels_last:
        batch, spatial, channels = shape
        layout = _layout(
            target, batch, channels // groups, spatial, True, thread_elements=thread_elements
        )
        grid = (groups, c.ceil_div(batch, layout.config.block_rows))
        per_group = layout.channels
        shapes = (
            (batch, spatial, groups, per_group),
            (batch, 1, groups, per_group),
            (batch, 1, groups, 1),
        )
        return _Launch(layout, grid, _specs_channels_last(layout), shapes, batch, groups)
    batch, channels, spatial = shape
    rows = batch * groups
    layout = _layout(target, rows, channels // groups, spatial, thread_elements=thread_elements)
    grid = (c.ceil_div(rows, layout.config.block_rows),)
    shapes = ((rows, layout.channels, spatial), (rows, layout.channels, 1), (rows, 1, 1))
    return _Launch(layout, grid, _specs(layout), shapes, batch, groups)


def _forward_on(
    target: Target, x, weight, bias, *, groups: int, eps: float, channels_last: bool = False
):
    """`(y, shift, offset, rstd)` of `x` with one `pallas_call` on `target`; the statistics
    are `(batch, groups)` float32. The parameters are `(channels,)` or `(batch, channels)`;
    `x` is `(batch, channels, spatial)`, or `(batch, spatial, channels)` when
    `channels_last`."""
    launch = _launch(target, x.shape, groups, channels_last)
    params = [launch.params(p) for p in (weight, bias) if p is not None]
    value_block, _, stat_block = launch.specs
    stat_shape = jax.ShapeDtypeStruct(launch.shapes[2], F32)
    kernel = functools.partial(
        _group_norm_fwd_kernel,
        target=target,
        layout=launch.layout,
        eps=eps,
        has_weight=weight is not None,
        has_bias=bias is not None,
    )
    xr = x.reshape(launch.shapes[0])
    y, *stats = c.pallas_call(
        kernel,
        target,
        launch.layout.config,
        grid=launch.grid,
        in_specs=[value_block] + [spec for _, spec in params],
        out_specs=[value_block, stat_block, stat_block, stat_block],
        out_shape=[jax.ShapeDtypeStruct(xr.shape, x.dtype), stat_shape, stat_shape, stat_shape],
        name="eqxnorm_group_norm_fwd",
    )(xr, *(p for p, _ in params))
    return (y.reshape(x.shape), *(s.reshape(x.shape[0], groups) for s in stats))


# --- backward ----------------------------------------------------------------------------------


# Elements per thread of the Triton backward's blocks (`_common.block_config`): it holds `x̂`,
# `dy` and `dy·γ` of its block and the per-channel sums, more than a forward; at 16 a thread
# (8 warps for 4 × 1024) it took 74 registers in bf16 and 80 in float32, 38 % occupancy
# (deviceless H200, 16×128×32×32); at 8 (16 warps) 40 in both, 75 %.
_BWD_THREAD_ELEMENTS = 8


def _group_norm_bwd_kernel(x_ref, *refs, target, layout, has_weight, param_grads):
    r"""$\partial x = r(g - \overline{g} - \hat{x}\,\overline{g\hat{x}})$, $g = \partial y
    \odot \gamma_c$, for a block of rows, and per row and channel the float32 sums over
    `spatial` of $\partial y \odot \hat{x}$ and $\partial y$."""
    w_ref, dy_ref, shift_ref, offset_ref, rstd_ref, dx_ref, *partial_refs = c.split_refs(
        refs, has_weight
    )
    first_row = pl.program_id(layout.row_axis) * layout.config.block_rows
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
        spatial = 1 if layout.channels_last else 2
        return (
            jnp.sum(dy * xhat, axis=spatial, keepdims=True),
            jnp.sum(dy, axis=spatial, keepdims=True),
        )

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
    sums = jax.lax.fori_loop(0, math.prod(layout.counts), reduce_body, (zero, zero))
    means = tuple(s / layout.size for s in sums)

    # Channels outermost: a channel piece's partials are summed over its spatial pieces in
    # the loop carry and stored once.
    ci = layout.channel_index
    nc, ns = layout.counts[ci], layout.counts[1 - ci]
    pc, ps = layout.piece[ci], layout.piece[1 - ci]

    def starts(channel, spatial):
        return (spatial, channel) if layout.channels_last else (channel, spatial)

    @pl.loop(0, nc)
    def _(i):
        start_channel = _start(i, pc, nc)

        def spatial_body(j, partials):
            start = starts(start_channel, _start(j, ps, ns))
            piece_sums = write_dx(start, piece_values(start), means)
            return tuple(p + s for p, s in zip(partials, piece_sums, strict=True))

        zeros = jnp.zeros((layout.config.block_rows, *starts(pc, 1)), F32)
        partials = jax.lax.fori_loop(0, ns, spatial_body, (zeros, zeros))
        write_partials(starts(start_channel, 0), partials)


def _backward_on(
    target: Target,
    x,
    weight,
    dy,
    shift,
    offset,
    rstd,
    *,
    groups,
    param_grads,
    channels_last: bool = False,
):
    """`(dx, dweight, dbias)` with one `pallas_call` on `target`; `dweight`/`dbias` are the
    float32 per-example gradients, `(batch, channels)` (`None` unless `param_grads`), whether
    `weight` is `(channels,)` or `(batch, channels)`."""
    launch = _launch(target, x.shape, groups, channels_last, _BWD_THREAD_ELEMENTS)
    value_block, param_block, stat_block = launch.specs
    params = [] if weight is None else [launch.params(weight)]
    out_specs = [value_block]
    out_shape = [jax.ShapeDtypeStruct(launch.shapes[0], x.dtype)]
    if param_grads:
        out_specs += [param_block] * 2
        out_shape += [jax.ShapeDtypeStruct(launch.shapes[1], F32)] * 2
    kernel = functools.partial(
        _group_norm_bwd_kernel,
        target=target,
        layout=launch.layout,
        has_weight=weight is not None,
        param_grads=param_grads,
    )
    dx, *partials = c.pallas_call(
        kernel,
        target,
        launch.layout.config,
        grid=launch.grid,
        in_specs=[value_block, *(spec for _, spec in params), value_block] + [stat_block] * 3,
        out_specs=out_specs,
        out_shape=out_shape,
        name="eqxnorm_group_norm_bwd",
    )(
        x.reshape(launch.shapes[0]),
        *(p for p, _ in params),
        dy.reshape(launch.shapes[0]),
        *(s.reshape(launch.shapes[2]) for s in (shift, offset, rstd)),
    )
    dw, db = (launch.gradients(p) for p in partials) if param_grads else (None, None)
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


def _mosaic_gpu_or_none(channels_last: bool, launch, supported) -> c.MosaicGPU | None:
    """The Mosaic GPU launch for channels-first input; none for channels-last, whose groups
    are strided column runs rather than the contiguous rows the Mosaic GPU row kernel stages
    with TMA: on cuda those run the Triton kernel (see [`group_norm_channels_last`][])."""
    return None if channels_last else c.MosaicGPU(launch, supported)


def _rule(channels_last: bool, spec: str) -> c.Rule:
    """The sharding rule `spec` (written channels-first), for channels-last `x` too."""
    return c.Rule(spec.replace("c s", "s c") if channels_last else spec, split="b")


@functools.cache
def _forward(groups: int, eps: float, per_example: bool, backend: str, channels_last=False):
    """`(x, weight, bias) -> (y, shift, offset, rstd)`, batching by folding into the batch
    (parameters per channel, or `per_example`), on the GPU `backend` (`c.GPU_BACKENDS`)."""

    def forward(x, weight, bias):
        fn = functools.partial(_forward_on, groups=groups, eps=eps, channels_last=channels_last)
        mosaic_gpu = _mosaic_gpu_or_none(
            channels_last,
            functools.partial(_mgpu.forward_on, groups=groups, eps=eps),
            functools.partial(_mgpu.forward_supported, groups),
        )
        rule = _rule(channels_last, "b c s, b? c, b? c -> b c s, b g, b g, b g")
        return c.per_platform(
            fn, x, weight, bias, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend
        )

    return (_folding_per_example if per_example else c.folding_forward)(forward)


@functools.cache
def _backward(groups: int, per_example: bool, backend: str, channels_last: bool, param_grads: bool):
    """`(x, weight, dy, shift, offset, rstd) -> (dx, dweight, dbias)` (per-example float32
    parameter gradients, `None` unless `param_grads`), batching by folding into the batch."""

    @custom_vmap
    def backward(x, weight, dy, shift, offset, rstd):
        kwargs = dict(groups=groups, param_grads=param_grads)
        fn = functools.partial(_backward_on, **kwargs, channels_last=channels_last)
        mosaic_gpu = _mosaic_gpu_or_none(
            channels_last,
            functools.partial(_mgpu.backward_on, **kwargs),
            functools.partial(_mgpu.backward_supported, groups),
        )
        rule = _rule(channels_last, "b c s, b? c, b c s, b g, b g, b g -> b c s, b c, b c")
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
def _group_norm(groups: int, eps: float, per_example: bool, backend: str, channels_last=False):
    """The differentiable function `(x, weight, bias) -> y` (see
    `eqxnorm.kernels._autodiff.norm_with_jvp`) on the GPU `backend`; the backward's parameter
    gradients are per example, summed here unless the parameters are `per_example`."""
    layout = _layout_of_groups_channels_last if channels_last else _layout_of_groups
    return _autodiff.norm_with_jvp(
        _forward(groups, eps, per_example, backend, channels_last),
        lambda param_grads, _: _backward(groups, per_example, backend, channels_last, param_grads),
        None if per_example else _sum_over_examples,
        layout(groups),
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


def _layout_of_groups_channels_last(groups: int) -> _autodiff.Layout:
    """`(batch, spatial, channels)` viewed as `(batch, spatial, groups, channels/groups)`,
    reduced over axes 1 and 3 (a reshape, no transpose); parameters and statistics as in
    [`_layout_of_groups`][]."""

    def view(a):
        batch, spatial, channels = a.shape
        return a.reshape(batch, spatial, groups, channels // groups)

    def param(p):
        if p is None:
            return None
        p = p if p.ndim == 2 else p[None]
        return p.reshape(p.shape[0], 1, groups, p.shape[1] // groups)

    return _autodiff.Layout(
        axis=(1, 3),
        center=True,
        x=view,
        unview=lambda t, shape: t.reshape(shape),
        param=param,
        stat=lambda s: s[:, None, :, None],
        unstat=lambda s: s[:, 0, :, 0],
    )


def _sum_over_examples(grads: list, like) -> list:
    """The per-example `(batch, channels)` gradients of both parameters summed over the
    examples in float32, in one XLA launch (`c.sum_parts`; `like`: a parameter, for its
    dtype)."""
    return c.sum_parts(grads, axes=(0,), like=like)


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


def _off_tpu(kernel, reference_fn, groups: int, eps: float):
    """`kernel(x, weight, bias)`, except on TPU, where the reference runs: Mosaic TPU tiles a
    block's last two axes by (8, 128) or whole, and a channels-last group is a strided
    `(spatial, channels/groups)` slice of the `(spatial, groups, channels/groups)` view,
    which neither tiling reads in place. XLA reduces the reference's view where it lies, so
    TPU gets no transposed copy either; it gets no fused kernel."""
    reference_fn = functools.partial(reference_fn, groups=int(groups), eps=float(eps))

    def run(x, weight, bias):
        return jax.lax.platform_dependent(x, weight, bias, tpu=reference_fn, default=kernel)

    return run


def _check_backend_channels_last(backend: str) -> None:
    if backend == "mosaic_gpu":
        raise ValueError(
            "impl='mosaic_gpu' has no channels-last GroupNorm kernel: its row kernel stages "
            "contiguous (example, group) rows, and a channels-last group is a strided run of "
            "columns. Use impl='pallas' (the Triton kernel reads channels-last input in place "
            "on cuda), or channel_axis=1 for channels-first input."
        )


@typechecked()
def group_norm_channels_last(
    x: Float[Array, "batch spatial channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
    backend: str = "auto",
) -> Float[Array, "batch spatial channels"]:
    r"""[`group_norm`][] of channels-last input, read in place: the same maths and signature
    as `eqxnorm.kernels.reference.group_norm_channels_last`.

    The kernels block the `(batch, spatial, groups, channels/groups)` view of `x` (a reshape)
    on a grid over (groups, example blocks): each program reads its `(spatial,
    channels/groups)` slices as strided runs of `channels/groups` elements, and writes `y`
    and `dx` the same way, so no transposed copy of `x` or `dy` is made. On cuda this is the
    Triton kernel (Mosaic GPU has none: `backend="mosaic_gpu"` raises), on TPU Mosaic's.

    **Arguments:**

    - `x`: `(batch, spatial, channels)`, the spatial axes flattened (`spatial` may be 1).
    - `weight`, `bias`, `groups`, `eps`, `backend`: as [`group_norm`][].

    **Returns:**

    `(batch, spatial, channels)` in `x.dtype`.
    """
    _check_backend_channels_last(backend)
    kernel = _group_norm(int(groups), float(eps), False, backend, True)
    return _off_tpu(kernel, reference.group_norm_channels_last, groups, eps)(x, weight, bias)


@typechecked()
def adaptive_group_norm_channels_last(
    x: Float[Array, "batch spatial channels"],
    scale: Float[Array, "batch channels"],
    shift: Float[Array, "batch channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
    backend: str = "auto",
) -> Float[Array, "batch spatial channels"]:
    r"""[`adaptive_group_norm`][] of channels-last input, read in place as in
    [`group_norm_channels_last`][]; the same maths and signature as
    `eqxnorm.kernels.reference.adaptive_group_norm_channels_last`.

    **Arguments:**

    - `x`: `(batch, spatial, channels)`, the spatial axes flattened.
    - `scale`, `shift`, `weight`, `bias`, `groups`, `eps`, `backend`: as
      [`adaptive_group_norm`][].

    **Returns:**

    `(batch, spatial, channels)` in `x.dtype`.
    """
    _check_backend_channels_last(backend)
    w, b = reference.modulation(scale, shift, weight, bias, F32)
    kernel = _group_norm(int(groups), float(eps), True, backend, True)
    return _off_tpu(kernel, _reference_modulated, groups, eps)(x, w, b)


def _reference_modulated(x, w, b, *, groups: int, eps: float):
    """The reference's channels-last GroupNorm with per-example parameters `w`, `b`
    `(batch, channels)` (the modulation already applied)."""
    w, b = (p[:, None, :] for p in (w, b))
    return reference._group_normalized(x, groups, w, b, eps, channels_last=True)


__all__ = [
    "group_norm",
    "adaptive_group_norm",
    "group_norm_channels_last",
    "adaptive_group_norm_channels_last",
]
