r"""The Triton backend of the GPU kernels: how their `pallas_call`s lower for `cuda`/`rocm`.

eqxnorm's kernels reach Pallas' Triton lowering through [`CompilerParams`][], a subclass of
`jax.experimental.pallas.triton.CompilerParams` with a lowering rule of its own that wraps
Pallas' rule for two reasons:

- **JAX 0.11+ deprecates the Pallas Triton backend** and warns (`DeprecationWarning`) on every
  GPU compile of every kernel. JAX still ships it, with no removal date. The row norms'
  kernels run here (measured faster than their Mosaic GPU twins on an H200), and the group
  norms' and BatchNorm's where Mosaic GPU cannot run them (`eqxnorm.kernels._mosaic_gpu`:
  Hopper and newer, JAX 0.12+, operands TMA can stage): JAX 0.11, older GPUs, other shapes,
  `impl="triton"`. Users should hear that once, from eqxnorm, with what it
  means for them: the rule silences JAX's warning for eqxnorm's own kernels (no one else's)
  and emits one [`TritonBackendWarning`][] per process instead.
- **Lowering for a GPU that is not attached.** Since JAX 0.11 the Triton lowering asks the
  local device (or an `AbstractDevice`) for the target's compute capability, so
  `jax.export(..., platforms=["cuda"])` from a CPU machine fails ("No supported GPU devices
  found"), and an `AbstractMesh` with an abstract device is refused by eqxnorm's sharded
  kernel calls (`custom_partitioning` needs devices). The rule supplies the target instead:
  the GPU of the devices being compiled for (a deviceless topology from
  `jax.experimental.topologies`), else [`DEFAULT_GPU`][] (compute capability 9.0, as JAX
  0.10 assumed). A real GPU, or a user's own `jax.sharding.use_abstract_mesh` with an
  abstract device, is used as it is.

Nothing here reaches the kernel bodies: they are written once against `_common`'s masked
loads and stores. A JAX without the backend (its removal is announced) still imports
eqxnorm: [`AVAILABLE`][] is then false, and `impl="auto"` runs the reference.
"""

import contextlib
import dataclasses
import threading
import warnings
from typing import Any

import jax
from jax._src.pallas import core as _pallas_core

try:  # JAX has announced the backend's removal.
    from jax._src.pallas.triton import pallas_call_registration as _registration
    from jax.experimental.pallas import triton as _plgpu
except ImportError:
    _registration = _plgpu = None

try:  # JAX >= 0.11: the target GPU comes from the device or an abstract device.
    from jax._src.pallas.triton import gpu_info as _gpu_info
except ImportError:  # JAX 0.10 assumes compute capability 9.0 without a GPU.
    _gpu_info = None

# Whether the installed JAX has Pallas' Triton backend. Every Pallas kernel of eqxnorm needs
# it, not only on Triton: the masked loads and stores of the kernel bodies are its
# (`_common.load`), and `_common.per_platform` traces every platform's branch, Pallas'
# interpreter on CPU included. Without it `impl="auto"` runs the reference
# (`eqxnorm._dispatch`) and the kernels' `impl`s are refused with `MISSING`.
AVAILABLE = _plgpu is not None
MISSING = (
    f"JAX {jax.__version__} has no Pallas Triton backend (`jax.experimental.pallas.triton`), "
    "whose masked loads and stores eqxnorm's Pallas kernels use on every platform"
)

# The GPU assumed when lowering for `cuda` with none attached and no topology given: the
# Hopper generation (H100/H200) that eqxnorm's static checks target.
DEFAULT_GPU = "NVIDIA H100"

_JAX_DEPRECATION = "The Pallas Triton backend is deprecated"


class TritonBackendWarning(UserWarning):
    """Emitted once per process when eqxnorm compiles a kernel with Pallas' Triton backend on a
    JAX that deprecates it (0.11 and newer)."""


def triton_deprecated() -> bool:
    """Whether the installed JAX deprecates Pallas' Triton backend."""
    from jax._src import deprecations

    return "jax-pallas-triton" in getattr(deprecations, "_registered_deprecations", {})


_announced = threading.Event()


def _announce() -> None:
    if _announced.is_set() or not triton_deprecated():
        return
    _announced.set()
    warnings.warn(
        f"eqxnorm compiled a GPU kernel on Pallas' Triton backend, which JAX {jax.__version__} "
        "deprecates: it still works, and JAX has announced its removal without a date. eqxnorm "
        "silences JAX's per-compile warning for its own kernels and says this once. Its row "
        "norms run here, measured faster than its Mosaic GPU kernels on an H200 (`python -m "
        "eqxnorm.tune` measures your GPU, and the faster backend then runs); its group "
        "norms and BatchNorm run on Mosaic GPU on Hopper and newer GPUs with JAX 0.12+ where "
        "the operands allow (impl='mosaic_gpu' pins Mosaic GPU and says why not); "
        "impl='reference' runs XLA's fused code. The README's 'Supported JAX and hardware' "
        "section says which kernels run where.",
        TritonBackendWarning,
        stacklevel=2,
    )


def _target_gpu(ctx: Any) -> contextlib.AbstractContextManager:
    """A context naming the GPU to lower for when JAX cannot find one itself."""
    if _gpu_info is None:
        return contextlib.nullcontext()
    try:
        _gpu_info.get_gpu_info()
        return contextlib.nullcontext()
    except ValueError:
        pass
    kind = DEFAULT_GPU
    devices = getattr(ctx.module_context.axis_context, "device_assignment", None) or ()
    if devices and getattr(devices[0], "platform", None) in ("gpu", "cuda", "rocm"):
        kind = devices[0].device_kind
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("_eqxnorm_target",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def _lowering(ctx, *in_nodes, **params):
    _announce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _JAX_DEPRECATION, DeprecationWarning)
        with _target_gpu(ctx):
            return _registration.pallas_call_lowering(ctx, *in_nodes, **params)


if AVAILABLE:

    @dataclasses.dataclass(frozen=True)
    class CompilerParams(_plgpu.CompilerParams):
        """Pallas' Triton compiler parameters (`num_warps`, `num_stages`), lowered by
        eqxnorm's rule (see the module docstring)."""

    _pallas_core.register_lowering_rule(CompilerParams, _lowering, "gpu")
else:
    CompilerParams = None
