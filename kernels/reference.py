r"""The reference implementation of every normalization, in plain `jax.numpy`.

This module is the oracle the Pallas kernels are tested against and the implementation used
on CPU. Each function works on the canonical layout its kernel uses (rows × features for the
row norms, `(batch, channels, spatial)` with the spatial axes flattened for the group and batch
norms) and has the same signature as the kernel entry point it checks. The public functions in
`eqxnorm.functional` reshape user arrays to these layouts, validate them and dispatch here.

The layouts' leading axes are any number of axes here, none included: a module's call on one
example reaches the reference without the unit batch axis the kernels need, so that under
`jax.vmap` XLA reduces `(batch, dim)` rather than `(batch, 1, dim)`, whose reductions its CPU
backend runs several times slower (the kernels fold the vmapped axis with `custom_vmap`).

Every norm takes its statistics from the one helper, [`moments`][], so the numerical
guarantees listed there hold for all of them.
"""

import dataclasses
import functools
import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Bool, Float

from .._checking import typechecked

AxisName = Hashable | Sequence[Hashable]


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype statistics are computed in: float64 for float64 input, else float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


class Moments(NamedTuple):
    """Statistics from [`moments`][]: the mean kept as `shift + offset`, and the variance.

    The mean is held in two parts because rounding `shift + offset` to one float32 value
    costs up to half an ulp of the mean, an absolute error that normalization divides by the
    standard deviation (at mean 1e4 and std 1, ~5e-4 in the output). `normalize` subtracts the
    parts one after the other instead: `x - shift` rounds relative to the centred value, not to
    the mean (and is exact for data within a factor 2 of it, by Sterbenz's lemma), and `offset`
    is tiny, so the centred values keep float32's relative accuracy.
    """

    shift: Array
    offset: Array
    var: Array

    @property
    def mean(self) -> Array:
        return self.shift + self.offset


@dataclasses.dataclass(frozen=True)
class AxisGroups:
    """A named axis (or sequence of names) whose members are pooled in groups: the
    `axis_index_groups` of Flax and Haiku (and of `lax.psum` under `pmap`). Where an
    `axis_name` is accepted, this pools each member's values with those of the members in
    its group only. `groups` partitions the member indices (in the order of the names, the
    last varying fastest) into groups of one size."""

    axis_name: AxisName
    groups: tuple[tuple[int, ...], ...]

    @property
    def group_size(self) -> int:
        return len(self.groups[0])


def _pool_groups(kind: str, value: Array, grouped: AxisGroups) -> Array:
    """`pool_members` within each member's group: every member puts its value in its group's
    slot of a `(groups, *value.shape)` array (the identity of the reduction elsewhere), the
    slots are pooled over all members, and each member takes its group's. One collective of
    `groups` times the values (per-channel statistics), and one code path for `vmap`, `pmap`
    and `shard_map` (`lax.psum`'s own `axis_index_groups` is `pmap`'s only)."""
    names = _names(grouped.axis_name)
    index = 0
    for name in names:
        index = index * lax.axis_size(name) + lax.axis_index(name)
    group_of = [0] * sum(len(g) for g in grouped.groups)
    for g, members in enumerate(grouped.groups):
        for member in members:
            group_of[member] = g
    group = jnp.asarray(group_of, jnp.int32)[index]
    mine = (jnp.arange(len(grouped.groups)) == group).reshape(-1, *(1,) * value.ndim)
    identity = -jnp.inf if kind == "max" else 0
    slots = jnp.where(mine, value[None], jnp.asarray(identity, value.dtype))
    pooled = pool_members("max" if kind == "max" else "sum", slots, grouped.axis_name)[group]
    return pooled / grouped.group_size if kind == "mean" else pooled


def axis_count(axis_name: AxisName | None) -> int:
    """The number of members of a named axis (the product over a sequence of names; 1 for
    `None`), or of one group of an [`AxisGroups`][]."""
    if isinstance(axis_name, AxisGroups):
        return axis_name.group_size
    return 1 if axis_name is None else math.prod(lax.axis_size(n) for n in _names(axis_name))


def _names(axis_name: AxisName) -> tuple[Hashable, ...]:
    """`axis_name` as a tuple of names (a list is not hashable, as a collective's needs)."""
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


_COLLECTIVES = {
    "sum": (lax.psum, jnp.sum),
    "mean": (lax.pmean, jnp.mean),
    "max": (lax.pmax, jnp.max),
}


def pool_members(kind: str, value: Array, axis_name: AxisName) -> Array:
    """`value` reduced across the members of `axis_name`: `lax.psum`, `lax.pmean` or
    `lax.pmax` for `kind` `"sum"`, `"mean"` or `"max"` (within each group for an
    [`AxisGroups`][]).

    Over a `vmap`ped axis, through `lax.all_gather` and a reduction over the gathered axis:
    JAX 0.10.2 lowers a collective over a `vmap`ped axis to a reduction typed with its
    operand's sharding, which fails ("does not evenly divide") when that axis is split over
    an Explicit mesh, as in a batch-sharded `jit(vmap(norm, axis_name=...))`. The values
    pooled are per-channel or per-row statistics, so gathering them costs little. Over the
    manual axes of a `shard_map` (the kernels' own partitioning included), the collective."""
    if isinstance(axis_name, AxisGroups):
        return _pool_groups(kind, value, axis_name)
    collective, reduce = _COLLECTIVES[kind]
    manual = jax.sharding.get_abstract_mesh().manual_axes
    # One name at a time (a sum, mean or max over equal members nests), as `all_gather`
    # refuses a tuple mixing a `pmap` and a `vmap` axis.
    for name in _names(axis_name):
        if name in manual:
            value = collective(value, name)
        else:
            value = reduce(lax.all_gather(value, name), axis=0)
    return value


def _mean(axis_name: AxisName | None, axis, *values: Array) -> tuple[Array, ...]:
    """Means of `values` over `axis` (and over the members of `axis_name`).

    Each is the sum of `v · (1/n)`, not `sum(v) / n`: the mean is then the output of a
    reduction, which XLA keeps as one rounded value, whereas `sum · (1/n)` it may recompute
    inside each consumer's fusion, where `x - sum · (1/n)` can become one fused multiply-add
    that rounds differently from `x - mean` (so the numerics would depend on what XLA
    fuses). A mean of exact zeros stays exactly 0."""
    axes = (axis,) if isinstance(axis, int) else axis
    count = math.prod(values[0].shape[a] for a in axes) * axis_count(axis_name)
    scale = jnp.asarray(1 / max(count, 1), values[0].dtype)
    means = tuple(jnp.sum(v * scale, axis=axis, keepdims=True) for v in values)
    return means if axis_name is None else tuple(pool_members("sum", m, axis_name) for m in means)


def _first(x: Array, axis) -> Array:
    """The value of one element of every slice of `x` over `axis` (those axes kept with size
    1): index 0 along each, except along an axis named `0`, which may be a batch split across
    devices (where a slice of one element has no sharding), the largest. An axis counted from
    the end (negative) is an example's own: sliced, even when it is the first (a single
    example, which `vmap` may batch but never splits along that axis)."""
    for a in (axis,) if isinstance(axis, int) else axis:
        if a == 0:
            x = jnp.max(x, axis=0, keepdims=True)
        else:
            x = lax.slice_in_dim(x, 0, 1, axis=a % x.ndim)
    return x


def moments(
    x: Array,
    axis: int | tuple[int, ...],
    *,
    center: bool = True,
    axis_name: AxisName | None = None,
) -> Moments:
    r"""Mean and (biased) variance of `x` over `axis`: the statistics of every normalization.

    With $m_1 = \overline{x}$ (a first pass, rounded once), $d = x - m_1$ and $d_0$ the $d$
    of one element of the slice (see `_first`), this returns

    $$\mu = m_1 + \left(d_0 + \overline{d - d_0}\right), \qquad
      \sigma^2 = \max\left(0,\ \overline{d^2} - \left(d_0 + \overline{d - d_0}\right)^2
      \right),$$

    the *corrected two-pass* algorithm (Chan, Golub & LeVeque, 1983), with $\mu$ kept as the
    pair `(shift, offset) = (m₁, d₀ + mean(d − d₀))`. Guarantees:

    - Computed in float32 whatever the input dtype (float64 for float64 input); `x` is cast
      before anything is summed, so float16 inputs near 6e4 cannot overflow.
    - The variance error does not grow with the size of the mean: there is no
      `E[x²] − E[x]²` cancellation (its error bound is that of two-pass summation), and
      [`normalize`][] centres with the two parts of the mean, so neither does the output's.
    - The same under `jax.jit` as eagerly, whatever XLA fuses: every mean is the output of
      a reduction (see `_mean`), one rounded value that no consumer recomputes in a
      fused multiply-add form.
    - A constant slice gives `(x - shift) - offset == 0` exactly, so a normalization of it
      returns exactly its bias: every `d` equals `d₀`, so `mean(d − d₀)` is a mean of exact
      zeros and `offset` is `d₀` itself. Its `σ²` is 0 up to rounding (of order `n·u²·c²`
      for a slice of `n` copies of `c` with unit roundoff `u`, far below any sensible `eps`).
    - `σ² >= 0` always; `σ² = inf` when the squared deviations overflow (|x − mean| ≳ 1.8e19
      in float32), which `inverse_std` turns into NaN.
    - NaN/Inf in a slice propagate to that slice's statistics (and so its output).
    - With `axis_name`, the statistics are over the union of the slices held by every member
      of that named axis (`vmap`, `pmap`, `shard_map`), their sums combined with `lax.psum`
      (`d₀` is the largest member's, by `lax.pmax`, so it is shared). All members hold the
      same number of elements, so the result equals the statistics of the concatenated data.
    - With `center=False`, `μ = 0` and `σ² = mean(x²)`: the RMSNorm statistic.

    **Arguments:**

    - `x`: an array of any shape and floating dtype.
    - `axis`: the axis or axes reduced over.
    - `center`: whether to subtract the mean (`False` for RMSNorm).
    - `axis_name`: a named axis (or sequence of names) to reduce over as well.

    **Returns:**

    A [`Moments`][] `(shift, offset, var)`, each of `x`'s shape with the reduced axes kept as
    size 1, in `compute_dtype(x.dtype)`.
    """
    xf = x.astype(compute_dtype(x.dtype))
    if not center:
        (second,) = _mean(axis_name, axis, xf * xf)
        zero = jnp.zeros_like(second)
        return Moments(zero, zero, second)
    (shift,) = _mean(axis_name, axis, xf)
    d = xf - shift
    # The mean does not depend on d₀ (it cancels), only its rounding does: no gradient.
    d0 = lax.stop_gradient(_first(d, axis))
    if axis_name is not None:
        d0 = pool_members("max", d0, axis_name)
    rel, d_sq_mean = _mean(axis_name, axis, d - d0, d * d)
    offset = d0 + rel
    return Moments(shift, offset, jnp.maximum(d_sq_mean - offset * offset, 0))


def inverse_std(var: Array, eps: float) -> Array:
    r"""$r = (\sigma^2 + \varepsilon)^{-1/2}$, NaN where $\sigma^2$ overflowed to infinity:
    `rsqrt(inf)` is 0 and would silently turn the slice into its bias."""
    rstd = lax.rsqrt(var + jnp.asarray(eps, var.dtype))
    return jnp.where(var == jnp.inf, jnp.asarray(jnp.nan, var.dtype), rstd)


def normalize(
    x: Array,
    stats: Moments,
    weight: Array | None,
    bias: Array | None,
    *,
    eps: float,
) -> Array:
    r"""$y = (x - \mu) / \sqrt{\sigma^2 + \varepsilon} \cdot \gamma + \beta$, computed in the
    statistics' dtype and returned in `x.dtype`; $x - \mu$ is evaluated as
    `(x - shift) - offset`.

    `stats`' arrays, `weight` and `bias` must already have `x`'s rank (broadcastable shapes);
    `weight`/`bias` may be `None` (no scale / no shift).
    """
    cdt = stats.var.dtype
    centred = (x.astype(cdt) - stats.shift) - stats.offset
    y = centred * inverse_std(stats.var, eps)
    if weight is not None:
        y = y * weight.astype(cdt)
    if bias is not None:
        y = y + bias.astype(cdt)
    return y.astype(x.dtype)


def _pmean(value: Array, axis_name: AxisName | None) -> Array:
    return value if axis_name is None else pool_members("mean", value, axis_name)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6))
def normalized(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    axis: int | tuple[int, ...],
    center: bool,
    eps: float,
    axis_name: AxisName | None = None,
) -> tuple[Array, Array, Array]:
    r"""`(y, mean, var)`: $y = \hat{x}\gamma + \beta$ with $\hat{x}$ `x` normalized over
    `axis` (and the members of `axis_name`) by [`moments`][] and [`normalize`][], in the
    statistics' dtype, and the statistics used (`mean` is 0 when not centring; both of `x`'s
    rank, the reduced axes of size 1): the one normalization every reference norm goes
    through (via [`normalize_slices`][], which swaps in a rematerialised autodiff twin when
    statistics are pooled over an `axis_name`).

    Its derivative is given as a JVP (so forward mode, `jax.jacfwd` and higher derivatives
    work) built so that reverse mode keeps only `x` in its own dtype, the per-slice float32
    statistics and `weight` as residuals: the tangent map is rematerialised from them
    (`jax.checkpoint`) rather than saved. With $r = (\sigma^2 + \varepsilon)^{-1/2}$,

    $$\dot{y} = r\gamma\left(\dot{x} - \overline{\dot{x}} - \hat{x}\,\overline{\hat{x}\dot{x}}
    \right) + \hat{x}\dot{\gamma} + \dot{\beta}, \qquad \dot{\mu} = \overline{\dot{x}},
    \qquad \dot{\sigma}^2 = \frac{2}{r}\,\overline{\hat{x}\dot{x}}$$

    (without $\overline{\dot{x}}$ when not centring), whose transpose is the usual
    $\partial x = r\left(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}\right)$,
    $g = \partial y\,\gamma$: two reductions per slice and no saved copy of $\hat{x}$.

    `weight`/`bias` must broadcast against `x` (already of its rank) or be `None`.
    """
    xf = x.astype(compute_dtype(x.dtype))
    stats = moments(xf, axis, center=center, axis_name=axis_name)
    return normalize(xf, stats, weight, bias, eps=eps), stats.mean, stats.var


def _normalized_tangent(axis, center, axis_name, x, shift, offset, rstd, weight, tx, tw, tb):
    cdt = rstd.dtype
    centred = ((x.astype(cdt) - shift) - offset) if center else x.astype(cdt)
    xhat = centred * rstd
    terms = []
    t_mean = t_var = jnp.zeros_like(rstd)
    if tx is not None:
        t = tx.astype(cdt)
        mean_xhat_t = _pmean(jnp.mean(xhat * t, axis=axis, keepdims=True), axis_name)
        t_var = 2 * mean_xhat_t / rstd
        p = t - xhat * mean_xhat_t
        if center:
            t_mean = _pmean(jnp.mean(t, axis=axis, keepdims=True), axis_name)
            p = p - t_mean
        # `(p · r) · γ`, not `p · (r · γ)`: with a constant γ (a closed-over layer) under
        # `vmap`, the latter's fusion crashes XLA's CPU backend (jaxlib 0.10.2, YNNPACK) at
        # 4096x1024 and above.
        terms.append(p * rstd if weight is None else (p * rstd) * weight.astype(cdt))
    if tw is not None:
        terms.append(xhat * tw.astype(cdt))
    if tb is not None:
        # Broadcast to xhat's sharding (its batch split over an explicit mesh): else the
        # transpose reshards the cotangent to the broadcast's replicated type, gathering it.
        sharding = jax.typeof(xhat).sharding
        terms.append(jnp.broadcast_to(tb.astype(cdt), xhat.shape, out_sharding=sharding))
    t_y = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(xhat)
    return t_y, t_mean, t_var


def _normalized_jvp(axis, center, eps, axis_name, primals, tangents):
    x, weight, bias = primals
    tx, tw, tb = (None if isinstance(t, SymbolicZero) else t for t in tangents)
    xf = x.astype(compute_dtype(x.dtype))
    stats = moments(xf, axis, center=center, axis_name=axis_name)
    y = normalize(xf, stats, weight, bias, eps=eps)
    rstd = inverse_std(stats.var, eps)
    tangent = jax.checkpoint(
        functools.partial(_normalized_tangent, axis, center, axis_name),
        policy=jax.checkpoint_policies.nothing_saveable,
    )
    # RMSNorm's shift and offset are zeros: not passed, so not saved.
    shift, offset = (stats.shift, stats.offset) if center else (None, None)
    return (y, stats.mean, stats.var), tangent(x, shift, offset, rstd, weight, tx, tw, tb)


normalized.defjvp(_normalized_jvp, symbolic_zeros=True)


def _pooled(x, weight, bias, axis, center, eps, axis_name):
    xf = x.astype(compute_dtype(x.dtype))
    stats = moments(xf, axis, center=center, axis_name=axis_name)
    stats = Moments(*(checkpoint_name(s, "eqxnorm_statistics") for s in stats))
    return normalize(xf, stats, weight, bias, eps=eps), stats.mean, stats.var


def normalize_slices(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    axis: int | tuple[int, ...],
    center: bool,
    eps: float,
    axis_name: AxisName | None,
    mask: Array | None = None,
) -> tuple[Array, Array, Array]:
    """[`normalized`][], or with `axis_name` its autodiff twin under `jax.checkpoint`
    saving only the statistics (the same residuals): JAX cannot run the collective of a
    custom JVP rule under `vmap` with that axis name (the rule is traced outside the
    `vmap`'s axis environment). With a `mask` (boolean, `x`'s shape), the statistics count
    only its `True` elements: see [`normalize_masked`][]."""
    if mask is not None:
        return normalize_masked(x, mask, weight, bias, axis, center, eps, axis_name)
    if axis_name is None:
        return normalized(x, weight, bias, axis, center, eps, None)
    policy = jax.checkpoint_policies.save_only_these_names("eqxnorm_statistics")
    pooled = jax.checkpoint(_pooled, policy=policy, static_argnums=(3, 4, 5, 6))
    return pooled(x, weight, bias, axis, center, eps, axis_name)


def _leading_ones(param: Array | None, ndim: int, trailing: int = 0) -> Array | None:
    """`param` with unit axes in front (and `trailing` unit axes behind) up to rank `ndim`:
    the shape that broadcasts it against an `x` of that rank without rank promotion."""
    if param is None:
        return None
    return param.reshape((1,) * (ndim - param.ndim - trailing) + param.shape + (1,) * trailing)


def _channel_params(param: Array | None, ndim: int) -> Array | None:
    """A `(channels,)` parameter against `(*batch, channels, spatial)` of rank `ndim`."""
    return _leading_ones(param, ndim, trailing=1)


def _rows_params(x: Array, *params: Array | None) -> tuple[Array | None, ...]:
    """`(dim,)` parameters against rows `x` of shape `(*rows, dim)`."""
    return tuple(_leading_ones(p, x.ndim) for p in params)


def _group_normalized(
    x: Array, groups: int, weight, bias, eps: float, mask=None, channels_last: bool = False
) -> Array:
    """GroupNorm of `x` `(*batch, channels, spatial)` with per-channel parameters of shape
    `(*batch or ones, channels, 1)`, through [`normalized`][] on the `(*batch, groups,
    channels/groups, spatial)` view; returned in `x.dtype`. With `channels_last`, `x` is
    `(*batch, spatial, channels)`, the parameters `(*batch or ones, 1, channels)` and the view
    `(*batch, spatial, groups, channels/groups)`, reduced over its spatial and
    channels-in-group axes (a reshape, never a transpose). `mask`: `x`'s shape, or `None`."""
    *batch, a, b = x.shape
    channels, spatial = (b, a) if channels_last else (a, b)
    if groups == channels:
        # One channel per group (InstanceNorm): the layout itself, whose one-axis reductions
        # XLA's CPU backend runs ~2.5x faster than the 4-D view's.
        axis = -2 if channels_last else -1
        return normalize_slices(x, weight, bias, axis, True, eps, None, mask)[0].astype(x.dtype)
    per_group = (groups, channels // groups)
    if channels_last:
        view, axes = (*batch, spatial, *per_group), (-3, -1)
    else:
        view, axes = (*batch, *per_group, spatial), (-2, -1)

    def grouped(p):
        if p is None:
            return None
        if channels_last:
            return p.reshape(*p.shape[:-1], *per_group)
        return p.reshape(*p.shape[:-2], *per_group, 1)

    xg = x.reshape(view)
    mg = None if mask is None else mask.reshape(view)
    y = normalize_slices(xg, grouped(weight), grouped(bias), axes, True, eps, None, mg)[0]
    return y.reshape(x.shape).astype(x.dtype)


# --- output options: weight offset, output dtype, FP8 output ----------------------------------

FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def offset_weight(weight: Array | None, weight_offset: float, dtype) -> Array | None:
    r"""The scale a norm applies, $\text{offset} + \gamma$, in `dtype` (the statistics'):
    zero-centred $\gamma$ (Gemma's RMSNorm, "LayerNorm1p", TransformerEngine's
    `zero_centered_gamma`) stores $\gamma$ around 0 and applies $1 + \gamma$. `weight` itself
    when the offset is 0, so that plain norms keep their parameters' dtype."""
    if weight is None or weight_offset == 0:
        return weight
    return weight.astype(dtype) + jnp.asarray(weight_offset, dtype)


def saturated(y: Array, scale: Array, dtype) -> Array:
    """`clip(y · scale, ±max)` in `y`'s dtype, `max` the largest finite value of the float8
    `dtype`: the FP8 output before its cast (the kernels' too)."""
    fmax = float(jnp.finfo(dtype).max)
    return jnp.minimum(jnp.maximum(y * scale, -fmax), fmax)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _scaled_cast(y: Array, scale: Array, dtype) -> Array:
    return saturated(y, scale, dtype).astype(dtype)


def _scaled_cast_jvp(dtype, primals, tangents):
    # Straight through the clip and the rounding (the FP8 training convention): the tangent
    # is the scaled tangent of y, so the backward is the norm's with γ·s and β·s.
    y, scale = primals
    return _scaled_cast(y, scale, dtype), (tangents[0] * scale).astype(dtype)


_scaled_cast.defjvp(_scaled_cast_jvp)


def quantize_fp8(y: Array, scale: Array, dtype) -> tuple[Array, Array]:
    r"""`(q, amax)`: $q = \mathrm{cast}(\mathrm{clip}(y \cdot s, -m, m))$ with $m$ the largest
    finite value of the float8 `dtype`, and $\text{amax} = \max|y|$ over every element of
    the unscaled `y`, a float32 (float64 for float64 `y`) scalar. The clip saturates (as
    TransformerEngine does, `cast(clip(y·scale))`): a value beyond the range becomes $\pm m$,
    never NaN or inf; NaN stays NaN; the cast rounds to nearest, ties to even.

    `y` is the norm's output in the statistics' dtype, before any rounding. The derivative
    is straight-through: $\dot{q} = \mathrm{cast}(\dot{y}\,s)$; `scale` and `amax` carry no
    gradient (they are the scaling recipe's state, not parameters)."""
    scale = lax.stop_gradient(jnp.asarray(scale, y.dtype))
    amax = lax.stop_gradient(jnp.max(jnp.abs(y)))
    return _scaled_cast(y, scale, jnp.dtype(dtype)), amax


def _output(y: Array, dtype, fp8_scale: Array | None):
    """`y` (the statistics' dtype) as the norm returns it: rounded to `dtype`, or with an
    `fp8_scale` quantized by [`quantize_fp8`][] to `(q, amax)`."""
    if fp8_scale is None:
        return y.astype(dtype)
    return quantize_fp8(y, fp8_scale, dtype)


def _row_norm_options(
    op, x, weight, bias, eps, axis_name, weight_offset, out_dtype, fp8_scale, mask=None
):
    """A row norm (`op`: `"layer_norm"` or `"rms_norm"`) with its output options (and a
    padding `mask`)."""
    weight = offset_weight(weight, weight_offset, compute_dtype(x.dtype))
    params = _rows_params(x, weight, bias)
    y = normalize_slices(x, *params, -1, op == "layer_norm", eps, axis_name, mask)[0]
    return _output(y, x.dtype if out_dtype is None else out_dtype, fp8_scale)


@typechecked()
def layer_norm(
    x: Float[Array, "*rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    axis_name: AxisName | None = None,
    mask: Bool[Array, "*rows dim"] | None = None,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
) -> Float[Array, "*rows dim"] | tuple[Float[Array, "*rows dim"], Float[Array, ""]]:
    r"""LayerNorm of each row: $y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}}
    \gamma + \beta$, statistics over `dim`.

    **Arguments:**

    - `x`: `(*rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.
    - `axis_name`: a named axis (or names) whose members each hold a slice of the features
        (tensor parallelism): the statistics are over all of them, pooled with `lax.pmean`.
    - `mask`: `(*rows, dim)` booleans, `True` where an element counts in its row's
        statistics (see [`normalize_masked`][]), or `None` for all of them.
    - `weight_offset`: the scale applied is `weight_offset + weight` (see [`offset_weight`][]).
    - `out_dtype`: the dtype of `y` (default `x.dtype`); a float8 dtype with `fp8_scale`.
    - `fp8_scale`: a scalar: `y` is quantized to the float8 `out_dtype` by
        [`quantize_fp8`][], and the amax of the unscaled output returned beside it.

    **Returns:**

    `(*rows, dim)` in `out_dtype`; with `fp8_scale`, `(y, amax)`.
    """
    return _row_norm_options(
        "layer_norm", x, weight, bias, eps, axis_name, weight_offset, out_dtype, fp8_scale, mask
    )


@typechecked()
def rms_norm(
    x: Float[Array, "*rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    axis_name: AxisName | None = None,
    mask: Bool[Array, "*rows dim"] | None = None,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
) -> Float[Array, "*rows dim"] | tuple[Float[Array, "*rows dim"], Float[Array, ""]]:
    r"""RMSNorm of each row: $y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \varepsilon}}\gamma
    + \beta$, statistics over `dim`.

    **Arguments:**

    - `x`: `(*rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `axis_name`, `mask`, `weight_offset`, `out_dtype`, `fp8_scale`: as for [`layer_norm`][].

    **Returns:**

    `(*rows, dim)` in `out_dtype`; with `fp8_scale`, `(y, amax)`.
    """
    return _row_norm_options(
        "rms_norm", x, weight, bias, eps, axis_name, weight_offset, out_dtype, fp8_scale, mask
    )


@typechecked()
def group_norm(
    x: Float[Array, "*batch channels spatial"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
    mask: Bool[Array, "*batch channels spatial"] | None = None,
) -> Float[Array, "*batch channels spatial"]:
    r"""GroupNorm: the channels are split into `groups` contiguous groups and each
    `(example, group)` slice of `channels/groups × spatial` elements is normalized with its
    own statistics; the affine parameters are per channel.

    InstanceNorm is the case `groups == channels`.

    **Arguments:**

    - `x`: `(*batch, channels, spatial)`, the spatial axes flattened (`spatial` may be 1).
    - `weight`, `bias`: `(channels,)` or `None`.
    - `groups`: divides `channels`.
    - `eps`: added to the variance.
    - `mask`: `x`'s shape, `True` where an element counts in its group's statistics (see
        [`normalize_masked`][]), or `None` for all of them.

    **Returns:**

    `(*batch, channels, spatial)` in `x.dtype`.
    """
    params = (_channel_params(p, x.ndim) for p in (weight, bias))
    return _group_normalized(x, groups, *params, eps, mask)


@typechecked()
def batch_norm(
    x: Float[Array, "*batch channels spatial"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    eps: float,
    axis_name: AxisName | None = None,
    mask: Bool[Array, "*batch channels spatial"] | None = None,
) -> tuple[
    Float[Array, "*batch channels spatial"], Float[Array, " channels"], Float[Array, " channels"]
]:
    r"""BatchNorm with batch statistics: per channel over `batch × spatial` (and over every
    member of `axis_name`, when given).

    **Arguments:**

    - `x`: `(*batch, channels, spatial)`, the spatial axes flattened.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance.
    - `axis_name`: a named axis (or names) whose members' batches are pooled into the
        statistics (`vmap`, `pmap`, `shard_map`).
    - `mask`: `x`'s shape, `True` where an element counts in its channel's statistics (see
        [`normalize_masked`][]), or `None` for all of them.

    **Returns:**

    `(y, mean, var)`: `y` of `x`'s shape and dtype; the batch `mean` and biased `var`,
    `(channels,)` in the statistics dtype (float32, or float64 for float64 input).
    """
    # Over the batch axis (named 0: it may be split across devices) and the spatial one.
    axes = (*range(x.ndim - 2), x.ndim - 1)
    params = (_channel_params(p, x.ndim) for p in (weight, bias))
    y, mean, var = normalize_slices(x, *params, axes, True, eps, axis_name, mask)
    channels = x.shape[-2]
    return y.astype(x.dtype), mean.reshape(channels), var.reshape(channels)


@typechecked()
def batch_norm_inference(
    x: Float[Array, "*batch channels spatial"],
    mean: Float[Array, " channels"],
    var: Float[Array, " channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    eps: float,
) -> Float[Array, "*batch channels spatial"]:
    r"""BatchNorm with given (running) statistics: $y = (x - \mu_c)/\sqrt{\sigma^2_c +
    \varepsilon}\,\gamma_c + \beta_c$.

    **Arguments:**

    - `x`: `(*batch, channels, spatial)`.
    - `mean`, `var`: `(channels,)`, the statistics to normalize with.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance.

    **Returns:**

    `(*batch, channels, spatial)` in `x.dtype`.
    """
    cdt = compute_dtype(x.dtype)
    mean, var = (_channel_params(s.astype(cdt), x.ndim) for s in (mean, var))
    stats = Moments(mean, jnp.zeros_like(mean), var)
    params = (_channel_params(p, x.ndim) for p in (weight, bias))
    return normalize(x, stats, *params, eps=eps)


def _added(x: Array, residual: Array) -> Array:
    """`x + residual` summed in the statistics dtype and stored in `residual.dtype`: the new
    residual stream, exactly as an unfused `x + residual` in that dtype would hold it."""
    cdt = max(compute_dtype(x.dtype), compute_dtype(residual.dtype), key=lambda d: d.itemsize)
    return (x.astype(cdt) + residual.astype(cdt)).astype(residual.dtype)


def _add_row_norm(x, residual, weight, bias, eps, center, options=(0.0, None, None)):
    h = _added(x, residual)
    weight_offset, out_dtype, fp8_scale = options
    weight = offset_weight(weight, weight_offset, compute_dtype(h.dtype))
    y = normalize_slices(h, *_rows_params(h, weight, bias), -1, center, eps, None)[0]
    out = _output(y, x.dtype if out_dtype is None else out_dtype, fp8_scale)
    return (out[0], h, out[1]) if fp8_scale is not None else (out, h)


@typechecked()
def add_layer_norm(
    x: Float[Array, "*rows dim"],
    residual: Float[Array, "*rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
) -> (
    tuple[Float[Array, "*rows dim"], Float[Array, "*rows dim"]]
    | tuple[Float[Array, "*rows dim"], Float[Array, "*rows dim"], Float[Array, ""]]
):
    r"""Residual add then LayerNorm, as in a pre-norm transformer block:

    $$h = x + r, \qquad y = \frac{h - \mathbb{E}[h]}{\sqrt{\mathrm{Var}[h] + \varepsilon}}
    \gamma + \beta.$$

    **Arguments:**

    - `x`: `(*rows, dim)`, the block's output.
    - `residual`: `(*rows, dim)`, the residual stream $r$ (may have another floating dtype than
        `x`, e.g. float32 under bfloat16 activations).
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.
    - `weight_offset`, `out_dtype`, `fp8_scale`: as for [`layer_norm`][]; `out_dtype` is `y`'s
        alone (`h` stays in `residual.dtype`).

    **Returns:**

    `(y, h)`: `y` `(*rows, dim)` in `out_dtype` (default `x.dtype`); `h` `(*rows, dim)`, the new
    residual stream, summed in float32 and stored in `residual.dtype`. `y` is the norm of `h`
    as stored, so the pair equals the unfused sequence exactly. With `fp8_scale`,
    `(y, h, amax)`.
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _add_row_norm(x, residual, weight, bias, eps, center=True, options=options)


@typechecked()
def add_rms_norm(
    x: Float[Array, "*rows dim"],
    residual: Float[Array, "*rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
    fp8_scale: Float[Array, ""] | None = None,
) -> (
    tuple[Float[Array, "*rows dim"], Float[Array, "*rows dim"]]
    | tuple[Float[Array, "*rows dim"], Float[Array, "*rows dim"], Float[Array, ""]]
):
    r"""Residual add then RMSNorm: $h = x + r$, $y = h / \sqrt{\overline{h^2} + \varepsilon}
    \cdot \gamma + \beta$.

    **Arguments:**

    - `x`: `(*rows, dim)`.
    - `residual`: `(*rows, dim)`, the residual stream.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `weight_offset`, `out_dtype`, `fp8_scale`: as for [`add_layer_norm`][].

    **Returns:**

    `(y, h)` as for [`add_layer_norm`][]: `y` in `out_dtype`, `h` in `residual.dtype`; with
    `fp8_scale`, `(y, h, amax)`.
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _add_row_norm(x, residual, weight, bias, eps, center=False, options=options)


def modulation(
    scale: Array, shift: Array, weight: Array | None, bias: Array | None, dtype
) -> tuple[Array, Array]:
    r"""The per-example parameters of an adaptive (modulated) norm, in `dtype`:
    $W = \gamma\,(1 + s)$ and $B = \beta\,(1 + s) + t$, so that
    $(\hat{x}\gamma + \beta)(1 + s) + t = \hat{x} W + B$ (`weight`/`bias` `None`: $\gamma = 1$,
    $\beta = 0$). `scale`/`shift` are `(*examples, features)`, the parameters `(features,)`."""
    one_plus = 1 + scale.astype(dtype)
    weight, bias = (_leading_ones(p, scale.ndim) for p in (weight, bias))
    w = one_plus if weight is None else one_plus * weight.astype(dtype)
    b = shift.astype(dtype)
    if bias is not None:
        b = b + one_plus * bias.astype(dtype)
    return w, b


def _adaptive_row_norm(x, scale, shift, weight, bias, eps, center, options=(0.0, None)):
    weight_offset, out_dtype = options
    cdt = compute_dtype(x.dtype)
    w, b = modulation(scale, shift, offset_weight(weight, weight_offset, cdt), bias, cdt)
    # The rows between the groups and the features share their group's parameters.
    w, b = (p.reshape(*p.shape[:-1], *(1,) * (x.ndim - p.ndim), p.shape[-1]) for p in (w, b))
    y = normalize_slices(x, w, b, -1, center, eps, None)[0]
    return y.astype(x.dtype if out_dtype is None else out_dtype)


@typechecked()
def adaptive_layer_norm(
    x: Float[Array, "*groups_and_rows dim"],
    scale: Float[Array, "*groups dim"],
    shift: Float[Array, "*groups dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
) -> Float[Array, "*groups_and_rows dim"]:
    r"""Adaptive LayerNorm (adaLN, FiLM): LayerNorm of each row, then a per-group modulation,

    $$y = \left(\hat{x}\gamma + \beta\right)(1 + s_g) + t_g, \qquad
    \hat{x} = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}},$$

    where group $g$ is typically one example and its rows are its tokens; computed in float32
    and rounded once.

    **Arguments:**

    - `x`: `(*groups, *rows, dim)`.
    - `scale`, `shift`: `(*groups, dim)`, $s$ and $t$.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.
    - `weight_offset`: $\gamma$ above is `weight_offset + weight` (see [`offset_weight`][]).
    - `out_dtype`: the dtype of `y` (default `x.dtype`).

    **Returns:**

    `(*groups, *rows, dim)` in `out_dtype`.
    """
    options = (weight_offset, out_dtype)
    return _adaptive_row_norm(x, scale, shift, weight, bias, eps, center=True, options=options)


@typechecked()
def adaptive_rms_norm(
    x: Float[Array, "*groups_and_rows dim"],
    scale: Float[Array, "*groups dim"],
    shift: Float[Array, "*groups dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
    weight_offset: float = 0.0,
    out_dtype=None,
) -> Float[Array, "*groups_and_rows dim"]:
    r"""Adaptive RMSNorm: $y = (\hat{x}\gamma + \beta)(1 + s_g) + t_g$ with
    $\hat{x} = x / \sqrt{\overline{x^2} + \varepsilon}$.

    **Arguments:**

    - `x`: `(*groups, *rows, dim)`.
    - `scale`, `shift`: `(*groups, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `weight_offset`, `out_dtype`: as for [`adaptive_layer_norm`][].

    **Returns:**

    `(*groups, *rows, dim)` in `out_dtype`.
    """
    options = (weight_offset, out_dtype)
    return _adaptive_row_norm(x, scale, shift, weight, bias, eps, center=False, options=options)


@typechecked()
def adaptive_group_norm(
    x: Float[Array, "*batch channels spatial"],
    scale: Float[Array, "*batch channels"],
    shift: Float[Array, "*batch channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
) -> Float[Array, "*batch channels spatial"]:
    r"""Adaptive GroupNorm (FiLM, the diffusion U-Net's conditioning):
    $y = (\hat{x}\gamma + \beta)(1 + s_{b,c}) + t_{b,c}$ with $\hat{x}$ the GroupNorm of
    [`group_norm`][], per example $b$ and channel $c$.

    **Arguments:**

    - `x`: `(*batch, channels, spatial)`.
    - `scale`, `shift`: `(*batch, channels)`.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `groups`: divides `channels`.
    - `eps`: added to the variance.

    **Returns:**

    `(*batch, channels, spatial)` in `x.dtype`.
    """
    w, b = modulation(scale, shift, weight, bias, compute_dtype(x.dtype))
    return _group_normalized(x, groups, w[..., None], b[..., None], eps)


@typechecked()
def group_norm_channels_last(
    x: Float[Array, "*batch spatial channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
    mask: Bool[Array, "*batch spatial channels"] | None = None,
) -> Float[Array, "*batch spatial channels"]:
    r"""[`group_norm`][] of channels-last input: each `(example, group)` slice of `spatial ×
    channels/groups` elements normalized with its own statistics, reduced where it lies.

    **Arguments:**

    - `x`: `(*batch, spatial, channels)`, the spatial axes flattened (`spatial` may be 1).
    - `weight`, `bias`, `groups`, `eps`, `mask`: as [`group_norm`][] (`mask` of `x`'s
        shape).

    **Returns:**

    `(*batch, spatial, channels)` in `x.dtype`.
    """
    params = (_leading_ones(p, x.ndim) for p in (weight, bias))
    return _group_normalized(x, groups, *params, eps, mask, channels_last=True)


@typechecked()
def adaptive_group_norm_channels_last(
    x: Float[Array, "*batch spatial channels"],
    scale: Float[Array, "*batch channels"],
    shift: Float[Array, "*batch channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
) -> Float[Array, "*batch spatial channels"]:
    r"""[`adaptive_group_norm`][] of channels-last input.

    **Arguments:**

    - `x`: `(*batch, spatial, channels)`.
    - `scale`, `shift`, `weight`, `bias`, `groups`, `eps`: as [`adaptive_group_norm`][].

    **Returns:**

    `(*batch, spatial, channels)` in `x.dtype`.
    """
    w, b = modulation(scale, shift, weight, bias, compute_dtype(x.dtype))
    return _group_normalized(x, groups, w[..., None, :], b[..., None, :], eps, channels_last=True)


# --- per-head QK-norm, gated RMSNorm, Dynamic Tanh -------------------------------------------


def _qk_center(norm: str) -> bool:
    """Whether the QK-norm `norm` (`"rms_norm"` or `"layer_norm"`) subtracts the mean."""
    if norm not in ("rms_norm", "layer_norm"):
        raise ValueError(
            f"norm must be 'rms_norm' or 'layer_norm', but got norm={norm!r}. Use "
            f"norm='rms_norm' for the QK-norm of Qwen3, OLMo 2 and Gemma 3."
        )
    return norm == "layer_norm"


def _head_norm(x: Array, weight: Array | None, eps: float, center: bool) -> Array:
    """`x` `(*tokens, heads, head_dim)` normalized over `head_dim`, `weight` `(head_dim,)` or
    `(heads, head_dim)` (or `None`)."""
    y = normalize_slices(x, _leading_ones(weight, x.ndim), None, -1, center, eps, None)[0]
    return y.astype(x.dtype)


@typechecked()
def qk_norm(
    q: Float[Array, "*q_tokens q_heads head_dim"],
    k: Float[Array, "*k_tokens k_heads head_dim"],
    q_weight: Float[Array, "*q_per_head head_dim"] | None,
    k_weight: Float[Array, "*k_per_head head_dim"] | None,
    *,
    eps: float,
    norm: str = "rms_norm",
) -> tuple[Float[Array, "*q_tokens q_heads head_dim"], Float[Array, "*k_tokens k_heads head_dim"]]:
    r"""Per-head QK-norm: each head's query and key vectors normalized over `head_dim`,
    $\hat{q}_{t,h} = \mathrm{norm}(q_{t,h})\,\gamma^q_{(h)}$, likewise for $k$, with the
    RMSNorm (`norm="rms_norm"`) or LayerNorm (`"layer_norm"`, no bias) statistic.

    **Arguments:**

    - `q`: `(*tokens, q_heads, head_dim)`; `k`: `(*tokens', k_heads, head_dim)` (grouped-query
        attention: `k_heads` may differ from `q_heads`, and the tokens from `q`'s).
    - `q_weight`, `k_weight`: `(head_dim,)` shared by the heads, `(heads, head_dim)` one per
        head, or `None`.
    - `eps`: added to the mean square (variance).
    - `norm`: `"rms_norm"` or `"layer_norm"`.

    **Returns:**

    `(q, k)` normalized, each in its input's shape and dtype.
    """
    center = _qk_center(norm)
    return _head_norm(q, q_weight, eps, center), _head_norm(k, k_weight, eps, center)


def silu(z: Array) -> Array:
    r"""$\mathrm{silu}(z) = z\,\sigma(z) = z / (1 + e^{-z})$, the one formula the gated norms'
    reference and kernels evaluate (in float32)."""
    return z / (1 + jnp.exp(-z))


@typechecked()
def gated_rms_norm(
    x: Float[Array, "*rows dim"],
    z: Float[Array, "*rows dim"],
    weight: Float[Array, " dim"] | None,
    *,
    eps: float,
    norm_before_gate: bool = True,
) -> Float[Array, "*rows dim"]:
    r"""Gated RMSNorm (Mamba-2's `RMSNormGated`, Qwen3-Next's `Qwen3NextRMSNormGated`):

    $$y = \mathrm{rms\_norm}(x)\,\gamma\,\mathrm{silu}(z) \text{ (norm\_before\_gate)},
    \qquad y = \mathrm{rms\_norm}(x\,\mathrm{silu}(z))\,\gamma \text{ (otherwise)},$$

    computed in float32 (float64 for float64 input) and rounded once.

    **Arguments:**

    - `x`: `(*rows, dim)`; `z`: `(*rows, dim)`, the gate.
    - `weight`: `(dim,)` or `None`.
    - `eps`: added to the mean square.
    - `norm_before_gate`: `True` for Qwen3-Next's order, `False` for Mamba-2's.

    **Returns:**

    `(*rows, dim)` in `x.dtype`.
    """
    cdt = compute_dtype(x.dtype)
    gate = silu(z.astype(cdt))
    w = _leading_ones(weight, x.ndim)
    if norm_before_gate:
        y = normalize_slices(x.astype(cdt), w, None, -1, False, eps, None)[0] * gate
    else:
        y = normalize_slices(x.astype(cdt) * gate, w, None, -1, False, eps, None)[0]
    return y.astype(x.dtype)


@typechecked()
def dyt(
    x: Float[Array, "*rows dim"],
    alpha: Float[Array, ""],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
) -> Float[Array, "*rows dim"]:
    r"""Dynamic Tanh: $y = \gamma \tanh(\alpha x) + \beta$ with a scalar $\alpha$, computed in
    float32 (float64 for float64 input) and rounded once.

    **Arguments:**

    - `x`: `(*rows, dim)`.
    - `alpha`: a scalar `()`.
    - `weight`, `bias`: `(dim,)` or `None`.

    **Returns:**

    `(*rows, dim)` in `x.dtype`.
    """
    cdt = compute_dtype(x.dtype)
    w, b = _rows_params(x, weight, bias)
    y = jnp.tanh(alpha.astype(cdt) * x.astype(cdt))
    if w is not None:
        y = y * w.astype(cdt)
    if b is not None:
        y = y + b.astype(cdt)
    return y.astype(x.dtype)


# --- Padding masks ---------------------------------------------------------------------------


def masked_moments(
    x: Array,
    mask: Array,
    axis: int | tuple[int, ...],
    *,
    center: bool = True,
    axis_name: AxisName | None = None,
) -> tuple[Moments, Array]:
    r"""[`moments`][] over the elements where `mask` is `True`, and their number.

    With $m$ the mask, $n = \sum m$ and $\overline{v} = \frac{1}{n}\sum m\,v$, this
    returns $\mu = m_1 + \overline{d}$ and $\sigma^2 = \max(0, \overline{d^2} -
    \overline{d}^2)$ with $m_1 = \overline{x}$, $d = x - m_1$: the corrected two-pass
    algorithm of [`moments`][] with $d_0 = 0$ (its $d_0$ is one element of the slice, which
    here could be a masked one). The guarantees of [`moments`][] hold with these changes:

    - Masked elements are never summed (`jnp.where`, not a product with the mask), so a NaN
      or Inf at a masked position does not reach the statistics, and their derivatives with
      respect to every masked element are exactly zero.
    - A slice with no `True` element has `n = 0`, `μ = 0` and `σ² = 0` (no division by 0).
    - With `axis_name`, the counts and sums of every member are pooled with `lax.psum`,
      so members may hold different numbers of valid elements.

    **Arguments:**

    - `x`: an array of any shape and floating dtype.
    - `mask`: booleans of `x`'s shape.
    - `axis`, `center`, `axis_name`: as for [`moments`][].

    **Returns:**

    `(stats, count)`: a [`Moments`][] as [`moments`][] returns it, and the number of `True`
    elements of each slice (int32, of `stats.var`'s shape).
    """
    # Masked elements are replaced before any arithmetic, so that none of their values (a
    # NaN, an Inf) reaches a statistic or, through `0 · NaN`, a derivative.
    xf = jnp.where(mask, x.astype(compute_dtype(x.dtype)), 0)
    count = jnp.sum(mask, axis=axis, keepdims=True, dtype=jnp.int32)
    if axis_name is not None:
        count = pool_members("sum", count, axis_name)
    # Each mean is a sum of `v · (1/n)`, a reduction's output, as in `_mean`.
    inv = jnp.where(count > 0, 1 / jnp.maximum(count, 1).astype(xf.dtype), 0)

    def mean(v):
        m = jnp.sum(v * inv, axis=axis, keepdims=True)
        return m if axis_name is None else pool_members("sum", m, axis_name)

    if not center:
        second = mean(xf * xf)
        zero = jnp.zeros_like(second)
        return Moments(zero, zero, second), count
    shift = mean(xf)
    d = jnp.where(mask, xf - shift, 0)
    offset = mean(d)
    var = jnp.maximum(mean(d * d) - offset * offset, 0)
    return Moments(shift, offset, var), count


def _masked(x, mask, weight, bias, axis, center, eps, axis_name):
    xf = x.astype(compute_dtype(x.dtype))
    stats, count = masked_moments(xf, mask, axis, center=center, axis_name=axis_name)
    stats = Moments(*(checkpoint_name(s, "eqxnorm_statistics") for s in stats))
    # An empty slice (statistics 0) is normalized as zeros, whatever its elements hold: its
    # x̂ is 0, its outputs the bias, and no NaN of its reaches a derivative.
    xf = jnp.where(count > 0, xf, 0)
    return normalize(xf, stats, weight, bias, eps=eps), stats.mean, stats.var


def normalize_masked(
    x: Array,
    mask: Array,
    weight: Array | None,
    bias: Array | None,
    axis: int | tuple[int, ...],
    center: bool,
    eps: float,
    axis_name: AxisName | None,
) -> tuple[Array, Array, Array]:
    r"""[`normalized`][] with statistics over the elements where `mask` is `True` only
    ([`masked_moments`][]): Flax's `mask=`, for padded sequences and images.

    Every element is normalized, masked ones included, with its slice's statistics:
    $y = (x - \mu)/\sqrt{\sigma^2 + \varepsilon}\,\gamma + \beta$ (so a masked
    position's output is what it would be were it valid, and its gradient reaches `x`
    through that direct term alone). A slice with no `True` element gives $\hat{x} = 0$,
    i.e. its bias (0 without one), and finite gradients: never NaN, whatever its elements
    hold. Derivatives by JAX's autodiff under `jax.checkpoint` saving only the statistics
    (the residuals of [`normalized`][]); the masked elements' derivatives with respect to the
    statistics are exactly zero. Returns `(y, mean, var)` as [`normalized`][] does.
    """
    policy = jax.checkpoint_policies.save_only_these_names("eqxnorm_statistics")
    masked = jax.checkpoint(_masked, policy=policy, static_argnums=(4, 5, 6, 7))
    return masked(x, mask, weight, bias, axis, center, eps, axis_name)


__all__ = [
    "compute_dtype",
    "Moments",
    "moments",
    "masked_moments",
    "normalize",
    "normalize_masked",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "batch_norm",
    "batch_norm_inference",
    "add_layer_norm",
    "add_rms_norm",
    "modulation",
    "offset_weight",
    "quantize_fp8",
    "adaptive_layer_norm",
    "adaptive_rms_norm",
    "adaptive_group_norm",
    "group_norm_channels_last",
    "adaptive_group_norm_channels_last",
    "qk_norm",
    "silu",
    "gated_rms_norm",
    "dyt",
]
