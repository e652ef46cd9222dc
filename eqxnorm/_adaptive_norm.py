from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox.nn import State
from jaxtyping import Array, Float, PRNGKeyArray

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl
from ._group_norm import (
    Example,
    ExampleIn,
    _divisors,
    annotated_channels,
    check_channel_axis,
    check_example_channels,
)
from ._misc import sentinel


def _projection(
    cond_size: int, features: int, zero_init: bool, dtype: Any, key: PRNGKeyArray
) -> eqx.nn.Linear:
    """The `Linear` from the conditioning vector to `(scale, shift)`, `2 × features` outputs;
    all zeros when `zero_init` (the adaLN-Zero initialisation: the layer starts as the plain
    norm)."""
    linear = eqx.nn.Linear(cond_size, 2 * features, dtype=dtype, key=key)
    if zero_init:
        zeros = (jnp.zeros_like(linear.weight), jnp.zeros_like(linear.bias))
        linear = eqx.tree_at(lambda lin: (lin.weight, lin.bias), linear, zeros)
    return linear


def _check_cond(cond: Any, cond_size: int, where: str) -> None:
    _checking.check_floating(cond, "cond", where)
    if tuple(cond.shape) == (cond_size,):
        return
    if cond.ndim == 2 and cond.shape[1] == cond_size:
        raise ValueError(
            f"{where} takes one conditioning vector of shape (cond_size={cond_size},), but got "
            f"cond.shape={cond.shape}: axis 0 looks like a batch axis. Equinox layers take one "
            f"example at a time; for a batch, use `jax.vmap(norm)(x, cond)`."
        )
    raise ValueError(
        f"{where} expects cond of shape (cond_size={cond_size},), but got cond.shape="
        f"{cond.shape}. Construct the layer with cond_size={cond.shape[-1] if cond.ndim else 1}"
        f" or pass a conditioning vector of {cond_size} values."
    )


class _AdaptiveRowNorm(eqx.Module):
    """Shared body of AdaptiveLayerNorm and AdaptiveRMSNorm; the subclasses name the
    `eqxnorm.functional` function they call."""

    shape: tuple[int, ...] = eqx.field(static=True)
    cond_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    weight_offset: float = eqx.field(static=True)
    out_dtype: Any = eqx.field(static=True)
    weight: Float[Array, "*shape"] | None
    bias: Float[Array, "*shape"] | None
    modulation: eqx.nn.Linear
    activation: Callable[[Array], Array]

    _function: ClassVar[str]

    def __init__(
        self,
        shape: int | Sequence[int],
        cond_size: int,
        eps: _checking.Number = 1e-5,
        use_weight: bool = False,
        use_bias: bool = False,
        dtype=None,
        *,
        activation: Callable[[Array], Array] = jax.nn.silu,
        zero_init: bool = True,
        impl: Impl = "auto",
        weight_offset: _checking.Number = 0.0,
        out_dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `shape`: the normalized shape of one token (an int for a vector).
        - `cond_size`: the size of the conditioning vector (e.g. a timestep and class
            embedding).
        - `eps`: added to the variance (LayerNorm) or mean square (RMSNorm); must be
            positive.
        - `use_weight`, `use_bias`: whether to learn an affine $\\gamma$, $\\beta$ of the
            norm as well (off by default, as in DiT: the modulation already scales and
            shifts).
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `activation`: applied to `cond` before the projection (`jax.nn.silu`, as in DiT).
        - `zero_init`: start the projection at zero, so the layer starts as the plain norm
            (DiT's adaLN-Zero); otherwise `eqx.nn.Linear`'s initialisation.
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.
        - `weight_offset`: $\\gamma$ is `weight_offset + weight`, the weight starting at
            `1 - weight_offset` (see [`eqxnorm.LayerNorm`][]).
        - `out_dtype`: the output's dtype (default: the input's); not a float8 one.
        - `key`: a `jax.random.PRNGKey` for the projection's initialisation.

        **Raises:**

        `ValueError` for an empty `shape`, a non-positive `cond_size`, `eps <= 0`, an
        unknown `impl`, a non-zero `weight_offset` without a weight, a float8 `out_dtype`;
        `TypeError` for a non-floating `out_dtype`.
        """
        where = type(self).__name__
        self.shape = _checking.normalize_shape(shape, where)
        _checking.check_positive_int(cond_size, "cond_size", where)
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        weight = jnp.ones(()) if use_weight else None
        self.weight_offset, self.out_dtype, _ = functional._output_options(
            None, weight, weight_offset, out_dtype, None, where, fp8=False
        )
        self.cond_size = cond_size
        self.eps = float(eps)
        self.use_weight = use_weight
        self.use_bias = use_bias
        self.impl = impl
        init = 1 - self.weight_offset
        self.weight = jnp.full(self.shape, init, dtype=dtype) if use_weight else None
        self.bias = jnp.zeros(self.shape, dtype=dtype) if use_bias else None
        features = 1
        for size in self.shape:
            features *= size
        self.modulation = _projection(cond_size, features, zero_init, dtype, key)
        self.activation = activation

    def _precheck(self, x, cond, state=sentinel, *, key=None):
        where = f"{type(self).__name__}(shape={self.shape})"
        _checking.check_floating(x, "x", where)
        k = len(self.shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k :]) != self.shape:
            raise ValueError(
                f"{where} expects x of shape (*tokens, *{self.shape}), the normalized shape "
                f"last, but got x.shape={x.shape}. Construct the layer with the size of the "
                f"trailing axes of x as its shape."
            )
        _check_cond(cond, self.cond_size, where)

    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: Float[AnyArray, "*tokens_and_shape"],
        cond: Float[AnyArray, " {self.cond_size}"],
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*tokens_and_shape"] | tuple[Float[Array, "*tokens_and_shape"], State]:
        """**Arguments:**

        - `x`: one example, of shape `(*tokens, *shape)`: every token is normalized over
            `shape` and modulated by the same scale and shift.
        - `cond`: the example's conditioning vector, `(cond_size,)`.
        - `state`: optional; passed through unchanged.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        The modulated array, of `x`'s shape in `out_dtype` (default `x.dtype`); or
        `(output, state)` when `state` is passed.

        **Raises:**

        `ValueError` when the trailing axes of `x` are not `shape` or `cond` is not
        `(cond_size,)` (a batched `cond` is named, with the `jax.vmap` fix); `TypeError` for
        non-floating input.
        """
        with jax.named_scope(f"eqxnorm.{type(self).__name__}"):
            scale, shift = jnp.split(self.modulation(self.activation(cond)), 2)
            out = getattr(functional, self._function)(
                x,
                scale.reshape(self.shape),
                shift.reshape(self.shape),
                self.weight,
                self.bias,
                shape=self.shape,
                eps=self.eps,
                impl=self.impl,
                weight_offset=self.weight_offset,
                out_dtype=self.out_dtype,
            )
        return out if state is sentinel else (out, state)


class AdaptiveLayerNorm(_AdaptiveRowNorm):
    r"""Adaptive layer normalization (adaLN): LayerNorm whose scale and shift are projected
    from a conditioning vector, as in diffusion transformers (DiT) and FiLM.

    $$(s, t) = W\,\phi(c) + b, \qquad
    y = \left(\frac{x - \mathbb{E}[x]}{\sqrt{\mathrm{Var}[x] + \varepsilon}}\gamma +
    \beta\right)(1 + s) + t$$

    for one example `x` of shape `(*tokens, *shape)` (every token normalized over `shape`)
    and its conditioning vector $c$ of shape `(cond_size,)`; $\phi$ is `activation` and
    $W, b$ the `modulation` `Linear` (its first `prod(shape)` outputs are $s$, the rest
    $t$), zero-initialised by default (adaLN-Zero) so the layer starts as the plain norm.
    $\gamma$, $\beta$ are off by default. Batch with `jax.vmap(norm)(x, cond)`.
    Calls [`eqxnorm.functional.adaptive_layer_norm`][], whose Pallas kernel fuses the
    modulation into the norm.

    ??? cite
        [Scalable Diffusion Models with Transformers](https://arxiv.org/abs/2212.09748)

        ```bibtex
        @inproceedings{peebles2023scalable,
            title={Scalable Diffusion Models with Transformers},
            author={William Peebles and Saining Xie},
            booktitle={ICCV},
            year={2023},
        }
        ```
    """

    _function: ClassVar[str] = "adaptive_layer_norm"


class AdaptiveRMSNorm(_AdaptiveRowNorm):
    r"""Adaptive RMSNorm: RMSNorm whose scale and shift are projected from a conditioning
    vector.

    $$(s, t) = W\,\phi(c) + b, \qquad
    y = \left(\frac{x}{\sqrt{\frac{1}{n}\sum_{i=1}^n x_i^2 + \varepsilon}}\gamma +
    \beta\right)(1 + s) + t$$

    As [`eqxnorm.AdaptiveLayerNorm`][] otherwise. Calls
    [`eqxnorm.functional.adaptive_rms_norm`][].
    """

    _function: ClassVar[str] = "adaptive_rms_norm"


class AdaptiveGroupNorm(eqx.Module):
    r"""Adaptive GroupNorm: GroupNorm whose per-channel scale and shift are projected from a
    conditioning vector, as in the residual blocks of diffusion U-Nets (FiLM).

    $$(s, t) = W\,\phi(c) + b, \qquad
    y_c = \left(\frac{x_c - \mathbb{E}[x_{g(c)}]}{\sqrt{\mathrm{Var}[x_{g(c)}] +
    \varepsilon}}\gamma_c + \beta_c\right)(1 + s_c) + t_c$$

    for one example `x` of shape `(channels, *spatial)` (`(*spatial, channels)` with
    `channel_axis=-1`) and its conditioning vector $c$ of
    shape `(cond_size,)`. The `modulation` `Linear` has `2 × channels` outputs ($s$ first),
    zero-initialised by default. $\gamma$, $\beta$ (`channelwise_affine`) are off by default.
    Batch with `jax.vmap(norm)(x, cond)`. Calls
    [`eqxnorm.functional.adaptive_group_norm`][].

    ??? cite
        [FiLM: Visual Reasoning with a General Conditioning Layer](https://arxiv.org/abs/1709.07871)
    """

    groups: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    cond_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    channel_axis: int = eqx.field(static=True)
    weight: Float[Array, " channels"] | None
    bias: Float[Array, " channels"] | None
    modulation: eqx.nn.Linear
    activation: Callable[[Array], Array]

    def __init__(
        self,
        groups: int,
        channels: int,
        cond_size: int,
        eps: _checking.Number = 1e-5,
        channelwise_affine: bool = False,
        dtype=None,
        *,
        activation: Callable[[Array], Array] = jax.nn.silu,
        zero_init: bool = True,
        impl: Impl = "auto",
        channel_axis: int = 0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `groups`: the number of groups; must divide `channels`.
        - `channels`: the number of channels.
        - `cond_size`: the size of the conditioning vector.
        - `eps`: added to the variance; must be positive.
        - `channelwise_affine`: whether to learn a per-channel $\\gamma$, $\\beta$ as well.
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `activation`, `zero_init`, `impl`, `key`: as [`eqxnorm.AdaptiveLayerNorm`][].
        - `channel_axis`: `0` (the default): each example is `(channels, *spatial)`; `-1`:
            `(*spatial, channels)`, read in place (see [`eqxnorm.GroupNorm`][]).

        **Raises:**

        `ValueError` when `groups` does not divide `channels`, for non-positive sizes,
        `eps <= 0`, an unknown `impl` or a `channel_axis` other than 0 and -1.
        """
        where = type(self).__name__
        for name, value in (("groups", groups), ("channels", channels), ("cond_size", cond_size)):
            _checking.check_positive_int(value, name, where)
        if channels % groups != 0:
            raise ValueError(
                f"{where}: groups={groups} must divide channels={channels}. Valid values of "
                f"groups for {channels} channels: {_divisors(channels)}."
            )
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        self.channel_axis = check_channel_axis(channel_axis, where)
        self.groups = groups
        self.channels = channels
        self.cond_size = cond_size
        self.eps = float(eps)
        self.channelwise_affine = channelwise_affine
        self.impl = impl
        self.weight = jnp.ones((channels,), dtype=dtype) if channelwise_affine else None
        self.bias = jnp.zeros((channels,), dtype=dtype) if channelwise_affine else None
        self.modulation = _projection(cond_size, channels, zero_init, dtype, key)
        self.activation = activation

    def _channels_of(self, x: Array, axis: int) -> int:
        """The channel count `eqxnorm._group_norm.ExampleIn` holds `x` to in the layout
        of `axis`."""
        return annotated_channels(self.channels, self.channel_axis, axis)

    def _precheck(self, x, cond, state=sentinel, *, key=None):
        where = f"{type(self).__name__}(groups={self.groups}, channels={self.channels})"
        check_example_channels(x, self.channels, where, self.channel_axis)
        _check_cond(cond, self.cond_size, where)

    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: ExampleIn,
        cond: Float[AnyArray, " {self.cond_size}"],
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Example | tuple[Example, State]:
        """**Arguments:**

        - `x`: one example, `(channels, *spatial)`, or `(*spatial, channels)` with
            `channel_axis=-1`.
        - `cond`: the example's conditioning vector, `(cond_size,)`.
        - `state`: optional; passed through unchanged.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        The modulated array, of `x`'s shape and dtype; or `(output, state)` when `state`
        is passed.

        **Raises:**

        `ValueError` when `x` is not `(channels, *spatial)` (a left-in batch axis and
        channels-last input are named, with their fixes) or `cond` is not `(cond_size,)`;
        `TypeError` for non-floating input.
        """
        with jax.named_scope("eqxnorm.AdaptiveGroupNorm"):
            scale, shift = jnp.split(self.modulation(self.activation(cond)), 2)
            out = functional._adaptive_group_norm(
                x,
                self.groups,
                scale,
                shift,
                self.weight,
                self.bias,
                self.eps,
                self.impl,
                example=True,
                channels_last=self.channel_axis == -1,
            )
        return out if state is sentinel else (out, state)
