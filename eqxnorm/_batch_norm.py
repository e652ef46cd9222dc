import math
from collections.abc import Hashable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from equinox.nn import State, StatefulLayer, StateIndex
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl
from ._misc import default_floating_dtype
from .kernels import reference
from .kernels.reference import compute_dtype, pool_members

MODES: tuple[str, ...] = ("batch", "ema")


def _check_momentum(momentum: object, where: str) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(
            f"{where}: `momentum` must be a Python float, but got {momentum!r} of type "
            f"{type(momentum).__name__}. Pass e.g. `momentum=0.99`."
        )
    if not 0 <= momentum < 1:
        raise ValueError(
            f"{where}: `momentum` must lie in [0, 1) (the weight the running statistics keep "
            f"at each step; 1 would never update them), but got momentum={momentum!r}. Pass "
            f"e.g. `momentum=0.99`, or `momentum=0` to keep only the last batch."
        )


class BatchNorm(StatefulLayer):
    r"""Batch normalization: each channel normalized with statistics over the batch (pooled
    across every member of `axis_name`) and the spatial axes, with running statistics kept
    in an [`equinox.nn.State`][] for inference.

    $$y_c = \frac{x_c - \mu_c}{\sqrt{\sigma^2_c + \varepsilon}} \gamma_c + \beta_c$$

    with $\gamma$, $\beta$ of shape `(input_size,)` (or $1$, $0$ when
    `channelwise_affine=False`). A drop-in replacement for `equinox.nn.BatchNorm`: same
    constructor arguments, parameter names (`weight`, `bias`) and call
    `norm(x, state, *, key=None, inference=None) -> (y, state)`, to be used inside
    `jax.vmap`/`jax.pmap`/`shard_map` binding `axis_name`; plus a static `impl`. Statistics
    are computed in float32 (float64 for float64 input) and the output keeps `x`'s dtype.

    **Running statistics.** Write $m$ for `momentum`, $t$ for the training step (the state's
    `count` after the step, like PyTorch's `num_batches_tracked`), $\mu_B$, $\sigma^2_B$ for
    the batch mean and biased variance of a channel, and $n$ for the number of values they
    pool per channel (batch × spatial size, the batch being every member of `axis_name`).
    Each training step does

    $$a_t = \frac{1 - m}{1 - m^t}, \qquad
    \hat\mu_t = (1 - a_t)\,\hat\mu_{t-1} + a_t\,\mu_B, \qquad
    \hat\sigma^2_t = (1 - a_t)\,\hat\sigma^2_{t-1} + a_t\,\frac{n}{n-1}\sigma^2_B,$$

    starting from $\hat\mu_0 = 0$, $\hat\sigma^2_0 = 1$; that is
    $\hat\mu_t = \hat\mu_{t-1} + a_t(\mu_B - \hat\mu_{t-1})$, written as above so that
    $a_1 = 1$ gives the first batch's values bit for bit. Two choices are built in:

    1. *Unbiased running variance.* Training normalizes with the biased batch variance
       $\sigma^2_B$, but the running variance stores the unbiased $\frac{n}{n-1}\sigma^2_B$,
       PyTorch's convention (so PyTorch `running_var` buffers mean the same thing here).
       `equinox.nn.BatchNorm` stores the biased one.
    2. *No start-up bias.* Since $a_1 = 1$, the first batch replaces the initial values
       exactly, and by induction

       $$\hat\mu_t = \frac{\sum_{s=1}^t m^{t-s} \mu_{B,s}}{\sum_{s=1}^t m^{t-s}},$$

       the zero-debiased exponential moving average: a weighted *average* of the batches
       seen, at every step. The state holds these debiased values directly (and `count`).
       `equinox.nn.BatchNorm(mode="batch")` starts its hidden variance at 1 and divides by
       $1 - m^t$ at inference, which adds $m^t/(1 - m^t)$ to the variance (99 after one
       step with $m = 0.99$): inference right after training starts is squashed. Here it
       is not. `momentum=0` keeps only the last batch. Stored statistics are
       `lax.stop_gradient`-ed.

    **Modes.** `mode="batch"` (the default, as recommended by Equinox for new code) trains
    on the batch statistics and infers with the running ones. `mode="ema"` trains with the
    just-updated running statistics $\hat\mu_t$, $\hat\sigma^2_t$ (the gradient flows
    through their batch part $a_t \mu_B$, $a_t \frac{n}{n-1}\sigma^2_B$) and infers with the
    running ones, like `equinox.nn.BatchNorm(mode="ema")` up to the two choices above.
    Equinox's own default is `mode="legacy"`, which warns and means `"ema"`.

    ??? cite
        [Batch Normalization: Accelerating Deep Network Training by Reducing Internal
        Covariate Shift](https://arxiv.org/abs/1502.03167)

        ```bibtex
        @inproceedings{ioffe2015batch,
            author={Sergey Ioffe and Christian Szegedy},
            title={Batch Normalization: Accelerating Deep Network Training by Reducing
                   Internal Covariate Shift},
            booktitle={International Conference on Machine Learning},
            year={2015},
        }
        ```

        The debiased moving average is that of
        [Adam](https://arxiv.org/abs/1412.6980) (Kingma & Ba, 2015, §3).
    """

    weight: Float[Array, " input_size"] | None
    bias: Float[Array, " input_size"] | None
    count_index: StateIndex[Int[Array, ""]]
    running_index: StateIndex[tuple[Float[Array, " input_size"], Float[Array, " input_size"]]]
    inference: bool
    axis_name: Hashable | tuple[Hashable, ...] = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: Literal["batch", "ema"] = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    axis_index_groups: tuple[tuple[int, ...], ...] | None = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: _checking.Number = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype=None,
        mode: Literal["batch", "ema"] = "batch",
        *,
        impl: Impl = "auto",
        axis_index_groups: Sequence[Sequence[int]] | None = None,
    ):
        """**Arguments:**

        - `input_size`: the number of channels (axis 0 of each example).
        - `axis_name`: the name of the batch axis the statistics are pooled over, as given to
            `jax.vmap`, `jax.pmap` or `shard_map`; or a sequence of names (e.g.
            `("device", "batch")`) to pool over several.
        - `eps`: added to the variance; must be positive.
        - `channelwise_affine`: whether to learn $\\gamma$ (`weight`, initialised to ones)
            and $\\beta$ (`bias`, zeros).
        - `momentum`: $m$ in [0, 1), the weight the running statistics keep per step.
        - `inference`: `False` to normalize with batch statistics and update the running
            ones, `True` to normalize with the running ones. Toggle it with
            [`equinox.nn.inference_mode`][] or override it in the call.
        - `dtype`: dtype of `weight` and `bias`; defaults to float32 (float64 in 64-bit
            mode). The running statistics use it promoted to at least float32.
        - `mode`: `"batch"` or `"ema"`; see above.
        - `impl`: `"auto"`, `"pallas"` or `"reference"`; see `eqxnorm.functional`.
        - `axis_index_groups`: pool the statistics only within groups of the members of
            `axis_name` (Flax's and Haiku's argument), e.g. `[[0, 1], [2, 3]]`; see
            [`eqxnorm.functional.batch_norm`][]. Checked against the axis size at the call.

        **Raises:**

        `TypeError`/`ValueError` for a non-positive or non-integer `input_size`, `eps <= 0`,
        `momentum` outside [0, 1), an unknown `mode` or `impl`, or a non-floating `dtype`.
        """
        where = "BatchNorm"
        _checking.check_positive_int(input_size, "input_size", where)
        _checking.check_eps(eps, where)
        _check_momentum(momentum, where)
        if mode not in MODES:
            raise ValueError(
                f"{where}: `mode` must be one of {MODES}, but got mode={mode!r}. Use "
                f"mode='batch' (batch statistics in training) unless you need Equinox's "
                f"'ema' behaviour."
            )
        check_impl(impl, where)
        dtype = default_floating_dtype() if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}: `dtype` must be a floating-point dtype, but got dtype={dtype}. "
                f"Pass e.g. `dtype=jnp.float32`."
            )
        if channelwise_affine:
            self.weight = jnp.ones((input_size,), dtype=dtype)
            self.bias = jnp.zeros((input_size,), dtype=dtype)
        else:
            self.weight = None
            self.bias = None
        stats_dtype = compute_dtype(dtype)
        self.count_index = StateIndex(jnp.array(0, dtype=jnp.int32))
        self.running_index = StateIndex(
            (jnp.zeros((input_size,), stats_dtype), jnp.ones((input_size,), stats_dtype))
        )
        self.inference = inference
        # A list is not hashable, and static fields must be.
        self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        self.input_size = input_size
        self.eps = float(eps)
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.mode = mode
        self.impl = impl
        self.axis_index_groups = functional._static_groups(axis_index_groups, where)

    def _where(self) -> str:
        return f"BatchNorm(input_size={self.input_size}, axis_name={self.axis_name!r})"

    def _precheck(self, x, state, *, key=None, inference=None, mask=None):
        where = self._where()
        if not isinstance(state, State):
            raise TypeError(
                f"{where}: `state` must be the equinox.nn.State holding the running statistics, "
                f"but got {state!r} of type {type(state).__name__}. Create the layer and its "
                f"state together with `norm, state = eqx.nn.make_with_state(eqxnorm.BatchNorm)"
                f"(...)` and call `norm(x, state)`."
            )
        _checking.check_floating(x, "x", where)
        if x.ndim == 0 or x.shape[0] != self.input_size:
            expected = f"(channels={self.input_size}, *spatial), the channels on axis 0"
            if x.ndim == 0:
                raise ValueError(
                    f"{where} expects one example of shape {expected}, but got a scalar x. "
                    f"Pass x with a leading channel axis, e.g. `x.reshape({self.input_size}, "
                    f"-1)` if that is its layout."
                )
            fixes = []
            if x.ndim >= 2 and x.shape[1] == self.input_size:
                fixes.append(
                    f"If x is a whole batch (axis 1 has {self.input_size} elements), call the "
                    f"layer on one example at a time: `jax.vmap(norm, axis_name="
                    f"{self.axis_name!r}, in_axes=(0, None), out_axes=(0, None))(x, state)`."
                )
            if x.shape[-1] == self.input_size:
                fixes.append("If the channels are last, move them first: `jnp.moveaxis(x, -1, 0)`.")
            fix = " ".join(fixes) or "Construct the layer with the channels of your data."
            raise ValueError(
                f"{where} expects one example of shape {expected}, but got x.shape={x.shape}, "
                f"whose axis 0 has size {x.shape[0]} instead of {self.input_size}. {fix}"
            )
        _checking.check_mask(mask, x, where)
        if not (self.inference if inference is None else inference):
            members = reference.axis_count(self._pooled_axis())
            values = math.prod(x.shape[1:]) * members
            if values < 2:
                raise ValueError(
                    f"{where}: training needs more than one value per channel for the batch "
                    f"statistics, but x.shape={x.shape} (spatial size "
                    f"{math.prod(x.shape[1:])}) across {members} member(s) of the named "
                    f"axis gives {values}. Use a larger batch, or call with "
                    f"`inference=True` to normalize with the running statistics."
                )

    def _pooled_axis(self):
        """What the statistics are pooled over: `axis_name`, or its groups (validated against
        its size, which `_checking.axis_size` checks is bound)."""
        where = self._where()
        _checking.axis_size(self.axis_name, where)
        return functional._axis_groups(self.axis_name, self.axis_index_groups, where)

    def _update(self, state: State, x: Array, batch_mean: Array, batch_var: Array, mask=None):
        """The new `(count, mean, var)`: the debiased EMA step, gradient flowing through the
        batch part (the caller stores them stop-gradient-ed). With a padding `mask`, the
        variance is unbiased by each channel's number of valid values, and a channel with
        none keeps its running statistics."""
        count = state.get(self.count_index)
        running_mean, running_var = state.get(self.running_index)
        dtype = running_mean.dtype
        if mask is None:
            n = math.prod(x.shape[1:]) * reference.axis_count(self._pooled_axis())
            unbiased_var = batch_var.astype(dtype) * (n / (n - 1))
        else:
            valid = jnp.broadcast_to(jnp.asarray(mask), x.shape).reshape(x.shape[0], -1)
            n = pool_members("sum", jnp.sum(valid, axis=1, dtype=jnp.int32), self._pooled_axis())
            nf = n.astype(dtype)
            unbiased_var = batch_var.astype(dtype) * (nf / jnp.maximum(nf - 1, 1))
        if self.momentum == 0:
            a = jnp.ones((), dtype)
        else:
            # 1 - m^t as -expm1(t log m): accurate for m close to 1, where 1 - m^t cancels.
            t = (count + 1).astype(dtype)
            a = (1 - self.momentum) / -jnp.expm1(t * math.log(self.momentum))
            # a_1 = 1 exactly, so the first batch replaces the initial values exactly.
            a = jnp.where(count == 0, jnp.ones((), dtype), a.astype(dtype))
        # Not `running + a * (batch - running)`: that rounds even when a == 1.
        mean = (1 - a) * running_mean + a * batch_mean.astype(dtype)
        var = (1 - a) * running_var + a * unbiased_var
        if mask is not None:
            mean, var = jnp.where(n > 0, mean, running_mean), jnp.where(n > 0, var, running_var)
        return count + 1, mean, var

    def _normalize(self, x: Array, mean: Array | None = None, var: Array | None = None, mask=None):
        """`functional.batch_norm` on one example: `(y, mean, var)`, with the given
        statistics, or with the batch ones (pooled over `axis_name`, or its groups, over the
        `True` elements of `mask` when given) when they are `None`."""
        axis_name = self._pooled_axis() if mean is None else None
        return functional._batch_norm(
            x,
            self.weight,
            self.bias,
            mean,
            var,
            self.eps,
            axis_name,
            self.impl,
            example=True,
            mask=mask,
        )

    @_checking.named_scope("eqxnorm.BatchNorm")
    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: Float[AnyArray, " {self.input_size} *spatial"],
        state: State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        mask: Bool[AnyArray, "*mask_shape"] | None = None,
    ) -> tuple[Float[Array, " {self.input_size} *spatial"], State]:
        """**Arguments:**

        - `x`: one example, `(input_size, *spatial)` with any number of spatial axes
            (including none); floating point. Call the layer under a transformation that
            binds `axis_name`, e.g. `jax.vmap(norm, axis_name="batch", in_axes=(0, None),
            out_axes=(0, None))(xs, state)`.
        - `state`: the [`equinox.nn.State`][] holding the running statistics (from
            [`equinox.nn.make_with_state`][]).
        - `key`: ignored; for compatibility with the rest of the Equinox API.
        - `inference`: overrides `self.inference` when not `None`.
        - `mask`: optional booleans broadcastable to `x`'s shape, `True` where an element
            counts (Flax's `mask=`): in training, the batch statistics are over the `True`
            elements of every member of `axis_name` (a padded example: all `False`), and the
            running variance is unbiased by that count; a channel with no `True` element
            anywhere keeps its running statistics. Every element is normalized, masked ones
            included. Unused in inference.

        **Returns:**

        `(y, state)`: `y` of `x`'s shape and dtype, and the state with updated running
        statistics (unchanged in inference).

        **Raises:**

        `TypeError` for non-floating `x`; `ValueError` when axis 0 of `x` is not
        `input_size` (naming a left-in batch axis), and in training when no enclosing
        transformation binds `axis_name` or there is only one value per channel.
        """
        del key
        if inference is None:
            inference = self.inference
        if inference:
            y, _, _ = self._normalize(x, *state.get(self.running_index))
            return y, state
        y, batch_mean, batch_var = self._normalize(x, mask=mask)
        count, mean, var = self._update(state, x, batch_mean, batch_var, mask)
        if self.mode == "ema":
            y, _, _ = self._normalize(x, mean, var)
        state = state.set(self.count_index, count)
        running = _typed_like(lax.stop_gradient((mean, var)), state.get(self.running_index))
        state = state.set(self.running_index, running)
        return y, state


def _typed_like(new: tuple[Array, ...], old: tuple[Array, ...]) -> tuple[Array, ...]:
    """`new` with the sharding types of `old`, for `State.set`, which compares them.

    Under `jit` on an Explicit mesh the batch statistics of sharded examples carry the mesh
    (replicated over it) while a state passed in unplaced carries none; JAX holds the two
    compatible, Equinox does not. `reshard` cannot drop a mesh, so the value goes through a
    `lax.cond` whose first (false) branch is `old`: a cond's outputs take that branch's
    types. Its predicate is the constant `True`, which XLA folds away."""
    old_types = [jax.typeof(o).sharding for o in old]
    if all(jax.typeof(n).sharding == t for n, t in zip(new, old_types, strict=True)):
        return new
    if not any(t.mesh.empty for t in old_types):
        return tuple(jax.sharding.reshard(n, t) for n, t in zip(new, old_types, strict=True))
    return lax.cond(True, lambda: tuple(new), lambda: tuple(old))
