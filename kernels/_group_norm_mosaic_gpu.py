r"""The group norms' kernels on Mosaic GPU (Hopper and newer): the same launches, maths and
outputs as `eqxnorm.kernels.group_norm`'s `_forward_on` / `_backward_on`.

In `(batch, channels, spatial)` the channels of one group are contiguous, so an `(example,
group)` slice is one row of `channels/groups × spatial` elements: GroupNorm is the row norms'
kernel (`eqxnorm.kernels._row_norm_mosaic_gpu`) over `(batch·groups, channels/groups ×
spatial)`, with the same staging, statistics and backward. What differs is the affine: the
weight and bias are per channel, i.e. per run of `spatial` elements of a row. The staging's
boxes are chosen to divide `spatial` (`_mosaic_gpu.boxes(segment=spatial)`), so each box lies
in one channel, and a box reads its row's channel's value from the parameter in place
(`(groups, channels/groups)` per channel, `(batch·groups, channels/groups)` per example: free
reshapes; [`_tables`][] copies only for blocks that straddle those). The backward sums each
channel's boxes in registers and stores the parameter gradients per row and channel: the
per-example `(batch, channels)` gradients of the Triton kernel's contract, with no XLA
launch beside the kernels but the sum over the examples of per-channel parameters.
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
    """A `(channels,)` or `(batch, channels)` parameter as a table the kernel reads in place
    (`rows_mgpu.PerBox`: one value per row and box, a channel's `spatial / cols` boxes
    sharing one): `(1, groups, channels/groups)` (a reshape, no copy) for per-channel
    parameters when a block's rows lie in one period of the groups (`groups % block_rows
    == 0`), `(1, batch·groups, channels/groups)` for per-example ones when the blocks tile the
    rows; else (a copy in XLA) per row, padded to whole programs."""
    channels = param.shape[-1]
    per_box = rows_mgpu.PerBox(spatial // boxes.cols)
    br = boxes.block_rows
    if param.ndim == 1 and groups % br == 0:
        return param.reshape(1, groups, channels // groups), per_box._replace(period=groups)
    if param.ndim == 2 and batch * groups % br == 0:
        return param.reshape(1, batch * groups, channels // groups), per_box
    table = jnp.broadcast_to(param, (batch, channels)).reshape(batch * groups, -1)
    padded = -(-batch * groups // br) * br
    return jnp.pad(table, ((0, padded - batch * groups), (0, 0)))[None], per_box


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
    # Weight and bias have one shape: one table layout.
    per_box = tables[0][1] if tables else rows_mgpu.PerBox(1)
    rows = x.reshape(1, batch * groups, -1)
    y, _, *stats = rows_mgpu.forward_call(
        target,
        rows,
        None,
        [t for t, _ in tables],
        boxes,
        center=True,
        eps=eps,
        name="eqxnorm_group_norm_fwd",
        per_box=per_box,
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
    per_box = rows_mgpu.PerBox(spatial // boxes.cols)
    table = None
    if weight is not None:
        table, per_box = _tables(weight, batch, groups, spatial, boxes)
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
        per_box=per_box,
    )
    # Per row and channel of its group: per example and channel.
    rows = slice(None, batch * groups)
    per_example = (partials[0][0, s, rows].reshape(batch, channels) for s in (0, 1))
    dw, db = per_example if param_grads else (None, None)
    return dx.reshape(x.shape), dw, db
