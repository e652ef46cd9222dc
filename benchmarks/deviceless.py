"""`python -m benchmarks.deviceless`: what an H200 (or a TPU v5e) would get from eqxnorm's
kernels, found on a machine without one.

For each case (op × shape × dtype × direction), the op's eqxnorm entry point with
`impl="triton"` (the Pallas kernels pinned to Triton) is lowered for `cuda` and compiled
deviceless (see `benchmarks._gpu_static`), and one row per Triton kernel is printed: grid,
warps, registers, spills and occupancy on sm_90a (where the installed JAX exposes XLA's
Triton compiler: jax 0.10), and the kernel's exact global-memory traffic from its IR, with
the lanes out of bounds and the most writes of one output element. A line per case gives the
whole program as XLA builds it for the H200: its launches, and the bytes they move against
the op's ideal (`benchmarks._ops.case_bytes`: forward reads the inputs and writes the outputs
once, backward reads `x`, the weight and the cotangents and writes the gradients once).

    python -m benchmarks.deviceless                         # every op, default shapes, bf16
    python -m benchmarks.deviceless --ops layer_norm --shapes 4096x8192 --dtypes float32
    python -m benchmarks.deviceless --out benchmarks/results/deviceless-h200 --check

`--backend mosaic_gpu` compiles `impl="pallas"` instead, taking the row norms' Mosaic GPU
kernels (`row_norm.taking_mosaic_gpu`: `impl="auto"` runs them on Triton, measured faster on
an H200), what it runs on an H200 with JAX 0.12+ (Triton's for what has none): one row per
Mosaic GPU kernel with ptxas's registers and spills (`benchmarks._gpu_static.mosaic_gpu_compile`),
and the program's bytes against the ideal.

`--target tpu-v5e` compiles the same programs with XLA's TPU compiler for one v5e chip
(`benchmarks._tpu_static`, needs the `tpu-check` extra): every Mosaic kernel must compile.

Each case runs in a subprocess with a timeout (LLVM can abort on a bad kernel). `--check`
exits with status 1 if any kernel spills, touches memory out of bounds, writes an output
element twice or leaves one unwritten, or XLA's compile fails. Needs `pip install -e
".[gpu-check]"` (the CUDA plugin matching jaxlib, no CUDA libraries) and a `ptxas`.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

DIRECTIONS = ("fwd", "fwd+bwd")
ROW_SHAPES = ("37x760", "4096x1024", "64x70000")
CHANNEL_SHAPES = ("5x12x7x9", "16x128x32x32")
TIMEOUT_S = 300


TARGETS = ("h200", "tpu-v5e")


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: str
    dtype: str
    direction: str
    target: str = "h200"
    # The GPU kernels compiled (`impl=`): Triton's are analysed per kernel (TTIR traffic,
    # ptxas); Mosaic GPU's by ptxas on what XLA compiles.
    backend: str = "triton"

    @property
    def label(self) -> str:
        return f"{self.op} {self.dtype} {self.shape} {self.direction} {self.backend}"


def cases(
    ops, shapes, dtypes, directions, target: str = "h200", backend: str = "triton"
) -> list[Case]:
    """Every accepted combination; an op takes the shapes of its family (row or channel)
    among `shapes`, or its family's defaults when `shapes` is `None`."""
    from ._ops import OPS, accepts, parse_shape

    out = []
    for name in ops:
        op = OPS[name]
        defaults = ROW_SHAPES if op.family == "row" else CHANNEL_SHAPES
        for shape in shapes or defaults:
            if not accepts(op, parse_shape(shape)):
                continue
            out += [
                Case(name, shape, d, direction, target, backend)
                for d in dtypes
                for direction in directions
            ]
    return out


# --- one case, in the worker process ------------------------------------------------------------


def _program(case: Case):
    """`(fn, args)`: the case's forward, or forward and backward (`jax.vjp` applied to the
    cotangents), of eqxnorm's Pallas entry point."""
    import jax

    from ._contenders import eqxnorm_fused
    from ._ops import OPS, make_problem, parse_shape

    problem = make_problem(OPS[case.op], parse_shape(case.shape), case.dtype)
    # Mosaic GPU through `impl="pallas"`, the row norms' taken (`run_case`): pinning
    # `impl="mosaic_gpu"` would trace its CPU interpreter's effects into the program too.
    impl = "triton" if case.target == "h200" and case.backend == "triton" else "pallas"
    built = eqxnorm_fused(impl)(problem)
    if case.direction == "fwd":
        return built.fn, (built.args,)

    def step(args, cotangents):
        outputs, vjp = jax.vjp(built.fn, args)
        return outputs, vjp(cotangents)

    return step, (built.args, built.cotangents)


def run_case(case: Case, workdir: str) -> dict:
    """The report of one case as plain data (JSON-able): its kernels and the XLA program, or
    for a TPU target the Mosaic kernels of the compiled program."""
    from . import _gpu_static as g
    from ._ops import OPS, case_bytes, parse_shape

    fn, args = _program(case)
    if case.target != "h200":
        from ._tpu_static import tpu_compile

        report = tpu_compile(fn, *args)
        return {"case": dataclasses.asdict(case), **dataclasses.asdict(report)}
    start = time.time()
    if case.backend == "mosaic_gpu":
        from eqxnorm.kernels import row_norm

        with row_norm.taking_mosaic_gpu():
            kernels = g.kernel_reports(fn, *args, workdir=workdir)  # Triton's, if any left
            program, mosaic = g.mosaic_gpu_compile(fn, *args, workdir=workdir)
    else:
        kernels = g.kernel_reports(fn, *args, workdir=workdir)
        program, mosaic = g.xla_compile(fn, *args, workdir=workdir), []
    ideal = case_bytes(OPS[case.op], parse_shape(case.shape), case.dtype, case.direction)
    return {
        "case": dataclasses.asdict(case),
        "seconds": time.time() - start,
        "ideal_bytes": ideal,
        "kernels": [_kernel_row(k) for k in kernels],
        "mosaic_gpu": mosaic,
        "program": {
            "seconds": program.seconds,
            "launches": [dataclasses.asdict(launch) for launch in program.launches],
            "bytes": program.program_bytes,
            "problems": program.problems,
        },
    }


def _kernel_row(k) -> dict:
    outputs = [b for b in k.buffers or () if b.role == "out"]
    ptxas = k.ptxas
    return {
        "name": k.name,
        "grid": list(k.grid),
        "warps": k.num_warps,
        "stages": k.num_stages,
        "registers": None if ptxas is None else ptxas.registers,
        "spill_bytes": None if ptxas is None else ptxas.spill_stores + ptxas.spill_loads,
        "stack_bytes": None if ptxas is None else ptxas.stack,
        "barriers": None if ptxas is None else ptxas.barriers,
        "bar_syncs": None if ptxas is None else ptxas.bar_syncs,
        "smem_bytes": k.smem_bytes,
        "occupancy": None if k.occupancy is None else k.occupancy["occupancy"],
        "ideal_bytes": k.ideal_bytes,
        "dram_bytes": k.dram_bytes,
        "access_bytes": k.access_bytes,
        "out_of_bounds": sum(b.out_of_bounds for b in k.buffers or ()),
        "max_writes": max((b.max_writes for b in outputs), default=0),
        "covered": min((b.written_unique / b.size for b in outputs), default=0.0),
        "problems": k.problems,
        "notes": k.notes,
    }


def _worker(spec: str) -> int:
    """Run the cases of `spec` (JSON: a list of cases and a work directory) and print one JSON
    line per case. JAX's deprecation warnings are errors here: a kernel lowering that leaks
    one fails its case."""
    warnings.filterwarnings("error", category=DeprecationWarning, module="jax")
    request = json.loads(spec)
    for i, fields in enumerate(request["cases"]):
        case = Case(**fields)
        workdir = os.path.join(request["workdir"], f"{i:03d}")
        os.makedirs(workdir, exist_ok=True)
        print("RESULT " + json.dumps(run_case(case, workdir)), flush=True)
    return 0


# --- the parent: subprocesses, the table --------------------------------------------------------


def run(
    selected: Sequence[Case], timeout: float = TIMEOUT_S, workdir: str | None = None
) -> list[dict]:
    """Run `selected` in one subprocess (with `timeout` seconds for all of them) and return
    their reports. A subprocess that fails or times out raises `RuntimeError` with its output."""
    workdir = workdir or tempfile.mkdtemp(prefix="eqxnorm_deviceless_")
    request = {"cases": [dataclasses.asdict(c) for c in selected], "workdir": workdir}
    # A deviceless compile holds no TPU: libtpu's one-process lock would only serialise runs.
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", ALLOW_MULTIPLE_LIBTPU_LOAD="1"
    )
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", _WORKER_MAIN, str(root), json.dumps(request)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(
            f"The deviceless compile of {[c.label for c in selected]} took over {timeout} s; "
            f"its output so far:\n{error.stdout}\n{error.stderr}"
        ) from None
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line[:7] == "RESULT "]
    if done.returncode != 0 or len(results) != len(selected):
        raise RuntimeError(
            f"The deviceless compile of {[c.label for c in selected]} failed (exit status "
            f"{done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    return results


# The worker's entry: the repository root goes off `sys.path` (as in `benchmarks/__main__.py`)
# so that the installed eqxnorm is compiled, and goes back for `benchmarks` only.
_WORKER_MAIN = """
import sys
root = sys.argv[1]
sys.path[:] = [p for p in sys.path if p not in ("", root)]
import eqxnorm
sys.path.append(root)
from benchmarks.deviceless import _worker
sys.exit(_worker(sys.argv[2]))
"""


def problems(result: dict) -> list[str]:
    """Every problem of one case's report, each naming its kernel."""
    if "program" not in result:  # a TPU case
        return list(result["problems"])
    found = [f"{k['name']}: {p}" for k in result["kernels"] for p in k.get("problems", ())]
    return found + [f"XLA program: {p}" for p in result["program"].get("problems", ())]


# --- issue 17's targets, judged on every H200 case ---------------------------------------------

# A training step's HBM bytes over its ideal (`_ops.case_bytes`: forward reads x and writes y,
# backward reads x and dy and writes dx, 5 x-sized passes), and a forward's.
STEP_BYTES = 1.05
FORWARD_BYTES = 1.01
# BatchNorm's training step with batch statistics from HBM: statistics, normalize (2), backward
# sums (2), dx (3): 8 x-sized passes over the ideal's 5, its forward 3 over 2; each with a
# quarter pass's room for the per-channel and per-row arrays (a few KiB at typical shapes).
BATCH_NORM_STEP_BYTES = 8.25 / 5
BATCH_NORM_FORWARD_BYTES = 3.25 / 2
# Warps resident per SM over the most it holds (64), per Triton kernel: what hides the latency
# of loads into registers. A Mosaic GPU kernel's loads are TMA copies into shared memory, a
# block's whole rows at once: what it needs is bytes in flight per SM, Little's law's
# `_mosaic_gpu.IN_FLIGHT_BYTES` (its grids are sized to stage twice that), however few warps
# hold them (a pipelined persistent backward: one 4-warp program per SM).
OCCUPANCY = 0.5
# Barrier instructions (`bar.sync`, `_gpu_static.bar_syncs`) in a forward kernel's PTX: in
# Triton's each cross-warp reduction and each layout conversion through shared memory costs a
# pair (LayerNorm's forward had 17, RMSNorm's 5: issue 17); in Mosaic GPU's, the warpgroup
# barriers it puts around shared-memory stores and TMA issues (LayerNorm's forward had 15).
FORWARD_BARRIERS = 5


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One target for one case: `target` (what is asserted), `value` (what was measured) and
    whether it is `met`."""

    target: str
    value: str
    met: bool


def verdicts(result: dict) -> list[Verdict]:
    """Issue 17's targets for one H200 case (a report of [`run`][]): no problem (spill, lane
    out of bounds, failed compile: [`problems`][]), the program's bytes over
    the ideal, its launches (the op's kernels, and at most one small XLA reduction in a
    training step: the parameter gradients'), and per kernel no spill, for Triton's one read
    of each byte (its traffic account), occupancy and, for a forward kernel, its barrier
    instructions (`FORWARD_BARRIERS`, Mosaic GPU's forwards too), for Mosaic GPU's
    TMA-staged kernels the bytes in flight per SM (resident blocks × staged bytes, see
    `OCCUPANCY`)."""
    from eqxnorm.kernels._mosaic_gpu import IN_FLIGHT_BYTES

    from ._gpu_static import SM90, fmt_bytes, occupancy

    case = Case(**result["case"])
    out = []
    step = case.direction == "fwd+bwd"
    batch_norm = case.op == "batch_norm"
    bound = (
        (BATCH_NORM_STEP_BYTES if step else BATCH_NORM_FORWARD_BYTES)
        if batch_norm
        else (STEP_BYTES if step else FORWARD_BYTES)
    )
    found = problems(result)
    out.append(Verdict("compiles without a problem", "; ".join(found) or "none", not found))
    ratio = result["program"]["bytes"] / result["ideal_bytes"]
    out.append(Verdict(f"bytes <= {bound:.2f}x ideal", f"{ratio:.3f}x", ratio <= bound))
    others = [x for x in result["program"]["launches"] if "eqxnorm" not in x["name"]]
    most = 1 if step else 0
    out.append(
        Verdict(
            f"XLA launches beside the kernels <= {most}",
            str(len(others)),
            len(others) <= most,
        )
    )
    for k in result["kernels"]:
        name = k["name"]
        if k["spill_bytes"] is not None:
            out.append(Verdict(f"{name}: no spill", f"{k['spill_bytes']} B", k["spill_bytes"] == 0))
        if k["occupancy"] is not None:
            out.append(
                Verdict(
                    f"{name}: occupancy >= {OCCUPANCY:.0%}",
                    f"{k['occupancy']:.0%}",
                    k["occupancy"] >= OCCUPANCY,
                )
            )
        out.extend(_barrier_verdicts(name, k))
        if k["dram_bytes"]:
            reads = k["access_bytes"] / k["dram_bytes"]
            out.append(Verdict(f"{name}: each byte moved once", f"{reads:.2f}x", reads <= 1.01))
    for k in result.get("mosaic_gpu", []):
        name = k["name"].removesuffix("_mosaic_gpu_kernel")
        out.append(Verdict(f"{name}: no spill", f"{k['spill_bytes']} B", k["spill_bytes"] == 0))
        out.extend(_barrier_verdicts(name, k))
        if "smem_bytes" not in k:
            continue
        blocks = occupancy(k["registers"], 4, k["smem_bytes"], SM90)["blocks_per_sm"]
        staged = blocks * k["smem_bytes"]
        out.append(
            Verdict(
                f"{name}: in flight per SM >= {fmt_bytes(IN_FLIGHT_BYTES)}",
                f"{blocks} x {fmt_bytes(k['smem_bytes'])}",
                staged >= IN_FLIGHT_BYTES,
            )
        )
    return out


def _barrier_verdicts(name: str, kernel: dict) -> list[Verdict]:
    """A forward kernel's barrier instructions against `FORWARD_BARRIERS` (Triton's or Mosaic
    GPU's, counted alike: `_gpu_static.bar_syncs`), where they were counted."""
    if kernel.get("bar_syncs") is None or not name.endswith("_fwd"):
        return []
    syncs = kernel["bar_syncs"]
    return [
        Verdict(f"{name}: barriers <= {FORWARD_BARRIERS}", str(syncs), syncs <= FORWARD_BARRIERS)
    ]


def missed(result: dict) -> list[str]:
    """The targets `result` misses, each with its measured value."""
    return [f"{v.target} ({v.value})" for v in verdicts(result) if not v.met]


def targets_table(results: Sequence[dict]) -> str:
    """The Markdown table of the targets: per case, those met and those missed."""
    lines = ["| case | targets met | missed (measured) |", "|---|---|---|"]
    for r in results:
        c = Case(**r["case"])
        found = verdicts(r)
        met = sum(v.met for v in found)
        lines.append(
            f"| {c.op} {c.dtype} {c.shape} {c.direction} | {met}/{len(found)} "
            f"| {'; '.join(missed(r)) or '-'} |"
        )
    return "\n".join(lines)


def _fmt(value, spec: str = "", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def tpu_table(results: Sequence[dict]) -> str:
    """The Markdown table of TPU `results`: one row per case."""
    lines = ["| case | Mosaic kernels compiled | seconds | problems |", "|---|---|---|---|"]
    for r in results:
        label = Case(**r["case"]).label
        kernels = ", ".join(f"`{k}`" for k in r["kernels"]) or "-"
        problems_ = "; ".join(r["problems"]) or "none"
        lines.append(f"| {label} | {kernels} | {r['seconds']:.1f} | {problems_} |")
    return "\n".join(lines)


def _mosaic_gpu_grid(kernel: dict) -> str:
    """A Mosaic GPU kernel's grid as recorded from its launch (blank where it was not)."""
    return "x".join(map(str, kernel["grid"])) if kernel.get("grid") else ""


def _mosaic_gpu_occupancy(kernel: dict) -> str:
    """A Mosaic GPU kernel's occupancy (resident warps over sm_90's 64) as its registers and
    its block's shared memory allow, with what limits it: one warpgroup a block, so a block
    that stages most of an SM's shared memory leaves 4 warps on it, 6 %, however few
    registers it takes (the registers' bound alone where the launch was not recorded)."""
    from ._gpu_static import SM90, fmt_bytes, occupancy

    if "smem_bytes" not in kernel:
        return f"{kernel['register_occupancy']:.0%} (registers)"
    occ = occupancy(kernel["registers"], 4, kernel["smem_bytes"], SM90)
    return (
        f"{occ['occupancy']:.0%} ({occ['blocks_per_sm']} x {fmt_bytes(kernel['smem_bytes'])}; "
        f"registers {kernel['register_occupancy']:.0%})"
    )


def table(results: Sequence[dict]) -> str:
    """The Markdown table of `results`: one row per kernel, one per whole program (GPU), or
    one per case (TPU)."""
    from ._gpu_static import fmt_bytes

    if results and "program" not in results[0]:
        return tpu_table(results)

    lines = [
        "| case | kernel | grid | warps | regs | spills | occupancy | HBM bytes: unique, every "
        "access / ideal | OOB lanes | writes/elem | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = Case(**r["case"])
        label = f"{c.op} {c.dtype} {c.shape} {c.direction}"
        for k in r.get("mosaic_gpu", []):
            lines.append(
                f"| {label} | `{k['name']}` (Mosaic GPU) | {_mosaic_gpu_grid(k)} | 4 "
                f"| {k['registers']} | {k['spill_bytes']} | {_mosaic_gpu_occupancy(k)} | - | | | "
                f"{'none' if not (k['spill_bytes'] or k['stack_bytes']) else 'spills'} |"
            )
        for k in r["kernels"]:
            moved, ideal = k["dram_bytes"], k["ideal_bytes"]
            ratio = (
                "-"
                if moved is None
                else (
                    f"{fmt_bytes(moved)}, {fmt_bytes(k['access_bytes'])} / {fmt_bytes(ideal)} "
                    f"= {moved / ideal:.2f}x, {k['access_bytes'] / ideal:.2f}x"
                )
            )
            lines.append(
                f"| {label} | `{k['name']}` | {'x'.join(map(str, k['grid']))} | {k['warps']} "
                f"| {_fmt(k['registers'])} | {_fmt(k['spill_bytes'])} "
                f"| {_fmt(k['occupancy'], '.0%')} | {ratio} | {k['out_of_bounds']} "
                f"| {k['max_writes']} | {'; '.join(k['problems']) or 'none'} |"
            )
        p = r["program"]
        triton, mosaic = len(r["kernels"]), len(r.get("mosaic_gpu", []))
        kernels = f"{triton} Triton" + (f", {mosaic} Mosaic GPU" if mosaic else "")
        lines.append(
            f"| {label} | **whole program on H200** | {len(p['launches'])} launches "
            f"({kernels}) | | | | | {fmt_bytes(p['bytes'])} / "
            f"{fmt_bytes(r['ideal_bytes'])} = {p['bytes'] / r['ideal_bytes']:.2f}x | | "
            f"| {'; '.join(p['problems']) or 'none'} |"
        )
    return "\n".join(lines)


def _environment(target: str) -> str:
    import jax

    from . import _gpu_static as g

    if target != "h200":
        import importlib.metadata

        libtpu = importlib.metadata.version("libtpu")
        return f"jax {jax.__version__}, target TPU {target} (one chip), libtpu {libtpu}"

    ptxas = g._find_tool("ptxas")
    compiler = "XLA's Triton compiler (CUDA plugin)" if g._xla_triton_compiler() else None
    per_kernel = compiler or "not exposed by this JAX: registers/spills/occupancy per kernel -"
    return (
        f"jax {jax.__version__}, target NVIDIA H200 (sm_90a), per-kernel PTX: {per_kernel}, "
        f"ptxas {g._tool_version(ptxas) if ptxas else 'missing'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from ._ops import DTYPES, OPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
    parser.add_argument("--shapes", nargs="+", help="e.g. 4096x1024 or 16x128x32x32")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["bfloat16"])
    parser.add_argument("--direction", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    parser.add_argument("--target", choices=TARGETS, default="h200")
    parser.add_argument(
        "--backend",
        choices=("triton", "mosaic_gpu"),
        default="triton",
        help="the GPU kernels compiled for the h200 target (mosaic_gpu: what impl='auto' runs "
        "on an H200 with JAX 0.12+)",
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per case")
    parser.add_argument("--out", type=Path, help="write table.md and results.json there")
    parser.add_argument("--check", action="store_true", help="exit 1 on any problem")
    args = parser.parse_args(argv)
    selected = cases(args.ops, args.shapes, args.dtypes, args.direction, args.target, args.backend)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    environment = _environment(args.target)
    print(environment, file=sys.stderr)
    results = []
    for i, case in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {case.label}", file=sys.stderr, flush=True)
        results += run([case], timeout=args.timeout)
    text = table(results)
    if args.target == "h200":
        text += "\n\n## Issue 17's targets\n\n" + targets_table(results)
    print(text)
    found = [f"{r['case']['op']}: {p}" for r in results for p in problems(r)]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.deviceless " + " ".join(argv or sys.argv[1:])
        (args.out / "table.md").write_text(
            f"# Deviceless compile for an H200\n\n`{command.strip()}`\n\n{environment}\n\n{text}\n"
        )
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{len(found)} problem(s)" + "".join(f"\n  {p}" for p in found), file=sys.stderr)
    return 1 if (found and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
