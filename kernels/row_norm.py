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

On Triton the backward is persistent: a grid of about one program per SM per group
(`eqxnorm.kernels._common.persistent_config`), each looping over its row blocks
(`_program_blocks`), writing `dx` for their rows and summing their float32 partial sums
of the weight and bias gradients on chip (in the loop's carry; a chunked row's in the
program's own partial row, read, added to and written back), so that the partials are
`programs × dim` rather than one row per block; on Mosaic TPU each program has one block.
The partials are then summed in a fixed order outside the kernel, both gradients in one XLA
reduction. There are no atomics, so two runs give bitwise-equal results. The backward keeps
only the normalized input (`x`, or the output `h`), the parameters and the per-row statistics
as residuals.
"""

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from .._checking import typechecked
from . import _autodiff, _common as c, _row_norm_mosaic_gpu as _mgpu, reference
from ._common import F32, Target

_SQUEEZED = pl.Squeezed() if hasattr(pl, "Squeezed") else None

# Whether `backend="auto"` runs the row norms' Mosaic GPU kernels on cuda. Not: on an H200
# (JAX 0.12, bf16, 4096 rows, a LayerNorm / RMSNorm training step, the tuner's medians, tuned)
# the Triton kernels took 0.115-0.131 / 0.115-0.130 ms at 1024 columns (two runs) and 0.29 /
# 0.25 ms at 8192 where Mosaic GPU's took 0.137-0.150 / 0.156-0.170 and 1.17 / 1.14 (XLA
# 0.18-0.20 / 0.24 and 0.71 / 0.51), and
# the benchmark's adaptive, add + norm and FP8 forms were as slow on Mosaic GPU at 8192 and
# 65536. They stay one `backend="mosaic_gpu"` away (the group norms' run by default, faster
# than XLA there). See benchmarks/results/nvidia-h200/. Where the user's tuning cache (or the
# measurements shipped) timed a call on both backends, the faster runs instead
# (`_common._takes_mosaic_gpu`).
MOSAIC_GPU_AUTO = False


@contextlib.contextmanager
def taking_mosaic_gpu(take: bool = True):
    """Within it, `impl="auto"` takes the row norms' Mosaic GPU kernels where they run (with
    `take`; else not, the default): [`MOSAIC_GPU_AUTO`][] set, and this module's cached
    differentiable functions built anew on entry and exit (the flag is read when a kernel call
    is traced, and JAX keeps the traces of a function it has seen). For the tests and the
    deviceless check of the Mosaic GPU kernels."""
    global MOSAIC_GPU_AUTO
    before = MOSAIC_GPU_AUTO
    _rebuild()
    MOSAIC_GPU_AUTO = take
    try:
        yield
    finally:
        MOSAIC_GPU_AUTO = before
        _rebuild()


def _mosaic_gpu(launch, supported) -> c.MosaicGPU:
    """A row norm's Mosaic GPU launch, which `impl="auto"` takes as [`MOSAIC_GPU_AUTO`][] says."""
    return c.MosaicGPU(launch, supported, auto=MOSAIC_GPU_AUTO)


def _rebuild() -> None:
    """Empty this module's `functools.cache`s of differentiable functions."""
    for value in list(globals().values()):
        if getattr(value, "__module__", None) == __name__ and hasattr(value, "cache_clear"):
            value.cache_clear()


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
    row_block=None,
    has_scale=False,
    weight_offset=0.0,
):
    r"""$y = ((h - \text{shift}) - \text{offset})\, r\, \gamma + \beta$ for a block of rows,
    saving shift, offset and $r = (\sigma^2 + \varepsilon)^{-1/2}$ per row. $h = x$, or with
    a residual $h = x + \text{residual}$ summed in float32, rounded to the residual's dtype
    and written out: the statistics are those of $h$ as stored. With a scale (FP8 output,
    see [`_quantized`][]) `y` is stored as `clip(y · scale)` and each row's `max |y|` saved.
    With a `weight_offset`, $\gamma$ is the weight read plus it (in float32)."""
    r_ref, w_ref, b_ref, s_ref, h_ref, y_ref, shift_ref, offset_ref, rstd_ref, *amax_ref = (
        c.split_refs(refs, has_residual, has_weight, has_bias, has_scale, has_residual)
    )
    # The program id is read here, outside the loops, where every target supports it (or
    # given, `row_block`, by a caller that runs this body under a condition).
    row_block = pl.program_id(0) if row_block is None else row_block
    rows = (row_block * config.block_rows, rows)
    row_mask = _masks(config, rows, width)[0]

    def read(view, mask):
        h = c.load(view(x_ref), mask, target)
        if r_ref is not None:
            h = (h + c.load(view(r_ref), mask, target)).astype(r_ref.dtype).astype(F32)
        return h

    def chunk_input(k):
        _, col_mask, mask = _masks(config, rows, width, k * config.block_cols)
        view = _view(config, k)
        return read(view, mask), col_mask, mask, view

    # The FP8 scale, the group's one value, read in place.
    scale = None if s_ref is None else c.load(s_ref, jnp.ones((1, 1), bool), target)

    def write(stats, rstd, h, col_mask, mask, view):
        w, b = _params(view(w_ref), view(b_ref), col_mask, target)
        w = reference.offset_weight(w, weight_offset, F32)
        y = c.affine(c.centred(h, mask, stats) * rstd, w, b)
        amax = None
        if scale is not None:
            y, amax = _quantized(y, scale, mask, y_ref.dtype)
        c.store(view(y_ref), y, mask, target)
        if h_ref is not None:
            c.store(view(h_ref), h, mask, target)
        return amax

    # The row's first element read on its own (two reductions, not three), but for a whole
    # row wider than `TARGET_BLOCK_ELEMENTS`: there XLA's compile of adaLN's bf16 forward over
    # 8192 columns spills with it (deviceless H200, JAX 0.10.2; 5 barriers without it).
    whole_wide = config.block_cols > c.TARGET_BLOCK_ELEMENTS
    first = c.row_start(target, lambda v: read(v, row_mask)) if center and not whole_wide else None
    if config.chunks == 1:
        values = chunk_input(0)
        stats = c.block_moments(values[0], values[2], width, center=center, first=first)
        rstd = reference.inverse_std(stats.var, eps)
        amax = write(stats, rstd, *values)
    elif s_ref is not None:
        stats = _chunked_moments(lambda k: chunk_input(k)[::2], config, width, center, first)
        rstd = reference.inverse_std(stats.var, eps)

        def body(k, amax):
            return jnp.maximum(amax, write(stats, rstd, *chunk_input(k)))

        amax = jax.lax.fori_loop(0, config.chunks, body, jnp.zeros((config.block_rows, 1), F32))
    else:
        stats = _chunked_moments(lambda k: chunk_input(k)[::2], config, width, center, first)
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


def _chunked_moments(chunk_values, config, width, center, first=None) -> c.Stats:
    """Row statistics over `config.chunks` chunks, `chunk_values(k) -> (values, mask)`: every
    chunk's [`c.Partial`][] of `x - s`, `s` the row's first element (`first`, else found in
    chunk 0), combined with Chan's update, so the mean is `s + offset` and a constant row's
    partials are exact zeros (see [`c.block_moments`][]); or the sum of squares when not
    centring. A chunk's valid columns are counted from its index, not reduced."""
    zero = jnp.zeros((config.block_rows, 1), F32)
    if not center:

        def body(k, acc):
            x, _ = chunk_values(k)
            return acc + c.row_sum(x * x * (1.0 / width))

        return c.Stats(zero, zero, jax.lax.fori_loop(0, config.chunks, body, zero))
    if first is None:
        first = c.first_element(chunk_values(0)[0])

    def body(k, part):
        x, mask = chunk_values(k)
        n = jnp.clip(width - k * config.block_cols, 0, config.block_cols).astype(F32)
        return c.chan_combine(part, c.chunk_partial(jnp.where(mask, x - first, 0.0), mask, n))

    part = jax.lax.fori_loop(0, config.chunks, body, c.Partial(zero, zero, zero))
    return c.Stats(first, part.mean, jnp.maximum(part.m2 / width, 0.0))


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


def _launch(target: Target, shape: tuple[int, int, int], one_row: bool = False) -> _Launch:
    groups, rows, width = shape
    config = c.block_config(target, rows, width, one_row=one_row)
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
    """`(y, h, shift, offset, rstd)` of `x` `(groups, rows, dim)` (plus `residual`, when not
    `None`, then `h` is the rounded sum, else `None`) and per-group parameters `(groups,
    dim)`, with one `pallas_call` on `target`; the statistics are `(groups, rows)` float32.
    `y` is in `out_dtype` (default `x.dtype`); with a `scale` `(groups, dim)` (one value
    broadcast over a row's columns) `y` is the FP8 `clip(y · scale)` and each row's amax
    `(groups, rows)` follows the statistics. The kernel applies `weight_offset + weight`,
    and reads the scale's one value per group in place (its first column: XLA slices the
    broadcast scalar for free, where the whole row was a launch before the kernel)."""
    groups, rows, width = x.shape
    launch = _launch(target, x.shape, one_row=True)
    rows_in = [a for a in (x, residual) if a is not None]
    params = [p.reshape(groups, 1, width) for p in (weight, bias) if p is not None]
    scales = [] if scale is None else [scale[:, :1].reshape(groups, 1, 1)]
    scale_spec = pl.BlockSpec((_SQUEEZED, 1, 1), lambda i, g: (g, 0, 0))
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
        weight_offset=weight_offset,
    )
    outs = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows] * len(rows_in)
        + [launch.params] * len(params)
        + [scale_spec] * len(scales),
        out_specs=[launch.rows] * len(rows_out) + [launch.stats] * n_stats,
        out_shape=rows_out + [stat_shape] * n_stats,
        name=f"eqxnorm_{op}_fwd",
    )(*rows_in, *params, *scales)
    h = outs[0] if residual is not None else None
    y, *stats = outs[len(rows_out) - 1 :]
    return y.astype(y_dtype), h, *(s[..., 0] for s in stats)


# --- backward --------------------------------------------------------------------------------


def _program_blocks(block, carry, config, target, iterations=None, row_block=None):
    """`block(i, j, carry) -> carry` over the row blocks of this program, `i` the block and
    `j` its place among the program's (a Python 0 when it is the only one), `first` the
    program's id along the rows (`row_block` where the caller read it, else read here):
    without `iterations` (a row-parallel launch, its refs one block) block `first`; with
    them (a persistent launch, see `_backward_launch`: its row refs hold the whole group)
    blocks `first + j · programs`, `j < iterations`. Before each block but the first a
    chunked program's partial rows, written by the previous block and read by this one (see
    [`_accumulate`][]), are fenced by a barrier."""
    first = pl.program_id(0) if row_block is None else row_block
    if iterations is None or iterations == 1:
        return block(first, 0, carry)
    programs = pl.num_programs(0)

    def body(j, carry):
        if config.chunks > 1:
            c.barrier(target)
        return block(first + j * programs, j, carry)

    return jax.lax.fori_loop(0, iterations, body, carry)


def _block_view(config: c.BlockConfig, persistent: bool, i: Any, k: Any):
    """The function from a row ref (or `None`) to chunk `k` of its block `i`: a view of the
    whole group's rows in a persistent launch (one view: Pallas' interpreter does not store
    through a view of a view), else [`_view`][] of the block ref."""
    if not persistent:
        return _view(config, k)
    br, bc = config.block_rows, config.block_cols
    columns = None if config.chunks == 1 else (k * bc, bc)
    return lambda ref: c.rows_view(ref, i * br, br, columns)


def _accumulate(ref, col_sum, col_mask, j: Any, target: Target) -> None:
    """Adds a block's column sums `(1, cols)` to a program's partial row `ref` (a chunk of
    it): written by its first block (`j` 0), read, added to and written back by the next."""
    if not isinstance(j, int):
        col_sum = col_sum + c.load(ref, col_mask & (j > 0), target)
    c.store(ref, col_sum, col_mask, target)


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
    row_block=None,
    iterations=None,
    has_lengths=False,
    has_dbias=True,
    weight_offset=0.0,
):
    r"""$\partial x = r(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}) + \partial h$
    (without $\overline{g}$ for RMSNorm; $\partial h$, the gradient of the fused add's `h`,
    when given), $g = \partial y \odot \gamma$, for blocks of rows, written to `dx` and to
    `dresidual` when that has another dtype; and the program's float32 column sums of
    $\partial y \odot \hat{x}$ and $\partial y$ over its blocks.

    The launch says which blocks: without `iterations` the row refs are one block, that of
    `row_block` (default: the program id); with `iterations` (a persistent launch, see
    `eqxnorm.kernels._common.persistent_config`) they hold every row of the group and the
    program computes blocks `program + j · programs`, `j < iterations`, summing its column
    sums on chip (one-pass rows: in the loop's carry) or in its own partial row (chunked
    rows: read, added to and written back per chunk).

    With `lengths` (a ref of each row's valid length $n$ before the weight, float32; the
    statistics those of the row's first $n$ columns, see [`_lengths_fwd_kernel`][]), the
    means are over the valid columns: $\partial x_j = r\left(g_j - [j < n]\,(\overline{g} +
    \hat{x}_j\,\overline{g\hat{x}})\right)$, every column's $g$ in the sums (each output
    depends on the statistics), and a row with $n = 0$ has $\hat{x} = \partial x = 0$.

    Without `has_dbias` (a caller with no bias, QK-norm) only the weight's partial row is
    written, one ref."""
    len_ref, w_ref, dh_ref, dx_ref, *refs = c.split_refs(refs, has_lengths, has_weight, has_dh)
    dres_ref, *partial_refs = c.split_refs(refs, has_dresidual)
    br, bc = config.block_rows, config.block_cols

    def partials(k):
        """The views of chunk `k` of the partial rows of dW and dB: two refs of one row, or
        the rows of one ref of both."""
        if len(partial_refs) == 2 or not has_dbias:
            return [_view(config, k)(ref) for ref in partial_refs]
        columns = None if config.chunks == 1 else (k * bc, bc)
        return [c.rows_view(partial_refs[0], r, 1, columns) for r in (0, 1)]

    persistent = iterations is not None

    def block(i, j, sums_before):
        """Block `i`, the program's `j`-th; returns the column sums so far (one-pass rows)."""
        block_rows = (i * br, rows)
        block_view = functools.partial(_block_view, config, persistent, i)
        row_mask, _, _ = _masks(config, block_rows, width)
        per_row = [shift_ref, offset_ref, rstd_ref]
        if persistent:
            per_row = [c.rows_view(ref, i * br, br) for ref in per_row]
        shift, offset, rstd = (c.load(ref, row_mask, target) for ref in per_row)
        stats = c.Stats(shift, offset, None)
        n, mean = None, lambda total: total / width
        if len_ref is not None:
            n_ref = c.rows_view(len_ref, i * br, br) if persistent else len_ref
            n = jnp.minimum(c.load(n_ref, row_mask, target), float(width))
            inv_n = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0)
            mean = lambda total: total * inv_n  # noqa: E731

        def chunk_values(k):
            _, col_mask, mask = _masks(config, block_rows, width, k * bc)
            view = block_view(k)
            xhat = c.centred(c.load(view(x_ref), mask, target), mask, stats) * rstd
            if n is not None:
                xhat = jnp.where(n > 0, xhat, 0.0)
            dy = c.load(view(dy_ref), mask, target)
            if w_ref is None:
                return xhat, dy, dy, mask, view
            w = c.load(_view(config, k)(w_ref), col_mask, target)
            return xhat, dy, dy * reference.offset_weight(w, weight_offset, F32), mask, view

        def dx_and_sums(k, xhat, dy, g, mask, view, mean_gx, mean_g):
            if n is None:
                dx = (g - mean_g - xhat * mean_gx) * rstd
            else:
                valid = mask & _valid_lengths(config, n, k * bc)
                correction = jnp.where(valid, mean_g + xhat * mean_gx, 0.0)
                dx = jnp.where(n > 0, g - correction, 0.0) * rstd
            if dh_ref is not None:
                dx = dx + c.load(view(dh_ref), mask, target)
            for ref in (dx_ref, dres_ref):
                if ref is not None:
                    c.store(view(ref), dx, mask, target)
            return jnp.sum(dy * xhat, axis=0, keepdims=True), jnp.sum(dy, axis=0, keepdims=True)

        zero = jnp.zeros((br, 1), F32)
        if config.chunks == 1:
            xhat, dy, g, mask, view = chunk_values(0)
            sums = (c.row_sum(g * xhat), c.row_sum(g) if center else zero)
            col_sums = dx_and_sums(0, xhat, dy, g, mask, view, *map(mean, sums))
            if not param_grads:
                return sums_before
            return tuple(a + b for a, b in zip(sums_before, col_sums, strict=True))

        def reduce_body(k, sums):
            xhat, _, g, _, _ = chunk_values(k)
            return sums[0] + c.row_sum(g * xhat), sums[1] + (c.row_sum(g) if center else zero)

        means = tuple(map(mean, jax.lax.fori_loop(0, config.chunks, reduce_body, (zero,) * 2)))

        @pl.loop(0, config.chunks)
        def _(k):
            col_sums = dx_and_sums(k, *chunk_values(k), *means)
            if param_grads:
                col_mask = c.iota((1, bc), 1, k * bc) < width
                for ref, col_sum in zip(partials(k), col_sums, strict=has_dbias):
                    _accumulate(ref, col_sum, col_mask, j, target)

        return sums_before

    # The one-pass rows' column sums ride the loop's carry (nothing to carry otherwise).
    zeros = (jnp.zeros((1, bc), F32),) * 2 if param_grads and config.chunks == 1 else ()
    col_sums = _program_blocks(block, zeros, config, target, iterations, row_block)
    if param_grads and config.chunks == 1:
        col_mask = c.iota((1, bc), 1) < width
        for ref, col_sum in zip(partials(0), col_sums, strict=has_dbias):
            c.store(ref, col_sum, col_mask, target)


def _backward_launch(
    target: Target, shape: tuple[int, int, int], persistent: bool = True, read_bytes: int = 0
) -> tuple[_Launch, int | None]:
    """The backward's launch over `(groups, rows, width)` and the row blocks each program
    loops over: on Triton (and its interpreter) a persistent grid
    (`eqxnorm.kernels._common.persistent_config`; `read_bytes` of `x` and `dy` per element:
    fewer programs over rows too few to fill the GPU), the row specs spanning the whole group
    (every block a program visits, past the end included) and each program one partial row
    per group; on Mosaic TPU (or unless `persistent`) the row-parallel [`_launch`][] (`None`:
    one block each)."""
    launch = _launch(target, shape)
    if not (target.masked and persistent):
        return launch, None
    groups, rows, _ = shape
    plan = c.persistent_config(launch.config, rows, groups, shape[2], read_bytes)
    covered = plan.programs * plan.iterations * plan.config.block_rows
    cols = launch.rows.block_shape[-1]
    whole = lambda p, g: (g, 0, 0)  # noqa: E731
    launch = launch._replace(
        config=plan.config,
        grid=(plan.programs, groups),
        rows=pl.BlockSpec((_SQUEEZED, covered, cols), whole),
        stats=pl.BlockSpec((_SQUEEZED, covered, 1), whole),
    )
    return launch, plan.iterations


def _written_once(launch: _Launch, iterations: int | None) -> bool:
    """Whether a backward `launch` (with `iterations`, see [`_backward_launch`][]) is one
    program per group that writes each of its column sums once: one-pass rows, whose sums
    ride its loop's carry, or one block. Its partial rows are then the parameters' gradients,
    stored in their dtypes (no XLA launch after the kernel)."""
    one_block = (iterations or 1) == 1
    return launch.grid[0] == 1 and (launch.config.chunks == 1 or one_block)


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
    lengths=None,
    weight_offset=0.0,
    bias_dtype=None,
):
    """`(dx, dresidual, dweight, dbias)` of the rows of `x` `(groups, rows, dim)` with one
    `pallas_call` on `target`. The input gradient (plus `dh` when not `None`) is written in
    each of `d_dtypes`: `dx` in the first, `dresidual` in the second (else `None`);
    `dweight`/`dbias` are the sums over each group's rows (in float32), `(groups, dim)`, in
    the weight's dtype and `bias_dtype` (default the weight's; float32 without a weight)
    (`None` unless `param_grads`). With `lengths` `(groups, rows)`, the rows' valid lengths, the
    backward of [`_lengths_forward_on`][]."""
    groups, rows, width = x.shape
    read_bytes = jnp.dtype(x.dtype).itemsize + jnp.dtype(dy.dtype).itemsize
    launch, iterations = _backward_launch(target, x.shape, read_bytes=read_bytes)
    optional = [weight.reshape(groups, 1, width)] if weight is not None else []
    optional_specs = [launch.params] * len(optional)
    if lengths is not None:
        optional = [lengths.reshape(groups, rows, 1), *optional]
        optional_specs = [launch.stats, *optional_specs]
    if dh is not None:
        optional, optional_specs = [*optional, dh], [*optional_specs, launch.rows]
    out_specs = [launch.rows] * len(d_dtypes)
    out_shape = [jax.ShapeDtypeStruct(x.shape, c.stored_dtype(target, d)) for d in d_dtypes]
    # One program per group (adaLN's groups of a few rows): its partial rows are the
    # gradients, two arrays that XLA reshapes for free (slicing them out of one array would
    # be a copy each, two launches).
    one_program = launch.grid[0] == 1
    grad_dtypes = (F32, F32) if weight is None else (weight.dtype, bias_dtype or weight.dtype)
    if param_grads and one_program:
        # Of one-pass rows (their sums ride the program's loop) or of one block (adaLN's
        # examples of a token), each column written once and never read back: stored in the
        # parameters' dtypes, the gradients with no cast after them (37 × 760 bf16: two
        # XLA launches, one each).
        dtypes = grad_dtypes if _written_once(launch, iterations) else (F32, F32)
        out_specs += [launch.partials] * 2
        out_shape += [
            jax.ShapeDtypeStruct((groups, 1, 1, width), c.stored_dtype(target, d)) for d in dtypes
        ]
    elif param_grads:
        # One partial row per program of each gradient, `(dweight, dbias)`, in one array of
        # `width` columns, not the padded block's: every element is written (masked like x).
        cols = launch.params.block_shape[-1]
        out_specs.append(pl.BlockSpec((_SQUEEZED, _SQUEEZED, 2, cols), lambda i, g: (g, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((groups, launch.grid[0], 2, width), F32))
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
        iterations=iterations,
        has_lengths=lengths is not None,
        weight_offset=weight_offset,
    )
    dx, *outs = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows] * 2 + [launch.stats] * 3 + optional_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name=f"eqxnorm_{op}{'' if lengths is None else '_lengths'}_bwd",
    )(x, dy, *(s.reshape(groups, rows, 1) for s in (shift, offset, rstd)), *optional)
    dres = outs.pop(0) if len(d_dtypes) == 2 else None
    if not param_grads:
        return dx, dres, None, None
    if one_program:
        sums = [o.reshape(groups, width) for o in outs]
    else:
        # Both gradients' partial rows in one array, summed over the programs in a fixed order.
        sums = c.sum_pair(outs[0], pair_axis=2, sum_axis=1, like=weight, droppable=not _center(op))
    # In the parameters' dtypes whatever the launch (every platform's branch gives the same).
    return dx, dres, *(g.astype(d) for g, d in zip(sums, grad_dtypes, strict=True))


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
def _forward(
    op: str, eps: float, backend: str, out_dtype=None, fp8: bool = False, weight_offset=0.0
):
    """`(x, residual, weight, bias, scale) -> (y, h, shift, offset, rstd)` on `(groups, rows,
    dim)` (`residual`, `h` and `scale` may be `None`; `y` in `out_dtype`, default `x`'s; with
    `fp8`, a `scale` `(groups, dim)` and each row's amax after the statistics; the kernels
    apply `weight_offset + weight`). Under `vmap`
    the batch is folded into the rows of every group when the parameters are shared by the
    examples, else into the groups (each example with its own parameters); nested `vmap`s
    fold one after the other."""

    @custom_vmap
    def forward(x, residual, weight, bias, scale=None):
        options = dict(op=op, eps=eps, out_dtype=out_dtype, weight_offset=weight_offset)
        fn = functools.partial(_forward_on, **options)
        mosaic_gpu = _mosaic_gpu(
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
        return _fold_forward(forward, axis_size, in_batched, args)

    return forward


def _fold_forward(forward, axis_size: int, in_batched, args):
    """The `custom_vmap` rule of a forward `(x, per_row, weight, bias, *more)` (`per_row` the
    residual, or the valid lengths; `more`: the FP8 scale): the examples folded into the rows
    of every group (`x` and `per_row`, as rows) when the parameters are shared, else into the
    groups."""
    if axis_size == 0:
        return c.empty_batch(forward, in_batched, args)
    if any(in_batched[2:]):
        folded = (_into_groups(axis_size, b, a) for b, a in zip(in_batched, args, strict=True))
        out = tuple(c.unfold(axis_size, o) for o in forward(*folded))
    else:
        rows = (_into_rows(axis_size, b, a) for b, a in zip(in_batched[:2], args[:2], strict=True))
        out = tuple(_from_rows(axis_size, o) for o in forward(*rows, *args[2:]))
    return out, _all_batched(out)


@functools.cache
def _backward(
    op: str,
    param_grads: bool,
    d_dtypes: tuple[jnp.dtype, ...],
    backend: str,
    weight_offset=0.0,
    bias_dtype=None,
):
    """`(x, weight, dy, dh, shift, offset, rstd) -> (dx, dresidual, dweight, dbias)` (see
    [`_backward_on`][]), batching like [`_forward`][]: per-example parameter gradients either
    way (JAX sums them when the parameters are shared)."""

    @custom_vmap
    def backward(x, weight, dy, dh, shift, offset, rstd):
        kwargs = dict(
            op=op, param_grads=param_grads, d_dtypes=d_dtypes, weight_offset=weight_offset
        )
        fn = functools.partial(_backward_on, bias_dtype=bias_dtype, **kwargs)
        mosaic_gpu = _mosaic_gpu(
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
        no_grads = _backward(op, False, d_dtypes, backend, weight_offset)
        dx, dres, _, _ = no_grads(rows[0], weight, *rows[1:])
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
def _grouped_norm(op: str, eps: float, backend: str, out_dtype=None, weight_offset=0.0):
    """The differentiable function `(x, weight, bias) -> y` on `(groups, rows, dim)` with
    parameters `(groups, dim)` (or `None`), on the GPU `backend` (`c.GPU_BACKENDS`); `y` in
    `out_dtype` (default `x.dtype`); the kernels apply `weight_offset + weight` (in float32,
    no XLA launch before them: adaLN's `1 + scale`, a zero-centred weight's offset)."""
    forward = _forward(op, eps, backend, out_dtype, weight_offset=weight_offset)

    def norm_forward(x, weight, bias):
        y, _, *stats = forward(x, None, weight, bias)
        return y, *stats

    layout = _ROWS[_center(op)]._replace(weight_offset=weight_offset)
    backward = functools.partial(_norm_backward, op, backend, weight_offset)
    return _autodiff.norm_with_jvp(norm_forward, backward, None, layout, out_dtype)


def _norm_backward(op: str, backend: str, weight_offset: float, param_grads: bool, dtypes):
    """`(x, weight, dy, *stats) -> (dx, dweight, dbias)`: the backward kernel of a row norm
    without a residual (see `eqxnorm.kernels._autodiff.norm_with_jvp`), applying
    `weight_offset + weight`; `dtypes` the parameters' (the bias's, for a gradient written
    in its dtype)."""
    bias_dtype = dtypes[1]

    def run(x, weight, dy, *stats):
        d_dtypes = (jnp.dtype(x.dtype),)
        backward = _backward(op, param_grads, d_dtypes, backend, weight_offset, bias_dtype)
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

    backward = functools.partial(_norm_backward, op, backend, 0.0)
    apply, transpose = _autodiff.norm_map(backward, None, layout, out_dtype)

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
    if fp8_scale is not None:
        weight = reference.offset_weight(weight, weight_offset, F32)
        norm = _grouped_norm_fp8(op, float(eps), backend, _out_dtype(out_dtype))
        y, amax = norm(x[None], _one_group(weight), _one_group(bias), _fp8_scale(fp8_scale, x))
        return y[0], jnp.max(amax)
    # A zero-centred weight's offset applied by the kernels (no XLA launch before them).
    offset = 0.0 if weight is None else float(weight_offset)
    norm = _grouped_norm(op, float(eps), backend, _out_dtype(out_dtype), offset)
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
    if weight is None and bias is None:
        # $W = 1 + s$, $B = t$ (`reference.modulation`): `scale` the kernels' weight, its
        # `1 +` applied by them (no XLA launch before them), `shift` their bias.
        norm = _grouped_norm(op, float(eps), backend, _out_dtype(out_dtype), 1.0)
        return norm(x, scale, shift)
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


# --- per-head QK-norm: q and k in one launch ---------------------------------------------------
#
# `q` `(tokens, q_heads, head_dim)` and `k` `(tokens', k_heads, head_dim)` are normalized over
# `head_dim` by the row-norm kernel bodies above, unchanged: a block is `block_rows` tokens of
# one head (a strided view, so no transpose), and the grid `(token blocks, q_heads + k_heads)`
# covers q's heads, then k's, each program running the body on q's refs or on k's. A weight
# `(heads, head_dim)` is one group's parameters per head; `(head_dim,)` one shared by all.
#
# Every program sees both operands' blocks, so the index maps send the blocks a program does
# not work on to the block that operand's previous program held: a pipeline that writes an
# output block back when its index changes then writes each block once, after the program
# that computed it (Triton stores only what a body stores, and the interpreter writes back
# what it loaded); the axes are sequential ("arbitrary") for such a pipeline. The backward is
# persistent as the row norms' (`_qk_launch`): over tokens too few to fill the GPU, a head's
# programs loop over several token blocks each, fewer partial rows. On TPU the QK-norm is
# XLA (`_qk_norm_xla`): Mosaic cannot block one head's strided rows.


class _QKLaunch(NamedTuple):
    """The one launch of [`_qk_norm_fwd_on`][]/[`_qk_norm_bwd_on`][]: its block config and
    grid, per operand (`q`, then `k`) its row specs, statistic specs, parameter spec and
    partial-sum spec, the programs along the tokens that work on each operand (its token
    blocks; in a persistent launch, those of the grid's programs that have a block), and the
    blocks each program loops over (`None`: one, the grid's row-parallel launch)."""

    config: c.BlockConfig
    grid: tuple[int, int]
    rows: tuple[pl.BlockSpec, pl.BlockSpec]
    stats: tuple[pl.BlockSpec, pl.BlockSpec]
    params: tuple[pl.BlockSpec, pl.BlockSpec]
    partials: tuple[pl.BlockSpec, pl.BlockSpec]
    blocks: tuple[int, int]
    iterations: int | None = None


def _qk_index(which: int, blocks: tuple[int, int], heads: tuple[int, int]):
    """`(i, g) -> (token block, head)` of operand `which` (0: q, 1: k) for program `(i, g)`:
    its own block where `g` is one of its heads, else the block its previous program held."""
    nq, nk = heads
    n_blocks = blocks[which]

    def index(i, g):
        if which == 0:
            row, head = i, jnp.minimum(g, nq - 1)
        else:
            before = g < nq
            row = jnp.where(before, i - 1, i)
            head = jnp.where(before, nk - 1, g - nq)
            head = jnp.where(row < 0, 0, head)
            row = jnp.maximum(row, 0)
        past = row >= n_blocks
        return jnp.where(past, n_blocks - 1, row), jnp.where(past, heads[which] - 1, head)

    return index


# The backward's elements per thread (the heuristic's `thread_elements`; the forward keeps
# the default 16). Its program holds a row norm backward's per-element state plus both
# operands' block indices (q's and k's, `_qk_index`): at 16 float32 elements per thread (8
# warps over 32 × 128) JAX 0.12's XLA-built kernel needs a few registers over the 64 that
# ptxas 13 settles on for 256 threads and spills 8 bytes (deviceless H200, 4096×1024 and
# 1024×8192); at 8 (16 warps) it takes 40 registers (bfloat16 46) without a spill, 3
# programs of 512 threads per SM (75 % occupancy, not 50 %).
_QK_BWD_THREAD_ELEMENTS = 8
# The persistent backward's most warps a program (`_common.persistent_config`): the row
# norms' 32 (1024 threads, 64 registers each) are too few registers for XLA's build of this
# kernel with the loop, which spills and is discarded (JAX 0.10.2, deviceless H200, 4096×128
# and 4096×1024 of heads of 128); at 16 it takes 40 to 64 registers without a spill.
_QK_PERSISTENT_WARPS = 16


def _qk_launch(
    target: Target,
    q_shape,
    k_shape,
    per_head: tuple[bool, bool],
    thread_elements: int = 16,
    one_row: bool = False,
    read_bytes: int = 0,
) -> _QKLaunch:
    """The launch over q's and k's token blocks and heads; with `read_bytes` (the backward's,
    of `x` and `dy` per element) a persistent one, as the row norms' backward
    ([`_backward_launch`][]): `(programs, q_heads + k_heads)`, a head's program looping over
    its token blocks `program + j · programs` and writing one partial row, the row specs a
    head's every token. A persistent plan of one block a program is the row-parallel launch
    (its views of a whole head cost JAX 0.12's float32 kernel at 4096×128 a spill)."""
    width = q_shape[-1]
    rows = max(q_shape[0], k_shape[0])
    config = c.block_config(target, rows, width, thread_elements=thread_elements, one_row=one_row)
    cols, br = c.padded(target, width), config.block_rows
    blocks = (c.ceil_div(q_shape[0], br), c.ceil_div(k_shape[0], br))
    heads = (q_shape[1], k_shape[1])
    grid, iterations, row_block = (max(blocks), sum(heads)), None, br
    at_block = lambda ix, i, g: ix(i, g)  # noqa: E731
    plan = None
    if read_bytes:
        plan = c.persistent_config(
            config, rows, sum(heads), width, read_bytes, _QK_PERSISTENT_WARPS
        )
    if plan is not None and plan.iterations > 1:
        config, iterations = plan.config, plan.iterations
        grid, row_block = (plan.programs, sum(heads)), plan.programs * plan.iterations * br
        blocks = tuple(min(plan.programs, b) for b in blocks)
        at_block = lambda ix, i, g: (0, ix(i, g)[1])  # noqa: E731
    indices = [_qk_index(w, blocks, heads) for w in (0, 1)]

    def spec(block, at):
        return tuple(pl.BlockSpec(block, functools.partial(at, ix)) for ix in indices)

    def param_at(ix, i, g, per_head):
        return (ix(i, g)[1] if per_head else 0, 0, 0)

    return _QKLaunch(
        config,
        grid,
        spec((row_block, _SQUEEZED, cols), lambda ix, i, g: (*at_block(ix, i, g), 0)),
        spec((row_block, _SQUEEZED, 1), lambda ix, i, g: (*at_block(ix, i, g), 0)),
        tuple(
            pl.BlockSpec((_SQUEEZED, 1, cols), functools.partial(param_at, ix, per_head=p))
            for ix, p in zip(indices, per_head, strict=True)
        ),
        spec((_SQUEEZED, _SQUEEZED, 1, cols), lambda ix, i, g: (ix(i, g)[1], ix(i, g)[0], 0, 0)),
        blocks,
        iterations,
    )


def _qk_branches(body, nq: int, blocks: tuple[int, int], refs_q, refs_k, rows):
    """Run `body(refs, rows, row_block)` on q's refs in q's programs and on k's in k's (the
    program ids read outside the conditions, where the interpreter supports them)."""
    i, g = pl.program_id(0), pl.program_id(1)

    @pl.when((g < nq) & (i < blocks[0]))
    def _():
        body(refs_q, rows[0], i)

    @pl.when((g >= nq) & (i < blocks[1]))
    def _():
        body(refs_k, rows[1], i)


def _qk_norm_fwd_kernel(*refs, target, config, heads, blocks, rows, width, eps, center, has_weight):
    """[`_row_norm_fwd_kernel`][] on q's block of rows or on k's: refs `q, k, (q_weight,
    k_weight), q_y, k_y, q_shift, k_shift, q_offset, k_offset, q_rstd, k_rstd`."""
    ins = 4 if has_weight else 2
    inputs, outputs = refs[:ins], refs[ins:]
    per = [[inputs[w], *inputs[2 + w : 3 + w] * has_weight, *outputs[w::2]] for w in (0, 1)]
    kernel = functools.partial(
        _row_norm_fwd_kernel,
        target=target,
        config=config,
        width=width,
        eps=eps,
        center=center,
        has_residual=False,
        has_weight=has_weight,
        has_bias=False,
    )
    _qk_branches(lambda r, n, i: kernel(*r, rows=n, row_block=i), heads[0], blocks, *per, rows)


def _qk_params(weight, width: int):
    """A weight `(head_dim,)` or `(heads, head_dim)` as the launch's `(n, 1, head_dim)`."""
    return None if weight is None else weight.reshape(-1, 1, width)


def _qk_compiler_params(target: Target, config: c.BlockConfig):
    return c.compiler_params(target, config, ("arbitrary", "arbitrary"))


def _qk_norm_fwd_on(target: Target, q, k, q_weight, k_weight, *, eps: float, center: bool):
    """`(q_y, k_y, q_shift, k_shift, q_offset, k_offset, q_rstd, k_rstd)` of `q`, `k`
    `(tokens, heads, head_dim)` with one `pallas_call` on `target`; statistics `(tokens,
    heads)` float32."""
    if target is c.MOSAIC:
        return _qk_norm_xla(q, k, q_weight, k_weight, eps=eps, center=center)
    width = q.shape[-1]
    weights = [w for w in (q_weight, k_weight) if w is not None]
    per_head = tuple(w is not None and w.ndim == 2 for w in (q_weight, k_weight))
    launch = _qk_launch(target, q.shape, k.shape, per_head, one_row=True)
    params = [_qk_params(w, width) for w in weights]
    stats = [jax.ShapeDtypeStruct((*a.shape[:2], 1), F32) for a in (q, k)] * 3
    kernel = functools.partial(
        _qk_norm_fwd_kernel,
        target=target,
        config=launch.config,
        heads=(q.shape[1], k.shape[1]),
        blocks=launch.blocks,
        rows=(q.shape[0], k.shape[0]),
        width=width,
        eps=eps,
        center=center,
        has_weight=bool(weights),
    )
    outs = pl.pallas_call(
        kernel,
        grid=launch.grid,
        in_specs=[*launch.rows, *launch.params[: len(params)]],
        out_specs=[*launch.rows, *launch.stats * 3],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k)] + stats,
        compiler_params=_qk_compiler_params(target, launch.config),
        interpret=target.interpret,
        name="eqxnorm_qk_norm_fwd",
    )(q, k, *params)
    return outs[0], outs[1], *(s[..., 0] for s in outs[2:])


def _qk_norm_bwd_kernel(
    *refs,
    target,
    config,
    heads,
    blocks,
    rows,
    width,
    center,
    has_weight,
    param_grads,
    has_dbias,
    iterations,
):
    """[`_row_norm_bwd_kernel`][] on q's blocks of rows or on k's (those of a persistent
    program with `iterations`): refs `q, k, q_dy, k_dy, q_shift, k_shift, q_offset,
    k_offset, q_rstd, k_rstd, (q_weight, k_weight), dq, dk, (q_dweight, k_dweight, (q_dbias,
    k_dbias)))` (the bias sums, unused, only with `has_dbias`)."""
    ins = 12 if has_weight else 10
    inputs, outputs = refs[:ins], refs[ins:]
    per = [[*inputs[w:10:2], *inputs[10 + w : 11 + w] * has_weight, *outputs[w::2]] for w in (0, 1)]
    kernel = functools.partial(
        _row_norm_bwd_kernel,
        target=target,
        config=config,
        width=width,
        center=center,
        has_weight=has_weight,
        has_dh=False,
        has_dresidual=False,
        param_grads=param_grads,
        has_dbias=has_dbias,
        iterations=iterations,
    )
    _qk_branches(lambda r, n, i: kernel(*r, rows=n, row_block=i), heads[0], blocks, *per, rows)


def _qk_norm_bwd_on(
    target: Target, q, k, q_weight, k_weight, q_dy, k_dy, *stats, center, param_grads
):
    """`(dq, dk, q_dweight, k_dweight)` with one `pallas_call` on `target`: the weights'
    gradients, sums over the tokens in float32, in each weight's shape and dtype, `(heads,
    head_dim)` or `(head_dim,)` (summed over the heads too) (`None` unless `param_grads`)."""
    weights = (q_weight, k_weight)
    if target is c.MOSAIC:
        dq, dk, *dw = _qk_norm_bwd_xla((q, k), weights, (q_dy, k_dy), stats, center)
        if not param_grads:
            return dq, dk, None, None
        dw = [d if w.ndim == 2 else d.sum(0) for d, w in zip(dw, weights, strict=True)]
        return dq, dk, *(d.astype(w.dtype) for d, w in zip(dw, weights, strict=True))
    width = q.shape[-1]
    has_weight = q_weight is not None
    per_head = tuple(w is not None and w.ndim == 2 for w in (q_weight, k_weight))
    read_bytes = jnp.dtype(q.dtype).itemsize + jnp.dtype(q_dy.dtype).itemsize
    launch = _qk_launch(
        target, q.shape, k.shape, per_head, _QK_BWD_THREAD_ELEMENTS, False, read_bytes
    )
    params = [_qk_params(w, width) for w in (q_weight, k_weight)] if has_weight else []
    out_specs = list(launch.rows)
    out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k)]
    # QK-norm has no bias: its sums are not written, but for chunked rows, where the bfloat16
    # kernel with one partial row spills 4 bytes (deviceless H200, JAX 0.10, 64×70000).
    has_dbias = launch.config.chunks > 1
    if param_grads:
        # A partial row per program with blocks of the operand: those past them write nothing.
        # Where each is the gradient itself (one program per operand over one-pass rows, each
        # weight per head or of one head), written once in the weight's dtype: a sum over
        # nothing would be a cast each, a launch each on JAX 0.12.
        dtypes = [F32, F32]
        if _qk_grads_written(launch, (q, k), (q_weight, k_weight)):
            dtypes = [q_weight.dtype, k_weight.dtype]
        partials = [
            jax.ShapeDtypeStruct((a.shape[1], n, 1, width), d)
            for a, n, d in zip((q, k), launch.blocks, dtypes, strict=True)
        ]
        out_specs += [*launch.partials] * (1 + has_dbias)
        out_shape += partials * (1 + has_dbias)
    kernel = functools.partial(
        _qk_norm_bwd_kernel,
        target=target,
        config=launch.config,
        heads=(q.shape[1], k.shape[1]),
        blocks=launch.blocks,
        rows=(q.shape[0], k.shape[0]),
        width=width,
        center=center,
        has_weight=has_weight,
        param_grads=param_grads,
        has_dbias=has_dbias,
        iterations=launch.iterations,
    )
    outs = pl.pallas_call(
        kernel,
        grid=launch.grid,
        in_specs=[*launch.rows * 2, *launch.stats * 3, *launch.params[: len(params)]],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_qk_compiler_params(target, launch.config),
        interpret=target.interpret,
        name="eqxnorm_qk_norm_bwd",
    )(q, k, q_dy, k_dy, *(s[..., None] for s in stats), *params)
    if not param_grads:
        return outs[0], outs[1], None, None
    grads = _qk_weight_grads(outs[2:4], weights)
    return outs[0], outs[1], *(d.astype(w.dtype) for d, w in zip(grads, weights, strict=True))


def _qk_grads_written(launch: _QKLaunch, operands, weights) -> bool:
    """Whether q's and k's partial rows are their weights' gradients (one program per operand
    over one-pass rows, each weight per head or of one head)."""
    return launch.config.chunks == 1 and all(
        n == 1 and (w.ndim == 2 or a.shape[1] == 1)
        for a, n, w in zip(operands, launch.blocks, weights, strict=True)
    )


def _qk_weight_grads(partials, weights) -> list:
    """The weights' gradients from q's and k's partials `(heads, token programs, 1,
    head_dim)`: summed over the token programs, and over the heads for a weight they share;
    both in one reduction when the partials and the sums have one shape (q and k with as
    many heads and tokens), else one each. Partials that are the gradients already (one
    program's, a head per weight row; see [`_qk_grads_written`][]) are only reshaped."""
    if all(p.shape[1] == 1 and p.size == w.size for p, w in zip(partials, weights, strict=True)):
        return [p.reshape(w.shape) for p, w in zip(partials, weights, strict=True)]
    axes = [(1, 2) if w.ndim == 2 else (0, 1, 2) for w in weights]
    if partials[0].shape != partials[1].shape or axes[0] != axes[1]:
        return [p.sum(axis=a) for p, a in zip(partials, axes, strict=True)]
    like = weights[0] if weights[0].dtype == weights[1].dtype else None
    return c.sum_parts(partials, axes=axes[0], like=like)


def _qk_norm_xla(q, k, q_weight, k_weight, *, eps: float, center: bool):
    """[`_qk_norm_fwd_on`][]'s outputs by XLA: on TPU, where Mosaic's blocks cannot be one
    head's strided rows (a block's last two axes must be whole or tiles of 8 × 128)."""
    outs = []
    for x, weight in ((q, q_weight), (k, k_weight)):
        stats = reference.moments(x, -1, center=center)
        rstd = reference.inverse_std(stats.var, eps)
        y = reference.normalize(x, stats, reference._leading_ones(weight, 3), None, eps=eps)
        outs.append((y, stats.shift[..., 0], stats.offset[..., 0], rstd[..., 0]))
    return tuple(o for pair in zip(*outs, strict=True) for o in pair)


def _qk_norm_bwd_xla(xs, weights, dys, stats, center: bool):
    """`(dq, dk, q_dweight, k_dweight)` of [`_qk_norm_bwd_on`][] by XLA (see
    [`_qk_norm_xla`][]), from the saved statistics: the row kernels' backward maths."""
    outs = []
    for w, (x, weight, dy) in enumerate(zip(xs, weights, dys, strict=True)):
        shift, offset, rstd = (s[..., None] for s in stats[w::2])
        xhat = ((x.astype(F32) - shift) - offset) * rstd
        dy = dy.astype(F32)
        g = dy if weight is None else dy * reference._leading_ones(weight, 3).astype(F32)
        d = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
        if center:
            d = d - jnp.mean(g, axis=-1, keepdims=True)
        outs.append(((d * rstd).astype(x.dtype), jnp.sum(dy * xhat, axis=0)))
    return tuple(o for pair in zip(*outs, strict=True) for o in pair)


def _qk_layout(center: bool) -> _autodiff.Layout:
    """`(tokens, heads, head_dim)` is the reference's view itself, reduced over `head_dim`;
    a weight `(head_dim,)` or `(heads, head_dim)` gets its leading unit axes."""
    return _autodiff.Layout(
        axis=2,
        center=center,
        x=_same,
        unview=lambda t, shape: t,
        param=lambda p: None if p is None else p.reshape((1,) * (3 - p.ndim) + p.shape),
        stat=lambda s: s[..., None],
        unstat=lambda s: s[..., 0],
    )


@functools.cache
def _qk_norm(eps: float, norm: str, backend: str):
    """The differentiable `(q, k, q_weight, k_weight) -> (q_y, k_y)` of one launch each way."""
    center = reference._qk_center(norm)
    layout = _qk_layout(center)

    def forward(q, k, q_weight, k_weight):
        fn = functools.partial(_qk_norm_fwd_on, eps=eps, center=center)
        # No `sharding` rule: a sharded call runs on its operands gathered (`c.per_platform`).
        spec = "t h d, t j d, h? d, j? d -> t h d, t j d, " + ", ".join([_QK_STATS] * 3)
        rule = _qk_rule(spec, q, k)
        args = (q, k, q_weight, k_weight)
        qy, ky, *stats = c.per_platform(fn, *args, sharding=rule, backend=backend, op="qk_norm")
        return (qy, ky), tuple(stats)

    def backward(primals, stats, cotangents, like):
        q, k, q_weight, k_weight = primals
        q_dy, k_dy = (
            jnp.zeros(a.shape, a.dtype) if d is None else d
            for a, d in zip((q, k), cotangents, strict=True)
        )
        param_grads = like[2] is not None or like[3] is not None
        fn = functools.partial(_qk_norm_bwd_on, center=center, param_grads=param_grads)
        args = (q, k, q_weight, k_weight, q_dy, k_dy, *stats)
        # The weights' gradients, per head or summed over the heads that share the weight, are
        # sums over the tokens: added across the devices.
        stats = ", ".join([_QK_STATS] * 3)
        per_head = [w is not None and w.ndim == 2 for w in (q_weight, k_weight)]
        dws = ", ".join(f"{h} d" if p else "d" for h, p in zip("hj", per_head, strict=True))
        spec = f"t h d, t j d, h? d, j? d, t h d, t j d, {stats} -> t h d, t j d, {dws}"
        rule = _qk_rule(spec, q, k)
        grads = c.per_platform(fn, *args, sharding=rule, backend=backend, op="qk_norm")
        return tuple(None if lk is None else g for lk, g in zip(like, grads, strict=True))

    def saved_tangents(primals, stats, tangents):
        q, k, q_weight, k_weight = primals
        out = []
        for w, (x, weight) in enumerate(((q, q_weight), (k, k_weight))):
            residuals = (x, weight, *stats[w::2])
            t_in = (tangents[w], tangents[2 + w], None)
            out.append(_autodiff.statistics_tangents(layout, residuals, t_in))
        return tuple(t for pair in zip(*out, strict=True) for t in pair)

    ref = functools.partial(reference.qk_norm, eps=eps, norm=norm)
    return _autodiff.fused_with_jvp(forward, backward, ref, saved_tangents)


# A statistic of q `(tokens t, heads h)` and of k `(tokens t, heads j)`.
_QK_STATS = "t h, t j"


def _qk_rule(spec: str, q, k) -> c.Rule | None:
    """The sharding rule of a QK-norm launch: split along the tokens when q and k share
    them (self-attention; a batch-sharded call then runs on each device's tokens). Two
    token factors split along one mesh axis are not partitioned together, so with other
    token counts (cross-attention) the call runs on its operands gathered."""
    return c.Rule(spec, split="t") if q.shape[0] == k.shape[0] else None


@typechecked()
def qk_norm(
    q: Float[Array, "q_tokens q_heads head_dim"],
    k: Float[Array, "k_tokens k_heads head_dim"],
    q_weight: Float[Array, "*q_per_head head_dim"] | None,
    k_weight: Float[Array, "*k_per_head head_dim"] | None,
    *,
    eps: float,
    norm: str = "rms_norm",
    backend: str = "auto",
) -> tuple[Float[Array, "q_tokens q_heads head_dim"], Float[Array, "k_tokens k_heads head_dim"]]:
    r"""Per-head QK-norm of `q` and `k` in one fused Pallas launch each way (forward,
    backward); the same maths and signature as `eqxnorm.kernels.reference.qk_norm`.

    **Arguments:**

    - `q`: `(tokens, q_heads, head_dim)`; `k`: `(tokens', k_heads, head_dim)`.
    - `q_weight`, `k_weight`: `(head_dim,)`, `(heads, head_dim)` or `None` (both or neither).
    - `eps`: added to the mean square (variance).
    - `norm`: `"rms_norm"` or `"layer_norm"`.
    - `backend`: the GPU kernels, `"auto"` or `"triton"`.

    **Returns:**

    `(q, k)` normalized, in their shapes and dtypes.
    """
    if (q_weight is None) != (k_weight is None) or q.size == 0 or k.size == 0:
        return reference.qk_norm(q, k, q_weight, k_weight, eps=eps, norm=norm)
    return _qk_norm(float(eps), norm, backend)(q, k, q_weight, k_weight)


# --- gated RMSNorm ---------------------------------------------------------------------------


def _rows_folded(call, n_rows: int, example_param_grads=None):
    """`call(*rows, *params)`, a launch over `(rows, dim)` arrays (its outputs: arrays of the
    rows' shape, then any parameter gradients), as a `custom_vmap` function: a `jax.vmap`
    whose parameters the examples share folds the examples into the rows, one launch over
    all of them (as the row norms' `_forward` does), else runs Pallas' own batching. The
    parameters' gradients are then per example, as `vmap` means them, from XLA:
    `example_param_grads(*rows, *params)` on each example (the launch's partial sums mix
    the examples); the caller sums them."""
    folded = custom_vmap(call)

    @folded.def_vmap
    def _(axis_size, in_batched, *args):
        if axis_size == 0:
            return c.empty_batch(folded, in_batched, args)
        if any(in_batched[n_rows:]):
            axes = tuple(0 if b else None for b in in_batched)
            out = jax.vmap(call, in_axes=axes)(*args)
            return out, _all_batched(out)
        rows = [
            c.fold(axis_size, b, a) for b, a in zip(in_batched[:n_rows], args[:n_rows], strict=True)
        ]
        out = folded(*rows, *args[n_rows:])
        if example_param_grads is None:
            out = c.unfold(axis_size, out)
            return out, _all_batched(out)
        axes = tuple(0 if b else None for b in in_batched)
        grads = jax.vmap(example_param_grads, in_axes=axes)(*args)
        out = (*(c.unfold(axis_size, o) for o in out[: len(out) - len(grads)]), *grads)
        return out, _all_batched(out)

    return folded


def _gate(z):
    r"""$(\mathrm{silu}(z), \mathrm{silu}'(z))$, $\mathrm{silu}' = \sigma(1 + z(1 - \sigma))$."""
    sigmoid = 1 / (1 + jnp.exp(-z))
    return reference.silu(z), sigmoid * (1 + z * (1 - sigmoid))


def _gated_rms_norm_fwd_kernel(
    x_ref, z_ref, *refs, target, config, rows, width, eps, norm_before_gate, has_weight
):
    r"""$y = n\,r\,\gamma\,\mathrm{silu}(z)$ with $n = x$ (norm before gate), else
    $y = n\,r\,\gamma$ with $n = x\,\mathrm{silu}(z)$, $r = (\overline{n^2} +
    \varepsilon)^{-1/2}$, for a block of rows."""
    w_ref, y_ref = c.split_refs(refs, has_weight)
    rows = (pl.program_id(0) * config.block_rows, rows)

    def chunk_input(k):
        _, col_mask, mask = _masks(config, rows, width, k * config.block_cols)
        view = _view(config, k)
        x = c.load(view(x_ref), mask, target)
        gate = reference.silu(c.load(view(z_ref), mask, target))
        return (x if norm_before_gate else x * gate), mask, gate, col_mask, view

    def write(rstd, n, mask, gate, col_mask, view):
        w = None if w_ref is None else c.load(view(w_ref), col_mask, target)
        y = c.affine(n * rstd, w, None)
        c.store(view(y_ref), y * gate if norm_before_gate else y, mask, target)

    if config.chunks == 1:
        values = chunk_input(0)
        stats = c.block_moments(values[0], values[1], width, center=False)
        write(reference.inverse_std(stats.var, eps), *values)
    else:
        stats = _chunked_moments(lambda k: chunk_input(k)[:2], config, width, False)
        rstd = reference.inverse_std(stats.var, eps)

        @pl.loop(0, config.chunks)
        def _(k):
            write(rstd, *chunk_input(k))


def _gated_rms_norm_bwd_kernel(
    x_ref,
    z_ref,
    dy_ref,
    *refs,
    target,
    config,
    rows,
    width,
    eps,
    norm_before_gate,
    has_weight,
    iterations=None,
):
    r"""With $n$, $r$ as in the forward (recomputed from the `x` read anyway),
    $\hat{n} = n r$, $p = \mathrm{silu}(z)$ after the norm (else 1) and
    $g = \partial y\,\gamma\,p$: $\partial n = r(g - \hat{n}\,\overline{g\hat{n}})$;
    then $\partial x = \partial n$, $\partial z = \partial y\,\hat{n}\gamma\,
    \mathrm{silu}'(z)$ (norm before gate), else $\partial x = \partial n\,\mathrm{silu}(z)$,
    $\partial z = \partial n\,x\,\mathrm{silu}'(z)$; and the program's float32 column sums
    over its blocks (see [`_program_blocks`][]) of $\partial y\,\hat{n}\,p$ (the weight's
    gradient)."""
    w_ref, dx_ref, dz_ref, *partial_refs = c.split_refs(refs, has_weight)
    bc = config.block_cols

    def block(i, j, col_sums):
        block_rows = (i * config.block_rows, rows)

        def chunk_values(k):
            _, col_mask, mask = _masks(config, block_rows, width, k * bc)
            view = _block_view(config, iterations is not None, i, k)
            x = c.load(view(x_ref), mask, target)
            gate, dgate = _gate(c.load(view(z_ref), mask, target))
            dy = c.load(view(dy_ref), mask, target)
            w = None if w_ref is None else c.load(_view(config, k)(w_ref), col_mask, target)
            n = x if norm_before_gate else x * gate
            post = gate if norm_before_gate else 1.0
            g = dy * post if w is None else dy * post * w
            return x, n, gate, dgate, dy, w, g, post, mask, view

        def write(k, rstd, mean_gn, x, n, gate, dgate, dy, w, g, post, mask, view):
            nhat = n * rstd
            dn = (g - nhat * mean_gn) * rstd
            if norm_before_gate:
                dx, dz = dn, dy * (nhat if w is None else nhat * w) * dgate
            else:
                dx, dz = dn * gate, dn * x * dgate
            c.store(view(dx_ref), dx, mask, target)
            c.store(view(dz_ref), dz, mask, target)
            return jnp.sum(dy * nhat * post, axis=0, keepdims=True)

        def sums(values):
            n, g = values[1], values[6]
            return c.row_sum(n * n * (1.0 / width)), c.row_sum(g * n)

        if config.chunks == 1:
            values = chunk_values(0)
            square, gn = sums(values)
        else:

            def reduce_body(k, acc):
                return tuple(a + b for a, b in zip(acc, sums(chunk_values(k)), strict=True))

            zero = jnp.zeros((config.block_rows, 1), F32)
            square, gn = jax.lax.fori_loop(0, config.chunks, reduce_body, (zero, zero))
        rstd = reference.inverse_std(square, eps)
        # mean(g n̂) = r · mean(g n): one reduction pass, before r is known.
        mean_gn = gn * rstd / width
        if config.chunks == 1:
            partial = write(0, rstd, mean_gn, *values)
            return [a + partial for a in col_sums]

        @pl.loop(0, config.chunks)
        def _(k):
            partial = write(k, rstd, mean_gn, *chunk_values(k))
            if partial_refs:
                col_mask = c.iota((1, bc), 1, k * bc) < width
                _accumulate(_view(config, k)(partial_refs[0]), partial, col_mask, j, target)

        return col_sums

    # The one-pass rows' column sums ride the loop's carry (nothing to carry otherwise).
    one_pass = config.chunks == 1 and bool(partial_refs)
    col_sums = _program_blocks(
        block, [jnp.zeros((1, bc), F32)] * one_pass, config, target, iterations
    )
    for col_sum in col_sums:
        c.store(partial_refs[0], col_sum, c.iota((1, bc), 1) < width, target)


def _gated_launch(target: Target, x, weight):
    """`_launch` of `x` `(rows, dim)` as one group, and the weight as that group's
    parameters."""
    launch = _launch(target, (1, *x.shape))
    return launch, ([] if weight is None else [weight.reshape(1, 1, -1)])


def _one_group_kernel(body, target: Target, launch: _Launch, x, weight, **settings):
    """`body` with the settings of a launch over the rows of `x` `(rows, dim)`."""
    return functools.partial(
        body,
        target=target,
        config=launch.config,
        rows=x.shape[0],
        width=x.shape[1],
        has_weight=weight is not None,
        **settings,
    )


def _gated_rms_norm_fwd_on(target: Target, x, z, weight, *, eps, norm_before_gate):
    """`y` of `x`, `z` `(rows, dim)` with one `pallas_call` on `target`."""
    launch, params = _gated_launch(target, x, weight)
    kernel = _one_group_kernel(
        _gated_rms_norm_fwd_kernel,
        target,
        launch,
        x,
        weight,
        eps=eps,
        norm_before_gate=norm_before_gate,
    )
    y = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows] * 2 + [launch.params] * len(params),
        out_specs=launch.rows,
        out_shape=jax.ShapeDtypeStruct((1, *x.shape), x.dtype),
        name="eqxnorm_gated_rms_norm_fwd",
    )(x[None], z[None], *params)
    return y[0]


def _gated_rms_norm_bwd_on(target: Target, x, z, weight, dy, *, eps, norm_before_gate, param_grads):
    """`(dx, dz, dweight)` with one `pallas_call` on `target`; `dweight` the sum over the rows
    (in float32) in the weight's dtype (`None` unless `param_grads`)."""
    # Three row arrays (x, z, dy) and the gate: with the accumulators of a persistent program
    # a one-pass block of more than 4096 elements spills (16 bytes at 8192 over 32 warps).
    config = c.block_config(target, *x.shape)
    small = config.chunks > 1 or config.block_rows * config.block_cols <= c.TARGET_BLOCK_ELEMENTS
    read_bytes = sum(jnp.dtype(a.dtype).itemsize for a in (x, z, dy))
    launch, iterations = _backward_launch(
        target, (1, *x.shape), persistent=small, read_bytes=read_bytes
    )
    params = [] if weight is None else [weight.reshape(1, 1, -1)]
    if launch.config.chunks > 1:
        # Three row arrays per chunk (x, z, dy): at 16 warps (128 registers a thread at most)
        # they spill (8 bytes at 70000 features on sm_90a); 8 warps allow 255.
        config = launch.config._replace(num_warps=min(launch.config.num_warps, 8))
        launch = launch._replace(config=config)
    rows_shape = [jax.ShapeDtypeStruct((1, *x.shape), a.dtype) for a in (x, z)]
    # One program's sum written once (one-pass rows, or one block) is the gradient itself:
    # in the weight's dtype, no XLA launch after the kernel (as the row norms').
    grad_dtype = F32 if weight is None else weight.dtype
    written_once = _written_once(launch, iterations)
    stored = c.stored_dtype(target, grad_dtype) if written_once else F32
    partial = jax.ShapeDtypeStruct((1, launch.grid[0], 1, x.shape[1]), stored)
    kernel = _one_group_kernel(
        _gated_rms_norm_bwd_kernel,
        target,
        launch,
        x,
        weight,
        eps=eps,
        norm_before_gate=norm_before_gate,
        iterations=iterations,
    )
    outs = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows] * 3 + [launch.params] * len(params),
        out_specs=[launch.rows] * 2 + [launch.partials] * param_grads,
        out_shape=rows_shape + [partial] * param_grads,
        name="eqxnorm_gated_rms_norm_bwd",
    )(x[None], z[None], dy[None], *params)
    if not param_grads:
        return outs[0][0], outs[1][0], None
    dweight = outs[2].reshape(-1) if written_once else outs[2].sum(axis=(0, 1, 2))
    return outs[0][0], outs[1][0], dweight.astype(grad_dtype)


@functools.cache
def _gated_rms_norm(eps: float, norm_before_gate: bool, backend: str):
    """The differentiable `(x, z, weight) -> y` (rows `(rows, dim)`)."""
    settings = dict(eps=eps, norm_before_gate=norm_before_gate)

    ref = functools.partial(reference.gated_rms_norm, **settings)

    def launch_forward(x, z, weight):
        fn = functools.partial(_gated_rms_norm_fwd_on, **settings)
        mosaic_gpu = _mosaic_gpu(
            functools.partial(_mgpu.gated_rms_norm_forward_on, **settings),
            _mgpu.gated_rms_norm_forward_supported,
        )
        rule = c.Rule("r d, r d, d -> r d", split="r")
        args = (x, z, weight)
        return c.per_platform(
            fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend, op="gated_rms_norm"
        )

    def launch_backward(param_grads, x, z, dy, weight):
        kwargs = dict(param_grads=param_grads, **settings)
        fn = functools.partial(_gated_rms_norm_bwd_on, **kwargs)
        mosaic_gpu = _mosaic_gpu(
            functools.partial(_mgpu.gated_rms_norm_backward_on, **kwargs),
            _mgpu.gated_rms_norm_backward_supported,
        )
        args = (x, z, weight, dy)
        # The weight's gradient is a sum over the rows: added across the devices.
        rule = c.Rule("r d, r d, d, r d -> r d, r d, d", split="r")
        return c.per_platform(
            fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend, op="gated_rms_norm"
        )

    def example_weight_grad(x, z, dy, weight):
        _, vjp = jax.vjp(lambda w: ref(x, z, w), weight.astype(F32))
        return vjp(dy)

    forward = _rows_folded(launch_forward, 2)
    backwards = {
        grads: _rows_folded(
            functools.partial(launch_backward, grads), 3, example_weight_grad if grads else None
        )
        for grads in (False, True)
    }

    def backward(primals, saved, dy, like):
        x, z, weight = primals
        grads = backwards[like[2] is not None](x, z, dy, weight)
        return tuple(None if lk is None else g for lk, g in zip(like, grads, strict=True))

    return _autodiff.fused_with_jvp(lambda *a: (forward(*a), ()), backward, ref)


@typechecked()
def gated_rms_norm(
    x: Float[Array, "rows dim"],
    z: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    *,
    eps: float,
    norm_before_gate: bool = True,
    backend: str = "auto",
) -> Float[Array, "rows dim"]:
    r"""Gated RMSNorm as one fused Pallas kernel each way; the same maths and signature as
    `eqxnorm.kernels.reference.gated_rms_norm`: $y = \mathrm{rms\_norm}(x)\gamma\,
    \mathrm{silu}(z)$, or $\mathrm{rms\_norm}(x\,\mathrm{silu}(z))\gamma$ when not
    `norm_before_gate`. The forward reads `x` and `z` once and writes `y`; the backward
    reads `x`, `z`, `dy` once and writes `dx`, `dz` (it recomputes the row's statistic from
    the `x` it reads, so nothing but the inputs is saved).

    **Arguments:**

    - `x`, `z`: `(rows, dim)`.
    - `weight`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `norm_before_gate`: as the reference's.
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    return _gated_rms_norm(float(eps), bool(norm_before_gate), backend)(x, z, weight)


# --- Dynamic Tanh ----------------------------------------------------------------------------


def _dyt_fwd_kernel(x_ref, alpha_ref, *refs, target, config, rows, width, has_weight, has_bias):
    r"""$y = \gamma\tanh(\alpha x) + \beta$ for a block of rows."""
    w_ref, b_ref, y_ref = c.split_refs(refs, has_weight, has_bias)
    rows = (pl.program_id(0) * config.block_rows, rows)
    alpha = c.load(alpha_ref, jnp.ones((1, 1), bool), target)

    def chunk(k):
        _, col_mask, mask = _masks(config, rows, width, k * config.block_cols)
        view = _view(config, k)
        w, b = _params(view(w_ref), view(b_ref), col_mask, target)
        y = c.affine(jnp.tanh(alpha * c.load(view(x_ref), mask, target)), w, b)
        c.store(view(y_ref), y, mask, target)

    if config.chunks == 1:
        chunk(0)
    else:
        pl.loop(0, config.chunks)(chunk)


def _dyt_bwd_kernel(
    x_ref, alpha_ref, dy_ref, *refs, target, config, rows, width, has_weight, iterations=None
):
    r"""With $t = \tanh(\alpha x)$ and $e = \partial y\,\gamma\,(1 - t^2)$:
    $\partial x = \alpha e$, and the program's float32 sums over its blocks (see
    [`_program_blocks`][]) of $e x$ (the scalar's gradient), and per column of
    $\partial y\,t$ and $\partial y$ (the weight's and bias')."""
    w_ref, dx_ref, dalpha_ref, dw_ref, db_ref = c.split_refs(refs, has_weight)
    alpha = c.load(alpha_ref, jnp.ones((1, 1), bool), target)
    bc, one_pass = config.block_cols, config.chunks == 1

    def block(i, j, carry):
        block_rows = (i * config.block_rows, rows)

        def chunk(k, carry):
            dalpha, *col_sums = carry
            _, col_mask, mask = _masks(config, block_rows, width, k * bc)
            view = _block_view(config, iterations is not None, i, k)
            x = c.load(view(x_ref), mask, target)
            dy = c.load(view(dy_ref), mask, target)
            t = jnp.tanh(alpha * x)
            e = dy * (1 - t * t)
            if w_ref is not None:
                e = e * c.load(_view(config, k)(w_ref), col_mask, target)
            c.store(view(dx_ref), alpha * e, mask, target)
            sums = (jnp.sum(dy * t, axis=0, keepdims=True), jnp.sum(dy, axis=0, keepdims=True))
            if one_pass:
                col_sums = [a + b for a, b in zip(col_sums, sums, strict=True)]
            else:
                col_mask = c.iota((1, bc), 1, k * bc) < width
                for ref, col_sum in zip((dw_ref, db_ref), sums, strict=True):
                    _accumulate(_view(config, k)(ref), col_sum, col_mask, j, target)
            return (dalpha + jnp.sum(c.row_sum(e * x), axis=0, keepdims=True), *col_sums)

        return chunk(0, carry) if one_pass else jax.lax.fori_loop(0, config.chunks, chunk, carry)

    # The scalar's sum, and the one-pass rows' column sums, ride the loop's carry.
    carry = (jnp.zeros((1, 1), F32), *[jnp.zeros((1, bc), F32)] * (2 * one_pass))
    dalpha, *col_sums = _program_blocks(block, carry, config, target, iterations)
    c.store(dalpha_ref, dalpha, jnp.ones((1, 1), bool), target)
    col_mask = c.iota((1, bc), 1) < width
    for ref, col_sum in zip((dw_ref, db_ref), col_sums, strict=False):
        c.store(ref, col_sum, col_mask, target)


def _dyt_fwd_on(target: Target, x, alpha, weight, bias):
    """`y` of `x` `(rows, dim)` with one `pallas_call` on `target`."""
    launch, params = _gated_launch(target, x, weight)
    params += [] if bias is None else [bias.reshape(1, 1, -1)]
    kernel = _one_group_kernel(
        _dyt_fwd_kernel, target, launch, x, weight, has_bias=bias is not None
    )
    y = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows, _scalar_spec()] + [launch.params] * len(params),
        out_specs=launch.rows,
        out_shape=jax.ShapeDtypeStruct((1, *x.shape), x.dtype),
        name="eqxnorm_dyt_fwd",
    )(x[None], alpha.reshape(1, 1, 1), *params)
    return y[0]


def _scalar_spec():
    """The block of a `(1, 1, 1)` scalar every program reads."""
    return pl.BlockSpec((_SQUEEZED, 1, 1), lambda i, g: (0, 0, 0))


def _dyt_bwd_on(target: Target, x, alpha, weight, dy, *, bias_dtype=None):
    """`(dx, dalpha, dweight, dbias)` with one `pallas_call` on `target`, the parameters'
    sums over the rows (in float32) in α's dtype, the weight's and `bias_dtype` (default the
    weight's; float32 without a weight)."""
    read_bytes = jnp.dtype(x.dtype).itemsize + jnp.dtype(dy.dtype).itemsize
    launch, iterations = _backward_launch(target, (1, *x.shape), read_bytes=read_bytes)
    params = [] if weight is None else [weight.reshape(1, 1, -1)]
    blocks, width = launch.grid[0], x.shape[1]
    grad_dtypes = (alpha.dtype, F32, F32)
    if weight is not None:
        grad_dtypes = (alpha.dtype, weight.dtype, bias_dtype or weight.dtype)
    # One program whose sums are each written once (one-pass rows, their sums in the loop's
    # carry, or one block): they are the gradients, stored in their dtypes (at 37 × 760,
    # two XLA launches fewer). Else float32 partials, summed over the programs.
    written_once = _written_once(launch, iterations)
    stored = [c.stored_dtype(target, d) if written_once else F32 for d in grad_dtypes]
    kernel = _one_group_kernel(_dyt_bwd_kernel, target, launch, x, weight, iterations=iterations)
    dx, dalpha, dw, db = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows, _scalar_spec(), launch.rows] + [launch.params] * len(params),
        out_specs=[
            launch.rows,
            pl.BlockSpec((_SQUEEZED, _SQUEEZED, 1, 1), lambda i, g: (g, i, 0, 0)),
            launch.partials,
            launch.partials,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((1, *x.shape), x.dtype),
            jax.ShapeDtypeStruct((1, blocks, 1, 1), stored[0]),
            *[jax.ShapeDtypeStruct((1, blocks, 1, width), d) for d in stored[1:]],
        ],
        name="eqxnorm_dyt_bwd",
    )(x[None], alpha.reshape(1, 1, 1), dy[None], *params)
    if written_once:
        grads = [dalpha.reshape(()), dw.reshape(width), db.reshape(width)]
    else:
        # The three gradients' partials summed over the programs in one fixed-order reduction.
        parts = [dw.reshape(blocks, width), db.reshape(blocks, width), dalpha.reshape(blocks, 1)]
        dw, db, dalpha = c.sum_parts(parts, axes=(0,))
        grads = [dalpha.reshape(()), dw, db]
    dalpha, dw, db = (g.astype(d) for g, d in zip(grads, grad_dtypes, strict=True))
    return dx[0], dalpha, dw, db


@functools.cache
def _dyt(backend: str, bias_dtype=None):
    """The differentiable `(x, alpha, weight, bias) -> y` (rows `(rows, dim)`; `bias_dtype`
    the bias's, in which the backward gives its gradient)."""

    def launch_forward(x, alpha, weight, bias):
        mosaic_gpu = _mosaic_gpu(_mgpu.dyt_forward_on, _mgpu.dyt_supported)
        args = (x, alpha, weight, bias)
        rule = c.Rule("r d, , d, d -> r d", split="r")
        return c.per_platform(
            _dyt_fwd_on, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend, op="dyt"
        )

    def launch_backward(x, dy, alpha, weight):
        mosaic_gpu = _mosaic_gpu(_mgpu.dyt_backward_on, _mgpu.dyt_supported)
        args = (x, alpha, weight, dy)
        rule = c.Rule("r d, , d, r d -> r d, , d, d", split="r")
        fn = functools.partial(_dyt_bwd_on, bias_dtype=bias_dtype)
        return c.per_platform(
            fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend, op="dyt"
        )

    def example_param_grads(x, dy, alpha, weight):
        # The weight's gradient is the kernel's even without a weight (the sums of dy·t).
        weight = jnp.ones(x.shape[-1], F32) if weight is None else weight.astype(F32)
        params = (alpha.astype(F32), weight, jnp.zeros(x.shape[-1], F32))
        _, vjp = jax.vjp(lambda *p: reference.dyt(x, *p), *params)
        return vjp(dy)

    forward = _rows_folded(launch_forward, 1)
    backward_rows = _rows_folded(launch_backward, 2, example_param_grads)

    def backward(primals, saved, dy, like):
        x, alpha, weight, _ = primals
        grads = backward_rows(x, dy, alpha, weight)
        return tuple(None if lk is None else g for lk, g in zip(like, grads, strict=True))

    return _autodiff.fused_with_jvp(lambda *a: (forward(*a), ()), backward, reference.dyt)


@typechecked()
def dyt(
    x: Float[Array, "rows dim"],
    alpha: Float[Array, ""],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    backend: str = "auto",
) -> Float[Array, "rows dim"]:
    r"""Dynamic Tanh as one fused Pallas kernel each way; the same maths and signature as
    `eqxnorm.kernels.reference.dyt`: $y = \gamma\tanh(\alpha x) + \beta$. The backward reads
    `x` and `dy` once, writes `dx`, and the float32 partial sums of the gradients of
    $\alpha$, $\gamma$ and $\beta$.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `alpha`: a scalar `()`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `backend`: the GPU kernels, `"auto"`, `"triton"` or `"mosaic_gpu"` (see
      `eqxnorm.kernels._common.per_platform`).

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    return _dyt(backend, None if bias is None else jnp.dtype(bias.dtype))(x, alpha, weight, bias)


__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "adaptive_layer_norm",
    "adaptive_rms_norm",
    "qk_norm",
    "gated_rms_norm",
    "dyt",
]


# --- per-row valid lengths (padding) ------------------------------------------------------------
#
# `lengths` (int32, one per row) counts the first `lengths[r]` columns of row r in its
# statistics: the reference's masked normalization (`reference.normalize_masked`) for the
# mask `col < lengths[row]`, read from one int per row instead of a mask array. Every column
# is normalized (the padding with its row's statistics); a row of length 0 has statistics 0
# and outputs its bias. The statistics are Chan's combination of the chunks' valid columns
# (the shift 0: each chunk's partial is centred on its own mean), one chunk for a row that
# fits a block.


def _valid_lengths(config: c.BlockConfig, n: Any, start_col: Any = 0):
    """The valid-column mask `(block_rows, block_cols)` of rows of valid lengths `n`
    `(block_rows, 1)` (float32), columns starting at `start_col`."""
    return c.iota((config.block_rows, config.block_cols), 1, start_col).astype(F32) < n


def _lengths_moments(chunk_values, config: c.BlockConfig, center: bool) -> c.Stats:
    """Row statistics over the valid columns of `config.chunks` chunks, `chunk_values(k) ->
    (values, valid)` (padding and invalid columns zeroed): the mean as `offset` (`shift`
    0) and the variance, 0 for a row with no valid column."""
    zero = jnp.zeros((config.block_rows, 1), F32)

    def partial(k):
        x, valid = chunk_values(k)
        if not center:
            return c.Partial(c.row_sum(valid.astype(F32)), zero, c.row_sum(x * x))
        return c.chunk_partial(x, valid)

    def combine(a, b):
        if not center:
            return c.Partial(a.n + b.n, zero, a.m2 + b.m2)
        return c.chan_combine(a, b)

    if config.chunks == 1:
        part = partial(0)
    else:
        part = jax.lax.fori_loop(
            0, config.chunks, lambda k, p: combine(p, partial(k)), c.Partial(zero, zero, zero)
        )
    var = part.m2 / jnp.maximum(part.n, 1.0)
    return c.Stats(zero, part.mean, jnp.maximum(var, 0.0))


def _lengths_xhat(h, mask, stats, rstd, n):
    """`x̂` of a chunk: centred by the row's statistics on the in-bounds `mask`, 0 for a row
    of no valid column (as the reference normalizes an empty slice)."""
    return jnp.where(n > 0, c.centred(h, mask, stats) * rstd, 0.0)


def _lengths_fwd_kernel(
    x_ref, len_ref, *refs, target, config, rows, width, eps, center, has_weight, has_bias
):
    r"""$y = (x - \mu)\, r\, \gamma + \beta$ for a block of rows, $\mu$ and
    $r = (\sigma^2 + \varepsilon)^{-1/2}$ over each row's first `lengths` columns; saves
    shift (0), offset ($\mu$) and $r$ per row."""
    w_ref, b_ref, y_ref, shift_ref, offset_ref, rstd_ref = c.split_refs(refs, has_weight, has_bias)
    rows = (pl.program_id(0) * config.block_rows, rows)
    row_mask = _masks(config, rows, width)[0]
    n = jnp.minimum(c.load(len_ref, row_mask, target), float(width))

    def chunk_input(k):
        start = k * config.block_cols
        _, col_mask, mask = _masks(config, rows, width, start)
        h = c.load(_view(config, k)(x_ref), mask, target)
        return h, col_mask, mask, mask & _valid_lengths(config, n, start)

    # One chunk is loaded once, for the statistics and the output.
    first = chunk_input(0) if config.chunks == 1 else None

    def statistics(k):
        h, _, _, valid = first or chunk_input(k)
        return jnp.where(valid, h, 0.0), valid

    stats = _lengths_moments(statistics, config, center)
    rstd = reference.inverse_std(stats.var, eps)

    def write(k):
        h, col_mask, mask, _ = first or chunk_input(k)
        view = _view(config, k)
        w, b = _params(view(w_ref), view(b_ref), col_mask, target)
        c.store(view(y_ref), c.affine(_lengths_xhat(h, mask, stats, rstd, n), w, b), mask, target)

    if first is not None:
        write(0)
    else:
        pl.loop(0, config.chunks)(write)
    for ref, value in ((shift_ref, stats.shift), (offset_ref, stats.offset), (rstd_ref, rstd)):
        c.store(ref, value, row_mask, target)


def _lengths_forward_on(target: Target, x, lengths, weight, bias, *, op: str, eps: float):
    """`(y, shift, offset, rstd)` of `x` `(groups, rows, dim)` with valid lengths `(groups,
    rows)` int32 and per-group parameters `(groups, dim)`, one `pallas_call` on `target`."""
    groups, rows, width = x.shape
    launch = _launch(target, x.shape)
    params = [p.reshape(groups, 1, width) for p in (weight, bias) if p is not None]
    stat_shape = jax.ShapeDtypeStruct((groups, rows, 1), F32)
    kernel = functools.partial(
        _lengths_fwd_kernel,
        target=target,
        config=launch.config,
        rows=rows,
        width=width,
        eps=eps,
        center=_center(op),
        has_weight=weight is not None,
        has_bias=bias is not None,
    )
    y, shift, offset, rstd = c.pallas_call(
        kernel,
        target,
        launch.config,
        grid=launch.grid,
        in_specs=[launch.rows, launch.stats] + [launch.params] * len(params),
        out_specs=[launch.rows] + [launch.stats] * 3,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] + [stat_shape] * 3,
        name=f"eqxnorm_{op}_lengths_fwd",
    )(x, lengths[..., None], *params)
    return y, shift[..., 0], offset[..., 0], rstd[..., 0]


def _lengths_backward_on(
    target: Target, x, lengths, weight, dy, shift, offset, rstd, *, op: str, param_grads: bool
):
    """`(dx, dweight, dbias)` of [`_lengths_forward_on`][]'s rows, one `pallas_call` on
    `target` ([`_backward_on`][] with the lengths); `dweight`/`dbias` float32 sums over each
    group's rows (`None` unless `param_grads`)."""
    dx, _, dw, db = _backward_on(
        target,
        x,
        weight,
        dy,
        None,
        shift,
        offset,
        rstd,
        op=op,
        param_grads=param_grads,
        d_dtypes=(x.dtype,),
        lengths=lengths,
    )
    return dx.astype(x.dtype), dw, db


@functools.cache
def _lengths_forward(op: str, eps: float, backend: str):
    """`(x, lengths, weight, bias) -> (y, shift, offset, rstd)` on `(groups, rows, dim)`,
    `lengths` `(groups, rows)` batched like the rows (see [`_forward`][])."""

    @custom_vmap
    def forward(x, lengths, weight, bias):
        fn = functools.partial(_lengths_forward_on, op=op, eps=eps)
        mosaic_gpu = _mosaic_gpu(
            functools.partial(_mgpu.lengths_forward_on, op=op, eps=eps),
            _mgpu.lengths_forward_supported,
        )
        rule = c.Rule("g r d, g r, g d, g d -> g r d, g r, g r, g r", split="g r")
        args = (x, lengths, weight, bias)
        return c.per_platform(fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend)

    @forward.def_vmap
    def _(axis_size, in_batched, x, lengths, weight, bias):
        return _fold_forward(forward, axis_size, in_batched, (x, lengths, weight, bias))

    return forward


@functools.cache
def _lengths_backward(op: str, param_grads: bool, backend: str):
    """`(x, lengths, weight, dy, shift, offset, rstd) -> (dx, dweight, dbias)` (see
    [`_lengths_backward_on`][]), batching like [`_backward`][]."""

    @custom_vmap
    def backward(x, lengths, weight, dy, shift, offset, rstd):
        fn = functools.partial(_lengths_backward_on, op=op, param_grads=param_grads)
        mosaic_gpu = _mosaic_gpu(
            functools.partial(_mgpu.lengths_backward_on, op=op, param_grads=param_grads),
            _mgpu.lengths_backward_supported,
        )
        rule = c.Rule("g r d, g r, g d, g r d, g r, g r, g r -> g r d, g d, g d", "g r")
        args = (x, lengths, weight, dy, shift, offset, rstd)
        return c.per_platform(fn, *args, sharding=rule, mosaic_gpu=mosaic_gpu, backend=backend)

    @backward.def_vmap
    def _(axis_size, in_batched, *args):
        if axis_size == 0:
            return c.empty_batch(backward, in_batched, args)
        if in_batched[2]:
            folded = (_into_groups(axis_size, b, a) for b, a in zip(in_batched, args, strict=True))
            out = tuple(c.unfold(axis_size, o) for o in backward(*folded))
            return out, _all_batched(out)
        x, lengths, weight, dy, shift, offset, rstd = args
        batched = [_batched(axis_size, in_batched[i], args[i]) for i in (0, 1, 3, 4, 5, 6)]
        rows = [_into_rows(axis_size, True, a) for a in batched]
        dx, _, _ = _lengths_backward(op, False, backend)(rows[0], rows[1], weight, *rows[2:])
        out = (_from_rows(axis_size, dx), None, None)
        if param_grads:
            x, lengths, dy, shift, offset, rstd = batched
            valid = (lengths > 0)[..., None]
            centred = (x.astype(F32) - shift[..., None]) - offset[..., None]
            xhat = jnp.where(valid, centred * rstd[..., None], 0.0)
            dy = dy.astype(F32)
            out = (out[0], jnp.sum(dy * xhat, axis=2), jnp.sum(dy, axis=2))
        return out, _all_batched(out)

    return backward


def _lengths_tangent(center: bool, residuals, tangents):
    """`(t_y, t_mean, t_var)`: the reference's masked tangent (the JVP of
    `reference.normalize_masked` for the mask `col < lengths`) on `(groups, rows, dim)`,
    the statistics' `(groups, rows, 1)`; each tangent may be `None`."""
    x, lengths, weight, shift, offset, rstd = residuals
    tx, tw, tb = tangents
    width = x.shape[-1]
    n = jnp.minimum(lengths, width)[..., None]
    valid = jax.lax.broadcasted_iota(jnp.int32, x.shape, 2) < n
    inv_n = jnp.where(n > 0, 1 / jnp.maximum(n, 1).astype(F32), 0.0)
    r = rstd[..., None]
    centred = (x.astype(F32) - shift[..., None]) - offset[..., None]
    xhat = jnp.where(n > 0, centred * r, 0.0)
    t_y = jnp.zeros(x.shape, F32)
    t_mean = t_var = jnp.zeros_like(r)
    if tx is not None:
        t = jnp.where(valid, tx.astype(F32), 0.0)
        mean_xhat_t = jnp.sum(xhat * t, axis=2, keepdims=True) * inv_n
        t_var = 2 * mean_xhat_t / r
        p = jnp.where(n > 0, tx.astype(F32), 0.0) - xhat * mean_xhat_t
        if center:
            t_mean = jnp.sum(t, axis=2, keepdims=True) * inv_n
            p = p - t_mean
        t_y = p * r if weight is None else (p * r) * weight[:, None, :].astype(F32)
    if tw is not None:
        t_y = t_y + xhat * tw[:, None, :].astype(F32)
    if tb is not None:
        t_y = t_y + tb[:, None, :].astype(F32)
    return t_y, t_mean, t_var


@functools.cache
def _lengths_norm(op: str, eps: float, backend: str):
    """The differentiable function `(x, lengths, weight, bias) -> y` on `(groups, rows, dim)`
    (`lengths` `(groups, rows)` int32, parameters `(groups, dim)` or `None`), as
    `eqxnorm.kernels._autodiff.norm_with_jvp` builds it for the unmasked norms: the forward
    kernel with a JVP rule whose tangent of `y` is [`_lengths_tangent`][] in XLA, transposed
    by the backward kernel."""
    forward = _lengths_forward(op, eps, backend)
    center = _center(op)

    def apply(residuals, tangents):
        x = residuals[0]
        return _lengths_tangent(center, residuals, tangents)[0].astype(x.dtype)

    def transpose(residuals, dy, like):
        x, lengths, weight, shift, offset, rstd = residuals
        like_x, *like_params = like
        param_grads = any(p is not None for p in like_params)
        backward = _lengths_backward(op, param_grads, backend)
        dx, *grads = backward(x, lengths, weight, dy, shift, offset, rstd)
        return None if like_x is None else dx, *(
            None if p is None else g for p, g in zip(like_params, grads, strict=True)
        )

    def rule(primals, tangents):
        x, lengths, weight, bias = primals
        y, shift, offset, rstd = outputs(x, lengths, weight, bias)
        residuals = (x, lengths, weight, shift, offset, rstd)
        t_y = _autodiff.linear(apply, transpose, apply, residuals, (tangents[0], *tangents[2:]))
        _, t_mean, t_var = _lengths_tangent(center, residuals, (tangents[0], *tangents[2:]))
        t_mean, t_var = t_mean[..., 0], t_var[..., 0]
        t_stats = (jnp.zeros_like(t_mean), t_mean, -0.5 * rstd * rstd * rstd * t_var)
        return (y, shift, offset, rstd), (t_y, *t_stats)

    outputs = _autodiff.with_jvp(forward, rule)
    return lambda x, lengths, weight, bias: outputs(x, lengths, weight, bias)[0]


def _lengths_row_norm(op: str, x, lengths, weight, bias, eps: float, backend: str):
    lengths = jnp.clip(jnp.asarray(lengths).astype(jnp.int32), 0, x.shape[-1])
    norm = _lengths_norm(op, float(eps), backend)
    return norm(x[None], lengths[None], _one_group(weight), _one_group(bias))[0]


@typechecked()
def layer_norm_lengths(
    x: Float[Array, "rows dim"],
    lengths: Int[Array, " rows"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    backend: str = "auto",
) -> Float[Array, "rows dim"]:
    r"""`layer_norm` with each row's statistics over its first `lengths` columns only:
    `eqxnorm.kernels.reference.layer_norm` with the mask `col < lengths[row]`, read as one
    int per row. Every column is normalized; a row of length 0 gives its bias.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `lengths`: `(rows,)` integers (clipped to `[0, dim]`).
    - `weight`, `bias`, `eps`, `backend`: as for `layer_norm`.

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    return _lengths_row_norm("layer_norm", x, lengths, weight, bias, eps, backend)


@typechecked()
def rms_norm_lengths(
    x: Float[Array, "rows dim"],
    lengths: Int[Array, " rows"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    backend: str = "auto",
) -> Float[Array, "rows dim"]:
    r"""`rms_norm` with each row's statistics over its first `lengths` columns only (see
    `layer_norm_lengths`).

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `lengths`: `(rows,)` integers (clipped to `[0, dim]`).
    - `weight`, `bias`, `eps`, `backend`: as for `rms_norm`.

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    return _lengths_row_norm("rms_norm", x, lengths, weight, bias, eps, backend)
