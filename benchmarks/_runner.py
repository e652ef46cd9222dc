"""Running the contenders on each problem, all in this process on the same inputs.

For each problem and direction, the contenders of one library are set up together (compiled,
warmed up, calibrated), then their samples are taken in rounds, one sample of each contender
per round, in the order of [`round_order`][] (A B, then B A: ABBA): on a shared machine a slow
spell then hits them alike instead of whichever ran at the time, and neither always runs
first. Each row keeps its samples (`samples_ms`, in round order), so that
`benchmarks._report` can pair the samples of one round and give each ratio a confidence
interval. When their arrays together would not fit in a quarter of the device's memory, they
run one after the other instead.
"""

import argparse
import dataclasses
import os

import jax

from . import _contenders, _ops, _report, _timing
from ._progress import Progress

# An op, a shape and a dtype: what `benchmarks._ops.make_problem` draws the arrays of.
Case = tuple[_ops.Op, tuple[int, ...], str]


@dataclasses.dataclass(frozen=True)
class _Copy:
    """The copy contender's "case": the roofline needs only the dtype."""

    dtype: str
    note: str = "the op's arrays, each read or written once"


def memory_budget() -> int:
    """A quarter of the default device's memory (the host's RAM on CPU)."""
    try:
        limit = jax.devices()[0].memory_stats()["bytes_limit"]
    except (AttributeError, KeyError, TypeError, NotImplementedError):
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return limit // 4


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order the contenders are sampled in, round `round_index`: as given in even rounds,
    reversed in odd ones (ABBA), so that no contender always follows the same one."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def take_samples(timers: dict, repeats: int, on_error) -> None:
    """`repeats` rounds of one sample per timer, in [`round_order`][]; a timer that raises is
    reported to `on_error(name, error)` and dropped."""
    for index in range(repeats):
        for name in round_order(list(timers), index):
            try:
                timers[name].sample()
            except Exception as error:
                on_error(name, error)
                del timers[name]


def row(problem: _ops.Problem, impl: str, direction: str, **fields) -> dict:
    """A result row for `problem` (see `benchmarks._report.COLUMNS`)."""
    out = dict.fromkeys(_report.COLUMNS)
    out.update(
        op=problem.op.name,
        impl=impl,
        shape=_ops.format_shape(problem.shape),
        dtype=problem.dtype,
        device=jax.devices()[0].device_kind,
        direction=direction,
        bytes=_ops.op_bytes(problem, direction),
        rows=problem.rows,
        width=problem.width,
        status="ok",
        note="",
    )
    out.update(fields)
    return out


class Runner:
    """Runs `contenders` on problems (`args`: the parsed flags) and returns the rows."""

    def __init__(self, args: argparse.Namespace, contenders: list[_contenders.Contender]):
        self.args = args
        self.contenders = contenders
        self.cache = _timing.cache_bytes()
        self.budget = memory_budget()
        self.reasons = {c.name: c.check() for c in contenders}

    def applicable(self, case: Case) -> list[_contenders.Contender]:
        return [c for c in self.contenders if not c.fused_only or case[0].fused]

    def _copies(self, case: Case) -> int:
        return _timing.copies_for(_ops.case_bytes(*case, "fwd+bwd"), self.cache)

    def groups(self, case: Case) -> list[list[_contenders.Contender]]:
        """The contenders sampled in turn: the JAX ones (and the copy) together, the PyTorch
        ones together; one by one when together they would not fit in memory.

        JAX and PyTorch are not interleaved: PyTorch's OpenMP threads fall asleep while JAX
        runs, and waking them costs the next call (on 2 CPU cores, a small LayerNorm forward
        and backward took 0.24 ms right after a JAX call, 0.07 ms after another PyTorch call).
        """
        contenders = self.applicable(case)
        # Inputs, cotangents, residuals and outputs in flight: about twice the traffic.
        need = 2 * _ops.case_bytes(*case, "fwd+bwd") * self._copies(case) * len(contenders)
        if need > self.budget:
            return [[c] for c in contenders]
        by_library = [
            [c for c in contenders if c.kind != "torch"],
            [c for c in contenders if c.kind == "torch"],
        ]
        return [group for group in by_library if group]

    def steps(self, case: Case) -> int:
        return len(self.groups(case)) * len(self.args.direction)

    def run(self, case: Case, progress: Progress) -> list[dict]:
        """The rows of every contender on `case`, whose arrays exist only meanwhile."""
        problem = _ops.make_problem(*case)
        rows: list[dict] = []
        for group in self.groups(case):
            rows += self._run_group(problem, group, progress)
        order = {c.name: i for i, c in enumerate(self.contenders)}
        directions = {d: i for i, d in enumerate(self.args.direction)}
        return sorted(rows, key=lambda r: (order[r["impl"]], directions[r["direction"]]))

    def _run_group(self, problem, group, progress) -> list[dict]:
        rows, cases = [], {}
        for contender in group:
            case, not_run = self._build(problem, contender)
            rows += not_run
            if case is not None:
                cases[contender.name] = case
        copies = self._copies((problem.op, problem.shape, problem.dtype))
        names = ", ".join(c.name for c in group)
        for direction in self.args.direction:
            label = f"{problem.op.name} {_ops.format_shape(problem.shape)} {problem.dtype}"
            progress.step(f"{label} {direction}: {names}")
            timers = {}
            for name, case in cases.items():
                try:
                    timers[name] = self._timer(problem, case, direction, copies)
                except Exception as error:
                    rows.append(self._failure(problem, name, direction, error))

            def failed(name, error, direction=direction):
                rows.append(self._failure(problem, name, direction, error))

            take_samples(timers, self.args.repeats, failed)
            for name, timer in timers.items():
                timing = timer.timing()
                gbps = _ops.op_bytes(problem, direction) / (timing.ms * 1e-3) / 1e9
                rows.append(
                    row(
                        problem,
                        name,
                        direction,
                        ms=timing.ms,
                        ms_min=timing.ms_min,
                        gbps=gbps,
                        compile_s=timing.compile_s,
                        note=cases[name].note,
                        samples_ms=[1e3 * s for s in timer.samples],
                    )
                )
            del timers
        _fill_residuals(rows, cases, problem)
        _release(cases)
        return rows

    def _build(self, problem, contender) -> tuple[object | None, list[dict]]:
        """The contender's case, or `None` and its rows saying why it does not run."""
        directions = self.args.direction
        if contender.kind == "copy":
            return _Copy(problem.dtype), []
        reason = self.reasons[contender.name]
        if reason is None:
            try:
                return contender.build(problem), []
            except _contenders.Skip as skip:
                reason = str(skip)
            except Exception as error:
                return None, [self._failure(problem, contender.name, d, error) for d in directions]
        return None, [
            row(problem, contender.name, d, status="skipped", note=reason) for d in directions
        ]

    def _timer(self, problem, case, direction: str, copies: int) -> _timing.Timer:
        warmup = self.args.warmup
        if isinstance(case, _Copy):
            reads, writes = _ops.case_arrays(problem.op, problem.shape, direction)
            call = _timing.copy_callable(reads, writes, case.dtype, copies)
            return _timing.Timer(call, jax.block_until_ready, warmup)
        if isinstance(case, _contenders.JaxCase):
            call = _timing.jax_callable(case, direction, copies)
            return _timing.Timer(call, jax.block_until_ready, warmup)
        call = _timing.torch_callable(case, direction, copies)
        return _timing.Timer(call, _timing.torch_wait(case), warmup)

    def _failure(self, problem, name: str, direction: str, error: BaseException) -> dict:
        # torch.compile may fail on a machine without a working compiler: a skip, not a bug.
        status = "skipped" if name == "torch.compile" else "failed"
        note = _contenders._first_line(error)
        return row(problem, name, direction, status=status, note=note)


def _fill_residuals(rows: list[dict], cases: dict, problem: _ops.Problem) -> None:
    for name, case in cases.items():
        residual = None if isinstance(case, _Copy) else _residual_bytes(case)
        for r in rows:
            if r["impl"] == name and r["status"] == "ok" and residual is not None:
                r["residual_bytes"] = residual
                r["residual_ratio"] = residual / problem.x.nbytes


def _residual_bytes(case) -> int | None:
    try:
        if isinstance(case, _contenders.JaxCase):
            return _timing.jax_residual_bytes(case.fn, case.args)
        return _timing.torch_residual_bytes(case)
    except Exception:  # a contender whose residuals cannot be traced: leave them blank
        return None


def _release(cases: dict) -> None:
    """Drop the cases' arrays; on CUDA, also return PyTorch's cached memory, which its caching
    allocator would otherwise keep from JAX."""
    cuda = any(
        isinstance(c, _contenders.TorchCase) and c.device.type == "cuda" for c in cases.values()
    )
    cases.clear()
    if cuda:
        import torch

        torch.cuda.empty_cache()
