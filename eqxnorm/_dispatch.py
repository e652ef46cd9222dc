"""Choosing an implementation: `impl="auto" | "pallas" | "reference" | "triton" |
"mosaic_gpu"`.

- `"reference"`: the plain `jax.numpy` code in `eqxnorm.kernels.reference`, which XLA fuses
  and compiles for any backend.
- `"pallas"`: the fused Pallas kernels in `eqxnorm.kernels.pallas` (GPU through Triton, TPU
  through Mosaic; interpret mode on CPU: exact, and slow).
- `"triton"`, `"mosaic_gpu"`: the Pallas kernels pinned to one GPU backend (on CPU, in the
  interpreter of that backend). `"pallas"` chooses on a GPU, per call: the backend the
  tuning cache measured faster where it measured both (`python -m eqxnorm.tune`); else
  Mosaic GPU for the group norms and BatchNorm on compute capability 9.0+ with JAX 0.12+
  where the operands allow (rows of a multiple of 16 bytes that fit in shared memory), and
  Triton for the row norms (measured faster on an H200) and otherwise.
- `"auto"`: the Pallas kernels when JAX's default backend is a GPU or TPU, the reference
  elsewhere. The choice is made when the function is traced; to export from a CPU machine for
  a GPU or TPU, pass `impl="pallas"` (the kernels then pick Triton or Mosaic by the lowering
  platform). On a GPU or TPU whose tuning cache (`python -m eqxnorm.tune`) measured the XLA
  reference faster than the kernels for a call's launches, `"auto"` takes the reference for
  that call ([`MEASURED`][]). On a JAX without Pallas' Triton backend (announced for removal),
  which every kernel path needs (`eqxnorm.kernels._triton.AVAILABLE`), `"auto"` takes the
  reference everywhere and the kernels' `impl`s are refused, saying why.
"""

import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import Literal

import jax
import jax.numpy as jnp

from .kernels import _triton, _tuning, pallas, reference

Impl = Literal["auto", "pallas", "reference", "triton", "mosaic_gpu"]
IMPLS: tuple[str, ...] = ("auto", "pallas", "reference", "triton", "mosaic_gpu")

# The concrete implementations that exist, by name. Each is a module exposing the functions of
# `eqxnorm.kernels.reference` with the same signatures. The kernels need Pallas' Triton
# backend, which JAX has announced it will remove (`eqxnorm.kernels._triton.AVAILABLE`):
# without it, the reference alone.
IMPLEMENTATIONS: dict[str, ModuleType] = {"reference": reference}
if _triton.AVAILABLE:
    IMPLEMENTATIONS |= {
        "pallas": pallas,
        "triton": pallas.backend("triton"),
        "mosaic_gpu": pallas.backend("mosaic_gpu"),
    }

_KERNEL_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def check_impl(impl: object, where: str) -> None:
    """`ValueError` unless `impl` names an implementation choice that exists."""
    if impl not in IMPLS:
        raise ValueError(
            f"{where}: `impl` must be one of {IMPLS}, but got impl={impl!r}. Use "
            f"impl='auto' to let eqxnorm choose."
        )
    if impl != "auto" and impl not in IMPLEMENTATIONS:
        existing = ("auto", *IMPLEMENTATIONS)
        why = _triton.MISSING if not _triton.AVAILABLE else "not in this version of eqxnorm"
        raise ValueError(
            f"{where}: impl={impl!r} is not available ({why}); the implementations that "
            f"exist are {existing}. Use impl='auto' or impl='reference'."
        )


def resolve_impl(impl: Impl, backend: str | None = None) -> str:
    """The concrete implementation `impl` stands for on `backend` (default: JAX's default
    backend)."""
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    if backend in _KERNEL_BACKENDS and "pallas" in IMPLEMENTATIONS:
        return "pallas"
    return "reference"


def _measured(name: str) -> Callable:
    """`pallas.<name>`, or `reference.<name>` for a call whose launches the tuning cache
    measured slower than XLA on this device (`eqxnorm.kernels._tuning.prefers_xla`, which
    traces the kernel call abstractly, on `_vmapped_shape(x)`, to learn its launches)."""
    kernel, reference_fn = getattr(pallas, name), getattr(reference, name)

    @functools.wraps(kernel)
    def dispatch(x, *args, **kwargs):
        def trace():
            folded = jax.ShapeDtypeStruct(_vmapped_shape(x), x.dtype)
            rows = {}
            if kwargs.get("lengths") is not None:
                # One valid length per row of the folded rows.
                rows["lengths"] = jax.ShapeDtypeStruct(folded.shape[:1], jnp.int32)

            def call(x, rows, *args):
                return kernel(x, *args, **(kwargs | rows))

            return jax.eval_shape(call, folded, rows, *args)

        if not _tuning.prefers_xla(trace):
            return kernel(x, *args, **kwargs)
        if kwargs.get("lengths") is not None:
            # The reference takes the valid lengths as their mask.
            kwargs["mask"] = pallas.lengths_mask(x, kwargs.pop("lengths"))
        kwargs.pop("lengths", None)
        return reference_fn(x, *args, **kwargs)

    return dispatch


def _vmapped_shape(x) -> tuple[int, ...]:
    """`x`'s shape with the axes `jax.vmap` maps it over folded into its leading one, as the
    kernels' batching rules fold them: a layer called on one example under `vmap` is judged
    on the batch its kernels launch over. (JAX has no public way to ask a value's batch
    axes; without its private `BatchTracer`, the example's own shape.)"""
    try:
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:  # pragma: no cover - a JAX that moved it
        return x.shape
    full = x
    while isinstance(full, BatchTracer):
        full = full.val
    if not x.shape:
        return x.shape
    factor = math.prod(full.shape) // max(math.prod(x.shape), 1)
    return (x.shape[0] * factor, *x.shape[1:])


# What `impl="auto"` runs on a GPU or TPU: the kernels, or XLA where the tuning cache says.
MEASURED = ModuleType("eqxnorm.kernels.pallas[measured]", _measured.__doc__)
for _name in pallas.__all__:
    setattr(MEASURED, _name, _measured(_name))
MEASURED.__all__ = list(pallas.__all__)


def implementation(impl: Impl) -> ModuleType:
    """The module implementing `impl` (validated by `check_impl` beforehand): for `"auto"`
    on a GPU or TPU, [`MEASURED`][]."""
    name = resolve_impl(impl)
    if impl == "auto" and name == "pallas":
        return MEASURED
    return IMPLEMENTATIONS[name]
