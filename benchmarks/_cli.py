"""The command line: `python -m benchmarks [--quick | --full] [--ops ...] ...`.

Parses the flags, builds the cases (op × shape × dtype) and runs every contender on each, all
in this one process on the same inputs, then writes the table, CSV, JSON, plots and the
targets' summary. See benchmarks/README.md.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from eqxnorm._dispatch import resolve_impl

from . import _blocks, _contenders, _ops, _plots, _report, _runner, _timing
from ._progress import Progress

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Suite:
    """A preset: what runs when the flags do not say."""

    description: str
    row_shapes: tuple[str, ...]
    channel_shapes: tuple[str, ...]
    dtypes: tuple[str, ...]
    repeats: int
    warmup: int


SUITES = {
    "quick": Suite(
        "the default: a sweep of widths, about a minute on a 2-core CPU",
        ("8192x256", "2048x1024", "512x4096"),
        ("16x64x32x32", "16x128x28x28"),
        ("float32",),
        repeats=9,
        warmup=1,
    ),
    "full": Suite(
        "the GPU suite of issue 5: rows >= 4096, widths 1024 to 262144, NCHW up to 64x64",
        tuple(f"4096x{w}" for w in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144))
        + ("16384x4096",),
        ("32x64x64x64", "32x128x56x56", "32x256x32x32", "32x320x64x64", "32x512x28x28"),
        ("bfloat16", "float32"),
        repeats=30,
        warmup=3,
    ),
}


def _choices(valid: Sequence[str], what: str):
    """An argparse `type` for a comma-separated list drawn from `valid`."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(i.strip() for i in text.split(",") if i.strip())
        unknown = [i for i in items if i not in valid]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; valid "
                f"choices: {', '.join(valid)} (comma-separated)"
            )
        return items

    return parse


def _shapes(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(_ops.parse_shape(s) for s in text.split(",") if s.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(minimum: int):
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmark eqxnorm's normalizations (Pallas kernels and XLA reference) against "
            "eqx.nn, Flax NNX, PyTorch (eager, torch.compile), Liger-Kernel and a device copy: "
            "ms, GB/s, % of copy bandwidth, speed-up, residual bytes; table, CSV, JSON, plots "
            "and the issues' targets. See benchmarks/README.md."
        ),
    )
    suite = p.add_mutually_exclusive_group()
    suite.add_argument(
        "--quick",
        dest="suite",
        action="store_const",
        const="quick",
        help=SUITES["quick"].description,
    )
    suite.add_argument(
        "--full", dest="suite", action="store_const", const="full", help=SUITES["full"].description
    )
    p.set_defaults(suite="quick")
    p.add_argument(
        "--ops", metavar="OP,...", type=_choices(list(_ops.OPS), "op"), help="ops (default: all)"
    )
    p.add_argument(
        "--shapes",
        metavar="SHAPE,...",
        type=_shapes,
        help="shapes, e.g. 4096x1024,8x64x32x32: 2-3 axes (rows x dim) for the row ops, 4-5 "
        "axes (batch x channels x spatial) for the channel ops (default: the suite's)",
    )
    p.add_argument(
        "--dtypes",
        metavar="DTYPE,...",
        type=_choices(_ops.DTYPES, "dtype"),
        help="dtypes (default: the suite's)",
    )
    p.add_argument(
        "--impls",
        metavar="IMPL,...",
        type=_choices(list(_contenders.CONTENDERS), "contender"),
        help="contenders (default: all available; Pallas only off CPU)",
    )
    p.add_argument(
        "--direction",
        metavar="DIR",
        nargs="+",
        type=_choices(_ops.DIRECTIONS, "direction"),
        help="fwd, bwd and/or fwd+bwd (several: `--direction fwd bwd` or fwd,bwd; default all)",
    )
    p.add_argument("--repeats", type=_positive(1), help="timed samples (default: the suite's)")
    p.add_argument("--warmup", type=_positive(0), help="warm-up calls (default: the suite's)")
    p.add_argument(
        "--out",
        type=Path,
        help="output directory (default: benchmarks/results/local/<device>/, ignored by git)",
    )
    p.add_argument(
        "--blocks",
        metavar="BLOCK,...",
        type=_choices(("none", *_blocks.BLOCKS), "block"),
        help="training-step blocks to time against eqx.nn and Flax NNX: transformer, conv, or "
        "none (default: both, unless --ops is given)",
    )
    p.add_argument(
        "--deviceless",
        metavar="DIR",
        nargs="+",
        type=Path,
        default=[],
        help="deviceless tables (python -m benchmarks.deviceless --out DIR) on which the "
        "summary judges issue 17's static targets by the deviceless check's verdicts: "
        "bytes per training step, launches, spills, single reads, occupancy",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--list", action="store_true", help="list the ops, contenders and suites, then exit"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    suite = SUITES[args.suite]
    if args.blocks is None:
        args.blocks = () if args.ops else _blocks.BLOCKS
    args.blocks = tuple(b for b in args.blocks if b != "none")
    args.ops = args.ops or tuple(_ops.OPS)
    args.dtypes = args.dtypes or suite.dtypes
    args.direction = tuple(
        dict.fromkeys(d for group in args.direction or [_ops.DIRECTIONS] for d in group)
    )
    args.repeats = args.repeats or suite.repeats
    args.warmup = suite.warmup if args.warmup is None else args.warmup
    if args.shapes is None:
        args.shapes = tuple(_ops.parse_shape(s) for s in suite.row_shapes + suite.channel_shapes)
    return args


def device_slug() -> str:
    """`cpu`, or the accelerator's name as a path component (`NVIDIA H200` → `nvidia-h200`)."""
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or jax.default_backend()


def default_out() -> Path:
    """`benchmarks/results/local/<device>/`, which git ignores: a user's run leaves the
    checkout clean; the committed results are refreshed on purpose, with `--out`."""
    return HERE / "results" / "local" / device_slug()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    cpu = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = models[0] if models else None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit or None,
        **{
            name.replace("-", "_"): _version(name)
            for name in (
                "eqxnorm",
                "jax",
                "jaxlib",
                "equinox",
                "flax",
                "torch",
                "liger-kernel",
                "numpy",
                "matplotlib",
            )
        },
    }


def list_everything() -> str:
    backend = jax.default_backend()
    defaults = _contenders.default_contenders(backend)
    lines = ["Ops (row ops take shapes rows x dim; channel ops batch x channels x spatial):"]
    lines += [f"  {op.name:<20} {op.family:<8} {op.title}" for op in _ops.OPS.values()]
    lines += ["", f"Contenders (default on {backend}: {', '.join(defaults)}):"]
    for c in _contenders.CONTENDERS.values():
        reason = c.check()
        state = f"unavailable: {reason}" if reason else "available"
        lines.append(f"  {c.name:<15} {c.description} [{state}]")
    lines += ["", f"Directions: {', '.join(_ops.DIRECTIONS)}", f"Dtypes: {', '.join(_ops.DTYPES)}"]
    for name, suite in SUITES.items():
        lines += [
            "",
            f"--{name}: {suite.description}",
            f"  row shapes: {', '.join(suite.row_shapes)}",
            f"  channel shapes: {', '.join(suite.channel_shapes)}",
            f"  dtypes: {', '.join(suite.dtypes)}; repeats {suite.repeats}, warm-up {suite.warmup}",
        ]
    return "\n".join(lines)


# --- running -----------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> tuple[list[_runner.Case], list[_contenders.Contender]]:
    """The cases (op × shape × dtype, in that order) and the contenders to run."""
    backend = jax.default_backend()
    names = args.impls or _contenders.default_contenders(backend)
    contenders = [_contenders.CONTENDERS[n] for n in names]
    cases = [
        (_ops.OPS[name], shape, dtype)
        for name in args.ops
        for shape in args.shapes
        if _ops.accepts(_ops.OPS[name], shape)
        for dtype in args.dtypes
    ]
    return cases, contenders


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        print(list_everything())
        return 0
    backend = jax.default_backend()
    cases, contenders = plan(args)
    if not cases:
        print(
            "No case to run: none of --shapes fits the chosen --ops (row ops take 2-3 axes, "
            "channel ops 4-5).",
            file=sys.stderr,
        )
        return 2
    kernels = ("pallas", "pallas-unfused", "mosaic_gpu")
    if backend == "cpu" and any(c.name in kernels for c in contenders):
        print(
            "warning: on CPU the Pallas kernels run in interpret mode (an exact emulation, "
            "orders of magnitude slower than a compiled kernel): their timings say nothing "
            "about GPU/TPU speed, and large shapes take minutes.",
            file=sys.stderr,
        )
    if backend == "cpu" and args.impls is None:
        left_out = ", ".join(f"{n} ({why})" for n, why in _contenders.CPU_OPT_IN.items())
        print(f"note: not run by default on CPU, add with --impls: {left_out}.", file=sys.stderr)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    runner = _runner.Runner(args, contenders)
    progress = Progress(sum(runner.steps(case) for case in cases) + len(args.blocks))
    rows: list[dict] = []
    done = 0
    # Interrupted (Ctrl-C, or SIGTERM: `timeout` on a lent machine), the run still reports
    # the cases it finished, marked as an interrupted run.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for case in cases:
            rows += runner.run(case, progress)
            done += 1
        for block in args.blocks:
            progress.step(f"{block} block training step: {', '.join(_blocks.LIBRARIES)}")
            rows += _blocks.run((block,), args.repeats, args.warmup)
        interrupted = None
    except KeyboardInterrupt:
        interrupted = f"interrupted after {done} of {len(cases)} cases"
        print(f"\n{interrupted}: reporting what was measured.", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    progress.close()
    _report.fill_derived(rows)

    auto = resolve_impl("auto")
    results = _report.evaluate_targets(rows, backend, auto)
    results += _report.static_targets(_report.load_deviceless(args.deviceless))
    plots = [] if args.no_plots else _plots.plot(rows, out)
    document = {
        "command": " ".join(["python -m benchmarks", *map(shlex.quote, argv)]),
        "environment": environment(),
        "settings": {
            "suite": args.suite,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "directions": list(args.direction),
            "impl_auto": auto,
            "min_sample_s": _timing.MIN_SAMPLE_S,
            "cache_bytes": runner.cache,
            "interleave_budget_bytes": runner.budget,
            "interrupted": interrupted,
        },
        "rows": rows,
        "targets": [dataclasses.asdict(r) for r in results],
    }
    _report.write_csv(rows, out / "results.csv")
    _report.write_json(document, out / "results.json")
    (out / "summary.md").write_text(_report.summary_markdown(document, results, plots))

    print(_report.table(rows))
    print()
    print(_report.targets_text(results))
    print()
    shown = out.resolve()
    if shown.is_relative_to(Path.cwd()):
        shown = shown.relative_to(Path.cwd())
    first_plot = f", e.g. {shown / plots[0].name}" if plots else ""
    print(
        f"Wrote {shown}/: results.csv, results.json, summary.md, {len(plots)} plot(s){first_plot}"
    )
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} row(s) failed: see 'Not run' above.", file=sys.stderr)
    if interrupted:
        print(f"Incomplete: {interrupted}.", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C: the run stops at the next Python instruction and reports."""
    raise KeyboardInterrupt
