r"""BatchNorm's kernels on Mosaic GPU (Hopper and newer): the same three launches, maths and
outputs as `eqxnorm.kernels.batch_norm`'s `_moments_on`, `_normalize_on` and `_sums_on`.

`(batch, channels, spatial)` is viewed as `batch·channels` rows of `spatial` elements, each
row one channel of one example, staged as the row norms' are (`eqxnorm.kernels._mosaic_gpu`).
A program reads its rows' values of the per-channel inputs ($K$, $d_0$, $\bar{d}$, $s$,
$\beta$) in place when its rows are consecutive channels of one example (the blocks tile the
channels), else from copies expanded to one value per row in XLA (`batch × channels` values,
one more launch each); the per-channel reductions are per row in the kernels (float32, over
the row's `spatial` elements) and finished over the examples in XLA, as the Triton kernels'
per-tile partials are:

- statistics: per row, the mean of $d = (x - K) - d_0$ and $M_2 = \sum (d - \bar{d})^2$ (two
  passes over the row on chip); the rows of a channel, of equal counts, are then combined
  with Chan et al.'s formula;
- normalization: $y = ((x - K) - \bar{d})\,s + \beta$;
- backward sums: per row $\sum \partial y$ and $\sum \partial y \cdot ((x - K) - \bar{d})$.

A `spatial` whose rows TMA cannot stage (not a multiple of 16 bytes: BatchNorm over
`(batch, features)`, `spatial == 1`, or odd images) runs the Triton kernels.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _mosaic_gpu as m, _row_norm_mosaic_gpu as r
from ._common import F32, Target

plgpu = m.plgpu


def _staging(x, *row_arrays) -> m.Boxes:
    batch, channels, spatial = x.shape
    dtypes = tuple(a.dtype for a in (x, *row_arrays))
    staged = sum(jnp.dtype(d).itemsize for d in dtypes)
    return m.boxes((*dtypes, F32), batch * channels, spatial, staged)


def supported(x, *row_arrays) -> bool:
    """Whether these kernels run `x` (and the same-shaped `row_arrays`)."""
    spatial = x.shape[2]
    if not all(m.supports(a.dtype, spatial) for a in (x, *row_arrays)):
        return False
    return _staging(x, *row_arrays).block_rows > 0


def _per_row(v, batch: int, padded_rows: int):
    """A per-channel `(channels,)` array as one float32 value per `(example, channel)` row,
    padded to whole programs."""
    rows = jnp.tile(v.astype(F32), batch)
    return jnp.pad(rows, (0, padded_rows - rows.shape[0]))


def _body(*refs, boxes, width, n_rows_in, n_tables, n_rows_out, n_sums, period, compute):
    """A program over its rows: stage the `n_rows_in` row arrays, read its rows' values of
    the `n_tables` per-channel arrays, and hand them to `compute(load, tables, tools)`, which
    returns `(row outputs: one function of the box index each, per-row sums)`. The arrays are
    `(channels,)` read in place when `period` (the channels, a multiple of the block's rows:
    a block's rows are consecutive channels of one example), else per-row tables."""
    ins = refs[:n_rows_in]
    tables = refs[n_rows_in : n_rows_in + n_tables]
    outs = refs[n_rows_in + n_tables : n_rows_in + n_tables + n_rows_out]
    sums = refs[n_rows_in + n_tables + n_rows_out : n_rows_in + n_tables + n_rows_out + n_sums]
    scratch = refs[n_rows_in + n_tables + n_rows_out + n_sums :]
    smems, bars = scratch[:n_rows_in], scratch[n_rows_in:]
    i = lax.axis_index("rows")
    rows = pl.ds(i * boxes.block_rows, boxes.block_rows)
    tools = r._box_tools(boxes, width, i * 0)
    for src, dst, bar in zip(ins, smems, bars, strict=True):
        r._copy_in(src, dst, bar, rows, boxes, tools, 0)
    layout = boxes.layout
    channels = (
        rows if period is None else pl.ds(lax.rem(i * boxes.block_rows, period), boxes.block_rows)
    )
    per_row = [
        plgpu.load(t.at[channels], layout=layout.reduce(1), optimized=False).astype(F32)
        for t in tables
    ]
    for bar in bars:
        plgpu.barrier_wait(bar)

    def load(a, k):
        return r._load(smems[a], k, layout)

    row_outs, row_sums = compute(load, per_row, tools)
    for ref, value in zip(sums, row_sums, strict=True):
        plgpu.store(ref.at[rows], value, optimized=False)
    if row_outs:

        @pl.loop(0, boxes.chunks)
        def _(k):
            # Each output is written over the box of the first staged array (x).
            smems[0][k] = row_outs[0](k).astype(smems[0].dtype)

        plgpu.commit_smem()
        r._copy_out(smems[0], outs[0], rows, boxes, tools, 0)
        plgpu.wait_smem_to_gmem(0)


def _call(target, x, more, channel_arrays, compute, *, out_dtype, n_sums, name):
    """Run [`_body`][] over `x` `(batch, channels, spatial)` (and the same-shaped `more`):
    `(y or None, *per-row sums (batch, channels))`."""
    batch, channels, spatial = x.shape
    boxes = _staging(x, *more)
    rows = [a.reshape(1, batch * channels, spatial) for a in (x, *more)]
    rows = [r._pad_rows(a, boxes.block_rows) for a in rows]
    padded = rows[0].shape[1]
    programs = -(-padded // boxes.block_rows)
    table_rows = programs * boxes.block_rows
    # A block's rows are consecutive channels of one example when the blocks tile the
    # channels: the kernel reads the per-channel arrays in place, else one value per row
    # (a copy in XLA: one more launch).
    period = channels if channels % boxes.block_rows == 0 else None
    if period is None:
        tables = [_per_row(v, batch, table_rows) for v in channel_arrays]
    else:
        # In their own dtypes (the bias's may be narrower): the kernel widens them.
        tables = list(channel_arrays)
    out_type = []
    if out_dtype is not None:
        out_type.append(jax.ShapeDtypeStruct(rows[0].shape, out_dtype))
    out_type += [jax.ShapeDtypeStruct((table_rows,), F32)] * n_sums
    box = (boxes.chunks, boxes.block_rows, boxes.cols)
    scratch = [plgpu.SMEM(box, a.dtype) for a in rows] + [r._barrier(boxes)] * len(rows)
    body = functools.partial(
        _body,
        boxes=boxes,
        width=spatial,
        n_rows_in=len(rows),
        n_tables=len(tables),
        n_rows_out=int(out_dtype is not None),
        n_sums=n_sums,
        period=period,
        compute=functools.partial(compute, boxes=boxes, width=spatial),
    )
    run = m.kernel(
        body,
        interpret=target.interpret,
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=(programs,),
        grid_names=("rows",),
        kernel_name=name,
    )
    outs = list(run(*rows, *tables))
    y = outs.pop(0)[0, : batch * channels].reshape(x.shape) if out_dtype is not None else None
    return y, *(s[: batch * channels].reshape(batch, channels) for s in outs)


def _moments(load, tables, tools, *, boxes, width):
    shift, d0 = tables
    bcast, valid = tools.bcast, tools.valid

    def d(k):
        return r._masked((load(0, k) - bcast(shift, [0])) - bcast(d0, [0]), valid(k))

    total = functools.partial(r.row_total, boxes=boxes)

    mean = total(d) * (1.0 / width)
    m2 = total(lambda k: jnp.square(r._masked(d(k) - bcast(mean, [0]), valid(k))))
    return [], [mean, m2]


def moments_on(target: Target, x, shift, d0):
    """`(offset, var)` as `batch_norm._moments_on`: the rows' partials Chan-combined."""
    _, means, m2s = _call(
        target,
        x,
        (),
        (shift, d0),
        _moments,
        out_dtype=None,
        n_sums=2,
        name="eqxnorm_batch_norm_moments",
    )
    offset = jnp.mean(means, axis=0)
    m2 = jnp.sum(m2s, axis=0) + x.shape[2] * jnp.sum(jnp.square(means - offset[None]), axis=0)
    return offset, m2 / (x.shape[0] * x.shape[2])


def _normalize(load, tables, tools, *, boxes, width):
    del boxes, width
    shift, offset, scale, bias = tables
    bcast = tools.bcast

    def y(k):
        centred = (load(0, k) - bcast(shift, [0])) - bcast(offset, [0])
        return centred * bcast(scale, [0]) + bcast(bias, [0])

    return [y], []


def normalize_on(target: Target, x, shift, offset, scale, bias):
    """`((x - shift) - offset)·scale + bias` as `batch_norm._normalize_on`."""
    y, *_ = _call(
        target,
        x,
        (),
        (shift, offset, scale, bias),
        _normalize,
        out_dtype=x.dtype,
        n_sums=0,
        name="eqxnorm_batch_norm_normalize",
    )
    return y


def _sums(load, tables, tools, *, boxes, width):
    del width
    shift, offset = tables
    bcast = tools.bcast

    total = functools.partial(r.row_total, boxes=boxes)

    def dyc(k):
        # Past the row's end dy is zero (TMA fills zeros), so no mask is needed.
        return load(1, k) * ((load(0, k) - bcast(shift, [0])) - bcast(offset, [0]))

    return [], [total(lambda k: load(1, k)), total(dyc)]


def sums_on(target: Target, x, dy, shift, offset):
    """`(Σ dy, Σ dy·((x - shift) - offset))` per channel as `batch_norm._sums_on`."""
    _, sum_dy, sum_dyc = _call(
        target,
        x,
        (dy,),
        (shift, offset),
        _sums,
        out_dtype=None,
        n_sums=2,
        name="eqxnorm_batch_norm_sums",
    )
    return jnp.sum(sum_dy, axis=0), jnp.sum(sum_dyc, axis=0)
