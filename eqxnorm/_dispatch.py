"""Choosing an implementation: `impl="auto" | "pallas" | "reference" | "triton" |
"mosaic_gpu"`.

- `"reference"`: the plain `jax.numpy` code in `eqxnorm.kernels.reference`, which XLA fuses
  and compiles for any backend.
- `"pallas"`: the fused Pallas kernels in `eqxnorm.kernels.pallas` (GPU through Triton, TPU
  through Mosaic; interpret mode on CPU: exact, and slow).
- `"triton"`, `"mosaic_gpu"`: the Pallas kernels pinned to one GPU backend (on CPU, in the
  interpreter of that backend). `"pallas"` chooses on a GPU: Mosaic GPU on compute
  capability 9.0+ with JAX 0.12+ where the operands allow (rows of a multiple of 16 bytes
  that fit in shared memory), Triton otherwise.
- `"auto"`: the Pallas kernels when JAX's default backend is a GPU or TPU, the reference
  elsewhere. The choice is made when the function is traced; to export from a CPU machine for
  a GPU or TPU, pass `impl="pallas"` (the kernels then pick Triton or Mosaic by the lowering
  platform).
"""

from types import ModuleType
from typing import Literal

import jax

from .kernels import pallas, reference

Impl = Literal["auto", "pallas", "reference", "triton", "mosaic_gpu"]
IMPLS: tuple[str, ...] = ("auto", "pallas", "reference", "triton", "mosaic_gpu")

# The concrete implementations that exist, by name. Each is a module exposing the functions of
# `eqxnorm.kernels.reference` with the same signatures.
IMPLEMENTATIONS: dict[str, ModuleType] = {
    "reference": reference,
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
        raise ValueError(
            f"{where}: impl={impl!r} is not available in this version of eqxnorm; the "
            f"implementations that exist are {existing}. Use impl='auto' or "
            f"impl='reference'."
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


def implementation(impl: Impl) -> ModuleType:
    """The module implementing `impl` (validated by `check_impl` beforehand)."""
    return IMPLEMENTATIONS[resolve_impl(impl)]
