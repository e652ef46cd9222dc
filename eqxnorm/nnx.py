r"""Flax NNX twins of the norm layers: `eqxnorm.nnx.LayerNorm`, `RMSNorm`, `GroupNorm`,
`InstanceNorm`, `BatchNorm`, `SpectralNorm` and `WeightNorm`, running on eqxnorm's
functional API (and so on its kernels where the functional API has them).

Each is a subclass of its `flax.nnx` namesake with the same constructor arguments and
defaults (plus a keyword-only `impl`), the same attributes, parameter names (`scale`,
`bias`) and collections (`nnx.Param`; `nnx.BatchStat` for BatchNorm's `mean` and `var`
and SpectralNorm's `u` and `sigma`), so the state of a Flax model loads into the twin
unchanged (`nnx.update(model, state)`) and back. Only the computation differs: the
statistics and the normalization are eqxnorm's.

```python
from flax import nnx
import eqxnorm.nnx

norm = eqxnorm.nnx.LayerNorm(512, rngs=nnx.Rngs(0))  # in place of nnx.LayerNorm(512, ...)
y = norm(x)  # x: (..., 512)
```

**Statistics.** eqxnorm always computes the mean and variance in two passes (the variance
of the centred values) in float32 (float64 for float64), never Flax's default one-pass
$E[x^2] - E[x]^2$: `use_fast_variance` is accepted for compatibility and has no effect. On
well-scaled data the two agree to float32 rounding; on data with a large mean the one-pass
variance cancels and eqxnorm's does not.

**Layouts.** The Flax layouts are features-last; the reduction and feature axes are those
of Flax. The row norms (`LayerNorm`, `RMSNorm`) with trailing reduction axes and the
features-last `BatchNorm` reach the kernels without a copy; other axes are transposed to
that layout and back (GroupNorm and InstanceNorm today: eqxnorm's functional ops are
channels-first).

**Not supported** (a clear error rather than a silent difference): `axis_name` on `GroupNorm`
and `InstanceNorm` (eqxnorm pools their statistics over no named axis), and `mask=` until the
functional ops take it.

Flax is an optional dependency, `pip install eqxnorm[flax]`; `import eqxnorm` never imports
it, only `import eqxnorm.nnx` does.
"""

import math
from typing import Any

import jax.lax as lax
import jax.numpy as jnp

try:
    from flax import nnx as _flax_nnx
    from flax.nnx.module import first_from as _first_from
except ImportError as error:  # pragma: no cover - exercised in a subprocess without Flax
    raise ImportError(
        "eqxnorm.nnx needs Flax (flax.nnx), which is not installed. Install it with "
        "`pip install eqxnorm[flax]` (or `pip install flax`)."
    ) from error

from . import _checking, functional
from ._dispatch import Impl, check_impl

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm",
    "BatchNorm",
    "SpectralNorm",
    "WeightNorm",
]


def _canonical(ndim: int, axes: Any) -> tuple[int, ...]:
    """`axes` (an int or a sequence) as sorted non-negative axes of a rank-`ndim` array."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted({a % ndim if -ndim <= a < ndim else a for a in axes}))


def _check_mask(mask: Any, where: str) -> None:
    if mask is not None:
        raise NotImplementedError(
            f"{where}: `mask=` is not supported by this version of eqxnorm.nnx (eqxnorm's "
            f"functional ops do not take a mask yet). Use the flax.nnx layer for masked "
            f"statistics, or call without `mask`."
        )


def _check_features(module: Any, x: Any, features: tuple[int, ...], where: str) -> None:
    """`ValueError` unless the feature axes of `x` hold the layer's `num_features`."""
    _checking.check_floating(x, "x", where)
    if any(not 0 <= a < x.ndim for a in features):
        raise ValueError(
            f"{where}: x of rank {x.ndim} (x.shape={x.shape}) has no axis {features}, the "
            f"layer's feature axes. Pass x with the features on those axes."
        )
    got = math.prod(x.shape[a] for a in features)
    # Flax's GroupNorm keeps `num_groups` and `group_size`, not `num_features`.
    expected = getattr(module, "num_features", None) or module.num_groups * module.group_size
    if got != expected:
        raise ValueError(
            f"{where} was built with num_features={expected}, but x.shape={x.shape} "
            f"has {got} on its feature axes {features}. Build the layer with "
            f"`num_features={got}`, or pass x with its features on those axes."
        )


def _setup(module: Any, impl: Impl) -> None:
    check_impl(impl, f"eqxnorm.nnx.{type(module).__name__}")
    module.impl = impl


def _params(module: Any, x: Any, *names: str) -> tuple[Any, ...]:
    """`x` and the module's parameters `names` (None when disabled), promoted by the
    module's `promote_dtype` to its `dtype`, as Flax does before normalizing."""
    values = [getattr(module, n, None) for n in names]
    values = [None if v is None else v[...] for v in values]
    return module.promote_dtype((x, *values), dtype=module.dtype)


def _feature_shaped(param: Any, x: Any, feature_axes: tuple[int, ...], axes: tuple[int, ...]):
    """`param` `(num_features,)` laid out over `axes` of `x` (size 1 off `feature_axes`)."""
    if param is None:
        return None
    return param.reshape([x.shape[a] if a in feature_axes else 1 for a in axes])


def _transposed(x: Any, perm: list[int]):
    """`x` transposed by `perm`, and the function undoing it; no transpose for the identity."""
    if perm == list(range(x.ndim)):
        return x, lambda y: y
    inverse = [perm.index(a) for a in range(x.ndim)]
    return jnp.transpose(x, perm), lambda y: jnp.transpose(y, inverse)


def _row_norm(module: Any, op: str, x: Any, scale: Any, bias: Any) -> Any:
    """LayerNorm (`op="layer_norm"`) or RMSNorm of `x` over `module.reduction_axes` with
    `scale`/`bias` over `module.feature_axes`, by `eqxnorm.functional`: the reduced axes are
    moved last (a no-op for Flax's default `-1`) and are the kernels' rows."""
    where = f"eqxnorm.nnx.{type(module).__name__}"
    reduced = _canonical(x.ndim, module.reduction_axes)
    features = _canonical(x.ndim, module.feature_axes)
    _check_features(module, x, features, where)
    kept = [a for a in range(x.ndim) if a not in reduced]
    xt, back = _transposed(x, kept + list(reduced))
    shape = tuple(x.shape[a] for a in reduced)
    inside = set(features) <= set(reduced)
    weight, shift = (
        (jnp.broadcast_to(_feature_shaped(p, x, features, reduced), shape) if p is not None else p)
        for p in ((scale, bias) if inside else (None, None))
    )
    axis_name = module.axis_name
    if module.axis_index_groups is None:
        fn = getattr(functional, op)
        y = fn(
            xt,
            weight,
            shift,
            shape=shape,
            eps=module.epsilon,
            axis_name=axis_name,
            impl=module.impl,
        )
    else:
        grouped = functional._axis_groups(axis_name, module.axis_index_groups, where)
        y = functional._row_norm(op, xt, weight, shift, shape, module.epsilon, module.impl, grouped)
    y = back(y)
    if not inside:
        everything = tuple(range(x.ndim))
        if scale is not None:
            y = y * _feature_shaped(scale, x, features, everything)
        if bias is not None:
            y = y + _feature_shaped(bias, x, features, everything)
    return y


class LayerNorm(_flax_nnx.LayerNorm):
    r"""`flax.nnx.LayerNorm` on eqxnorm's kernels:

    $$y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\mathrm{scale} +
    \mathrm{bias}$$

    over `reduction_axes` (default the last), with `scale` and `bias` over
    `feature_axes`. The constructor is Flax's (`num_features`, `epsilon=1e-6`, `dtype`,
    `param_dtype`, `use_bias`, `use_scale`, initializers, `reduction_axes=-1`,
    `feature_axes=-1`, `axis_name`, `axis_index_groups`, `use_fast_variance` (no effect:
    see the module documentation), `promote_dtype`, `rngs`, metadata), plus a
    keyword-only `impl` (`"auto"`, `"pallas"`, `"reference"`; see `eqxnorm.functional`).
    Computed by [`eqxnorm.functional.layer_norm`][]; `axis_name` splits the normalized
    features over devices (tensor parallelism) as there.
    """

    def __init__(self, *args, impl: Impl = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, impl)

    def __call__(self, x, *, mask=None):
        """**Arguments:**

        - `x`: any shape, floating point; the reduction and feature axes as configured.
        - `mask`: not supported yet (see the module documentation); must be `None`.

        **Returns:**

        An array of `x`'s shape in the dtype Flax gives (`dtype`, else the promotion of
        `x` and the parameters).
        """
        _check_mask(mask, "eqxnorm.nnx.LayerNorm")
        x, scale, bias = _params(self, x, "scale", "bias")
        return _row_norm(self, "layer_norm", x, scale, bias)


class RMSNorm(_flax_nnx.RMSNorm):
    r"""`flax.nnx.RMSNorm` on eqxnorm's kernels:

    $$y = \frac{x}{\sqrt{\mathbb{E}[x^2] + \epsilon}}\,\mathrm{scale}$$

    over `reduction_axes`, `scale` over `feature_axes`. The constructor is Flax's (no bias;
    `epsilon=1e-6`), plus a keyword-only `impl`. Computed by
    [`eqxnorm.functional.rms_norm`][].
    """

    def __init__(self, *args, impl: Impl = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, impl)

    def __call__(self, x, mask=None):
        """As [`eqxnorm.nnx.LayerNorm.__call__`][] (`mask` positional, as in Flax)."""
        _check_mask(mask, "eqxnorm.nnx.RMSNorm")
        x, scale = _params(self, x, "scale")
        return _row_norm(self, "rms_norm", x, scale, None)


def _channels_first(x: Any, batch: list[int], channels: list[int]):
    """`x` as `(batch, channels, spatial)` (each the product of its axes, the rest spatial),
    and the function putting such an array back in `x`'s layout."""
    spatial = [a for a in range(x.ndim) if a not in batch and a not in channels]
    xt, back = _transposed(x, batch + channels + spatial)
    sizes = [math.prod(x.shape[a] for a in axes) for axes in (batch, channels, spatial)]
    return xt.reshape(sizes), lambda y: back(y.reshape(xt.shape))


def _check_no_axis_name(module: Any, where: str) -> None:
    if module.axis_name is not None or module.axis_index_groups is not None:
        raise NotImplementedError(
            f"{where}: axis_name={module.axis_name!r} (statistics pooled over devices) is not "
            f"supported by eqxnorm's {type(module).__name__}, whose statistics are per example. "
            f"Construct it with `axis_name=None`, or use the flax.nnx layer."
        )


class GroupNorm(_flax_nnx.GroupNorm):
    r"""`flax.nnx.GroupNorm` on eqxnorm's kernels: the channels (the last axis) in
    `num_groups` groups (or groups of `group_size`), each normalized over its channels and
    `reduction_axes` (default every axis but the leading batch axis):

    $$y_c = \frac{x_c - \mathbb{E}[x_{g(c)}]}{\sqrt{\mathrm{Var}[x_{g(c)}] + \epsilon}}
    \,\mathrm{scale}_c + \mathrm{bias}_c.$$

    The constructor is Flax's (`num_features`, `num_groups=32`, `group_size`,
    `epsilon=1e-6`, ...), plus a keyword-only `impl`. Computed by
    [`eqxnorm.functional.group_norm`][] on the channels-first transpose of `x`.
    `axis_name` is not supported.
    """

    def __init__(self, *args, impl: Impl = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, impl)

    def __call__(self, x, *, mask=None):
        """**Arguments:**

        - `x`: `(batch, *spatial, num_features)`, floating point.
        - `mask`: not supported yet; must be `None`.

        **Returns:**

        An array of `x`'s shape in the dtype Flax gives.
        """
        where = "eqxnorm.nnx.GroupNorm"
        _check_mask(mask, where)
        _check_no_axis_name(self, where)
        if self.reduction_axes is None:
            reduced = (*range(1, x.ndim - 1), x.ndim - 1)
        else:
            reduced = _canonical(x.ndim, self.reduction_axes)
        channels = x.ndim - 1
        _check_features(self, x, (channels,), where)
        batch = [a for a in range(x.ndim) if a not in reduced and a != channels]
        x, scale, bias = _params(self, x, "scale", "bias")
        x3, back = _channels_first(x, batch, [channels])
        y = functional.group_norm(
            x3, self.num_groups, scale, bias, eps=self.epsilon, impl=self.impl
        )
        return back(y)


class InstanceNorm(_flax_nnx.InstanceNorm):
    r"""`flax.nnx.InstanceNorm` on eqxnorm's kernels: each example (the leading axis) and
    feature normalized over every other axis:

    $$y_c = \frac{x_c - \mathbb{E}[x_c]}{\sqrt{\mathrm{Var}[x_c] + \epsilon}}\,
    \mathrm{scale}_c + \mathrm{bias}_c.$$

    The constructor is Flax's (`num_features`, `epsilon=1e-6`, `feature_axes=-1`, ...),
    plus a keyword-only `impl`. Computed by [`eqxnorm.functional.instance_norm`][] on the
    channels-first transpose of `x`. `axis_name` is not supported.
    """

    def __init__(self, *args, impl: Impl = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, impl)

    def __call__(self, x, *, mask=None):
        """**Arguments:**

        - `x`: `(batch, *spatial, num_features)` (features on `feature_axes`), floating
            point, with at least two spatial elements.
        - `mask`: not supported yet; must be `None`.

        **Returns:**

        An array of `x`'s shape in the dtype Flax gives.
        """
        where = "eqxnorm.nnx.InstanceNorm"
        _check_mask(mask, where)
        _check_no_axis_name(self, where)
        features = list(_canonical(x.ndim, self.feature_axes))
        _check_features(self, x, tuple(features), where)
        if 0 in features:
            raise ValueError(
                f"{where}: the feature axes {tuple(features)} include axis 0, the batch axis. "
                f"Pass `feature_axes` among the axes after the first, e.g. -1."
            )
        x, scale, bias = _params(self, x, "scale", "bias")
        x3, back = _channels_first(x, [0], features)
        return back(functional.instance_norm(x3, scale, bias, eps=self.epsilon, impl=self.impl))


class BatchNorm(_flax_nnx.BatchNorm):
    r"""`flax.nnx.BatchNorm` on eqxnorm's kernels: each feature (`axis`, default the last)
    normalized over every other axis (and over the members of `axis_name`, or of each of
    its `axis_index_groups`), in training with the batch statistics, with the running ones
    in evaluation (`use_running_average=True`, `model.eval()`):

    $$y_c = \frac{x_c - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}\,\mathrm{scale}_c +
    \mathrm{bias}_c.$$

    Flax's running statistics, not `eqxnorm.BatchNorm`'s: `mean` and `var` (`nnx.BatchStat`,
    from 0 and 1) each step become $m \cdot \mathrm{old} + (1 - m) \cdot \mathrm{batch}$
    with the *biased* batch variance, so a Flax model's statistics carry over unchanged.
    They are stored `lax.stop_gradient`-ed. The constructor is Flax's (`num_features`,
    `use_running_average=False`, `axis=-1`, `momentum=0.99`, `epsilon=1e-5`, ...), plus a
    keyword-only `impl`. Computed by [`eqxnorm.functional.batch_norm`][]; features-last
    input reaches the kernels without a copy.
    """

    def __init__(self, *args, impl: Impl = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, impl)

    def __call__(self, x, use_running_average=None, *, mask=None):
        """**Arguments:**

        - `x`: any shape, floating point, the features on `axis`.
        - `use_running_average`: overrides the constructor's when not `None`.
        - `mask`: not supported yet; must be `None`.

        **Returns:**

        An array of `x`'s shape in the dtype Flax gives; in training, `mean` and `var` are
        updated in place.
        """
        where = "eqxnorm.nnx.BatchNorm"
        _check_mask(mask, where)
        use_running_average = _first_from(
            use_running_average,
            self.use_running_average,
            error_msg=(
                f"{where}: no `use_running_average` was given, to the constructor or the "
                f"call. Pass `use_running_average=True` (evaluation) or `False` (training)."
            ),
        )
        axis = _canonical(x.ndim, self.axis)
        _check_features(self, x, axis, where)
        x, mean, var, scale, bias = _params(self, x, "mean", "var", "scale", "bias")
        rows, back = _channels_first(x, [a for a in range(x.ndim) if a not in axis], list(axis))
        rows = rows.reshape(rows.shape[:2])
        if use_running_average:
            y, _, _ = functional.batch_norm(
                rows, scale, bias, mean=mean, var=var, eps=self.epsilon, impl=self.impl
            )
        else:
            y, batch_mean, batch_var = functional.batch_norm(
                rows,
                scale,
                bias,
                eps=self.epsilon,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                impl=self.impl,
            )
            m = self.momentum
            stats = self.mean[...].dtype
            self.mean[...] = lax.stop_gradient(
                m * self.mean[...] + (1 - m) * batch_mean.astype(stats)
            )
            self.var[...] = lax.stop_gradient(m * self.var[...] + (1 - m) * batch_var.astype(stats))
        return back(y.reshape(*y.shape, 1))


class WeightNorm(_flax_nnx.WeightNorm):
    r"""`flax.nnx.WeightNorm` on eqxnorm's functional API: before each call, every
    parameter of the wrapped layer selected by `variable_filter` (default the `kernel`s)
    is set to

    $$W = \mathrm{scale}\,\frac{v}{\lVert v \rVert},$$

    the norm over every axis but `feature_axes` (default `-1`, a Flax kernel's output
    features), `scale` (the `scales` dict, ones to start) over `feature_axes`. Flax's
    constructor (`layer_instance`, `feature_axes=-1`, `use_scale`, `scale_init`,
    `epsilon=1e-12`, ...), plus a keyword-only `impl`. Computed by
    [`eqxnorm.functional.weight_normalize`][], which divides by the norm itself where Flax
    divides by $\sqrt{\lVert v\rVert^2 + \epsilon}$: the two differ by $\epsilon/2\lVert
    v\rVert^2$ relative (nothing, at $\epsilon = 10^{-12}$, for weights not all zero). For
    `feature_axes` of more than one axis it falls back to Flax's own maths.
    """

    def __init__(self, *args, impl: Impl = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, impl)

    def _weightnorm_inplace(self, path, param):
        if not self.variable_filter(path, param):
            return
        features = _canonical(param.ndim, self.feature_axes)
        if len(features) > 1:
            return super()._weightnorm_inplace(path, param)
        axis = features[0] if features else None
        shape = functional._weight_norm_shape(tuple(param.shape), axis)
        v = param[...]
        if self.use_scale:
            g = self.scales[path].reshape(shape)
            dtype = jnp.result_type(v, g) if self.dtype is None else self.dtype
        else:
            g = jnp.ones(shape, v.dtype)
            dtype = v.dtype if self.dtype is None else self.dtype
        w = functional.weight_normalize(v, g, axis=axis, impl=self.impl)
        param.set_value(w.astype(dtype))


class SpectralNorm(_flax_nnx.SpectralNorm):
    r"""`flax.nnx.SpectralNorm` on eqxnorm's functional API: before each call, every
    parameter of the wrapped layer with at least two axes, reshaped to a matrix $M$ of
    shape `(-1, last axis)` as Flax does, is divided by $\sigma \approx v^\top M u$, with
    `n_steps` power iteration steps refining the stored `u` (`nnx.BatchStat`, `(1, last)`)
    and `sigma` (stored when `update_stats`, i.e. in `model.train()` mode).

    Flax's constructor (`layer_instance`, `n_steps=1`, `epsilon=1e-12`, `dtype`,
    `param_dtype`, `error_on_non_matrix`, `update_stats=True`, `rngs`), plus a keyword-only
    `impl`; the same `batch_stats` paths. Computed by
    [`eqxnorm.functional.spectral_normalize`][] on $M$, whose power iteration starting from
    Flax's `u` is Flax's (its `u`, `v` are Flax's `v`, `u`), in float32 whatever the
    parameter dtype. It bounds the norms below by $\epsilon$ where Flax adds $\epsilon$ to
    their squares, a relative difference of $\epsilon/2$ on unit vectors; and an all-zero
    parameter gives NaN, where Flax leaves it unchanged.
    """

    def __init__(self, *args, impl: Impl = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, impl)

    def _spectral_normalize_inplace(self, path, orig_param, update_stats):
        param = orig_param[...]
        if param.ndim <= 1 or self.n_steps < 1:
            return
        if param.ndim > 2 and self.error_on_non_matrix:
            raise ValueError(
                f"eqxnorm.nnx.SpectralNorm: the parameter {path} has {param.ndim} axes but "
                f"error_on_non_matrix=True. Pass error_on_non_matrix=False to normalize it "
                f"as a matrix of shape (-1, {param.shape[-1]})."
            )
        matrix = param.reshape(-1, param.shape[-1])
        u_stat = self.batch_stats[path + ("u",)]
        sigma_stat = self.batch_stats[path + ("sigma",)]
        u = u_stat[...]
        normalized, v, u_new, sigma = functional.spectral_normalize(
            matrix,
            jnp.zeros(matrix.shape[0], u.dtype),
            u[0],
            num_power_iterations=self.n_steps,
            eps=self.epsilon,
            impl=self.impl,
        )
        if update_stats:
            u_stat[...] = u_new[None].astype(u.dtype)
            sigma_stat[...] = sigma.astype(sigma_stat[...].dtype)
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(param, u)
        orig_param[...] = normalized.reshape(param.shape).astype(dtype)
