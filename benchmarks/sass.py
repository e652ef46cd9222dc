"""The loops of the Mosaic GPU kernels, instruction by instruction, compiled for an H200
without one: what each iteration of a kernel's innermost loops costs in SASS.

`python -m benchmarks.deviceless --backend mosaic_gpu` reports a kernel's registers, spills,
shared memory and occupancy; where the time goes inside it is the machine code's: a loop over
a row's boxes runs once per box of every block, so its body is the kernel's cost per box.
This compiles one op's training step as the deviceless check does (`_gpu_static.
mosaic_gpu_compile`, which captures each Mosaic GPU kernel's PTX), assembles the PTX with
`ptxas` for `sm_90a` and disassembles it with `nvdisasm -c` (NVIDIA's disassembler: the CUDA
toolkit's, or the `nvidia-cuda-nvdisasm` wheel on PyPI, `pip download --no-deps
nvidia-cuda-nvdisasm` and unzip; `--nvdisasm` or `$NVDISASM` names it), then finds each loop
(a branch back to an earlier label) and counts its instructions by kind: barriers (`BAR`),
shared memory (`LDS`, `STS`), global memory (`LDG`, `STG`), warp shuffles (`SHFL`),
floating point, TMA (`UTMALDG`, `UTMASTG`).

    python -m benchmarks.sass --op layer_norm --shape 4096x8192 --dtype bfloat16

prints, per kernel, its innermost loops (those holding no other loop). Not run by CI: it needs
`nvdisasm`, which CI does not install.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

# The kinds counted, by SASS opcode (the part before the first dot).
KINDS = {
    "BAR": "barriers",
    "LDS": "shared loads",
    "STS": "shared stores",
    "LDG": "global loads",
    "STG": "global stores",
    "SHFL": "shuffles",
    "FADD": "float",
    "FMUL": "float",
    "FFMA": "float",
    "MUFU": "float",
    "UTMALDG": "TMA",
    "UTMASTG": "TMA",
}
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


class Loop(NamedTuple):
    """A loop of a kernel's SASS: its instructions `first` to `last` (indices into the
    kernel's), the branch back at `last` to the label before `first`; `counts` by opcode."""

    first: int
    last: int
    counts: dict[str, int]

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, other: "Loop") -> bool:
        return self.first <= other.first and other.last <= self.last and other != self


def opcode(instruction: str) -> str:
    """An instruction's opcode without its predicate and modifiers (`@!P0 BAR.SYNC.DEFER_BLOCKING
    0x0` -> `BAR`)."""
    text = re.sub(r"^@!?U?P\w+\s+", "", instruction.strip())
    return text.split()[0].split(".")[0] if text else ""


def loops(sass: str) -> list[Loop]:
    """The loops of one kernel's `nvdisasm -c` listing, in the order their branches appear."""
    instructions: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(instructions)
        elif m := _INSTRUCTION.match(line):
            instructions.append(m.group(2))
    found = []
    for i, text in enumerate(instructions):
        m = _BRANCH.search(text)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            first = labels[m.group(1)]
            counts = collections.Counter(opcode(t) for t in instructions[first : i + 1])
            found.append(Loop(first, i, dict(counts)))
    return found


def innermost(found: Sequence[Loop]) -> list[Loop]:
    """The loops holding no other loop (a loop over a row's boxes, not the loop over blocks)."""
    return [a for a in found if not any(a.contains(b) for b in found)]


def disassemble(ptx: str, nvdisasm: str, arch: str = "sm_90a") -> str:
    """`ptx` assembled by `ptxas` for `arch` and disassembled by `nvdisasm -c`."""
    with tempfile.TemporaryDirectory() as work:
        source, binary = os.path.join(work, "k.ptx"), os.path.join(work, "k.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        subprocess.run(["ptxas", f"-arch={arch}", source, "-o", binary], check=True)
        listing = subprocess.run([nvdisasm, "-c", binary], check=True, capture_output=True)
        return listing.stdout.decode()


def kernel_sass(op: str, shape: str, dtype: str, nvdisasm: str) -> dict[str, str]:
    """`{kernel name: SASS}` of the Mosaic GPU kernels of `op`'s training step."""
    from eqxnorm.kernels import row_norm

    from . import _gpu_static, deviceless

    case = deviceless.Case(
        op=op, shape=shape, dtype=dtype, direction="fwd+bwd", target="h200", backend="mosaic_gpu"
    )
    fn, args = deviceless._program(case)
    work = tempfile.mkdtemp(prefix="eqxnorm_sass_")
    with row_norm.taking_mosaic_gpu():
        _gpu_static.mosaic_gpu_compile(fn, *args, workdir=work)
    with open(os.path.join(work, "ptxas.txt")) as f:
        modules = _gpu_static._ptx_modules(f.read())
    header = "// Generated by LLVM NVPTX Back-End"
    # Each module runs to the next one's header; ptxas's report of it follows its PTX.
    return {
        name: disassemble(header + ptx.split("\nptxas info")[0], nvdisasm)
        for name, ptx in modules.items()
    }


# Loops this short are waits (an mbarrier's try-wait and its branch), not work.
WAIT_LOOP = 8


def table(sass: dict[str, str]) -> str:
    """The innermost loops of each kernel but its waits (`WAIT_LOOP`), a line each:
    instructions and their kinds."""
    lines = ["| kernel | loop (SASS lines) | instructions | " + " | ".join(KINDS) + " |"]
    lines.append("|---|---|---|" + "---|" * len(KINDS))
    for name, text in sass.items():
        for loop in innermost(loops(text)):
            if loop.size <= WAIT_LOOP:
                continue
            counts = " | ".join(str(loop.counts.get(k, 0)) for k in KINDS)
            lines.append(f"| `{name}` | {loop.first}-{loop.last} | {loop.size} | {counts} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", default="layer_norm")
    parser.add_argument("--shape", default="4096x8192")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--nvdisasm", default=os.environ.get("NVDISASM", "nvdisasm"))
    args = parser.parse_args(argv)
    nvdisasm = shutil.which(args.nvdisasm)
    if nvdisasm is None or shutil.which("ptxas") is None:
        missing = "ptxas" if nvdisasm else f"nvdisasm ({args.nvdisasm!r})"
        print(
            f"benchmarks.sass needs {missing} on PATH: ptxas comes with the CUDA toolkit, "
            "nvdisasm too or from PyPI's nvidia-cuda-nvdisasm wheel (pass --nvdisasm PATH).",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(table(kernel_sass(args.op, args.shape, args.dtype, nvdisasm)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
