"""The tuner (`eqxnorm.tune`): candidates timed with an injected timer, the cache file it
writes, and what the kernels and `impl="auto"` then do with it."""

import json

import jax
import jax.numpy as jnp
import pytest

import kernel_support as ks
from eqxnorm import _dispatch, tune
from eqxnorm.kernels import _tuning

# Rows of 128: grouped in the forward and the backward alike (a wider row has a forward program
# of its own, `block_config`'s `one_row`, and the backward another default).
KEY = "cpu|interpret|layer_norm|float32|64x128"
INTERPRET = {"pallas": "interpret"}


def _timer(xla_seconds):
    """A deterministic timer: XLA takes `xla_seconds`; a kernel 1 s less 1 ms per row of its
    blocks (more rows measure faster), so the doubled rows win."""
    seen = []

    def timer(run, candidate):
        seen.append(candidate.label)
        if candidate.impl == "reference":
            return xla_seconds
        rows = [fields["block_rows"] for fields in candidate.configs.values()] or [16]
        return 1.0 - 1e-3 * max(rows)

    return timer, seen


def test_tune_writes_the_fastest_configuration(tmp_path):
    timer, seen = _timer(xla_seconds=2.0)
    path = tmp_path / "cache" / "tuning.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": 1, "entries": {"kept|x": {"config": {}}}}))
    found = tune.tune(["layer_norm"], [(37, 128)], ["float32"], path=path, timer=timer)
    # XLA, then the heuristic's 32 rows, halved and doubled (no warps off Triton).
    assert seen == [
        "xla",
        "pallas rows×1 warps×1",
        "pallas rows×0.5 warps×1",
        "pallas rows×2 warps×1",
    ]
    assert list(found) == [KEY]
    entry = found[KEY]
    assert entry["config"] == {"block_rows": 64, "num_warps": 8, "num_stages": 1}
    assert (entry["kernel_ms"], entry["default_ms"], entry["xla_ms"]) == pytest.approx(
        (936, 968, 2000)
    )
    assert entry["jax"] == jax.__version__ and entry["tuned"] == "layer_norm 37x128 float32"
    data = json.loads(path.read_text())
    assert data["format"] == _tuning.FORMAT
    assert data["entries"] == {"kept|x": {"config": {}}, KEY: entry}


def test_auto_takes_xla_where_the_cache_measured_it_faster(tmp_path, monkeypatch):
    monkeypatch.setenv(_tuning.ENV, str(tmp_path / "tuning.json"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _dispatch.implementation("auto") is _dispatch.MEASURED
    x, w = jnp.ones((37, 128)), jnp.ones(128)

    def layer_norm(x):
        return _dispatch.MEASURED.layer_norm(x, w, w, eps=1e-5)

    def kernels_traced(fn):
        jax.clear_caches()
        return "pallas_call" in str(jax.make_jaxpr(fn)(x))

    # A layer under vmap, one example per call, is judged on the 37 rows it launches over.
    per_example = jax.vmap(lambda row: layer_norm(row[None])[0])
    assert kernels_traced(layer_norm) and kernels_traced(per_example)  # no cache: the kernels
    for xla_seconds, kernels in ((0.5, False), (2.0, True)):
        timer = _timer(xla_seconds)[0]
        tune.tune(["layer_norm"], [(37, 128)], ["float32"], timer=timer, impls=INTERPRET)
        assert kernels_traced(layer_norm) is kernels
        assert kernels_traced(per_example) is kernels


def _backends(op, args, impl="pallas"):
    """The GPU backends whose kernels a training step of `op` by `impl` lowered for cuda runs
    (traced anew: the cache file is read when tracing)."""
    jax.clear_caches()
    text = ks.lowered(tune.training_step(op, impl), args, "cuda")
    counts = {"mosaic_gpu": text.count(ks.MOSAIC_GPU_CALL)}
    counts["triton"] = text.count(ks.CUSTOM_CALLS["cuda"])
    return {name for name, n in counts.items() if n}


def _faster(kernels: dict[str, float], xla: float = 1.0):
    """A timer: XLA `xla` seconds, each kernel implementation its time in `kernels`."""
    return lambda run, candidate: xla if candidate.impl == "reference" else kernels[candidate.impl]


@pytest.mark.parametrize(
    ("op", "shape", "default", "smem"),
    [
        ("layer_norm", (37, 760), "triton", None),
        ("layer_norm", (37, 1304), "triton", 8 * 1024),  # rows folded, one a program
        ("group_norm", (2, 64, 16, 16), "mosaic_gpu", None),
    ],
)
def test_the_kernels_run_on_the_gpu_backend_measured_faster(
    op, shape, default, smem, tmp_path, monkeypatch
):
    # Tuned on a GPU with both kernel backends (here an injected timer, and the cuda lowering
    # of this CPU machine), `impl="pallas"` and `"auto"` run a call's kernels on the backend
    # whose training step measured faster: Mosaic GPU's forward and backward, or Triton's.
    # Untuned, each family's default: the row norms on Triton (`row_norm.MOSAIC_GPU_AUTO`), the
    # group norms on Mosaic GPU. JAX < 0.12 has no Mosaic GPU: Triton. With 8 KiB of shared
    # memory 1304 bf16 features are folded, a row a program, forward and backward: timed too.
    from eqxnorm.kernels import _mosaic_gpu

    if smem is not None:
        monkeypatch.setattr(_mosaic_gpu, "SMEM_BYTES", smem)
    monkeypatch.setenv(_tuning.ENV, str(tmp_path / "tuning.json"))
    usable = _mosaic_gpu.usable()
    args = tune.operands(op, shape, jnp.bfloat16)
    assert _backends(op, args) == {default if usable else "triton"}  # untuned
    both = tune.kernel_impls("cuda")
    assert set(both) == ({"triton", "mosaic_gpu"} if usable else {"triton"})
    for faster in both:  # each measured faster in turn
        timer = _faster({impl: 0.1 if impl == faster else 0.2 for impl in both})
        found = tune.tune([op], [shape], ["bfloat16"], timer=timer, impls=both)
        assert {k.split("|")[1] for k in found} == set(both)
        assert all(f"|{op}|bfloat16|" in k for k in found)
        assert _backends(op, args) == {faster}


def test_auto_takes_xla_only_where_faster_than_every_backend(tmp_path, monkeypatch):
    # `impl="auto"` on a GPU: Mosaic GPU measured at 0.1, Triton at 0.2 and XLA between them
    # runs Mosaic GPU (where JAX has it: else XLA, faster than Triton); XLA faster than both,
    # XLA.
    from eqxnorm.kernels import _mosaic_gpu

    monkeypatch.setenv(_tuning.ENV, str(tmp_path / "tuning.json"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setitem(tune.IMPLEMENTATIONS, "auto", _dispatch.implementation("auto"))
    args = tune.operands("layer_norm", (37, 760), jnp.bfloat16)
    both = tune.kernel_impls("cuda")
    for xla, expected in ((0.15, {"mosaic_gpu"} if _mosaic_gpu.usable() else set()), (0.05, set())):
        timer = _faster({"triton": 0.2, "mosaic_gpu": 0.1}, xla)
        tune.tune(["layer_norm"], [(37, 760)], ["bfloat16"], timer=timer, impls=both)
        assert _backends("layer_norm", args, "auto") == expected


# A shape of each op's form: rows of features; adaLN's examples of tokens; QK-norm's tokens of
# heads; GroupNorm's and BatchNorm's batch of channels of an image.
_SHAPES = {2: (37, 128), 3: (2, 37, 128), 4: (2, 64, 4, 4)}


@pytest.mark.parametrize("op", list(tune.OPS))
def test_every_kernel_family_is_tuned_under_its_own_key(op, tmp_path):
    # Each op of `tune.OPS` (the functional API's kernel families) gets a training step on a
    # shape of its form, its XLA step runs, and its launches are keyed by its own name: gated
    # RMSNorm's, DyT's and QK-norm's no longer share one "row_norm" entry.
    spec = tune.OPS[op]
    shape = _SHAPES[4 if spec.channels else max(spec.axes)]
    assert tune.takes(op, shape) and not tune.takes(op, (5,) * 6)
    ran = []

    def timer(run, candidate):
        if candidate.impl == "reference":
            ran.append(jax.block_until_ready(run()))
            return 1.0
        return 0.5

    path = tmp_path / "tuning.json"
    found = tune.tune([op], [(8, 8, 8, 8, 8, 8), shape], ["float32"], path=path, timer=timer)
    assert len(ran) == 1 and len(ran[0]) == 1 + len(spec.operands)  # a gradient per operand
    assert found and all(k.split("|")[2] == op for k in found)
    assert {e["tuned"] for e in found.values()} == {f"{op} {'x'.join(map(str, shape))} float32"}


def test_a_backend_that_cannot_run_the_operands_is_not_tuned(capsys):
    # 1001 bf16 features are not a multiple of 16 bytes, which Mosaic GPU's TMA needs: the
    # tuner says so and tunes Triton alone, where it used to stop with the pinned backend's
    # `ValueError`.
    impls = {"triton": "triton", "mosaic_gpu": "mosaic_gpu"}
    found = tune.tune_one("layer_norm", (8, 1001), "bfloat16", timer=_timer(2.0)[0], impls=impls)
    assert [k.split("|")[1] for k in found] == ["triton"]
    printed = capsys.readouterr().out
    assert (
        "mosaic_gpu: not tuned for layer_norm 8x1001 bfloat16 (impl='mosaic_gpu' cannot" in printed
    )


def test_the_shape_and_device_arguments():
    assert tune.parse_shape("4096x1024") == (4096, 1024)
    assert tune.parse_shape("32x128X56x56") == (32, 128, 56, 56)
    for text in ("4096", "0x8", "4096x", "ax8"):
        with pytest.raises(ValueError, match=rf"positive sizes joined by 'x'.*but got '{text}'"):
            tune.parse_shape(text)
    with pytest.raises(ValueError, match="knows the ops .*but got op='instance_norm'"):
        tune.operands("instance_norm", (2, 8), jnp.float32)
    with pytest.raises(ValueError, match="batch_norm is tuned on shapes of 3 or 4 or 5 axes, "):
        tune.operands("batch_norm", (2, 8), jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"qk_norm is tuned on shapes of 3 axes, e.g. 8x256x1024, "
        r"but none of the shapes given has them \(4096x1024\); add one",
    ):
        tune.tune(["layer_norm", "qk_norm"], [(4096, 1024)], ["bfloat16"])
    assert tune.kernel_impls("cpu") == {"pallas": "interpret"}
    assert tune.kernel_impls("tpu") == {"pallas": "mosaic"}
    assert tune.kernel_impls("rocm") == {"triton": "triton"}
    assert "triton" in tune.kernel_impls("cuda")


def test_the_command_line(tmp_path, monkeypatch, capsys):
    timer = _timer(xla_seconds=0.5)[0]
    monkeypatch.setattr(tune, "wall_clock", lambda run, candidate, repeats: timer(run, candidate))
    out = tmp_path / "tuning.json"
    tune.main(["--ops", "rms_norm", "--shapes", "37x128", "--dtypes", "float32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert (
        "cpu|interpret|rms_norm|float32|64x128: heuristic 968.0000 ms, tuned 936.0000 ms" in printed
    )
    assert "XLA 500.0000 ms: XLA is faster (rms_norm 37x128 float32)" in printed
    assert "rms_norm 37x128 float32: fastest: xla (xla 500.0000 ms, interpret" in printed
    assert f"wrote 1 entries for cpu to {out}" in printed
    assert list(json.loads(out.read_text())["entries"]) == ["cpu|interpret|rms_norm|float32|64x128"]
    with pytest.raises(SystemExit):  # a shape of no op's form: refused before any timing
        tune.main(["--ops", "group_norm", "--shapes", "4096x1024", "--out", str(out)])
    assert "group_norm is tuned on shapes of 3 or 4 or 5 axes" in capsys.readouterr().err
    # `--show` tunes nothing: what the kernels read here, and what `impl="auto"` runs.
    data = json.loads(out.read_text())
    data["entries"]["cpu|interpret|dyt|float32|64x128"] = {"config": {}, "jax": jax.__version__}
    data["entries"]["NVIDIA H200|triton|dyt|float32|64x128"] = {"config": {}, "jax": "0"}
    out.write_text(json.dumps(data))
    monkeypatch.setenv(_tuning.ENV, str(out))
    monkeypatch.setattr(tune, "tune", None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # where `impl="auto"` chooses
    tune.main(["--show"])
    shown = capsys.readouterr().out
    assert "rms_norm 37x128 float32: impl='auto' runs xla (xla 500.0000 ms, interpret" in shown
    assert "cpu|interpret|dyt|float32|64x128: an entry without the tuner's times" in shown
    assert "H200" not in shown and f"2 entries for cpu and JAX {jax.__version__} in {out}" in shown
    monkeypatch.undo()
    monkeypatch.setenv(_tuning.ENV, "off")
    with pytest.raises(ValueError, match="EQXNORM_TUNING_CACHE=off turns the tuning cache off"):
        tune.write({})


def test_mosaic_gpu_rows_that_could_fold_are_tuned_folded_too(tmp_path, monkeypatch):
    # 256 rows of 8192 bf16: the Mosaic GPU forward stages tiles of 4 rows (its backward folds
    # them already, beside its partials). The tuner also times the forward's rows folded, one
    # a program (`_tuning.FOLD`), and the cache then asks the staging for them.
    from eqxnorm.kernels import _mosaic_gpu, _row_norm_mosaic_gpu

    if not _mosaic_gpu.usable():
        assert tune.kernel_impls("gpu") == {"triton": "triton"}
        return
    seen = []

    def timer(run, candidate):  # folded rows measure fastest
        seen.append(candidate.label)
        rows = [fields["block_rows"] for fields in candidate.configs.values()]
        return 2.0 if candidate.impl == "reference" else 1.0 - 0.5 * (1 in rows)

    impls = {"mosaic_gpu": "mosaic_gpu"}
    found = tune.tune_one("layer_norm", (256, 8192), "bfloat16", timer=timer, impls=impls)
    assert "mosaic_gpu rows×folded warps×1" in seen
    key = "cpu|mosaic_gpu|layer_norm|bfloat16|256x8192"
    assert found[key]["config"] == {"block_rows": 1}
    x = jnp.zeros((1, 256, 8192), jnp.bfloat16)
    w = x[0, 0]
    launch = _tuning.Launch("layer_norm", "bfloat16")
    with _tuning.launching(launch):
        assert not _row_norm_mosaic_gpu.forward_boxes(x, None, w, w).folded
        with _tuning.pinned({key: found[key]["config"]}):
            boxes = _row_norm_mosaic_gpu.forward_boxes(x, None, w, w)
    assert boxes.folded and boxes.block_rows == 1 and boxes.chunks == 16
