"""`impl` validation and resolution (`eqxnorm._dispatch`)."""

import inspect
import os

import jax
import pytest

from eqxnorm import _dispatch
from eqxnorm.kernels import pallas, reference


def test_check_impl_accepts_existing_choices():
    for impl in ("auto", "pallas", "reference"):
        _dispatch.check_impl(impl, "here")


@pytest.mark.parametrize("impl", ["cuda", "Auto", None, 1])
def test_check_impl_rejects_unknown(impl):
    with pytest.raises(ValueError, match=r"here: `impl` must be one of .*impl=" + repr(impl)):
        _dispatch.check_impl(impl, "here")


def test_an_unregistered_implementation_is_refused(monkeypatch):
    monkeypatch.delitem(_dispatch.IMPLEMENTATIONS, "pallas")
    with pytest.raises(
        ValueError,
        match=r"impl='pallas' is not available.*\('auto', 'reference', 'triton', 'mosaic_gpu'\)",
    ):
        _dispatch.check_impl("pallas", "here")
    for backend in ("cpu", "gpu", "tpu"):
        assert _dispatch.resolve_impl("auto", backend) == "reference"


def test_the_kernels_are_registered():
    assert _dispatch.IMPLEMENTATIONS["pallas"] is pallas
    for name in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "batch_norm_inference"):
        assert callable(getattr(pallas, name))
        ref, kernel = (
            inspect.signature(getattr(reference, name)),
            inspect.signature(getattr(pallas, name)),
        )
        assert list(ref.parameters) == list(kernel.parameters), name


def test_auto_picks_kernels_on_accelerators():
    assert _dispatch.resolve_impl("auto", "cpu") == "reference"
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert _dispatch.resolve_impl("auto", backend) == "pallas"
    assert _dispatch.resolve_impl("reference", "gpu") == "reference"
    assert _dispatch.resolve_impl("pallas", "cpu") == "pallas"
    _dispatch.check_impl("pallas", "here")


def test_implementation_on_this_machine():
    assert jax.default_backend() == "cpu"
    assert _dispatch.implementation("auto") is reference
    assert _dispatch.implementation("reference") is reference
    assert _dispatch.implementation("pallas") is pallas


def test_pallas_runs_float64_on_the_reference():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (3, 5, 7), jax.numpy.float64)
        for name in ("layer_norm", "rms_norm"):
            rows = x.reshape(15, 7)
            kernel = getattr(pallas, name)(rows, None, None, eps=1e-5)
            assert kernel.dtype == jax.numpy.float64
            assert (kernel == getattr(reference, name)(rows, None, None, eps=1e-5)).all()
        for name, kwargs in (("batch_norm", {}), ("group_norm", {"groups": 5})):
            kernel = jax.tree.leaves(getattr(pallas, name)(x, None, None, eps=1e-5, **kwargs))
            expected = jax.tree.leaves(getattr(reference, name)(x, None, None, eps=1e-5, **kwargs))
            for a, b in zip(kernel, expected, strict=True):
                assert a.dtype == jax.numpy.float64 and (a == b).all()


# What `import eqxnorm` and its layers do on a JAX without Pallas' Triton backend, which JAX
# has announced it will remove: the modules blocked as that JAX would lack them.
_WITHOUT_TRITON = """
import sys
for name in ("jax.experimental.pallas.triton", "jax._src.pallas.triton"):
    sys.modules[name] = None
import jax, jax.numpy as jnp
import eqxnorm, eqxnorm.functional as F
from eqxnorm import _dispatch
from eqxnorm.kernels import _triton, reference
assert not _triton.AVAILABLE and set(_dispatch.IMPLEMENTATIONS) == {"reference"}
assert _dispatch.resolve_impl("auto", "gpu") == "reference"
x = jnp.linspace(-2.0, 3.0, 24).reshape(3, 8)
y = jax.vmap(eqxnorm.LayerNorm(8))(x)
assert jnp.array_equal(y, reference.layer_norm(x, jnp.ones(8), jnp.zeros(8), eps=1e-5))
assert jnp.array_equal(F.rms_norm(x, None, eps=1e-5), reference.rms_norm(x, None, None, eps=1e-5))
for impl in ("pallas", "triton", "mosaic_gpu"):
    try:
        eqxnorm.RMSNorm(8, impl=impl)
    except ValueError as error:
        print(error)
    else:
        raise AssertionError(impl)
"""


def test_without_pallas_triton_backend_the_reference_runs(tmp_path):
    import subprocess
    import sys

    # Run away from the checkout, whose `eqxnorm/` lacks the installed `eqxnorm.kernels`.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", _WITHOUT_TRITON]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = done.stdout.strip().splitlines()
    assert len(refused) == 3
    for line in refused:
        assert "has no Pallas Triton backend" in line
        assert "exist are ('auto', 'reference'). Use impl='auto' or impl='reference'." in line
