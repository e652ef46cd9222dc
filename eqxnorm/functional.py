r"""The functional API: every normalization on batched arrays.

These are the functions the modules call. Each validates its input at trace time (see
`eqxnorm._checking`), reshapes it to the canonical layout of the kernels, and dispatches to the
implementation chosen by `impl` (`"auto" | "pallas" | "reference"`, see `eqxnorm._dispatch`).

All of them compute their statistics in float32 (float64 for float64 input) and return the
input's dtype. NaN or Inf in the input propagate to the outputs that depend on it.
"""

import math
import operator
from collections.abc import Hashable, Sequence
from typing import Any

import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Scalar

from . import _checking
from ._checking import AnyArray
from ._dispatch import Impl, check_impl, implementation, resolve_impl
from .kernels.reference import FP8_DTYPES, AxisGroups, compute_dtype

AxisName = Hashable | Sequence[Hashable]


def _as_arrays(*arrays: Any) -> tuple[Any, ...]:
    """JAX arrays from the JAX or NumPy arrays the entry points accept (`None` stays)."""
    return tuple(None if a is None else jnp.asarray(a) for a in arrays)


def _valid(x: Array, mask: Any, lengths: Any, batch_ndim: int, first_counted: int):
    """The padding mask of `x`'s shape: `mask` broadcast, or from `lengths` (of shape
    `x.shape[:batch_ndim]`) the first `lengths` of the flattened axes `x.shape[first_counted:]`,
    the same for every index of the axes between; `None` when both are `None`.

    Built from an iota compare, which XLA fuses into the reductions that read it: `lengths`
    costs no pass over an array of `x`'s size."""
    if mask is not None:
        return jnp.broadcast_to(jnp.asarray(mask), x.shape)
    if lengths is None:
        return None
    counted = math.prod(x.shape[first_counted:])
    between = (1,) * (first_counted - batch_ndim)
    batch = x.shape[:batch_ndim]
    position = lax.broadcasted_iota(
        jnp.int32, (*batch, *between, counted), batch_ndim + len(between)
    )
    bound = jnp.asarray(lengths).astype(jnp.int32).reshape(*batch, *between, 1)
    valid = jnp.broadcast_to(position < bound, (*x.shape[:first_counted], counted))
    return valid.reshape(x.shape)


# --- output options: weight offset, output dtype, FP8 output ----------------------------------

_FP8_DTYPES = FP8_DTYPES


def _output_options(x, weight, weight_offset, out_dtype, fp8_scale, where: str, fp8=True):
    """`(weight_offset, out_dtype, fp8_scale)` checked and resolved (`out_dtype` a dtype or
    `None`; with `fp8_scale`, float8_e4m3fn unless given): `TypeError`/`ValueError` naming the
    value and the fix. `fp8=False`: the function has no FP8 output."""
    if isinstance(weight_offset, (bool, np.bool_)) or not isinstance(
        weight_offset, (int, float, np.number)
    ):
        raise TypeError(
            f"{where}: `weight_offset` must be a real number, but got {weight_offset!r} of type "
            f"{type(weight_offset).__name__}. Pass e.g. `weight_offset=1.0` for a zero-centred "
            f"weight (Gemma's RMSNorm)."
        )
    if not math.isfinite(weight_offset):
        raise ValueError(f"{where}: `weight_offset` must be finite, but got {weight_offset!r}.")
    if weight_offset != 0 and weight is None:
        raise ValueError(
            f"{where}: weight_offset={weight_offset!r} is added to the weight, but weight is "
            f"None. Pass the (zero-centred) weight, or weight_offset=0."
        )
    if out_dtype is not None:
        try:
            out_dtype = jnp.dtype(out_dtype)
        except TypeError:
            raise TypeError(
                f"{where}: `out_dtype` must be a dtype, but got {out_dtype!r}. Pass e.g. "
                f"`out_dtype=jnp.bfloat16`."
            ) from None
        if not jnp.issubdtype(out_dtype, jnp.floating):
            raise TypeError(
                f"{where}: `out_dtype` must be a floating dtype, but got {out_dtype}. Pass e.g. "
                f"`out_dtype=jnp.bfloat16`."
            )
    if fp8_scale is None:
        if out_dtype in _FP8_DTYPES:
            fix = "pass `fp8_scale=` (e.g. jnp.float32(1.0))" if fp8 else "use another out_dtype"
            raise ValueError(
                f"{where}: out_dtype={out_dtype} is a float8 dtype, whose output needs a scale "
                f"(y_fp8 = cast(clip(y * scale)), with the amax returned beside it); {fix}."
            )
        return float(weight_offset), out_dtype, None
    if not fp8:
        raise ValueError(f"{where}: has no FP8 output; drop `fp8_scale={fp8_scale!r}`.")
    out_dtype = _FP8_DTYPES[0] if out_dtype is None else out_dtype
    if out_dtype not in _FP8_DTYPES:
        raise ValueError(
            f"{where}: fp8_scale quantizes the output to a float8 dtype, but got "
            f"out_dtype={out_dtype}. Pass out_dtype=jnp.float8_e4m3fn or jnp.float8_e5m2, or "
            f"drop fp8_scale."
        )
    scale = jnp.asarray(fp8_scale)
    if scale.shape != () or not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(
            f"{where}: fp8_scale must be a floating scalar (one scale per tensor), but got "
            f"shape {scale.shape} and dtype {scale.dtype}. Pass e.g. jnp.float32(1.0)."
        )
    return float(weight_offset), out_dtype, scale


def _options_kwargs(options) -> dict:
    weight_offset, out_dtype, fp8_scale = options
    return dict(weight_offset=weight_offset, out_dtype=out_dtype, fp8_scale=fp8_scale)


# --- LayerNorm / RMSNorm ---------------------------------------------------------------------


def _resolve_row_shape(x: Any, weight: Any, bias: Any, shape: Any, where: str) -> tuple[int, ...]:
    """The trailing shape normalized over: `shape`, else the parameters', else `x`'s last axis."""
    _checking.check_floating(x, "x", where)
    param_shape = next((tuple(p.shape) for p in (weight, bias) if p is not None), None)
    if shape is not None:
        shape = _checking.normalize_shape(shape, where)
    elif param_shape is not None:
        shape = param_shape
    elif x.ndim == 0:
        raise ValueError(
            f"{where}: x is a scalar, so there is no feature axis to normalize over. Pass an "
            f"array whose trailing axes are the features."
        )
    else:
        shape = (x.shape[-1],)
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
        raise ValueError(
            f"{where}: the trailing axes of x must be the normalized shape {shape}, but got "
            f"x.shape={x.shape}. Pass `shape=` (or weight/bias) matching the trailing axes "
            f"of x."
        )
    if math.prod(shape) == 0:
        raise ValueError(
            f"{where}: the normalized shape {shape} has no elements, so its mean and "
            f"variance are undefined."
        )
    for name, param in (("weight", weight), ("bias", bias)):
        _checking.check_param(param, shape, name, where, "the normalized shape")
    return shape


def _check_row_args(x, weight, bias, shape, eps, impl, where: str, options=None, fp8=True):
    """The checks every row norm's precheck makes: its feature shape (returned), `eps`,
    `impl`, and where it takes them its output `options` `(weight_offset, out_dtype,
    fp8_scale)` (see `_output_options`)."""
    shape = _resolve_row_shape(x, weight, bias, shape, where)
    _checking.check_eps(eps, where, x)
    if options is not None:
        _output_options(x, weight, *options, where, fp8=fp8)
    check_impl(impl, where)
    return shape


def _flat_params(x: Array, weight, bias, shape, options, where: str, fp8=True):
    """`(flat, options)` of a row norm's call: `weight` and `bias` as arrays of
    `(prod(shape),)` (or `None`) and its output `options` resolved for `x`."""
    weight, bias = _as_arrays(weight, bias)
    flat = [None if p is None else p.reshape(math.prod(shape)) for p in (weight, bias)]
    return flat, _output_options(x, weight, *options, where, fp8=fp8)


def _check_row_norm(where: str):
    def precheck(
        x,
        weight=None,
        bias=None,
        *,
        shape=None,
        eps=1e-5,
        axis_name=None,
        impl="auto",
        mask=None,
        lengths=None,
        weight_offset=0.0,
        out_dtype=None,
        fp8_scale=None,
    ):
        options = (weight_offset, out_dtype, fp8_scale)
        shape = _check_row_args(x, weight, bias, shape, eps, impl, where, options)
        if axis_name is not None:
            _checking.axis_size(axis_name, where)
        _checking.check_mask(mask, x, where)
        _checking.check_lengths(lengths, mask, x.shape[: x.ndim - len(shape)], where)
        if lengths is not None and axis_name is not None:
            raise ValueError(
                f"{where}: `lengths` counts the elements of the whole example, but with "
                f"axis_name={axis_name!r} each member holds a slice of its features. Pass "
                f"each member's own slice of the padding `mask=` instead."
            )

    return precheck


def _unit_batch(impl: Impl) -> bool:
    """Whether one example (no batch axis) gets a unit batch axis on its way to `impl`.

    The kernels take a batch, and fold a `jax.vmap` into it with `custom_vmap`. The reference
    takes any number of leading axes, none included, and gets the example as it is: under
    `vmap` a unit axis would reach XLA as `(batch, 1, ...)`, which its CPU backend reduces
    several times slower than `(batch, ...)` (`jax.vmap(LayerNorm(1024))` over 8192 rows:
    216 ms against 9 ms forward on a 2-core CPU)."""
    return resolve_impl(impl) != "reference"


def _to_rows(x: Array, shape: tuple[int, ...], impl: Impl) -> Array:
    """`x` as `(*batch, dim)`, merging its normalized axes: for the kernels, `(rows, dim)`,
    its batch axes merged too.

    One example (no batch axes) gets a new leading axis for the kernels (see
    `_unit_batch`) rather than a `reshape(1, dim)`: under `vmap` that reshape merges the
    vmapped axis's neighbours while inserting an axis, which JAX cannot type when the vmapped
    axis is split over an Explicit mesh."""
    batch = x.shape[: x.ndim - len(shape)]
    rows = x.reshape(*batch, math.prod(shape))
    if not _unit_batch(impl) or len(batch) == 1:
        return rows
    if not batch:
        return rows[None]
    # An explicit row count, not -1: reshape cannot infer -1 for an empty batch.
    return rows.reshape(math.prod(batch), rows.shape[-1])


def _from_rows(rows: Array, like: Array, shape: tuple[int, ...]) -> Array:
    """The inverse of `_to_rows`: `rows` in the shape of `like`."""
    added = rows.ndim > like.ndim - len(shape) + 1
    return (rows[0] if added else rows).reshape(like.shape)


def _row_norm(
    op: str,
    x,
    weight,
    bias,
    shape,
    eps,
    impl,
    axis_name=None,
    mask=None,
    lengths=None,
    options=(0, None, None),
):
    where = f"eqxnorm.functional.{op}"
    shape = _resolve_row_shape(x, weight, bias, shape, where)
    (x,) = _as_arrays(x)
    flat, options = _flat_params(x, weight, bias, shape, options, where)
    rows = _to_rows(x, shape, impl)
    lead = x.ndim - len(shape)
    fn = getattr(implementation(impl), op)
    plain = options[0] == 0 and options[1] in (None, x.dtype) and options[2] is None
    if lengths is not None and _unit_batch(impl) and plain:
        # The kernels read one length per row (see `_row_lengths`), not a mask; with output
        # options, the masked path below.
        y = fn(
            rows, *flat, eps=float(eps), axis_name=axis_name, lengths=_row_lengths(lengths, rows)
        )
        return _from_rows(y, x, shape)
    valid = _valid(x, mask, lengths, lead, lead)
    valid = None if valid is None else _to_rows(valid, shape, impl)
    y = fn(rows, *flat, eps=float(eps), axis_name=axis_name, mask=valid, **_options_kwargs(options))
    if options[2] is not None:
        return _from_rows(y[0], x, shape), y[1]
    return _from_rows(y, x, shape)


def _row_lengths(lengths: Any, rows: Array) -> Array:
    """`lengths` (of `x`'s batch shape) as one int32 per row of `rows` `(rows, dim)`: what
    the kernels (`impl` other than `"reference"`) take for `lengths=` instead of a mask."""
    return jnp.asarray(lengths).astype(jnp.int32).reshape(rows.shape[0])


@_checking.typechecked(_check_row_norm("eqxnorm.functional.layer_norm"))
def layer_norm(
    x: Float[AnyArray, "*batch_and_shape"],
    weight: Float[AnyArray, "*shape"] | None = None,
    bias: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    eps: _checking.Number = 1e-5,
    axis_name: AxisName | None = None,
    impl: Impl = "auto",
    mask: Bool[AnyArray, "*mask_shape"] | None = None,
    lengths: Int[AnyArray, "*lengths_shape"] | None = None,
    weight_offset: _checking.Number = 0.0,
    out_dtype: Any = None,
    fp8_scale: Any = None,
) -> Float[Array, "*batch_and_shape"] | tuple[Float[Array, "*batch_and_shape"], Float[Array, ""]]:
    r"""Layer normalization over the trailing `shape` axes of `x`:

    $$y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}} \gamma + \beta$$

    with the mean and (biased) variance over the normalized axes, separately for every index
    of the leading (batch) axes.

    ??? cite
        [Layer Normalization](https://arxiv.org/abs/1607.06450)

    **Arguments:**

    - `x`: `(*batch, *shape)`, floating point.
    - `weight`: $\gamma$, of shape `shape`, or `None` for no scale.
    - `bias`: $\beta$, of shape `shape`, or `None` for no shift.
    - `shape`: the normalized trailing shape. Defaults to the parameters' shape, or to the
        last axis of `x` when both are `None`.
    - `eps`: added to the variance; must be positive.
    - `axis_name`: the named axis (or sequence of names) the normalized features are split
        over, for tensor parallelism inside `jax.shard_map` (or `pmap`/`vmap`): each member
        holds a slice of the features (`x`, `weight` and `bias` alike, so `shape` is the
        local one) and the statistics are over all of them, pooled with `lax.pmean`. With
        `impl="pallas"` this runs the reference, which XLA fuses around the collective.
    - `impl`: `"auto"`, `"pallas"` or `"reference"`.
    - `mask`: booleans broadcastable to `x`'s shape, `True` where an element counts in
        the statistics (Flax's `mask=`, for padding): each slice's mean and variance are over
        its `True` elements only. Every element is normalized with its slice's statistics,
        masked ones included (give padding finite values, e.g. zeros, if its outputs reach
        a loss); the masked elements' gradients with respect to the statistics are exactly
        zero; a slice with no `True` element gives its bias (0 without one), never NaN.
        With `impl="pallas"` this runs the reference.
    - `lengths`: integers of shape `batch`, the shorthand for the mask of each slice's
        first `lengths` elements (of its normalized axes flattened in row-major order): the
        padding of variable-length data. No mask array is read: the kernels (`impl` other
        than `"reference"`) read one length per row beside its statistics, the reference
        builds the mask by an iota compare in the compiled program. Not with `mask` or
        `axis_name`.
    - `weight_offset`: the scale applied is `weight_offset + weight`, added in float32: a
        zero-centred weight (Gemma's RMSNorm and "LayerNorm1p" store $\gamma$ around 0 and
        apply $1 + \gamma$: `weight_offset=1.0`; TransformerEngine's `zero_centered_gamma`).
    - `out_dtype`: the dtype of the output (default `x.dtype`), rounded once from float32:
        e.g. a float32 residual stream in and bfloat16 out, or bfloat16 in and float32 out.
    - `fp8_scale`: a floating scalar: the output is quantized to FP8,
        `y_fp8 = cast(clip(y · fp8_scale, -m, m))` with `m` the largest finite value of
        `out_dtype` (`jnp.float8_e4m3fn`, the default with a scale, or `jnp.float8_e5m2`),
        saturating and rounded to nearest even (TransformerEngine's convention), and the amax
        $\max|y|$ of the unscaled output, computed in the same kernel, returned beside it
        for the next step's scale. Differentiable straight through the clip and rounding;
        the scale and amax carry no gradient.

    **Returns:**

    An array of `x`'s shape in `out_dtype` (default `x.dtype`); with `fp8_scale`, `(y, amax)`,
    `amax` a scalar in the statistics' dtype (float32; float64 for float64 input).

    **Raises:**

    `TypeError` for non-floating input, a non-boolean `mask` or non-integer `lengths`;
    `ValueError` when the trailing axes of `x` do not match `shape`/the parameters, `shape`
    is empty, `eps <= 0`, `axis_name` is not bound by an enclosing transformation, `impl` is
    unknown, `mask` does not broadcast to `x`, `lengths` is not of the batch shape,
    `weight_offset` is non-zero without a weight, or `out_dtype` is a float8 dtype
    without `fp8_scale` (or `fp8_scale` is not a scalar or comes with another
    `out_dtype`).
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _row_norm(
        "layer_norm", x, weight, bias, shape, eps, impl, axis_name, mask, lengths, options
    )


@_checking.typechecked(_check_row_norm("eqxnorm.functional.rms_norm"))
def rms_norm(
    x: Float[AnyArray, "*batch_and_shape"],
    weight: Float[AnyArray, "*shape"] | None = None,
    bias: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    eps: _checking.Number = 1e-5,
    axis_name: AxisName | None = None,
    impl: Impl = "auto",
    mask: Bool[AnyArray, "*mask_shape"] | None = None,
    lengths: Int[AnyArray, "*lengths_shape"] | None = None,
    weight_offset: _checking.Number = 0.0,
    out_dtype: Any = None,
    fp8_scale: Any = None,
) -> Float[Array, "*batch_and_shape"] | tuple[Float[Array, "*batch_and_shape"], Float[Array, ""]]:
    r"""Root-mean-square normalization over the trailing `shape` axes of `x`:

    $$y = \frac{x}{\sqrt{\frac{1}{n}\sum_{i=1}^n x_i^2 + \varepsilon}} \gamma + \beta$$

    ??? cite
        [Root Mean Square Layer Normalization](https://arxiv.org/abs/1910.07467)

    **Arguments:**

    As [`eqxnorm.functional.layer_norm`][].

    **Returns:**

    As [`eqxnorm.functional.layer_norm`][].

    **Raises:**

    As [`eqxnorm.functional.layer_norm`][].
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _row_norm(
        "rms_norm", x, weight, bias, shape, eps, impl, axis_name, mask, lengths, options
    )


# --- GroupNorm / InstanceNorm ----------------------------------------------------------------


def _check_channels_first(x: Any, where: str) -> tuple[int, int, int]:
    """`(batch, channels, spatial size)` of a `(batch, channels, *spatial)` input."""
    _checking.check_floating(x, "x", where)
    if x.ndim < 2:
        raise ValueError(
            f"{where} expects x of shape (batch, channels, *spatial), but got x.shape="
            f"{x.shape}. Add the missing batch axis, e.g. `x[None]`."
        )
    spatial = math.prod(x.shape[2:])
    if x.shape[1] == 0 or spatial == 0:
        raise ValueError(
            f"{where}: x.shape={x.shape} has an empty channel or spatial axis, so the "
            f"statistics are undefined."
        )
    return x.shape[0], x.shape[1], spatial


def _channels_last(x: Any, channel_axis: Any, where: str, example: bool = False) -> bool:
    """Whether `channel_axis` puts the channels of `x` last (`(batch, *spatial, channels)`,
    or one example `(*spatial, channels)` with `example`) rather than first after the batch
    (`(batch, channels, *spatial)`, `(channels, *spatial)`); the layouts the kernels read in
    place. Any other axis is refused with the transpose it needs."""
    first = 0 if example else 1
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
        raise TypeError(
            f"{where}: channel_axis must be an int, but got {channel_axis!r} of type "
            f"{type(channel_axis).__name__}. Pass channel_axis={first} (channels first) or "
            f"channel_axis=-1 (channels last)."
        )
    ndim = getattr(x, "ndim", 0)
    if ndim > first and channel_axis in (first, first - ndim):
        return False
    if ndim > first and channel_axis in (-1, ndim - 1):
        return True
    layout = "(channels, *spatial)" if example else "(batch, channels, *spatial)"
    raise ValueError(
        f"{where}: channel_axis={channel_axis} must name the channels axis first "
        f"({first}, {layout}) or last (-1) of x, but x.shape={getattr(x, 'shape', ())} has "
        f"{ndim} axes. Pass channel_axis={first} or channel_axis=-1; a channels axis in the "
        f"middle needs `jnp.moveaxis(x, {channel_axis}, -1)` first."
    )


def _check_channels(x: Any, where: str, channel_axis: Any) -> tuple[int, int, int]:
    """`(batch, channels, spatial size)` of a channels-first `(batch, channels, *spatial)` or,
    with `channel_axis=-1`, channels-last `(batch, *spatial, channels)` input."""
    _checking.check_floating(x, "x", where)
    if x.ndim < 2:
        raise ValueError(
            f"{where} expects x of shape (batch, channels, *spatial), or (batch, *spatial, "
            f"channels) with channel_axis=-1, but got x.shape={x.shape}. Add the missing batch "
            f"axis, e.g. `x[None]`."
        )
    if not _channels_last(x, channel_axis, where):
        return _check_channels_first(x, where)
    spatial = math.prod(x.shape[1:-1])
    if x.shape[-1] == 0 or spatial == 0:
        raise ValueError(
            f"{where}: x.shape={x.shape} has an empty channel or spatial axis, so the "
            f"statistics are undefined."
        )
    return x.shape[0], x.shape[-1], spatial


def _valid_channels(x: Array, mask: Any, lengths: Any, channels_last: bool):
    """`_valid` for the channel norms: `lengths` count positions of the spatial axes
    flattened, the same for every channel, whichever end the channels are at."""
    if not channels_last or lengths is None:
        return _valid(x, mask, lengths, 1, 2)
    spatial = _valid(x[..., 0], None, lengths, 1, 1)
    return jnp.broadcast_to(spatial[..., None], x.shape)


def _flatten_spatial_last(x: Array, example: bool = False) -> Array:
    """`(batch, *spatial, channels)` → `(batch, spatial, channels)`, the channels-last kernels'
    layout (a reshape: the channels stay the contiguous axis); one example `(*spatial,
    channels)` → `(spatial, channels)`."""
    lead = x.shape[:0] if example else x.shape[:1]
    return x.reshape(*lead, math.prod(x.shape[len(lead) : -1]), x.shape[-1])


def _flatten_spatial(x: Array, example: bool = False) -> Array:
    """`(batch, channels, *spatial)` → `(batch, channels, spatial)`, the kernels' layout; one
    example `(channels, *spatial)` → `(channels, spatial)`."""
    lead = 1 if example else 2
    # An explicit spatial size, not -1: reshape cannot infer -1 for an empty batch.
    return x.reshape(*x.shape[:lead], math.prod(x.shape[lead:]))


def _on_example(fn, impl: Impl, x: Array, *per_example: Array):
    """`fn(x, *per_example)` for one example `x` `(channels, spatial)` (the modules' call),
    given a unit batch axis only for the kernels (see `_unit_batch`); `fn` returns the
    normalized array first, then values without a batch axis."""
    if not _unit_batch(impl):
        return fn(x, *per_example)
    y, *rest = fn(x[None], *(a[None] for a in per_example))
    return (y[0], *rest)


def _check_channel_params(channels: int, where: str, **params: Any) -> None:
    for name, param in params.items():
        _checking.check_param(param, (channels,), name, where, "one value per channel")


def _check_group_norm(
    x,
    groups,
    weight=None,
    bias=None,
    *,
    eps=1e-5,
    channel_axis=1,
    impl="auto",
    mask=None,
    lengths=None,
):
    where = "eqxnorm.functional.group_norm"
    _check_group_args(x, groups, weight, bias, eps, impl, where, channel_axis)
    _check_channels_mask(x, mask, lengths, where)


def _check_channels_mask(x, mask, lengths, where: str) -> None:
    _checking.check_mask(mask, x, where)
    _checking.check_lengths(lengths, mask, x.shape[:1], where)


def _check_group_args(x, groups, weight, bias, eps, impl, where: str, channel_axis=1) -> None:
    _, channels, _ = _check_channels(x, where, channel_axis)
    _checking.check_positive_int(groups, "groups", where)
    if channels % groups != 0:
        raise ValueError(
            f"{where}: groups={groups} must divide the number of channels, but x has "
            f"channels={channels} (x.shape={x.shape}). Valid values of groups for "
            f"{channels} channels: "
            f"{', '.join(str(d) for d in range(1, channels + 1) if channels % d == 0)}."
        )
    _check_channel_params(channels, where, weight=weight, bias=bias)
    _checking.check_eps(eps, where, x)
    check_impl(impl, where)


def _group_norm(
    x,
    groups,
    weight,
    bias,
    eps,
    impl,
    example=False,
    mask=None,
    lengths=None,
    channels_last=False,
):
    """GroupNorm of `x` `(batch, channels, *spatial)`, or with `example` of one example
    `(channels, *spatial)`, the modules' call; `mask`/`lengths` as `group_norm` takes them.
    With `channels_last`, of `(batch, *spatial, channels)` or `(*spatial, channels)`, read
    in place (no transpose)."""
    x, weight, bias = _as_arrays(x, weight, bias)
    op = "group_norm_channels_last" if channels_last else "group_norm"
    flatten = _flatten_spatial_last if channels_last else _flatten_spatial
    valid = _valid_channels(x, mask, lengths, channels_last)

    def norm(x3, *m3):
        fn = getattr(implementation(impl), op)
        return (fn(x3, weight, bias, groups=groups, eps=float(eps), mask=(*m3, None)[0]),)

    x3 = flatten(x, example)
    m3 = () if valid is None else (flatten(valid, example),)
    (y,) = _on_example(norm, impl, x3, *m3) if example else norm(x3, *m3)
    return y.reshape(x.shape)


@_checking.typechecked(_check_group_norm)
def group_norm(
    x: Float[AnyArray, "*batch_and_example"],
    groups: int,
    weight: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    bias: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    *,
    eps: _checking.Number = 1e-5,
    channel_axis: int = 1,
    impl: Impl = "auto",
    mask: Bool[AnyArray, "*mask_shape"] | None = None,
    lengths: Int[AnyArray, "*lengths_shape"] | None = None,
) -> Float[Array, "*batch_and_example"]:
    r"""Group normalization: the channels split into `groups` contiguous groups, each
    `(example, group)` normalized over its `channels/groups × spatial` elements, then a
    per-channel affine:

    $$y_{c} = \frac{x_{c} - \mathbb{E}[x_{g(c)}]}{\sqrt{\mathrm{Var}[x_{g(c)}] + \varepsilon}}
    \gamma_c + \beta_c$$

    ??? cite
        [Group Normalization](https://arxiv.org/abs/1803.08494)

    **Arguments:**

    - `x`: `(batch, channels, *spatial)`, any number of spatial axes (including none); or
        channels-last `(batch, *spatial, channels)` with `channel_axis=-1`.
    - `groups`: the number of groups; must divide `channels`.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance; must be positive.
    - `channel_axis`: where the channels are: `1` (after the batch, the default) or `-1`
        (last, as in NHWC images). Both layouts are read in place: no transposed copy is
        made, by the reference or by the kernels.
    - `impl`: `"auto"`, `"pallas"` or `"reference"`.
    - `mask`: booleans broadcastable to `x`'s shape, `True` where an element counts in
        the statistics (Flax's `mask=`, for padded images or sequences); see
        [`eqxnorm.functional.layer_norm`][] for the outputs at masked positions and for an
        empty slice.
    - `lengths`: integers of shape `(batch,)`, the shorthand for the mask of each example's
        first `lengths` positions of its spatial axes flattened in row-major order (e.g. the
        valid frames of padded audio `(batch, channels, time)`), the same for every channel.
        Not with `mask`.

    **Returns:**

    An array of `x`'s shape and dtype.

    **Raises:**

    `TypeError` for non-floating input, a non-int `channel_axis`, a non-boolean `mask` or
    non-integer `lengths`; `ValueError` for a rank below 2, an empty axis, a `channel_axis`
    other than first or last, `groups` not dividing `channels`, parameters of the wrong shape,
    `eps <= 0`, an unknown `impl`, a `mask` that does not broadcast to `x`, or `lengths` not
    of shape `(batch,)`.
    """
    channels_last = _channels_last(x, channel_axis, "eqxnorm.functional.group_norm")
    return _group_norm(
        x, groups, weight, bias, eps, impl, mask=mask, lengths=lengths, channels_last=channels_last
    )


def _check_instance_norm(
    x, weight=None, bias=None, *, eps=1e-5, channel_axis=1, impl="auto", mask=None, lengths=None
):
    where = "eqxnorm.functional.instance_norm"
    _, channels, spatial = _check_channels(x, where, channel_axis)
    if spatial < 2:
        raise ValueError(
            f"{where} normalizes each channel over its spatial axes, but x.shape={x.shape} "
            f"has {spatial} spatial element(s) per channel, so every output would equal the "
            f"bias. Pass x of shape (batch, channels, *spatial) with more than one spatial "
            f"element (PyTorch refuses this input too)."
        )
    _check_channel_params(channels, where, weight=weight, bias=bias)
    _checking.check_eps(eps, where, x)
    check_impl(impl, where)
    _check_channels_mask(x, mask, lengths, where)


@_checking.typechecked(_check_instance_norm)
def instance_norm(
    x: Float[AnyArray, "*batch_and_example"],
    weight: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    bias: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    *,
    eps: _checking.Number = 1e-5,
    channel_axis: int = 1,
    impl: Impl = "auto",
    mask: Bool[AnyArray, "*mask_shape"] | None = None,
    lengths: Int[AnyArray, "*lengths_shape"] | None = None,
) -> Float[Array, "*batch_and_example"]:
    r"""Instance normalization: each `(example, channel)` normalized over its spatial axes,
    then a per-channel affine. Equal to `group_norm(x, channels, ...)`.

    $$y_{c} = \frac{x_{c} - \mathbb{E}[x_{c}]}{\sqrt{\mathrm{Var}[x_{c}] + \varepsilon}}
    \gamma_c + \beta_c$$

    ??? cite
        [Instance Normalization](https://arxiv.org/abs/1607.08022)

    **Arguments:**

    - `x`: `(batch, channels, *spatial)` with at least two spatial elements; or
        `(batch, *spatial, channels)` with `channel_axis=-1`.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance; must be positive.
    - `channel_axis`: `1` or `-1`, as in [`eqxnorm.functional.group_norm`][].
    - `impl`: `"auto"`, `"pallas"` or `"reference"`.
    - `mask`, `lengths`: as [`eqxnorm.functional.group_norm`][].

    **Returns:**

    An array of `x`'s shape and dtype.

    **Raises:**

    As [`eqxnorm.functional.group_norm`][], and `ValueError` for fewer than two spatial
    elements.
    """
    channels_last = _channels_last(x, channel_axis, "eqxnorm.functional.instance_norm")
    channels = x.shape[-1 if channels_last else 1]
    return _group_norm(
        x,
        channels,
        weight,
        bias,
        eps,
        impl,
        mask=mask,
        lengths=lengths,
        channels_last=channels_last,
    )


# --- BatchNorm -------------------------------------------------------------------------------


def _static_groups(axis_index_groups: Any, where: str) -> tuple[tuple[int, ...], ...] | None:
    """`axis_index_groups` as a tuple of tuples of ints (hashable, for a static field), or
    `None`."""
    if axis_index_groups is None:
        return None
    try:
        return tuple(tuple(operator.index(i) for i in group) for group in axis_index_groups)
    except TypeError:
        raise TypeError(
            f"{where}: `axis_index_groups` must be a sequence of sequences of member "
            f"indices (ints), e.g. [[0, 1], [2, 3]], but got {axis_index_groups!r}."
        ) from None


def _axis_groups(axis_name: Any, axis_index_groups: Any, where: str) -> Any:
    """`axis_name`, or with `axis_index_groups` the `reference.AxisGroups` pooling within
    them, validated: a partition of the members of `axis_name` into groups of one size (as
    `lax.psum` requires). Call inside the transformation binding the name."""
    if axis_index_groups is None:
        return axis_name
    if axis_name is None:
        raise ValueError(
            f"{where}: `axis_index_groups` groups the members of a named axis, but "
            f"axis_name=None. Pass the `axis_name` the groups index, e.g. `axis_name='batch'`."
        )
    groups = _static_groups(axis_index_groups, where)
    members = _checking.axis_size(axis_name, where)
    flat = sorted(i for group in groups for i in group)
    if flat != list(range(members)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"{where}: `axis_index_groups` must split the {members} members of "
            f"axis_name={axis_name!r} (indices 0 to {members - 1}) into groups of one size, "
            f"each index in exactly one group, but got {axis_index_groups!r}. For example "
            f"[[0, 1], [2, 3]] pools members 0 and 1, and 2 and 3, of 4."
        )
    # Hashable, as static arguments must be.
    axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    return AxisGroups(axis_name, groups)


def _check_batch_norm(
    x,
    weight=None,
    bias=None,
    *,
    mean=None,
    var=None,
    eps=1e-5,
    axis_name=None,
    axis_index_groups=None,
    channel_axis=1,
    impl="auto",
    mask=None,
    lengths=None,
):
    where = "eqxnorm.functional.batch_norm"
    batch, channels, spatial = _check_channels(x, where, channel_axis)
    _check_channel_params(channels, where, weight=weight, bias=bias, mean=mean, var=var)
    if (mean is None) != (var is None):
        raise ValueError(
            f"{where}: pass both `mean` and `var` (to normalize with given statistics) or "
            f"neither (to use the batch statistics), but got only "
            f"`{'mean' if var is None else 'var'}`."
        )
    if mean is None:
        members = 1 if axis_name is None else _checking.axis_size(axis_name, where)
        grouped = _axis_groups(axis_name, axis_index_groups, where)
        if isinstance(grouped, AxisGroups):
            members = grouped.group_size
        if batch * spatial * members < 2:
            raise ValueError(
                f"{where}: batch statistics need more than one value per channel, but "
                f"x.shape={x.shape} across {members} member(s) of axis_name={axis_name!r} "
                f"gives {batch * spatial * members}. Use a larger batch, or pass running "
                f"statistics as `mean=` and `var=`."
            )
    _checking.check_eps(eps, where, x)
    check_impl(impl, where)
    _check_channels_mask(x, mask, lengths, where)


@_checking.typechecked(_check_batch_norm)
def batch_norm(
    x: Float[AnyArray, "*batch_and_example"],
    weight: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    bias: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    *,
    mean: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    var: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    eps: _checking.Number = 1e-5,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    channel_axis: int = 1,
    impl: Impl = "auto",
    mask: Bool[AnyArray, "*mask_shape"] | None = None,
    lengths: Int[AnyArray, "*lengths_shape"] | None = None,
) -> tuple[
    Float[Array, "*batch_and_example"],
    Float[Array, " {x.shape[channel_axis]}"],
    Float[Array, " {x.shape[channel_axis]}"],
]:
    r"""Batch normalization, per channel over the batch and spatial axes:

    $$y_{c} = \frac{x_{c} - \mu_c}{\sqrt{\sigma^2_c + \varepsilon}} \gamma_c + \beta_c$$

    With `mean=None, var=None` (training), $\mu$ and $\sigma^2$ are the batch mean and biased
    variance, pooled over every member of `axis_name` when given (so the same code computes
    global statistics under `vmap`, `pmap` and `shard_map`). With `mean` and `var` given
    (inference), they are used as they are.

    ??? cite
        [Batch Normalization](https://arxiv.org/abs/1502.03167)

    **Arguments:**

    - `x`: `(batch, channels, *spatial)`, any number of spatial axes (including none).
    - `weight`, `bias`: `(channels,)` or `None`.
    - `mean`, `var`: `(channels,)` statistics to normalize with, or both `None`.
    - `eps`: added to the variance; must be positive.
    - `axis_name`: a named axis (or sequence of names) whose members' batches are pooled.
    - `axis_index_groups`: pool only within groups of the members of `axis_name`, as in
        Flax and Haiku: e.g. `[[0, 1], [2, 3]]` normalizes members 0 and 1 with their
        pooled statistics, and 2 and 3 with theirs. The groups partition the member
        indices (for a sequence of names, the linear index, the last name varying
        fastest) into groups of one size. Under `vmap`, `pmap` and `shard_map` alike.
    - `channel_axis`: `1` (channels first, the default) or `-1`: `x` channels-last, `(batch,
        *spatial, channels)`, normalized as the `(batch·spatial, channels)` matrix it is in
        memory, per column (a reshape, no transposed copy).
    - `impl`: `"auto"`, `"pallas"` or `"reference"`.
    - `mask`, `lengths`: as [`eqxnorm.functional.group_norm`][]: the batch statistics are
        over the `True` elements only (padded examples and positions excluded), pooled over
        `axis_name` (members may hold different numbers of them). Not used with `mean` and
        `var` given.

    **Returns:**

    `(y, mean, var)`: `y` of `x`'s shape and dtype, and the statistics used, `(channels,)`.
    In training these are the batch mean and biased variance in float32 (float64 for float64
    input): use them to update running statistics.

    **Raises:**

    `TypeError` for non-floating input or a non-int `channel_axis`; `ValueError` for a rank
    below 2, an empty axis, a `channel_axis` other than first or last, parameters of the wrong
    shape, only one of `mean`/`var`, an unbound `axis_name`, a single value per channel in
    training, `eps <= 0`, an unknown `impl`, or `axis_index_groups` without `axis_name` or
    not splitting its members into groups of one size.
    """
    if mean is None:
        axis_name = _axis_groups(axis_name, axis_index_groups, "eqxnorm.functional.batch_norm")
    channels_last = _channels_last(x, channel_axis, "eqxnorm.functional.batch_norm")
    return _batch_norm(
        x,
        weight,
        bias,
        mean,
        var,
        eps,
        axis_name,
        impl,
        mask=mask,
        lengths=lengths,
        channels_last=channels_last,
    )


def _batch_norm(
    x,
    weight,
    bias,
    mean,
    var,
    eps,
    axis_name,
    impl,
    example=False,
    mask=None,
    lengths=None,
    channels_last=False,
):
    """BatchNorm of `x` `(batch, channels, *spatial)`, or with `example` of one example
    `(channels, *spatial)` (the modules' call, the batch being the members of `axis_name`);
    `mask`/`lengths` as `batch_norm` takes them. With `channels_last`, `x` is `(batch,
    *spatial, channels)` or `(*spatial, channels)`: the `(rows, channels, 1)` reshape of
    that matrix, per-column statistics over its rows, is BatchNorm of the same values (the
    kernels' `(batch, features)` case)."""
    x, weight, bias, mean, var = _as_arrays(x, weight, bias, mean, var)
    impl_module = implementation(impl)
    valid = None if mean is not None else _valid_channels(x, mask, lengths, channels_last)

    def norm(x3, *m3):
        if mean is None:
            fn = impl_module.batch_norm
            return fn(x3, weight, bias, eps=float(eps), axis_name=axis_name, mask=(*m3, None)[0])
        y = impl_module.batch_norm_inference(x3, mean, var, weight, bias, eps=float(eps))
        return y, mean, var

    if channels_last:
        rows = (math.prod(x.shape[:-1]), x.shape[-1], 1)
        y, mean, var = norm(x.reshape(rows), *(() if valid is None else (valid.reshape(rows),)))
        return y.reshape(x.shape), mean, var
    x3 = _flatten_spatial(x, example)
    m3 = () if valid is None else (_flatten_spatial(valid, example),)
    y, mean, var = _on_example(norm, impl, x3, *m3) if example else norm(x3, *m3)
    return y.reshape(x.shape), mean, var


# --- Weight standardization and spectral normalization --------------------------------------


def _check_weight_matrix(weight: Any, where: str, min_fan_in: int) -> tuple[int, int]:
    """`(out, fan_in)` of a weight of shape `(out, *rest)`."""
    _checking.check_floating(weight, "weight", where)
    if weight.ndim < 2:
        raise ValueError(
            f"{where} needs a weight of shape (out, *rest) with at least two axes, but got "
            f"weight.shape={weight.shape}. A 1-D parameter (a bias, a norm's scale) has no "
            f"fan-in to normalize over; wrap only layers whose weight is a matrix or a "
            f"convolution kernel."
        )
    fan_in = math.prod(weight.shape[1:])
    if weight.shape[0] == 0 or fan_in < min_fan_in:
        raise ValueError(
            f"{where} needs at least one output unit and at least {min_fan_in} element(s) "
            f"per output unit (the product of the axes after the first), but got "
            f"weight.shape={weight.shape}, i.e. {weight.shape[0]} output unit(s) of "
            f"{fan_in} element(s). Use a layer with a larger fan-in."
        )
    return weight.shape[0], fan_in


def _check_num_power_iterations(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where}: `num_power_iterations` must be a Python int, but got {value!r} of "
            f"type {type(value).__name__}. Pass e.g. `num_power_iterations=1`."
        )
    if value < 0:
        raise ValueError(
            f"{where}: `num_power_iterations` must be >= 0 (0 keeps u and v as they are), but "
            f"got num_power_iterations={value}. Pass e.g. `num_power_iterations=1`."
        )


def _check_weight_standardize(weight, *, eps=1e-5, impl="auto"):
    where = "eqxnorm.functional.weight_standardize"
    _check_weight_matrix(weight, where, min_fan_in=2)
    _checking.check_eps(eps, where, weight)
    check_impl(impl, where)


@_checking.typechecked(_check_weight_standardize)
def weight_standardize(
    weight: Float[AnyArray, " out *rest"],
    *,
    eps: _checking.Number = 1e-5,
    impl: Impl = "auto",
) -> Float[Array, " out *rest"]:
    r"""Weight standardization: each output unit's weights (a row of the `(out, fan_in)`
    reshape) to zero mean and unit variance,

    $$\hat W_{o} = \frac{W_{o} - \mathbb{E}[W_{o}]}{\sqrt{\mathrm{Var}[W_{o}] + \varepsilon}},$$

    the biased variance inside the square root, as in timm's `StdConv2d` and BiT. Gradients
    flow through the statistics to the raw weight. The statistics are computed in float32
    (float64 for a float64 weight); the result has the weight's dtype.

    ??? cite
        [Micro-Batch Training with Batch-Channel Normalization and Weight
        Standardization](https://arxiv.org/abs/1903.10520)

    **Arguments:**

    - `weight`: `(out, *rest)`, e.g. `(out, in)` for a linear layer or
        `(out, in, *kernel)` for a convolution; at least two elements per output unit.
    - `eps`: added to the variance; must be positive.
    - `impl`: `"auto"`, `"pallas"` or `"reference"`.

    **Returns:**

    The standardized weight, of `weight`'s shape and dtype.

    **Raises:**

    `TypeError` for a non-floating weight; `ValueError` for a 1-D weight, fewer than two
    elements per output unit, `eps <= 0`, or an unknown `impl`.
    """
    (weight,) = _as_arrays(weight)
    rows = weight.reshape(weight.shape[0], -1)
    return implementation(impl).layer_norm(rows, None, None, eps=float(eps)).reshape(weight.shape)


def _power_iteration(matrix: Array, v: Array, eps: float) -> tuple[Array, Array]:
    # The norms are spelt as in `eqx.nn.SpectralNorm`, so that the two agree bit for bit.
    u = matrix @ v
    u = u / jnp.maximum(eps, jnp.sqrt(jnp.sum(u**2)))
    v = matrix.T @ u
    v = v / jnp.maximum(eps, jnp.sqrt(jnp.sum(v**2)))
    return u, v


def _check_spectral_normalize(weight, u, v, *, num_power_iterations=1, eps=1e-12, impl="auto"):
    where = "eqxnorm.functional.spectral_normalize"
    out, fan_in = _check_weight_matrix(weight, where, min_fan_in=1)
    for name, vector, size in (("u", u, out), ("v", v, fan_in)):
        _checking.check_param(vector, (size,), name, where, "from the (out, fan_in) reshape")
    _check_num_power_iterations(num_power_iterations, where)
    _checking.check_eps(eps, where, weight)
    check_impl(impl, where)


@_checking.typechecked(_check_spectral_normalize)
def spectral_normalize(
    weight: Float[AnyArray, " out *rest"],
    u: Float[AnyArray, " out"],
    v: Float[AnyArray, " fan_in"],
    *,
    num_power_iterations: int = 1,
    eps: _checking.Number = 1e-12,
    impl: Impl = "auto",
) -> tuple[Float[Array, " out *rest"], Float[Array, " out"], Float[Array, " fan_in"], Scalar]:
    r"""Spectral normalization: the weight divided by an estimate of its largest singular
    value, $\hat W = W / \sigma(W)$ with $\sigma(W) \approx u^\top W v$.

    `W` is reshaped to `(out, fan_in)`. `num_power_iterations` steps of power iteration,
    $u \leftarrow Wv/\max(\lVert Wv\rVert, \varepsilon)$,
    $v \leftarrow W^\top u/\max(\lVert W^\top u\rVert, \varepsilon)$, refine the singular
    vectors first; they run on `stop_gradient(W)`, and `u`, `v` are treated as constants, so
    gradients flow only through the $W$ in $W / (u^\top W v)$ (as in the paper, PyTorch and
    `eqx.nn.SpectralNorm`).

    The power iteration and $\sigma$ are computed in float32 (float64 for a float64 weight),
    whatever the weight's dtype: a float16 `Wv` can overflow, and a bfloat16 `u` loses the
    digits that make repeated iterations converge. The normalized weight is returned in the
    weight's dtype. $\sigma$ is not clamped: an all-zero weight gives NaN, as in PyTorch.

    ??? cite
        [Spectral Normalization for Generative Adversarial
        Networks](https://arxiv.org/abs/1802.05957)

    **Arguments:**

    - `weight`: `(out, *rest)`, at least two axes.
    - `u`: `(out,)` and `v`: `(fan_in,)` with `fan_in = prod(rest)`, the current singular
        vector estimates (e.g. from `eqxnorm.SpectralNorm`'s state), any floating dtype.
    - `num_power_iterations`: refinement steps before normalizing; `0` uses `u`, `v` as they
        are (inference).
    - `eps`: lower bound on the norms divided by in the power iteration; must be positive.
    - `impl`: `"auto"` or `"reference"` (power iteration is matrix-vector products, which XLA
        already runs at full speed; there is no kernel).

    **Returns:**

    `(weight / sigma, u, v, sigma)`: the normalized weight in `weight`'s shape and dtype, the
    refined `u`, `v` and the scalar estimate `sigma`, these three in float32 (float64 for a
    float64 weight).

    **Raises:**

    `TypeError` for non-floating arrays; `ValueError` for a 1-D weight, `u`/`v` of the wrong
    size, a negative `num_power_iterations`, `eps <= 0`, or an unknown `impl`.
    """
    weight, u, v = _as_arrays(weight, u, v)
    cdt = compute_dtype(weight.dtype)
    matrix = weight.reshape(weight.shape[0], -1).astype(cdt)
    u = u.astype(cdt)
    v = v.astype(cdt)
    frozen = lax.stop_gradient(matrix)
    for _ in range(num_power_iterations):
        u, v = _power_iteration(frozen, v, eps)
    u = lax.stop_gradient(u)
    v = lax.stop_gradient(v)
    sigma = jnp.einsum("i,ij,j->", u, matrix, v)
    normalized = (matrix / sigma).astype(weight.dtype).reshape(weight.shape)
    return normalized, u, v, sigma


def _check_spectral_norm(weight):
    _check_weight_matrix(weight, "eqxnorm.functional.spectral_norm", min_fan_in=1)


@_checking.typechecked(_check_spectral_norm)
def spectral_norm(weight: Float[AnyArray, " out *rest"]) -> Scalar:
    r"""The exact spectral norm $\sigma_{\max}(W)$ of the `(out, fan_in)` reshape of `weight`,
    from its singular value decomposition: for evaluating how well power iteration tracks it.
    Costs a full SVD, so use it for evaluation, not in a training step.

    **Arguments:**

    - `weight`: `(out, *rest)`, at least two axes.

    **Returns:**

    A scalar in float32 (float64 for a float64 weight), computed in that precision, like the
    estimate `sigma` of [`eqxnorm.functional.spectral_normalize`][].

    **Raises:**

    `TypeError` for a non-floating weight; `ValueError` for a 1-D weight.
    """
    (weight,) = _as_arrays(weight)
    matrix = weight.reshape(weight.shape[0], -1).astype(compute_dtype(weight.dtype))
    return jnp.linalg.svd(matrix, compute_uv=False)[0]


# --- Weight normalization --------------------------------------------------------------------


def _weight_norm_axes(ndim: int, axis: Any, where: str) -> tuple[int, ...]:
    """The axes a weight of rank `ndim` is reduced over for the norm kept per index of `axis`
    (all of them for `axis=None`)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(
            f"{where}: `axis` must be a Python int or None, but got {axis!r} of type "
            f"{type(axis).__name__}. Pass e.g. `axis=0` (one norm per output unit)."
        )
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{where}: axis={axis} is out of range for a weight of rank {ndim}. Pass an axis "
            f"in [{-ndim}, {ndim}), e.g. `axis=0` (one norm per output unit), or `axis=None` "
            f"(one norm for the whole weight)."
        )
    kept = axis % ndim
    return tuple(a for a in range(ndim) if a != kept)


def _weight_norm_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """The shape of the magnitude `g` of a weight of shape `shape`: `shape` with every axis
    reduced over (all but `axis`) set to 1, as `eqx.nn.WeightNorm` keeps it."""
    reduced = _weight_norm_axes(len(shape), axis, "eqxnorm.functional.weight_normalize")
    return tuple(1 if a in reduced else s for a, s in enumerate(shape))


def _check_weight_normalize(weight, g, *, axis=0, impl="auto"):
    where = "eqxnorm.functional.weight_normalize"
    _checking.check_floating(weight, "weight", where)
    _checking.check_floating(g, "g", where)
    if weight.ndim == 0:
        raise ValueError(
            f"{where} needs a weight with at least one axis, but got a scalar weight. Wrap "
            f"only layers whose weight is an array (a matrix, a convolution kernel)."
        )
    expected = _weight_norm_shape(tuple(weight.shape), axis)
    if tuple(g.shape) != expected:
        raise ValueError(
            f"{where}: `g` must have shape {expected} (weight.shape={tuple(weight.shape)} "
            f"with the axes other than axis={axis} set to 1), but got g.shape="
            f"{tuple(g.shape)}. Initialise it as `eqxnorm.WeightNorm` does: the norm of the "
            f"weight over those axes, with `keepdims=True`."
        )
    check_impl(impl, where)


@_checking.typechecked(_check_weight_normalize)
def weight_normalize(
    weight: Float[AnyArray, "*shape"],
    g: Float[AnyArray, "*g_shape"],
    *,
    axis: int | None = 0,
    impl: Impl = "auto",
) -> Float[Array, "*shape"]:
    r"""Weight normalization: the weight $v$ rescaled to the magnitude $g$,

    $$W = g \, \frac{v}{\lVert v \rVert},$$

    with one Euclidean norm $\lVert v \rVert$ per index of `axis`, over every other axis
    (for `(out, in)` and `axis=0`: one per output unit, over its row; `axis=None`: one
    for the whole weight). Gradients flow to both $v$ and $g$. Computed in float32 (float64
    for float64), returned in the weight's dtype; an all-zero slice of $v$ gives NaN, as in
    `eqx.nn.WeightNorm` and PyTorch.

    ??? cite
        [Weight Normalization: A Simple Reparameterization to Accelerate Training of Deep
        Neural Networks](https://arxiv.org/abs/1602.07868)

    **Arguments:**

    - `weight`: $v$, any shape with at least one axis, e.g. `(out, in)` or
        `(out, in, *kernel)`.
    - `g`: the magnitude, of `weight`'s shape with every axis but `axis` set to 1 (the
        `g` of [`eqxnorm.WeightNorm`][] and `eqx.nn.WeightNorm`).
    - `axis`: the axis keeping one norm per index, or `None` for one norm in all.
    - `impl`: `"auto"` or `"reference"` (a sum of squares and a scale, which XLA fuses;
        there is no kernel).

    **Returns:**

    The weight $W$, of `weight`'s shape and dtype.

    **Raises:**

    `TypeError` for non-floating arrays or a non-int `axis`; `ValueError` for a scalar
    weight, an `axis` out of range, a `g` of the wrong shape, or an unknown `impl`.
    """
    weight, g = _as_arrays(weight, g)
    axes = _weight_norm_axes(weight.ndim, axis, "eqxnorm.functional.weight_normalize")
    cdt = compute_dtype(weight.dtype)
    v = weight.astype(cdt)
    # The order of `eqx.nn.WeightNorm`, `v * g / norm`, so that the two agree.
    norm = jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))
    return (v * g.astype(cdt) / norm).astype(weight.dtype)


# --- Fused residual add + norm ---------------------------------------------------------------


def _check_same_shape(x: Any, other: Any, name: str, where: str) -> None:
    _checking.check_floating(other, name, where)
    if tuple(other.shape) != tuple(x.shape):
        raise ValueError(
            f"{where}: {name} must have x's shape, but got x.shape={x.shape} and "
            f"{name}.shape={other.shape}. Pass the residual stream that x is added to, of the "
            f"same shape."
        )


def _check_add_row_norm(where: str):
    def precheck(
        x,
        residual,
        weight=None,
        bias=None,
        *,
        shape=None,
        eps=1e-5,
        impl="auto",
        weight_offset=0.0,
        out_dtype=None,
        fp8_scale=None,
    ):
        _check_row_args(
            x, weight, bias, shape, eps, impl, where, (weight_offset, out_dtype, fp8_scale)
        )
        _check_same_shape(x, residual, "residual", where)

    return precheck


def _add_row_norm(op: str, x, residual, weight, bias, shape, eps, impl, options=(0, None, None)):
    where = f"eqxnorm.functional.{op}"
    shape = _resolve_row_shape(x, weight, bias, shape, where)
    x, residual = _as_arrays(x, residual)
    flat, options = _flat_params(x, weight, bias, shape, options, where)
    y, h, *amax = getattr(implementation(impl), op)(
        _to_rows(x, shape, impl),
        _to_rows(residual, shape, impl),
        *flat,
        eps=float(eps),
        **_options_kwargs(options),
    )
    return _from_rows(y, x, shape), _from_rows(h, x, shape), *amax


@_checking.typechecked(_check_add_row_norm("eqxnorm.functional.add_layer_norm"))
def add_layer_norm(
    x: Float[AnyArray, "*batch_and_shape"],
    residual: Float[AnyArray, "*batch_and_shape"],
    weight: Float[AnyArray, "*shape"] | None = None,
    bias: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    eps: _checking.Number = 1e-5,
    impl: Impl = "auto",
    weight_offset: _checking.Number = 0.0,
    out_dtype: Any = None,
    fp8_scale: Any = None,
) -> (
    tuple[Float[Array, "*batch_and_shape"], Float[Array, "*batch_and_shape"]]
    | tuple[Float[Array, "*batch_and_shape"], Float[Array, "*batch_and_shape"], Float[Array, ""]]
):
    r"""Residual add and LayerNorm in one pass, as a pre-norm transformer block needs them:

    $$h = x + r, \qquad y = \frac{h - \mathbb{E}[h]}{\sqrt{\mathrm{Var}[h] + \varepsilon}}
    \gamma + \beta,$$

    returning both the normalized `y` (the next sublayer's input) and `h` (the new residual
    stream). With `impl="pallas"` it is one kernel that reads `x` and `r` once and writes `y`
    and `h` once, and whose backward takes the gradients of both outputs in one pass (the
    unfused sequence makes two round trips through memory each way).

    The sum is taken in float32 and stored in `residual.dtype`, and `y` is the norm of `h` as
    stored, so the result equals `h = x + residual; y = layer_norm(h)` exactly. Keep the
    residual stream in float32 under bfloat16 activations by passing a float32 `residual`.

    **Arguments:**

    - `x`: `(*batch, *shape)`, floating point: the sublayer's output.
    - `residual`: `(*batch, *shape)`, floating point (its dtype may differ from `x`'s).
    - `weight`, `bias`, `shape`, `eps`, `impl`, `weight_offset`, `out_dtype`, `fp8_scale`: as
        [`eqxnorm.functional.layer_norm`][]; `out_dtype` is `y`'s alone (`h` stays in
        `residual.dtype`).

    **Returns:**

    `(y, h)`: `y` of `x`'s shape in `out_dtype` (default `x.dtype`), `h` of its shape in
    `residual.dtype`; with `fp8_scale`, `(y, h, amax)`.

    **Raises:**

    As [`eqxnorm.functional.layer_norm`][]; also `ValueError` when `residual.shape !=
    x.shape`.
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _add_row_norm("add_layer_norm", x, residual, weight, bias, shape, eps, impl, options)


@_checking.typechecked(_check_add_row_norm("eqxnorm.functional.add_rms_norm"))
def add_rms_norm(
    x: Float[AnyArray, "*batch_and_shape"],
    residual: Float[AnyArray, "*batch_and_shape"],
    weight: Float[AnyArray, "*shape"] | None = None,
    bias: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    eps: _checking.Number = 1e-5,
    impl: Impl = "auto",
    weight_offset: _checking.Number = 0.0,
    out_dtype: Any = None,
    fp8_scale: Any = None,
) -> (
    tuple[Float[Array, "*batch_and_shape"], Float[Array, "*batch_and_shape"]]
    | tuple[Float[Array, "*batch_and_shape"], Float[Array, "*batch_and_shape"], Float[Array, ""]]
):
    r"""Residual add and RMSNorm in one pass:

    $$h = x + r, \qquad y = \frac{h}{\sqrt{\frac{1}{n}\sum_{i=1}^n h_i^2 + \varepsilon}}
    \gamma + \beta.$$

    **Arguments:**

    As [`eqxnorm.functional.add_layer_norm`][].

    **Returns:**

    As [`eqxnorm.functional.add_layer_norm`][].

    **Raises:**

    As [`eqxnorm.functional.add_layer_norm`][].
    """
    options = (weight_offset, out_dtype, fp8_scale)
    return _add_row_norm("add_rms_norm", x, residual, weight, bias, shape, eps, impl, options)


# --- Adaptive (modulated) norms --------------------------------------------------------------


def _modulation_lead(x: Any, scale: Any, shift: Any, feature_shape: tuple[int, ...], where: str):
    """The leading axes `lead` of `scale`/`shift` (`(*lead, *feature_shape)`), checked to be a
    prefix of `x`'s axes before its features."""
    for name, value in (("scale", scale), ("shift", shift)):
        _checking.check_floating(value, name, where)
    if tuple(scale.shape) != tuple(shift.shape):
        raise ValueError(
            f"{where}: scale and shift must have the same shape, but got scale.shape="
            f"{scale.shape} and shift.shape={shift.shape}."
        )
    k = len(feature_shape)
    if scale.ndim < k or tuple(scale.shape[scale.ndim - k :]) != feature_shape:
        raise ValueError(
            f"{where}: scale and shift must end in the normalized shape {feature_shape}, but "
            f"got scale.shape={scale.shape}. Pass one (scale, shift) per example: shape "
            f"(*batch, *{feature_shape})."
        )
    lead = tuple(scale.shape[: scale.ndim - k])
    if x.ndim < len(lead) + k or tuple(x.shape[: len(lead)]) != lead:
        raise ValueError(
            f"{where}: the leading axes {lead} of scale.shape={scale.shape} must be the "
            f"leading axes of x, but got x.shape={x.shape}. scale and shift hold one vector "
            f"per example, broadcast over the axes between the batch and the features (e.g. "
            f"x of shape (batch, tokens, dim) with scale of shape (batch, dim))."
        )
    return lead


def _check_adaptive_row_norm(where: str):
    def precheck(
        x,
        scale,
        shift,
        weight=None,
        bias=None,
        *,
        shape=None,
        eps=1e-5,
        impl="auto",
        weight_offset=0.0,
        out_dtype=None,
    ):
        options = (weight_offset, out_dtype, None)
        feature_shape = _check_row_args(x, weight, bias, shape, eps, impl, where, options, False)
        _modulation_lead(x, scale, shift, feature_shape, where)

    return precheck


def _adaptive_row_norm(
    op: str, x, scale, shift, weight, bias, shape, eps, impl, options=(0.0, None)
):
    where = f"eqxnorm.functional.{op}"
    shape = _resolve_row_shape(x, weight, bias, shape, where)
    lead = _modulation_lead(x, scale, shift, shape, where)
    dim = math.prod(shape)
    x, scale, shift = _as_arrays(x, scale, shift)
    flat, options = _flat_params(x, weight, bias, shape, (*options, None), where, fp8=False)
    weight_offset, out_dtype, _ = options
    middle = x.shape[len(lead) : x.ndim - len(shape)]
    if _unit_batch(impl):
        # The kernels' `(examples, rows, dim)`; the reference takes the axes as they are.
        lead, middle = (math.prod(lead),), (math.prod(middle),)
    y = getattr(implementation(impl), op)(
        x.reshape(*lead, *middle, dim),
        scale.reshape(*lead, dim),
        shift.reshape(*lead, dim),
        *flat,
        eps=float(eps),
        weight_offset=weight_offset,
        out_dtype=out_dtype,
    )
    return y.reshape(x.shape)


@_checking.typechecked(_check_adaptive_row_norm("eqxnorm.functional.adaptive_layer_norm"))
def adaptive_layer_norm(
    x: Float[AnyArray, "*x_shape"],
    scale: Float[AnyArray, "*modulation_shape"],
    shift: Float[AnyArray, "*modulation_shape"],
    weight: Float[AnyArray, "*shape"] | None = None,
    bias: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    eps: _checking.Number = 1e-5,
    impl: Impl = "auto",
    weight_offset: _checking.Number = 0.0,
    out_dtype: Any = None,
) -> Float[Array, "*x_shape"]:
    r"""Adaptive layer normalization (adaLN, as in DiT; FiLM): LayerNorm over the trailing
    `shape` axes, then a scale and shift given per example,

    $$y = \left(\frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}}\gamma +
    \beta\right)(1 + s) + t,$$

    where $s$ = `scale` and $t$ = `shift` are typically projected from a conditioning
    embedding (see [`eqxnorm.AdaptiveLayerNorm`][]) and are broadcast over the axes between
    the batch and the features, e.g. the tokens. With `impl="pallas"` the modulation is fused
    into the LayerNorm kernel, forward and backward (the unfused sequence writes and reads the
    normalized array once more each way). Computed in float32 and rounded once.

    ??? cite
        [Scalable Diffusion Models with Transformers](https://arxiv.org/abs/2212.09748);
        [FiLM: Visual Reasoning with a General Conditioning Layer](https://arxiv.org/abs/1709.07871)

    **Arguments:**

    - `x`: `(*lead, *middle, *shape)`, floating point; e.g. `(batch, tokens, dim)`.
    - `scale`, `shift`: `(*lead, *shape)`, one vector per example: `lead` are the leading
        axes of `x` (`()` for a single example).
    - `weight`, `bias`, `shape`, `eps`, `impl`: as [`eqxnorm.functional.layer_norm`][]
        (diffusion transformers use neither `weight` nor `bias`).
    - `weight_offset`, `out_dtype`: as [`eqxnorm.functional.layer_norm`][] ($\gamma$ above
        is `weight_offset + weight`); no FP8 output.

    **Returns:**

    An array of `x`'s shape in `out_dtype` (default `x.dtype`).

    **Raises:**

    As [`eqxnorm.functional.layer_norm`][]; also `ValueError` when `scale` and `shift`
    differ in shape or do not have the shape `(*lead, *shape)` with `lead` leading axes of
    `x`, and `TypeError` for non-floating `scale`/`shift`.
    """
    options = (weight_offset, out_dtype)
    return _adaptive_row_norm(
        "adaptive_layer_norm", x, scale, shift, weight, bias, shape, eps, impl, options
    )


@_checking.typechecked(_check_adaptive_row_norm("eqxnorm.functional.adaptive_rms_norm"))
def adaptive_rms_norm(
    x: Float[AnyArray, "*x_shape"],
    scale: Float[AnyArray, "*modulation_shape"],
    shift: Float[AnyArray, "*modulation_shape"],
    weight: Float[AnyArray, "*shape"] | None = None,
    bias: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    eps: _checking.Number = 1e-5,
    impl: Impl = "auto",
    weight_offset: _checking.Number = 0.0,
    out_dtype: Any = None,
) -> Float[Array, "*x_shape"]:
    r"""Adaptive RMSNorm: RMSNorm over the trailing `shape` axes, then a per-example scale and
    shift,

    $$y = \left(\frac{x}{\sqrt{\frac{1}{n}\sum_{i=1}^n x_i^2 + \varepsilon}}\gamma +
    \beta\right)(1 + s) + t.$$

    **Arguments:**

    As [`eqxnorm.functional.adaptive_layer_norm`][].

    **Returns:**

    As [`eqxnorm.functional.adaptive_layer_norm`][].

    **Raises:**

    As [`eqxnorm.functional.adaptive_layer_norm`][].
    """
    options = (weight_offset, out_dtype)
    return _adaptive_row_norm(
        "adaptive_rms_norm", x, scale, shift, weight, bias, shape, eps, impl, options
    )


def _check_adaptive_group_norm(
    x, groups, scale, shift, weight=None, bias=None, *, eps=1e-5, channel_axis=1, impl="auto"
):
    where = "eqxnorm.functional.adaptive_group_norm"
    _check_group_args(x, groups, weight, bias, eps, impl, where, channel_axis)
    expected = (x.shape[0], x.shape[-1 if _channels_last(x, channel_axis, where) else 1])
    for name, value in (("scale", scale), ("shift", shift)):
        _checking.check_floating(value, name, where)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"{where}: {name} must be (batch, channels) = {expected}, one vector per "
                f"example, but got {name}.shape={value.shape}."
            )


@_checking.typechecked(_check_adaptive_group_norm)
def adaptive_group_norm(
    x: Float[AnyArray, "*batch_and_example"],
    groups: int,
    scale: Float[AnyArray, "batch {x.shape[channel_axis]}"],
    shift: Float[AnyArray, "batch {x.shape[channel_axis]}"],
    weight: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    bias: Float[AnyArray, " {x.shape[channel_axis]}"] | None = None,
    *,
    eps: _checking.Number = 1e-5,
    channel_axis: int = 1,
    impl: Impl = "auto",
) -> Float[Array, "*batch_and_example"]:
    r"""Adaptive GroupNorm (the FiLM conditioning of diffusion U-Nets): GroupNorm, then a
    scale and shift per example and channel,

    $$y_{b,c} = \left(\frac{x_{b,c} - \mathbb{E}[x_{b,g(c)}]}{\sqrt{\mathrm{Var}[x_{b,g(c)}]
    + \varepsilon}}\gamma_c + \beta_c\right)(1 + s_{b,c}) + t_{b,c}.$$

    With `impl="pallas"` the modulation is fused into the GroupNorm kernel, forward and
    backward.

    **Arguments:**

    - `x`: `(batch, channels, *spatial)`, floating point; or `(batch, *spatial, channels)`
        with `channel_axis=-1`.
    - `groups`: the number of groups; must divide `channels`.
    - `scale`, `shift`: `(batch, channels)`.
    - `weight`, `bias`: `(channels,)` or `None`.
    - `eps`: added to the variance; must be positive.
    - `channel_axis`: `1` or `-1`, as in [`eqxnorm.functional.group_norm`][].
    - `impl`: `"auto"`, `"pallas"` or `"reference"`.

    **Returns:**

    An array of `x`'s shape and dtype.

    **Raises:**

    As [`eqxnorm.functional.group_norm`][]; also `ValueError` when `scale`/`shift` are not
    `(batch, channels)`.
    """
    channels_last = _channels_last(x, channel_axis, "eqxnorm.functional.adaptive_group_norm")
    args = (x, groups, scale, shift, weight, bias, eps, impl)
    return _adaptive_group_norm(*args, channels_last=channels_last)


def _adaptive_group_norm(
    x, groups, scale, shift, weight, bias, eps, impl, example=False, channels_last=False
):
    """Adaptive GroupNorm of `x` `(batch, channels, *spatial)` with `scale`/`shift`
    `(batch, channels)`, or with `example` of one example `(channels, *spatial)` with
    `(channels,)` ones, the modules' call; `channels_last` as in `_group_norm`."""
    x, scale, shift, weight, bias = _as_arrays(x, scale, shift, weight, bias)
    op = "adaptive_group_norm_channels_last" if channels_last else "adaptive_group_norm"

    def norm(x3, scale, shift):
        fn = getattr(implementation(impl), op)
        return (fn(x3, scale, shift, weight, bias, groups=groups, eps=float(eps)),)

    x3 = (_flatten_spatial_last if channels_last else _flatten_spatial)(x, example)
    (y,) = _on_example(norm, impl, x3, scale, shift) if example else norm(x3, scale, shift)
    return y.reshape(x.shape)


# --- Per-head QK-norm, gated RMSNorm, Dynamic Tanh ---------------------------------------------


def _check_heads(x: Any, name: str, where: str) -> None:
    _checking.check_floating(x, name, where)
    if x.ndim < 2 or 0 in x.shape[-2:]:
        raise ValueError(
            f"{where}: `{name}` must be (*tokens, heads, head_dim) with heads and head_dim at "
            f"least 1, but got {name}.shape={x.shape}. Split the heads off the features "
            f"first, e.g. `{name}.reshape(tokens, heads, head_dim)`."
        )


def _check_head_weight(weight: Any, x: Any, name: str, where: str) -> None:
    if weight is None:
        return
    _checking.check_floating(weight, name, where)
    shared, per_head = (x.shape[-1],), tuple(x.shape[-2:])
    if tuple(weight.shape) not in (shared, per_head):
        raise ValueError(
            f"{where}: `{name}` must have shape {shared} (shared by the heads) or {per_head} "
            f"(one per head), but got {name}.shape={tuple(weight.shape)}."
        )


def _check_qk_norm(q, k, q_weight=None, k_weight=None, *, eps=1e-6, norm="rms_norm", impl="auto"):
    where = "eqxnorm.functional.qk_norm"
    _check_heads(q, "q", where)
    _check_heads(k, "k", where)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{where}: q and k must share head_dim (their last axis), but got q.shape={q.shape} "
            f"and k.shape={k.shape}."
        )
    _check_head_weight(q_weight, q, "q_weight", where)
    _check_head_weight(k_weight, k, "k_weight", where)
    if norm not in ("rms_norm", "layer_norm"):
        raise ValueError(
            f"{where}: norm must be 'rms_norm' or 'layer_norm', but got norm={norm!r}."
        )
    _checking.check_eps(eps, where, q)
    check_impl(impl, where)


def _as_heads(x: Array, impl: Impl) -> Array:
    """`(*tokens, heads, head_dim)` as the kernels' `(tokens, heads, head_dim)`."""
    return x if not _unit_batch(impl) else x.reshape(-1, *x.shape[-2:])


@_checking.typechecked(_check_qk_norm)
def qk_norm(
    q: Float[AnyArray, "*q_tokens q_heads head_dim"],
    k: Float[AnyArray, "*k_tokens k_heads head_dim"],
    q_weight: Float[AnyArray, "*q_per_head head_dim"] | None = None,
    k_weight: Float[AnyArray, "*k_per_head head_dim"] | None = None,
    *,
    eps: _checking.Number = 1e-6,
    norm: str = "rms_norm",
    impl: Impl = "auto",
) -> tuple[Float[Array, "*q_tokens q_heads head_dim"], Float[Array, "*k_tokens k_heads head_dim"]]:
    r"""Per-head QK-norm: every head's query and key vectors normalized over `head_dim`
    before the attention scores, as Qwen3, OLMo 2, Gemma 3 and ViT-22B do,

    $$\hat{q}_{t,h} = \frac{q_{t,h}}{\sqrt{\frac{1}{d}\sum_i q_{t,h,i}^2 + \varepsilon}}
    \gamma^q_{(h)}, \qquad \hat{k}_{t,h} \text{ likewise with } \gamma^k,$$

    (`norm="layer_norm"`: the mean subtracted too; no bias). With `impl="pallas"`, `q` and
    `k` are normalized in ONE kernel launch forward and one backward (Quack's, vLLM's and
    Megatron's fused QK-norm), each head's rows read in place (no transpose).

    ??? cite
        [Scaling Vision Transformers to 22 Billion Parameters](https://arxiv.org/abs/2302.05442);
        [Qwen3 Technical Report](https://arxiv.org/abs/2505.09388)

    **Arguments:**

    - `q`: `(*tokens, q_heads, head_dim)`, floating point.
    - `k`: `(*tokens', k_heads, head_dim)` (grouped-query attention: `k_heads` may differ;
        cross-attention: the tokens may differ).
    - `q_weight`, `k_weight`: `(head_dim,)` shared by the heads (Qwen3's `q_norm`/`k_norm`),
        `(heads, head_dim)` one per head, or `None`.
    - `eps`: added to the mean square (variance); must be positive. Qwen3's is 1e-6.
    - `norm`: `"rms_norm"` or `"layer_norm"`.
    - `impl`: `"auto"`, `"pallas"`, `"triton"` or `"reference"` (no Mosaic GPU kernel yet).

    **Returns:**

    `(q, k)` normalized, each of its input's shape and dtype.

    **Raises:**

    `TypeError` for non-floating input; `ValueError` when `q`/`k` have fewer than two axes or
    different `head_dim`, a weight is neither `(head_dim,)` nor `(heads, head_dim)`,
    `eps <= 0`, `norm` or `impl` is unknown.
    """
    q, k, q_weight, k_weight = _as_arrays(q, k, q_weight, k_weight)
    qy, ky = implementation(impl).qk_norm(
        _as_heads(q, impl), _as_heads(k, impl), q_weight, k_weight, eps=float(eps), norm=norm
    )
    return qy.reshape(q.shape), ky.reshape(k.shape)


def _check_gated_rms_norm(
    x, z, weight=None, *, shape=None, eps=1e-6, norm_before_gate=True, impl="auto"
):
    where = "eqxnorm.functional.gated_rms_norm"
    _check_row_args(x, weight, None, shape, eps, impl, where)
    _check_same_shape(x, z, "z", where)


@_checking.typechecked(_check_gated_rms_norm)
def gated_rms_norm(
    x: Float[AnyArray, "*batch_and_shape"],
    z: Float[AnyArray, "*batch_and_shape"],
    weight: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    eps: _checking.Number = 1e-6,
    norm_before_gate: bool = True,
    impl: Impl = "auto",
) -> Float[Array, "*batch_and_shape"]:
    r"""Gated RMSNorm: an RMSNorm over the trailing `shape` axes gated by $\mathrm{silu}(z)$,

    $$y = \frac{x}{\sqrt{\overline{x^2} + \varepsilon}}\,\gamma\,\mathrm{silu}(z)
    \text{ (norm\_before\_gate=True)}, \qquad
    y = \frac{u}{\sqrt{\overline{u^2} + \varepsilon}}\,\gamma,\ u = x\,\mathrm{silu}(z)
    \text{ (False)},$$

    as `norm_before_gate` is defined by Mamba-2's `RMSNormGated` (`mamba_ssm`, whose Mamba-2
    layer uses `False`) and Qwen3-Next's `Qwen3NextRMSNormGated` (the order `True`). With
    `impl="pallas"` the gate is fused into the norm, forward and backward: one kernel reads
    `x` and `z` once and writes `y`; the backward writes `dx` and `dz` in one pass. Computed
    in float32 and rounded once (Qwen3-Next rounds the normalized value to `x.dtype` before
    the weight; in float32 the two agree).

    ??? cite
        [Transformers are SSMs (Mamba-2)](https://arxiv.org/abs/2405.21060)

    **Arguments:**

    - `x`: `(*batch, *shape)`, floating point.
    - `z`: the gate, of `x`'s shape.
    - `weight`: $\gamma$, of shape `shape`, or `None`.
    - `shape`: the normalized trailing shape (default: the weight's, else `x`'s last axis).
    - `eps`: added to the mean square; must be positive. (Qwen3-Next: 1e-6; Mamba-2: 1e-5.)
    - `norm_before_gate`: see above.
    - `impl`: `"auto"`, `"pallas"`, `"triton"`, `"mosaic_gpu"` or `"reference"`.

    **Returns:**

    An array of `x`'s shape and dtype.

    **Raises:**

    As [`eqxnorm.functional.rms_norm`][]; also `ValueError` when `z.shape != x.shape`.
    """
    shape = _resolve_row_shape(x, weight, None, shape, "eqxnorm.functional.gated_rms_norm")
    x, z, weight = _as_arrays(x, z, weight)
    flat = None if weight is None else weight.reshape(math.prod(shape))
    y = implementation(impl).gated_rms_norm(
        _to_rows(x, shape, impl),
        _to_rows(z, shape, impl),
        flat,
        eps=float(eps),
        norm_before_gate=bool(norm_before_gate),
    )
    return _from_rows(y, x, shape)


def _check_dyt(x, alpha, weight=None, bias=None, *, shape=None, impl="auto"):
    where = "eqxnorm.functional.dyt"
    _resolve_row_shape(x, weight, bias, shape, where)
    _checking.check_floating(alpha, "alpha", where)
    if alpha.ndim != 0:
        raise ValueError(
            f"{where}: alpha must be a scalar (shape ()), but got alpha.shape={alpha.shape}. "
            f"Pass `alpha.reshape(())` for a one-element array."
        )
    check_impl(impl, where)


@_checking.typechecked(_check_dyt)
def dyt(
    x: Float[AnyArray, "*batch_and_shape"],
    alpha: Float[AnyArray, ""],
    weight: Float[AnyArray, "*shape"] | None = None,
    bias: Float[AnyArray, "*shape"] | None = None,
    *,
    shape: int | Sequence[int] | None = None,
    impl: Impl = "auto",
) -> Float[Array, "*batch_and_shape"]:
    r"""Dynamic Tanh, the normalization-free replacement for LayerNorm of "Transformers
    without Normalization":

    $$y = \gamma \tanh(\alpha x) + \beta$$

    with a learnable scalar $\alpha$ and $\gamma$, $\beta$ of shape `shape`. With
    `impl="pallas"` one kernel each way (Liger's `LigerDyT`): the backward reads `x` and
    $\partial y$ once and reduces the gradients of $\alpha$, $\gamma$, $\beta$ in the same
    pass. Computed in float32 and rounded once.

    ??? cite
        [Transformers without Normalization](https://arxiv.org/abs/2503.10622)

    **Arguments:**

    - `x`: `(*batch, *shape)`, floating point.
    - `alpha`: $\alpha$, a scalar array `()`.
    - `weight`, `bias`: $\gamma$, $\beta$ of shape `shape`, or `None`.
    - `shape`: the trailing shape of the parameters (default: theirs, else `x`'s last axis).
    - `impl`: `"auto"`, `"pallas"`, `"triton"`, `"mosaic_gpu"` or `"reference"`.

    **Returns:**

    An array of `x`'s shape and dtype.

    **Raises:**

    `TypeError` for non-floating input; `ValueError` when `alpha` is not a scalar or the
    trailing axes of `x` do not match `shape`/the parameters.
    """
    shape = _resolve_row_shape(x, weight, bias, shape, "eqxnorm.functional.dyt")
    dim = math.prod(shape)
    x, alpha, weight, bias = _as_arrays(x, alpha, weight, bias)
    flat = [None if p is None else p.reshape(dim) for p in (weight, bias)]
    y = implementation(impl).dyt(_to_rows(x, shape, impl), alpha, *flat)
    return _from_rows(y, x, shape)


__all__ = [
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "batch_norm",
    "weight_standardize",
    "spectral_normalize",
    "spectral_norm",
    "weight_normalize",
    "add_layer_norm",
    "add_rms_norm",
    "adaptive_layer_norm",
    "adaptive_rms_norm",
    "adaptive_group_norm",
    "qk_norm",
    "gated_rms_norm",
    "dyt",
]
