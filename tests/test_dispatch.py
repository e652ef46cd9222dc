"""`impl` validation and resolution (`eqxnorm._dispatch`)."""

import jax
import pytest

from eqxnorm import _dispatch
from eqxnorm.kernels import reference


def test_check_impl_accepts_existing_choices():
    for impl in ("auto", "reference"):
        _dispatch.check_impl(impl, "here")


@pytest.mark.parametrize("impl", ["triton", "Auto", None, 1])
def test_check_impl_rejects_unknown(impl):
    with pytest.raises(ValueError, match=r"here: `impl` must be one of .*impl=" + repr(impl)):
        _dispatch.check_impl(impl, "here")


def test_pallas_unavailable_until_registered():
    with pytest.raises(
        ValueError, match=r"impl='pallas' is not available.*\('auto', 'reference'\)"
    ):
        _dispatch.check_impl("pallas", "here")


@pytest.mark.parametrize("backend", ["cpu", "gpu", "cuda", "rocm", "tpu"])
def test_auto_is_reference_without_kernels(backend):
    assert _dispatch.resolve_impl("auto", backend) == "reference"


def test_auto_picks_kernels_on_accelerators_once_registered(monkeypatch):
    kernels = object()
    monkeypatch.setitem(_dispatch.IMPLEMENTATIONS, "pallas", kernels)
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
