from typing import Generic, TypeVar

import equinox as eqx
import jax.random as jr
from equinox.nn import State, StatefulLayer, StateIndex
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from . import _checking, functional
from ._dispatch import Impl, check_impl
from ._weight_standardization import wrapped_weight
from .kernels.reference import compute_dtype

_Layer = TypeVar("_Layer")

# Power iterations run at construction, as in `eqx.nn.SpectralNorm`, so that the first
# training call already divides by a good estimate.
_INIT_POWER_ITERATIONS = 15


class SpectralNorm(StatefulLayer, Generic[_Layer]):
    r"""Spectral normalization of a wrapped layer: every call divides the layer's weight by
    an estimate of its largest singular value, then calls the layer with it.

    $$\hat W = \frac{W}{\sigma(W)}, \qquad \sigma(W) \approx u^\top W v,$$

    with $W$ reshaped to `(out, fan_in)` (a convolution kernel `(out, in, *kernel)` becomes
    `(out, in · prod(kernel))`). The singular vector estimates $u$, $v$ live in an
    [`equinox.nn.State`][]; each training call refines them with `num_power_iterations`
    steps of power iteration and stores them back, so over training steps $\sigma$ converges
    to $\sigma_{\max}(W)$ at the cost of one matrix-vector product pair per step. In
    inference they are left as they are. Gradients flow through the $W$ in $W/(u^\top W v)$;
    $u$ and $v$ are constants. Computed by [`eqxnorm.functional.spectral_normalize`][].

    A drop-in replacement for [`equinox.nn.SpectralNorm`][]: the same arguments (plus a
    default `weight_name="weight"` and a static `impl`), field names, call, and, with the
    same `key`, the same initial $u$, $v$ and outputs. One difference: for a bfloat16 or
    float16 weight, $u$, $v$ and $\sigma$ are kept in float32 (Equinox keeps them in the
    weight's dtype, where repeated power iterations stop converging); the normalized weight
    keeps the weight's dtype.

    Use [`eqxnorm.SpectralNorm.sigma`][] for the current estimate and
    [`eqxnorm.SpectralNorm.exact_sigma`][] for the exact value, e.g. to monitor how well
    the estimate tracks a changing weight.

    Whether the layer is in training or inference mode is toggled with
    [`equinox.nn.inference_mode`][], or per call with `inference=`.

    ??? cite
        [Spectral Normalization for Generative Adversarial
        Networks](https://arxiv.org/abs/1802.05957)

        ```bibtex
        @inproceedings{miyato2018spectral,
            title={Spectral Normalization for Generative Adversarial Networks},
            author={Takeru Miyato and Toshiki Kataoka and Masanori Koyama and
                    Yuichi Yoshida},
            booktitle={International Conference on Learning Representations},
            year={2018}
        }
        ```

    !!! example

        ```python
        layer, state = eqx.nn.make_with_state(eqxnorm.SpectralNorm)(
            eqx.nn.Linear(64, 64, key=key1), key=key2
        )
        y, state = layer(x, state)
        ```
    """

    layer: _Layer
    weight_name: str = eqx.field(static=True)
    uv_index: StateIndex[tuple[Float[Array, " out"], Float[Array, " fan_in"]]]
    num_power_iterations: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    inference: bool
    impl: Impl = eqx.field(static=True)

    def __init__(
        self,
        layer: _Layer,
        weight_name: str = "weight",
        num_power_iterations: int = 1,
        eps: _checking.Number = 1e-12,
        inference: bool = False,
        *,
        key: PRNGKeyArray,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `layer`: the layer to wrap, usually an [`equinox.nn.Linear`][] or a convolution
            (e.g. [`equinox.nn.Conv2d`][]); any layer with the attribute `weight_name`.
        - `weight_name`: the name of the layer's weight, an array of shape `(out, *rest)`.
        - `num_power_iterations`: power iteration steps per training call (`>= 0`).
        - `eps`: lower bound on the norms divided by in the power iteration; must be
            positive.
        - `inference`: whether to start in inference mode, where $u$, $v$ are not updated.
            Toggle it with [`equinox.nn.inference_mode`][].
        - `key`: a `jax.random.PRNGKey` for the random initial $u$, $v$, which are then
            refined by 15 power iterations, exactly as in `eqx.nn.SpectralNorm`.
            (Keyword only argument.)
        - `impl`: `"auto"` or `"reference"`; see `eqxnorm.functional.spectral_normalize`.

        **Raises:**

        `ValueError` when the layer has no attribute `weight_name` (the message lists the
        array attributes it has), when that attribute is `None` or has fewer than two axes,
        for a negative `num_power_iterations`, `eps <= 0` or an unknown `impl`; `TypeError`
        for a non-floating weight, a non-int `num_power_iterations`, or a `weight_name` that
        is not a str.
        """
        where = f"SpectralNorm({type(layer).__name__}, weight_name={weight_name!r})"
        weight = wrapped_weight(layer, weight_name, where, min_fan_in=1)
        functional._check_num_power_iterations(num_power_iterations, where)
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        self.layer = layer
        self.weight_name = weight_name
        self.num_power_iterations = num_power_iterations
        self.eps = float(eps)
        self.inference = inference
        self.impl = impl

        out = weight.shape[0]
        fan_in = weight.size // out
        dtype = compute_dtype(weight.dtype)
        ukey, vkey = jr.split(key)
        u0 = jr.normal(ukey, (out,), dtype=dtype)
        v0 = jr.normal(vkey, (fan_in,), dtype=dtype)
        _, u0, v0, _ = functional.spectral_normalize(
            weight, u0, v0, num_power_iterations=_INIT_POWER_ITERATIONS, eps=eps, impl=impl
        )
        self.uv_index = StateIndex((u0, v0))

    def _weight(self) -> Array:
        return getattr(self.layer, self.weight_name)

    @_checking.typechecked()
    def sigma(self, state: State) -> Scalar:
        r"""The current estimate $\sigma = u^\top W v$ of the largest singular value, from the
        $u$, $v$ in `state` (no power iteration is run). After a training call, this is the
        $\sigma$ that call divided by; in inference, the one every call divides by.

        **Arguments:**

        - `state`: the [`equinox.nn.State`][] holding this layer's $u$, $v$.

        **Returns:**

        A scalar in float32 (float64 for a float64 weight).
        """
        u, v = state.get(self.uv_index)
        _, _, _, sigma = functional.spectral_normalize(
            self._weight(), u, v, num_power_iterations=0, eps=self.eps, impl=self.impl
        )
        return sigma

    @_checking.typechecked()
    def exact_sigma(self) -> Scalar:
        r"""The exact largest singular value $\sigma_{\max}(W)$ of the reshaped weight, from
        its SVD (see [`eqxnorm.functional.spectral_norm`][]): to evaluate the estimate
        [`eqxnorm.SpectralNorm.sigma`][], not for use in a training step.

        **Returns:**

        A scalar in float32 (float64 for a float64 weight).
        """
        return functional.spectral_norm(self._weight())

    @_checking.named_scope("eqxnorm.SpectralNorm")
    @_checking.typechecked()
    def __call__(
        self,
        x: PyTree,
        state: State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[PyTree, State]:
        """**Arguments:**

        - `x`: the wrapped layer's input.
        - `state`: the [`equinox.nn.State`][] holding $u$, $v$.
        - `key`: passed through to the wrapped layer. (Keyword only argument.)
        - `inference`: `True` or `False` overrides `self.inference` for this call; `None`
            uses it. (Keyword only argument.)

        **Returns:**

        `(output, state)`: the wrapped layer's output with the spectrally normalized weight,
        and the state with the refined $u$, $v$ (unchanged in inference).
        """
        if inference is None:
            inference = self.inference
        u, v = state.get(self.uv_index)
        weight, u, v, _ = functional.spectral_normalize(
            self._weight(),
            u,
            v,
            num_power_iterations=0 if inference else self.num_power_iterations,
            eps=self.eps,
            impl=self.impl,
        )
        if not inference:
            state = state.set(self.uv_index, (u, v))
        layer = eqx.tree_at(lambda m: getattr(m, self.weight_name), self.layer, weight)
        out = layer(x, key=key)  # pyright: ignore
        return out, state
