"""The Triton backend's lowering (`eqxnorm.kernels._triton`): every kernel lowers for `cuda`
from this CPU machine on every supported JAX (no GPU, with or without an abstract device),
JAX's deprecation of the backend (0.11+) never reaches the user, and eqxnorm says so once."""

import warnings

import jax
import jax.numpy as jnp
import pytest

import eqxnorm
import kernel_support as ks
from eqxnorm import functional as F
from eqxnorm.kernels import _triton


def _layer_norm(x):
    weight, bias = ks.params(x.shape[-1])
    return F.layer_norm(x, weight, bias, impl="triton")


def _lowered(x):
    return ks.lowered(_layer_norm, (x,), "cuda")


def test_exports_for_cuda_without_a_gpu():
    # JAX 0.11+ asks the local device for the compute capability and found none ("No
    # supported GPU devices found"); the rule lowers for `DEFAULT_GPU` instead.
    assert jax.default_backend() == "cpu"
    text = _lowered(ks.data((37, 760), jnp.bfloat16))
    assert ks.kernel_count(text, "cuda") == 1


def test_exports_under_an_abstract_gpu_device():
    # JAX's own way to name the target from a CPU machine (0.11+); the sharded kernel call
    # (`custom_partitioning`, which refuses abstract meshes) steps aside there.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    x = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(mesh):
        text = _lowered(x)
    assert ks.kernel_count(text, "cuda") == 1


def test_every_kernel_of_a_training_step_lowers_through_the_rule(monkeypatch):
    calls = []
    lower = _triton._registration.pallas_call_lowering

    def counting(ctx, *args, **kwargs):
        calls.append(kwargs["name"] if "name" in kwargs else None)
        return lower(ctx, *args, **kwargs)

    monkeypatch.setattr(_triton._registration, "pallas_call_lowering", counting)
    step = jax.grad(lambda x: jnp.sum(jnp.sin(_layer_norm(x))))
    text = ks.lowered(step, (ks.data((37, 160), jnp.float32),), "cuda")
    assert len(calls) == ks.kernel_count(text, "cuda") == 2


def test_no_jax_deprecation_warning_and_one_eqxnorm_notice(monkeypatch):
    monkeypatch.setattr(_triton, "_announced", type(_triton._announced)())
    x = ks.data((8, 64), jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (1.0, 2.0, 3.0):  # three compiles
            jax.jit(lambda x, s=scale: _layer_norm(x * s)).lower(x)
            _lowered(x * scale)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecations == []
    notices = [w for w in caught if issubclass(w.category, eqxnorm.TritonBackendWarning)]
    expected = 1 if _triton.triton_deprecated() else 0
    assert len(notices) == expected
    if expected:
        message = str(notices[0].message)
        assert jax.__version__ in message and "impl='reference'" in message


def test_triton_deprecated_follows_the_installed_jax():
    version = tuple(int(p) for p in jax.__version__.split(".")[:2])
    assert _triton.triton_deprecated() == (version >= (0, 11))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_other_targets_still_lower(platform):
    # The rule is registered for the GPU params only; TPU keeps Mosaic's.
    text = ks.lowered(_layer_norm, (ks.data((16, 256), jnp.float32),), platform)
    assert ks.kernel_count(text, platform) == 1
