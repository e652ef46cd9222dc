"""Whole training steps of small model blocks, built from eqxnorm, `eqx.nn` and Flax NNX.

A norm is one layer of a model: what a user sees is the step. Each block is built three times
from the same layers but for the norms (eqxnorm's, `eqx.nn`'s, Flax NNX's), and one training
step is timed: the forward, a mean-square loss, the gradient of every parameter
(`eqx.filter_grad`; `jax.grad` of the `nnx.split` parameters for Flax) and an SGD update, in
one jitted function (`eqx.filter_jit`). The layers are called on one example under `jax.vmap`,
as Equinox users write them (Flax's on the batch, its own way).

- `transformer`: a pre-norm transformer block over `(batch, tokens, dim)`: RMSNorm,
  single-head self-attention, the residual add fused with the second RMSNorm
  (`RMSNorm.add_and_norm`; `eqx.nn`/Flax: `h = a + h`, then the norm), a 4x MLP, the residual.
- `conv`: a residual conv block over `(batch, channels, height, width)`: GroupNorm, SiLU,
  3x3 convolution, twice, plus the input (Flax: channels last, its layout).

Rows have `op` `transformer_block` or `conv_block`, `direction` `step`, `impl` the library
(`eqxnorm`, `eqx`, `flax`), and the samples of each round (`samples_ms`), taken in ABBA order
like the ops' (see `benchmarks._runner`).
"""

import importlib.util
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _report, _runner, _timing
from ._contenders import _first_line

BLOCKS = ("transformer", "conv")
LIBRARIES = ("eqxnorm", "eqx", "flax")
# The quick sizes: (batch, tokens, dim) and (batch, channels, height, width).
SHAPES = {"transformer": (8, 128, 256), "conv": (8, 64, 32, 32)}
GROUPS = 32
LEARNING_RATE = 1e-3


def _norms(library: str):
    """The namespace the block's norms come from: `eqxnorm`, or `eqx.nn`."""
    if library == "eqxnorm":
        import eqxnorm

        return eqxnorm
    return eqx.nn


class _TransformerBlock(eqx.Module):
    """The pre-norm transformer block on one example `(tokens, dim)`."""

    norm1: Any
    norm2: Any
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    fused: bool = eqx.field(static=True)

    def __call__(self, x):
        y = jax.vmap(self.norm1)(x)
        q, k, v = jnp.split(jax.vmap(self.qkv)(y), 3, axis=-1)
        scores = q @ k.T / jnp.sqrt(x.shape[-1]).astype(x.dtype)
        a = jax.vmap(self.proj)(jax.nn.softmax(scores, axis=-1) @ v)
        if self.fused:
            y, h = jax.vmap(self.norm2.add_and_norm)(a, x)
        else:
            h = a + x
            y = jax.vmap(self.norm2)(h)
        return h + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(y)))


class _ConvBlock(eqx.Module):
    """The residual conv block on one example `(channels, height, width)`."""

    norm1: Any
    norm2: Any
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d

    def __call__(self, x):
        y = self.conv1(jax.nn.silu(self.norm1(x)))
        return x + self.conv2(jax.nn.silu(self.norm2(y)))


def _make_block(block: str, library: str, shape: tuple[int, ...], key) -> eqx.Module:
    nn = _norms(library)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if block == "transformer":
        dim = shape[-1]
        return _TransformerBlock(
            nn.RMSNorm(dim, use_bias=False),
            nn.RMSNorm(dim, use_bias=False),
            eqx.nn.Linear(dim, 3 * dim, key=k1),
            eqx.nn.Linear(dim, dim, key=k2),
            eqx.nn.Linear(dim, 4 * dim, key=k3),
            eqx.nn.Linear(4 * dim, dim, key=k4),
            fused=library == "eqxnorm",
        )
    channels = shape[1]
    groups = min(GROUPS, channels)
    return _ConvBlock(
        nn.GroupNorm(groups, channels),
        nn.GroupNorm(groups, channels),
        eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k1),
        eqx.nn.Conv2d(channels, channels, 3, padding=1, key=k2),
    )


def _equinox_step(block: str, library: str, shape: tuple[int, ...]) -> tuple[Callable, Any]:
    """`(step, model)`: `step(model, x) -> (model, loss)`, jitted with `eqx.filter_jit`."""
    model = _make_block(block, library, shape, jax.random.key(0))

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    return _sgd_step(loss, eqx.filter_value_and_grad, eqx.filter_jit), model


def _sgd_step(loss: Callable, value_and_grad: Callable, jit: Callable) -> Callable:
    """`step(params, x) -> (params, loss)`: one SGD step on `loss`, jitted by `jit`."""

    @jit
    def step(params, x):
        value, grads = value_and_grad(loss)(params, x)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), value

    return step


def _flax_step(block: str, shape: tuple[int, ...]) -> tuple[Callable, Any]:
    """The same block from Flax NNX layers, as a pure function of its `nnx.split` state."""
    from flax import nnx

    rngs = nnx.Rngs(0)
    if block == "transformer":
        dim = shape[-1]

        class Block(nnx.Module):
            def __init__(self):
                self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
                self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
                self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
                self.proj = nnx.Linear(dim, dim, rngs=rngs)
                self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
                self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

            def __call__(self, x):
                q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
                scores = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(dim).astype(x.dtype)
                a = self.proj(jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, axis=-1), v))
                h = a + x
                return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))

    else:
        channels = shape[1]
        groups = min(GROUPS, channels)

        class Block(nnx.Module):
            def __init__(self):
                self.norm1 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
                self.norm2 = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)
                self.conv1 = nnx.Conv(channels, channels, (3, 3), padding=1, rngs=rngs)
                self.conv2 = nnx.Conv(channels, channels, (3, 3), padding=1, rngs=rngs)

            def __call__(self, x):
                y = self.conv1(jax.nn.silu(self.norm1(x)))
                return x + self.conv2(jax.nn.silu(self.norm2(y)))

    graph, params = nnx.split(Block())

    def loss(params, x):
        return jnp.mean(nnx.merge(graph, params)(x) ** 2)

    return _sgd_step(loss, jax.value_and_grad, jax.jit), params


def available(library: str) -> str | None:
    """Why `library` cannot run here (`None` if it can)."""
    if library == "flax" and importlib.util.find_spec("flax") is None:
        return "Flax is not installed (pip install flax)"
    return None


def _input(block: str, library: str, shape: tuple[int, ...]) -> jax.Array:
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    # Flax's convolutions and norms take channels last.
    return jnp.moveaxis(x, 1, -1) if block == "conv" and library == "flax" else x


def _row(block: str, library: str, shape, **fields) -> dict:
    out = dict.fromkeys(_report.COLUMNS)
    out.update(
        op=f"{block}_block",
        impl=library,
        shape="x".join(map(str, shape)),
        dtype="float32",
        device=jax.devices()[0].device_kind,
        direction="step",
        status="ok",
        note="",
    )
    out.update(fields)
    return out


def run(
    blocks: tuple[str, ...],
    repeats: int,
    warmup: int,
    shapes: dict | None = None,
    libraries: tuple[str, ...] = LIBRARIES,
) -> list[dict]:
    """The rows of the training step of every block in `blocks` built from each library."""
    shapes = SHAPES if shapes is None else shapes
    rows: list[dict] = []
    for block in blocks:
        shape = shapes[block]
        timers: dict[str, _timing.Timer] = {}
        for library in libraries:
            reason = available(library)
            if reason is not None:
                rows.append(_row(block, library, shape, status="skipped", note=reason))
                continue
            try:
                step, model = (
                    _flax_step(block, shape)
                    if library == "flax"
                    else _equinox_step(block, library, shape)
                )
                inputs = [_input(block, library, shape) + i for i in range(2)]
                timers[library] = _timing.Timer(
                    lambda i, step=step, model=model, inputs=inputs: step(model, inputs[i % 2]),
                    jax.block_until_ready,
                    warmup,
                )
            except Exception as error:
                rows.append(_failure(block, library, shape, error))

        def failed(name, error, block=block, shape=shape):
            rows.append(_failure(block, name, shape, error))

        _runner.take_samples(timers, repeats, failed)
        for library, timer in timers.items():
            timing = timer.timing()
            rows.append(
                _row(
                    block,
                    library,
                    shape,
                    ms=timing.ms,
                    ms_min=timing.ms_min,
                    compile_s=timing.compile_s,
                    samples_ms=[1e3 * s for s in timer.samples],
                    note=NOTES[block][library],
                )
            )
    return rows


def _failure(block: str, library: str, shape, error: BaseException) -> dict:
    return _row(block, library, shape, status="failed", note=_first_line(error))


NOTES = {
    "transformer": {
        "eqxnorm": "vmap(eqxnorm.RMSNorm), RMSNorm.add_and_norm",
        "eqx": "vmap(eqx.nn.RMSNorm), h = a + h",
        "flax": "nnx.RMSNorm on the batch",
    },
    "conv": {
        "eqxnorm": "vmap over examples, eqxnorm.GroupNorm",
        "eqx": "vmap over examples, eqx.nn.GroupNorm",
        "flax": "nnx.GroupNorm, nnx.Conv, channels last",
    },
}
