"""eqxnorm across several processes with JAX's own distributed runtime, as on a multi-host GPU or
TPU cluster: 2 and then 4 local processes (`tests/multiprocess_worker.py`) join
`jax.distributed.initialize` on loopback, 8 CPU devices in all, CPU collectives over gloo.
Each run is compared with a single-process run of the same global batch (the reference on
unsharded arrays, in this process):

- BatchNorm statistics pooled across every process, under a batch-sharded `jit` and inside a
  `shard_map` over the global mesh (the layer, its `axis_name` naming the device axis);
- batch-sharded LayerNorm (Auto and Explicit meshes) and GroupNorm: outputs and gradients,
  with no all-gather in the compiled program and the parameter gradients all-reduced once;
- tensor-parallel LayerNorm, its features split across the processes' devices.

With `impl="reference"` and `impl="pallas"` (interpreted on CPU; the 4-process launch runs
the kernels on their three distinct sharded paths only, see `LAUNCHES`). One launch per
process count runs all its checks; each launch is bounded in time, and on failure or timeout
every worker is killed and the test fails with each one's exit status and stderr. A last
test runs the README's multi-process script in 2 processes.

Each process's share of the 8 devices: 4 each for 2 processes, 2 each for 4. The coordinator
listens on 127.0.0.1 only; gloo connects the processes at the address the host name
resolves to (JAX 0.10 offers no setting for it), loopback on CI's machines."""

import functools
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import kernel_support as ks
import markdown_support
import multiprocess_worker as worker

WORKER = Path(worker.__file__)
_EVERY_CASE = [(name, impl) for impl in ("reference", "pallas") for name in worker.CHECKS]
# The cases each launch runs, by its number of processes. 4 processes share 2 CPU cores, so
# the kernels, interpreted and compiled once in each process, run there only on the three
# distinct sharded paths: `custom_partitioning` (Auto mesh), `shard_map` (Explicit mesh),
# and inside the user's `shard_map` (BatchNorm pooled). The other kernel cases go through the
# same machinery on other kernels, which the 2-process launch covers.
LAUNCHES = {
    2: _EVERY_CASE,
    4: [
        *((name, "reference") for name in worker.CHECKS),
        ("layer_norm_jit", "pallas"),
        ("layer_norm_jit_explicit", "pallas"),
        ("batch_norm_shard_map", "pallas"),
    ],
}
# Seconds for one launch: 10-20 s for 4 processes on 2 idle cores, compilation included.
LAUNCH_TIMEOUT = 240
# Batch-sharded checks: each example normalized on its own device, so the only collective
# of the compiled step is the sum of the parameter gradients.
BATCH_SHARDED = ("layer_norm_jit", "layer_norm_jit_explicit", "group_norm_jit")


# Runs a script (`python -c _BOUNDED SECONDS SCRIPT ARGS...`) as `python SCRIPT ARGS...` would,
# ended by SIGALRM after SECONDS: no worker outlives its test, even one whose pytest process
# was killed before it could kill the workers.
_BOUNDED = """import runpy, signal, sys
signal.alarm(int(sys.argv.pop(1)))
del sys.argv[0]
sys.path[0] = sys.argv[0].rpartition("/")[0]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
ALARM = LAUNCH_TIMEOUT + 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(processes: int, argv, out: Path) -> list[str]:
    """Runs `argv(process_id, coordinator)` in `processes` processes until all have exited
    with status 0 (see `_wait`); their standard outputs."""
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workers = []
    for process_id in range(processes):
        stdout = open(out / f"process{process_id}.stdout", "w+")
        stderr = open(out / f"process{process_id}.stderr", "w+")
        command = [sys.executable, "-c", _BOUNDED, str(ALARM), *argv(process_id, coordinator)]
        popen = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
        workers.append((popen, stdout, stderr))
    outputs = []
    try:
        _wait([(popen, stderr) for popen, _, stderr in workers], time.monotonic() + LAUNCH_TIMEOUT)
    finally:
        for popen, stdout, stderr in workers:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
            stdout.seek(0)
            outputs.append(stdout.read())
            stdout.close()
            stderr.close()
    return outputs


def _run_workers(processes: int, out: Path) -> list[dict]:
    """The launch's cases (`LAUNCHES`) in `processes` processes; one dict of results each."""

    def argv(process_id, coordinator):
        return [
            str(WORKER),
            f"--coordinator={coordinator}",
            f"--processes={processes}",
            f"--process-id={process_id}",
            "--cases=" + ",".join(f"{name}:{impl}" for name, impl in LAUNCHES[processes]),
            f"--out={out / f'worker{process_id}.pkl'}",
        ]

    _launch(processes, argv, out)
    results = []
    for process_id in range(processes):
        with open(out / f"worker{process_id}.pkl", "rb") as file:
            results.append(pickle.load(file))
    return results


_GLOO_PIECES = re.compile(
    r"\[Gloo\] Rank | is connected to | peer ranks\. Expected number of connected peer ranks is : "
)
_GLOO_COUNT = re.compile(r"[\d\s]*")


def _without_gloo(output: str) -> list[str]:
    """The lines of `output` but gloo's connection messages (on stdout and stderr). Gloo writes
    each in pieces ("[Gloo] Rank ", the rank, " is connected to ", a count, " peer ranks.
    Expected ... is : ", a count and the newline), which its threads can interleave: "... ranks
    is : [Gloo] Rank 5 is connected ... is : 7", then "7"; "[Gloo] Rank 3[Gloo] Rank 2 is
    connected ...", later " is connected ...". The text pieces are cut wherever they stand,
    then the lines left holding only numbers; gloo connects before anything runs, so no number
    lands inside a printed line."""
    lines = _GLOO_PIECES.sub("", output).splitlines()
    return [line for line in lines if not _GLOO_COUNT.fullmatch(line)]


def _wait(workers, deadline: float) -> None:
    """Returns when every worker has exited with status 0; fails, with every worker's stderr,
    as soon as one exits with another status (its peers would wait for it until their own
    timeouts) or at `deadline`."""
    while time.monotonic() < deadline:
        codes = [popen.poll() for popen, _ in workers]
        if all(code == 0 for code in codes):
            return
        if any(code not in (None, 0) for code in codes):
            break
        time.sleep(0.1)
    reports = []
    for process_id, (popen, stderr) in enumerate(workers):
        code = popen.poll()
        status = "still running, killed" if code is None else f"exit status {code}"
        stderr.seek(0)
        lines = _without_gloo(stderr.read())
        reports.append(f"--- worker {process_id} ({status}), stderr:\n" + "\n".join(lines[-40:]))
    timed_out = time.monotonic() >= deadline
    reason = f"did not finish within {LAUNCH_TIMEOUT} s" if timed_out else "failed"
    pytest.fail(f"A multi-process run of {len(workers)} workers {reason}.\n" + "\n".join(reports))


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """`launches(processes)`: the results of the launch in that many processes, launched on
    first use; a failed launch fails every test that uses it, without launching again."""
    outcomes = {}

    def results(processes):
        if processes not in outcomes:
            try:
                out = tmp_path_factory.mktemp(f"multiprocess{processes}")
                outcomes[processes] = (True, _run_workers(processes, out))
            except pytest.fail.Exception as failure:
                outcomes[processes] = (False, str(failure))
        succeeded, value = outcomes[processes]
        if not succeeded:
            pytest.fail(value, pytrace=False)
        return value

    return results


@functools.cache
def _expected(name):
    return jax.tree.leaves(worker.expected(name))


def _assemble(results, key, leaf, like):
    """Output `leaf` of check `key`, put together from the pieces every process holds."""
    whole = np.full(like.shape, np.nan)
    for result in results:
        for index, piece in result[key][0][leaf]:
            whole[index] = piece
    assert not np.isnan(whole).any(), f"{key} output {leaf}: some elements are on no process"
    return whole


def _cases(names=None):
    """`(processes, name, impl)` of every case the launches run (of the checks `names`)."""
    return [
        pytest.param(processes, name, impl, id=f"{processes}processes-{name}-{impl}")
        for processes, cases in LAUNCHES.items()
        for name, impl in cases
        if names is None or name in names
    ]


@pytest.mark.parametrize(
    "processes, name, impl",
    _cases(),
)
def test_equals_single_process(launches, processes, name, impl):
    run = launches(processes)
    expected = _expected(name)
    for leaf, like in enumerate(expected):
        actual = _assemble(run, (name, impl), leaf, like)
        if np.issubdtype(like.dtype, np.floating):
            ks.assert_matches(actual.astype(like.dtype), like)
        else:
            np.testing.assert_array_equal(actual, like)


@pytest.mark.parametrize(
    "processes, name, impl",
    _cases(),
)
def test_nothing_is_gathered(launches, processes, name, impl):
    run = launches(processes)
    # Every process's program; the same program in each (SPMD).
    for result in run:
        assert result[name, impl][1].get("all-gather", []) == []


@pytest.mark.parametrize(
    "processes, name, impl",
    _cases(BATCH_SHARDED),
)
def test_parameter_gradients_are_all_reduced_once(launches, processes, name, impl):
    run = launches(processes)
    # One all-reduce (the weight and bias gradients together); the values are checked above,
    # so they are summed once, not once per process or per device.
    collectives = run[0][name, impl][1]
    assert set(collectives) == {"all-reduce"}, collectives
    assert len(collectives["all-reduce"]) == 1, collectives["all-reduce"]


def test_readme_recipe_runs(tmp_path):
    script = tmp_path / "multiprocess.py"
    script.write_text(markdown_support.titled_block(markdown_support.README, "multiprocess.py"))
    outputs = _launch(2, lambda i, coordinator: [str(script), str(i), "2", coordinator], tmp_path)
    printed = [_without_gloo(out) for out in outputs]
    assert printed[0][0] == "2 processes, 8 devices, one gradient:", outputs[0]
    assert printed[1] == [], outputs[1]


def test_gloo_messages_are_cut_however_interleaved():
    # As CI printed them: gloo's threads interleaved the pieces of four messages.
    gloo = (
        "[Gloo] Rank {0} is connected to 7 peer ranks. "
        "Expected number of connected peer ranks is : "
    )
    output = (
        f"{gloo.format(4)}7\n{gloo.format(7)}7\n{gloo.format(6)}{gloo.format(5)}7\n7\n"
        "2 processes, 8 devices, one gradient:\n[0.25 0.5 ]\n"
    )
    assert _without_gloo(output) == ["2 processes, 8 devices, one gradient:", "[0.25 0.5 ]"]
    assert _without_gloo(f"{gloo.format(1)}7\n") == []
    # And as CI printed them later: a rank's number apart from the rest of its message.
    rest = gloo.format("").removeprefix("[Gloo] Rank ")
    output = (
        f"[Gloo] Rank 3{gloo.format(2)}7\n{gloo.format(1)}7\n{rest}7\n{gloo.format(0)}7\n"
        "2 processes, 8 devices, one gradient:\n[0.25 0.5 ]\n"
    )
    assert _without_gloo(output) == ["2 processes, 8 devices, one gradient:", "[0.25 0.5 ]"]
