"""The operations benchmarked: their inputs, their outputs, and the bytes each direction moves.

An [`Op`][] describes one normalization as a set of named arrays in eqxnorm's layout (channels
first): the differentiable `inputs` (`x` first), the `outputs`, and what an ideal backward reads
and writes. [`make_problem`][] draws the arrays for one shape and dtype, once, so that every
contender gets the same values; [`op_bytes`][] counts the bytes a direction must move, the
numerator of every GB/s figure.

Byte counting, per direction (each distinct array once; per-row or per-group float32
statistics are not counted, they are below 2% of the traffic at every benchmarked shape):

- `fwd`: every input read plus every output written: `2·x + params` for a plain norm.
- `bwd`: what the backward must read besides the cotangents (`x`, or `h` for the fused
  add+norm, and the weight), the cotangents, and one gradient per differentiable input:
  `3·x + params + param grads`. In the fused add+norm the gradients of `x` and `residual` are
  the same array, counted once.
- `fwd+bwd`: the sum.

An op with an FP8 output (`rms_norm_fp8`) writes `y` at one byte an element, and its
backward reads `y`'s float8 cotangent at one byte; its amax (a scalar) counts as one element.
"""

import dataclasses
import math

import numpy as np

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16", "float16")

# Tokens per example of the adaptive (adaLN) op: DiT-XL/2 on 256x256 images has 256 tokens.
ADALN_TOKENS = 256
# GroupNorm's group count, as in most vision models (clipped to divide the channels).
GROUPS = 32
EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Op:
    """One benchmarked operation.

    - `name`: the CLI name, also eqxnorm's functional name.
    - `family`: `"row"` (shape `(*rows, dim)`, normalized over `dim`) or `"channel"`
        (shape `(batch, channels, *spatial)`).
    - `inputs`: the differentiable input arrays, `x` first.
    - `outputs`: the output arrays (`("y",)`, or `("y", "h")` for the fused add+norm).
    - `saved`: the arrays an ideal backward reads besides the cotangents.
    - `grads`: the gradients an ideal backward writes (equal gradients listed once).
    - `base`: for a fused op, the plain norm its unfused sequence runs (`None` otherwise).
    - `kernel`: the `eqxnorm.kernels.pallas` function implementing it.
    - `out_itemsize`: the bytes of an element of `y` (and of its cotangent) when the op fixes
        them (1 for an FP8 output); `None`: the input's.
    """

    name: str
    family: str
    title: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    saved: tuple[str, ...]
    grads: tuple[str, ...]
    base: str | None = None
    kernel: str | None = None
    out_itemsize: int | None = None

    @property
    def fused(self) -> bool:
        return self.base is not None


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            "layer_norm",
            "row",
            "LayerNorm",
            ("x", "weight", "bias"),
            ("y",),
            ("x", "weight"),
            ("x", "weight", "bias"),
        ),
        Op("rms_norm", "row", "RMSNorm", ("x", "weight"), ("y",), ("x", "weight"), ("x", "weight")),
        Op(
            "group_norm",
            "channel",
            "GroupNorm",
            ("x", "weight", "bias"),
            ("y",),
            ("x", "weight"),
            ("x", "weight", "bias"),
        ),
        Op(
            "instance_norm",
            "channel",
            "InstanceNorm",
            ("x", "weight", "bias"),
            ("y",),
            ("x", "weight"),
            ("x", "weight", "bias"),
            kernel="group_norm",
        ),
        Op(
            "batch_norm",
            "channel",
            "BatchNorm (training: batch statistics)",
            ("x", "weight", "bias"),
            ("y",),
            ("x", "weight"),
            ("x", "weight", "bias"),
        ),
        Op(
            "add_layer_norm",
            "row",
            "residual add + LayerNorm",
            ("x", "residual", "weight", "bias"),
            ("y", "h"),
            ("h", "weight"),
            ("x", "weight", "bias"),
            base="layer_norm",
        ),
        Op(
            "add_rms_norm",
            "row",
            "residual add + RMSNorm",
            ("x", "residual", "weight"),
            ("y", "h"),
            ("h", "weight"),
            ("x", "weight"),
            base="rms_norm",
        ),
        Op(
            "adaptive_layer_norm",
            "row",
            "adaLN: LayerNorm(x)·(1 + scale) + shift",
            ("x", "scale", "shift"),
            ("y",),
            ("x", "scale"),
            ("x", "scale", "shift"),
            base="layer_norm",
        ),
        # q and k normalized in one launch, against two launches of the plain RMSNorm; `x` is
        # q, `(tokens, heads, head_dim)`, and k has its shape (see `input_shapes`).
        Op(
            "qk_norm",
            "row",
            "per-head QK-norm (RMSNorm over head_dim) of q and k",
            ("x", "k", "weight", "k_weight"),
            ("y", "k_y"),
            ("x", "k", "weight", "k_weight"),
            ("x", "k", "weight", "k_weight"),
            base="rms_norm",
        ),
        Op(
            "gated_rms_norm",
            "row",
            "gated RMSNorm: rms_norm(x)·γ·silu(z)",
            ("x", "z", "weight"),
            ("y",),
            ("x", "z", "weight"),
            ("x", "z", "weight"),
            base="rms_norm",
        ),
        Op(
            "dyt",
            "row",
            "DyT: γ·tanh(αx) + β",
            ("x", "alpha", "weight", "bias"),
            ("y",),
            ("x", "weight"),
            ("x", "alpha", "weight", "bias"),
        ),
        Op(
            "rms_norm_fp8",
            "row",
            "RMSNorm with FP8 output: cast(clip(y·scale)) and amax",
            ("x", "weight"),
            ("y", "amax"),
            ("x", "weight"),
            ("x", "weight"),
            base="rms_norm",
            kernel="rms_norm",
            out_itemsize=1,
        ),
    )
}

# The ops only eqxnorm has (no Equinox, Flax or PyTorch layer to time them against).
EQXNORM_ONLY = ("qk_norm", "gated_rms_norm", "dyt")
# QK-norm's head_dim when a 2-axis shape `(tokens, heads · head_dim)` is given.
HEAD_DIM = 128
# The FP8 output's format and scale (TransformerEngine's forward format).
FP8_DTYPE = "float8_e4m3fn"
FP8_SCALE = 4.0


def kernel_name(op: Op) -> str:
    return op.kernel or op.name


@dataclasses.dataclass(frozen=True)
class Problem:
    """The inputs of one benchmark case, as NumPy arrays of the case's dtype.

    `shape` is the shape as the user wrote it (`(rows, dim)` or `(batch, channels, *spatial)`);
    `arrays["x"]` has the layout the op works on (for adaLN, `(examples, tokens, dim)`).
    `cotangents` holds one array per output, for the backward.
    """

    op: Op
    shape: tuple[int, ...]
    dtype: str
    arrays: dict[str, np.ndarray]
    cotangents: tuple[np.ndarray, ...]
    groups: int = 0

    @property
    def x(self) -> np.ndarray:
        return self.arrays["x"]

    @property
    def width(self) -> int:
        """The size of one normalized row (`dim`), or of one channel's spatial slice."""
        return self.shape[-1] if self.op.family == "row" else math.prod(self.shape[2:])

    @property
    def rows(self) -> int:
        """The number of normalized rows, or `batch × channels` for the channel ops."""
        return math.prod(self.shape[:-1]) if self.op.family == "row" else math.prod(self.shape[:2])


def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """`"4096x1024"` → `(4096, 1024)`; `ValueError` naming the expected form otherwise."""
    parts = text.strip().lower().split("x")
    if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) < 2:
        raise ValueError(
            f"{text!r} is not a shape: write positive sizes joined by 'x', e.g. 4096x1024 "
            f"(rows x dim) or 8x64x32x32 (batch x channels x height x width)."
        )
    return tuple(int(p) for p in parts)


def accepts(op: Op, shape: tuple[int, ...]) -> bool:
    """Row ops take 2- or 3-axis shapes (`(*rows, dim)`); channel ops take 4 or 5 axes."""
    return len(shape) in ((2, 3) if op.family == "row" else (4, 5))


def groups_for(channels: int) -> int:
    return math.gcd(channels, GROUPS)


def input_shapes(op: Op, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shape of each of `op`'s inputs at the user's `shape`. `x` has the layout the op
    computes on: for adaLN, `(examples, tokens, dim)`, a 2-axis shape split into examples of
    `gcd(rows, 256)` tokens."""
    x_shape = shape
    if op.name == "adaptive_layer_norm" and len(shape) == 2:
        rows, dim = shape
        tokens = math.gcd(rows, ADALN_TOKENS)
        x_shape = (rows // tokens, tokens, dim)
    if op.name == "qk_norm" and len(shape) == 2:
        rows, dim = shape
        head_dim = HEAD_DIM if dim % HEAD_DIM == 0 else dim
        x_shape = (rows, dim // head_dim, head_dim)
    feature = (x_shape[-1],) if op.family == "row" else (x_shape[1],)
    shapes = {
        "x": x_shape,
        "residual": x_shape,
        "weight": feature,
        "bias": feature,
        "scale": (x_shape[0], x_shape[-1]),
        "shift": (x_shape[0], x_shape[-1]),
        "k": x_shape,
        "k_weight": feature,
        "z": x_shape,
        "alpha": (),
    }
    return {name: shapes[name] for name in op.inputs}


def _numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(dtype) if dtype != "bfloat16" else _bfloat16()


def make_problem(op: Op, shape: tuple[int, ...], dtype: str, seed: int = 0) -> Problem:
    """Draw the inputs and cotangents of `op` at `shape` and `dtype` (the same for every
    contender): `x`, `residual` ~ N(0, 1); weight ~ 1 + N(0, 0.1²); bias, scale, shift ~
    N(0, 0.1²); cotangents ~ N(0, 1). Parameters have the input's dtype."""
    rng = np.random.default_rng(seed)
    np_dtype = _numpy_dtype(dtype)

    def normal(size, scale=1.0, mean=0.0):
        return (mean + scale * rng.standard_normal(size, dtype=np.float32)).astype(np_dtype)

    spread = {"x": (1.0, 0.0), "residual": (1.0, 0.0), "weight": (0.1, 1.0)}
    spread |= {"k": (1.0, 0.0), "z": (1.0, 0.0), "k_weight": (0.1, 1.0), "alpha": (0.0, 0.5)}
    arrays = {
        name: normal(size, *spread.get(name, (0.1, 0.0)))
        for name, size in input_shapes(op, shape).items()
    }
    cotangents = tuple(normal(() if n == "amax" else arrays["x"].shape) for n in op.outputs)
    groups = groups_for(shape[1]) if op.family == "channel" else 0
    return Problem(op, shape, dtype, arrays, cotangents, groups)


def _bfloat16() -> np.dtype:
    import ml_dtypes  # a JAX dependency: NumPy's bfloat16

    return np.dtype(ml_dtypes.bfloat16)


def case_arrays(
    op: Op, shape: tuple[int, ...], direction: str
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """`(reads, writes)`: the shapes of the arrays `direction` of `op` ideally reads and
    writes, each once (see the module docstring); `fwd+bwd` lists the forward's then the
    backward's. The copy roofline moves exactly these."""
    shapes = input_shapes(op, shape)

    def of(names) -> list[tuple[int, ...]]:
        # Outputs (y, h) and their cotangents have x's shape; an amax is a scalar.
        return [shapes.get(n, () if n == "amax" else shapes["x"]) for n in names]

    forward = (of(op.inputs), of(op.outputs))
    backward = (of((*op.saved, *op.outputs)), of(op.grads))
    if direction == "fwd":
        return forward
    if direction == "bwd":
        return backward
    return forward[0] + backward[0], forward[1] + backward[1]


def case_bytes(op: Op, shape: tuple[int, ...], dtype: str, direction: str) -> int:
    """The bytes `direction` of `op` must move at `shape` and `dtype` (see the module
    docstring); computed from the shapes alone, before any array exists."""
    itemsize = _numpy_dtype(dtype).itemsize
    reads, writes = case_arrays(op, shape, direction)
    total = sum(math.prod(s) for s in (*reads, *writes)) * itemsize
    if op.out_itemsize is None:
        return total
    # `y` is written forward and its cotangent read backward at `out_itemsize` bytes.
    y_arrays = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[direction]
    return total - y_arrays * math.prod(shape) * (itemsize - op.out_itemsize)


def op_bytes(problem: Problem, direction: str) -> int:
    """The bytes `direction` must move for `problem` (see the module docstring)."""
    return case_bytes(problem.op, problem.shape, problem.dtype, direction)
