r"""Fused Pallas kernels for the row norms: LayerNorm and RMSNorm over the features of each row
of a `(rows, dim)` array (Weight Standardization uses them too, one row per output unit), the
fused residual add + norm of a pre-norm transformer block, and the adaptive (adaLN) norms.

Every kernel works on `(groups, rows, dim)` with parameters per group, `(groups, dim)`: a plain
norm is one group sharing its parameters; an adaptive norm is one group per example, its
modulated parameters $W = \gamma(1 + s)$, $B = \beta(1 + s) + t$ computed in float32 by XLA
(`eqxnorm.kernels.reference.modulation`, whose autodiff turns the kernel's per-group `dW`, `dB`
into the gradients of `scale`, `shift`, `weight` and `bias`). The launch grid is
`(row blocks, groups)`, so one group is the plain norms' one-dimensional launch.

Layers, from the bottom up:

1. `_row_norm_fwd_kernel`, `_row_norm_bwd_kernel`: kernel bodies on refs, with flags for the
   optional residual (forward) and the optional incoming gradient of `h` (backward).
2. `_forward_on`, `_backward_on`: the `pallas_call` wrappers for one compilation target.
3. `_forward`, `_backward`: staged per platform and `custom_vmap`ped, so a `jax.vmap` of a
   one-example module folds the batch into the kernel's rows (shared parameters) or groups
   (per-example parameters) instead of launching one program per row.
4. `_grouped_norm` (through `eqxnorm.kernels._autodiff.norm_with_jvp`) and `_add_norm`: the
   differentiable functions, the forward kernel with a JVP rule whose tangent is a linear
   map transposed by the backward kernel (see `eqxnorm.kernels._autodiff`).
5. `layer_norm`, `rms_norm`, `add_layer_norm`, `add_rms_norm`, `adaptive_layer_norm`,
   `adaptive_rms_norm`: the entry points, with the reference's signatures.

**Output options.** `weight_offset` is added to the weight in float32 before the kernel (a
`(dim,)` operation; the weight's gradient is the offset weight's). `out_dtype` is the dtype
`y` is stored in (the backward reads its cotangent in it). With `fp8_scale` the forward
kernel stores `clip(y · scale)` in a float8 `y` (`eqxnorm.kernels.reference.saturated`, the
store rounding to nearest even) and each row's `max |y|` beside the statistics, reduced to
the amax by XLA (one float32 per row); its derivative, straight through the clip, is the
plain norm's with `γ·s` and `β·s` (`_fp8_linearization`), so the same backward kernel runs,
reading the float8 cotangent.

**Forward.** One pass over HBM when the padded row fits a block (see
`eqxnorm.kernels._common.block_config`): read `x` once, write `y` once, and save the mean
(as `shift + offset`) and `rstd` in float32, one value each per row. Wider rows are read in
chunks twice (statistics, then output), their chunk statistics combined with Chan's update.
The fused add reads `x` and `residual`, sums them in float32 and rounds the sum to
`residual.dtype`: that is `h`, written out, and the statistics and `y` are those of `h` as
stored, so the pair equals the unfused sequence.

**Backward.** With $\hat{x} = (x - \mu)\,r$, $r = (\sigma^2 + \varepsilon)^{-1/2}$ and
$g = \partial L/\partial y \odot \gamma$, over the $n$ features of a row:

$$\frac{\partial L}{\partial x} = r\left(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}
\right) \text{ (LayerNorm)}, \qquad
\frac{\partial L}{\partial x} = r\left(g - \hat{x}\,\overline{g\hat{x}}\right)
\text{ (RMSNorm, } \mu = 0\text{)},$$

$$\frac{\partial L}{\partial \gamma} = \sum_\text{rows} \frac{\partial L}{\partial y}
\odot \hat{x}, \qquad \frac{\partial L}{\partial \beta} = \sum_\text{rows}
\frac{\partial L}{\partial y}.$$

For the fused add, $x$ above is $h$, and the gradient of $h$'s consumers $\partial L/\partial h$
is added in the same pass: $d = \partial\,\mathrm{norm} + \partial L/\partial h$ is both
$\partial L/\partial x$ and $\partial L/\partial \mathrm{residual}$, written once per dtype (one
array when `x` and `residual` share theirs).

The kernel is row-parallel: each program writes `dx` for its rows and its float32 partial sums
of the weight and bias gradients (per group), which are then summed in a fixed order outside
the kernel. There are no atomics, so two runs give bitwise-equal results. The backward keeps
only the normalized input (`x`, or the output `h`), the parameters and the per-row statistics
as residuals.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from .._checking import typechecked
from . import _autodiff, _common as c, _row_norm_mosaic_gpu as _mgpu, reference
from ._common import F32, Target

_SQUEEZED = pl.Squeezed() if hasattr(pl, "Squeezed") else None


def _masks(config: c.BlockConfig, rows: int, width: int, start_col: Any = 0):
    """Row mask `(block_rows, 1)`, column mask `(1, block_cols)` and their product for the
    block of rows `rows = (first row, row count)`, columns starting at `start_col`."""
    br, bc = config.block_rows, config.block_cols
    row_mask = c.iota((br, 1), 0, rows[0]) < rows[1]
    col_mask = c.iota((1, bc), 1, start_col) < width
    return row_mask, col_mask, row_mask & col_mask


def _params(w_ref, b_ref, col_mask, target):
    w = None if w_ref is None else c.load(w_ref, col_mask, target)
    b = None if b_ref is None else c.load(b_ref, col_mask, target)
    return w, b


def _view(config: c.BlockConfig, k: Any):
    """The function from a block ref (or `None`) to its chunk `k`: the ref itself when the row
    is one chunk."""
    if config.chunks == 1:
        return lambda ref: ref
    return lambda ref: None if ref is None else c.chunk(ref, k, config.block_cols)


# --- forward ---------------------------------------------------------------------------------


def _row_norm_fwd_kernel(
    x_ref,
    *refs,
    target,
    config,
    rows,
    width,
    eps,
    center,
    has_residual,
    has_weight,
    has_bias,
    has_scale=False,
):
    r"""$y = ((h - \text{shift}) - \text{offset})\, r\, \gamma + \beta$ for a block of rows,
    saving shift, offset and $r = (\sigma^2 + \varepsilon)^{-1/2}$ per row. $h = x$, or with
    a residual $h = x + \text{residual}$ summed in float32, rounded to the residual's dtype
    and written out: the statistics are those of $h$ as stored. With a scale (FP8 output,
    see [`_quantized`][]) `y` is stored as `clip(y · scale)` and each row's `max |y|` saved."""
    r_ref, w_ref, b_ref, s_ref, h_ref, y_ref, shift_ref, offset_ref, rstd_ref, *amax_ref = (
        c.split_refs(refs, has_residual, has_weight, has_bias, has_scale, has_residual)
    )
    # The program id is read here, outside the loops, where every target supports it.
    rows = (pl.program_id(0) * config.block_rows, rows)
    row_mask = _masks(config, rows, width)[0]

    def chunk_input(k):
        _, col_mask, mask = _masks(config, rows, width, k * config.block_cols)
        view = _view(config, k)
        h = c.load(view(x_ref), mask, target)
        if r_ref is not None:
            h = (h + c.load(view(r_ref), mask, target)).astype(r_ref.dtype).astype(F32)
        return h, col_mask, mask, view

    def write(stats, rstd, h, col_mask, mask, view):
        w, b = _params(view(w_ref), view(b_ref), col_mask, target)
        y = c.affine(c.centred(h, mask, stats) * rstd, w, b)
        amax = None
        if s_ref is not None:
            scale = c.load(view(s_ref), col_mask, target)
            y, amax = _quantized(y, scale, mask, y_ref.dtype)
        c.store(view(y_ref), y, mask, target)
        if h_ref is not None:
            c.store(view(h_ref), h, mask, target)
        return amax

    if config.chunks == 1:
        values = chunk_input(0)
        stats = c.block_moments(values[0], values[2], width, center=center)
        rstd = reference.inverse_std(stats.var, eps)
        amax = write(stats, rstd, *values)
    elif s_ref is not None:
        stats = _chunked_moments(lambda k: chunk_input(k)[::2], config, width, center)
        rstd = reference.inverse_std(stats.var, eps)

        def body(k, amax):
            return jnp.maximum(amax, write(stats, rstd, *chunk_input(k)))

        amax = jax.lax.fori_loop(0, config.chunks, body, jnp.zeros((config.block_rows, 1), F32))
    else:
        stats = _chunked_moments(lambda k: chunk_input(k)[::2], config, width, center)
        rstd = reference.inverse_std(stats.var, eps)

        @pl.loop(0, config.chunks)
        def _(k):
            write(stats, rstd, *chunk_input(k))

    for ref, value in ((shift_ref, stats.shift), (offset_ref, stats.offset), (rstd_ref, rstd)):
        c.store(ref, value, row_mask, target)
    for ref in amax_ref:
        c.store(ref, amax, row_mask, target)


def _quantized(y, scale, mask, dtype):
    """`(clip(y · scale), max |y| per row)` of a block of float32 outputs `y` for a float8
    `dtype`: `eqxnorm.kernels.reference.quantize_fp8`'s saturating clip (the store rounds to
    nearest even), and the row's amax over its valid columns."""
    amax = jnp.max(jnp.where(mask, jnp.abs(y), 0.0), axis=1, keepdims=True)
    return reference.saturated(y, scale, dtype), amax


def _chunked_moments(chunk_values, config, width, center) -> c.Stats:
    """Row statistics over `config.chunks` chunks, `chunk_values(k) -> (values, mask)`: every
    chunk's [`c.Partial`][] of `(x - shift) - d₀` (see [`c.chunked_shift`][]) combined with
    Chan's update, or the sum of squares when not centring."""
    zero = jnp.zeros((config.block_rows, 1), F32)
    if not center:

        def body(k, acc):
            x, _ = chunk_values(k)
            return acc + c.row_sum(x * x * (1.0 / width))

        return c.Stats(zero, zero, jax.lax.fori_loop(0, config.chunks, body, zero))
    x0, mask0 = chunk_values(0)
    shift, d0 = c.chunked_shift(x0, mask0, min(config.block_cols, width))

    def body(k, part):
        x, mask = chunk_values(k)
        return c.chan_combine(part, c.chunk_partial(jnp.where(mask, (x - shift) - d0, 0.0), mask))

    part = jax.lax.fori_loop(0, config.chunks, body, c.Partial(zero, zero, zero))
    return c.Stats(shift, d0 + part.mean, jnp.maximum(part.m2 / width, 0.0))


class _Launch(NamedTuple):
    """A launch over `(groups, rows, width)`: the grid `(row blocks, groups)` and the block
    specs of a row block, its statistics, a group's parameters and a program's partial sums.
    The groups ride the grid's second axis (CUDA allows 65535 there, the first 2³¹ − 1), so
    plain norms keep their one-dimensional launch."""

    config: c.BlockConfig
    grid: tuple[int, int]
    rows: pl.BlockSpec
    stats: pl.BlockSpec
    params: pl.BlockSpec
    partials: pl.BlockSpec


def _launch(target: Target, shape: tuple[int, int, int]) -> _Launch:
    groups, rows, width = shape
    config = c.block_config(target, rows, width)
    cols, br = c.padded(target, width), config.block_rows
    return _Launch(
        config,
        (c.ceil_div(rows, br), groups),
        pl.BlockSpec((_SQUEEZED, br, cols), lambda i, g: (g, i, 0)),
        pl.BlockSpec((_SQUEEZED, br, 1), lambda i, g: (g, i, 0)),
        pl.BlockSpec((_SQUEEZED, 1, cols), lambda i, g: (g, 0, 0)),
        pl.BlockSpec((_SQUEEZED, _SQUEEZED, 1, cols), lambda i, g: (g, i, 0, 0)),
    )


def _center(op: str) -> bool:
    return op.endswith("layer_norm")


def _forward_on(
    target: Target, x, residual, weight, bias, scale=None, *, op: str, eps: float, out_dtype=None
):
    """`(y, h, shift, offset, rstd)` of `x` `(groups, rows, dim)` (plus `residual`, when not
    `None`, then `h` is the rounded sum, else `None`) and per-group parameters `(groups,
    dim)`, with one `pallas_call` on `target`; the statistics are `(groups, rows)` float32.
    `y` is in `out_dtype` (default `x.dtype`); with a `scale` `(groups, dim)` (one value
    broadcast over a row's columns) `y` is the FP8 `clip(y · scale)` and each row's amax
    `(groups, rows)` follows the statistics."""
    groups, rows, width = x.shape
    launch = _launch(target, x.shape)
    rows_in = [a for a in (x, residual) if a is not None]
    params = [p.reshape(groups, 1, width) for p in (weight, bias, scale) if p is not None]
    stat_shape = jax.ShapeDtypeStruct((groups, rows, 1), F32)
    y_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    rows_out = [jax.ShapeDtypeStruct(x.shape, a.dtype) for a in rows_in[1:]]
    rows_out.append(jax.ShapeDtypeStruct(x.shape, c.stored_dtype(target, y_dtype)))
    n_stats = 3 + (scale is not None)
    kernel = functools.partial(
        _row_norm_fwd_kernel,
        target=target,
        config=launch.config,
        rows=rows,
        width=width,
        eps=eps,
        center=_center(op),
        has_residual=residual is not None,
        has_weight=weight is not None,
        has_bias=bias is not None,
        has_scale=scale is not None,
    )
    outs = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows] * len(rows_in) + [launch.params] * len(params),
        out_specs=[launch.rows] * len(rows_out) + [launch.stats] * n_stats,
        out_shape=rows_out + [stat_shape] * n_stats,
        name=f"eqxnorm_{op}_fwd",
    )(*rows_in, *params)
    h = outs[0] if residual is not None else None
    y, *stats = outs[len(rows_out) - 1 :]
    return y.astype(y_dtype), h, *(s[..., 0] for s in stats)


# --- backward --------------------------------------------------------------------------------


def _row_norm_bwd_kernel(
    x_ref,
    dy_ref,
    shift_ref,
    offset_ref,
    rstd_ref,
    *refs,
    target,
    config,
    rows,
    width,
    center,
    has_weight,
    has_dh,
    has_dresidual,
    param_grads,
):
    r"""$\partial x = r(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}) + \partial h$
    (without $\overline{g}$ for RMSNorm; $\partial h$, the gradient of the fused add's `h`,
    when given), $g = \partial y \odot \gamma$, for a block of rows, written to `dx` and to
    `dresidual` when that has another dtype; and the block's float32 column sums of
    $\partial y \odot \hat{x}$ and $\partial y$."""
    w_ref, dh_ref, dx_ref, *refs = c.split_refs(refs, has_weight, has_dh)
    dres_ref, *partial_refs = c.split_refs(refs, has_dresidual)
    rows = (pl.program_id(0) * config.block_rows, rows)
    row_mask, _, _ = _masks(config, rows, width)
    stats = c.Stats(*(c.load(r, row_mask, target) for r in (shift_ref, offset_ref)), None)
    rstd = c.load(rstd_ref, row_mask, target)
    bc = config.block_cols

    def chunk_values(k):
        _, col_mask, mask = _masks(config, rows, width, k * bc)
        view = _view(config, k)
        xhat = c.centred(c.load(view(x_ref), mask, target), mask, stats) * rstd
        dy = c.load(view(dy_ref), mask, target)
        g = dy if w_ref is None else dy * c.load(view(w_ref), col_mask, target)
        return xhat, dy, g, mask, view

    def dx_and_partials(k, xhat, dy, g, mask, view, mean_gx, mean_g):
        dx = (g - mean_g - xhat * mean_gx) * rstd
        if dh_ref is not None:
            dx = dx + c.load(view(dh_ref), mask, target)
        for ref in (dx_ref, dres_ref):
            if ref is not None:
                c.store(view(ref), dx, mask, target)
        if param_grads:
            col_mask = c.iota((1, bc), 1, k * bc) < width
            dw_ref, db_ref = partial_refs
            c.store(view(dw_ref), jnp.sum(dy * xhat, axis=0, keepdims=True), col_mask, target)
            c.store(view(db_ref), jnp.sum(dy, axis=0, keepdims=True), col_mask, target)

    zero = jnp.zeros((config.block_rows, 1), F32)
    if config.chunks == 1:
        xhat, dy, g, mask, view = chunk_values(0)
        sums = (c.row_sum(g * xhat), c.row_sum(g) if center else zero)
        means = tuple(s / width for s in sums)
        dx_and_partials(0, xhat, dy, g, mask, view, *means)
    else:

        def reduce_body(k, sums):
            xhat, _, g, _, _ = chunk_values(k)
            return sums[0] + c.row_sum(g * xhat), sums[1] + (c.row_sum(g) if center else zero)

        sums = jax.lax.fori_loop(0, config.chunks, reduce_body, (zero, zero))
        means = tuple(s / width for s in sums)

        @pl.loop(0, config.chunks)
        def _(k):
            dx_and_partials(k, *chunk_values(k), *means)


def _backward_on(
    target: Target,
    x,
    weight,
    dy,
    dh,
    shift,
    offset,
    rstd,
    *,
    op: str,
    param_grads: bool,
    d_dtypes: tuple[jnp.dtype, ...],
):
    """`(dx, dresidual, dweight, dbias)` of the rows of `x` `(groups, rows, dim)` with one
    `pallas_call` on `target`. The input gradient (plus `dh` when not `None`) is written in
    each of `d_dtypes`: `dx` in the first, `dresidual` in the second (else `None`);
    `dweight`/`dbias` are the float32 sums over each group's rows, `(groups, dim)` (`None`
    unless `param_grads`)."""
    groups, rows, width = x.shape
    launch = _launch(target, x.shape)
    optional = [weight.reshape(groups, 1, width)] if weight is not None else []
    optional_specs = [launch.params] * len(optional)
    if dh is not None:
        optional, optional_specs = [*optional, dh], [*optional_specs, launch.rows]
    out_specs = [launch.rows] * len(d_dtypes)
    out_shape = [jax.ShapeDtypeStruct(x.shape, c.stored_dtype(target, d)) for d in d_dtypes]
    if param_grads:
        out_specs += [launch.partials] * 2
        # `width` columns, not the padded block's: every element is written (masked like x).
        out_shape += [jax.ShapeDtypeStruct((groups, launch.grid[0], 1, width), F32)] * 2
    kernel = functools.partial(
        _row_norm_bwd_kernel,
        target=target,
        config=launch.config,
        rows=rows,
        width=width,
        center=_center(op),
        has_weight=weight is not None,
        has_dh=dh is not None,
        has_dresidual=len(d_dtypes) == 2,
        param_grads=param_grads,
    )
    dx, *outs = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows] * 2 + [launch.stats] * 3 + optional_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name=f"eqxnorm_{op}_bwd",
    )(x, dy, *(s.reshape(groups, rows, 1) for s in (shift, offset, rstd)), *optional)
    dres = outs.pop(0) if len(d_dtypes) == 2 else None
    dw, db = (p.sum(axis=(1, 2)) for p in outs) if param_grads else (None, None)
    return dx, dres, dw, db


# --- staging per platform, batching, differentiation -----------------------------------------


def _batched(axis_size: int, batched: bool, a):
    """`a` with a leading vmapped axis (broadcast when it has none); `None` stays `None`."""
    if a is None or batched:
        return a
    return jnp.broadcast_to(a, (axis_size, *a.shape))


def _into_groups(axis_size: int, batched: bool, a):
    """`(batch, groups, ...)` (or unbatched) -> `(batch · groups, ...)`."""
    return None if a is None else c.fold(axis_size, batched, a)


def _into_rows(axis_size: int, batched: bool, a):
    """`(batch, groups, rows, ...)` (or unbatched) -> `(groups, batch · rows, ...)`: the vmapped
    examples become more rows of each group (a reshape alone for one group)."""
    if a is None:
        return None
    a = jnp.moveaxis(_batched(axis_size, batched, a), 0, 1)
    return a.reshape(a.shape[0], axis_size * a.shape[2], *a.shape[3:])


def _from_rows(axis_size: int, a):
    """The inverse of [`_into_rows`][]."""
    if a is None:
        return None
    a = a.reshape(a.shape[0], axis_size, a.shape[1] // axis_size, *a.shape[2:])
    return jnp.moveaxis(a, 1, 0)


def _all_batched(out):
    return jax.tree.map(lambda _: True, out)


@functools.cache
def _forward(op: str, eps: float, backend: str, out_dtype=None, fp8: bool = False):
    """`(x, residual, weight, bias, scale) -> (y, h, shift, offset, rstd)` on `(groups, rows,
    dim)` (`residual`, `h` and `scale` may be `None`; `y` in `out_dtype`, default `x`'s; with
    `fp8`, a `scale` `(groups, dim)` and each row's amax after the statistics). Under `vmap`
    the batch is folded into the rows of every group when the parameters are shared by the
    examples, else into the groups (each example with its own parameters); nested `vmap`s
    fold one after the other."""

    @custom_vmap
    def forward(x, residual, weight, bias, scale=None):
        options = dict(op=op, eps=eps, out_dtype=out_dtype)
        fn = functools.partial(_forward_on, **options)
        mosaic_gpu = c.MosaicGPU(
            functools.partial(_mgpu.forward_on, **options),
            functools.partial(_mgpu.forward_supported, out_dtype=out_dtype),
        )
        spec = "g r d, g r d, g d, g d, g d -> g r d, g r d, g r, g r, g r"
        rule = c.Rule(spec + ", g r" if fp8 else spec, split="g r")
        args = (x, residual, weight, bias, scale)
        return c.per_platform(fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend)

    @forward.def_vmap
    def _(axis_size, in_batched, x, residual, weight, bias, scale=None):
        args = (x, residual, weight, bias, scale)
        if axis_size == 0:
            return c.empty_batch(forward, in_batched, args)
        if any(in_batched[2:]):
            folded = (_into_groups(axis_size, b, a) for b, a in zip(in_batched, args, strict=True))
            out = tuple(c.unfold(axis_size, o) for o in forward(*folded))
        else:
            x, residual = (
                _into_rows(axis_size, b, a) for b, a in zip(in_batched[:2], args[:2], strict=True)
            )
            out = forward(x, residual, weight, bias, scale)
            out = tuple(_from_rows(axis_size, o) for o in out)
        return out, _all_batched(out)

    return forward


@functools.cache
def _backward(op: str, param_grads: bool, d_dtypes: tuple[jnp.dtype, ...], backend: str):
    """`(x, weight, dy, dh, shift, offset, rstd) -> (dx, dresidual, dweight, dbias)` (see
    [`_backward_on`][]), batching like [`_forward`][]: per-example parameter gradients either
    way (JAX sums them when the parameters are shared)."""

    @custom_vmap
    def backward(x, weight, dy, dh, shift, offset, rstd):
        kwargs = dict(op=op, param_grads=param_grads, d_dtypes=d_dtypes)
        fn = functools.partial(_backward_on, **kwargs)
        mosaic_gpu = c.MosaicGPU(
            functools.partial(_mgpu.backward_on, **kwargs),
            functools.partial(_mgpu.backward_supported, d_dtypes),
        )
        rule = c.Rule("g r d, g d, g r d, g r d, g r, g r, g r -> g r d, g r d, g d, g d", "g r")
        args = (x, weight, dy, dh, shift, offset, rstd)
        return c.per_platform(fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend)

    @backward.def_vmap
    def _(axis_size, in_batched, *args):
        if axis_size == 0:
            return c.empty_batch(backward, in_batched, args)
        if in_batched[1]:
            # Per-example weights: the examples are groups, whose partial sums are per group.
            folded = (_into_groups(axis_size, b, a) for b, a in zip(in_batched, args, strict=True))
            out = tuple(c.unfold(axis_size, o) for o in backward(*folded))
            return out, _all_batched(out)
        weight = args[1]
        x, dy, dh, shift, offset, rstd = (
            _batched(axis_size, in_batched[i], args[i]) for i in (0, 2, 3, 4, 5, 6)
        )
        rows = [_into_rows(axis_size, True, a) for a in (x, dy, dh, shift, offset, rstd)]
        dx, dres, _, _ = _backward(op, False, d_dtypes, backend)(rows[0], weight, *rows[1:])
        out = (_from_rows(axis_size, dx), _from_rows(axis_size, dres), None, None)
        if param_grads:
            # The kernel's partial sums mix examples, so these sums (which XLA fuses into one
            # reduction) come from the saved statistics.
            xhat = ((x.astype(F32) - shift[..., None]) - offset[..., None]) * rstd[..., None]
            dy = dy.astype(F32)
            out = (*out[:2], jnp.sum(dy * xhat, axis=2), jnp.sum(dy, axis=2))
        return out, _all_batched(out)

    return backward


@functools.cache
def _grouped_norm(op: str, eps: float, backend: str, out_dtype=None):
    """The differentiable function `(x, weight, bias) -> y` on `(groups, rows, dim)` with
    parameters `(groups, dim)` (or `None`), on the GPU `backend` (`c.GPU_BACKENDS`); `y` in
    `out_dtype` (default `x.dtype`)."""
    forward = _forward(op, eps, backend, out_dtype)

    def norm_forward(x, weight, bias):
        y, _, *stats = forward(x, None, weight, bias)
        return y, *stats

    layout = _ROWS[_center(op)]
    backward = functools.partial(_norm_backward, op, backend)
    return _autodiff.norm_with_jvp(norm_forward, backward, _same, layout, out_dtype)


def _norm_backward(op: str, backend: str, param_grads: bool):
    """`(x, weight, dy, *stats) -> (dx, dweight, dbias)`: the backward kernel of a row norm
    without a residual (see `eqxnorm.kernels._autodiff.norm_with_jvp`)."""

    def run(x, weight, dy, *stats):
        backward = _backward(op, param_grads, (jnp.dtype(x.dtype),), backend)
        dx, _, dw, db = backward(x, weight, dy, None, *stats)
        return dx, dw, db

    return run


def _same(grad):
    return grad


def _row_layout(center: bool) -> _autodiff.Layout:
    """`(groups, rows, dim)` is the reference's view itself, reduced over `dim`."""
    return _autodiff.Layout(
        axis=2,
        center=center,
        x=_same,
        unview=lambda t, shape: t,
        param=lambda p: None if p is None else p[:, None, :],
        stat=lambda s: s[..., None],
        unstat=lambda s: s[..., 0],
    )


_ROWS = {center: _row_layout(center) for center in (True, False)}


@functools.cache
def _grouped_norm_fp8(op: str, eps: float, backend: str, out_dtype):
    """The differentiable function `(x, weight, bias, scale) -> (y, amax)` on `(groups, rows,
    dim)` with parameters and `scale` `(groups, dim)`: `y` the float8 `out_dtype`
    `clip(norm(x) · scale)`, `amax` `(groups, rows)` each row's `max |norm(x)|`. Its derivative
    is [`_fp8_linearization`][]'s: the plain norm's map with the scaled parameters (the same
    backward kernel, reading the float8 cotangent); `scale` and `amax` have none."""
    forward = _forward(op, eps, backend, out_dtype, fp8=True)
    layout = _ROWS[_center(op)]

    backward = functools.partial(_norm_backward, op, backend)
    apply, transpose = _autodiff.norm_map(backward, _same, layout, out_dtype)

    def rule(primals, tangents):
        x, weight, bias, scale = primals
        y, shift, offset, rstd, amax = outputs(x, weight, bias, scale)
        weight, *t_params = _fp8_linearization(weight, scale, *tangents[1:3])
        residuals, lin = (x, weight, shift, offset, rstd), (tangents[0], *t_params)
        t_y = _autodiff.linear(apply, transpose, apply, residuals, lin)
        t_stats = _autodiff.statistics_tangents(layout, residuals, lin)
        return (y, shift, offset, rstd, amax), (t_y, *t_stats, jnp.zeros_like(amax))

    def norm_forward(x, weight, bias, scale):
        y, _, *rest = forward(x, None, weight, bias, scale)
        return y, *rest

    outputs = _autodiff.with_jvp(norm_forward, rule)
    return lambda x, weight, bias, scale: outputs(x, weight, bias, scale)[::4]


def _fp8_linearization(weight, scale, t_weight, t_bias):
    """`(γ·s, γ̇·s, β̇·s)`: the FP8 output's derivative is straight-through the clip and the
    rounding (`eqxnorm.kernels.reference.quantize_fp8`), `s` times the norm's, which is the
    norm's with its parameters scaled by `s` (`(groups, dim)`; `weight` `None` is 1)."""
    scaled = [None if t is None else t.astype(F32) * scale for t in (t_weight, t_bias)]
    return (scale if weight is None else weight.astype(F32) * scale), *scaled


@functools.cache
def _add_norm(
    op: str, eps: float, x_dtype: jnp.dtype, backend: str, out_dtype=None, fp8: bool = False
):
    """The differentiable function `(x, residual, weight, bias) -> (y, h)` on `(1, rows, dim)`
    with parameters `(1, dim)` (or `None`), for `x` of `x_dtype` (see
    `eqxnorm.kernels._autodiff.norm_with_jvp`, which this extends by `h`). Its residuals are
    `h` (an output), the parameters and the statistics; the backward kernel adds the gradient
    of `h` in its pass, skips reading it when it is a symbolic zero, and does not run when
    `y`'s is. `y` is in `out_dtype` (default `x_dtype`); with `fp8`, the function takes a
    `scale` `(1, dim)` and returns `(y, h, amax)`, as [`_grouped_norm_fp8`][]."""
    forward = _forward(op, eps, backend, out_dtype, fp8)
    layout = _ROWS[_center(op)]
    y_dtype = x_dtype if out_dtype is None else jnp.dtype(out_dtype)

    def apply(residuals, tangents):
        h = residuals[0]
        tx, tr, tw, tb = tangents
        added = [t.astype(F32) for t in (tx, tr) if t is not None]
        t_h = sum(added[1:], added[0]).astype(h.dtype) if added else None
        t_y = _autodiff.tangent(layout, residuals, (t_h, tw, tb))[0]
        t_h = jnp.zeros(h.shape, h.dtype) if t_h is None else t_h
        return t_y.astype(y_dtype), t_h

    def transpose(residuals, cotangents, like):
        h, weight, shift, offset, rstd = residuals
        dy, dh = cotangents
        like_params = like[2:]
        if dy is None:
            # Only `h` is differentiated: y's branch contributes nothing.
            dx, dres = dh.astype(x_dtype), dh
            grads = [None if p is None else jnp.zeros(p.shape, p.dtype) for p in like_params]
        else:
            d_dtypes = (x_dtype,) if h.dtype == x_dtype else (x_dtype, jnp.dtype(h.dtype))
            param_grads = any(p is not None for p in like_params)
            backward = _backward(op, param_grads, d_dtypes, backend)
            dx, dres, *grads = backward(h, weight, dy, dh, shift, offset, rstd)
            dres = dx if dres is None else dres
            grads = [None if p is None else g for p, g in zip(like_params, grads, strict=True)]
        return dx if like[0] is not None else None, dres if like[1] is not None else None, *grads

    def rule(primals, tangents):
        y, h, shift, offset, rstd, *amax = outputs(*primals)
        weight, tangents = primals[2], tuple(tangents[:4])
        if fp8:
            weight, *t_params = _fp8_linearization(weight, primals[4], *tangents[2:])
            tangents = (*tangents[:2], *t_params)
        residuals = (h, weight, shift, offset, rstd)
        t_y, t_h = _autodiff.linear(apply, transpose, apply, residuals, tangents)
        t_stats = _autodiff.statistics_tangents(layout, residuals, (t_h, *tangents[2:]))
        t_amax = [jnp.zeros_like(a) for a in amax]
        return (y, h, shift, offset, rstd, *amax), (t_y, t_h, *t_stats, *t_amax)

    outputs = _autodiff.with_jvp(forward, rule)
    if fp8:
        return lambda x, residual, weight, bias, scale: tuple(
            outputs(x, residual, weight, bias, scale)[i] for i in (0, 1, 5)
        )
    return lambda x, residual, weight, bias: outputs(x, residual, weight, bias)[:2]


# --- entry points ------------------------------------------------------------------------------


def _one_group(param):
    return None if param is None else param[None]


def _out_dtype(out_dtype):
    """`out_dtype` as a hashable dtype (the kernels' caches key on it), `None` staying."""
    return None if out_dtype is None else jnp.dtype(out_dtype)


def _fp8_scale(fp8_scale, x):
    """The FP8 scale as the kernels take it: float32, one value per column of a group
    `(1, dim)` (read like a parameter), carrying no gradient."""
    scale = jax.lax.stop_gradient(jnp.asarray(fp8_scale, F32))
    return jnp.broadcast_to(scale, (1, x.shape[-1]))


def _row_norm(op: str, x, weight, bias, eps: float, backend: str, options=(0.0, None, None)):
    weight_offset, out_dtype, fp8_scale = options
    weight = reference.offset_weight(weight, weight_offset, F32)
    if fp8_scale is not None:
        norm = _grouped_norm_fp8(op, float(eps), backend, _out_dtype(out_dtype))
        y, amax = norm(x[None], _one_group(weight), _one_group(bias), _fp8_scale(fp8_scale, x))
        return y[0], jnp.max(amax)
    norm = _grouped_norm(op, float(eps), backend, _out_dtype(out_dtype))
    return norm(x[None], _one_group(weight), _one_group(bias))[0]


def _add_row_norm(
    op: str, x, residual, weight, bias, eps: float, backend: str, options=(0.0, None, None)
):
    weight_offset, out_dtype, fp8_scale = options
    if jnp.dtype(residual.dtype) == jnp.float64:
        # Promised a float64 sum, as the kernels' float32 could not give.
        return getattr(reference, op)(
            x,
            residual,
            weight,
            bias,
            eps=eps,
            weight_offset=weight_offset,
            out_dtype=out_dtype,
            fp8_scale=fp8_scale,
        )
    weight = reference.offset_weight(weight, weight_offset, F32)
    fp8 = fp8_scale is not None
    add_norm = _add_norm(op, float(eps), jnp.dtype(x.dtype), backend, _out_dtype(out_dtype), fp8)
    args = (x[None], residual[None], _one_group(weight), _one_group(bias))
    if fp8:
        y, h, amax = add_norm(*args, _fp8_scale(fp8_scale, x))
        return y[0], h[0], jnp.max(amax)
    y, h = add_norm(*args)
    return y[0], h[0]


def _adaptive_row_norm(
    op: str, x, scale, shift, weight, bias, eps: float, backend: str, options=(0.0, None)
):
    weight_offset, out_dtype = options
    weight = reference.offset_weight(weight, weight_offset, F32)
    modulated = reference.modulation(scale, shift, weight, bias, F32)
    return _grouped_norm(op, float(eps), backend, _out_dtype(out_dtype))(x, *modulated)


@typechecked()
def layer_norm(
    x: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
    backend: str = "auto",
) -> Float[Array, "rows dim"] | tuple[Float[Array, "rows dim"], Float[Array, ""]]:
    r"""LayerNorm of each row as a fused Pallas kernel; the same maths and signature as
    `eqxnorm.kernels.reference.layer_norm`:
    $y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}}\gamma + \beta$.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.
    - `weight_offset`, `out_dtype`, `fp8_scale`: as for the reference (the offset added to
      `weight` in float32 before the kernel, `y` stored in `out_dtype`; with `fp8_scale`, the
      FP8 output and its amax from the same kernel).
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(rows, dim)` in `out_dtype` (default `x.dtype`); with `fp8_scale`, `(y, amax)`.
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _row_norm("layer_norm", x, weight, bias, eps, backend, options)


@typechecked()
def rms_norm(
    x: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
    backend: str = "auto",
) -> Float[Array, "rows dim"] | tuple[Float[Array, "rows dim"], Float[Array, ""]]:
    r"""RMSNorm of each row as a fused Pallas kernel; the same maths and signature as
    `eqxnorm.kernels.reference.rms_norm`:
    $y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \varepsilon}}\gamma + \beta$.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `weight_offset`, `out_dtype`: as for `layer_norm`.
    - `backend`: the GPU kernels, as for `layer_norm`.

    **Returns:**

    `(rows, dim)` in `out_dtype` (default `x.dtype`); with `fp8_scale`, `(y, amax)`.
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _row_norm("rms_norm", x, weight, bias, eps, backend, options)


@typechecked()
def add_layer_norm(
    x: Float[Array, "rows dim"],
    residual: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
    backend: str = "auto",
) -> (
    tuple[Float[Array, "rows dim"], Float[Array, "rows dim"]]
    | tuple[Float[Array, "rows dim"], Float[Array, "rows dim"], Float[Array, ""]]
):
    r"""Residual add then LayerNorm in one fused Pallas kernel (one pass forward, one pass
    backward); the same maths and signature as `eqxnorm.kernels.reference.add_layer_norm`:
    $h = x + r$, $y = \frac{h - \mathbb{E}[h]}{\sqrt{\mathrm{Var}[h] + \varepsilon}}\gamma +
    \beta$.

    **Arguments:**

    - `x`: `(rows, dim)`, the block's output.
    - `residual`: `(rows, dim)`, the residual stream (may have another floating dtype).
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.
    - `weight_offset`, `out_dtype`: as for the reference (the offset added to `weight` in
      float32 before the kernel, `y` stored in `out_dtype`).
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(y, h)`: `y` `(rows, dim)` in `out_dtype` (default `x.dtype`), the norm of `h` as
    stored; `h` `(rows, dim)`, summed in float32 and stored in `residual.dtype` (a float64
    residual runs the reference, which sums in float64); with `fp8_scale`, `(y, h, amax)`.
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _add_row_norm("add_layer_norm", x, residual, weight, bias, eps, backend, options)


@typechecked()
def add_rms_norm(
    x: Float[Array, "rows dim"],
    residual: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
    backend: str = "auto",
) -> (
    tuple[Float[Array, "rows dim"], Float[Array, "rows dim"]]
    | tuple[Float[Array, "rows dim"], Float[Array, "rows dim"], Float[Array, ""]]
):
    r"""Residual add then RMSNorm in one fused Pallas kernel; the same maths and signature as
    `eqxnorm.kernels.reference.add_rms_norm`: $h = x + r$,
    $y = h / \sqrt{\overline{h^2} + \varepsilon} \cdot \gamma + \beta$.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `residual`: `(rows, dim)`, the residual stream.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `weight_offset`, `out_dtype`: as for `layer_norm`.
    - `backend`: the GPU kernels, as for `layer_norm`.

    **Returns:**

    `(y, h)` as for [`add_layer_norm`][]: `y` in `out_dtype`, `h` in `residual.dtype`; with
    `fp8_scale`, `(y, h, amax)`.
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _add_row_norm("add_rms_norm", x, residual, weight, bias, eps, backend, options)


@typechecked()
def adaptive_layer_norm(
    x: Float[Array, "groups rows dim"],
    scale: Float[Array, "groups dim"],
    shift: Float[Array, "groups dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    backend: str = "auto",
) -> Float[Array, "groups rows dim"]:
    r"""Adaptive LayerNorm (adaLN, FiLM) as a fused Pallas kernel with per-group parameters;
    the same maths and signature as `eqxnorm.kernels.reference.adaptive_layer_norm`:
    $y = (\hat{x}\gamma + \beta)(1 + s_g) + t_g = \hat{x} W_g + B_g$, the modulated
    parameters computed in float32 outside the kernel.

    **Arguments:**

    - `x`: `(groups, rows, dim)`.
    - `scale`, `shift`: `(groups, dim)`, $s$ and $t$.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.
    - `weight_offset`, `out_dtype`: as for the reference (the offset added to `weight` in
      float32 before the kernel, `y` stored in `out_dtype`).
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(groups, rows, dim)` in `out_dtype` (default `x.dtype`).
    """
    options = (weight_offset, out_dtype)
    return _adaptive_row_norm(
        "adaptive_layer_norm", x, scale, shift, weight, bias, eps, backend, options
    )


@typechecked()
def adaptive_rms_norm(
    x: Float[Array, "groups rows dim"],
    scale: Float[Array, "groups dim"],
    shift: Float[Array, "groups dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    backend: str = "auto",
) -> Float[Array, "groups rows dim"]:
    r"""Adaptive RMSNorm as a fused Pallas kernel with per-group parameters; the same maths
    and signature as `eqxnorm.kernels.reference.adaptive_rms_norm`:
    $y = (\hat{x}\gamma + \beta)(1 + s_g) + t_g$ with $\hat{x} = x / \sqrt{\overline{x^2} +
    \varepsilon}$.

    **Arguments:**

    - `x`: `(groups, rows, dim)`.
    - `scale`, `shift`: `(groups, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `weight_offset`, `out_dtype`: as for `layer_norm`.
    - `backend`: the GPU kernels, as for `layer_norm`.

    **Returns:**

    `(groups, rows, dim)` in `out_dtype` (default `x.dtype`).
    """
    options = (weight_offset, out_dtype)
    return _adaptive_row_norm(
        "adaptive_rms_norm", x, scale, shift, weight, bias, eps, backend, options
    )


__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "adaptive_layer_norm",
    "adaptive_rms_norm",
]
