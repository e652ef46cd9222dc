r"""The row norms' kernels on Mosaic GPU (Hopper and newer): the same launches, maths and
outputs as `eqxnorm.kernels.row_norm`'s `_forward_on` / `_backward_on`, for the GPU backend JAX
keeps. See `eqxnorm.kernels._mosaic_gpu` for the staging (TMA boxes into shared memory, one
warp per row) and for why these bodies are not `row_norm`'s.

A program owns `block_rows` rows of one group (grid `(row blocks, groups)`), staged whole in
shared memory, and makes its passes over them there: one read of `x` (and `residual`, `dy`,
`dh`) from HBM and one write of each output, as the Triton kernels' one-pass case does.

**Folded rows** (a row too wide for a tile of 4 rows on chip, `_mosaic_gpu.boxes`): a program
owns one row, its boxes dealt round the 4 warps (tile `k` holds boxes `4k` to `4k + 3`); each
per-row sum below is the warps' sums combined (`_mosaic_gpu.across_warps`), the statistics
are stored and read as one value per row, the parameters read per warp ([`_param`][]), and
the backward's partial parameter gradients kept per column of a tile (no sum over its rows,
which are different columns).

**Split rows** (a row too wide for one program even folded, `_mosaic_gpu.boxes`' `split`):
a cluster of `split` programs owns a row, program `p` its tiles from `p · chunks` on, folded
as above; each per-row sum is the programs' combined through distributed shared memory
(`_mosaic_gpu.across_cluster`, in the same order in every program), the statistics stored by
the first. The forward is one row per cluster; the backward loops each cluster over rows
(persistent, `_mosaic_gpu.split_programs`), each program's partial parameter gradients its
own columns', on chip, written once at the end (no other program has them to combine).

**Forward.** Staged `h` (`x`, or `x + residual` rounded to the residual's dtype, written over
the residual's box and stored as the output `h`). The statistics are
`eqxnorm.kernels.reference.moments`' corrected two-pass over the boxes of a row (the Triton
kernels' `_common.block_moments` shifts by the row's first element instead, to save
reductions): `shift` the mean of $h$,
$d = h - \text{shift}$ masked to the row, $d_0$ its first element, $\text{offset} = d_0 +
\overline{d - d_0}$, $\sigma^2 = \max(\overline{d^2} - \text{offset}^2, 0)$ (RMSNorm:
$\sigma^2 = \overline{h^2}$, shift and offset 0), each mean a sum of $v / n$. Then $y =
((h - \text{shift}) - \text{offset})\, r\, \gamma + \beta$ is written over `x`'s box and stored.

**Backward.** $\partial x = r(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}) + \partial h$
with $g = \partial y \odot \gamma$ (no $\overline{g}$ for RMSNorm), written over `dy`'s box (in
its dtype) and stored in each requested dtype; and the program's float32 column sums of
$\partial y \odot \hat{x}$ and $\partial y$ (its partial parameter gradients). The backwards
(the row norms', gated RMSNorm's and DyT's) are persistent: a program loops over blocks and
accumulates its partial sums over them, in shared memory where they fit (then combined over
a cluster of programs, `_mosaic_gpu.combine_partials`: one row of partials per cluster),
else in its row of the partials in HBM.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _mosaic_gpu as m, reference
from ._common import F32, Target, partial_iterations, sum_halves, sum_pair, sum_parts

plgpu = m.plgpu


class Tools(NamedTuple):
    """A program's helpers ([`_box_tools`][])."""

    cols: Any
    bcast: Any
    valid: Any
    first_tile: Any = 0


def _box_tools(boxes: m.Boxes, width: int, zero, first_tile=0) -> Tools:
    """`(cols(j), bcast(v, dims), valid(k), first_tile)` for a program: the columns of box
    `j` (a traced start, see [`m.dynamic_index`][]), a per-row or per-column vector broadcast
    to a box in the row layout, and the mask of a box's columns inside the row (`None` when
    every box is full). A folded row's tile `k` is its boxes `4k + w` (`w` the tile's row);
    a split row's program ([`m.Boxes`][]' `split`) stages the row's tiles from `first_tile`
    on, its box `j` the row's `4 · first_tile + j`."""
    shape = boxes.tile[1:]
    first_box = first_tile * boxes.tile_rows

    def cols(j):
        return pl.ds(m.dynamic_index(zero, (first_box + j) * boxes.cols), boxes.cols)

    def bcast(v, dims):
        return plgpu.layout_cast(lax.broadcast_in_dim(v, shape, dims), boxes.layout)

    def valid(k):
        if boxes.folded:
            if boxes.split * boxes.chunks * boxes.tile_rows * boxes.cols == width:
                return None
            col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=boxes.layout)
            part = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=boxes.layout)
            return col + ((first_tile + k) * boxes.tile_rows + part) * boxes.cols < width
        if width % boxes.cols == 0:
            return None
        col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=boxes.layout)
        return col + k * boxes.cols < width

    return Tools(cols, bcast, valid, first_tile)


def _load(smem, k, layout):
    return plgpu.load(smem.at[k], layout=layout).astype(F32)


def _masked(v, mask):
    return v if mask is None else jnp.where(mask, v, 0.0)


# A row of at least `REGISTER_SUM_BOXES` boxes (or folded tiles) of at most
# `REGISTER_SUM_ELEMENTS` elements a thread has its row sums added up in registers, box by
# box, and reduced across the lanes once per row ([`warp_totals`][]).
REGISTER_SUM_ELEMENTS = 8
REGISTER_SUM_BOXES = 16


def warp_totals(fn, boxes: m.Boxes, count: int = 1) -> list:
    """The per-row sums of each of the `count` boxes `fn(k)` returns (float32 boxes: several
    sums of one box's values read once) over a row's boxes, in one loop: a folded
    row's over each warp's part of it.

    - Many small boxes (`REGISTER_SUM_BOXES` of at most `REGISTER_SUM_ELEMENTS` a thread:
      wide rows, 4 rows of 8192 bfloat16 are 32 boxes of 256 columns, 8 elements a thread,
      a folded row's tiles 4): the boxes added up elementwise in registers, then reduced
      across the lanes once. Reduced box by box, each box's sum was
      5 dependent warp shuffles, which the one warpgroup of a program has nothing to hide
      behind: LayerNorm bfloat16's forward at 8192 spent 10 of each of its statistics
      loops' 68 and 154 instructions on them (`python -m benchmarks.sass`); now 46 and 110,
      none a shuffle.
    - Fewer or larger boxes, reduced box by box: their shuffles are fewer a row or shared by
      more elements, and summed in registers the accumulators cost more than they save (a
      LayerNorm float32 forward at 4096 × 1024, 16 a thread: 48 registers, 96 summed in
      registers; BatchNorm's statistics over 32 × 32 images, 8 boxes of 8: 30, then 79)."""
    shape = boxes.tile[1:]
    small = shape[0] * shape[1] // (32 * m.WARPS) <= REGISTER_SUM_ELEMENTS
    if small and boxes.chunks >= REGISTER_SUM_BOXES:
        zero = plgpu.layout_cast(jnp.zeros(shape, F32), boxes.layout)

        def add(k, acc):
            return [a + b for a, b in zip(acc, fn(k), strict=True)]

        sums = lax.fori_loop(0, boxes.chunks, add, [zero] * count)
        return [jnp.sum(a, axis=1) for a in sums]

    def box(k):
        return [jnp.sum(v, axis=1) for v in fn(k)]

    def body(k, acc):
        return [a + b for a, b in zip(acc, box(k), strict=True)]

    return lax.fori_loop(1, boxes.chunks, body, box(0))


def row_totals(fn, boxes: m.Boxes, count: int = 1) -> list:
    """[`warp_totals`][], a folded row's combined across its warps at once
    ([`_mosaic_gpu.across_warps`][])."""
    return m.across_warps(warp_totals(fn, boxes, count), boxes)


def row_total(fn, boxes: m.Boxes):
    """The per-row sum of the box `fn(k)` over a row's boxes ([`row_totals`][])."""
    return row_totals(lambda k: [fn(k)], boxes)[0]


def _row_stats(load_h, boxes: m.Boxes, width: int, center: bool, tools, exchange=None):
    r"""`(shift, offset, var)` per row of the staged boxes (`load_h(k)`: box `k` as float32,
    zero past the row's end), as `eqxnorm.kernels.reference.moments` defines them. A folded
    row's warps combine their sums twice for LayerNorm (the mean with the row's first
    element, then the offset with the mean square), once for RMSNorm; a split row's
    ([`m.Boxes`][]' `split`) are then its programs' combined by `exchange(values)`
    (`_mosaic_gpu.across_cluster`), as many exchanges. The first element is the first
    warp's of the cluster's first program, $d_0 = h_0 - \text{shift}$ in every one, so that
    a constant row normalizes to exactly its bias however it is staged."""
    bcast, valid = tools.bcast, tools.valid
    scale = 1.0 / width

    def combined(values):
        values = m.across_warps(values, boxes)
        return values if exchange is None else exchange(values)

    if not center:
        (mean_square,) = combined(warp_totals(lambda k: [jnp.square(load_h(k)) * scale], boxes))
        zeros = mean_square * 0.0
        return zeros, zeros, mean_square
    first = plgpu.broadcasted_iota(jnp.int32, boxes.tile[1:], 1, layout=boxes.layout) == 0
    if boxes.folded:
        part = plgpu.broadcasted_iota(jnp.int32, boxes.tile[1:], 0, layout=boxes.layout)
        first = first & (part == 0)
    h0 = jnp.sum(jnp.where(first, load_h(0), 0.0), axis=1)
    if exchange is not None:  # the cluster's first program's
        h0 = jnp.where(tools.first_tile == 0, h0, 0.0)
    shift, h0 = combined([*warp_totals(lambda k: [load_h(k) * scale], boxes), h0])
    d0 = h0 - shift

    def sums(k):
        c = _masked(load_h(k) - bcast(shift, [0]), valid(k))
        return _masked(c - bcast(d0, [0]), valid(k)) * scale, jnp.square(c) * scale

    offset, mean_square = combined(warp_totals(sums, boxes, 2))
    offset = d0 + offset
    return shift, offset, jnp.maximum(mean_square - offset * offset, 0.0)


def _copy_in(src, dst, barrier, rows, boxes, tools, group):
    """Start the TMA copies of a program's rows of `src` `(groups, rows, width)` into the
    boxes of `dst` `(chunks, block_rows, cols)`, all arriving on `barrier` (which expects
    `chunks` arrivals, [`_barrier`][]); a folded row's box `b` into tile `b // 4`, row `b % 4`
    of `dst` `(chunks, 4, cols)`."""
    cols = tools.cols
    if boxes.folded:

        @pl.loop(0, boxes.arrivals)
        def _(b):
            part = dst.at[b // boxes.tile_rows, pl.ds(b % boxes.tile_rows, 1)]
            plgpu.copy_gmem_to_smem(src.at[group, rows, cols(b)], part, barrier)

        return
    for j in range(boxes.chunks):
        plgpu.copy_gmem_to_smem(src.at[group, rows, cols(j)], dst.at[j], barrier)


def _zero_tail(smem, boxes: m.Boxes, tools):
    """A folded row's last tile with zeros past the row's end, where no box was copied (or
    a box ran past it): what TMA's zero fill gives an unfolded row (and a split row, whose
    programs copy every box of their tiles). Each thread rewrites its own elements, in the
    layout it will read them in."""
    valid = tools.valid(boxes.chunks - 1) if boxes.folded and boxes.split == 1 else None
    if valid is None:
        return
    last = plgpu.load(smem.at[boxes.chunks - 1], layout=boxes.layout)
    smem[boxes.chunks - 1] = jnp.where(valid, last, jnp.zeros_like(last))


def _barrier(boxes: m.Boxes):
    """The barrier of one staged array: one arrival per box."""
    return plgpu.Barrier(num_arrivals=boxes.arrivals)


def _copy_out(src, dst, rows, boxes, tools, group):
    """Start the TMA stores of `src`'s boxes (as [`_copy_in`][] staged them) into a
    program's rows of `dst` `(groups, rows, width)`, each within its row.

    A box of one row (a folded or split row's, or a block of one row) is contiguous in HBM,
    and Mosaic GPU stores such a box as one bulk copy bounded by the array's end, not the
    row's (loads, with their zero fill, are bounded per axis): a box running past a row's end
    would write its padding over the next row's first columns. Seen on an H200, where a
    folded row's last box overwrote the next row's first `cols - width % cols` columns; the
    interpreter clips per axis. So the box crossing the row's end is stored as its first
    `width % cols` columns (a multiple of 16 bytes, as `supports` asks of a row), and a split
    row's boxes wholly past the end are not stored. Boxes of several rows are strided in HBM:
    their stores are clipped per axis."""
    cols = tools.cols
    full, tail = divmod(dst.shape[-1], boxes.cols)
    if boxes.folded:
        first_box = tools.first_tile * boxes.tile_rows

        @pl.loop(0, boxes.arrivals)
        def _(b):
            part = src.at[b // boxes.tile_rows, pl.ds(b % boxes.tile_rows, 1)]
            box = first_box + b
            whole = functools.partial(plgpu.copy_smem_to_gmem, part, dst.at[group, rows, cols(b)])
            if tail or boxes.split > 1:
                pl.when(box < full)(whole)
            else:
                whole()
            if tail:
                end = dst.at[group, rows, pl.ds(cols(b).start, tail)]
                pl.when(box == full)(lambda: plgpu.copy_smem_to_gmem(part.at[:, :tail], end))

        return
    for j in range(boxes.chunks):
        if boxes.block_rows == 1 and tail and j == full:
            end = dst.at[group, rows, pl.ds(cols(j).start, tail)]
            plgpu.copy_smem_to_gmem(src.at[j, :, :tail], end)
        else:
            plgpu.copy_smem_to_gmem(src.at[j], dst.at[group, rows, cols(j)])


def _window(block, boxes: m.Boxes, rows: int, clamp: bool):
    """`(rows of block `block`, its first row's offset in them)`: `block_rows` rows from
    `block · block_rows`, or with `clamp` no further than the array's last `block_rows` of
    `rows` (a last partial block, or one past the end of a persistent grid, then overlaps the
    blocks before it: its rows before the offset are theirs). Every copy and per-row read is
    then in bounds, and the arrays and statistics keep their own shapes (no padding): a row
    computed twice is written twice with the same bits."""
    start = block * boxes.block_rows
    if not clamp:
        return pl.ds(start, boxes.block_rows), None
    inside = jnp.minimum(start, rows - boxes.block_rows)
    return pl.ds(inside, boxes.block_rows), start - inside


def _ours(skip, boxes: m.Boxes):
    """The mask of a block's rows from `skip` on (its own, [`_window`][]), `None` for all."""
    if skip is None:
        return None
    return plgpu.broadcasted_iota(jnp.int32, boxes.tile[1:], 0, layout=boxes.layout) >= skip


class PerBox(NamedTuple):
    """The group norms' parameters: one value per row and box, read from a table `(groups,
    table rows, columns)`. Box `k` of a row reads column `k // boxes_per_column` (the
    row's channel: a channel is `boxes_per_column` boxes); the rows `r` of a block read
    table rows `r % period` (the per-channel parameters of `period` groups, the rows of a
    block within one period) or, with `period` 0, `r` (per-row tables; a block past the
    table's end, which the persistent backward visits, reads its last block's rows: its
    `dy` is zeros). The backward's partial parameter gradients come out per row and
    column likewise: the sums over a channel's boxes."""

    boxes_per_column: int
    period: int = 0


def _per_box_rows(ref, rows, per_box: PerBox, block_rows: int):
    """The rows of `ref` `(groups, table rows, columns)` the block `rows` reads."""
    if per_box.period:
        return pl.ds(rows.start % per_box.period, block_rows)
    return pl.ds(jnp.minimum(rows.start, ref.shape[1] - block_rows), block_rows)


def _param(ref, k, rows, group, per_box, boxes: m.Boxes, tools):
    """Box `k`'s parameter as a box: `(parameter, staged, p)` with its boxes staged in shared
    memory ([`_staged_boxes`][]: the parameter in its own shape), box `k` read from
    `staged[p]` where every box is staged, else (only its last box staged) from HBM but for
    the last; or read straight from HBM (a TMA load of under 128 bytes, a narrow row's, is
    refused under this lowering), its columns padded to whole boxes, a row of the group's
    parameter `(groups, chunks · cols)` broadcast over the rows; with `per_box` tables
    ([`PerBox`][]), each row's value broadcast over the box's columns. A folded row's
    parameter is `(parameter, param_smem, p)`: with the program's every tile staged
    (`param_smem` `(parameters, tiles, 4, cols)`), its tile `k` read from there in the tile's
    layout (each warp its own box); else the parameter, whose tile `k` (boxes `4k` to `4k +
    3`, each read whole by every warp and kept by its own) is read while the tile lies inside
    the row, and for the row's last (partial) tile `param_smem[p]`, its boxes staged by TMA
    ([`_stage_params`][]: a plain read of a partial box would run past the parameter's
    end)."""
    bcast, layout = tools.bcast, boxes.layout
    if boxes.folded:
        main, param_smem, p = ref
        if param_smem.ndim == 4:  # every tile staged (zeros past the row's end)
            return plgpu.load(param_smem.at[p, k], layout=layout).astype(F32)
        size = boxes.tile_rows * boxes.cols
        whole = main.shape[-1] // size
        last = plgpu.load(param_smem.at[p], layout=layout)
        if whole == 0:
            return last.astype(F32)
        # The row's tile (a split row's program stages tiles from `first_tile` on); tiles
        # past the whole ones read the last whole one (in bounds), then replaced.
        tile = tools.first_tile + k
        start = jnp.minimum(tile, whole - 1) * size
        part = plgpu.broadcasted_iota(jnp.int32, boxes.tile[1:], 0, layout=layout)
        value = last
        for w in range(boxes.tile_rows):
            columns = pl.ds(pl.multiple_of(start + w * boxes.cols, boxes.cols), boxes.cols)
            box = plgpu.load(main.at[group, columns], layout=layout.reduce(0), optimized=False)
            value = jnp.where(part == w, bcast(box, [1]), value)
        if whole < _row_tiles(boxes):
            value = jnp.where(tile < whole, value, last)
        # Zeros past the row's end (where no box was staged), as padded columns are.
        valid = tools.valid(k)
        return _masked(value.astype(F32), valid)
    if per_box:
        table_rows = _per_box_rows(ref, rows, per_box, boxes.block_rows)
        column = k // per_box.boxes_per_column
        value = plgpu.load(
            ref.at[group, table_rows, column], layout=layout.reduce(1), optimized=False
        )
        return bcast(value.astype(F32), [0])
    if isinstance(ref, tuple):
        main, param_smem, p = ref
        if param_smem.shape[1] == boxes.chunks:  # every box staged
            value = plgpu.load(param_smem.at[p, k], layout=layout.reduce(0), optimized=False)
            return bcast(value.astype(F32), [1])
        # The last box staged; the others read in bounds from HBM.
        last = plgpu.load(param_smem.at[p, 0], layout=layout.reduce(0), optimized=False)
        whole = boxes.chunks - 1  # at least 1: a box is no wider than the row
        start = pl.multiple_of(jnp.minimum(k, whole - 1) * boxes.cols, boxes.cols)
        value = plgpu.load(
            main.at[group, pl.ds(start, boxes.cols)], layout=layout.reduce(0), optimized=False
        )
        return bcast(jnp.where(k < whole, value, last).astype(F32), [1])
    columns = pl.ds(pl.multiple_of(k * boxes.cols, boxes.cols), boxes.cols)
    value = plgpu.load(ref.at[group, columns], layout=layout.reduce(0), optimized=False)
    return bcast(value.astype(F32), [1])


def _forward_body(
    *refs,
    boxes,
    width,
    eps,
    center,
    has_residual,
    has_weight,
    has_bias,
    per_box,
    out_separate=False,
    has_scale=False,
    clamp=False,
    params_staged=False,
    weight_offset=0.0,
):
    n_params = has_weight + has_bias
    n_in = 1 + has_residual + n_params + has_scale
    n_out = 4 + has_residual + has_scale
    ins, outs, scratch = refs[:n_in], refs[n_in : n_in + n_out], list(refs[n_in + n_out :])
    x_ref, r_ref = ins[0], ins[1] if has_residual else None
    param_refs = ins[1 + has_residual : 1 + has_residual + n_params]
    # The FP8 scale, one value per group read in place.
    scale_ref = ins[-1] if has_scale else None
    # A folded row's statistics on their way out (`store_stats`).
    stat_smem = scratch.pop() if boxes.folded else None
    # A split row's exchanges (`_mosaic_gpu.across_cluster`): the statistics, the amax, exit.
    split = boxes.split > 1
    ex_scratch, scratch = (scratch[-2:], scratch[:-2]) if split else (None, scratch)
    # The parameters' staged boxes (every box, or the last tile or box; see `_param`).
    param_smem, param_bar = scratch[-2:] if params_staged else (None, None)
    scratch = scratch[:-2] if param_smem is not None else scratch
    y_ref, *outs = outs
    h_ref = outs.pop(0) if has_residual else None
    stat_refs = outs
    x_smem, *scratch = scratch
    r_smem = scratch.pop(0) if has_residual else None
    # `y` over `x`'s box, or in a box of its own when its dtype differs (`out_dtype`).
    y_smem = scratch.pop(0) if out_separate else x_smem
    x_bars, *bars = scratch
    r_bars = bars[0] if has_residual else None

    # A split row's cluster is its row (one per cluster), its program a slice of the tiles.
    i, group = lax.axis_index("rows"), lax.axis_index("groups")
    rows, _ = _window(i, boxes, x_ref.shape[1], clamp)
    rank = lax.axis_index("cluster") if split else None
    tools = _box_tools(boxes, width, i * 0, rank * boxes.chunks if split else 0)
    bcast = tools.bcast
    exchanges = iter(range(4))

    def exchange(values, op="sum"):
        return m.across_cluster(values, boxes, ex_scratch, next(exchanges), op)

    _copy_in(x_ref, x_smem, x_bars, rows, boxes, tools, group)
    if r_ref is not None:
        _copy_in(r_ref, r_smem, r_bars, rows, boxes, tools, group)
    if param_smem is not None:
        _stage_params(param_refs, param_smem, param_bar, group, boxes, tools)
        plgpu.barrier_wait(param_bar)
        param_refs = [(ref, param_smem, p) for p, ref in enumerate(param_refs)]
    plgpu.barrier_wait(x_bars)
    _zero_tail(x_smem, boxes, tools)
    layout = boxes.layout

    if r_ref is not None:
        plgpu.barrier_wait(r_bars)
        _zero_tail(r_smem, boxes, tools)

        @pl.loop(0, boxes.chunks)
        def _(k):
            h = _load(x_smem, k, layout) + _load(r_smem, k, layout)
            r_smem[k] = h.astype(r_smem.dtype)

        h_smem = r_smem
    else:
        h_smem = x_smem

    def load_h(k):
        return _load(h_smem, k, layout)

    shift, offset, var = _row_stats(
        load_h, boxes, width, center, tools, exchange if split else None
    )
    rstd = reference.inverse_std(var, eps)

    def param(p, k):
        return _param(param_refs[p], k, rows, group, per_box, boxes, tools)

    # Read once, before the loop over the boxes (each read is a round trip to HBM).
    scale = None if scale_ref is None else scale_ref[group, 0]

    def write(k):
        y = ((load_h(k) - bcast(shift, [0])) - bcast(offset, [0])) * bcast(rstd, [0])
        if has_weight:
            y = y * reference.offset_weight(param(0, k), weight_offset, F32)
        if has_bias:
            y = y + param(int(has_weight), k)
        if not has_scale:
            y_smem[k] = y.astype(y_smem.dtype)
            return None
        # FP8: the reference's saturating clip, and the row's max |y| over its columns.
        scaled = reference.saturated(y, scale, y_smem.dtype)
        y_smem[k] = scaled.astype(y_smem.dtype)
        return jnp.max(jnp.abs(_masked(y, tools.valid(k))), axis=1)

    stats = [shift, offset, rstd]
    if has_scale:
        amax = lax.fori_loop(1, boxes.chunks, lambda k, a: jnp.maximum(a, write(k)), write(0))
        (amax,) = m.across_warps([amax], boxes, "max")
        stats.append(exchange([amax], "max")[0] if split else amax)
    else:

        @pl.loop(0, boxes.chunks)
        def _(k):
            write(k)

    # The statistics, stored by the threads (a program's are 16 to 64 bytes: too few for a
    # TMA copy, whose strides would also ask rows of 16 bytes). A folded row's, the same in
    # every warp, each warp's copy into `stat_smem` and, past the barrier that `y`'s copy
    # out waits for anyway, the first warp's from there as one value (a split row's by its
    # cluster's first program): a reduction across the warps would cost two barriers each.
    if boxes.folded:
        for j, value in enumerate(stats):
            plgpu.store(stat_smem.at[j], value, optimized=False)
    else:
        for ref, value in zip(stat_refs, stats, strict=True):
            plgpu.store(ref.at[group, rows], value, optimized=False)
    plgpu.commit_smem()
    if boxes.folded:

        def store_stats():
            for j, ref in enumerate(stat_refs):
                ref[group, i] = stat_smem[j, 0]

        if split:
            pl.when(rank == 0)(store_stats)
        else:
            store_stats()
    _copy_out(y_smem, y_ref, rows, boxes, tools, group)
    if h_ref is not None:
        _copy_out(r_smem, h_ref, rows, boxes, tools, group)
    if split:
        exchange([])  # no program's exchanges read after it has ended
    plgpu.wait_smem_to_gmem(0)


def _rows_kernel(
    body,
    target: Target,
    out_type,
    scratch,
    programs: int,
    groups: int,
    name: str,
    auto_barriers: bool = True,
    cluster: int = 1,
):
    """The Mosaic GPU kernel of `body` over the grid `(programs, groups)` (axes `"rows"`,
    `"groups"`; the programs in clusters of `cluster`, `_mosaic_gpu.program_index`), named
    `name`. The forward bodies stage their rows once and write each output over what the
    same thread read: they need none of Mosaic GPU's automatic barriers
    (`auto_barriers=False`, see `_mosaic_gpu.kernel`)."""
    return m.kernel(
        body,
        interpret=target.interpret,
        auto_barriers=auto_barriers,
        cluster=cluster,
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=(programs // cluster, groups),
        grid_names=("rows", "groups"),
        kernel_name=name,
    )


def _pad_columns(p, boxes: m.Boxes):
    """A parameter `(groups, width)` with zero columns appended up to whole boxes, so that
    every box's read is in bounds (free when the boxes divide the width)."""
    padded = boxes.chunks * boxes.cols
    return p if p.shape[1] == padded else jnp.pad(p, ((0, 0), (0, padded - p.shape[1])))


def _row_tiles(boxes: m.Boxes) -> int:
    """A folded row's tiles (a split row's, over its programs)."""
    return -(-boxes.row_boxes // boxes.tile_rows)


def _tail_boxes(boxes: m.Boxes) -> range:
    """The boxes of a folded row's last tile, or an unfolded row's last box."""
    if not boxes.folded:
        return range(boxes.chunks - 1, boxes.chunks)
    return range((_row_tiles(boxes) - 1) * boxes.tile_rows, boxes.row_boxes)


# A forward program of at most this many boxes a row reads its parameters from HBM where
# staging them would leave fewer programs resident per SM ([`_staged_boxes`][]).
FEW_BOXES = 8


def _staged_boxes(
    params, boxes: m.Boxes, width: int, program_bytes: int, persistent: bool = True
) -> range:
    """The boxes of each parameter `(groups, width)` a program stages in shared memory by
    TMA, [`_stage_params`][] (none: the parameters are read from HBM, their columns padded to
    whole boxes, [`_pad_columns`][]), beside its other buffers of `program_bytes`:

    - an unfolded row's **every box**, where TMA can copy them (boxes of a multiple of 128
      bytes, rows of a multiple of 16) and they fit in the block
      ([`_mosaic_gpu.fits_block`][]). A box read from HBM is a round trip that the program's
      one warpgroup waits for, once per box of each block: the loops over a row's boxes are
      not unrolled, and there is no other work on the warps to hide it behind. Staged, the
      parameters arrive with the rows, and a `persistent` backward reads its weight from HBM
      once instead of once per block and pass. A forward (not `persistent`) program visits
      one block: where staging would leave fewer programs resident per SM
      ([`_mosaic_gpu.resident_by_smem`][]; add + LayerNorm bf16 at 4096 × 1024: 3, then 2)
      and its rows are at most `FEW_BOXES` boxes, a few round trips cost less than the
      programs lost.
      A folded row's every box likewise, its program's tiles (`range(tiles × 4)`, from the
      program's first tile; a split row's program stages its own slice), each warp then
      reading its own box of a tile where it read all four from HBM.
    - else an unfolded row's last box where it runs past the width (then the others are read
      from HBM, and the parameters keep their own shape: no padding copy), a folded row's
      last tile (its other tiles read from HBM: a partial tile would run past the
      parameter's end)."""
    if not params:
        return range(0)
    itemsize = jnp.dtype(params[0].dtype).itemsize
    staged = boxes.chunks * (boxes.tile_rows if boxes.folded else 1)
    every = len(params) * staged * boxes.cols * itemsize
    kept = m.resident_by_smem(program_bytes + every) == m.resident_by_smem(program_bytes)
    worth = persistent or kept or staged > FEW_BOXES
    tma = boxes.cols * itemsize % 128 == 0 and width * itemsize % 16 == 0
    if tma and worth and m.fits_block(program_bytes + every):
        return range(staged)
    if boxes.folded:
        return _tail_boxes(boxes)
    return _tail_boxes(boxes) if tma and width % boxes.cols else range(0)


def _every_tile(boxes: m.Boxes, staged: range) -> bool:
    """Whether a folded row's `staged` boxes ([`_staged_boxes`][]) are its program's every
    tile (else its row's last tile)."""
    return staged.start == 0 and len(staged) == boxes.chunks * boxes.tile_rows


def _param_scratch(params, boxes: m.Boxes, staged: range) -> list:
    """The shared memory and barrier of [`_stage_params`][] for the `staged` boxes of
    `params`: `(parameters, tiles, 4, cols)` for a folded row's every tile, `(parameters, 4,
    cols)` for its last, else `(parameters, boxes, cols)`."""
    if boxes.folded:
        every = _every_tile(boxes, staged)
        shape = (boxes.chunks, *boxes.tile[1:]) if every else boxes.tile[1:]
    else:
        shape = (len(staged), boxes.cols)
    arrivals = len(params) * len(staged)
    return [
        plgpu.SMEM((len(params), *shape), params[0].dtype),
        plgpu.Barrier(num_arrivals=arrivals),
    ]


def _stage_params(param_refs, param_smem, barrier, group, boxes: m.Boxes, tools):
    """Start the TMA copies of the staged boxes ([`_staged_boxes`][]) of each parameter
    `(groups, width)` into `param_smem`, arriving on `barrier`: a folded row's every tile of
    its program into `(parameters, tiles, 4, cols)` (box `4t + w` of the program's into tile `t`,
    row `w`, as the rows are staged), or its last tile into `(parameters, 4, cols)`; an
    unfolded row's last `n` boxes (every box, or the last) into `(parameters, n, cols)`
    (past the row's end: TMA's zeros, or nothing where no box is copied, columns that are
    never stored)."""
    zero = group * 0
    if param_smem.ndim == 4:
        first, count = (
            zero + tools.first_tile * boxes.tile_rows,
            param_smem.shape[1] * param_smem.shape[2],
        )
    else:
        n = param_smem.shape[1]
        staged = _tail_boxes(boxes) if boxes.folded else range(boxes.chunks - n, boxes.chunks)
        first, count = staged[0], len(staged)

    def copy(j):
        # The row's box `first + j` (whichever boxes the program stages).
        columns = pl.ds(m.dynamic_index(zero, (first + j) * boxes.cols), boxes.cols)
        for p, ref in enumerate(param_refs):
            if param_smem.ndim == 4:
                part = param_smem.at[p, j // boxes.tile_rows, pl.ds(j % boxes.tile_rows, 1)]
            else:
                part = param_smem.at[p, pl.ds(j, 1)]
            plgpu.copy_gmem_to_smem(ref.at[pl.ds(group, 1), columns], part, barrier)

    if count > 4:
        pl.loop(0, count)(copy)
    else:
        for j in range(count):
            copy(j)


def _pad_rows(a, rows: int):
    """`a` `(groups, r, ...)` with zero rows appended up to `rows` (a TMA box may not be taller
    than the array; only inputs shorter than one program's rows are padded)."""
    if a is None or a.shape[1] >= rows:
        return a
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, rows - a.shape[1])
    return jnp.pad(a, pad)


def _params_dtype(params) -> jnp.dtype:
    """The dtype the parameters are read in, one layout for all: theirs if they share it, else
    float32 (which holds every half-precision value exactly; not `jnp.result_type`, which
    the user's `jax_numpy_dtype_promotion="strict"` refuses across dtypes)."""
    dtypes = {jnp.dtype(p.dtype) for p in params}
    return dtypes.pop() if len(dtypes) == 1 else jnp.dtype(F32)


def _boxes(
    rows_in,
    params,
    shape,
    more_rows=(),
    layout_dtype=None,
    fold=False,
    partials=0,
    box_partials=0,
    split=None,
    together=1,
) -> m.Boxes:
    """The staging of a kernel over `shape` `(groups, rows, width)` that keeps the row
    arrays `rows_in` (plus row buffers of dtypes `more_rows`) on chip and reads the
    parameters `params` (their common dtype; staged or from HBM, [`_staged_boxes`][]) in
    the same layout (`fold`: the
    kernel takes folded rows; `partials`: float32 sums per column on chip, [`m.boxes`][])."""
    rows_in = [a.dtype for a in rows_in if a is not None] + list(more_rows)
    params = [p for p in params if p is not None]
    param_dtype = [_params_dtype(params)] if params else []
    # A kernel that takes folded rows takes split ones too (the row norms'), unless not
    # `split` (gated RMSNorm's).
    return m.boxes(
        tuple(rows_in) + tuple(param_dtype) + ((layout_dtype,) if layout_dtype else ()),
        shape[1],
        shape[2],
        sum(jnp.dtype(d).itemsize for d in rows_in),
        groups=shape[0],
        fold=fold,
        split=fold if split is None else split,
        partials=partials,
        box_partials=box_partials,
        together=together,
    )


def forward_boxes(
    x, residual, weight, bias, scale=None, out_dtype=None, fold: bool = True
) -> m.Boxes:
    """The staging of the forward: `x` (and `residual`, and `y` when `out_dtype` differs
    from `x`'s) per row; a row too wide for a tile of rows folded, unless not `fold` (a
    kernel that does not take folded rows)."""
    more = [] if _same_dtype(x, out_dtype) else [jnp.dtype(out_dtype)]
    # With a (float32) FP8 scale the values are scaled in float32's layout (see `forward_on`).
    layout = None if scale is None else F32
    params = (weight, bias)
    return _boxes((x, residual), params, x.shape, more, layout, fold=fold, together=m.FILL)


def _same_dtype(x, out_dtype) -> bool:
    return out_dtype is None or jnp.dtype(out_dtype) == jnp.dtype(x.dtype)


def _out_buffers(dy, dh, d_dtypes) -> tuple:
    """For each input gradient dtype of `d_dtypes`, the staged box it is written over
    (`"dy"`, `"dh"`, one of the same dtype) or `None` (a buffer of its own)."""
    free = {"dy": dy.dtype} | ({"dh": dh.dtype} if dh is not None else {})
    reuse = []
    for d in d_dtypes:
        match = next((k for k, v in free.items() if jnp.dtype(v) == jnp.dtype(d)), None)
        if match is not None:
            free.pop(match)
        reuse.append(match)
    return tuple(reuse)


def backward_boxes(
    x, weight, dy, dh, d_dtypes, fold: bool = True, partials: bool = True
) -> m.Boxes:
    """The staging of the backward: `x`, `dy` (and `dh`, and output buffers) per row; a row
    too wide for a tile of rows folded, unless not `fold`; with `partials`, the program's
    two partial parameter gradients kept on chip where they fit."""
    more = [d for d, r in zip(d_dtypes, _out_buffers(dy, dh, d_dtypes), strict=True) if r is None]
    # The partial sums over a box's rows reduce float32 across warps, which Mosaic GPU does
    # for vectors of up to 4: the layout of a float32 box.
    return _boxes(
        (x, dy, dh), (weight,), x.shape, more, layout_dtype=F32, fold=fold, partials=2 * partials
    )


def forward_on(
    target: Target,
    x,
    residual,
    weight,
    bias,
    scale=None,
    *,
    op: str,
    eps: float,
    out_dtype=None,
    weight_offset=0.0,
):
    """`(y, h, shift, offset, rstd)` as `row_norm._forward_on` (and the rows' amax with a
    FP8 `scale`; `weight_offset + weight` applied), with one Mosaic GPU kernel."""
    params = [p for p in (weight, bias) if p is not None]
    # The parameters in their common dtype, read in one layout.
    if params:
        params = [p.astype(_params_dtype(params)) for p in params]
    boxes = forward_boxes(x, residual, weight, bias, scale, out_dtype)
    flags = dict(has_weight=weight is not None, has_bias=bias is not None)
    if scale is not None or not _same_dtype(x, out_dtype):
        flags.update(has_scale=scale is not None, out_dtype=jnp.dtype(out_dtype))
    return forward_call(
        target,
        x,
        residual,
        params,
        boxes,
        center=op.endswith("layer_norm"),
        eps=eps,
        name=f"eqxnorm_{op}_fwd",
        per_box=False,
        weight_offset=weight_offset,
        # The FP8 scale `(groups, dim)`, one value repeated (`row_norm._fp8_scale`): its
        # first column, read in place (XLA makes the slice of its broadcast no copy).
        scale=None if scale is None else scale[:, :1],
        **flags,
    )


def forward_call(
    target: Target,
    x,
    residual,
    params,
    boxes,
    *,
    center,
    eps,
    name,
    per_box,
    has_weight,
    has_bias,
    has_scale=False,
    out_dtype=None,
    weight_offset=0.0,
    scale=None,
):
    """The forward kernel over `x` `(groups, rows, width)` staged as `boxes`: parameters
    `params` `(groups, width)` per column, or with `per_box` tables, one value per row and
    box (the group norms', [`PerBox`][]). `y` in
    `out_dtype` (default `x.dtype`); `has_scale`: `scale` `(groups, 1)` is the FP8 scale,
    and each row's amax follows the statistics."""
    groups, rows, width = x.shape
    x_p, r_p = _pad_rows(x, boxes.block_rows), _pad_rows(residual, boxes.block_rows)
    padded_rows = x_p.shape[1]
    programs = -(-padded_rows // boxes.block_rows)
    # A last partial block overlaps the one before ([`_window`][]); the group norms' per-row
    # tables are laid out for whole blocks: their statistics padded to whole programs.
    clamp = not per_box and padded_rows % boxes.block_rows != 0
    stat_rows = padded_rows if not per_box else programs * boxes.block_rows
    stat = jax.ShapeDtypeStruct((groups, stat_rows), F32)
    out_separate = not _same_dtype(x, out_dtype)
    y_dtype = out_dtype if out_separate else x.dtype
    out_type = [jax.ShapeDtypeStruct(x_p.shape, y_dtype)]
    if residual is not None:
        out_type.append(jax.ShapeDtypeStruct(x_p.shape, residual.dtype))
    n_stats = 3 + has_scale
    out_type += [stat] * n_stats
    box = boxes.tile
    scratch = [plgpu.SMEM(box, x.dtype)]
    if residual is not None:
        scratch.append(plgpu.SMEM(box, residual.dtype))
    if out_separate:
        scratch.append(plgpu.SMEM(box, y_dtype))
    # A split row's exchanges (kept beside the staging, counted in its room).
    exchange = m.exchange_scratch(boxes, 2, 4) if boxes.split > 1 else []
    staged = range(0)
    if not per_box:
        program_bytes = m.smem_bytes(scratch + exchange)
        staged = _staged_boxes(params, boxes, width, program_bytes, persistent=False)
    params_staged = bool(staged)
    if not per_box and not boxes.folded and not params_staged:
        params = [_pad_columns(p, boxes) for p in params]
    n_barriers = 1 + (residual is not None)
    scratch += [_barrier(boxes)] * n_barriers
    if params_staged:
        scratch += _param_scratch(params, boxes, staged)
    scratch += exchange
    if boxes.folded:  # the statistics on their way out
        scratch.append(plgpu.SMEM((n_stats, boxes.tile_rows), F32))
    body = functools.partial(
        _forward_body,
        boxes=boxes,
        width=width,
        eps=eps,
        center=center,
        has_residual=residual is not None,
        has_weight=has_weight,
        has_bias=has_bias,
        per_box=per_box,
        out_separate=out_separate,
        has_scale=has_scale,
        clamp=clamp,
        params_staged=params_staged,
        weight_offset=weight_offset,
    )
    # A split row: a cluster of `split` programs per row.
    programs, cluster = programs * boxes.split, boxes.split
    run = _rows_kernel(
        body,
        target,
        out_type,
        scratch,
        programs,
        groups,
        name,
        auto_barriers=False,
        cluster=cluster,
    )
    scales = [scale.astype(F32)] if has_scale else []
    y, *outs = run(*(a for a in (x_p, r_p) if a is not None), *params, *scales)
    h = outs.pop(0) if residual is not None else None
    cut = lambda a: None if a is None else a[:, :rows]  # noqa: E731
    return cut(y), cut(h), *(cut(s) for s in outs)


def _backward_body(
    *refs,
    boxes,
    width,
    center,
    has_weight,
    has_dh,
    out_reuse,
    n_outs,
    param_grads,
    per_box,
    programs,
    iterations,
    slots,
    clamp=False,
    params_staged=False,
    cluster=1,
    split_partials=False,
    weight_offset=0.0,
):
    n_in = 5 + has_weight + has_dh
    n_partials = (1 + split_partials) * param_grads
    ins, outs = refs[:n_in], refs[n_in : n_in + n_outs + n_partials]
    scratch = list(refs[n_in + n_outs + n_partials :])
    x_ref, dy_ref, *stat_refs = ins[:5]
    w_ref = ins[5] if has_weight else None
    dh_ref = ins[5 + has_weight] if has_dh else None
    d_refs, partial_refs = outs[:n_outs], outs[n_outs:]
    x_smem, dy_smem = scratch.pop(0), scratch.pop(0)
    dh_smem = scratch.pop(0) if has_dh else None
    extra = [scratch.pop(0) for reuse in out_reuse if reuse is None]
    # The program's partial sums on chip (`_mosaic_gpu.combine_partials`), if they fit.
    acc = scratch.pop(0) if boxes.partial_bytes else None
    # A split row's ([`m.Boxes`][]' `split`): its exchanges (`_mosaic_gpu.across_cluster`);
    # its program's partials are of its own columns, no other's: not combined.
    split = boxes.split > 1
    n_cluster_scratch = 2 if split else len(m.cluster_barriers(cluster))
    cluster_bars = [scratch.pop(0) for _ in range(n_cluster_scratch)]
    # The weight's staged boxes (every box, or the last tile or box; see `_param`).
    param_smem, param_bar = scratch[-2:] if params_staged else (None, None)
    bars = scratch[:-2] if param_smem is not None else scratch

    group = lax.axis_index("groups")
    # A split row's cluster loops over rows, its program over a slice of their tiles.
    i = lax.axis_index("rows") if split else m.program_index(cluster)
    first_tile = lax.axis_index("cluster") * boxes.chunks if split else 0
    tools = _box_tools(boxes, width, i * 0, first_tile)
    bcast = tools.bcast
    layout = boxes.layout
    if param_smem is not None:  # waited for once the first block's staging has started
        _stage_params([w_ref], param_smem, param_bar, group, boxes, tools)
        w_ref = (w_ref, param_smem, 0)
    staged = [(x_ref, x_smem), (dy_ref, dy_smem)] + ([(dh_ref, dh_smem)] if has_dh else [])
    buffers = {"dy": dy_smem, "dh": dh_smem}
    targets = [extra.pop(0) if reuse is None else buffers[reuse] for reuse in out_reuse]

    # The partials: per program and column `(groups, 2, programs, chunks · cols)`, a folded
    # row's `(..., 4 · chunks, cols)` (a cluster's combined: one row per cluster), or with
    # `split_partials` one array per gradient, `(groups, programs, ...)`.
    part_layout = layout if boxes.folded else layout.reduce(0)

    def partial_at(s, row, columns):
        if split_partials:
            return partial_refs[s].at[group, row, columns]
        return partial_refs[0].at[group, s, row, columns]

    def partial_part(s, row, k):
        if boxes.folded:
            tile = pl.ds(pl.multiple_of(k * boxes.tile_rows, boxes.tile_rows), boxes.tile_rows)
            return partial_at(s, row, tile)
        return partial_at(s, row, pl.ds(pl.multiple_of(k * boxes.cols, boxes.cols), boxes.cols))

    def window(it):
        # Block `i + it · programs` of the persistent grid (`_mosaic_gpu.persistent_programs`).
        return _window(i + it * programs, boxes, x_ref.shape[1], clamp)

    def rows_of(it):
        return window(it)[0]

    def stage(it, slot):
        for (src, dst), bar in zip(staged, bars, strict=False):
            _copy_in(src, dst.at[slot], bar.at[slot], rows_of(it), boxes, tools, group)

    def block(it, first: bool):
        rows, slot = rows_of(it), it % slots
        if not first or slots == 2:
            # The shared memory about to be staged over (this block's with one slot, the
            # previous block's with two) has been read, by the warps and by the TMA stores
            # of its outputs. With two slots the next block is staged while this one is
            # computed (past the last block: TMA's zeros, waited for at the end).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.commit_smem()
            if slots == 2:
                stage(it + 1, (it + 1) % 2)
            else:
                stage(it, 0)
        for bar in bars:
            plgpu.barrier_wait(bar.at[slot])
        x_s, dy_s = x_smem.at[slot], dy_smem.at[slot]
        dh_s = None if dh_smem is None else dh_smem.at[slot]
        for smem in (x_s, dy_s, dh_s):
            if smem is not None:
                _zero_tail(smem, boxes, tools)
        # The statistics, read straight from HBM, in bounds (a folded row's: its one value,
        # in every warp; a row past the end, whose `x` and `dy` are TMA's zeros, reads the
        # last row's).
        if boxes.folded:
            row = jnp.minimum(i + it * programs, stat_refs[0].shape[1] - 1)
            shift, offset, rstd = (
                plgpu.layout_cast(
                    lax.broadcast_in_dim(ref[group, row], (boxes.tile_rows,), ()),
                    layout.reduce(1),
                )
                for ref in stat_refs
            )
        else:
            shift, offset, rstd = (
                plgpu.load(ref.at[group, rows], layout=layout.reduce(1), optimized=False)
                for ref in stat_refs
            )

        # A clamped block's rows before `skip` are the blocks' before it: out of its sums.
        ours = _ours(window(it)[1], boxes)

        def values(k):
            xhat = (_load(x_s, k, layout) - bcast(shift, [0])) - bcast(offset, [0])
            xhat = xhat * bcast(rstd, [0])
            dy = _load(dy_s, k, layout)
            if w_ref is None:
                return xhat, dy, dy
            w = _param(w_ref, k, rows, group, per_box, boxes, tools)
            return xhat, dy, dy * reference.offset_weight(w, weight_offset, F32)

        def sums(k):
            xhat, _, g = values(k)
            return [g * xhat, g] if center else [g * xhat]

        sum_gx, *sum_g = warp_totals(sums, boxes, 1 + center)
        sum_g = sum_g[0] if center else shift * 0.0
        # Combined across the warps one at a time: at once, the split LayerNorm float32
        # backward at 70000 took 255 registers and spilled (deviceless H200; 108 apart).
        (sum_gx,) = m.across_warps([sum_gx], boxes)
        sum_g = m.across_warps([sum_g], boxes)[0] if center else sum_g
        if split:
            totals = [sum_gx, sum_g] if center else [sum_gx]
            sum_gx, *rest = m.across_cluster(totals, boxes, cluster_bars, it % 2)
            sum_g = rest[0] if center else sum_g
        mean_gx, mean_g = sum_gx * (1.0 / width), sum_g * (1.0 / width)
        outs = [t.at[slot] for t in targets]

        def box(k):
            """Box `k`'s `dx`, stored; its per-row partial sums (`per_box`), returned."""
            xhat, dy, g = values(k)
            dx = (g - bcast(mean_g, [0]) - xhat * bcast(mean_gx, [0])) * bcast(rstd, [0])
            if dh_s is not None:
                dx = dx + _load(dh_s, k, layout)
            for out in outs:
                out[k] = dx.astype(out.dtype)
            if param_grads and per_box:
                return jnp.sum(dy * xhat, axis=1), jnp.sum(dy, axis=1)
            if param_grads:
                # Per program and column, accumulated over the program's blocks on chip
                # (`acc`) or in its own row of the partials in HBM (columns padded to whole
                # boxes); a folded row's tile is 4 boxes of its columns: per column as it is.
                # The sums so far are read before the sums across the warps below: a box's
                # column sums are the same in every warp, and those sums' barriers order every
                # warp's read before any warp's write (no automatic barriers here).
                refs = [acc.at[s, k] if acc is not None else partial_part(s, i, k) for s in (0, 1)]
                olds = [None] * 2 if first else [_load_sums(ref, part_layout) for ref in refs]
                for ref, old, value in zip(refs, olds, (dy * xhat, dy), strict=True):
                    if not boxes.folded:
                        value = jnp.sum(_masked(value, ours), axis=0)
                    plgpu.store(ref, value if old is None else old + value, optimized=False)
            return None

        if param_grads and per_box:
            # Per row and column (a channel's boxes summed in registers), straight to HBM
            # (rows padded to whole programs).
            n = per_box.boxes_per_column

            @pl.loop(0, boxes.chunks // n)
            def _(c):
                def add(b, acc):
                    return tuple(a + v for a, v in zip(acc, box(c * n + b), strict=True))

                sums = lax.fori_loop(1, n, add, box(c * n)) if n > 1 else box(c * n)
                for s, value in enumerate(sums):
                    ref = partial_at(s, rows, c)
                    plgpu.store(ref, value, optimized=False)
        else:
            pl.loop(0, boxes.chunks)(box)

        plgpu.commit_smem()
        for out, ref in zip(outs, d_refs, strict=True):
            _copy_out(out, ref, rows, boxes, tools, group)

    stage(0, 0)
    if param_bar is not None:
        plgpu.barrier_wait(param_bar)
    block(0, first=True)
    if iterations > 1:

        @pl.loop(1, iterations)
        def _(it):
            block(it, first=False)

    if slots == 2:
        # The staging past the last block (zeros) has landed before the kernel ends.
        for bar in bars:
            plgpu.barrier_wait(bar.at[iterations % 2])
    if split:
        # The program's columns of its cluster's row of partials; then no program's exchanges
        # read after it has ended.
        if acc is not None:

            @pl.loop(0, boxes.chunks)
            def _(k):
                for s in range(2):
                    value = plgpu.load(acc.at[s, k], layout=part_layout, optimized=False)
                    plgpu.store(partial_part(s, i, first_tile + k), value, optimized=False)

        m.across_cluster([], boxes, cluster_bars, iterations % 2)
    elif acc is not None:
        cluster_row = lax.axis_index("rows")

        def store(_, s, k, total):
            plgpu.store(partial_part(s, cluster_row, k), total, optimized=False)

        m.combine_partials([acc], store, part_layout, cluster, cluster_bars)
    plgpu.wait_smem_to_gmem(0)


def _min_iterations(boxes: m.Boxes, blocks: int, groups: int, block_rows: int, read: int) -> int:
    """The fewest of its `blocks` blocks of `block_rows` rows a program of the persistent
    backward visits (folded rows: see `_mosaic_gpu.FOLDED_ROWS_PER_PROGRAM`; else
    `_common.partial_iterations`', `read` the bytes of `x` and `dy` per row)."""
    if boxes.folded:
        return m.FOLDED_ROWS_PER_PROGRAM
    return partial_iterations(blocks, groups, block_rows * read, boxes.chunks * boxes.cols)


def _stages(
    boxes: m.Boxes, groups: int, rows: int, row_bytes: int, read: int
) -> tuple[int, m.Boxes]:
    """`(slots, boxes)`: two slots of staging (a block computed while the next is staged, in
    blocks of fewer rows if need be) when both fit in `SMEM_BYTES` and the persistent grid
    gives each program at least two blocks; else one slot, `boxes` as given. `row_bytes`:
    the staged bytes of one row, `read` those of its `x` and `dy`."""
    tile = 1 if boxes.folded else boxes.tile_rows
    fit = m.floor_pow2((m.SMEM_BYTES - boxes.partial_bytes) // (2 * row_bytes) // tile) * tile
    block_rows = min(boxes.block_rows, fit)
    if block_rows == 0:
        return 1, boxes
    blocks = -(-max(rows, block_rows) // block_rows)
    fewest = _min_iterations(boxes, blocks, groups, block_rows, read)
    program_bytes = 2 * block_rows * row_bytes + boxes.partial_bytes
    _, iterations, _ = _grid(boxes, blocks, program_bytes, groups, fewest)
    if iterations < 2:
        return 1, boxes
    return 2, boxes._replace(block_rows=block_rows)


def _grid(boxes: m.Boxes, blocks: int, program_bytes: int, groups: int, fewest: int):
    """`(programs, iterations, cluster)` of the persistent backward: in clusters that
    combine their partial sums on chip where `boxes` keeps them there
    (`_mosaic_gpu.clustered_programs`), else unclustered (`persistent_programs`); a split
    row's, in clusters of its `split` programs (`split_programs`)."""
    if boxes.split > 1:
        clusters, iterations = m.split_programs(blocks, program_bytes, boxes.split, groups, fewest)
        return clusters * boxes.split, iterations, boxes.split
    if boxes.partial_bytes:
        return m.clustered_programs(blocks, program_bytes, groups, fewest)
    return (*m.persistent_programs(blocks, program_bytes, groups, fewest), 1)


def backward_on(
    target: Target,
    x,
    weight,
    dy,
    dh,
    shift,
    offset,
    rstd,
    *,
    op,
    param_grads,
    d_dtypes,
    weight_offset=0.0,
):
    """`(dx, dresidual, dweight, dbias)` as `row_norm._backward_on`, with one Mosaic GPU
    kernel; `dweight`/`dbias` are the sums of the programs' float32 partial sums."""
    width = x.shape[2]
    boxes = backward_boxes(x, weight, dy, dh, d_dtypes, partials=param_grads)
    # Float32 gradients: each one's partials an array of its own, so that where a group's are
    # one row (adaLN's examples, a cluster each) its sum is a reshape, no XLA launch (slices
    # of one array would be copied out). Otherwise one array: the gradients' casts read it.
    split = weight is not None and jnp.dtype(weight.dtype) == F32
    dx, dres, *partials = backward_call(
        target,
        x,
        weight,
        dy,
        dh,
        shift,
        offset,
        rstd,
        boxes,
        center=op.endswith("layer_norm"),
        param_grads=param_grads,
        d_dtypes=d_dtypes,
        name=f"eqxnorm_{op}_bwd",
        per_box=False,
        split_partials=split,
        weight_offset=weight_offset,
    )
    if not param_grads:
        return dx, dres, None, None
    # One reduction of the programs' partials, both gradients at once, reading their first
    # `width` columns in place (a folded row's partials are `(4 · chunks, cols)`).
    center = op.endswith("layer_norm")
    if split:
        halves = [p.reshape(*p.shape[:2], -1)[..., :width] for p in partials]
        dw, db = sum_halves(halves, axis=1, like=weight, droppable=not center)
    else:
        per_program = partials[0].reshape(*partials[0].shape[:3], -1)[..., :width]
        dw, db = sum_pair(per_program, pair_axis=1, sum_axis=2, like=weight, droppable=not center)
    return dx, dres, dw, db


def backward_call(
    target: Target,
    x,
    weight,
    dy,
    dh,
    shift,
    offset,
    rstd,
    boxes,
    *,
    center,
    param_grads,
    d_dtypes,
    name,
    per_box,
    split_partials=False,
    weight_offset=0.0,
):
    """The backward kernel over `x` `(groups, rows, width)` staged as `boxes`: `(dx,
    dresidual, *partials)`, the partial parameter gradients (with `param_grads`): both in
    one array per program (of a persistent grid, `_mosaic_gpu.persistent_programs`; per
    cluster of them where they are combined on chip) and column `(groups, 2, programs,
    chunks · cols)`, or with `per_box` (the weight a table, [`PerBox`][]) per row and table
    column `(groups, 2, padded rows, columns)`; with `split_partials`, one array each
    (`(groups, programs, ...)`)."""
    groups, rows, width = x.shape
    out_reuse = _out_buffers(dy, dh, d_dtypes)
    staged_dtypes = [a.dtype for a in (x, dy, dh) if a is not None]
    staged_dtypes += [d for d, r in zip(d_dtypes, out_reuse, strict=True) if r is None]
    row_elements = boxes.chunks * boxes.cols * (boxes.tile_rows if boxes.folded else 1)
    row_bytes = row_elements * sum(jnp.dtype(d).itemsize for d in staged_dtypes)
    # The group norms' per-row tables are laid out for the `boxes` given: one slot there.
    read = width * (jnp.dtype(x.dtype).itemsize + jnp.dtype(dy.dtype).itemsize)
    slots, boxes = (1, boxes) if per_box else _stages(boxes, groups, rows, row_bytes, read)
    br = boxes.block_rows
    x_p, dy_p, dh_p = (_pad_rows(a, br) for a in (x, dy, dh))
    padded_rows = x_p.shape[1]
    blocks = -(-padded_rows // br)
    # The group norms' per-row partials cost nothing more per program.
    fewest = 1 if per_box else _min_iterations(boxes, blocks, groups, br, read)
    program_bytes = slots * br * row_bytes + boxes.partial_bytes
    params = [] if weight is None else [weight]
    # A split row's exchanges (kept beside the staging, counted in its room).
    exchange = m.exchange_scratch(boxes, 2, 2) if boxes.split > 1 else []
    staged = range(0)
    if not per_box:
        other = program_bytes + m.smem_bytes(exchange)
        staged = _staged_boxes(params, boxes, width, other)
    params_staged = bool(staged)
    if params_staged:  # the residency the grid is sized by counts the staged weight
        program_bytes += m.smem_bytes(_param_scratch(params, boxes, staged)[:1])
    programs, iterations, cluster = _grid(boxes, blocks, program_bytes, groups, fewest)
    on_chip = boxes.partial_bytes > 0
    # Every block a program visits, past the end included, in bounds ([`_window`][]; a
    # folded row past the end reads TMA's zeros and the last row's statistics). The group
    # norms' per-row tables and partials are laid out for whole blocks: there, statistics
    # (and per-row partials) padded with zeros to the blocks visited (`rstd = 0`).
    stat_rows = programs * iterations * br
    clamp = not per_box and not boxes.folded and stat_rows != padded_rows
    pad_to = stat_rows if per_box else padded_rows
    stats = [shift, offset, rstd]
    if pad_to > rows:
        stats = [jnp.pad(s, ((0, 0), (0, pad_to - rows))) for s in stats]
    box = (slots, *boxes.tile)
    scratch = [plgpu.SMEM(box, x.dtype), plgpu.SMEM(box, dy.dtype)]
    if dh is not None:
        scratch.append(plgpu.SMEM(box, dh.dtype))
    if weight is not None and not per_box and not boxes.folded and not params_staged:
        weight = _pad_columns(weight, boxes)
    scratch += [plgpu.SMEM(box, d) for d, r in zip(d_dtypes, out_reuse, strict=True) if r is None]
    if on_chip:
        per_program = boxes.tile if boxes.folded else boxes.tile[::2]
        scratch.append(plgpu.SMEM((2, *per_program), F32))
    if boxes.split > 1:
        scratch += exchange
    elif on_chip:
        scratch += m.cluster_barriers(cluster)
    n_staged = 2 + (dh is not None)
    scratch += [plgpu.Barrier(num_arrivals=boxes.arrivals, num_barriers=slots)] * n_staged
    if params_staged:
        scratch += _param_scratch(params, boxes, staged)
    out_type = [jax.ShapeDtypeStruct(x_p.shape, d) for d in d_dtypes]
    if param_grads:
        if per_box:
            shape = (groups, stat_rows, boxes.chunks // per_box.boxes_per_column)
        elif boxes.folded:
            # A split row's: its cluster's programs' tiles side by side.
            tiles = boxes.split * boxes.chunks
            shape = (groups, programs // cluster, tiles * boxes.tile_rows, boxes.cols)
        else:
            shape = (groups, programs // cluster, boxes.chunks * boxes.cols)
        if split_partials:
            out_type += [jax.ShapeDtypeStruct(shape, F32)] * 2
        else:
            out_type.append(jax.ShapeDtypeStruct((shape[0], 2, *shape[1:]), F32))
    body = functools.partial(
        _backward_body,
        boxes=boxes,
        width=width,
        center=center,
        has_weight=weight is not None,
        has_dh=dh is not None,
        out_reuse=out_reuse,
        n_outs=len(d_dtypes),
        param_grads=param_grads,
        per_box=per_box,
        # A split row's cluster is one row at a time: the row stride is the clusters.
        programs=programs // boxes.split,
        iterations=iterations,
        slots=slots,
        clamp=clamp,
        params_staged=params_staged,
        cluster=cluster,
        split_partials=split_partials,
        weight_offset=weight_offset,
    )
    # The row norms' backward keeps the forwards' discipline (`_mosaic_gpu.kernel`): no
    # automatic barriers. The group norms' (`per_box`), which `impl="auto"` runs, keeps them
    # until a GPU has run it without.
    run = _rows_kernel(
        body,
        target,
        out_type,
        scratch,
        programs,
        groups,
        name,
        auto_barriers=bool(per_box),
        cluster=cluster,
    )
    inputs = [x_p, dy_p, *stats] + [a for a in (weight, dh_p) if a is not None]
    dx, *outs = run(*inputs)
    dres = outs.pop(0)[:, :rows] if len(d_dtypes) == 2 else None
    return dx[:, :rows], dres, *outs


def _all_supported(x, arrays, boxes: m.Boxes) -> bool:
    """TMA-able rows that fit on chip, in groups of at least a layout tile's rows: a group
    shorter than that (adaLN over one token per example) would be padded, a copy, so it
    runs the Triton kernel unless it is the only group (one short input)."""
    groups, rows, width = x.shape
    if not all(m.supports(a.dtype, width) for a in arrays if a is not None):
        return False
    # A folded row is a program's only row: never padded.
    least = boxes.block_rows if boxes.folded else boxes.tile_rows
    return boxes.block_rows > 0 and (rows >= least or groups == 1)


def forward_supported(
    x, residual, weight, bias, scale=None, out_dtype=None, fold: bool = True
) -> bool:
    """Whether [`forward_on`][] runs these operands (and `y` in `out_dtype`): TMA-able rows
    that fit on chip (`fold`: folded, see [`forward_boxes`][])."""
    boxes = forward_boxes(x, residual, weight, bias, scale, out_dtype, fold)
    if not _same_dtype(x, out_dtype) and not _output_supported(out_dtype, x.shape[-1], boxes):
        return False
    return _all_supported(x, (x, residual, weight, bias), boxes)


def _output_supported(dtype, width: int, boxes: m.Boxes) -> bool:
    """Whether rows of `dtype` (an output, or a float8 cotangent) can be staged in `boxes`: a
    row of a multiple of 16 bytes and, for a float8 dtype, boxes at least 16 bytes wide."""
    if jnp.dtype(dtype) in reference.FP8_DTYPES:
        return width % 16 == 0 and boxes.cols % 16 == 0
    return m.supports(dtype, width)


def backward_supported(d_dtypes, x, weight, dy, dh, shift, offset, rstd, fold: bool = True) -> bool:
    """Whether [`backward_on`][] runs these operands (with input gradients of `d_dtypes`;
    `fold`: folded rows, see [`backward_boxes`][])."""
    del shift, offset, rstd
    if not all(m.supports(d, x.shape[-1]) for d in d_dtypes):
        return False
    boxes = backward_boxes(x, weight, dy, dh, d_dtypes, fold)
    if jnp.dtype(dy.dtype) in reference.FP8_DTYPES:
        # The cotangent of a float8 output (FP8 `y`): staged like the other rows.
        if not _output_supported(dy.dtype, x.shape[-1], boxes):
            return False
        dy = None
    return _all_supported(x, (x, weight, dy, dh), boxes)


# --- one-group persistent backwards --------------------------------------------------------
#
# Gated RMSNorm's and DyT's backwards over `(rows, dim)` as one group ([`_one_group_call`][]):
# persistent, their partials accumulated on chip and combined over a cluster, as the row
# norms' backward's.


class _Grid(NamedTuple):
    """A one-group persistent backward's grid ([`_one_group_call`][]): `programs` in clusters
    of `cluster`, each over `iterations` blocks (`clamp`: as [`_window`][]'s)."""

    programs: int = 1
    iterations: int = 1
    cluster: int = 1
    clamp: bool = False


def _partials_scratch(rest: list, boxes: m.Boxes, grid: _Grid, kinds):
    """`(accs, cluster barriers)` popped from the front of a body's scratch `rest`: for each
    of `kinds` (whether the body has that kind of partial sums: per column, then per box
    column, [`_one_group_call`][]) that it has, the program's partial sums on chip (`None`
    where they accumulate in HBM, or the body has none), and `_mosaic_gpu.combine_partials`'
    barriers."""
    on_chip = boxes.partial_bytes > 0
    accs = [rest.pop(0) if on_chip and kind else None for kind in kinds]
    return accs, [rest.pop(0) for _ in m.cluster_barriers(grid.cluster) if on_chip]


def _each_block(block, boxes: m.Boxes, grid: _Grid, rows: int):
    """`block(rows, ours, first)` for each of this program's blocks of `rows` rows, in one
    slot of staging: `rows` its window ([`_window`][]), `ours` the mask of its rows that
    no block before it had (`None`: all), `first` whether it is the program's first (its
    partial sums start there). Before a block is staged over the previous one, the previous
    one's TMA stores have read their shared memory."""
    i = m.program_index(grid.cluster)

    def one(it, first: bool):
        window, skip = _window(i + it * grid.programs, boxes, rows, grid.clamp)
        ours = _ours(skip, boxes)
        if not first:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.commit_smem()
        block(window, ours, first)

    one(0, True)
    if grid.iterations > 1:

        @pl.loop(1, grid.iterations)
        def _(it):
            one(it, False)


def _load_sums(ref, layout):
    """Float32 partial sums in `layout` from `ref` (shared memory or HBM)."""
    return plgpu.load(ref, layout=layout, optimized=False)


def _accumulate(ref, sums, first: bool, layout):
    """`ref = sums()` for a program's first block, else `ref += sums()` (float32 partial sums
    in `layout`, `ref` in shared memory or HBM). The sums so far are read before `sums()`
    runs: a box's column sums are the same in every warp, and the reduction across the warps
    that makes them orders every warp's read before any warp's write (the backwards keep no
    automatic barriers, `_mosaic_gpu.kernel`; a folded row's partials are each warp's own)."""
    old = None if first else _load_sums(ref, layout)
    value = sums()
    plgpu.store(ref, value if old is None else old + value, optimized=False)


def _column_sums(value, ours, per_tile: bool = False):
    """`sums()` for [`_accumulate`][]: the column sums of the box `value` over its rows
    `ours` ([`_ours`][]; `None`: all), or with `per_tile` (a folded row's tile, 4 boxes of
    its columns, each warp's own) `value` as it is."""
    if per_tile:
        return lambda: value
    return lambda: jnp.sum(_masked(value, ours), axis=0)


def _partial_ref(partial_ref, acc, s: int, k, boxes: m.Boxes, grid: _Grid, columns=None):
    """Where a one-group backward's partial sum `s` of box `k` accumulates: on chip
    (`acc[s, k]`) or in the program's row of `partial_ref` `(1, programs, columns)` (its
    `columns` of box `k`, or the given ones)."""
    if acc is not None:
        return acc.at[s, k]
    if columns is None:
        columns = pl.ds(pl.multiple_of(k * boxes.cols, boxes.cols), boxes.cols)
    return partial_ref.at[0, m.program_index(grid.cluster), columns]


def _flush_partials(pairs, cluster_bars, boxes: m.Boxes, grid: _Grid, box_pair=None):
    """A one-group backward's partial sums kept on chip (`pairs` of the sums on chip, `None`
    if in HBM, and their outputs, one per part; `box_pair` likewise, per column of a box:
    DyT's α), combined over the cluster and stored, one row per cluster
    (`_mosaic_gpu.combine_partials`)."""
    pairs = [(acc, refs) for acc, refs in pairs if acc is not None]
    boxed = [] if box_pair is None or box_pair[0] is None else [box_pair]
    if not pairs + boxed:
        return
    row = lax.axis_index("rows")

    def store(a, s, k, total):
        if a == len(pairs):  # per column of a box
            columns = pl.ds(0, boxes.cols)
        elif boxes.folded:  # a folded row's partials: `(..., 4 · chunks, cols)`, a tile each
            columns = pl.ds(pl.multiple_of(k * boxes.tile_rows, boxes.tile_rows), boxes.tile_rows)
        else:
            columns = pl.ds(pl.multiple_of(k * boxes.cols, boxes.cols), boxes.cols)
        plgpu.store((pairs + boxed)[a][1][s].at[0, row, columns], total, optimized=False)

    column = boxes.layout.reduce(0)
    layouts = [boxes.layout if boxes.folded else column] * len(pairs) + [column] * len(boxed)
    accs = [acc for acc, _ in pairs + boxed]
    m.combine_partials(accs, store, layouts, grid.cluster, cluster_bars)


# --- gated RMSNorm ---------------------------------------------------------------------------
#
# `row_norm._gated_rms_norm_fwd_on` / `_bwd_on`'s contracts on `(rows, dim)` as one group: the
# forward stages `x` and `z` and writes `y` over `x`'s boxes; the backward stages `x`, `z`,
# `dy`, recomputes the row's statistic there and writes `dx` and `dz` over `x`'s and `z`'s.


def _gated_values(x_smem, z_smem, k, layout, norm_before_gate: bool):
    """`(x, n, silu(z), silu'(z))` of box `k`: `n` the normalized value (`x`, or `x·silu(z)`
    when the gate comes first)."""
    x = _load(x_smem, k, layout)
    z = _load(z_smem, k, layout)
    sigmoid = 1 / (1 + jnp.exp(-z))
    gate = z * sigmoid
    n = x if norm_before_gate else x * gate
    return x, n, gate, sigmoid * (1 + z * (1 - sigmoid))


def _stage(refs_and_smems, bars, rows, boxes, tools, group):
    for (src, dst), bar in zip(refs_and_smems, bars, strict=True):
        _copy_in(src, dst, bar, rows, boxes, tools, group)
    for bar in bars:
        plgpu.barrier_wait(bar)


def _staged_params(param_refs, scratch: list, params_staged: bool, group, boxes: m.Boxes, tools):
    """`(parameters, barriers, arrival)`: with `params_staged` (the last two of `scratch`, see
    [`_staged_boxes`][]) the copies of the parameters' staged boxes started, each parameter
    as [`_param`][] reads it then, and the barrier to wait on before (else `None`); the
    barriers of the staged rows, the rest of `scratch`."""
    if not params_staged:
        return list(param_refs), scratch, None
    *bars, param_smem, param_bar = scratch
    _stage_params(param_refs, param_smem, param_bar, group, boxes, tools)
    return [(ref, param_smem, p) for p, ref in enumerate(param_refs)], bars, param_bar


def _staged_weight(w_ref, scratch: list, params_staged: bool, group, boxes: m.Boxes, tools):
    """`(weight, barriers)`: [`_staged_params`][] of the weight alone, arrived (`None`: no
    weight, nothing staged)."""
    refs = [] if w_ref is None else [w_ref]
    staged, bars, arrival = _staged_params(refs, scratch, params_staged, group, boxes, tools)
    if arrival is not None:
        plgpu.barrier_wait(arrival)
    return (staged[0] if staged else None), bars


def _stage_rows(refs_and_smems, bars, rows, boxes, tools, group):
    """[`_stage`][], then a folded row's last tile zeroed past the row's end
    ([`_zero_tail`][])."""
    _stage(refs_and_smems, bars, rows, boxes, tools, group)
    for _, smem in refs_and_smems:
        _zero_tail(smem, boxes, tools)


def _gated_forward_body(
    *refs, boxes, width, eps, norm_before_gate, has_weight, params_staged=False
):
    x_ref, z_ref = refs[:2]
    w_ref = refs[2] if has_weight else None
    y_ref, x_smem, z_smem, *bars = refs[2 + has_weight :]
    i, group = lax.axis_index("rows"), lax.axis_index("groups")
    rows = pl.ds(i * boxes.block_rows, boxes.block_rows)
    tools = _box_tools(boxes, width, i * 0)
    bcast, layout = tools.bcast, boxes.layout
    w_ref, bars = _staged_weight(w_ref, bars, params_staged, group, boxes, tools)
    _stage_rows(((x_ref, x_smem), (z_ref, z_smem)), bars, rows, boxes, tools, group)

    def values(k):
        return _gated_values(x_smem, z_smem, k, layout, norm_before_gate)

    mean_square = row_total(lambda k: jnp.square(values(k)[1]) * (1.0 / width), boxes)
    rstd = reference.inverse_std(mean_square, eps)

    @pl.loop(0, boxes.chunks)
    def _(k):
        _, n, gate, _ = values(k)
        y = n * bcast(rstd, [0])
        if w_ref is not None:
            y = y * _param(w_ref, k, rows, group, False, boxes, tools)
        x_smem[k] = (y * gate if norm_before_gate else y).astype(x_smem.dtype)

    plgpu.commit_smem()
    _copy_out(x_smem, y_ref, rows, boxes, tools, group)
    plgpu.wait_smem_to_gmem(0)


def _gated_backward_body(
    *refs,
    boxes,
    width,
    eps,
    norm_before_gate,
    has_weight,
    param_grads,
    params_staged=False,
    grid: _Grid,
):
    x_ref, z_ref, dy_ref = refs[:3]
    w_ref = refs[3] if has_weight else None
    dx_ref, dz_ref, *rest = refs[3 + has_weight :]
    partial_refs = [rest.pop(0)] if param_grads else []
    (acc,), cluster_bars = _partials_scratch(rest, boxes, grid, [param_grads])
    x_smem, z_smem, dy_smem, *bars = rest
    group = lax.axis_index("groups")
    tools = _box_tools(boxes, width, group * 0)
    bcast, layout = tools.bcast, boxes.layout
    # A folded row's partials per column of its tiles, as they are.
    part_layout = layout if boxes.folded else layout.reduce(0)
    w_ref, bars = _staged_weight(w_ref, bars, params_staged, group, boxes, tools)
    staged = ((x_ref, x_smem), (z_ref, z_smem), (dy_ref, dy_smem))

    def block(rows, ours, first):
        _stage_rows(staged, bars, rows, boxes, tools, group)

        def values(k):
            x, n, gate, dgate = _gated_values(x_smem, z_smem, k, layout, norm_before_gate)
            dy = _load(dy_smem, k, layout)
            w = None if w_ref is None else _param(w_ref, k, rows, group, False, boxes, tools)
            post = gate if norm_before_gate else 1.0
            g = dy * post if w is None else dy * post * w
            return x, n, gate, dgate, dy, w, g, post

        # Two loops: in one, the float32 backward at 1024 × 8192 took 255 registers and
        # spilled (64 apart; deviceless H200).
        mean_square = row_total(lambda k: jnp.square(values(k)[1]) * (1.0 / width), boxes)
        sum_gn = row_total(lambda k: values(k)[6] * values(k)[1], boxes)
        rstd = reference.inverse_std(mean_square, eps)
        # mean(g n̂) = r · mean(g n), as in the Triton kernel.
        mean_gn = sum_gn * rstd * (1.0 / width)

        @pl.loop(0, boxes.chunks)
        def _(k):
            x, n, gate, dgate, dy, w, g, post = values(k)
            nhat = n * bcast(rstd, [0])
            dn = (g - nhat * bcast(mean_gn, [0])) * bcast(rstd, [0])
            if norm_before_gate:
                dx, dz = dn, dy * (nhat if w is None else nhat * w) * dgate
            else:
                dx, dz = dn * gate, dn * x * dgate
            if param_grads:
                partial = dy * nhat * post
                ref = _partial_ref(partial_refs[0], acc, 0, k, boxes, grid)
                _accumulate(ref, _column_sums(partial, ours, boxes.folded), first, part_layout)
            x_smem[k] = dx.astype(x_smem.dtype)
            z_smem[k] = dz.astype(z_smem.dtype)

        plgpu.commit_smem()
        _copy_out(x_smem, dx_ref, rows, boxes, tools, group)
        _copy_out(z_smem, dz_ref, rows, boxes, tools, group)

    _each_block(block, boxes, grid, x_ref.shape[1])
    _flush_partials([(acc, partial_refs)], cluster_bars, boxes, grid)
    plgpu.wait_smem_to_gmem(0)


def _one_group_call(
    body,
    target,
    staged,
    params,
    boxes,
    out_dtypes,
    partials,
    name,
    stage_params=False,
    backward=False,
    box_partials=0,
    scalars=(),
    **settings,
):
    """The launch of `body` over the rows of `staged` (each `(rows, dim)`, staged whole) as
    one group, with `scalars` (each `(1,)`, read in place: DyT's α) and `params` per column
    (each `(dim,)`): outputs of
    `out_dtypes` in the rows' shape, then `box_partials` float32 partial sums per column of
    a box (summed over a row's boxes too), `(programs, cols)`, and `partials` per column,
    `(programs, dim)` (summed by the caller). `body` takes the staged arrays, then the
    parameters; with `stage_params` (a body that takes `params_staged`) their boxes staged
    where TMA can ([`_staged_boxes`][]), else their columns padded;
    no automatic barriers (`_mosaic_gpu.kernel`: the bodies keep the row norms'
    discipline, [`_accumulate`][]). A forward runs a program per block; a
    `backward` a persistent grid (its `grid`, [`_Grid`][], [`_each_block`][]) as the row
    norms' backward's ([`_grid`][]), the partials accumulated over a program's blocks: on
    chip and combined over a cluster where `boxes` keeps room for them (one row per
    cluster), else in the program's row in HBM. Folded rows (one a block, its partials on
    chip) as the row norms'; not split ones (`boxes` from `_boxes(split=False)`)."""
    rows, width = staged[0].shape
    br = boxes.block_rows
    padded = [_pad_rows(a[None], br) for a in staged]
    blocks = -(-padded[0].shape[1] // br)
    grid = _Grid(blocks)
    itemsizes = sum(jnp.dtype(a.dtype).itemsize for a in staged)
    row_bytes = boxes.chunks * boxes.cols * itemsizes
    row_bytes *= boxes.tile_rows if boxes.folded else 1
    program_bytes = br * row_bytes + boxes.partial_bytes
    params = [p[None] for p in params]
    staged_params = range(0)
    if stage_params:
        staged_params = _staged_boxes(params, boxes, width, program_bytes, persistent=backward)
    if staged_params:  # the residency the grid is sized by counts the staged weight
        program_bytes += m.smem_bytes(_param_scratch(params, boxes, staged_params)[:1])
    if backward:
        fewest = _min_iterations(boxes, blocks, 1, br, width * itemsizes)
        programs, iterations, cluster = _grid(boxes, blocks, program_bytes, 1, fewest)
        clamp = not boxes.folded and programs * iterations * br != padded[0].shape[1]
        grid = _Grid(programs, iterations, cluster, clamp)
        settings["grid"] = grid
    scratch = []
    if boxes.partial_bytes:  # the order of `_partials_scratch`
        per_column = boxes.tile if boxes.folded else (boxes.chunks, boxes.cols)
        scratch += [plgpu.SMEM((partials, *per_column), F32)] if partials else []
        scratch += [plgpu.SMEM((box_partials, 1, boxes.cols), F32)] if box_partials else []
        scratch += m.cluster_barriers(grid.cluster)
    scratch += [plgpu.SMEM(boxes.tile, a.dtype) for a in staged]
    scratch += [_barrier(boxes)] * len(staged)
    if stage_params:
        settings["params_staged"] = bool(staged_params)
        scratch += _param_scratch(params, boxes, staged_params) if staged_params else []
    if not staged_params:
        params = [_pad_columns(p, boxes) for p in params]
    out_type = [jax.ShapeDtypeStruct(padded[0].shape, d) for d in out_dtypes]
    partial_rows = grid.programs // grid.cluster
    out_type += [jax.ShapeDtypeStruct((1, partial_rows, boxes.cols), F32)] * box_partials
    # A folded row's partials a tile of columns each.
    folded = (boxes.chunks * boxes.tile_rows, boxes.cols)
    per_row = folded if boxes.folded else (boxes.chunks * boxes.cols,)
    out_type += [jax.ShapeDtypeStruct((1, partial_rows, *per_row), F32)] * partials
    kernel = functools.partial(body, boxes=boxes, width=width, **settings)
    run = _rows_kernel(
        kernel, target, out_type, scratch, grid.programs, 1, name, False, grid.cluster
    )
    outs = run(*padded, *scalars, *params)
    rows_out = [o[0, :rows] for o in outs[: len(out_dtypes)]]
    # A folded row's partials: its tiles' columns in order.
    flat = [p if p.ndim == 3 else p.reshape(*p.shape[:2], -1) for p in outs[len(out_dtypes) :]]
    return rows_out, [p[0, :, :width] for p in flat]


def gated_rms_norm_forward_on(target: Target, x, z, weight, *, eps, norm_before_gate):
    """`y` as `row_norm._gated_rms_norm_fwd_on`, with one Mosaic GPU kernel."""
    boxes = _boxes((x, z), (weight,), (1, *x.shape), fold=True, split=False)
    (y,), _ = _one_group_call(
        _gated_forward_body,
        target,
        (x, z),
        [] if weight is None else [weight],
        boxes,
        (x.dtype,),
        0,
        "eqxnorm_gated_rms_norm_fwd",
        stage_params=True,
        eps=eps,
        norm_before_gate=norm_before_gate,
        has_weight=weight is not None,
    )
    return y


def gated_rms_norm_backward_on(
    target: Target, x, z, weight, dy, *, eps, norm_before_gate, param_grads
):
    """`(dx, dz, dweight)` as `row_norm._gated_rms_norm_bwd_on`, with one Mosaic GPU kernel;
    `dweight` the sum of the programs' float32 partial sums."""
    boxes = _boxes(
        (x, z, dy),
        (weight,),
        (1, *x.shape),
        layout_dtype=F32,
        fold=True,
        split=False,
        partials=int(param_grads),
    )
    (dx, dz), partials = _one_group_call(
        _gated_backward_body,
        target,
        (x, z, dy),
        [] if weight is None else [weight],
        boxes,
        (x.dtype, z.dtype),
        int(param_grads),
        "eqxnorm_gated_rms_norm_bwd",
        backward=True,
        stage_params=True,
        eps=eps,
        norm_before_gate=norm_before_gate,
        has_weight=weight is not None,
        param_grads=param_grads,
    )
    return dx, dz, (partials[0].sum(axis=0) if param_grads else None)


def gated_rms_norm_forward_supported(x, z, weight) -> bool:
    """Whether [`gated_rms_norm_forward_on`][] runs these operands."""
    boxes = _boxes((x, z), (weight,), (1, *x.shape), fold=True, split=False)
    return _all_supported(x[None], (x, z, weight), boxes)


def gated_rms_norm_backward_supported(x, z, weight, dy) -> bool:
    """Whether [`gated_rms_norm_backward_on`][] runs these operands: a folded row's weight
    gradient partials kept on chip (its folded tiles have no row of partials in HBM)."""
    partials = int(weight is not None)
    boxes = _boxes(
        (x, z, dy),
        (weight,),
        (1, *x.shape),
        layout_dtype=F32,
        fold=True,
        split=False,
        partials=partials,
    )
    if boxes.folded and partials and not boxes.partial_bytes:
        return False
    return _all_supported(x[None], (x, z, weight, dy), boxes)


# --- Dynamic Tanh ----------------------------------------------------------------------------
#
# `row_norm._dyt_fwd_on` / `_dyt_bwd_on`'s contracts; the scalar α is read in place, one
# value every thread loads (it was a row of α's broadcast by XLA and read like a parameter, a
# launch before each kernel), γ and β in their dtype (they were float32 copies).


def _dyt_forward_body(*refs, boxes, width, has_weight, has_bias, params_staged=False):
    x_ref, alpha_ref = refs[:2]
    param_refs = refs[2 : 2 + has_weight + has_bias]
    y_ref, x_smem, *bars = refs[2 + has_weight + has_bias :]
    i, group = lax.axis_index("rows"), lax.axis_index("groups")
    rows = pl.ds(i * boxes.block_rows, boxes.block_rows)
    tools = _box_tools(boxes, width, i * 0)
    # The parameters' boxes (where staged) on their way beside the rows.
    param_refs, [bar], arrival = _staged_params(
        param_refs, bars, params_staged, group, boxes, tools
    )
    _stage(((x_ref, x_smem),), (bar,), rows, boxes, tools, group)
    if arrival is not None:
        plgpu.barrier_wait(arrival)

    def param(ref, k):
        return _param(ref, k, rows, group, False, boxes, tools)

    alpha = alpha_ref[0].astype(F32)

    @pl.loop(0, boxes.chunks)
    def _(k):
        y = jnp.tanh(alpha * _load(x_smem, k, boxes.layout))
        if has_weight:
            y = y * param(param_refs[0], k)
        if has_bias:
            y = y + param(param_refs[has_weight], k)
        x_smem[k] = y.astype(x_smem.dtype)

    plgpu.commit_smem()
    _copy_out(x_smem, y_ref, rows, boxes, tools, group)
    plgpu.wait_smem_to_gmem(0)


def _dyt_backward_body(*refs, boxes, width, has_weight, grid: _Grid, params_staged=False):
    x_ref, dy_ref, alpha_ref = refs[:3]
    w_ref = refs[3] if has_weight else None
    dx_ref, *rest = refs[3 + has_weight :]
    alpha_part, *param_parts = (rest.pop(0) for _ in range(3))
    (acc, alpha_acc), cluster_bars = _partials_scratch(rest, boxes, grid, [True, True])
    x_smem, dy_smem, *bars = rest
    group = lax.axis_index("groups")
    tools = _box_tools(boxes, width, group * 0)
    layout, column = boxes.layout, boxes.layout.reduce(0)
    # A folded row's partials per column of its tiles, as they are (each warp's own).
    part_layout = layout if boxes.folded else column
    w_ref, bars = _staged_weight(w_ref, bars, params_staged, group, boxes, tools)
    alpha = alpha_ref[0].astype(F32)

    def block(rows, ours, first):
        _stage_rows(((x_ref, x_smem), (dy_ref, dy_smem)), bars, rows, boxes, tools, group)

        def box(k, alpha_box):
            x, dy = _load(x_smem, k, layout), _load(dy_smem, k, layout)
            t = jnp.tanh(alpha * x)
            e = dy * (1 - t * t)
            if w_ref is not None:
                e = e * _param(w_ref, k, rows, group, False, boxes, tools)
            # Per program and column: γ's and β's, each box's summed across the warps (a
            # folded row's tile is 4 boxes of its columns: per column as it is).
            for s, value in enumerate((dy * t, dy)):
                ref = _partial_ref(param_parts[s], acc, s, k, boxes, grid)
                _accumulate(ref, _column_sums(value, ours, boxes.folded), first, part_layout)
            x_smem[k] = (alpha * e).astype(x_smem.dtype)
            return alpha_box + _masked(e * x, ours)

        # α's: the boxes added up elementwise in registers, summed across the warps once a
        # block (box by box, a third reduction across the warps in each box's pass).
        zero = plgpu.layout_cast(jnp.zeros(boxes.tile[1:], F32), layout)
        alpha_box = lax.fori_loop(0, boxes.chunks, box, zero)
        ref = _partial_ref(alpha_part, alpha_acc, 0, 0, boxes, grid, pl.ds(0, boxes.cols))
        _accumulate(ref, _column_sums(alpha_box, None), first, column)
        plgpu.commit_smem()
        _copy_out(x_smem, dx_ref, rows, boxes, tools, group)

    _each_block(block, boxes, grid, x_ref.shape[1])
    _flush_partials([(acc, param_parts)], cluster_bars, boxes, grid, (alpha_acc, [alpha_part]))
    plgpu.wait_smem_to_gmem(0)


def _dyt_boxes(x, params, dy=None) -> m.Boxes:
    """The staging of DyT's forward (`x`; the parameters `params` in their common dtype's
    layout) or, with `dy`, its backward (`x` and `dy` in a float32 layout: its partials
    reduce across warps; γ's and β's partials per column, α's per column of a box; a row too
    wide for a tile of 4 beside its partials folded, as the row norms' backward's is)."""
    if dy is None:
        return _boxes((x,), params, (1, *x.shape))
    return _boxes(
        (x, dy),
        params,
        (1, *x.shape),
        layout_dtype=F32,
        fold=True,
        split=False,
        partials=2,
        box_partials=1,
    )


def dyt_forward_on(target: Target, x, alpha, weight, bias):
    """`y` as `row_norm._dyt_fwd_on`, with one Mosaic GPU kernel: α read in place (a scalar,
    in its dtype), the parameters in theirs (no XLA launch before the kernel)."""
    params = [p for p in (weight, bias) if p is not None]
    if params:
        params = [p.astype(_params_dtype(params)) for p in params]
    flags = dict(has_weight=weight is not None, has_bias=bias is not None)
    (y,), _ = _one_group_call(
        _dyt_forward_body,
        target,
        (x,),
        params,
        _dyt_boxes(x, params),
        (x.dtype,),
        0,
        "eqxnorm_dyt_fwd",
        stage_params=True,
        scalars=(alpha.reshape(1),),
        **flags,
    )
    return y


def dyt_backward_on(target: Target, x, alpha, weight, dy):
    """`(dx, dalpha, dweight, dbias)` as `row_norm._dyt_bwd_on`, with one Mosaic GPU kernel
    (α and the weight read as the forward reads them)."""
    params = [] if weight is None else [weight]
    (dx,), (dalpha, dw, db) = _one_group_call(
        _dyt_backward_body,
        target,
        (x, dy),
        params,
        _dyt_boxes(x, params, dy),
        (x.dtype,),
        2,
        "eqxnorm_dyt_bwd",
        backward=True,
        stage_params=True,
        box_partials=1,
        scalars=(alpha.reshape(1),),
        has_weight=weight is not None,
    )
    # γ's and β's partials summed over the programs in one reduction (their casts to a
    # half-precision weight's dtype fused into it); α's, per column of a box, summed whole in
    # another. Summed with them (a concatenation), α's needed a third launch, the casts
    # apart (bf16 at 4096 × 1024: 3 launches, now 2).
    dw, db = sum_parts([dw, db], axes=(0,), like=weight)
    return dx, dalpha.sum(), dw, db


def dyt_supported(x, *operands) -> bool:
    """Whether [`dyt_forward_on`][]/[`dyt_backward_on`][] run these operands (`x`'s rows
    staged, with `dy`'s in the backward)."""
    operands = [a for a in operands if a is not None]
    rows = [a for a in operands if a.shape == x.shape]
    # The parameters' common dtype is `_boxes`' own choice: no cast needed to size it.
    params = [a for a in operands if a.ndim == 1]
    boxes = _dyt_boxes(x, params, rows[0] if rows else None)
    if boxes.folded and not boxes.partial_bytes:  # a folded row's partials stay on chip
        return False
    return _all_supported(x[None], (x, *rows), boxes)


# --- per-row valid lengths (padding) ------------------------------------------------------------
#
# `row_norm.layer_norm_lengths`' kernels on Mosaic GPU: each row's statistics over its first
# `lengths` columns (a float32 per row, read from HBM beside the statistics), every column
# normalized, a row of length 0 its bias; the backward the transpose of the masked tangent.
# One block per program, one staging slot.


def _counted(boxes: m.Boxes, tools, n):
    """`counted(k)`: the mask of box `k`'s columns inside their row's valid length `n`
    (float32 per row), and `nonempty()`: the mask of the rows with `n > 0`."""
    bcast = tools.bcast
    shape = (boxes.block_rows, boxes.cols)

    def counted(k):
        col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=boxes.layout)
        return (col + k * boxes.cols).astype(F32) < bcast(n, [0])

    return counted, lambda: bcast(n, [0]) > 0.0


def _lengths_stats(load_h, boxes: m.Boxes, center: bool, tools, n):
    """`(shift, offset, var)` per row over its valid columns: `reference.masked_moments`
    (each mean a sum of `v / n`, 0 for an empty row)."""
    bcast = tools.bcast
    counted, _ = _counted(boxes, tools, n)
    inv = jnp.where(n > 0.0, 1.0 / jnp.maximum(n, 1.0), 0.0)
    total = functools.partial(row_total, boxes=boxes)

    def valid_h(k):
        return jnp.where(counted(k), load_h(k), 0.0) * bcast(inv, [0])

    if not center:
        mean_square = total(lambda k: jnp.square(jnp.where(counted(k), load_h(k), 0.0)))
        mean_square = mean_square * inv
        zeros = mean_square * 0.0
        return zeros, zeros, mean_square
    shift = total(valid_h)

    def centred(k):
        return jnp.where(counted(k), load_h(k) - bcast(shift, [0]), 0.0)

    offset = total(lambda k: centred(k) * bcast(inv, [0]))
    mean_square = total(lambda k: jnp.square(centred(k)) * bcast(inv, [0]))
    return shift, offset, jnp.maximum(mean_square - offset * offset, 0.0)


def _load_rows(ref, group, rows, layout):
    """A per-row float32 vector of a program's rows, read straight from HBM (padded to whole
    programs, so in bounds)."""
    return plgpu.load(ref.at[group, rows], layout=layout.reduce(1), optimized=False)


def _lengths_forward_body(*refs, boxes, width, eps, center, has_weight, has_bias):
    n_params = has_weight + has_bias
    x_ref, len_ref, *refs = refs
    param_refs, (y_ref, *stat_refs) = refs[:n_params], refs[n_params : n_params + 4]
    x_smem, st_smem, x_bars = refs[n_params + 4 :]

    i, group = lax.axis_index("rows"), lax.axis_index("groups")
    rows = pl.ds(i * boxes.block_rows, boxes.block_rows)
    tools = _box_tools(boxes, width, i * 0)
    bcast, layout = tools.bcast, boxes.layout
    _copy_in(x_ref, x_smem, x_bars, rows, boxes, tools, group)
    n = _load_rows(len_ref, group, rows, layout)
    _, nonempty = _counted(boxes, tools, n)
    plgpu.barrier_wait(x_bars)

    def load_h(k):
        return _load(x_smem, k, layout)

    shift, offset, var = _lengths_stats(load_h, boxes, center, tools, n)
    rstd = reference.inverse_std(var, eps)

    @pl.loop(0, boxes.chunks)
    def _(k):
        xhat = ((load_h(k) - bcast(shift, [0])) - bcast(offset, [0])) * bcast(rstd, [0])
        y = jnp.where(nonempty(), xhat, 0.0)
        if has_weight:
            y = y * _param(param_refs[0], k, rows, group, False, boxes, tools)
        if has_bias:
            y = y + _param(param_refs[int(has_weight)], k, rows, group, False, boxes, tools)
        x_smem[k] = y.astype(x_smem.dtype)

    for s, value in enumerate((shift, offset, rstd)):
        st_smem[s] = value
    plgpu.commit_smem()
    _copy_out(x_smem, y_ref, rows, boxes, tools, group)
    for s, ref in enumerate(stat_refs):
        plgpu.copy_smem_to_gmem(st_smem.at[s], ref.at[group, rows])
    plgpu.wait_smem_to_gmem(0)


def _whole_programs(a, boxes: m.Boxes, rows: int):
    """Per-row `a` `(groups, rows)` as float32 padded with zeros to whole programs."""
    programs = -(-max(rows, boxes.block_rows) // boxes.block_rows)
    return jnp.pad(a.astype(F32), ((0, 0), (0, programs * boxes.block_rows - rows)))


def lengths_forward_on(target: Target, x, lengths, weight, bias, *, op: str, eps: float):
    """`(y, shift, offset, rstd)` as `row_norm._lengths_forward_on`, one Mosaic GPU kernel."""
    groups, rows, width = x.shape
    params = [p for p in (weight, bias) if p is not None]
    params = [p.astype(_params_dtype(params)) for p in params]
    boxes = forward_boxes(x, None, weight, bias, fold=False)
    x_p = _pad_rows(x, boxes.block_rows)
    n = _whole_programs(lengths, boxes, rows)
    stat = jax.ShapeDtypeStruct(n.shape, F32)
    box = (boxes.chunks, boxes.block_rows, boxes.cols)
    scratch = [plgpu.SMEM(box, x.dtype), plgpu.SMEM((3, boxes.block_rows), F32), _barrier(boxes)]
    body = functools.partial(
        _lengths_forward_body,
        boxes=boxes,
        width=width,
        eps=eps,
        center=op.endswith("layer_norm"),
        has_weight=weight is not None,
        has_bias=bias is not None,
    )
    out_type = [jax.ShapeDtypeStruct(x_p.shape, x.dtype)] + [stat] * 3
    programs = n.shape[1] // boxes.block_rows
    name = f"eqxnorm_{op}_lengths_fwd"
    run = _rows_kernel(body, target, out_type, scratch, programs, groups, name, auto_barriers=False)
    y, *stats = run(x_p, n, *(_pad_columns(p, boxes) for p in params))
    return y[:, :rows], *(s[:, :rows] for s in stats)


def _lengths_backward_body(*refs, boxes, width, center, has_weight, param_grads, own_dx):
    x_ref, dy_ref, len_ref, shift_ref, offset_ref, rstd_ref, *refs = refs
    w_ref = refs.pop(0) if has_weight else None
    dx_ref = refs.pop(0)
    partial_ref = refs.pop(0) if param_grads else None
    x_smem, dy_smem, *refs = refs
    dx_smem = refs.pop(0) if own_dx else dy_smem
    x_bars, dy_bars = refs

    i, group = lax.axis_index("rows"), lax.axis_index("groups")
    rows = pl.ds(i * boxes.block_rows, boxes.block_rows)
    tools = _box_tools(boxes, width, i * 0)
    bcast, layout = tools.bcast, boxes.layout
    _copy_in(x_ref, x_smem, x_bars, rows, boxes, tools, group)
    _copy_in(dy_ref, dy_smem, dy_bars, rows, boxes, tools, group)
    n, shift, offset, rstd = (
        _load_rows(r, group, rows, layout) for r in (len_ref, shift_ref, offset_ref, rstd_ref)
    )
    counted, nonempty = _counted(boxes, tools, n)
    plgpu.barrier_wait(x_bars)
    plgpu.barrier_wait(dy_bars)

    def values(k):
        xhat = ((_load(x_smem, k, layout) - bcast(shift, [0])) - bcast(offset, [0])) * bcast(
            rstd, [0]
        )
        xhat = jnp.where(nonempty(), xhat, 0.0)
        dy = _load(dy_smem, k, layout)
        if w_ref is None:
            return xhat, dy, dy
        return xhat, dy, dy * _param(w_ref, k, rows, group, False, boxes, tools)

    def sums(k):
        xhat, _, g = values(k)
        return [g * xhat, g] if center else [g * xhat]

    sum_gx, *sum_g = warp_totals(sums, boxes, 1 + center)
    sum_g = sum_g[0] if center else shift * 0.0
    inv = jnp.where(n > 0.0, 1.0 / jnp.maximum(n, 1.0), 0.0)
    mean_gx, mean_g = sum_gx * inv, sum_g * inv

    @pl.loop(0, boxes.chunks)
    def _(k):
        xhat, dy, g = values(k)
        correction = bcast(mean_g, [0]) + xhat * bcast(mean_gx, [0])
        dx = jnp.where(nonempty(), g - jnp.where(counted(k), correction, 0.0), 0.0)
        dx = dx * bcast(rstd, [0])
        if param_grads:
            columns = pl.ds(pl.multiple_of(k * boxes.cols, boxes.cols), boxes.cols)
            for s, value in enumerate((dy * xhat, dy)):
                total = jnp.sum(value, axis=0)
                plgpu.store(partial_ref.at[group, s, i, columns], total, optimized=False)
        dx_smem[k] = dx.astype(dx_smem.dtype)

    plgpu.commit_smem()
    _copy_out(dx_smem, dx_ref, rows, boxes, tools, group)
    plgpu.wait_smem_to_gmem(0)


def lengths_backward_on(
    target: Target, x, lengths, weight, dy, shift, offset, rstd, *, op: str, param_grads: bool
):
    """`(dx, dweight, dbias)` as `row_norm._lengths_backward_on`, one Mosaic GPU kernel."""
    groups, rows, width = x.shape
    d_dtypes = (jnp.dtype(x.dtype),)
    boxes = backward_boxes(x, weight, dy, None, d_dtypes, fold=False, partials=False)
    own_dx = _out_buffers(dy, None, d_dtypes)[0] is None
    x_p, dy_p = (_pad_rows(a, boxes.block_rows) for a in (x, dy))
    per_row = [_whole_programs(a, boxes, rows) for a in (lengths, shift, offset, rstd)]
    programs = per_row[0].shape[1] // boxes.block_rows
    box = (boxes.chunks, boxes.block_rows, boxes.cols)
    scratch = [plgpu.SMEM(box, x.dtype), plgpu.SMEM(box, dy.dtype)]
    scratch += [plgpu.SMEM(box, x.dtype)] if own_dx else []
    scratch += [_barrier(boxes)] * 2
    out_type = [jax.ShapeDtypeStruct(x_p.shape, x.dtype)]
    if param_grads:
        shape = (groups, 2, programs, boxes.chunks * boxes.cols)
        out_type.append(jax.ShapeDtypeStruct(shape, F32))
    body = functools.partial(
        _lengths_backward_body,
        boxes=boxes,
        width=width,
        center=op.endswith("layer_norm"),
        has_weight=weight is not None,
        param_grads=param_grads,
        own_dx=own_dx,
    )
    name = f"eqxnorm_{op}_lengths_bwd"
    run = _rows_kernel(body, target, out_type, scratch, programs, groups, name, auto_barriers=False)
    weights = [] if weight is None else [_pad_columns(weight, boxes)]
    dx, *partials = run(x_p, dy_p, *per_row, *weights)
    if not param_grads:
        return dx[:, :rows], None, None
    dw, db = jnp.moveaxis(partials[0].sum(axis=2)[..., :width], 1, 0)
    return dx[:, :rows], dw, db


def lengths_forward_supported(x, lengths, weight, bias) -> bool:
    """Whether [`lengths_forward_on`][] runs these operands."""
    del lengths
    return forward_supported(x, None, weight, bias, fold=False)


def lengths_backward_supported(x, lengths, weight, dy, shift, offset, rstd) -> bool:
    """Whether [`lengths_backward_on`][] runs these operands."""
    del lengths
    d_dtypes = (jnp.dtype(x.dtype),)
    return backward_supported(d_dtypes, x, weight, dy, None, shift, offset, rstd, fold=False)
