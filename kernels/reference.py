r"""The reference implementation of every normalization, in plain `jax.numpy`.

This module is the oracle the Pallas kernels are tested against and the implementation used
on CPU. Each function works on the canonical layout its kernel uses (rows × features for the
row norms, `(batch, channels, spatial)` with the spatial axes flattened for the group and batch
norms) and has the same signature as the kernel entry point it checks. The public functions in
`eqxnorm.functional` reshape user arrays to these layouts, validate them and dispatch here.

Every norm takes its statistics from the one helper, [`moments`][], so the numerical
guarantees listed there hold for all of them.
"""

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

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


def moments(
    x: Array,
    axis: int | tuple[int, ...],
    *,
    center: bool = True,
    axis_name: AxisName | None = None,
) -> Moments:
    r"""Mean and (biased) variance of `x` over `axis`: the statistics of every normalization.

    With $m_1 = \overline{x}$ (a first pass) and $d = x - m_1$, this returns

    $$\mu = m_1 + \overline{d}, \qquad
      \sigma^2 = \max\left(0,\ \overline{d^2} - \overline{d}^2\right),$$

    the *corrected two-pass* algorithm (Chan, Golub & LeVeque, 1983), with $\mu$ kept as the
    pair `(shift, offset) = (m₁, d̄)`. Guarantees:

    - Computed in float32 whatever the input dtype (float64 for float64 input); `x` is cast
      before anything is summed, so float16 inputs near 6e4 cannot overflow.
    - The variance error does not grow with the size of the mean: there is no
      `E[x²] − E[x]²` cancellation (its error bound is that of two-pass summation), and
      [`normalize`][] centres with the two parts of the mean, so neither does the output's.
    - A constant slice gives `(x - shift) - offset == 0` exactly, so a normalization of it
      returns exactly its bias; its `σ²` is 0 up to rounding (of order `n·u²·c²` for a slice
      of `n` copies of `c` with unit roundoff `u`, far below any sensible `eps`).
    - `σ² >= 0` always.
    - NaN/Inf in a slice propagate to that slice's statistics (and so its output).
    - With `axis_name`, the statistics are over the union of the slices held by every member
      of that named axis (`vmap`, `pmap`, `shard_map`), combined with `lax.pmean`. All
      members hold the same number of elements, so the result equals the statistics of the
      concatenated data.
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

    def pmean(*values):
        return values if axis_name is None else lax.pmean(values, axis_name)

    if not center:
        (second,) = pmean(jnp.mean(xf * xf, axis=axis, keepdims=True))
        zero = jnp.zeros_like(second)
        return Moments(zero, zero, second)
    (shift,) = pmean(jnp.mean(xf, axis=axis, keepdims=True))
    d = xf - shift
    offset, d_sq_mean = pmean(
        jnp.mean(d, axis=axis, keepdims=True), jnp.mean(d * d, axis=axis, keepdims=True)
    )
    return Moments(shift, offset, jnp.maximum(d_sq_mean - offset * offset, 0))


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
    y = centred * lax.rsqrt(stats.var + jnp.asarray(eps, cdt))
    if weight is not None:
        y = y * weight.astype(cdt)
    if bias is not None:
        y = y + bias.astype(cdt)
    return y.astype(x.dtype)


def _widen(x: Array) -> Array:
    """`x` in its statistics dtype, cast once: the statistics and the normalization then share
    one conversion, so under autodiff their gradients are summed in float32 before the one
    cast back (two casts would add two half-precision cotangents, which cancel)."""
    return x.astype(compute_dtype(x.dtype))


def _row_params(param: Array | None) -> Array | None:
    return None if param is None else param[None, :]


def _channel_params(param: Array | None) -> Array | None:
    return None if param is None else param[None, :, None]


@typechecked()
def layer_norm(
    x: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
) -> Float[Array, "rows dim"]:
    r"""LayerNorm of each row: $y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}}
    \gamma + \beta$, statistics over `dim`.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the variance.

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    xf = _widen(x)
    y = normalize(xf, moments(xf, 1), _row_params(weight), _row_params(bias), eps=eps)
    return y.astype(x.dtype)


@typechecked()
def rms_norm(
    x: Float[Array, "rows dim"],
    weight: Float[Array, " dim"] | None,
    bias: Float[Array, " dim"] | None,
    *,
    eps: float,
) -> Float[Array, "rows dim"]:
    r"""RMSNorm of each row: $y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \varepsilon}}\gamma
    + \beta$, statistics over `dim`.

    **Arguments:**

    - `x`: `(rows, dim)`.
    - `weight`, `bias`: `(dim,)` or `None`.
    - `eps`: added to the mean square.

    **Returns:**

    `(rows, dim)` in `x.dtype`.
    """
    xf = _widen(x)
    stats = moments(xf, 1, center=False)
    return normalize(xf, stats, _row_params(weight), _row_params(bias), eps=eps).astype(x.dtype)


@typechecked()
def group_norm(
    x: Float[Array, "batch channels spatial"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    groups: int,
    eps: float,
) -> Float[Array, "batch channels spatial"]:
    r"""GroupNorm: the channels are split into `groups` contiguous groups and each
    `(example, group)` slice of `channels/groups × spatial` elements is normalized with its
    own statistics; the affine parameters are per channel.

    InstanceNorm is the case `groups == channels`.

    **Arguments:**

    - `x`: `(batch, channels, spatial)`, the spatial axes flattened (`spatial` may be 1).
    - `weight`, `bias`: `(channels,)` or `None`.
    - `groups`: divides `channels`.
    - `eps`: added to the variance.

    **Returns:**

    `(batch, channels, spatial)` in `x.dtype`.
    """
    batch, channels, spatial = x.shape
    xf = _widen(x)
    xg = xf.reshape(batch, groups, (channels // groups) * spatial)
    per_channel = channels // groups
    stats = Moments(*(jnp.repeat(s, per_channel, axis=1) for s in moments(xg, 2)))
    y = normalize(xf, stats, _channel_params(weight), _channel_params(bias), eps=eps)
    return y.astype(x.dtype)


@typechecked()
def batch_norm(
    x: Float[Array, "batch channels spatial"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    eps: float,
    axis_name: AxisName | None = None,
) -> tuple[
    Float[Array, "batch channels spatial"], Float[Array, " channels"], Float[Array, " channels"]
]:
    r"""BatchNorm with batch statistics: per channel over `batch × spatial` (and over every
    member of `axis_name`, when given).

    **Arguments:**

    - `x`: `(batch, channels, spatial)`, the spatial axes flattened.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance.
    - `axis_name`: a named axis (or names) whose members' batches are pooled into the
        statistics (`vmap`, `pmap`, `shard_map`).

    **Returns:**

    `(y, mean, var)`: `y` of `x`'s shape and dtype; the batch `mean` and biased `var`,
    `(channels,)` in the statistics dtype (float32, or float64 for float64 input).
    """
    xf = _widen(x)
    stats = moments(xf, (0, 2), axis_name=axis_name)
    y = normalize(xf, stats, _channel_params(weight), _channel_params(bias), eps=eps)
    return y.astype(x.dtype), stats.mean[0, :, 0], stats.var[0, :, 0]


@typechecked()
def batch_norm_inference(
    x: Float[Array, "batch channels spatial"],
    mean: Float[Array, " channels"],
    var: Float[Array, " channels"],
    weight: Float[Array, " channels"] | None,
    bias: Float[Array, " channels"] | None,
    *,
    eps: float,
) -> Float[Array, "batch channels spatial"]:
    r"""BatchNorm with given (running) statistics: $y = (x - \mu_c)/\sqrt{\sigma^2_c +
    \varepsilon}\,\gamma_c + \beta_c$.

    **Arguments:**

    - `x`: `(batch, channels, spatial)`.
    - `mean`, `var`: `(channels,)`, the statistics to normalize with.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance.

    **Returns:**

    `(batch, channels, spatial)` in `x.dtype`.
    """
    cdt = compute_dtype(x.dtype)
    mean, var = (_channel_params(s.astype(cdt)) for s in (mean, var))
    stats = Moments(mean, jnp.zeros_like(mean), var)
    return normalize(x, stats, _channel_params(weight), _channel_params(bias), eps=eps)


__all__ = [
    "compute_dtype",
    "Moments",
    "moments",
    "normalize",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "batch_norm",
    "batch_norm_inference",
]
