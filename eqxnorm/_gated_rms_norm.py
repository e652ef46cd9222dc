from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl
from ._misc import example_axis_names


class GatedRMSNorm(eqx.Module):
    r"""Gated RMSNorm, the output norm of Mamba-2 and of Qwen3-Next's linear attention:

    $$y = \frac{x}{\sqrt{\overline{x^2} + \varepsilon}}\,\gamma\,\mathrm{silu}(z)
    \text{ (norm\_before\_gate=True)}, \qquad
    y = \frac{u}{\sqrt{\overline{u^2} + \varepsilon}}\,\gamma,\ u = x\,\mathrm{silu}(z)
    \text{ (False)}.$$

    The twin of `mamba_ssm`'s `RMSNormGated` (Mamba-2 builds it with
    `norm_before_gate=False`) and of Hugging Face's `Qwen3NextRMSNormGated` (the order
    `norm_before_gate=True`, the default here); also exported as `eqxnorm.RMSNormGated`.
    The weight is `weight`, initialised to ones, as theirs (see
    [`eqxnorm.load_torch_state_dict`][]). With `impl="pallas"` the gate is fused into the
    norm, forward and backward; see [`eqxnorm.functional.gated_rms_norm`][].

    ??? cite
        [Transformers are SSMs: Generalized Models and Efficient Algorithms Through
        Structured State Space Duality](https://arxiv.org/abs/2405.21060)

        ```bibtex
        @inproceedings{dao2024transformers,
            title={Transformers are {SSM}s: Generalized Models and Efficient Algorithms
                   Through Structured State Space Duality},
            author={Tri Dao and Albert Gu},
            booktitle={ICML},
            year={2024}
        }
        ```
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    norm_before_gate: bool = eqx.field(static=True)
    use_weight: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    weight: Float[Array, "*shape"] | None

    def __init__(
        self,
        shape: int | Sequence[int],
        eps: _checking.Number = 1e-6,
        use_weight: bool = True,
        dtype=None,
        *,
        norm_before_gate: bool = True,
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `shape`: the shape of one example (an int for a vector).
        - `eps`: added to the mean square; must be positive (Qwen3-Next: 1e-6; Mamba-2:
            1e-5).
        - `use_weight`: whether to learn the scale $\\gamma$ (initialised to ones).
        - `dtype`: dtype of the weight; defaults to float32 (float64 in 64-bit mode).
        - `norm_before_gate`: see above.
        - `impl`: `"auto"`, `"pallas"`, `"triton"`, `"mosaic_gpu"` or `"reference"`; see
            `eqxnorm.functional`.

        **Raises:**

        `ValueError` for an empty `shape`, `eps <= 0` or an unknown `impl`.
        """
        where = "GatedRMSNorm"
        self.shape = _checking.normalize_shape(shape, where)
        _checking.check_eps(eps, where)
        check_impl(impl, where)
        self.eps, self.norm_before_gate = float(eps), bool(norm_before_gate)
        self.use_weight, self.impl = use_weight, impl
        self.weight = jnp.ones(self.shape, dtype=dtype) if use_weight else None

    def _precheck(self, x, z, *, key=None):
        where = f"GatedRMSNorm(shape={self.shape})"
        names = example_axis_names(self.shape)
        for name, value in (("x", x), ("z", z)):
            _checking.check_floating(value, name, where)
        _checking.check_example_shape(x, self.shape, where, names)
        if tuple(z.shape) != tuple(x.shape):
            raise ValueError(
                f"{where}: the gate z must have x's shape {self.shape}, but got z.shape={z.shape}."
            )

    @_checking.typechecked(_precheck)
    def __call__(
        self,
        x: Float[AnyArray, "*shape"],
        z: Float[AnyArray, "*shape"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*shape"]:
        """**Arguments:**

        - `x`: one example, of shape `shape`; floating point.
        - `z`: the gate, of shape `shape`.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        An array of `x`'s shape and dtype.

        **Raises:**

        `ValueError` when `x.shape` or `z.shape` is not `shape`; `TypeError` for
        non-floating input.
        """
        with jax.named_scope("eqxnorm.GatedRMSNorm"):
            return functional.gated_rms_norm(
                x,
                z,
                self.weight,
                shape=self.shape,
                eps=self.eps,
                norm_before_gate=self.norm_before_gate,
                impl=self.impl,
            )


# The name Mamba-2's and Qwen3-Next's users know the layer by.
RMSNormGated = GatedRMSNorm
