"""The benchmark CLI (`python -m benchmarks`): a smoke run of every CPU contender on tiny shapes
in a subprocess, as the README runs it, plus the byte and residual counting, the target
verdicts and the flag errors, in-process. No test judges a timing: the targets are the
benchmark's own summary."""

import csv
import importlib.util
import json
import math
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench_support import ROOT, load_benchmarks

load_benchmarks()
from benchmarks import _blocks, _cli, _contenders, _ops, _report, _runner, _timing  # noqa: E402

HAS_FLAX = importlib.util.find_spec("flax") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
OPS = ("layer_norm", "add_rms_norm", "batch_norm")
SHAPES = {"layer_norm": "64x128", "add_rms_norm": "64x128", "batch_norm": "4x8x4x4"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CLI run: three ops (a row norm, a fused op, a channel op) on one tiny shape each,
    every contender that runs on CPU (torch.compile too, which the CPU default leaves out),
    two samples."""
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--ops",
        ",".join(OPS),
        "--shapes",
        "64x128,4x8x4x4",
        "--impls",
        "reference,xla-unfused,module,eqx,flax,torch,torch.compile,copy",
        "--dtypes",
        "float32",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    return done, out, rows


def test_cli_runs_every_cpu_contender(smoke):
    done, _, rows = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Targets (issues 5, 6, 16 and 17)" in done.stdout
    assert "done" in done.stderr  # the progress bar finished
    expected = {"reference", "module", "eqx", "flax", "torch", "torch.compile", "copy"}
    for op in OPS:
        impls = {r["impl"] for r in rows if r["op"] == op}
        assert impls == expected | ({"xla-unfused"} if op == "add_rms_norm" else set()), op
        for direction in _ops.DIRECTIONS:
            here = [r for r in rows if r["op"] == op and r["direction"] == direction]
            assert {r["shape"] for r in here} == {SHAPES[op]}
    always = {"reference", "xla-unfused", "module", "eqx", "copy"}
    always |= {name for name, there in (("flax", HAS_FLAX), ("torch", HAS_TORCH)) if there}
    for r in rows:
        if r["impl"] in always:
            assert r["status"] == "ok", r
        else:  # torch.compile needs a C++ compiler; a missing library is named
            assert r["status"] in ("ok", "skipped") and (r["status"] == "ok" or r["note"]), r
    if not HAS_FLAX:
        assert all("Flax is not installed" in r["note"] for r in rows if r["impl"] == "flax")
    if not HAS_TORCH:
        assert all("PyTorch is not installed" in r["note"] for r in rows if r["impl"] == "torch")


def test_csv_rows_are_complete(smoke):
    _, _, rows = smoke
    assert tuple(rows[0]) == _report.COLUMNS
    for r in (r for r in rows if r["status"] == "ok"):
        ms, gbps, nbytes = float(r["ms"]), float(r["gbps"]), int(r["bytes"])
        assert ms > 0 and float(r["ms_min"]) > 0 and float(r["compile_s"]) > 0
        assert math.isclose(gbps, nbytes / (ms * 1e-3) / 1e9, rel_tol=1e-3)
        assert r["device"] == "cpu"
        assert float(r["pct_copy"]) > 0 and float(r["speedup"]) > 0
        if r["impl"] == "reference":
            assert float(r["speedup"]) == 1
        if r["impl"] == "copy":
            assert float(r["pct_copy"]) == 100 and r["residual_bytes"] == ""
        else:
            op, shape = _ops.OPS[r["op"]], _ops.parse_shape(r["shape"])
            x_bytes = _ops.make_problem(op, shape, r["dtype"]).x.nbytes
            assert int(r["residual_bytes"]) > 0
            assert math.isclose(
                float(r["residual_ratio"]), int(r["residual_bytes"]) / x_bytes, rel_tol=1e-4
            )


def test_json_summary_and_plots(smoke):
    _, out, rows = smoke
    document = json.loads((out / "results.json").read_text())
    env = document["environment"]
    assert env["backend"] == "cpu" and env["jax"] == jax.__version__
    assert {"jaxlib", "equinox", "flax", "torch", "date", "device", "python"} <= set(env)
    assert document["command"].startswith("python -m benchmarks --ops")
    assert len(document["rows"]) == len(rows)
    assert document["settings"]["repeats"] == 2
    statuses = {t["status"] for t in document["targets"]}
    assert statuses <= {"MET", "MISSED", "TOO NOISY", "NOT MEASURED"}
    cpu = [t for t in document["targets"] if t["platform"] == "cpu"]
    # The CPU targets are judged here (eqx.nn and the module path were both measured), each
    # with the confidence interval of its two paired rounds.
    assert {t["status"] for t in cpu} <= {"MET", "MISSED", "TOO NOISY"} and len(cpu) == 3 * len(OPS)
    assert all("95% CI" in t["measured"] for t in cpu if "residuals" not in t["target"])
    assert all(len(r["samples_ms"]) == 2 for r in document["rows"] if r["status"] == "ok")
    gpu = [t for t in document["targets"] if t["platform"] == "gpu"]
    assert gpu and all(t["status"] == "NOT MEASURED" for t in gpu)
    summary = (out / "summary.md").read_text()
    assert "## Targets" in summary and "layer_norm fwd >= 1.0x eqx.nn" in summary
    if HAS_MATPLOTLIB:
        for op in OPS:
            png = out / f"{op}_float32.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pallas_on_cpu_warns_and_list_lists(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--impls", "pallas,reference", "--ops"]
    command += ["rms_norm", "--shapes", "16x128", "--dtypes", "float32", "--direction", "fwd"]
    done = subprocess.run(
        [*command, "--repeats", "1", "--no-plots", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Pallas kernels run in interpret mode" in done.stderr
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert [(r["impl"], r["status"]) for r in rows] == [("pallas", "ok"), ("reference", "ok")]
    assert "interpret mode" in rows[0]["note"] and not list(tmp_path.glob("*.png"))
    listed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"], cwd=ROOT, capture_output=True, text=True
    )
    assert listed.returncode == 0
    for name in (*_ops.OPS, *_contenders.CONTENDERS, "--quick", "--full"):
        assert name in listed.stdout


def test_interrupted_run_reports_what_it_finished(tmp_path, monkeypatch):
    # Stopped (SIGTERM from `timeout` on a lent GPU, or Ctrl-C) during its second case, the
    # run still writes the first case's rows, marked incomplete, and exits 130.
    run, calls = _runner.Runner.run, []

    def interrupted(self, case, progress):
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run(self, case, progress)

    monkeypatch.setattr(_runner.Runner, "run", interrupted)
    args = ["--ops", "rms_norm", "--shapes", "16x128,32x128", "--impls", "reference"]
    args += ["--dtypes", "float32", "--direction", "fwd", "--repeats", "1", "--no-plots"]
    assert _cli.main([*args, "--blocks", "none", "--out", str(tmp_path)]) == 130
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["settings"]["interrupted"] == "interrupted after 1 of 2 cases"
    assert [r["shape"] for r in document["rows"]] == ["16x128"]
    assert "Incomplete run" in (tmp_path / "summary.md").read_text()


def test_gpu_profile_runs_each_backend(capsys):
    # The `ncu` target of the GPU runbook; on CPU the Mosaic GPU kernels run in its
    # interpreter.
    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks/gpu_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--shape", "8x256", "--warmup", "0", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "layer_norm 8x256 bfloat16 mosaic_gpu",
        "layer_norm 8x256 bfloat16 triton",
    ]
    # On a JAX without Mosaic GPU's API, its line says why it did not run.
    from eqxnorm.kernels import _mosaic_gpu

    assert ("not run" in lines[0]) == (not _mosaic_gpu.usable()) and "ms (median)" in lines[1]
    with pytest.raises(SystemExit):
        module.main(["--shape", "4096"])


# --- byte and residual counting ------------------------------------------------------------


def test_bytes_layer_norm():
    problem = _ops.make_problem(_ops.OPS["layer_norm"], (64, 128), "bfloat16")
    x, p = 64 * 128 * 2, 128 * 2  # bfloat16: 2 bytes
    assert problem.x.nbytes == x
    assert _ops.op_bytes(problem, "fwd") == 2 * x + 2 * p  # read x, w, b; write y
    assert _ops.op_bytes(problem, "bwd") == 3 * x + 3 * p  # read x, w, dy; write dx, dw, db
    assert _ops.op_bytes(problem, "fwd+bwd") == 5 * x + 5 * p


def test_bytes_fused_and_adaptive():
    add = _ops.make_problem(_ops.OPS["add_layer_norm"], (64, 128), "float32")
    x, p = 64 * 128 * 4, 128 * 4
    assert _ops.op_bytes(add, "fwd") == 4 * x + 2 * p  # read x, r, w, b; write y, h
    assert _ops.op_bytes(add, "bwd") == 4 * x + 3 * p  # read h, w, dy, dh; write dx, dw, db
    ada = _ops.make_problem(_ops.OPS["adaptive_layer_norm"], (512, 128), "float32")
    assert ada.x.shape == (2, 256, 128)  # 256 tokens per example
    m = 2 * 128 * 4  # one scale (or shift) per example
    assert _ops.op_bytes(ada, "fwd") == 2 * 512 * 128 * 4 + 2 * m
    assert _ops.op_bytes(ada, "bwd") == 3 * 512 * 128 * 4 + 3 * m
    batch = _ops.make_problem(_ops.OPS["batch_norm"], (4, 64, 8, 8), "float32")
    assert batch.groups == 32 and batch.width == 64 and batch.rows == 4 * 64
    assert _ops.op_bytes(batch, "fwd") == 2 * batch.x.nbytes + 2 * 64 * 4


def test_same_inputs_for_jax_and_torch():
    pytest.importorskip("torch")
    problem = _ops.make_problem(_ops.OPS["layer_norm"], (8, 16), "bfloat16")
    again = _ops.make_problem(_ops.OPS["layer_norm"], (8, 16), "bfloat16")
    assert np.array_equal(problem.x, again.x)
    tensors, cts = _contenders._torch_tensors(problem, _contenders.torch_device())
    as_float = tensors["x"].detach().float().numpy()
    assert np.array_equal(as_float, np.asarray(jnp.asarray(problem.x), np.float32))
    assert np.array_equal(cts[0].float().numpy(), problem.cotangents[0].astype(np.float32))


@jax.custom_vjp
def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + 1e-5)


def _rms_fwd(x):
    rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=1, keepdims=True) + 1e-5)
    return x * rstd, (x, rstd, x)  # x twice: counted once


def _rms_bwd(residuals, g):
    _, rstd, _ = residuals
    return (g * rstd,)


_rms.defvjp(_rms_fwd, _rms_bwd)


def test_jax_residual_bytes():
    x = jnp.ones((32, 16), jnp.float32)
    # A backward that keeps x and one float32 per row: the target's ideal.
    kept = _timing.jax_residual_bytes(lambda a: (_rms(a["x"]),), {"x": x})
    assert kept == x.nbytes + 32 * 4
    assert _timing.jax_residual_bytes(lambda a: (jnp.sin(a["x"]),), {"x": x}) == x.nbytes
    assert _timing.jax_residual_bytes(lambda a: (2 * a["x"],), {"x": x}) == 0


def test_torch_residual_bytes():
    pytest.importorskip("torch")
    problem = _ops.make_problem(_ops.OPS["layer_norm"], (32, 16), "float32")
    case = _contenders.torch_build(problem)
    # F.layer_norm saves x, weight, bias, and a float32 mean and rstd per row.
    assert _timing.torch_residual_bytes(case) == problem.x.nbytes + 2 * 16 * 4 + 2 * 32 * 4


# --- verdicts ----------------------------------------------------------------------------


def _rows(impl, direction, ms, **extra):
    row = dict.fromkeys(_report.COLUMNS)
    row.update(
        op="layer_norm",
        impl=impl,
        shape="4096x1024",
        dtype="bfloat16",
        device="x",
        direction=direction,
        ms=ms,
        bytes=10**9,
        gbps=1 / ms,
        rows=4096,
        width=1024,
        status="ok",
        note="",
    )
    row.update(extra)
    return row


def test_derived_columns_and_targets():
    rows = [
        _rows("copy", "fwd", 1.0),
        _rows("pallas", "fwd", 1.05, residual_ratio=1.01),
        _rows("reference", "fwd", 2.0, residual_ratio=2.0),
        _rows("copy", "fwd+bwd", 1.0),
        _rows("pallas", "fwd+bwd", 1.4),
        _rows("reference", "fwd+bwd", 2.0),
        _rows("eqx", "fwd", 1.9),
        _rows("eqx", "fwd+bwd", 2.1),
    ]
    _report.fill_derived(rows)
    assert rows[1]["pct_copy"] == pytest.approx(100 / 1.05)
    assert rows[1]["speedup"] == pytest.approx(2.0 / 1.05)
    gpu = {r.target: r for r in _report.evaluate_targets(rows, "gpu", "pallas")}
    fwd = gpu["layer_norm fwd >= 90% of copy (bf16, widths 1024-16384)"]
    assert fwd.status == "MET" and "95.24%" in fwd.measured
    both = gpu["layer_norm fwd+bwd >= 80% of copy (bf16, widths 1024-16384)"]
    assert both.status == "MISSED" and "71.43%" in both.measured
    assert (
        gpu["layer_norm fwd+bwd >= 1.5x the XLA reference (bf16, widths 1024-16384)"].status
        == "MISSED"
    )
    liger = "layer_norm no slower than Liger-Kernel (bf16, widths 1024-16384, every direction)"
    assert gpu[liger].status == "NOT MEASURED"
    assert all(r.status == "NOT MEASURED" for r in gpu.values() if r.platform == "cpu")

    cpu = {r.target: r for r in _report.evaluate_targets(rows, "cpu", "reference")}
    # No module rows: the CPU speed targets are judged on the module path only.
    assert cpu["layer_norm fwd >= 1.0x eqx.nn (module under vmap, impl='auto')"].status == (
        "NOT MEASURED"
    )
    residuals = cpu["layer_norm residuals kept for the backward <= 1.05x the input (impl='auto')"]
    assert residuals.status == "MISSED" and "2.00x" in residuals.measured


def _timed(impl, direction, samples, op="layer_norm", shape="2048x1024"):
    return _rows(
        impl, direction, statistics.median(samples), samples_ms=samples, op=op, shape=shape
    )


@pytest.mark.parametrize(
    "eqx_samples, verdict",
    [
        ([2.0, 2.1, 2.0, 2.1, 2.0, 2.1], "MET"),  # 2.0x, tight
        ([1.0, 1.05, 1.0, 1.05, 1.0, 1.05], "MISSED"),  # 1.0x, tight
        ([1.2, 3.0, 1.1, 2.9, 1.3, 3.1], "TOO NOISY"),  # about 2x, the interval spans 1.2x
    ],
)
def test_verdict_from_the_confidence_interval(eqx_samples, verdict):
    module = [1.0] * 6
    rows = [_timed("module", "fwd+bwd", module), _timed("eqx", "fwd+bwd", eqx_samples)]
    rows += [_timed("module", "fwd", module), _timed("eqx", "fwd", module)]
    cpu = {r.target: r for r in _report.evaluate_targets(rows, "cpu", "reference")}
    result = cpu["layer_norm fwd+bwd >= 1.2x eqx.nn (module under vmap, impl='auto')"]
    assert result.status == verdict and "95% CI" in result.measured
    interval = _report.ratio_interval([(rows[0], rows[1])])
    assert interval.low <= interval.mean <= interval.high and interval.rounds == 6
    same = cpu["layer_norm fwd >= 1.0x eqx.nn (module under vmap, impl='auto')"]
    assert same.status == "MET"  # exactly 1.0x with no spread: at the threshold
    assert "1.00x (95% CI 1.00-1.00" in same.measured


def test_interval_pools_cases_and_needs_two_rounds():
    pairs = [
        (_timed("module", "fwd", [1.0, 1.0, 1.1]), _timed("eqx", "fwd", [2.0, 2.2, 2.2])),
        (_timed("module", "fwd", [1.0, 1.0]), _timed("eqx", "fwd", [1.0, 1.1])),
    ]
    interval = _report.ratio_interval(pairs)
    assert interval.cases == 2 and interval.rounds == 5
    assert 1.3 < interval.mean < 1.6  # between the cases' 2x and 1.05x
    assert _report.ratio_interval([(pairs[0][0], _timed("eqx", "fwd", [2.0]))]) is None


def test_rounds_alternate_abba():
    assert _runner.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert _runner.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    order = []

    class Timer:
        def __init__(self, name):
            self.name = name

        def sample(self):
            order.append(self.name)
            if self.name == "c" and order.count("c") == 2:
                raise RuntimeError("boom")

    failures = []
    timers = {n: Timer(n) for n in "abc"}
    _runner.take_samples(timers, 3, lambda name, error: failures.append(name))
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b"]
    assert failures == ["c"] and set(timers) == {"a", "b"}


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "adaptive_layer_norm"])
def test_copy_moves_the_ops_arrays_once(op):
    shape = (512, 128)
    for direction in _ops.DIRECTIONS:
        reads, writes = _ops.case_arrays(_ops.OPS[op], shape, direction)
        nbytes = sum(math.prod(s) for s in (*reads, *writes)) * 4
        assert nbytes == _ops.case_bytes(_ops.OPS[op], shape, "float32", direction)
        outputs = _timing.copy_callable(reads, writes, "float32", 1)(0)
        assert [o.shape for o in outputs] == [tuple(s) for s in writes]
    reads, writes = _ops.case_arrays(_ops.OPS["add_layer_norm"], shape, "fwd")
    assert reads == [shape, shape, (128,), (128,)] and writes == [shape, shape]


def test_blocks_time_a_training_step_per_library():
    # The conv block alone (the transformer's compiles would double the time), tiny.
    rows = _blocks.run(("conv",), repeats=2, warmup=0, shapes={"conv": (2, 4, 4, 4)})
    measured = {r["impl"] for r in rows if r["status"] == "ok"}
    assert measured == {"eqxnorm", "eqx"} | ({"flax"} if HAS_FLAX else set())
    for r in rows:
        assert r["op"] == "conv_block" and r["direction"] == "step"
        assert r["status"] != "ok" or len(r["samples_ms"]) == 2
    cpu = {t.target: t for t in _report.evaluate_targets(rows, "cpu", "reference")}
    assert cpu["conv_block training step >= 1.1x eqx.nn"].status != "NOT MEASURED"


def test_default_output_is_ignored_by_git():
    out = _cli.default_out()
    assert out.is_relative_to(ROOT / "benchmarks" / "results" / "local")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(out / "results.csv")], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0


# --- flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--ops", "layer_norm,nope"], "valid choices: layer_norm, rms_norm, group_norm"),
        (["--direction", "sideways"], "valid choices: fwd, bwd, fwd+bwd"),
        (["--impls", "numba"], "valid choices: pallas, reference, pallas-unfused"),
        (["--dtypes", "int8"], "valid choices: float32, bfloat16, float16"),
        (["--shapes", "4096"], "is not a shape"),
        (["--repeats", "0"], "expected an integer >= 1"),
        (["--quick", "--full"], "not allowed with argument"),
    ],
)
def test_bad_flags(argv, names, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert names in capsys.readouterr().err


def test_defaults_and_several_directions():
    args = _cli.parse_args(["--direction", "fwd", "fwd+bwd,fwd"])
    assert args.direction == ("fwd", "fwd+bwd")
    assert args.suite == "quick" and args.ops == tuple(_ops.OPS)
    cpu = _contenders.default_contenders("cpu")
    assert cpu == ("reference", "xla-unfused", "module", "eqx", "flax", "torch", "copy")
    assert args.blocks == _blocks.BLOCKS  # the training steps too, unless --ops is given
    assert _cli.parse_args(["--ops", "rms_norm"]).blocks == ()
    assert _contenders.default_contenders("gpu") == tuple(_contenders.CONTENDERS)
    full = _cli.parse_args(["--full"])
    assert "4096x262144" in map(_ops.format_shape, full.shapes) and "bfloat16" in full.dtypes


# --- issue 17: the peers and the deviceless table ---------------------------------------------


def test_peer_targets_judge_each_peer_by_its_interval():
    ours = [1.0, 1.02, 1.0, 1.02]
    rows = [_timed("pallas", "fwd+bwd", ours, shape="4096x1024")]
    rows += [_timed("torch.compile", "fwd+bwd", [1.5, 1.52, 1.5, 1.52], shape="4096x1024")]
    rows += [_timed("tokamax", "fwd+bwd", [0.8, 0.81, 0.8, 0.81], shape="4096x1024")]
    small = dict(shape="64x1024", rows=64, samples_ms=[9.0, 9.0])
    rows += [_rows("pallas", "fwd+bwd", 9.0, **small), _rows("eqx", "fwd+bwd", 9.0, **small)]
    gpu = {r.target: r for r in _report.evaluate_targets(rows, "gpu", "pallas")}
    compiled = gpu["layer_norm training step no slower than torch.compile (bf16)"]
    assert compiled.status == "MET" and compiled.measured.startswith("1.50x (95% CI")
    assert gpu["layer_norm training step no slower than tokamax (bf16)"].status == "MISSED"
    # 64 rows are no GPU-sized case: no eqx.nn line.
    assert not any("eqx.nn (bf16)" in t for t in gpu)
    cpu = {r.target: r for r in _report.evaluate_targets(rows, "cpu", "pallas")}
    assert cpu["layer_norm training step no slower than tokamax (bf16)"].status == "NOT MEASURED"


def _deviceless(op, program_bytes, others=1, **overrides):
    """A deviceless row of `op` on 4096x1024 bf16 (training step): its program's bytes over
    an ideal of 100, `others` XLA launches beside its kernels, one Triton kernel."""
    name = f"eqxnorm_{op}_fwd"
    kernel = dict(name=name, spill_bytes=0, occupancy=0.5, dram_bytes=100, access_bytes=100)
    kernel |= overrides
    launches = [{"name": name}] + [{"name": f"loop_fusion_{i}"} for i in range(others)]
    return {
        "case": {"op": op, "shape": "4096x1024", "dtype": "bfloat16", "direction": "fwd+bwd"},
        "ideal_bytes": 100,
        "program": {"bytes": program_bytes, "launches": launches, "problems": []},
        "kernels": [kernel],
    }


def test_static_targets_from_a_deviceless_table(tmp_path):
    """Issue 17's static lines are the deviceless check's verdicts, one per target."""
    table = [
        _deviceless("layer_norm", 104),
        _deviceless("rms_norm", 140, others=2, occupancy=0.375, spill_bytes=8, access_bytes=150),
        {
            "case": {
                "op": "layer_norm",
                "shape": "8x128",
                "dtype": "bfloat16",
                "direction": "fwd",
                "target": "tpu-v5e",
            },
            "problems": [],
        },
    ]
    mosaic = {"name": "eqxnorm_add_rms_norm_fwd_mosaic_gpu_kernel", "spill_bytes": 0}
    table.append(_deviceless("add_rms_norm", 100, others=0) | {"mosaic_gpu": [mosaic]})
    (tmp_path / "results.json").write_text(json.dumps(table))
    loaded = _report.load_deviceless([tmp_path, tmp_path / "absent"])
    results = {r.target: r for r in _report.static_targets(loaded)}
    rms = "rms_norm 4096x1024 bfloat16 fwd+bwd"
    assert {t: (r.status, r.measured) for t, r in results.items()} == {
        "compiles without a problem": ("MET", "all 3 met"),
        "bytes <= 1.05x ideal": ("MISSED", f"1 of 3 miss: {rms}: 1.400x"),
        "XLA launches beside the kernels <= 1": ("MISSED", f"1 of 3 miss: {rms}: 2"),
        "no spill": ("MISSED", f"1 of 4 miss: {rms} eqxnorm_rms_norm_fwd: 8 B"),
        "occupancy >= 50%": ("MISSED", f"1 of 3 miss: {rms} eqxnorm_rms_norm_fwd: 38%"),
        "each byte moved once": ("MISSED", f"1 of 3 miss: {rms} eqxnorm_rms_norm_fwd: 1.50x"),
    }
    met = _report.static_targets([table[0]])
    assert {r.status for r in met} == {"MET"} and met[0].measured == "all 1 met"
    text = _report.targets_text(list(results.values()))
    assert "issues 5, 6, 16 and 17" in text and "\n  MISSED       bytes <= 1.05x ideal" in text


def test_tokamax_is_skipped_off_a_gpu_with_the_reason():
    assert _contenders.CONTENDERS["tokamax"].check() == (
        "tokamax's normalization kernel is Triton: GPU only"
    )
    assert "tokamax" in _contenders.CPU_OPT_IN
    assert "torch.compile" in _contenders.CONTENDERS


def test_mosaic_gpu_contender_needs_jax_0_12():
    # The Mosaic GPU kernels pinned (the row norms' are not what `impl="auto"` runs on a
    # GPU): opt-in on CPU, where they are interpreted; skipped with the reason on JAX < 0.12.
    from eqxnorm.kernels import _mosaic_gpu

    assert "mosaic_gpu" in _contenders.CPU_OPT_IN
    reason = _contenders.CONTENDERS["mosaic_gpu"].check()
    if _mosaic_gpu.usable():
        assert reason is None
    else:
        assert reason == f"the Mosaic GPU kernels need JAX 0.12+ (this is {jax.__version__})"
