r"""Fused Pallas kernels for the row norms: LayerNorm and RMSNorm over the features of each row
of a `(rows, dim)` array (Weight Standardization uses them too, one row per output unit).

Layers, from the bottom up:

1. `_row_norm_fwd_kernel`, `_row_norm_bwd_kernel`: kernel bodies on refs.
2. `_forward_on`, `_backward_on`: the `pallas_call` wrappers for one compilation target.
3. `_forward`, `_backward`: staged per platform and `custom_vmap`ped, so a `jax.vmap` of a
   one-example module folds the batch into the kernel's rows instead of launching one
   program per row.
4. `_row_norm`: the `jax.custom_vjp` function wiring forward and backward.
5. `layer_norm`, `rms_norm`: the entry points, with the reference's signatures.

**Forward.** One pass over HBM when the padded row fits a block (see
`eqxnorm.kernels._common.block_config`): read `x` once, write `y` once, and save the mean
(as `shift + offset`) and `rstd` in float32, one value each per row. Wider rows are read in
chunks twice (statistics, then output), their chunk statistics combined with Chan's update.

**Backward.** With $\hat{x} = (x - \mu)\,r$, $r = (\sigma^2 + \varepsilon)^{-1/2}$ and
$g = \partial L/\partial y \odot \gamma$, over the $n$ features of a row:

$$\frac{\partial L}{\partial x} = r\left(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}
\right) \text{ (LayerNorm)}, \qquad
\frac{\partial L}{\partial x} = r\left(g - \hat{x}\,\overline{g\hat{x}}\right)
\text{ (RMSNorm, } \mu = 0\text{)},$$

$$\frac{\partial L}{\partial \gamma} = \sum_\text{rows} \frac{\partial L}{\partial y}
\odot \hat{x}, \qquad \frac{\partial L}{\partial \beta} = \sum_\text{rows}
\frac{\partial L}{\partial y}.$$

The kernel is row-parallel: each program writes `dx` for its rows and its float32 partial sums
of the weight and bias gradients, which are then summed in a fixed order outside the kernel.
There are no atomics, so two runs give bitwise-equal results. The backward keeps only `x`,
the parameters and the per-row statistics as residuals.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from .._checking import typechecked
from . import _common as c
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


# --- forward ---------------------------------------------------------------------------------


def _row_norm_fwd_kernel(
    x_ref, *refs, target, config, rows, width, eps, center, has_weight, has_bias
):
    r"""$y = ((x - \text{shift}) - \text{offset})\, r\, \gamma + \beta$ for a block of rows,
    saving shift, offset and $r = (\sigma^2 + \varepsilon)^{-1/2}$ per row."""
    w_ref, b_ref, y_ref, shift_ref, offset_ref, rstd_ref = c.split_refs(refs, has_weight, has_bias)
    # The program id is read here, outside the loops, where every target supports it.
    rows = (pl.program_id(0) * config.block_rows, rows)
    row_mask, col_mask, mask = _masks(config, rows, width)
    if config.chunks == 1:
        x = c.load(x_ref, mask, target)
        stats = c.block_moments(x, mask, width, center=center)
        rstd = jax.lax.rsqrt(stats.var + eps)
        w, b = _params(w_ref, b_ref, col_mask, target)
        c.store(y_ref, c.affine(c.centred(x, mask, stats) * rstd, w, b), mask, target)
    else:
        stats = _chunked_moments(x_ref, config, rows, width, center, target)
        rstd = jax.lax.rsqrt(stats.var + eps)

        @pl.loop(0, config.chunks)
        def _(k):
            start = k * config.block_cols
            _, col_mask, mask = _masks(config, rows, width, start)
            x = c.load(c.chunk(x_ref, k, config.block_cols), mask, target)
            w, b = _params(
                *(None if r is None else c.chunk(r, k, config.block_cols) for r in (w_ref, b_ref)),
                col_mask,
                target,
            )
            y = c.affine(c.centred(x, mask, stats) * rstd, w, b)
            c.store(c.chunk(y_ref, k, config.block_cols), y, mask, target)

    for ref, value in ((shift_ref, stats.shift), (offset_ref, stats.offset), (rstd_ref, rstd)):
        c.store(ref, value, row_mask, target)


def _chunked_moments(x_ref, config, rows, width, center, target) -> c.Stats:
    """Row statistics over `config.chunks` chunks: every chunk's [`c.Partial`][] of `x -
    shift` (shift: the first chunk's mean) combined with Chan's update, or the sum of
    squares when not centring."""
    bc = config.block_cols

    def chunk_values(k):
        _, _, mask = _masks(config, rows, width, k * bc)
        return c.load(c.chunk(x_ref, k, bc), mask, target), mask

    zero = jnp.zeros((config.block_rows, 1), F32)
    if not center:

        def body(k, acc):
            x, _ = chunk_values(k)
            return acc + c.row_sum(x * x)

        return c.Stats(zero, zero, jax.lax.fori_loop(0, config.chunks, body, zero) / width)
    x0, _ = chunk_values(0)
    shift = c.row_sum(x0) / min(bc, width)

    def body(k, part):
        x, mask = chunk_values(k)
        return c.chan_combine(part, c.chunk_partial(jnp.where(mask, x - shift, 0.0), mask))

    part = jax.lax.fori_loop(0, config.chunks, body, c.Partial(zero, zero, zero))
    return c.Stats(shift, part.mean, jnp.maximum(part.m2 / width, 0.0))


def _forward_on(target: Target, x, weight, bias, *, eps: float, center: bool):
    """`(y, shift, offset, rstd)` of the rows of `x` with one `pallas_call` on `target`;
    the statistics are `(rows,)` float32."""
    rows, width = x.shape
    config = c.block_config(target, rows, width)
    cols = c.padded(target, width)
    params = [p.reshape(1, width) for p in (weight, bias) if p is not None]
    row_block = pl.BlockSpec((config.block_rows, cols), lambda i: (i, 0))
    stat_block = pl.BlockSpec((config.block_rows, 1), lambda i: (i, 0))
    stat_shape = jax.ShapeDtypeStruct((rows, 1), F32)
    kernel = functools.partial(
        _row_norm_fwd_kernel,
        target=target,
        config=config,
        rows=rows,
        width=width,
        eps=eps,
        center=center,
        has_weight=weight is not None,
        has_bias=bias is not None,
    )
    y, shift, offset, rstd = c.pallas_call(
        kernel,
        target,
        config,
        grid=(c.ceil_div(rows, config.block_rows),),
        in_specs=[row_block] + [pl.BlockSpec((1, cols), lambda i: (0, 0))] * len(params),
        out_specs=[row_block, stat_block, stat_block, stat_block],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), stat_shape, stat_shape, stat_shape],
        name="eqxnorm_" + ("layer" if center else "rms") + "_norm_fwd",
    )(x, *params)
    return y, shift[:, 0], offset[:, 0], rstd[:, 0]


# --- backward --------------------------------------------------------------------------------


def _row_norm_bwd_kernel(
    x_ref, *refs, target, config, rows, width, center, has_weight, param_grads
):
    r"""$\partial x = r(g - \overline{g} - \hat{x}\,\overline{g\hat{x}})$ (without
    $\overline{g}$ for RMSNorm), $g = \partial y \odot \gamma$, for a block of rows, and the
    block's float32 column sums of $\partial y \odot \hat{x}$ and $\partial y$."""
    w_ref, dy_ref, shift_ref, offset_ref, rstd_ref, dx_ref, *partial_refs = c.split_refs(
        refs, has_weight
    )
    rows = (pl.program_id(0) * config.block_rows, rows)
    row_mask, _, _ = _masks(config, rows, width)
    stats = c.Stats(*(c.load(r, row_mask, target) for r in (shift_ref, offset_ref)), None)
    rstd = c.load(rstd_ref, row_mask, target)
    bc = config.block_cols

    def chunk_values(k):
        _, col_mask, mask = _masks(config, rows, width, k * bc)
        view = (lambda r: r) if config.chunks == 1 else (lambda r: c.chunk(r, k, bc))
        xhat = c.centred(c.load(view(x_ref), mask, target), mask, stats) * rstd
        dy = c.load(view(dy_ref), mask, target)
        g = dy if w_ref is None else dy * c.load(view(w_ref), col_mask, target)
        return xhat, dy, g, mask, view

    def dx_and_partials(k, xhat, dy, g, mask, view, mean_gx, mean_g):
        dx = (g - mean_g - xhat * mean_gx) * rstd
        c.store(view(dx_ref), dx, mask, target)
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
    target: Target, x, weight, dy, shift, offset, rstd, *, center: bool, param_grads: bool
):
    """`(dx, dweight, dbias)` with one `pallas_call` on `target`; `dweight`/`dbias` are the
    float32 sums over rows (`None` unless `param_grads`)."""
    rows, width = x.shape
    config = c.block_config(target, rows, width)
    cols = c.padded(target, width)
    blocks = c.ceil_div(rows, config.block_rows)
    row_block = pl.BlockSpec((config.block_rows, cols), lambda i: (i, 0))
    stat_block = pl.BlockSpec((config.block_rows, 1), lambda i: (i, 0))
    params = [] if weight is None else [weight.reshape(1, width)]
    out_specs = [row_block]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if param_grads:
        out_specs += [pl.BlockSpec((_SQUEEZED, 1, cols), lambda i: (i, 0, 0))] * 2
        out_shape += [jax.ShapeDtypeStruct((blocks, 1, cols), F32)] * 2
    kernel = functools.partial(
        _row_norm_bwd_kernel,
        target=target,
        config=config,
        rows=rows,
        width=width,
        center=center,
        has_weight=weight is not None,
        param_grads=param_grads,
    )
    dx, *partials = c.pallas_call(
        kernel,
        target,
        config,
        grid=(blocks,),
        in_specs=[row_block]
        + [pl.BlockSpec((1, cols), lambda i: (0, 0))] * len(params)
        + [row_block]
        + [stat_block] * 3,
        out_specs=out_specs,
        out_shape=out_shape,
        name="eqxnorm_" + ("layer" if center else "rms") + "_norm_bwd",
    )(x, *params, dy, *(s.reshape(rows, 1) for s in (shift, offset, rstd)))
    dw, db = (p.sum(axis=(0, 1))[:width] for p in partials) if param_grads else (None, None)
    return dx, dw, db


# --- staging per platform, batching, differentiation -----------------------------------------


@functools.cache
def _forward(eps: float, center: bool):
    """`(x, weight, bias) -> (y, shift, offset, rstd)`, batching by folding into rows."""

    def forward(x, weight, bias):
        fn = functools.partial(_forward_on, eps=eps, center=center)
        return c.per_platform(fn, x, weight, bias)

    return c.folding_forward(forward)


@functools.cache
def _backward(center: bool, param_grads: bool):
    """`(x, weight, dy, shift, offset, rstd) -> (dx, dweight, dbias)` (float32 parameter
    gradients, `None` unless `param_grads`), batching by folding into rows."""

    @custom_vmap
    def backward(x, weight, dy, shift, offset, rstd):
        fn = functools.partial(_backward_on, center=center, param_grads=param_grads)
        return c.per_platform(fn, x, weight, dy, shift, offset, rstd)

    @backward.def_vmap
    def _(axis_size, in_batched, x, weight, dy, shift, offset, rstd):
        out_batched = (True, True if param_grads else None, True if param_grads else None)
        if in_batched[1]:
            axes = tuple(0 if b else None for b in in_batched)
            return jax.vmap(backward.fun, in_axes=axes)(x, weight, dy, shift, offset, rstd), (
                out_batched
            )
        rows_like = (x, dy, shift, offset, rstd)
        flags = (in_batched[0], *in_batched[2:])
        folded = [c.fold(axis_size, b, a) for b, a in zip(flags, rows_like, strict=True)]
        dx, _, _ = _backward(center, False)(folded[0], weight, *folded[1:])
        dx = c.unfold(axis_size, dx)
        if not param_grads:
            return (dx, None, None), out_batched
        # Per-example parameter gradients: the kernel's partial sums mix examples, so these
        # sums (which XLA fuses into one reduction) come from the saved statistics.
        x, dy, shift, offset, rstd = (c.unfold(axis_size, a) for a in folded)
        xhat = ((x.astype(F32) - shift[..., None]) - offset[..., None]) * rstd[..., None]
        dy = dy.astype(F32)
        return (dx, jnp.sum(dy * xhat, axis=1), jnp.sum(dy, axis=1)), out_batched

    return backward


@functools.cache
def _row_norm(eps: float, center: bool):
    """The `custom_vjp` function `(x, weight, bias) -> y`."""
    return c.norm_with_vjp(_forward(eps, center), functools.partial(_backward, center), _same)


def _same(grad):
    return grad


# --- entry points ------------------------------------------------------------------------------


@typechecked()
def layer_norm(
    x: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
) -> Float[Array, "rows dim"]:
    r"""LayerNorm of each row as a fused Pallas kernel; the same maths and signature as
    `eqxnorm.kernels.reference.layer_norm`:
    $y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}}\gamma + \beta$.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    return _row_norm(float(eps), True)(x, weight, bias)


@typechecked()
def rms_norm(
    x: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
) -> Float[Array, "rows dim"]:
    r"""RMSNorm of each row as a fused Pallas kernel; the same maths and signature as
    `eqxnorm.kernels.reference.rms_norm`:
    $y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \varepsilon}}\gamma + \beta$.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    return _row_norm(float(eps), False)(x, weight, bias)


__all__ = ["layer_norm", "rms_norm"]
