r"""What every Pallas kernel of eqxnorm shares: compilation targets, the one block-size
heuristic, masked block access, the in-kernel statistics, and per-platform staging.

**Targets.** One kernel body serves three targets, chosen by the platform the computation is
lowered for (`lax.platform_dependent`, so exporting for `cuda` or `tpu` from a CPU machine
lowers the real kernel):

- `TRITON` (cuda, rocm): blocks are padded to powers of two, as Triton requires, and every
  load and store is masked to the array's bounds.
- `MOSAIC` (tpu): blocks span the whole feature axis (a block dimension equal to the array's
  is always legal) and row blocks are multiples of 8 sublanes; partial edge blocks are padded
  by the pipeline, and their rows are masked out of every statistic. Mosaic has no float16
  vectors: float16 operands and outputs are float32 inside the call (`stored_dtype`).
  Blocks that keep a wide row whole ask for the VMEM they need (`mosaic_vmem_bytes`).
- `INTERPRET` (cpu and any other platform): the Triton blocks, run by Pallas' interpreter,
  so the tests on CPU exercise the padding and masking the GPU relies on.

**Statistics.** [`block_moments`][] is the kernels' counterpart of
`eqxnorm.kernels.reference.moments`: float32, the two-pass variance about a shift (the row's
first element), the mean kept as `shift + offset`, padding masked out. Rows too wide for one
block are reduced chunk by chunk and combined with [`chan_combine`][] (Chan, Golub &
LeVeque's parallel update), which, like the two-pass variance, never forms `E[x²] − E[x]²`.

**Sharding.** A kernel call is one opaque custom call to XLA, which replicates it under
`jax.jit` with sharded operands: every device gathers the whole batch. [`per_platform`][]'s
`sharding=` [`Rule`][] (from `eqxnorm.kernels._sharding`) runs it on each device's slice
instead. The contract, for every call whose operands carry a batch:

- Name every axis of every operand and output position, in order, `None` ones included:
  `Rule("g r d, g r d, g d, g d -> g r d, g r d, g r, g r, g r", split="g r")` for
  `(x, residual, weight, bias) -> (y, h, shift, offset, rstd)`.
- `split` lists the factors the call is independent along (examples, rows, groups): the
  kernel must give the same results on any block of them. Every other factor (what a
  statistic reduces over: features, channels, spatial) is gathered whole.
- An output lacking a split factor is a sum over it (a parameter gradient over rows), added
  across devices with `psum`; anything else needs the rule's `combine` (BatchNorm's partial
  moments). Where no operand has that factor with the output's own split factors, the
  output's entry must say: `+r` a sum over `r`, `~r` independent of it (two outputs of two
  token factors); unmarked, the call raises.
- A factor written `b?` is optional: an operand with fewer axes lacks it, e.g. `"b? c"` for
  a parameter shared by the examples `(channels,)` or per example `(batch, channels)`.

Without a rule the call stays correct: it runs on the operands gathered whole.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:  # the masked loads and stores; a JAX without Pallas' Triton backend: see `_triton.AVAILABLE`
    from jax.experimental.pallas import triton as plgpu
except ImportError:
    plgpu = None

from . import _triton, _tuning
from ._sharding import Rule, empty_batch, gathered, partitioned

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Target:
    """How a kernel is compiled: `name`, whether blocks are padded to powers of two and
    accessed through masks (`masked`), and whether Pallas interprets it (`interpret`)."""

    name: str
    masked: bool
    interpret: bool


TRITON = Target("triton", masked=True, interpret=False)
MOSAIC = Target("mosaic", masked=False, interpret=False)
INTERPRET = Target("interpret", masked=True, interpret=True)
# Mosaic GPU kernels (`plgpu.kernel`s, `eqxnorm.kernels._mosaic_gpu`), compiled for a cuda GPU
# or run by Mosaic GPU's own interpreter.
MOSAIC_GPU = Target("mosaic_gpu", masked=False, interpret=False)
MOSAIC_GPU_INTERPRET = Target("mosaic_gpu_interpret", masked=False, interpret=True)

# The kernel backends a call can be pinned to on a GPU (`impl="triton"`, `impl="mosaic_gpu"`);
# `"auto"` chooses (see [`per_platform`][]).
GPU_BACKENDS = ("auto", "triton", "mosaic_gpu")


class MosaicGPU(NamedTuple):
    """A kernel family's Mosaic GPU launch, `launch(target, *operands)` with the contract of
    the Triton-style `fn` it stands beside, and `supported(*operands)`: whether it can run
    those operands (dtypes, and rows that TMA can stage and that fit on chip). `auto`: whether
    `backend="auto"` takes it where it runs and the tuning cache has not measured it against
    Triton on this device (else it runs only when pinned, `"mosaic_gpu"`, or measured
    faster): as measured on an H200 against the Triton kernels beside it."""

    launch: Callable[..., Any]
    supported: Callable[..., bool]
    auto: bool = True


def per_platform(
    fn: Callable[..., Any],
    *args: Any,
    sharding: Rule | None = None,
    mosaic_gpu: MosaicGPU | None = None,
    backend: str = "auto",
    op: str | None = None,
) -> Any:
    """`fn(target, *args)` for the target of the platform the computation is lowered for.

    Every branch is traced; only the lowering platform's is compiled. With a `sharding`
    [`Rule`][], a call whose operands are sharded across devices runs on each device's slice
    (see the module docstring); without one, on the operands gathered onto every device
    (`_sharding.gathered`).
    `op` names the call's op in the tuning cache's keys where `fn` does not
    (`_tuning.launch_of`).

    On cuda, with a `mosaic_gpu` launch, `backend` chooses between it and `fn` on Triton:
    `"auto"` takes Mosaic GPU where the installed JAX has it (0.12+), the GPU compiled for has
    compute capability 9.0 or more, `mosaic_gpu.supported(*operands)`, and either the tuning
    cache measured it faster than Triton for these launches on this device or, where the
    cache did not measure both, the family's launch says so (`mosaic_gpu.auto`); else Triton;
    `"mosaic_gpu"` takes it or raises; `"triton"` takes Triton. A call pinned to
    `"mosaic_gpu"` is not staged per platform (see [`_pinned_mosaic_gpu`][]): off a GPU it
    runs Mosaic GPU's interpreter (the tests on CPU)."""
    if backend not in GPU_BACKENDS:
        raise ValueError(f"backend must be one of {GPU_BACKENDS}, but got backend={backend!r}.")

    launch = _tuning.launch_of(fn, args, op)

    def staged(*operands):
        with _tuning.launching(launch):
            return lax.platform_dependent(
                *operands,
                cuda=_on_cuda(fn, mosaic_gpu, backend, operands),
                rocm=functools.partial(fn, TRITON),
                tpu=functools.partial(_on_mosaic, fn),
                default=functools.partial(fn, INTERPRET),
            )

    if backend == "mosaic_gpu":
        with _tuning.launching(launch):
            return gathered(functools.partial(_pinned_mosaic_gpu, mosaic_gpu))(*args)
    if sharding is None:
        return gathered(staged)(*args)
    return partitioned(staged, sharding)(*args)


def _pinned_mosaic_gpu(mosaic_gpu: MosaicGPU, *operands: Any) -> Any:
    """A call pinned to Mosaic GPU: its kernels compiled when JAX's default backend is a GPU,
    else run by Mosaic GPU's interpreter. Chosen when tracing, not per lowering platform: the
    interpreter's ordered effects can be neither inside `lax.platform_dependent` under `vmap`
    ("IO effect not supported in vmap-of-cond") nor inside `custom_partitioning`, so a pinned
    call runs on its operands gathered whole, and exporting for cuda from a CPU machine takes
    `impl="pallas"`."""
    _check_mosaic_gpu(mosaic_gpu, operands)
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    return mosaic_gpu.launch(MOSAIC_GPU if on_gpu else MOSAIC_GPU_INTERPRET, *operands)


def _mosaic_gpu_runs(mosaic_gpu: MosaicGPU | None, operands) -> bool:
    """Whether the installed JAX has Mosaic GPU's API and `mosaic_gpu` takes `operands`."""
    from . import _mosaic_gpu

    return mosaic_gpu is not None and _mosaic_gpu.usable() and mosaic_gpu.supported(*operands)


def _check_mosaic_gpu(mosaic_gpu: MosaicGPU | None, operands) -> None:
    """`ValueError` unless a call pinned to Mosaic GPU can run `operands`."""
    if mosaic_gpu is None:
        raise ValueError("this kernel has no Mosaic GPU version; use impl='pallas'.")
    if not _mosaic_gpu_runs(mosaic_gpu, operands):
        raise ValueError(
            f"impl='mosaic_gpu' cannot run these operands on JAX {jax.__version__}: "
            "Mosaic GPU kernels need JAX 0.12 or newer, float16/bfloat16/float32 rows of "
            "a multiple of 16 bytes that fit on chip. Use impl='pallas' to let eqxnorm "
            "choose the backend."
        )


def _on_cuda(fn, mosaic_gpu: MosaicGPU | None, backend: str, operands) -> Callable[..., Any]:
    """The cuda branch of [`per_platform`][]: Mosaic GPU or Triton, as `backend` says."""
    from . import _mosaic_gpu

    if backend == "mosaic_gpu":
        _check_mosaic_gpu(mosaic_gpu, operands)
        return functools.partial(_as_triton_gives, fn, mosaic_gpu.launch)
    if backend == "auto" and _mosaic_gpu_runs(mosaic_gpu, operands):
        if _mosaic_gpu.target_supported() and _takes_mosaic_gpu(fn, mosaic_gpu, operands):
            return functools.partial(_as_triton_gives, fn, mosaic_gpu.launch)
    return functools.partial(fn, TRITON)


def _takes_mosaic_gpu(fn, mosaic_gpu: MosaicGPU, operands) -> bool:
    """Whether `backend="auto"` takes `mosaic_gpu` over `fn` on Triton for `operands` (both
    able to run them): as the tuning cache measured them on this device, where it measured
    both (`_tuning.faster_backend`), else as the family's launch says (`mosaic_gpu.auto`)."""
    measured = _tuning.faster_backend(
        {
            "triton": lambda: jax.eval_shape(functools.partial(fn, TRITON), *operands),
            "mosaic_gpu": lambda: jax.eval_shape(
                functools.partial(mosaic_gpu.launch, MOSAIC_GPU), *operands
            ),
        }
    )
    return mosaic_gpu.auto if measured is None else measured == "mosaic_gpu"


def _as_triton_gives(fn, launch, *operands: Any) -> Any:
    """`launch(MOSAIC_GPU, *operands)` with its outputs in the dtypes `fn` gives on Triton
    (the rocm branch beside it, whose outputs must match: a one-block Triton backward writes
    the parameter gradients in the weight's dtype, Mosaic GPU in float32; a GPU run found
    the mismatch, which no CPU lowering traces)."""
    expected = jax.eval_shape(functools.partial(fn, TRITON), *operands)
    return jax.tree.map(lambda o, e: o.astype(e.dtype), launch(MOSAIC_GPU, *operands), expected)


def stored_dtype(target: Target, dtype: Any) -> Any:
    """The dtype `target` writes an output of `dtype` in: float32 for float16 on Mosaic, which
    has no float16 vectors (see [`per_platform`][], which casts it back)."""
    return F32 if target is MOSAIC and jnp.dtype(dtype) == jnp.float16 else dtype


def _on_mosaic(fn: Callable[..., Any], *operands: Any) -> Any:
    """`fn(MOSAIC, *operands)`, with float16 operands converted to float32 around the call
    (Mosaic TPU has no float16 vectors: "Invalid vector type for load"; outputs of a dtype
    fixed by the kernel use [`stored_dtype`][]) and the outputs cast to the dtypes the other
    targets give. float16 on TPU so costs a conversion pass by XLA; bfloat16, TPU's own half
    precision, runs the kernel as it is."""
    if not any(o is not None and o.dtype == jnp.float16 for o in operands):
        return fn(MOSAIC, *operands)
    expected = jax.eval_shape(functools.partial(fn, INTERPRET), *operands)
    widened = [o.astype(F32) if o is not None and o.dtype == jnp.float16 else o for o in operands]
    return jax.tree.map(lambda o, e: o.astype(e.dtype), fn(MOSAIC, *widened), expected)


# --- the block-size heuristic ------------------------------------------------------------------

# Elements one program may hold at once. For Triton these live in registers: 16384 float32
# values over 16 warps is 32 registers per thread for the block, leaving room for the
# temporaries. For Mosaic they live in VMEM, where this is a small fraction of the space.
MAX_BLOCK_ELEMENTS = 16384
# Narrow rows are grouped until a block holds about this many elements, so a program does
# enough work to hide its launch and the grid is not one program per row.
TARGET_BLOCK_ELEMENTS = 4096
# Rows per program never exceed this, so short inputs still spread over many programs.
MAX_BLOCK_ROWS = 64
# Wide rows are processed in chunks of (CHUNK_ROWS, CHUNK_COLS): several rows per program, so
# the backward's per-program weight-gradient partials are CHUNK_ROWS times smaller than x.
CHUNK_ROWS = 8
CHUNK_COLS = 1024
# The columns one warp of a Triton program covers in one vector load per thread (32 lanes × 16
# bytes of float32): a row of at most this many stays inside a warp, so its reductions are warp
# shuffles (see `block_config`'s `one_row`).
WARP_COLS = 128
# Mosaic tiles rows in groups of 8 sublanes (16 for 16-bit types, 32 for 8-bit ones).
MOSAIC_ROW_MULTIPLE = 32


class BlockConfig(NamedTuple):
    """The launch of a kernel over `(rows, width)`.

    - `block_rows`: rows per program.
    - `block_cols`: columns a program holds at once: the padded width, or the chunk width.
    - `chunks`: how many chunks of `block_cols` cover a row (1: the whole row is on chip).
    - `num_warps`, `num_stages`: Triton's launch settings.
    """

    block_rows: int
    block_cols: int
    chunks: int
    num_warps: int
    num_stages: int

    @property
    def row_cols(self) -> int:
        """The columns of a row's block (`block_cols * chunks`)."""
        return self.block_cols * self.chunks


def padded(target: Target, n: int) -> int:
    """The block extent covering `n` elements: the next power of two for Triton."""
    return pl.next_power_of_2(n) if target.masked else n


def _floor_pow2(n: int) -> int:
    """The largest power of two <= `n` (1 for `n < 1`)."""
    return 1 << (max(n, 1).bit_length() - 1)


def block_config(
    target: Target, rows: int, width: int, *, thread_elements: int = 16, one_row: bool = False
) -> BlockConfig:
    r"""The one block-size heuristic of every eqxnorm kernel.

    A kernel works on `rows` independent rows of `width` elements each (its reduction extent:
    the features of a row norm, the channels-in-group × spatial of a group norm, a tile of the
    batch norm). Then:

    1. `cols = padded(width)` (power of two on Triton, the width itself on Mosaic).
    2. If `cols <= MAX_BLOCK_ELEMENTS` the whole row is on chip: one pass over HBM. Rows are
       grouped, `block_rows = TARGET_BLOCK_ELEMENTS // cols` (a power of two, at most
       `MAX_BLOCK_ROWS`, at most the padded row count).
    3. Otherwise the row is chunked: blocks of `CHUNK_ROWS × CHUNK_COLS`, and the kernel
       loops over `ceil(width / CHUNK_COLS)` chunks, combining partial statistics.
    4. Mosaic rounds `block_rows` up to a multiple of `MOSAIC_ROW_MULTIPLE` sublanes for one
       pass; chunked, it keeps `CHUNK_ROWS` rows and needs the chunk to divide the width
       (else the whole row is one chunk, which Mosaic keeps in VMEM).
    5. Triton: `num_warps = clamp(block_rows × block_cols / (32 × thread_elements), 1, 16)`
       (16 to 32 elements per thread by default), `num_stages` 1 for one pass and 2 for
       chunked loops (prefetch the next chunk). A launch whose programs hold more than a row
       norm's registers per element passes fewer `thread_elements`: QK-norm's backward, 8
       (see `_qk_launch` in `row_norm.py`: at 16 its float32 program needs a few registers
       over the 64 that ptxas gives a 256-thread program, and spills).
    6. `one_row` (the row norms' forwards), on Triton: a row wider than `WARP_COLS` has a
       program of its own, `block_rows = 1`, whole as in 2, or chunked in chunks of
       `TARGET_BLOCK_ELEMENTS` columns, at half the `thread_elements` either way (a chunked
       row's statistics loop and its output loop keep more values live: at 16 per thread
       the fused add's float32 forward over 70000 columns takes 77 registers, 25 %
       occupancy; at 8, 40 and 75 %; a whole row's adaLN bf16 forward over 1024 columns at 16
       spills in JAX 0.12's Triton compile; at 8 every row norm's 1024-wide forward takes
       32 registers, 100 %, with the same barriers, deviceless H200). Its warps then split
       only the row, and each statistic it stores is one value: rows sharing a program have
       their statistics stored from a reduction's layout, which Triton converts through
       shared memory (two barriers per statistic, `bar.sync`), and a row split across warps
       as well as across rows costs two barriers per reduction besides.
    7. A configuration measured faster on this device (`python -m eqxnorm.tune`) replaces the
       choice: `block_rows`, `num_warps` halved or doubled (`eqxnorm.kernels._tuning.tuned`).
    """
    cols = padded(target, width)
    if one_row and target.masked and cols > WARP_COLS:
        block_cols = cols if cols <= MAX_BLOCK_ELEMENTS else TARGET_BLOCK_ELEMENTS
        block_rows, chunks = 1, math.ceil(width / block_cols)
        thread_elements = max(thread_elements // 2, 1)
    elif cols <= MAX_BLOCK_ELEMENTS:
        block_rows = min(TARGET_BLOCK_ELEMENTS // cols, MAX_BLOCK_ROWS, padded(TRITON, rows))
        block_cols, chunks = cols, 1
        block_rows = _floor_pow2(block_rows)
        if not target.masked:
            block_rows = max(MOSAIC_ROW_MULTIPLE, block_rows)
    else:
        block_rows, block_cols = CHUNK_ROWS, CHUNK_COLS
        chunks = math.ceil(width / block_cols)
        if not target.masked and width % block_cols:
            block_cols, chunks = width, 1
    elements = block_rows * block_cols
    num_warps = min(max(elements // (32 * thread_elements), 1), 16)
    config = BlockConfig(block_rows, block_cols, chunks, num_warps, 1 if chunks == 1 else 2)
    return _tuning.tuned(config, target.name, rows, width)


# The persistent backward (see [`persistent_config`][]): warps per SM it aims to keep resident
# (half of sm_90's 64, the 50 % occupancy target), the most warps of one program (CUDA's 1024
# threads), and the registers per thread that leaves (65536 per SM over 32 warps).
PERSISTENT_RESIDENT_WARPS = 32
PERSISTENT_MAX_WARPS = 32
PERSISTENT_REGISTERS = 64


# A row norm's backward over rows too few to fill the GPU: each program reads at least this
# many times the bytes of the float32 partial sums it writes (see [`partial_iterations`][]).
# Written and read back, they are then at most 1/16 of its reads of `x` and `dy`, two of a
# training step's five passes: 2.5 %, half of issue 17's 5 % over the ideal bytes.
PARTIAL_READS = 32


def partial_iterations(blocks: int, groups: int, block_bytes: int, width: int) -> int:
    r"""The fewest of its `blocks` row blocks (per group) a program of a row norm's persistent
    backward visits: `block_bytes` the bytes of `x` and `dy` a block reads, the program's
    partial sums `2 × width` float32, written and read back by XLA's reduction.

    Where the `groups × blocks` blocks fill the GPU (one per SM or more), or their bytes
    would keep every SM's `_mosaic_gpu.IN_FLIGHT_BYTES` twice over (64 rows of 70000: a few
    huge blocks, each SM's share worth spreading), 1: the persistent grid spreads them
    (`persistent_config`, `_mosaic_gpu.persistent_programs`). Where they do neither, a
    program per block waits for its one block whatever its size, and its partial sums cost
    more HBM traffic than its rows: 37 rows of 760 float32 in blocks of 4 rows are 10
    programs writing 10 × 2 × 760 float32, 1.11× the training step's ideal bytes (bfloat16:
    1.21×). There each program reads at least `PARTIAL_READS` times its partials' bytes, a
    few blocks in its loop (2 programs there)."""
    from . import _mosaic_gpu as m

    sms = m._sm_count()
    if groups * blocks >= sms or groups * blocks * block_bytes >= sms * 2 * m.IN_FLIGHT_BYTES:
        return 1
    return max(1, ceil_div(PARTIAL_READS * 2 * width * 4, max(block_bytes, 1)))


class Persistent(NamedTuple):
    """A persistent launch over `groups × blocks` row blocks: `programs` per group, each
    looping over `iterations` of its blocks (`program + j · programs`), with `config` (its
    `num_warps` the persistent program's)."""

    config: BlockConfig
    programs: int
    iterations: int


def persistent_config(
    config: BlockConfig,
    rows: int,
    groups: int = 1,
    width: int = 0,
    read_bytes: int = 0,
    max_warps: int = PERSISTENT_MAX_WARPS,
) -> Persistent:
    r"""The persistent grid of a Triton kernel that sums per-column partials over its rows (the
    row norms' backward), from the one heuristic's `config` ([`block_config`][], tuned).

    A row-parallel grid writes one float32 partial row per program and gradient, which XLA
    then reads back: at 4096 × 1024 bf16 in blocks of 4 rows that is 1024 × 1024 × 4 B × 2
    written and read, 16 MiB on a 40 MiB training step (1.40×). A persistent program loops
    over its row blocks and accumulates its partials on chip, writing one row at the end, so
    the partials are `programs × width` float32: programs are to be few. An H200 (132 SMs;
    `eqxnorm.kernels._mosaic_gpu`'s SM count, 132 without a GPU) keeps its HBM busy with
    enough warps resident per SM, `PERSISTENT_RESIDENT_WARPS` = 32 (50 % occupancy), which
    at 65536 registers per SM leaves `PERSISTENT_REGISTERS` = 64 per thread. So:

    1. One program per SM of `num_warps = 4 ×` the row-parallel one's, within `max_warps`
       (`PERSISTENT_MAX_WARPS`: a block of `4096` elements over 32 warps is 4 per thread per
       array, plus the accumulators, and the backward compiles to about 50 registers; a
       kernel that needs more asks for fewer warps, not fewer than its row-parallel). The
       partials are then `132 × width × 8 B` written and read: 1.05× at 4096 × 1024 bf16.
       Fewer warps per program and more programs (2 × 16) cost twice the partials for no
       more warps resident.
    2. `programs = min(blocks, SMs × (32 / num_warps) / groups)` per group (at least 1),
       each looping over `iterations = ceil(blocks / programs)` blocks (at least
       [`partial_iterations`][]' for rows of `width` elements, `read_bytes` of `x` and `dy`
       per element: blocks too few to fill the GPU), then as few programs as give every one
       `iterations` blocks; past the end a block's rows are masked.
    3. A chunked row (wider than `MAX_BLOCK_ELEMENTS`) keeps its partial row in HBM, added to
       chunk by chunk (read-add-write of its own row, L2-resident), with the row-parallel
       warps: its block already fills a program (at 32 warps, 60 registers a thread, XLA's
       compile of the 70000-wide backward spills).

    A kernel holding more per element than the row norms' backward may not fit 64 registers
    a thread with its accumulators: gated RMSNorm's (three row arrays and the gate) spills 16
    bytes at 8192 elements over 32 warps, and more over 16; it keeps the row-parallel launch
    there."""
    from . import _mosaic_gpu

    blocks = ceil_div(rows, config.block_rows)
    num_warps = config.num_warps
    if config.chunks == 1:
        num_warps = min(4 * num_warps, max(max_warps, num_warps))
    per_sm = max(1, PERSISTENT_RESIDENT_WARPS // num_warps)
    most = max(1, _mosaic_gpu._sm_count() * per_sm // groups)
    iterations = ceil_div(blocks, min(blocks, most))
    fewest = 1
    if read_bytes:
        fewest = partial_iterations(blocks, groups, config.block_rows * width * read_bytes, width)
    programs = ceil_div(blocks, min(max(iterations, fewest), blocks))
    return Persistent(config._replace(num_warps=num_warps), programs, ceil_div(blocks, programs))


# A block's share of VMEM: up to 8 row-sized operands and outputs (x, residual, dy, dh; y, h,
# dx, dresidual), each double-buffered by the pipeline, plus about 8 float32 temporaries.
MOSAIC_VMEM_BLOCKS = 24
# Mosaic's default scoped VMEM limit (v5e's 16 MiB) and the most asked for: TPUs since v5e
# have 128 MiB of VMEM (v5p 95 MiB), and the compiler keeps some for itself.
MOSAIC_VMEM_DEFAULT = 16 * 2**20
MOSAIC_VMEM_MAX = 64 * 2**20


def mosaic_vmem_bytes(config: BlockConfig) -> int:
    """The scoped VMEM a Mosaic launch with `config` asks for: the default, or, for a row kept
    whole in VMEM because no 128-lane chunk divides its width (a float32 row of 70000 is 2.2
    MB a block of 8 rows), `MOSAIC_VMEM_BLOCKS` float32 blocks, up to `MOSAIC_VMEM_MAX`."""
    need = MOSAIC_VMEM_BLOCKS * config.block_rows * config.row_cols * 4
    return min(max(need, MOSAIC_VMEM_DEFAULT), MOSAIC_VMEM_MAX)


def compiler_params(target: Target, config: BlockConfig, semantics: tuple[str, ...]) -> Any:
    """The compiler parameters of `target` for a launch with `config` over a grid whose axes
    have `semantics` (`"parallel"` or `"arbitrary"`)."""
    if target is MOSAIC:
        return pltpu.CompilerParams(
            dimension_semantics=semantics, vmem_limit_bytes=mosaic_vmem_bytes(config)
        )
    return _triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def pallas_call(kernel, target: Target, config: BlockConfig, **kwargs) -> Callable:
    """`pl.pallas_call` with `target`'s compiler parameters; every grid axis is parallel."""
    grid = kwargs["grid"]
    return pl.pallas_call(
        kernel,
        compiler_params=compiler_params(target, config, ("parallel",) * len(grid)),
        interpret=target.interpret,
        **kwargs,
    )


# --- masked block access -----------------------------------------------------------------------


def iota(shape: tuple[int, ...], axis: int, start: Any = 0) -> jax.Array:
    """Indices along `axis` of a block of `shape`, offset by `start`."""
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def load(ref: Any, mask: jax.Array, target: Target) -> jax.Array:
    """The block (or block view) `ref` as float32, with the positions outside `mask` zero.

    Triton loads only the masked positions (the rest of a power-of-two block may lie past
    the array's end); Mosaic loads the whole (in-bounds, pipeline-padded) block."""
    if target.masked:
        # A float8 block (an FP8 output's cotangent) takes no fill: Triton's lowering cannot
        # cast the integer 0 to float8. Its masked lanes are zeroed below.
        fp8 = jnp.issubdtype(ref.dtype, jnp.floating) and jnp.dtype(ref.dtype).itemsize == 1
        value = plgpu.load(ref, mask=mask) if fp8 else plgpu.load(ref, mask=mask, other=0)
    else:
        value = ref[...]
    return jnp.where(mask, value.astype(F32), 0.0)


def row_start(target: Target, read: Callable[[Callable[[Any], Any]], jax.Array]) -> Any:
    """Each row's first element, [`block_moments`][]' `first`: on Triton (and its interpreter)
    `read(view)` with `view` a block ref's first column (of a 3-D block, its element at
    index 0 of both row axes), a load of a few bytes of the cache lines the block's own load
    brings in, where finding it by a reduction across the row costs two barriers once the row
    spans warps (a 3-D block's row: two reductions); `None` on Mosaic, whose reductions cost
    none (`block_moments` then reduces for it)."""
    if not target.masked:
        return None

    def view(ref):
        return None if ref is None else ref.at[(slice(None),) + (pl.ds(0, 1),) * (ref.ndim - 1)]

    return read(view)


def store(ref: Any, value: jax.Array, mask: jax.Array, target: Target) -> None:
    """Write `value` (cast to `ref.dtype`) to the masked positions of `ref`."""
    value = value.astype(ref.dtype)
    if target.masked:
        plgpu.store(ref, value, mask=mask)
    else:
        ref[...] = value


def barrier(target: Target) -> None:
    """A barrier across the threads of a Triton program (orders a program's global-memory
    writes before its later reads of them, e.g. a partial row read, added to and written
    back); nothing on the other targets, whose programs run their statements in order."""
    if target is TRITON:
        plgpu.debug_barrier()


def rows_view(ref: Any, start: Any, rows: int, columns: tuple[Any, int] | None = None) -> Any:
    """The view of rows `[start, start + rows)` of a ref (`None` stays `None`), and of its
    columns `[first, first + cols)` with `columns = (first, cols)`."""
    if ref is None:
        return None
    if not isinstance(start, int):
        start = pl.multiple_of(start, rows)
    if columns is None:
        return ref.at[pl.ds(start, rows)]
    first, cols = columns
    if not isinstance(first, int):
        first = pl.multiple_of(first, cols)
    return ref.at[pl.ds(start, rows), pl.ds(first, cols)]


def chunk(ref: Any, index: Any, cols: int) -> Any:
    """The view of columns `[index·cols, (index+1)·cols)` of a 2-D block ref."""
    start = index * cols
    if not isinstance(start, int):
        start = pl.multiple_of(start, cols)
    return ref.at[:, pl.ds(start, cols)]


# --- in-kernel statistics ----------------------------------------------------------------------


def row_sum(x: jax.Array) -> jax.Array:
    """Sum of each row of a block (over every axis but the leading one), kept as size-1 axes,
    in float32; one axis at a time, as Triton reduces."""
    for axis in range(x.ndim - 1, 0, -1):
        x = jnp.sum(x, axis=axis, keepdims=True)
    return x


class Stats(NamedTuple):
    """Per-row statistics in float32, each of a block's shape with the row's axes of size 1:
    the mean as `shift + offset`, and the variance."""

    shift: jax.Array
    offset: jax.Array
    var: jax.Array


def first_element(x: jax.Array) -> jax.Array:
    """Each row's value at index 0 of every axis but the leading one (a valid element of
    every row), shaped as [`Stats`][]."""
    first = functools.reduce(
        jnp.logical_and, (iota(x.shape, axis) == 0 for axis in range(1, x.ndim))
    )
    return row_sum(jnp.where(first, x, 0.0))


def block_moments(
    x: jax.Array, mask: jax.Array, count: int, *, center: bool, first: jax.Array | None = None
) -> Stats:
    r"""Statistics of each row of a block (2-D, or 3-D for the group norms) already in
    float32 with its padding zeroed: with $s$ the row's first element (`first`, else found by
    [`first_element`][]), $o = \overline{x - s}$ and $d = (x - s) - o$,
    $\mu = s + o$ (kept as `shift, offset = s, o`) and $\sigma^2 = \overline{d^2}$: the
    two-pass algorithm about a shift. Or $\sigma^2 = \overline{x^2}$ when not `center`ing.
    `count` is the number of valid columns.

    Two reductions, one after the other (three without `first`): each that crosses warps is
    two barriers on Triton, which is why `first` is read on its own rather than reduced (see
    `_row_norm_fwd_kernel`). It keeps `eqxnorm.kernels.reference.moments`' guarantees, not
    its arithmetic (the corrected two-pass about the mean, four reductions): no
    `E[x²] − E[x]²` cancellation (`x - s` is exact near a large mean, and `d` is centred on
    the mean up to the rounding of `o`, whose square is all it adds to `σ²`); `σ² >= 0`; and
    a constant row has `x - s == 0` exactly, so `o = 0`, its centred values are exactly 0 and
    its output exactly the bias. Means are sums of `v · (1/n)`, the output of a reduction,
    so the interpreter's XLA cannot fuse `x - sum · (1/n)` into a multiply-add rounded
    otherwise than the stored `offset`."""
    scale = 1.0 / count
    if not center:
        mean_square = row_sum(x * x * scale)
        return Stats(jnp.zeros_like(mean_square), jnp.zeros_like(mean_square), mean_square)
    shift = first_element(x) if first is None else first
    offset = row_sum(jnp.where(mask, x - shift, 0.0) * scale)
    d = jnp.where(mask, (x - shift) - offset, 0.0)
    return Stats(shift, offset, row_sum(d * d * scale))


def chunked_shift(x0: jax.Array, mask0: jax.Array, count0: int) -> tuple[jax.Array, jax.Array]:
    """`(shift, d₀)` of a row reduced chunk by chunk, from its first chunk `x0` (padding
    zeroed) of `count0` valid columns: that chunk's mean, and the row's first `x - shift`.
    The chunks' [`Partial`][]s are then of `(x - shift) - d₀` (exact zeros for a constant
    row), and `offset = d₀ + mean`, as in [`block_moments`][]."""
    shift = row_sum(x0 * (1.0 / count0))
    return shift, first_element(jnp.where(mask0, x0 - shift, 0.0))


class Partial(NamedTuple):
    """Running statistics of the part of a row seen so far: the number of elements `n`, the
    mean of `x - shift` and the sum of its squared deviations `m2` (shaped as [`Stats`][])."""

    n: jax.Array
    mean: jax.Array
    m2: jax.Array


def chunk_partial(d: jax.Array, mask: jax.Array, n: jax.Array | None = None) -> Partial:
    """The [`Partial`][] of one chunk of shifted values `d` (padding zeroed), of `n` valid
    columns (counted from `mask` when not given: one reduction more)."""
    n = row_sum(mask.astype(F32)) if n is None else n
    mean = row_sum(d) / jnp.maximum(n, 1.0)
    dev = jnp.where(mask, d - mean, 0.0)
    return Partial(n, mean, row_sum(dev * dev))


def chan_combine(a: Partial, b: Partial) -> Partial:
    r"""Chan et al.'s combination of two partial statistics:
    $n = n_a + n_b$, $\delta = \bar{d}_b - \bar{d}_a$, $\bar{d} = \bar{d}_a + \delta n_b/n$,
    $M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n$."""
    n = a.n + b.n
    frac = b.n / jnp.maximum(n, 1.0)
    delta = b.mean - a.mean
    return Partial(n, a.mean + delta * frac, a.m2 + b.m2 + delta * delta * a.n * frac)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def sum_pair(
    partials: jax.Array, *, pair_axis: int, sum_axis: int, like: Any, droppable: bool = False
) -> list:
    """`[dweight, dbias]`: the sums over `sum_axis` of `partials`' entries 0 and 1 along
    `pair_axis` (the programs' float32 partial sums of both parameter gradients, one array), in
    one XLA launch.

    XLA fuses slicing a reduction's result into an elementwise op after it, never into the
    reduction itself, and fuses no sibling reductions here. Float32 gradients (parameters
    `like` in float32: nothing follows) come from one variadic reduction of the two halves,
    which writes both (and of which XLA drops an unused one). Gradients cast to the
    parameters' dtype afterwards come from one reduction of the whole, each cast reading its
    half; with `droppable` (RMSNorm, whose bias is usually absent), from one reduction each,
    so that XLA drops the bias's when nothing uses it (with a bias: two launches).
    `like=None`: the parameters' dtype is unknown, taken as not float32. (The two halves
    are [`sum_halves`][]'.)"""
    halves = [jnp.take(partials, i, axis=pair_axis) for i in range(2)]
    return sum_halves(
        halves, axis=sum_axis - (sum_axis > pair_axis), like=like, droppable=droppable
    )


def sum_halves(
    halves: Sequence[jax.Array], *, axis: int, like: Any, droppable: bool = False
) -> list:
    """[`sum_pair`][] of the two gradients' partials as two arrays (each summed over
    `axis`): [`sum_parts`][]' parts, or with `droppable` and gradients not float32, one
    reduction each. Mosaic GPU's backward writes float32 gradients' partials apart, so that
    where each has one row per group the sums are reshapes (no XLA launch, where slices of
    one array are copies)."""
    float32 = like is not None and jnp.dtype(like.dtype) == F32
    if droppable and not float32:
        return [half.sum(axis=axis) for half in halves]
    return sum_parts(halves, axes=(axis,), like=like)


def sum_parts(parts: Sequence[jax.Array], *, axes: tuple[int, ...], like: Any = None) -> list:
    """The sums over `axes` of each of `parts` (the programs' float32 partial sums of several
    parameters' gradients, one array each), in one XLA launch (see [`sum_pair`][]: XLA fuses
    no sibling reductions, nor a broadcast into a variadic one).

    - Parts of one shape whose sums stay float32 (`like` float32): one variadic reduction,
      which writes each sum.
    - Parts of one shape otherwise: one reduction of the parts stacked (a stack XLA fuses
      into it), each sum a slice of its result, into which a cast that follows fuses (XLA
      copies the slices, no kernel).
    - Parts of different shapes (DyT's scalar beside its weight's and bias' rows): they must
      be `(programs, n)`, `axes` `(0,)`; one reduction of their concatenation along `n`, each
      sum a slice. With few programs (8 at 64×70000) XLA fuses the reduction into the
      slices instead, one loop kernel per slice shape (two for DyT).

    `like=None`: the gradients' dtype is unknown, taken as not float32."""
    shape = parts[0].shape
    if all(p.shape == shape for p in parts):
        if like is not None and jnp.dtype(like.dtype) == F32:
            zeros = (jnp.zeros((), F32),) * len(parts)
            return list(lax.reduce(tuple(parts), zeros, _add_each, axes))
        sums = jnp.stack(parts).sum(axis=tuple(a + 1 for a in axes))
        return [sums[i] for i in range(len(parts))]
    if axes != (0,) or any(p.ndim != 2 or p.shape[0] != shape[0] for p in parts):
        raise ValueError(
            f"Parts of different shapes {[p.shape for p in parts]} are summed as `(programs, "
            f"n)` arrays over axis 0, not over axes {axes}: pass 2-D parts with one programs "
            f"axis, summed over axis 0."
        )
    sums = jnp.concatenate(parts, axis=1).sum(axis=0)
    ends = itertools.accumulate(p.shape[1] for p in parts)
    return [sums[end - p.shape[1] : end] for p, end in zip(parts, ends, strict=True)]


def _add_each(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b, strict=True))


# --- kernel-body helpers -----------------------------------------------------------------------


def split_refs(refs: tuple, *flags: bool) -> list:
    """`refs` with `None` inserted where an optional input (flag `False`) is absent."""
    refs = list(refs)
    return [refs.pop(0) if flag else None for flag in flags] + refs


def centred(x: jax.Array, mask: jax.Array, stats: Stats) -> jax.Array:
    """`(x - shift) - offset` on the valid positions, zero elsewhere."""
    return jnp.where(mask, (x - stats.shift) - stats.offset, 0.0)


def affine(xhat: jax.Array, weight: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    y = xhat if weight is None else xhat * weight
    return y if bias is None else y + bias


# --- batching: fold a vmapped axis into the kernel's leading axis ------------------------------


def fold(axis_size: int, batched: bool, x: jax.Array) -> jax.Array:
    """`x` with its vmapped (leading) axis, broadcast first when unbatched, merged into the
    kernel's leading axis (rows, or examples)."""
    if not batched:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    return x.reshape(axis_size * x.shape[1], *x.shape[2:])


def unfold(axis_size: int, x: jax.Array | None) -> jax.Array | None:
    """The inverse of [`fold`][]."""
    return None if x is None else x.reshape(axis_size, x.shape[0] // axis_size, *x.shape[1:])


def folding_forward(fn: Callable) -> Any:
    """`fn(x, weight, bias)` (returning arrays whose leading axis is `x`'s) as a `custom_vmap`
    function that runs a `jax.vmap` of it as ONE call on the folded input, so the kernel tiles
    the vmapped examples like its own rows; nested `vmap`s fold one after the other. When the
    parameters are batched (an ensemble), every example has its own, and Pallas' batching
    (one grid axis over the examples) is used instead."""
    forward = custom_vmap(fn)

    @forward.def_vmap
    def _(axis_size, in_batched, x, weight, bias):
        if axis_size == 0:
            return empty_batch(forward, in_batched, (x, weight, bias))
        x_batched, *params_batched = in_batched
        if any(params_batched):
            axes = tuple(0 if b else None for b in in_batched)
            out = jax.vmap(fn, in_axes=axes)(x, weight, bias)
        else:
            folded = forward(fold(axis_size, x_batched, x), weight, bias)
            out = tuple(unfold(axis_size, o) for o in folded)
        return out, jax.tree.map(lambda _: True, out)

    return forward
