import math

import equinox as eqx
import jax.numpy as jnp
from equinox.nn import State
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl
from ._group_norm import check_example_channels
from ._misc import sentinel


class InstanceNorm(eqx.Module):
    r"""Instance normalization of one example: each channel normalized over its spatial
    axes, then an optional per-channel affine.

    Given `x` of shape `(channels, *spatial)`,

    $$y_c = \frac{x_c - \mathbb{E}[x_c]}{\sqrt{\mathrm{Var}[x_c] + \varepsilon}}
    \gamma_c + \beta_c$$

    with the mean and biased variance over the spatial elements of channel $c$, and
    $\gamma$, $\beta$ of shape `(channels,)` (or $1$, $0$ when `channelwise_affine=False`).
    This is [`eqxnorm.GroupNorm`][] with `groups=channels`. Statistics are computed in
    float32 (float64 for float64 input) and the output keeps `x`'s dtype. Calls
    [`eqxnorm.functional.instance_norm`][].

    Equinox has no InstanceNorm, so this follows PyTorch's `nn.InstanceNorm1d/2d/3d`, one
    class for any number of spatial axes (vmap it over the batch):

    | PyTorch                         | eqxnorm                                   |
    |---------------------------------|-------------------------------------------|
    | `InstanceNorm2d(C)`             | `jax.vmap(InstanceNorm(C))`               |
    | `num_features`                  | `channels`                                |
    | `eps=1e-5`                      | `eps=1e-5`                                |
    | `affine=False` (the default)    | `channelwise_affine=False` (the default)  |
    | `weight`, `bias` (ones, zeros)  | `weight`, `bias` (ones, zeros)            |
    | `track_running_stats=False`     | always: no running statistics, no state   |
    | `momentum`                      | not applicable                            |

    Like PyTorch's defaults, the affine is off by default (unlike `GroupNorm`), and the
    statistics always come from the input itself, in training and inference alike: there
    are no running statistics to track (use `BatchNorm` for those). As in PyTorch, an input
    with a single spatial element per channel is refused, since every output would be the
    bias.

    ??? cite
        [Instance Normalization: The Missing Ingredient for Fast
        Stylization](https://arxiv.org/abs/1607.08022)

        ```bibtex
        @article{ulyanov2016instance,
            author={Dmitry Ulyanov and Andrea Vedaldi and Victor Lempitsky},
            title={Instance Normalization: The Missing Ingredient for Fast Stylization},
            year={2016},
            journal={arXiv:1607.08022},
        }
        ```
    """

    channels: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    weight: Float[Array, " channels"] | None
    bias: Float[Array, " channels"] | None

    def __init__(
        self,
        channels: int,
        eps: _checking.Number = 1e-5,
        channelwise_affine: bool = False,
        dtype=None,
        *,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `channels`: the number of channels (PyTorch's `num_features`).
        - `eps`: added to the variance; must be positive.
        - `channelwise_affine`: whether to learn a per-channel scale $\\gamma$ (initialised
            to ones) and shift $\\beta$ (initialised to zeros); PyTorch's `affine`. Off by
            default, as in PyTorch.
        - `dtype`: dtype of the parameters; defaults to float32 (float64 in 64-bit mode).
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.

        **Raises:**

        `TypeError` for a non-int `channels`; `ValueError` for `channels < 1`, `eps <= 0` or
        an unknown `impl`.
        """
        where = "InstanceNorm"
        _checking.check_positive_int(channels, "channels", where)
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        self.channels = channels
        self.eps = float(eps)
        self.channelwise_affine = channelwise_affine
        self.impl = impl
        self.weight = jnp.ones(channels, dtype=dtype) if channelwise_affine else None
        self.bias = jnp.zeros(channels, dtype=dtype) if channelwise_affine else None

    def _precheck(self, x, state=sentinel, *, key=None, mask=None):
        where = f"InstanceNorm(channels={self.channels})"
        check_example_channels(x, self.channels, where)
        if x.ndim == 1:
            raise ValueError(
                f"{where} normalizes each channel over its spatial axes, so x needs shape "
                f"(channels={self.channels}, *spatial) with at least one spatial axis, but "
                f"got x.shape={x.shape}. To normalize a vector across its channels use "
                f"eqxnorm.LayerNorm or eqxnorm.GroupNorm."
            )
        spatial = math.prod(x.shape[1:])
        if spatial < 2:
            raise ValueError(
                f"{where} normalizes each channel over its spatial elements, but "
                f"x.shape={x.shape} has {spatial} per channel, so every output would equal "
                f"the bias. Pass x of shape (channels={self.channels}, *spatial) with more "
                f"than one spatial element (PyTorch's InstanceNorm refuses this input too)."
            )
        _checking.check_mask(mask, x, where)

    @_checking.named_scope("eqxnorm.InstanceNorm")
    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: Float[AnyArray, " {self.channels} *spatial"],
        state: State = sentinel,
        *,
        key: PRNGKeyArray | None = None,
        mask: Bool[AnyArray, "*mask_shape"] | None = None,
    ) -> (
        Float[Array, " {self.channels} *spatial"]
        | tuple[Float[Array, " {self.channels} *spatial"], State]
    ):
        """**Arguments:**

        - `x`: one example, `(channels, *spatial)` with at least one spatial axis and more
            than one spatial element; a floating-point JAX or NumPy array.
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

        `TypeError` for non-floating input; `ValueError` for a scalar, a missing spatial
        axis, a single spatial element, an empty axis, or `x.shape[0] != channels` (a
        left-in batch axis is named, with the `jax.vmap` fix).
        """
        out = functional._group_norm(
            x, x.shape[0], self.weight, self.bias, self.eps, self.impl, example=True, mask=mask
        )
        return out if state is sentinel else (out, state)
