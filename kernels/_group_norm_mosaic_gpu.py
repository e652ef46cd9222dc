r"""The group norms' kernels on Mosaic GPU (Hopper and newer): the same launches, maths and
outputs as `eqxnorm.kernels.group_norm`'s `_forward_on` / `_backward_on`.

In `(batch, channels, spatial)` the channels of one group are contiguous, so an `(example,
group)` slice is one row of `channels/groups × spatial` elements: GroupNorm is the row norms'
kernel (`eqxnorm.kernels._row_norm_mosaic_gpu`) over `(batch·groups, channels/groups ×
spatial)`, with the same staging, statistics and backward. What differs is the affine: the
weight and bias are per channel, i.e. per run of `spatial` elements of a row. The staging's
boxes are chosen to divide `spatial` (`_mosaic_gpu.boxes(segment=spatial)`), so each box lies
in one channel, and the parameters are expanded in XLA to one value per row and box (tables of
`batch·groups × channels/groups × spatial/cols` values: `x.size / cols`, under 1/16 of `x`).
The backward's parameter gradients come back per row and box likewise and are summed over
each channel's boxes in XLA, giving the per-example `(batch, channels)` gradients of the
Triton kernel's contract.
"""

import jax.numpy as jnp

from . import _mosaic_gpu as m, _row_norm_mosaic_gpu as rows_mgpu
from ._common import F32, Target


def _staging(x, groups: int, staged_bytes: int, layout_dtypes=()) -> m.Boxes:
    """The staging of `x` `(batch, channels, spatial)` as `batch·groups` rows."""
    batch, channels, spatial = x.shape
    width = channels // groups * spatial
    return m.boxes((x.dtype, *layout_dtypes), batch * groups, width, staged_bytes, segment=spatial)


def _tables(param, batch: int, groups: int, spatial: int, boxes: m.Boxes):
    """A `(channels,)` or `(batch, channels)` parameter as `(1, batch·groups padded to whole
    programs, boxes.chunks)`: the value of each row's box (box `k` of a row lies in channel
    `k // (spatial / cols)` of the row's group)."""
    channels = param.shape[-1]
    per_channel = jnp.broadcast_to(param, (batch, channels)).astype(F32)
    table = jnp.repeat(per_channel, spatial // boxes.cols, axis=1)
    table = table.reshape(batch * groups, boxes.chunks)
    padded = -(-batch * groups // boxes.block_rows) * boxes.block_rows
    return jnp.pad(table, ((0, padded - batch * groups), (0, 0)))[None]


def forward_supported(groups: int, x, weight, bias) -> bool:
    """Whether [`forward_on`][] runs these operands: TMA-able rows, boxes within channels,
    fitting on chip. (The kernel sees one group of `batch·groups` rows, so fewer rows than a
    program holds are padded, as for one short row-norm input.)"""
    batch, channels, spatial = x.shape
    if not m.supports(x.dtype, channels // groups * spatial) or not m.supports(x.dtype, spatial):
        return False
    return _staging(x, groups, jnp.dtype(x.dtype).itemsize).block_rows > 0


def forward_on(target: Target, x, weight, bias, *, groups: int, eps: float):
    """`(y, shift, offset, rstd)` as `group_norm._forward_on`, with one Mosaic GPU kernel."""
    batch, channels, spatial = x.shape
    boxes = _staging(x, groups, jnp.dtype(x.dtype).itemsize)
    tables = [_tables(p, batch, groups, spatial, boxes) for p in (weight, bias) if p is not None]
    rows = x.reshape(1, batch * groups, -1)
    y, _, *stats = rows_mgpu.forward_call(
        target,
        rows,
        None,
        tables,
        boxes,
        center=True,
        eps=eps,
        name="eqxnorm_group_norm_fwd",
        per_box=True,
        has_weight=weight is not None,
        has_bias=bias is not None,
    )
    return y.reshape(x.shape), *(s.reshape(batch, groups) for s in stats)


def _backward_staging(x, dy, groups: int) -> m.Boxes:
    staged = jnp.dtype(x.dtype).itemsize + jnp.dtype(dy.dtype).itemsize
    return _staging(x, groups, staged, (dy.dtype, F32))


def backward_supported(groups: int, x, weight, dy, shift, offset, rstd) -> bool:
    """Whether [`backward_on`][] runs these operands."""
    del weight, shift, offset, rstd
    batch, channels, spatial = x.shape
    width = channels // groups * spatial
    if not all(m.supports(a.dtype, width) and m.supports(a.dtype, spatial) for a in (x, dy)):
        return False
    return _backward_staging(x, dy, groups).block_rows > 0


def backward_on(target: Target, x, weight, dy, shift, offset, rstd, *, groups, param_grads):
    """`(dx, dweight, dbias)` as `group_norm._backward_on` (per-example float32 parameter
    gradients `(batch, channels)`), with one Mosaic GPU kernel."""
    batch, channels, spatial = x.shape
    boxes = _backward_staging(x, dy, groups)
    table = None if weight is None else _tables(weight, batch, groups, spatial, boxes)
    as_rows = lambda a: a.reshape(1, batch * groups, -1)  # noqa: E731
    dx, _, *partials = rows_mgpu.backward_call(
        target,
        as_rows(x),
        table,
        as_rows(dy),
        None,
        *(s.reshape(1, batch * groups) for s in (shift, offset, rstd)),
        boxes,
        center=True,
        param_grads=param_grads,
        d_dtypes=(jnp.dtype(x.dtype),),
        name="eqxnorm_group_norm_bwd",
        per_box=True,
    )
    per_channel = spatial // boxes.cols

    def channel_sums(table):
        table = table[0, : batch * groups].reshape(batch, channels, per_channel)
        return table.sum(axis=2)

    dw, db = (channel_sums(p) for p in partials) if param_grads else (None, None)
    return dx.reshape(x.shape), dw, db
