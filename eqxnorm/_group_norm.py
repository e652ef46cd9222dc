import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from equinox.nn import State
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl
from ._misc import sentinel


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_example_channels(x: Any, channels: int | None, where: str) -> int:
    """The channel count of one `(channels, *spatial)` example `x`, after checking it.

    `channels=None` accepts any (non-zero) `x.shape[0]`. A mismatch whose axis 1 has the
    expected size is named as a left-in batch axis, with the `jax.vmap` fix; one whose last
    axis has it, as channels-last input, with the `jnp.moveaxis` fix.
    """
    _checking.check_floating(x, "x", where)
    if x.ndim == 0:
        raise ValueError(
            f"{where} expects one example of shape (channels, *spatial), but got a scalar "
            f"(x.shape=()). Pass an array whose first axis is the channels."
        )
    if channels is not None and x.shape[0] != channels:
        if x.ndim >= 2 and x.shape[1] == channels:
            raise ValueError(
                f"{where} normalizes a single example of shape (channels={channels}, "
                f"*spatial), but got x.shape={x.shape}, whose axis 1 holds the {channels} "
                f"channels: axis 0 (size {x.shape[0]}) looks like a batch axis. Equinox "
                f"layers take one example at a time; for a batch, replace `norm(x)` with "
                f"`jax.vmap(norm)(x)`."
            )
        if x.ndim >= 2 and x.shape[-1] == channels:
            raise ValueError(
                f"{where} expects x of shape (channels={channels}, *spatial), channels "
                f"first, but got x.shape={x.shape}, whose last axis holds the {channels} "
                f"channels: it looks channels-last. Move the channels first with "
                f"`jnp.moveaxis(x, -1, 0)` (for a batch, `jnp.moveaxis(batch, -1, 1)`)."
            )
        raise ValueError(
            f"{where} expects x of shape (channels={channels}, *spatial), but got "
            f"x.shape={x.shape}, whose axis 0 has size {x.shape[0]}. Construct the layer with "
            f"channels={x.shape[0]}, or pass an input with {channels} channels on axis 0."
        )
    if math.prod(x.shape) == 0:
        raise ValueError(
            f"{where}: x.shape={x.shape} has an empty axis, so the statistics are undefined."
        )
    return x.shape[0]


class GroupNorm(eqx.Module):
    r"""Group normalization of one example: the channels split into `groups` contiguous
    groups, each normalized with its own mean and variance, then a per-channel affine.

    Given `x` of shape `(channels, *spatial)`, with $x_g$ the `channels/groups × spatial`
    elements of the group $g(c)$ that channel $c$ belongs to,

    $$y_c = \frac{x_c - \mathbb{E}[x_{g(c)}]}{\sqrt{\mathrm{Var}[x_{g(c)}] + \varepsilon}}
    \gamma_c + \beta_c$$

    with the biased variance, and $\gamma$, $\beta$ of shape `(channels,)` (or $1$, $0$ when
    `channelwise_affine=False`). `groups=1` normalizes the whole example (LayerNorm over
    every axis with a per-channel affine); `groups=channels` is
    [`eqxnorm.InstanceNorm`][] (with the affine on).

    A drop-in replacement for `equinox.nn.GroupNorm`: same arguments, defaults, field names
    (`groups`, `channels`, `eps`, `channelwise_affine`, `weight`, `bias`) and call (optional
    `state` passed through, `key` ignored); plus a static `impl`. Any number of spatial
    axes is accepted, including none. Statistics are computed in float32 (float64 for float64
    input) and the output keeps `x`'s dtype. Calls [`eqxnorm.functional.group_norm`][].

    ??? cite
        [Group Normalization](https://arxiv.org/abs/1803.08494)

        ```bibtex
        @article{wu2018group,
            author={Yuxin Wu and Kaiming He},
            title={Group Normalization},
            year={2018},
            journal={arXiv:1803.08494},
        }
        ```
    """

    groups: int = eqx.field(static=True)
    channels: int | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    weight: Float[Array, " channels"] | None
    bias: Float[Array, " channels"] | None

    def __init__(
        self,
        groups: int,
        channels: int | None = None,
        eps: _checking.Number = 1e-5,
        channelwise_affine: bool = True,
        dtype=None,
        *,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `groups`: the number of groups the channels are split into; must divide
            `channels`.
        - `channels`: the number of channels. May be `None` when `channelwise_affine=False`,
            in which case it is read from each input (`x.shape[0]`).
        - `eps`: added to the variance; must be positive.
        - `channelwise_affine`: whether to learn a per-channel scale $\\gamma$ (initialised
            to ones) and shift $\\beta$ (initialised to zeros).
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.

        **Raises:**

        `TypeError` for a non-int `groups`/`channels`; `ValueError` for `groups < 1`,
        `channels < 1`, `groups` not dividing `channels`, `channelwise_affine=True` without
        `channels`, `eps <= 0` or an unknown `impl`.
        """
        where = "GroupNorm"
        _checking.check_positive_int(groups, "groups", where)
        if channels is not None:
            _checking.check_positive_int(channels, "channels", where)
            if channels % groups != 0:
                raise ValueError(
                    f"{where}: groups={groups} must divide channels={channels} (each group "
                    f"holds channels/groups channels), but {channels} is not a multiple of "
                    f"{groups}. Valid values of groups for {channels} channels: "
                    f"{_divisors(channels)}."
                )
        elif channelwise_affine:
            raise ValueError(
                f"{where}: channelwise_affine=True needs the number of channels to create "
                f"the (channels,) weight and bias, but got channels=None. Pass `channels=`, "
                f"or `channelwise_affine=False` to infer it from each input."
            )
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        self.groups = groups
        self.channels = channels
        self.eps = float(eps)
        self.channelwise_affine = channelwise_affine
        self.impl = impl
        self.weight = jnp.ones(channels, dtype=dtype) if channelwise_affine else None
        self.bias = jnp.zeros(channels, dtype=dtype) if channelwise_affine else None

    def _channels_of(self, x: Array) -> int:
        """The channel count the annotations hold `x` to: `channels`, or when that was left
        `None`, `x`'s own (so the check reduces to "channels *spatial")."""
        return x.shape[0] if self.channels is None else self.channels

    def _precheck(self, x, state=sentinel, *, key=None, mask=None):
        where = f"GroupNorm(groups={self.groups}, channels={self.channels})"
        channels = check_example_channels(x, self.channels, where)
        if channels % self.groups != 0:
            hint = (
                " If axis 0 is a batch axis, call the layer on one example at a time: "
                "`jax.vmap(norm)(x)`."
                if x.ndim >= 2
                else ""
            )
            raise ValueError(
                f"{where} reads the channels from x.shape[0], but x.shape={x.shape} has "
                f"channels={channels}, which groups={self.groups} does not divide. Valid "
                f"values of groups for {channels} channels: {_divisors(channels)}.{hint}"
            )
        _checking.check_mask(mask, x, where)

    @_checking.named_scope("eqxnorm.GroupNorm")
    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: Float[AnyArray, " {self._channels_of(x)} *spatial"],
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
        mask: Bool[AnyArray, "*mask_shape"] | None = None,
    ) -> (
        Float[Array, " {self._channels_of(x)} *spatial"]
        | tuple[Float[Array, " {self._channels_of(x)} *spatial"], State]
    ):
        """**Arguments:**

        - `x`: one example, `(channels, *spatial)` with any number of spatial axes
            (including none); a floating-point JAX or NumPy array.
        - `state`: optional; passed through unchanged, for interchangeability with
            `BatchNorm`.
        - `key`: ignored; for compatibility with the rest of the Equinox API.
        - `mask`: optional booleans broadcastable to `x`'s shape, `True` where an element
            counts in the statistics (Flax's `mask=`, for padded images or sequences); see
            [`eqxnorm.functional.group_norm`][].

        **Returns:**

        The normalized array, of `x`'s shape and dtype; or `(output, state)` when `state` is
        passed.

        **Raises:**

        `TypeError` for non-floating input; `ValueError` for a scalar, an empty axis,
        `x.shape[0] != channels` (a left-in batch axis is named, with the `jax.vmap` fix), or
        an inferred channel count that `groups` does not divide.
        """
        out = functional._group_norm(
            x, self.groups, self.weight, self.bias, self.eps, self.impl, example=True, mask=mask
        )
        return out if state is sentinel else (out, state)
