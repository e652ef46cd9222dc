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


# One example in either layout, tied to the layer's channels: `self._channels_of(x,axis)` is
# the channel count in the layout of `axis` (0 or -1) and -1, no axis's size, in the other
# (see `annotated_channels`), so exactly one of the two can match. (No spaces inside the
# braces: jaxtyping splits the dimensions at spaces.)
ExampleIn = (
    Float[AnyArray, " {self._channels_of(x,0)} *spatial"]
    | Float[AnyArray, "*spatial {self._channels_of(x,-1)}"]
)
Example = (
    Float[Array, " {self._channels_of(x,0)} *spatial"]
    | Float[Array, "*spatial {self._channels_of(x,-1)}"]
)


def annotated_channels(channels: int, channel_axis: int, axis: int) -> int:
    """What a layer of `channels` on `channel_axis` gives `ExampleIn`'s layout of
    `axis`: `channels` when the layouts agree, -1 (no axis's size) when they do not."""
    return channels if axis == channel_axis else -1


def check_channel_axis(channel_axis: Any, where: str) -> int:
    """`channel_axis` of a layer, checked: `0` (channels first, `(channels, *spatial)`) or
    `-1` (channels last, `(*spatial, channels)`)."""
    if isinstance(channel_axis, bool) or channel_axis not in (0, -1):
        raise ValueError(
            f"{where}: channel_axis must be 0 (each example (channels, *spatial)) or -1 "
            f"(each example (*spatial, channels), read in place), but got "
            f"channel_axis={channel_axis!r}."
        )
    return channel_axis


def check_example_channels(x: Any, channels: int | None, where: str, channel_axis: int = 0) -> int:
    """The channel count of one `(channels, *spatial)` example `x` (`(*spatial, channels)`
    with `channel_axis=-1`), after checking it.

    `channels=None` accepts any (non-zero) size. A channels-first mismatch whose axis 1 has
    the expected size is named as a left-in batch axis, with the `jax.vmap` fix; one whose
    other end has it, as the other layout, with the `channel_axis` that reads it in place.
    """
    _checking.check_floating(x, "x", where)
    last = channel_axis == -1
    layout = "(*spatial, channels)" if last else "(channels, *spatial)"
    if x.ndim == 0:
        raise ValueError(
            f"{where} expects one example of shape {layout}, but got a scalar "
            f"(x.shape=()). Pass an array whose {'last' if last else 'first'} axis is the "
            f"channels."
        )
    found = x.shape[-1 if last else 0]
    if channels is not None and found != channels:
        if not last and x.ndim >= 2 and x.shape[1] == channels:
            raise ValueError(
                f"{where} normalizes a single example of shape (channels={channels}, "
                f"*spatial), but got x.shape={x.shape}, whose axis 1 holds the {channels} "
                f"channels: axis 0 (size {x.shape[0]}) looks like a batch axis. Equinox "
                f"layers take one example at a time; for a batch, replace `norm(x)` with "
                f"`jax.vmap(norm)(x)`."
            )
        if x.ndim >= 2 and x.shape[0 if last else -1] == channels:
            seen, other, fix = ("first", "last", 0) if last else ("last", "first", -1)
            move = (
                ""
                if last
                else " (or, where the layers around it need the channels first, move them with "
                "`jnp.moveaxis(x, -1, 0)`, a transposed copy)"
            )
            raise ValueError(
                f"{where} expects x of shape {layout.replace('channels', f'channels={channels}')}, "
                f"channels {other}, but got x.shape={x.shape}, whose {seen} axis holds the "
                f"{channels} channels: it looks channels-{seen}. Construct the layer with "
                f"`channel_axis={fix}`, which reads that layout in place{move}."
            )
        raise ValueError(
            f"{where} expects x of shape {layout.replace('channels', f'channels={channels}')}, "
            f"but got x.shape={x.shape}, whose {'last axis' if last else 'axis 0'} has size "
            f"{found}. Construct the layer with channels={found}, or pass an input with "
            f"{channels} channels on {'the last axis' if last else 'axis 0'}."
        )
    if math.prod(x.shape) == 0:
        raise ValueError(
            f"{where}: x.shape={x.shape} has an empty axis, so the statistics are undefined."
        )
    return found


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
    `state` passed through, `key` ignored); plus static `impl` and `channel_axis` (`-1`:
    channels-last examples `(*spatial, channels)`, read in place). Any number of spatial
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
    channel_axis: int = eqx.field(static=True)
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
        channel_axis: int = 0,
    ):
        """**Arguments:**

        - `groups`: the number of groups the channels are split into; must divide
            `channels`.
        - `channels`: the number of channels. May be `None` when `channelwise_affine=False`,
            in which case it is read from each input (its `channel_axis`).
        - `eps`: added to the variance; must be positive.
        - `channelwise_affine`: whether to learn a per-channel scale $\\gamma$ (initialised
            to ones) and shift $\\beta$ (initialised to zeros).
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.
        - `channel_axis`: `0` (the default, as `equinox.nn.GroupNorm`): each example is
            `(channels, *spatial)`; `-1`: each example is channels-last, `(*spatial,
            channels)`, normalized where it lies (no transposed copy, reference or kernels).

        **Raises:**

        `TypeError` for a non-int `groups`/`channels`; `ValueError` for `groups < 1`,
        `channels < 1`, `groups` not dividing `channels`, `channelwise_affine=True` without
        `channels`, `eps <= 0`, an unknown `impl`, or a `channel_axis` other than 0 and -1.
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
        self.channel_axis = check_channel_axis(channel_axis, where)
        self.groups = groups
        self.channels = channels
        self.eps = float(eps)
        self.channelwise_affine = channelwise_affine
        self.impl = impl
        self.weight = jnp.ones(channels, dtype=dtype) if channelwise_affine else None
        self.bias = jnp.zeros(channels, dtype=dtype) if channelwise_affine else None

    def _channels_of(self, x: Array, axis: int) -> int:
        """The channel count `ExampleIn` holds `x` to in the layout of `axis`:
        `channels`, or when that was left `None`, `x`'s own (so the check reduces to the
        layout)."""
        channels = x.shape[self.channel_axis] if self.channels is None else self.channels
        return annotated_channels(channels, self.channel_axis, axis)

    def _precheck(self, x, state=sentinel, *, key=None, mask=None):
        where = f"GroupNorm(groups={self.groups}, channels={self.channels})"
        channels = check_example_channels(x, self.channels, where, self.channel_axis)
        if channels % self.groups != 0:
            hint = (
                " If axis 0 is a batch axis, call the layer on one example at a time: "
                "`jax.vmap(norm)(x)`."
                if x.ndim >= 2
                else ""
            )
            raise ValueError(
                f"{where} reads the channels from x.shape[{self.channel_axis}], but "
                f"x.shape={x.shape} has "
                f"channels={channels}, which groups={self.groups} does not divide. Valid "
                f"values of groups for {channels} channels: {_divisors(channels)}.{hint}"
            )
        _checking.check_mask(mask, x, where)

    @_checking.named_scope("eqxnorm.GroupNorm")
    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: ExampleIn,
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
        mask: Bool[AnyArray, "*mask_shape"] | None = None,
    ) -> Example | tuple[Example, State]:
        """**Arguments:**

        - `x`: one example, `(channels, *spatial)` with any number of spatial axes
            (including none), or `(*spatial, channels)` with `channel_axis=-1`; a
            floating-point JAX or NumPy array.
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

        `TypeError` for non-floating input; `ValueError` for a scalar, an empty axis, a
        channel axis of other than `channels` elements (a left-in batch axis and the other
        layout are named, with their fixes), or an inferred channel count that `groups` does
        not divide.
        """
        out = functional._group_norm(
            x,
            self.groups,
            self.weight,
            self.bias,
            self.eps,
            self.impl,
            example=True,
            mask=mask,
            channels_last=self.channel_axis == -1,
        )
        return out if state is sentinel else (out, state)
