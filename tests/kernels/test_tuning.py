"""The tuning cache (`eqxnorm.kernels._tuning`): keys and buckets, the configurations it may
give, its file read at trace time, and its fallback to the heuristic."""

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqxnorm.kernels import _common as c, _mosaic_gpu, _tuning, pallas, reference

# `layer_norm` of (37, 128) float32 on CPU: rows of one warp, grouped forward and backward alike
# (a wider row has a forward program of its own: `block_config`'s `one_row`).
KEY = "cpu|interpret|layer_norm|float32|64x128"


def _grids(fn, *args):
    """The grids of the interpreted `pallas_call`s `fn(*args)` traces (the CPU branch),
    traced anew (JAX caches traces: the cache file is read for what is not yet traced)."""
    jax.clear_caches()
    grids = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call" and eqn.params["interpret"]:
                grids.append(tuple(eqn.params["grid_mapping"].grid))
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


def _layer_norm(x):
    weight = jnp.linspace(0.5, 1.5, x.shape[-1])
    return pallas.layer_norm(x, weight, None, eps=1e-5)


def _write(tmp_path, monkeypatch, entries, **top):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": _tuning.FORMAT, "entries": entries, **top}))
    monkeypatch.setenv(_tuning.ENV, str(path))
    return path


def _entry(block_rows, jax_version=jax.__version__, **times):
    config = {"block_rows": block_rows, "num_warps": 8, "num_stages": 1}
    return {"config": config, "jax": jax_version, **times}


X = jnp.asarray(np.random.default_rng(0).normal(size=(37, 128)), jnp.float32)


def test_buckets_and_keys():
    assert [_tuning.bucket(n) for n in (0, 1, 2, 37, 64, 65, 70000)] == [
        1,
        1,
        2,
        64,
        64,
        128,
        131072,
    ]
    assert _tuning.key("NVIDIA H200", "triton", "rms_norm", "bfloat16", 3000, 1000) == (
        "NVIDIA H200|triton|rms_norm|bfloat16|4096x1024"
    )


def test_variants_halve_or_double_within_the_backend():
    default = c.block_config(c.TRITON, 4096, 1024)  # 4 rows × 1024, 8 warps
    triton = _tuning.variants("triton", default, most_rows=4096)
    assert next(iter(triton)) == (1, 1) and triton[1, 1] == default
    assert {(v.block_rows, v.num_warps) for v in triton.values()} == {
        (r, w) for r in (2, 4, 8) for w in (4, 8, 16)
    }
    interpret = _tuning.variants("interpret", default, most_rows=4096)
    assert {v.num_warps for v in interpret.values()} == {default.num_warps}
    # 2 rows × 16384 exceed a Triton block's elements; 8 rows exceed an input of 4.
    wide = c.block_config(c.TRITON, 4096, 16384)
    assert max(v.block_rows for v in _tuning.variants("triton", wide, 4096).values()) == 1
    assert max(v.block_rows for v in _tuning.variants("triton", default, 4).values()) == 4
    mosaic = c.block_config(c.MOSAIC, 4096, 1024)
    assert {v.block_rows for v in _tuning.variants("mosaic", mosaic, 4096).values()} == {32, 64}
    boxes = _mosaic_gpu.Boxes(16, 256, 4, 4, None)
    assert {v.block_rows for v in _tuning.variants("mosaic_gpu", boxes, 24).values()} == {8, 16}
    assert _tuning.variants("mosaic_gpu", boxes._replace(block_rows=0), 0) == {
        (1, 1): boxes._replace(block_rows=0)
    }
    # Tiles whose kernel also takes folded rows: one row a program too (`_tuning.FOLD`).
    folded = _tuning.variants("mosaic_gpu", boxes, 24, fold=True)
    assert folded[_tuning.FOLD] == boxes._replace(block_rows=1) and len(folded) == 3
    assert _tuning.FOLD not in _tuning.variants("triton", default, 4096, fold=True)


def test_the_cache_configures_the_launch(tmp_path, monkeypatch):
    default = _grids(_layer_norm, X)
    assert default == [(2, 1)]  # 32 rows per block
    _write(tmp_path, monkeypatch, {KEY: _entry(16)})
    assert _grids(_layer_norm, X) == [(3, 1)]
    # Forward and backward both take it, and the result is the reference's. The backward's
    # 3 blocks of 16 rows do not fill the GPU: 2 programs loop over them, so that each reads
    # more than its partial sums (`_common.partial_iterations`).
    weight = jnp.linspace(0.5, 1.5, 128)

    def loss(impl, x, w):
        return jnp.sum(jnp.sin(impl.layer_norm(x, w, None, eps=1e-5)))

    grads = jax.grad(lambda x, w: loss(pallas, x, w), argnums=(0, 1))
    config = c.block_config(c.INTERPRET, 37, 128)._replace(block_rows=16)
    plan = c.persistent_config(config, 37, 1, 128, 2 * X.dtype.itemsize)
    assert (plan.programs, plan.iterations) == (2, 2)
    assert _grids(grads, X, weight) == [(3, 1), (2, 1)]
    jax.clear_caches()
    expected = jax.grad(lambda x, w: loss(reference, x, w), argnums=(0, 1))(X, weight)
    for got, want in zip(grads(X, weight), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "entries",
    [
        {KEY: _entry(32, jax_version="0.0.1")},  # stale: measured with another JAX
        {KEY: _entry(5)},  # not a variant of the heuristic's choice
        {KEY: {"config": {"rows": 32}, "jax": jax.__version__}},  # not a configuration field
        {KEY.replace("cpu", "TPU v5 lite"): _entry(32)},  # another device
    ],
    ids=["stale", "not-a-variant", "unknown-field", "other-device"],
)
def test_an_unusable_entry_leaves_the_heuristic(tmp_path, monkeypatch, entries):
    _write(tmp_path, monkeypatch, entries)
    assert _grids(_layer_norm, X) == [(2, 1)]


def test_a_corrupt_or_foreign_file_warns_and_leaves_the_heuristic(tmp_path, monkeypatch):
    path = _write(tmp_path, monkeypatch, {})
    path.write_text('{"format": 1, "entries": {')
    with pytest.warns(UserWarning, match=r"ignores the tuning cache .*tuning.json.*eqxnorm.tune"):
        assert _grids(_layer_norm, X) == [(2, 1)]
    _write(tmp_path, monkeypatch, {KEY: _entry(16)}, format=99)
    with pytest.warns(UserWarning, match="format 99, expected 1"):
        assert _tuning.entries() == _tuning._read(_tuning.SHIPPED)  # the file adds none
    monkeypatch.setenv(_tuning.ENV, "off")
    assert _tuning.entries() == {}


def test_the_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv(_tuning.ENV, str(tmp_path / "mine.json"))
    assert _tuning.cache_path() == tmp_path / "mine.json"
    monkeypatch.delenv(_tuning.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _tuning.cache_path() == tmp_path / "eqxnorm" / "tuning.json"


def test_prefers_xla_by_the_launches_of_the_call(tmp_path, monkeypatch):
    def trace():
        jax.clear_caches()
        return jax.eval_shape(_layer_norm, X)

    assert not _tuning.prefers_xla(trace)  # no cache
    _write(tmp_path, monkeypatch, {KEY: _entry(16, xla_ms=0.5, kernel_ms=1.0)})
    assert _tuning.prefers_xla(trace)
    _write(tmp_path, monkeypatch, {KEY: _entry(16, xla_ms=2.0, kernel_ms=1.0)})
    assert not _tuning.prefers_xla(trace)
    other = KEY.replace("37", "").replace("64x128", "4096x1024")
    _write(tmp_path, monkeypatch, {other: _entry(4, xla_ms=0.5, kernel_ms=1.0)})
    assert not _tuning.prefers_xla(trace)  # this shape was not measured


class _Tiles(NamedTuple):
    """A Mosaic GPU launch's configuration, as `_tuning` sees it."""

    block_rows: int
    tile_rows: int


def test_faster_backend_by_the_measured_steps(tmp_path, monkeypatch):
    # A call either GPU backend can run takes the one whose launches the cache measured in the
    # faster training step; where some launch of either was not measured, neither (`None`:
    # the family's default).
    defaults = {"triton": c.BlockConfig(8, 1024, 1, 8, 1), "mosaic_gpu": _Tiles(8, 4)}
    traced = []

    def launches(backend, *widths):
        def trace():
            traced.append(backend)
            with _tuning.launching(_tuning.Launch("layer_norm", "bfloat16")):
                for width in widths:
                    _tuning.tuned(defaults[backend], backend, 4096, width)

        return trace

    def key(backend, width=1024):
        return f"cpu|{backend}|layer_norm|bfloat16|4096x{width}"

    traces = {"triton": launches("triton", 1024), "mosaic_gpu": launches("mosaic_gpu", 1024)}
    assert _tuning.faster_backend(traces) is None and traced == []  # no cache: not traced
    both = {key("triton"): _entry(8, kernel_ms=0.3), key("mosaic_gpu"): _entry(8, kernel_ms=0.2)}
    _write(tmp_path, monkeypatch, both)
    assert _tuning.faster_backend(traces) == "mosaic_gpu" and traced == ["triton", "mosaic_gpu"]
    _write(tmp_path, monkeypatch, both | {key("triton"): _entry(8, kernel_ms=0.1)})
    assert _tuning.faster_backend(traces) == "triton"
    _write(tmp_path, monkeypatch, both | {key("triton"): _entry(8, kernel_ms=0.2)})
    assert _tuning.faster_backend(traces) == "triton"  # a tie: the first
    _write(tmp_path, monkeypatch, {key("mosaic_gpu"): both[key("mosaic_gpu")]})
    assert _tuning.faster_backend(traces) is None  # Triton not measured
    # A backend whose second launch (another width) was not measured: neither.
    _write(tmp_path, monkeypatch, both)
    wide = traces | {"mosaic_gpu": launches("mosaic_gpu", 1024, 8192)}
    assert _tuning.faster_backend(wide) is None
    _write(tmp_path, monkeypatch, both | {key("mosaic_gpu", 8192): _entry(8, kernel_ms=0.4)})
    assert _tuning.faster_backend(wide) == "triton"  # its slowest step measured, 0.4 ms
    # Entries without times measured nothing either way.
    _write(tmp_path, monkeypatch, {k: _entry(8) for k in both})
    assert _tuning.faster_backend(traces) is None


def test_shipped_measurements_beneath_the_users_file(tmp_path, monkeypatch):
    # eqxnorm ships the H200's tuner results (JAX 0.12.0.1): on that device and JAX, LayerNorm
    # at 4096 x 8192 bf16 takes 8 warps a row (measured 0.29 ms a training step, 0.43 with the
    # heuristic's 16) and XLA at 65536 features; the user's file wins where it has the key;
    # another JAX, another device, or the cache off leave the heuristic.
    shipped = json.loads(_tuning.SHIPPED.read_text())
    assert shipped["format"] == _tuning.FORMAT
    assert all(k.startswith("NVIDIA H200|") for k in shipped["entries"])
    key = "NVIDIA H200|triton|layer_norm|bfloat16|4096x8192"
    assert shipped["entries"][key]["config"]["num_warps"] == 8
    monkeypatch.setattr(_tuning, "device_kind", lambda: "NVIDIA H200")
    monkeypatch.setattr(_tuning.jax, "__version__", "0.12.0.1")
    _tuning._load.cache_clear()

    def warps(width, op="layer_norm"):
        with _tuning.launching(_tuning.Launch(op, "bfloat16")):
            return c.block_config(c.TRITON, 4096, width, one_row=True).num_warps

    def xla_at(width):
        with _tuning.launching(_tuning.Launch("layer_norm", "bfloat16")):
            return _tuning.prefers_xla(lambda: c.block_config(c.TRITON, 4096, width, one_row=True))

    monkeypatch.setenv(_tuning.ENV, str(tmp_path / "absent.json"))
    assert (warps(8192), warps(8192, "rms_norm"), xla_at(65536), xla_at(8192)) == (
        8,
        16,
        True,
        False,
    )
    mine = shipped["entries"][key] | {"config": {"block_rows": 1, "num_warps": 16, "num_stages": 1}}
    _write(tmp_path, monkeypatch, {key: mine})
    assert warps(8192) == 16 and xla_at(65536)  # the user's key, the shipped others
    monkeypatch.setenv(_tuning.ENV, "off")
    assert warps(8192) == 16 and not xla_at(65536)
    monkeypatch.setenv(_tuning.ENV, str(tmp_path / "absent.json"))
    monkeypatch.setattr(_tuning.jax, "__version__", "0.10.2")  # measured with another JAX
    assert warps(8192) == 16 and not xla_at(65536)
    monkeypatch.setattr(_tuning, "device_kind", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(_tuning.jax, "__version__", "0.12.0.1")
    assert warps(8192) == 16 and not xla_at(65536)
