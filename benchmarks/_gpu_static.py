"""What an NVIDIA Hopper GPU would get from eqxnorm's kernels, found on a machine without one.

The engine of `python -m benchmarks.deviceless` and of `tests/test_deviceless.py`, grown from
the team's prototype (`shared/tools/gpu_compile_check.py`). For `jax.jit(fn)(*args)`:

- **Per Triton kernel** (`kernel_reports`): `jax.export` lowers the function for `cuda` from
  the CPU; each `pallas_call` is a `stablehlo.custom_call @__gpu$xla.gpu.triton` whose backend
  config carries the kernel's Triton IR (TTIR), grid, `num_warps` and `num_stages`.
  - PTX and ptxas (registers, spills, stack, shared memory, barriers) and occupancy on an
    sm_90a target, where the installed CUDA plugin exposes XLA's own Triton compiler to
    Python (jax 0.10; from 0.11 it no longer does, and these fields stay empty: the
    whole-program compile below still fails on any spill).
  - An exact account of the global-memory traffic: the integer part of the TTIR (program
    ids, ranges, pointer offsets, masks, loop bounds) is evaluated with NumPy for every
    program of the grid, giving the bytes read and written per operand, the lanes out of
    bounds, how often each output element is written and how much of it is covered.
- **The whole program** (`xla_compile`): XLA's GPU compiler, deviceless, for an H200 target
  (`jax.experimental.topologies`), with `xla_gpu_fail_ptx_compilation_on_register_spilling`:
  every kernel launch of what `jax.jit(fn)` builds on that GPU (Triton kernels and XLA's
  fusions), and the HBM traffic if each launch reads its operands and writes its results once.

Needs the CUDA plugin of exactly the installed jaxlib (`pip install -e ".[gpu-check]"`, which
asks for `jax[cuda12-local]`: no CUDA libraries, about 180 MB), `JAX_PLATFORMS=cpu` (set
before JAX starts; the plugin still registers its compiler and topology), and a `ptxas` for
the per-kernel statistics ($PTXAS, PATH, or /usr/local/cuda; the `triton` wheel bundles one).
LLVM can abort the process on a bad kernel: run each case in a subprocess
(`benchmarks.deviceless` does).
"""

import contextlib
import dataclasses
import glob
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Any

import jax
import numpy as np

TRITON_CALL = "__gpu$xla.gpu.triton"

# H100/H200 (sm_90) limits used for occupancy.
SM90 = dict(
    sm_count=132,
    regs_per_sm=65536,
    max_regs_per_thread=255,
    max_warps_per_sm=64,
    max_blocks_per_sm=32,
    smem_per_sm=233472,  # 228 KiB
    smem_per_block_optin=232448,  # 227 KiB
    smem_reserved_per_block=1024,
    hbm_bytes_per_s=4.8e12,  # H200; H100 SXM: 3.35e12
    l2_bytes=50 * 2**20,
)

H200_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H200"
"""

# --- tools ---------------------------------------------------------------------------------------


def _find_tool(name: str) -> str | None:
    env = os.environ.get(name.upper())
    if env and os.path.exists(env):
        return env
    candidates = [shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", name)
        )
    except Exception:
        pass
    for mod in ("nvidia.cuda_nvcc", "nvidia.cu13", "nvidia.cuda_cuobjdump"):
        try:
            m = __import__(mod, fromlist=["_"])
            for p in getattr(m, "__path__", []):
                candidates.append(os.path.join(p, "bin", name))
        except Exception:
            pass
    for c in candidates:
        if c and os.path.exists(c) and os.access(c, os.X_OK):
            return c
    return None


def _tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else "?"


# --- kernels out of the exported StableHLO -------------------------------------------------------


@dataclasses.dataclass
class TritonCall:
    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    ir: bytes  # MLIR bytecode of the tt.func module
    operands: list[tuple[tuple[int, ...], str]]  # (shape, dtype) of each operand then result
    n_inputs: int


def _ir_context():
    from jax._src.interpreters import mlir as jmlir
    from jaxlib.triton import dialect as tt_dialect

    ctx = jmlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    return ctx


def _tensor_sig(t) -> tuple[tuple[int, ...], str]:
    from jax._src.lib.mlir import ir

    rt = ir.RankedTensorType(t)
    return tuple(rt.shape), str(rt.element_type)


def triton_calls(fn, *args, **kwargs) -> list[TritonCall]:
    """The Triton kernels of `jax.jit(fn)(*args, **kwargs)` lowered for CUDA from this machine."""
    from jax._src.lib.mlir import ir

    exported = jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*args, **kwargs)
    calls = []
    with _ir_context():
        module = ir.Module.parse(exported.mlir_module())

        def visit(op):
            if op.name == "stablehlo.custom_call":
                target = ir.StringAttr(op.attributes["call_target_name"]).value
                if target == TRITON_CALL:
                    bc = ir.DictAttr(op.attributes["mhlo.backend_config"])

                    def i32(k):
                        return ir.IntegerAttr(bc[k]).value

                    calls.append(
                        TritonCall(
                            name=ir.StringAttr(bc["name"]).value,
                            grid=(i32("grid_x"), i32("grid_y"), i32("grid_z")),
                            num_warps=i32("num_warps"),
                            num_stages=i32("num_stages"),
                            ir=ir.StringAttr(bc["ir"]).value_bytes,
                            operands=[_tensor_sig(o.type) for o in op.operands]
                            + [_tensor_sig(r.type) for r in op.results],
                            n_inputs=len(op.operands),
                        )
                    )
            return ir.WalkResult.ADVANCE

        module.operation.walk(visit)
    return calls


def ttir_text(call: TritonCall) -> str:
    from jax._src.lib.mlir import ir

    with _ir_context():
        return ir.Module.parse(call.ir).operation.get_asm(enable_debug_info=False)


# --- TTIR -> PTX -> cubin ------------------------------------------------------------------------


def _xla_triton_compiler() -> Any:
    """XLA's Triton compiler as registered by the CUDA plugin, or `None` where this JAX does not
    expose it to Python (0.11 and newer)."""
    from jax._src.lib import triton as jtriton

    if not hasattr(jtriton, "has_compilation_handler"):
        return None
    try:
        jax.devices()  # discovers and initialises the plugins
    except RuntimeError:
        pass
    return jtriton if jtriton.has_compilation_handler("CUDA") else None


def compile_to_ptx(call: TritonCall, arch: str = "9.0") -> tuple[str, int] | None:
    """`(PTX, dynamic shared memory bytes)` of `call` from XLA's Triton pipeline (the one
    that compiles it on the GPU), or `None` where the plugin does not expose it."""
    jtriton = _xla_triton_compiler()
    if jtriton is None:
        return None
    res = jtriton.compile(
        "CUDA", call.ir, arch, num_warps=call.num_warps, num_ctas=1, num_stages=call.num_stages
    )
    asm = res.asm if isinstance(res.asm, str) else res.asm.decode()
    return asm, int(res.smem_bytes)


@dataclasses.dataclass
class PtxasStats:
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    barriers: int = 0  # named barriers the kernel uses (ptxas), not barrier instructions
    bar_syncs: int = 0  # barrier instructions in the PTX (`bar.sync`, `barrier.sync`)
    static_smem: int = 0  # bytes of statically declared shared memory (XLA's fusions use it)
    cmem: str = ""
    warnings: list[str] = dataclasses.field(default_factory=list)


# A CTA-wide barrier: `bar.sync` / `barrier.sync` (`.aligned`, `.cta` forms too), with or without
# a thread count (Mosaic GPU's `bar.sync 1, 128` is its warpgroup barrier: the whole block of
# its one-warpgroup kernels). Not `mbarrier.*` (`\b` rules out the `m`), not `bar.arrive`.
_BAR_SYNC = re.compile(r"\b(?:bar|barrier)(?:\.cta)?\.sync\b")


def bar_syncs(ptx: str) -> int:
    """The barrier instructions in `ptx` at which every thread of a block waits for the others
    (`bar.sync`, `barrier.sync`): what a kernel's cross-warp steps cost (issue 17 counts them in
    the forward kernels, Triton's and Mosaic GPU's alike). Counted in the code, not as executed:
    one in a loop counts once. An `mbarrier.try_wait` (a TMA copy's completion, on which each
    thread waits for the copy, not for the other threads) is not one: it is not counted."""
    return len(_BAR_SYNC.findall(ptx))


def ptxas(ptx: str, sm: str, workdir: str, stem: str) -> dict[str, PtxasStats]:
    """`ptxas -v` on `ptx`: the statistics of each entry function."""
    exe = _find_tool("ptxas")
    if exe is None:
        raise RuntimeError("no ptxas found (set $PTXAS, install CUDA or the triton wheel)")
    ptx_path, cubin = os.path.join(workdir, stem + ".ptx"), os.path.join(workdir, stem + ".cubin")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    cmd = [
        exe,
        f"-arch={sm}",
        "-O3",
        "-v",
        "--warn-on-spills",
        "--warn-on-local-memory-usage",
        ptx_path,
        "-o",
        cubin,
    ]
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=float(os.environ.get("PTXAS_TIMEOUT", 300))
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"ptxas took over $PTXAS_TIMEOUT s on {len(ptx) >> 20} MiB of PTX: {ptx_path}"
        ) from None
    if p.returncode != 0:
        raise RuntimeError(
            f"ptxas failed (exit {p.returncode}: {' '.join(cmd)}):\n{p.stderr}{p.stdout}"
        )
    stats: dict[str, PtxasStats] = {}
    cur = None
    for line in p.stderr.splitlines():
        if m := re.search(
            r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line
        ):
            cur = stats.setdefault(m.group(1), PtxasStats())
        elif cur is None:
            continue
        if m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        if m := re.search(r"Used (\d+) registers", line):
            cur.registers = int(m.group(1))
        if m := re.search(r"used (\d+) barriers", line):
            cur.barriers = int(m.group(1))
        if m := re.search(r"(\d+) bytes smem", line):
            cur.static_smem = int(m.group(1))
        if m := re.search(r"(\d+ bytes cmem\[\d+\](?:, \d+ bytes cmem\[\d+\])*)", line):
            cur.cmem = m.group(1)
        if "warning" in line.lower():
            cur.warnings.append(line.strip())
    for line in p.stderr.splitlines():  # warnings not tied to a function
        if "warning" in line.lower() and not any(
            line.strip() in s.warnings for s in stats.values()
        ):
            for s in stats.values():
                s.warnings.append(line.strip())
    return stats


def occupancy(regs: int, warps: int, smem: int, spec=SM90) -> dict[str, Any]:
    threads = 32 * warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (spec["regs_per_sm"] // regs_per_warp) // warps
    smem_block = smem + spec["smem_reserved_per_block"]
    by_smem = spec["smem_per_sm"] // smem_block if smem_block else spec["max_blocks_per_sm"]
    by_threads = spec["max_warps_per_sm"] // warps
    blocks = max(0, min(by_regs, by_smem, by_threads, spec["max_blocks_per_sm"]))
    limits = {
        "registers": by_regs,
        "shared memory": by_smem,
        "threads": by_threads,
        "32 blocks": spec["max_blocks_per_sm"],
    }
    limiter = "/".join(k for k, v in limits.items() if v == blocks)
    return dict(
        threads=threads,
        blocks_per_sm=blocks,
        warps_per_sm=blocks * warps,
        occupancy=blocks * warps / spec["max_warps_per_sm"],
        limiter=limiter,
        launchable=smem <= spec["smem_per_block_optin"] and regs <= spec["max_regs_per_thread"],
    )


# --- static global-memory account of the TTIR ----------------------------------------------------


class _Opaque:
    """A value the account does not evaluate (float data, loads, reductions)."""


OPAQUE = _Opaque()


@dataclasses.dataclass
class _Ptr:
    arg: int
    offset: np.ndarray  # element offsets, broadcastable to (programs, *shape)


class Unanalysable(Exception):
    pass


_CMP = {
    0: np.equal,
    1: np.not_equal,
    2: np.less,
    3: np.less_equal,
    4: np.greater,
    5: np.greater_equal,
    6: np.less,
    7: np.less_equal,
    8: np.greater,
    9: np.greater_equal,
}


def _tdiv(a, b):
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) ^ (b < 0), -q, q)


_BINARY = {
    "arith.addi": np.add,
    "arith.subi": np.subtract,
    "arith.muli": np.multiply,
    "arith.divsi": _tdiv,
    "arith.divui": np.floor_divide,
    "arith.ceildivsi": lambda a, b: -(-a // b),
    "arith.floordivsi": np.floor_divide,
    "arith.remsi": lambda a, b: a - _tdiv(a, b) * b,
    "arith.remui": np.remainder,
    "arith.andi": np.bitwise_and,
    "arith.ori": np.bitwise_or,
    "arith.xori": np.bitwise_xor,
    "arith.minsi": np.minimum,
    "arith.maxsi": np.maximum,
    "arith.minui": np.minimum,
    "arith.maxui": np.maximum,
    "arith.shli": np.left_shift,
    "arith.shrsi": np.right_shift,
    "arith.shrui": np.right_shift,
}
_PASS = (
    "arith.extsi",
    "arith.extui",
    "arith.trunci",
    "arith.index_cast",
    "arith.index_castui",
    "arith.bitcast",
)


def _is_int_like(t) -> bool:
    s = str(t)
    return bool(re.search(r"(^|[<x])(i\d+|index)(>|$)", s)) or "!tt.ptr" in s


def _shape(t) -> tuple[int, ...]:
    from jax._src.lib.mlir import ir

    try:
        return tuple(ir.RankedTensorType(t).shape)
    except Exception:
        return ()


def _elem_bytes(t) -> int:
    s = str(t)
    m = re.search(r"(?:x|<|^)(bf16|f16|f32|f64|i1|i8|i16|i32|i64|f8\w*)(?:>|$)", s)
    if not m:
        raise Unanalysable(f"element type of {s}")
    name = m.group(1)
    if name == "i1":
        return 1
    if name.startswith("f8"):
        return 1
    return int(re.sub(r"\D", "", name)) // 8


@dataclasses.dataclass
class BufferAccess:
    index: int
    role: str  # "in" or "out"
    shape: tuple[int, ...]
    dtype: str
    size: int  # bytes
    read: int = 0  # bytes over active lanes, all programs
    written: int = 0
    read_unique: int = 0
    written_unique: int = 0
    max_writes: int = 0  # most writes of one element
    out_of_bounds: int = 0  # active lanes outside the buffer
    loads: int = 0  # tt.load ops executed (per program summed)
    stores: int = 0


def _accumulator(b: BufferAccess) -> bool:
    """Whether output `b` is an accumulator the kernel reads back, whose elements are written
    more than once by design: a persistent program's partial row, read, added to and written
    back per row block (the row norms' chunked backward). Any other output written twice is a
    race or wasted bytes."""
    return b.role == "out" and b.read_unique > 0


class _Account:
    def __init__(self, call: TritonCall, batch_elems: int = 1 << 22):
        self.call = call
        self.buffers = []
        for i, (shape, dtype) in enumerate(call.operands):
            n = int(np.prod(shape)) if shape else 1
            self.buffers.append(
                BufferAccess(
                    i, "in" if i < call.n_inputs else "out", shape, dtype, n * _elem_bytes(dtype)
                )
            )
        self.offsets_r = [
            [] for _ in self.buffers
        ]  # active in-bounds offsets, bincounted at the end
        self.offsets_w = [[] for _ in self.buffers]
        self.batch_elems = batch_elems
        self.atomics = 0
        self.notes: list[str] = []

    # values are numpy arrays of ndim 1 + len(shape), dim 0 the programs (possibly broadcast: 1)
    def run(self):
        from jax._src.lib.mlir import ir

        with _ir_context():
            module = ir.Module.parse(self.call.ir)
            # What the GPU compiler keeps: Pallas lowers `ref[...] = v` as a swap whose old value
            # (a load of the output) is dead; Triton's canonicalizer drops it, so do we.
            try:
                from jax._src.lib.mlir import passmanager

                passmanager.PassManager.parse("builtin.module(canonicalize,cse)").run(
                    module.operation
                )
            except Exception as e:  # keep going on the raw TTIR; dead loads are skipped below
                self.notes.append(f"canonicalize failed: {e}")
            funcs = [op for op in module.body.operations if op.operation.name == "tt.func"]
            if len(funcs) != 1:
                raise Unanalysable(f"{len(funcs)} tt.func in the module")
            func = funcs[0]
            block = func.regions[0].blocks[0]
            gx, gy, gz = self.call.grid
            n_prog = gx * gy * gz
            tile = max(
                (
                    int(np.prod(_shape(r.type)))
                    for op in _walk_ops(block)
                    for r in op.results
                    if _shape(r.type)
                ),
                default=1,
            )
            batch = max(1, min(n_prog, self.batch_elems // max(tile, 1)))
            for start in range(0, n_prog, batch):
                pids = np.arange(start, min(n_prog, start + batch))
                self.pid = (pids % gx, (pids // gx) % gy, pids // (gx * gy))
                env = {}
                for i, a in enumerate(block.arguments):
                    if "!tt.ptr" in str(a.type):
                        env[a] = _Ptr(i, np.zeros((1,), np.int64))
                    else:
                        env[a] = OPAQUE
                self._block(block, env)
        for i, b in enumerate(self.buffers):
            n = b.size // _elem_bytes(b.dtype)
            eb = _elem_bytes(b.dtype)
            if self.offsets_r[i]:
                counts = np.bincount(np.concatenate(self.offsets_r[i]), minlength=n)
                b.read_unique = int(np.count_nonzero(counts)) * eb
            if self.offsets_w[i]:
                counts = np.bincount(np.concatenate(self.offsets_w[i]), minlength=n)
                b.written_unique = int(np.count_nonzero(counts)) * eb
                b.max_writes = int(counts.max())
        return self

    def _block(self, block, env):
        out = None
        for op in block.operations:
            out = self._op(op, env)
        return out

    def _get(self, env, v):
        if v not in env:
            raise Unanalysable(f"value defined outside the evaluated region: {v}")
        return env[v]

    def _op(self, op, env):
        name = op.operation.name
        ins = [self._get(env, v) for v in op.operands]
        res = list(op.results)
        attrs = op.attributes

        def attr_int(k):
            return int(re.match(r"-?\d+", str(attrs[k])).group(0))

        def set1(value):
            env[res[0]] = value

        if name in ("tt.return", "tt.reduce.return", "tt.scan.return"):
            return None
        if name == "scf.yield":
            return ins
        if name == "arith.constant":
            t = res[0].type
            if not _is_int_like(t):
                return set1(OPAQUE)
            s = str(attrs["value"])
            m = re.match(r"dense<(-?\d+|true|false)>", s) or re.match(r"(-?\d+|true|false)", s)
            if not m:
                return set1(OPAQUE)
            v = {"true": 1, "false": 0}.get(m.group(1), None)
            v = int(m.group(1)) if v is None else v
            return set1(np.full((1,) + (1,) * len(_shape(t)), v, np.int64))
        if name == "tt.get_program_id":
            return set1(self.pid[attr_int("axis")].astype(np.int64))
        if name == "tt.get_num_programs":
            return set1(np.array([self.call.grid[attr_int("axis")]], np.int64))
        if name == "tt.make_range":
            return set1(np.arange(attr_int("start"), attr_int("end"), dtype=np.int64)[None])
        if name in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape"):
            x = ins[0]
            shape = _shape(res[0].type)
            if x is OPAQUE:
                return set1(OPAQUE)
            arr = x.offset if isinstance(x, _Ptr) else x
            if name == "tt.splat":
                arr = arr.reshape(arr.shape[:1] + (1,) * len(shape))
            elif name == "tt.expand_dims":
                arr = np.expand_dims(arr, 1 + attr_int("axis"))
            elif name == "tt.reshape":
                arr = np.broadcast_to(arr, arr.shape[:1] + _shape(op.operands[0].type))
                arr = arr.reshape(arr.shape[:1] + shape)
            return set1(_Ptr(x.arg, arr) if isinstance(x, _Ptr) else arr)
        if name == "tt.addptr":
            p, off = ins
            if p is OPAQUE or off is OPAQUE:
                return set1(OPAQUE)
            return set1(_Ptr(p.arg, p.offset + off))
        if name in _BINARY:
            a, b = ins
            if a is OPAQUE or b is OPAQUE:
                return set1(OPAQUE)
            return set1(_BINARY[name](a, b))
        if name == "arith.cmpi":
            a, b = ins
            if a is OPAQUE or b is OPAQUE:
                return set1(OPAQUE)
            return set1(_CMP[attr_int("predicate")](a, b).astype(np.int64))
        if name == "arith.select":
            c, a, b = ins
            if any(v is OPAQUE for v in ins):
                return set1(OPAQUE)
            if isinstance(a, _Ptr) or isinstance(b, _Ptr):
                if not (isinstance(a, _Ptr) and isinstance(b, _Ptr) and a.arg == b.arg):
                    raise Unanalysable("select between pointers of different buffers")
                return set1(_Ptr(a.arg, np.where(c != 0, a.offset, b.offset)))
            return set1(np.where(c != 0, a, b))
        if name in _PASS:
            return set1(ins[0])
        if name == "tt.load":
            if len(list(res[0].uses)):  # a dead load is not emitted
                self._access(op, ins, load=True)
            return set1(OPAQUE)
        if name == "tt.store":
            self._access(op, ins, load=False)
            return None
        if name in ("tt.atomic_rmw", "tt.atomic_cas"):
            self.atomics += 1
            self._access(op, ins, load=True, atomic=True)
            self._access(op, ins, load=False, atomic=True)
            return set1(OPAQUE)
        if name in (
            "tt.make_tensor_ptr",
            "tt.advance",
            "tt.descriptor_load",
            "tt.descriptor_store",
        ):
            raise Unanalysable(f"{name} (block pointers / TMA descriptors) is not evaluated")
        if name == "scf.for":
            lb, ub, step, *init = ins
            for v in (lb, ub, step):
                if v is OPAQUE or np.unique(v).size != 1:
                    raise Unanalysable(
                        "scf.for bounds that vary between programs or depend on data"
                    )
            body = op.regions[0].blocks[0]
            carried = list(init)
            for iv in range(int(np.ravel(lb)[0]), int(np.ravel(ub)[0]), int(np.ravel(step)[0])):
                benv = dict(env)
                benv[body.arguments[0]] = np.array([iv], np.int64)
                for a, v in zip(list(body.arguments)[1:], carried, strict=True):
                    benv[a] = v
                carried = self._block(body, benv) or []
            for r, v in zip(res, carried, strict=True):
                env[r] = v
            return None
        if name == "scf.if":
            c = ins[0]
            if c is OPAQUE:
                raise Unanalysable("scf.if on a condition that depends on data")
            if np.unique(c).size != 1:
                return self._split_if(op, c, env)
            region = op.regions[0] if int(np.ravel(c)[0]) else op.regions[1]
            if len(region.blocks) == 0:
                return None
            outs = self._block(region.blocks[0], dict(env)) or []
            for r, v in zip(res, outs, strict=False):
                env[r] = v
            return None
        if name in ("scf.while",):
            raise Unanalysable("scf.while")
        # Anything else (float math, reductions, extern calls, conversions to float) is data.
        for r in res:
            if _is_int_like(r.type) and "!tt.ptr" in str(r.type):
                raise Unanalysable(f"pointer produced by {name}")
            env[r] = OPAQUE
        return None

    def _split_if(self, op, c, env):
        """An `scf.if` whose condition varies between the programs (it is evaluated, so it
        depends on the program ids only, not on data): each region run by the programs that
        take it, and its results merged per program."""
        pid = self.pid
        n = len(pid[0])
        taken = np.broadcast_to(np.asarray(c).reshape(-1) != 0, (n,))
        branches = []
        for region, which in zip(op.regions, (taken, ~taken), strict=True):
            idx = np.flatnonzero(which)
            if idx.size == 0 or len(region.blocks) == 0:
                continue
            self.pid = tuple(p[idx] for p in pid)
            local = {k: _programs(v, idx, n) for k, v in env.items()}
            try:
                branches.append((idx, self._block(region.blocks[0], local) or []))
            finally:
                self.pid = pid
        for i, r in enumerate(op.results):
            env[r] = _merge_programs([(idx, outs[i]) for idx, outs in branches], n)
        return None

    def _access(self, op, ins, load: bool, atomic: bool = False):
        try:
            view = op.opview if hasattr(op, "opview") else op
            mask_v = getattr(view, "mask", None)
        except Exception:
            mask_v = None
        ptr = ins[0]
        if atomic:
            name = op.operation.name
            ptr = ins[1] if name == "tt.atomic_rmw" else ins[0]
        mask = None
        if mask_v is not None:
            idx = [i for i, v in enumerate(op.operands) if v == mask_v]
            mask = ins[idx[-1]] if idx else None
        if ptr is OPAQUE or not isinstance(ptr, _Ptr):
            raise Unanalysable(f"{op.operation.name} through a data-dependent pointer")
        if mask is OPAQUE:
            raise Unanalysable(f"{op.operation.name} with a data-dependent mask")
        shape = _shape(op.operands[0].type) if not atomic else _shape(ptr.offset.shape)
        n_prog = len(self.pid[0])
        full = (n_prog,) + tuple(shape if shape else ())
        offs = np.broadcast_to(ptr.offset, full)
        active = np.ones(full, bool) if mask is None else np.broadcast_to(mask != 0, full)
        b = self.buffers[ptr.arg]
        eb = _elem_bytes(b.dtype)
        n = b.size // eb
        sel = offs[active]
        oob = (sel < 0) | (sel >= n)
        b.out_of_bounds += int(np.count_nonzero(oob))
        sel = sel[~oob]
        if load:
            b.read += sel.size * eb
            b.loads += n_prog
            self.offsets_r[ptr.arg].append(sel)
        else:
            b.written += sel.size * eb
            b.stores += n_prog
            self.offsets_w[ptr.arg].append(sel)


def _programs(value, idx: np.ndarray, n: int):
    """`value` (an evaluated array or pointer, its axis 0 the `n` programs or broadcast)
    for the programs `idx` only."""
    arr = value.offset if isinstance(value, _Ptr) else value
    if not isinstance(arr, np.ndarray) or n == 1 or arr.shape[0] != n:
        return value
    return _Ptr(value.arg, arr[idx]) if isinstance(value, _Ptr) else arr[idx]


def _merge_programs(parts: list[tuple[np.ndarray, Any]], n: int):
    """One value for the `n` programs from `(programs, value)` parts covering them (the
    results of the two regions of a split `scf.if`)."""
    values = [v for _, v in parts]
    if not parts or any(v is OPAQUE for v in values):
        return OPAQUE
    ptrs = [v for v in values if isinstance(v, _Ptr)]
    if ptrs and (len(ptrs) != len(values) or len({p.arg for p in ptrs}) != 1):
        raise Unanalysable("scf.if yielding pointers of different buffers")
    arrays = [v.offset if isinstance(v, _Ptr) else v for v in values]
    tail = np.broadcast_shapes(*(a.shape[1:] for a in arrays))
    merged = np.zeros((n, *tail), np.int64)
    for (idx, _), a in zip(parts, arrays, strict=True):
        merged[idx] = np.broadcast_to(a, (len(idx) if a.shape[0] != 1 else 1, *tail))
    return _Ptr(ptrs[0].arg, merged) if ptrs else merged


def _walk_ops(block):
    for op in block.operations:
        yield op
        for region in op.regions:
            for b in region.blocks:
                yield from _walk_ops(b)


def traffic(call: TritonCall) -> tuple[list[BufferAccess] | None, str | None]:
    try:
        acc = _Account(call).run()
        return acc.buffers, None
    except Unanalysable as e:
        return None, str(e)


# --- report --------------------------------------------------------------------------------------


@dataclasses.dataclass
class KernelReport:
    """What one Triton kernel would get on an sm_90 GPU. `ptxas` and `occupancy` are `None`
    where the installed CUDA plugin does not expose XLA's Triton compiler (jax 0.11+)."""

    name: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    smem_bytes: int | None
    ptxas: PtxasStats | None
    occupancy: dict[str, Any] | None
    buffers: list[BufferAccess] | None
    traffic_note: str | None
    ideal_bytes: int  # operands read once, results written once
    dram_bytes: int | None  # every element the kernel touches moved once (re-reads hit L2)
    access_bytes: int | None  # every access goes to HBM (small shared operands read once)
    problems: list[str]  # what would fail or hurt on the GPU: spills, out of bounds, races, limits
    notes: list[str]  # worth a look: inputs not fully read


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _compiled_stats(call: TritonCall, arch: str, workdir: str, stem: str):
    """`(dynamic shared memory, ptxas stats)` of `call`, or `(None, None)` without XLA's Triton
    compiler."""
    compiled = compile_to_ptx(call, arch)
    if compiled is None:
        return None, None
    ptx, smem = compiled
    sm = "sm_" + arch.replace(".", "") + ("a" if arch.startswith("9") else "")
    stats = ptxas(ptx, sm, workdir, stem)
    found = stats.get(call.name) or next(iter(stats.values()), PtxasStats())
    return smem, dataclasses.replace(found, bar_syncs=bar_syncs(ptx))


def analyse(call: TritonCall, arch: str, workdir: str, index: int) -> KernelReport:
    """Compile (where possible) and account for one kernel; see [`KernelReport`][]."""
    stem = f"{index:02d}_{call.name}"
    with open(os.path.join(workdir, stem + ".ttir"), "w") as f:
        f.write(ttir_text(call))
    smem, st = _compiled_stats(call, arch, workdir, stem)
    occ = None if st is None else occupancy(st.registers, call.num_warps, smem)
    buffers, note = traffic(call)
    ideal = sum(int(np.prod(s) if s else 1) * _elem_bytes(d) for s, d in call.operands)
    problems, notes = [], []
    if st is not None:
        if st.spill_stores or st.spill_loads or st.stack:
            problems.append(
                f"register spills: {st.spill_stores} B stored, {st.spill_loads} B loaded, "
                f"stack {st.stack} B"
            )
        problems.extend(st.warnings)
        if not occ["launchable"]:
            problems.append("not launchable: shared memory or registers over the sm_90 limit")
    if call.grid[1] > 65535 or call.grid[2] > 65535:
        problems.append(f"grid {call.grid} exceeds CUDA's 65535 on y/z")
    dram = accessed = None
    if buffers is None:
        problems.append(f"traffic not analysable: {note}")
    else:
        for b in buffers:
            if b.out_of_bounds:
                problems.append(
                    f"operand {b.index} ({b.role}): {b.out_of_bounds} active lanes out of bounds"
                )
            if b.role == "out" and b.max_writes > 1 and not _accumulator(b):
                problems.append(f"output {b.index}: some element written {b.max_writes} times")
            if b.role == "out" and b.written_unique < b.size:
                frac = b.written_unique / b.size
                problems.append(f"output {b.index} {b.dtype}{list(b.shape)}: {frac:.1%} written")
            if b.role == "in" and b.read_unique < b.size:
                frac = b.read_unique / b.size
                notes.append(f"input {b.index} {b.dtype}{list(b.shape)}: {frac:.1%} read")
        dram = sum(b.read_unique + b.written_unique for b in buffers)
        # Parameters every program reads (under 1 MiB, read at least twice over) stay in L2.
        accessed = sum(
            (b.read_unique if b.size <= 2**20 and b.read >= 2 * b.size else b.read) + b.written
            for b in buffers
        )
    return KernelReport(
        call.name,
        call.grid,
        call.num_warps,
        call.num_stages,
        smem,
        st,
        occ,
        buffers,
        note,
        ideal,
        dram,
        accessed,
        problems,
        notes,
    )


def kernel_reports(fn, *args, arch: str = "9.0", workdir: str | None = None) -> list[KernelReport]:
    """[`KernelReport`][]s of every Triton kernel of `jax.jit(fn)(*args)`, in launch order."""
    workdir = workdir or tempfile.mkdtemp(prefix="eqxnorm_deviceless_")
    os.makedirs(workdir, exist_ok=True)
    return [analyse(c, arch, workdir, i) for i, c in enumerate(triton_calls(fn, *args))]


# --- whole program, deviceless XLA ---------------------------------------------------------------

_HLO_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}


def _hlo_element_bytes(shape: str) -> list[int]:
    """The bytes of each array of a shape (one, or a tuple's elements in order)."""
    return [
        _HLO_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        for dt, dims in re.findall(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]", shape)
        if dt in _HLO_BYTES
    ]


def _hlo_shape_bytes(shape: str) -> int:
    return sum(_hlo_element_bytes(shape))


_HLO_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (\([^)]*\)|\S+) ([\w-]+)\((.*?)\)(?:, |$)")
# The DRAM sector: the least a strided read moves per element.
SECTOR_BYTES = 32


def _operand_names(operands: str) -> list[str]:
    return [re.sub(r"/\*.*?\*/", "", o).strip().lstrip("%") for o in operands.split(",")]


def _sliced_parameter_bytes(body: list[str]) -> dict[int, int]:
    """For a fused computation's lines, `{parameter number: bytes}` of each parameter read only
    through `slice`s (possibly after bitcasts): what those slices read, each contiguous run of
    its last dimension rounded up to a DRAM sector (a `[0:1]` slice per row of `x` reads one
    sector per row, not `x`)."""
    parsed = [m.groups() for m in map(_HLO_INSTRUCTION.match, body) if m]
    uses: dict[str, list[tuple[str, str, str]]] = {}
    params: dict[str, int] = {}
    for name, shape, opcode, operands in parsed:
        if opcode == "parameter":
            params[name] = int(operands)
        for operand in _operand_names(operands):
            uses.setdefault(operand, []).append((name, shape, opcode))

    def read(name: str) -> int | None:
        total = 0
        for user, shape, opcode in uses.get(name, []):
            if opcode == "bitcast":
                more = read(user)
                if more is None:
                    return None
                total += more
            elif opcode == "slice":
                dt, dims = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape)[0]
                dims = [int(d) for d in dims.split(",") if d] or [1]
                run = dims[-1] * _HLO_BYTES.get(dt, 4)
                total += int(np.prod(dims[:-1])) * -(-run // SECTOR_BYTES) * SECTOR_BYTES
            else:
                return None
        return total

    found = {number: read(name) for name, number in params.items() if name in uses}
    return {number: b for number, b in found.items() if b is not None}


def hlo_launch_bytes(hlo_text: str) -> list[tuple[str, str, int]]:
    """(instruction, kind, operand + result bytes) of every kernel-launching instruction (fusion,
    custom-call) of the ENTRY computation of an optimised HLO module: the traffic each would move
    reading each operand once and writing its result once; a fusion's operand that it only
    slices counts what the slices read ([`_sliced_parameter_bytes`][])."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY )?%(\S+) \(", line)
        if header and line.rstrip().endswith("{"):
            current = computations.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    entry = hlo_text[hlo_text.index("\nENTRY ") :] if "\nENTRY " in hlo_text else hlo_text
    shapes, launches = {}, []
    for line in entry.splitlines():
        m = _HLO_INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, operands = m.groups()
        shapes[name] = _hlo_shape_bytes(shape)
        # A multi-output instruction's element `i` is read as the operand `%name#i`.
        for i, size in enumerate(_hlo_element_bytes(shape) if shape.startswith("(") else []):
            shapes[f"{name}#{i}"] = size
        if opcode in ("fusion", "custom-call"):
            names = _operand_names(operands)
            called = re.search(r"calls=%([\w.\-]+)", line)
            sliced = {}
            if opcode == "fusion" and called and called.group(1) in computations:
                sliced = _sliced_parameter_bytes(computations[called.group(1)])
            ins = sum(
                min(sliced.get(i, shapes.get(n, 0)), shapes.get(n, 0))
                for i, n in enumerate(names)
                if n
            )
            kind = "triton" if "__gpu$xla.gpu.triton" in line else opcode
            launches.append((name, kind, ins + shapes[name]))
    return launches


@dataclasses.dataclass
class Launch:
    """One kernel launch of a compiled program: XLA's thunk name, grid, threads per block,
    shared memory, and ptxas's statistics for it where XLA dumped its PTX (jax 0.10)."""

    name: str
    grid: str
    threads: str
    smem: int
    ptxas: PtxasStats | None


@dataclasses.dataclass
class ProgramReport:
    """`jax.jit(fn)` compiled by XLA for a GPU it does not have."""

    seconds: float
    launches: list[Launch]
    program_bytes: int  # each launch reading its operands once and writing its results once
    ideal_bytes: int  # the arguments read once and the results written once
    problems: list[str]


def xla_compile(
    fn, *args, target_config: str = H200_TARGET_CONFIG, workdir: str | None = None
) -> ProgramReport:
    """Compile `jax.jit(fn)` with XLA's GPU compiler for `target_config` (an H200), without a
    GPU: what `jax.jit(fn)(*args)` builds there. XLA is told to fail on any register spill, so
    a spilling kernel (Triton's or XLA's) is a problem on every JAX version."""
    from jax.experimental import topologies

    work = workdir or tempfile.mkdtemp(prefix="eqxnorm_deviceless_xla_")
    dump = os.path.join(work, "xla_dump")
    os.makedirs(dump, exist_ok=True)
    topo = topologies.get_topology_desc(
        platform="cuda", target_config=target_config, topology="1x1x1"
    )
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    options = {
        "xla_dump_to": dump,
        "xla_dump_hlo_as_text": True,
        "xla_gpu_fail_ptx_compilation_on_register_spilling": True,
    }
    start = time.time()
    try:
        jax.jit(fn).lower(*specs).compile(compiler_options=options)
    except Exception as error:  # XLA's own message says which kernel spilled
        if "spill" not in str(error).lower():
            raise
        return ProgramReport(time.time() - start, [], 0, 0, [f"XLA: {str(error)[:500]}"])
    seconds = time.time() - start
    files = sorted(glob.glob(os.path.join(dump, "*")), key=os.path.getmtime)
    thunks = [f for f in files if f.endswith("thunk_sequence.txt")]
    hlos = [f for f in files if f.endswith("gpu_after_optimizations.txt")]
    lines = open(thunks[-1]).read().strip().splitlines() if thunks else []
    launch_bytes = hlo_launch_bytes(open(hlos[-1]).read()) if hlos else []
    leaves = jax.tree.leaves(args) + jax.tree.leaves(jax.eval_shape(fn, *args))
    ideal = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves)
    resources: dict[str, PtxasStats] = {}
    for i, f in enumerate(x for x in files if x.endswith(".ptx") and os.path.getsize(x) > 0):
        resources.update(ptxas(open(f).read(), "sm_90a", work, f"xla_{i}"))
    launches = []
    for line in lines:
        m = re.search(
            r"(kKernel|kCustomKernel)\S* .*?(\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]"
            r"\s+shared_memory: (\d+)",
            line,
        )
        if m:
            name = m.group(2)
            launches.append(
                Launch(name, m.group(3), m.group(4), int(m.group(5)), resources.get(name))
            )
    problems = [
        f"{k.name}: spills {k.ptxas.spill_stores}/{k.ptxas.spill_loads} B, stack {k.ptxas.stack} B"
        for k in launches
        if k.ptxas and (k.ptxas.spill_stores or k.ptxas.spill_loads or k.ptxas.stack)
    ]
    moved = sum(b for _, _, b in launch_bytes)
    return ProgramReport(seconds, launches, moved, ideal, problems)


# --- Mosaic GPU kernels ------------------------------------------------------------------------


def _ptxas_info(text: str) -> list[dict[str, Any]]:
    """Each Mosaic GPU kernel in ptxas's `-v` output (`MOSAIC_GPU_DUMP_PTXAS=1`): its name,
    registers and spill bytes."""
    out = []
    for m in re.finditer(
        r"Function properties for (\S+)\n(.*?)Used (\d+) registers", text, flags=re.S
    ):
        name, props, regs = m.group(1), m.group(2), int(m.group(3))
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", props)
        stack = re.search(r"(\d+) bytes stack frame", props)
        out.append(
            {
                "name": name,
                "registers": regs,
                "spill_bytes": sum(map(int, spills.groups())) if spills else 0,
                "stack_bytes": int(stack.group(1)) if stack else 0,
            }
        )
    return out


def _ptx_modules(text: str) -> dict[str, str]:
    """`{kernel name: its PTX}` from Mosaic GPU's dump of each kernel's PTX module
    (`MOSAIC_GPU_DUMP_PTX=1`, printed before ptxas's report of it): each module from LLVM's
    header to the next one's."""
    modules = {}
    for part in re.split(r"(?m)^// Generated by LLVM NVPTX Back-End", text)[1:]:
        if m := re.search(r"\.entry (\w+)\(", part):
            modules[m.group(1)] = part
    return modules


@contextlib.contextmanager
def _mosaic_gpu_launches(record: dict[str, dict]):
    """Record, for each Mosaic GPU kernel lowered meanwhile, its launch by kernel name: `grid`
    and `smem_bytes`, the dynamic shared memory of a block (its scratch buffers and barriers,
    which ptxas does not see), from Mosaic GPU's own lowering (`_lower_as_gpu_kernel`, the
    function that builds the launch, whose arguments are as of jax 0.12)."""
    from jax.experimental.mosaic.gpu import core

    original = core._lower_as_gpu_kernel

    def lower(*args, **kwargs):
        smem = core._smem_tree_size(kwargs["smem_scratch_shape"])
        grid = [int(g) for g in kwargs["grid"]]
        record[kwargs["kernel_name"]] = {"grid": grid, "smem_bytes": int(smem)}
        return original(*args, **kwargs)

    core._lower_as_gpu_kernel = lower
    try:
        yield
    finally:
        core._lower_as_gpu_kernel = original


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def mosaic_gpu_compile(fn, *args, workdir: str | None = None):
    """`(xla_compile(fn, *args), kernels)`: the whole program compiled deviceless for an H200,
    and ptxas's statistics of each Mosaic GPU kernel in it (name, registers, spill and stack
    bytes, `register_occupancy`: the share of an SM's warps its one-warpgroup blocks may
    hold as far as registers allow, `bar_syncs`: its PTX's barrier instructions, [`bar_syncs`][],
    and from the kernel's launch, [`_mosaic_gpu_launches`][], `grid`, `smem_bytes` and
    `occupancy` as registers and shared memory allow). Mosaic GPU compiles its kernels inside
    XLA's compile and prints each one's PTX and ptxas's report when `MOSAIC_GPU_DUMP_PTX` and
    `MOSAIC_GPU_DUMP_PTXAS` are set (and `MOSAIC_GPU_DUMP_TO` is not, which sends them to
    files): they are captured from file descriptors 1 and 2."""
    import sys

    work = workdir or tempfile.mkdtemp(prefix="eqxnorm_mosaic_gpu_")
    log = os.path.join(work, "ptxas.txt")
    dumps = {"MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_PTX": "1", "MOSAIC_GPU_DUMP_TO": None}
    previous = {name: os.environ.get(name) for name in dumps}
    _set_environment(dumps)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    launches: dict[str, dict] = {}
    try:
        with open(log, "w") as f, _mosaic_gpu_launches(launches):
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                program = xla_compile(fn, *args, workdir=work)
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        _set_environment(previous)
    text = open(log).read()
    kernels, ptx = _ptxas_info(text), _ptx_modules(text)
    for k in kernels:
        k["bar_syncs"] = bar_syncs(ptx[k["name"]]) if k["name"] in ptx else None
        k["register_occupancy"] = occupancy(k["registers"], 4, 0)["occupancy"]
        launch = next((v for name, v in launches.items() if k["name"].startswith(name)), None)
        if launch is not None:
            k.update(launch)
            k["occupancy"] = occupancy(k["registers"], 4, launch["smem_bytes"])["occupancy"]
        if k["spill_bytes"] or k["stack_bytes"]:
            program.problems.append(
                f"{k['name']}: spills {k['spill_bytes']} B, stack {k['stack_bytes']} B"
            )
    return program, kernels
