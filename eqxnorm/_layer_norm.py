from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox.nn import State
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl
from ._misc import sentinel
from .kernels.reference import FP8_DTYPES, AxisName, compute_dtype


class _RowNorm(eqx.Module):
    """Shared body of LayerNorm and RMSNorm, a normalization over the whole example; the
    subclasses name the `eqxnorm.functional` function they call."""

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    axis_name: AxisName | None = eqx.field(static=True)
    weight_offset: float = eqx.field(static=True)
    out_dtype: Any = eqx.field(static=True)
    weight: Float[Array, "*shape"] | None
    bias: Float[Array, "*shape"] | None

    _function: ClassVar[str]

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: _checking.Number = 1e-5,
        use_weight: bool = True,
        use_bias: bool = True,
        dtype=None,
        *,
        impl: Impl = "auto",
        axis_name: AxisName | None = None,
        weight_offset: _checking.Number = 0.0,
        out_dtype: Any = None,
    ):
        """**Arguments:**

        - `shape`: the shape of one example (an int for a vector).
        - `eps`: added to the variance (LayerNorm) or mean square (RMSNorm); must be
            positive.
        - `use_weight`: whether to learn the scale $\\gamma$ (initialised to ones).
        - `use_bias`: whether to learn the shift $\\beta$ (initialised to zeros).
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.
        - `axis_name`: the named axis (or sequence of names) the features are split over,
            for tensor parallelism inside `jax.shard_map`: each member holds an equal slice
            of one axis of `shape` (of `x` and of the parameters alike; `shape` stays the
            whole one), and the statistics are over all of them, pooled with `lax.pmean`.
            `None` (the default): each call holds the whole example.
        - `weight_offset`: the scale applied is `weight_offset + weight`; the weight then
            starts at `1 - weight_offset` (zeros for `weight_offset=1.0`: Gemma's RMSNorm,
            "LayerNorm1p", TransformerEngine's `zero_centered_gamma`), so the layer starts as
            the plain norm. See [`eqxnorm.functional.layer_norm`][].
        - `out_dtype`: the output's dtype (default: the input's); a float8 dtype takes an
            `fp8_scale` at each call.

        **Raises:**

        `ValueError` for an empty `shape`, `eps <= 0`, an unknown `impl`, a non-zero
        `weight_offset` without a weight; `TypeError` for a non-floating `out_dtype`.
        """
        where = type(self).__name__
        self.shape = _checking.normalize_shape(shape, where)
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        weight = jnp.ones(()) if use_weight else None
        scale = (
            jnp.ones(()) if out_dtype is not None and jnp.dtype(out_dtype) in FP8_DTYPES else None
        )
        _, out_dtype, _ = functional._output_options(
            None, weight, weight_offset, out_dtype, scale, where
        )
        self.weight_offset = float(weight_offset)
        self.out_dtype = out_dtype
        self.eps = float(eps)
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.impl = impl
        self.axis_name = axis_name
        init = 1 - self.weight_offset
        self.weight = jnp.full(self.shape, init, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(self.shape, dtype=dtype) if use_bias else None

    def _precheck(self, x, state=sentinel, *, key=None, mask=None, fp8_scale=None):
        where = f"{type(self).__name__}(shape={self.shape})"
        _checking.check_floating(x, "x", where)
        _checking.check_mask(mask, x, where)
        names = ["dim"] if len(self.shape) == 1 else [f"shape[{i}]" for i in range(len(self.shape))]
        if self.axis_name is None:
            _checking.check_example_shape(x, self.shape, where, names)
            return
        members = _checking.axis_size(self.axis_name, where)
        slices = [
            (*self.shape[:i], n // members, *self.shape[i + 1 :])
            for i, n in enumerate(self.shape)
            if n % members == 0
        ]
        if tuple(x.shape) not in slices:
            raise ValueError(
                f"{where} with axis_name={self.axis_name!r} normalizes an example split over "
                f"the {members} members of that axis, each holding an equal slice of one axis "
                f"of {self.shape} (one of {slices}), but got x.shape={x.shape}. Split x (and "
                f"the parameters) evenly along one axis, e.g. with shard_map's in_specs."
            )

    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: Float[AnyArray, "*shape"],
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
        mask: Bool[AnyArray, "*mask_shape"] | None = None,
        fp8_scale: Any = None,
    ) -> Any:
        """**Arguments:**

        - `x`: one example, of shape `shape`; floating point.
        - `state`: optional; passed through unchanged, for interchangeability with
            `BatchNorm`.
        - `key`: ignored; for compatibility with the rest of the Equinox API.
        - `mask`: optional booleans broadcastable to `x`'s shape, `True` where an element
            counts in the statistics (Flax's `mask=`, for padding); see
            [`eqxnorm.functional.layer_norm`][] for masked positions' outputs and slices with
            no valid element.
        - `fp8_scale`: with a float8 `out_dtype`, the scale of the FP8 output (a scalar; see
            [`eqxnorm.functional.layer_norm`][]).

        **Returns:**

        The normalized array, of `x`'s shape in `out_dtype` (default `x.dtype`), or with
        `fp8_scale` `(y, amax)`; or `(output, state)` when `state` is passed.

        **Raises:**

        `ValueError` when `x.shape != shape` (a left-in batch axis is named, with the
        `jax.vmap` fix) or `mask` does not broadcast to it; `TypeError` for non-floating
        input or a non-boolean `mask`.
        """
        with jax.named_scope(f"eqxnorm.{type(self).__name__}"):
            fn = getattr(functional, self._function)
            out = fn(
                x,
                self.weight,
                self.bias,
                shape=self.shape if self.axis_name is None else x.shape,
                eps=self.eps,
                axis_name=self.axis_name,
                impl=self.impl,
                mask=mask,
                **self._options(fp8_scale),
            )
        return out if state is sentinel else (out, state)

    def _options(self, fp8_scale) -> dict:
        return dict(weight_offset=self.weight_offset, out_dtype=self.out_dtype, fp8_scale=fp8_scale)

    def _precheck_add(self, x, residual, *, fp8_scale=None):
        self._precheck(x)
        where = f"{type(self).__name__}(shape={self.shape}).add_and_norm"
        _checking.check_floating(residual, "residual", where)
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(
                f"{where}: residual must have x's shape {self.shape}, but got "
                f"residual.shape={residual.shape}. Pass the residual stream x is added to."
            )

    @_checking.typechecked(_precheck_add)
    def add_and_norm(
        self,
        x: Float[AnyArray, "*shape"],
        residual: Float[AnyArray, "*shape"],
        *,
        fp8_scale: Any = None,
    ) -> Any:
        """The residual add and this norm fused, as in a pre-norm transformer block:
        `h = x + residual`, `y = self(h)`, in one pass (one kernel with `impl="pallas"`,
        forward and backward). See [`eqxnorm.functional.add_layer_norm`][].

        **Arguments:**

        - `x`: one example, of shape `shape`: the sublayer's output.
        - `residual`: the residual stream, of shape `shape` (its dtype may differ from
            `x`'s, e.g. float32 under bfloat16 activations).
        - `fp8_scale`: as for `__call__`.

        **Returns:**

        `(y, h)`: the normalized `y` in `out_dtype` (default `x.dtype`) and the new residual
        stream `h` in `residual.dtype`; `y` equals `self(h)` exactly. With `fp8_scale`,
        `(y, h, amax)`.

        **Raises:**

        `ValueError` when `x.shape` or `residual.shape` is not `shape`; `TypeError` for
        non-floating input.
        """
        with jax.named_scope(f"eqxnorm.{type(self).__name__}.add_and_norm"):
            if self.axis_name is not None:
                # The fused kernels keep their statistics local: add as they do, then norm.
                cdt = compute_dtype(jnp.promote_types(x.dtype, residual.dtype))
                h = (x.astype(cdt) + residual.astype(cdt)).astype(residual.dtype)
                options = self._options(fp8_scale)
                options["out_dtype"] = options["out_dtype"] or x.dtype
                y = getattr(functional, self._function)(
                    h,
                    self.weight,
                    self.bias,
                    shape=h.shape,
                    eps=self.eps,
                    axis_name=self.axis_name,
                    impl=self.impl,
                    **options,
                )
                return (y, h) if fp8_scale is None else (y[0], h, y[1])
            fn = getattr(functional, "add_" + self._function)
            return fn(
                x,
                residual,
                self.weight,
                self.bias,
                shape=self.shape,
                eps=self.eps,
                impl=self.impl,
                **self._options(fp8_scale),
            )


class LayerNorm(_RowNorm):
    r"""Layer normalization over the whole example.

    $$y = \frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}} \gamma + \beta$$

    with the mean and biased variance over every element of `x` (of shape `shape`), and
    $\gamma$, $\beta$ of shape `shape` (or $1$, $0$ when disabled). A drop-in replacement for
    `equinox.nn.LayerNorm`: same arguments, defaults, parameter names and call; plus a static
    `impl`. Statistics are computed in float32 and the output keeps `x`'s dtype.

    ??? cite
        [Layer Normalization](https://arxiv.org/abs/1607.06450)

        ```bibtex
        @article{ba2016layer,
            author={Jimmy Lei Ba, Jamie Ryan Kiros, Geoffrey E. Hinton},
            title={Layer Normalization},
            year={2016},
            journal={arXiv:1607.06450},
        }
        ```
    """

    _function: ClassVar[str] = "layer_norm"
