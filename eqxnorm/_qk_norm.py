import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from . import _checking, functional
from ._checking import AnyArray
from ._dispatch import Impl, check_impl


class QKNorm(eqx.Module):
    r"""Per-head QK-norm for an attention block: every head's query and key vectors
    normalized over `head_dim` before the scores,

    $$\hat{q}_{t,h} = \frac{q_{t,h}}{\sqrt{\frac{1}{d}\sum_i q_{t,h,i}^2 + \varepsilon}}
    \gamma^q_{(h)}, \qquad \hat{k}_{t,h} = \frac{k_{t,h}}{\sqrt{\frac{1}{d}\sum_i
    k_{t,h,i}^2 + \varepsilon}} \gamma^k_{(h)}$$

    (RMSNorm, or LayerNorm without bias with `norm="layer_norm"`), with the weights shared by
    the heads (`(head_dim,)`, Qwen3's `q_norm`/`k_norm`, OLMo 2, Gemma 3) or one per head
    (`per_head=True`, `(heads, head_dim)`). With `impl="pallas"` q and k are normalized in
    one kernel launch each way; see [`eqxnorm.functional.qk_norm`][].

    ??? cite
        [Scaling Vision Transformers to 22 Billion Parameters](https://arxiv.org/abs/2302.05442)

        ```bibtex
        @inproceedings{dehghani2023scaling,
            title={Scaling Vision Transformers to 22 Billion Parameters},
            author={Mostafa Dehghani and others},
            booktitle={ICML},
            year={2023}
        }
        ```
    """

    heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    kv_heads: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    norm: str = eqx.field(static=True)
    per_head: bool = eqx.field(static=True)
    impl: Impl = eqx.field(static=True)
    q_weight: Float[Array, "*q_per_head head_dim"] | None
    k_weight: Float[Array, "*k_per_head head_dim"] | None

    def __init__(
        self,
        heads: int,
        head_dim: int,
        eps: _checking.Number = 1e-6,
        use_weight: bool = True,
        dtype=None,
        *,
        kv_heads: int | None = None,
        per_head: bool = False,
        norm: str = "rms_norm",
        impl: Impl = "auto",
    ):
        """**Arguments:**

        - `heads`: the query heads.
        - `head_dim`: the features of a head, normalized over.
        - `eps`: added to the mean square (variance); must be positive.
        - `use_weight`: whether to learn the scales (initialised to ones).
        - `dtype`: dtype of the weights; defaults to float32 (float64 in 64-bit mode).
        - `kv_heads`: the key heads (grouped-query attention); defaults to `heads`.
        - `per_head`: one weight per head, `(heads, head_dim)` and `(kv_heads, head_dim)`,
            rather than one `(head_dim,)` each shared by the heads.
        - `norm`: `"rms_norm"` or `"layer_norm"`.
        - `impl`: `"auto"`, `"pallas"`, `"triton"` or `"reference"` (no Mosaic GPU kernel:
            on a GPU the QK-norm runs Triton); see `eqxnorm.functional`.

        **Raises:**

        `ValueError` for a non-positive `heads`, `kv_heads` or `head_dim`, `eps <= 0`, an
        unknown `norm` or `impl`.
        """
        where = "QKNorm"
        kv_heads = heads if kv_heads is None else kv_heads
        for name, value in (("heads", heads), ("head_dim", head_dim), ("kv_heads", kv_heads)):
            _checking.check_positive_int(value, name, where)
        _checking.check_eps(eps, where)
        if norm not in ("rms_norm", "layer_norm"):
            raise ValueError(f"{where}: norm must be 'rms_norm' or 'layer_norm', got {norm!r}.")
        check_impl(impl, where)
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.eps, self.norm, self.per_head, self.impl = float(eps), norm, per_head, impl

        def weight(n):
            shape = (n, head_dim) if per_head else (head_dim,)
            return jnp.ones(shape, dtype=dtype) if use_weight else None

        self.q_weight, self.k_weight = weight(heads), weight(kv_heads)

    def _precheck(self, q, k, *, key=None):
        where = f"QKNorm(heads={self.heads}, head_dim={self.head_dim}, kv_heads={self.kv_heads})"
        for name, x, heads in (("q", q, self.heads), ("k", k, self.kv_heads)):
            _checking.check_floating(x, name, where)
            if x.ndim < 2 or tuple(x.shape[-2:]) != (heads, self.head_dim):
                raise ValueError(
                    f"{where}: {name} must be (*tokens, {heads}, {self.head_dim}) (tokens, "
                    f"heads, head_dim), but got {name}.shape={x.shape}. Split the heads off "
                    f"the features first, e.g. `{name}.reshape(tokens, {heads}, "
                    f"{self.head_dim})`."
                )

    @_checking.typechecked(_precheck)
    def __call__(
        self,
        q: Float[AnyArray, "*q_tokens {self.heads} {self.head_dim}"],
        k: Float[AnyArray, "*k_tokens {self.kv_heads} {self.head_dim}"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[
        Float[Array, "*q_tokens {self.heads} {self.head_dim}"],
        Float[Array, "*k_tokens {self.kv_heads} {self.head_dim}"],
    ]:
        """**Arguments:**

        - `q`: `(*tokens, heads, head_dim)`, the queries of one example (or of a batch: the
            leading axes are any).
        - `k`: `(*tokens', kv_heads, head_dim)`, its keys.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        `(q, k)` normalized, each of its input's shape and dtype.

        **Raises:**

        `ValueError` when the trailing axes are not `(heads, head_dim)`/`(kv_heads,
        head_dim)`; `TypeError` for non-floating input.
        """
        with jax.named_scope("eqxnorm.QKNorm"):
            return functional.qk_norm(
                q, k, self.q_weight, self.k_weight, eps=self.eps, norm=self.norm, impl=self.impl
            )
