"""A tour of eqxnorm: a small convolutional classifier built from all seven layers, trained for a
few steps of plain SGD under `eqx.filter_jit`, then a shape mistake caught at trace time.

    python examples/tour.py

It runs in seconds on a CPU. The data are synthetic: noisy copies of one random template per
class, each image with its own brightness and contrast (which `InstanceNorm` removes).
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

import eqxnorm

CLASSES = 4
CHANNELS = 3
SIZE = 8
WIDTH = 16
HIDDEN = 32
BATCH_AXIS = "batch"
LEARNING_RATE = 0.1
STEPS = 30
BATCH_SIZE = 64


class TourNet(eqx.Module):
    """One `(3, 8, 8)` image to `4` logits; `jax.vmap` it over a batch."""

    instance_norm: eqxnorm.InstanceNorm
    conv1: eqxnorm.WeightStandardization
    group_norm: eqxnorm.GroupNorm
    conv2: eqx.nn.Conv2d
    batch_norm: eqxnorm.BatchNorm
    linear1: eqx.nn.Linear
    layer_norm: eqxnorm.LayerNorm
    linear2: eqxnorm.SpectralNorm
    rms_norm: eqxnorm.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray):
        keys = jr.split(key, 6)
        self.instance_norm = eqxnorm.InstanceNorm(CHANNELS)
        self.conv1 = eqxnorm.WeightStandardization(
            eqx.nn.Conv2d(CHANNELS, WIDTH, 3, padding=1, key=keys[0])
        )
        self.group_norm = eqxnorm.GroupNorm(4, WIDTH)
        # No bias: BatchNorm's shift replaces it.
        self.conv2 = eqx.nn.Conv2d(WIDTH, WIDTH, 3, padding=1, use_bias=False, key=keys[1])
        self.batch_norm = eqxnorm.BatchNorm(WIDTH, axis_name=BATCH_AXIS)
        self.linear1 = eqx.nn.Linear(WIDTH * SIZE * SIZE, HIDDEN, key=keys[2])
        self.layer_norm = eqxnorm.LayerNorm(HIDDEN)
        self.linear2 = eqxnorm.SpectralNorm(eqx.nn.Linear(HIDDEN, HIDDEN, key=keys[3]), key=keys[4])
        self.rms_norm = eqxnorm.RMSNorm(HIDDEN)
        self.head = eqx.nn.Linear(HIDDEN, CLASSES, key=keys[5])

    def __call__(
        self, x: Float[Array, "3 8 8"], state: eqx.nn.State
    ) -> tuple[Float[Array, " 4"], eqx.nn.State]:
        x = self.instance_norm(x)
        x = jax.nn.relu(self.group_norm(self.conv1(x)))
        x, state = self.batch_norm(self.conv2(x), state)
        x = jax.nn.relu(x).reshape(-1)
        x = jax.nn.gelu(self.layer_norm(self.linear1(x)))
        x, state = self.linear2(x, state)
        x = jax.nn.gelu(self.rms_norm(x))
        return self.head(x), state


def make_data(
    key: PRNGKeyArray, templates: Float[Array, "4 3 8 8"], n: int
) -> tuple[Float[Array, "n 3 8 8"], Int[Array, " n"]]:
    label_key, noise_key, gain_key, offset_key = jr.split(key, 4)
    labels = jr.randint(label_key, (n,), 0, CLASSES)
    noise = jr.normal(noise_key, (n, CHANNELS, SIZE, SIZE))
    gain = jnp.exp(jr.normal(gain_key, (n, CHANNELS, 1, 1)))
    offset = 3 * jr.normal(offset_key, (n, CHANNELS, 1, 1))
    return gain * (templates[labels] + noise) + offset, labels


def batched(model: TourNet):
    """The model over a batch: BatchNorm pools its statistics over the named axis, and the
    state (running statistics, power-iteration vectors) is shared, not batched."""
    return jax.vmap(model, axis_name=BATCH_AXIS, in_axes=(0, None), out_axes=(0, None))


def loss_fn(model, state, images, labels):
    logits, state = batched(model)(images, state)
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)
    return jnp.mean(nll), state


@eqx.filter_jit
def train_step(model, state, images, labels):
    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, state, images, labels
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return eqx.combine(params, static), state, loss


@eqx.filter_jit
def accuracy(model, state, images, labels):
    logits, _ = batched(eqx.nn.inference_mode(model))(images, state)
    return jnp.mean(jnp.argmax(logits, axis=1) == labels)


def train() -> list[float]:
    template_key, model_key, data_key, test_key = jr.split(jr.key(0), 4)
    templates = jr.normal(template_key, (CLASSES, CHANNELS, SIZE, SIZE))
    model, state = eqx.nn.make_with_state(TourNet)(model_key)
    test_images, test_labels = make_data(test_key, templates, 256)

    print(f"Training TourNet for {STEPS} steps of SGD (batch {BATCH_SIZE}, lr {LEARNING_RATE}):")
    losses = []
    start = time.perf_counter()
    for step, key in enumerate(jr.split(data_key, STEPS)):
        images, labels = make_data(key, templates, BATCH_SIZE)
        model, state, loss = train_step(model, state, images, labels)
        losses.append(float(loss))
        if step == 0:
            compiled = time.perf_counter() - start
            print(f"  step  0  loss {losses[0]:.4f}  (trace + compile + step: {compiled:.1f} s)")
        elif step % 5 == 4 or step == STEPS - 1:
            print(f"  step {step:2d}  loss {losses[-1]:.4f}")
    print(f"  {STEPS} steps in {time.perf_counter() - start:.1f} s, compilation included")
    test_accuracy = float(accuracy(model, state, test_images, test_labels))
    print(f"Held-out accuracy, inference mode (BatchNorm running statistics): {test_accuracy:.0%}")
    return losses


def shape_error() -> str:
    """A batch passed to a per-example layer: rejected while tracing, before XLA compiles."""
    norm = eqxnorm.LayerNorm(HIDDEN)
    batch = jnp.zeros((BATCH_SIZE, HIDDEN))
    print(f"\nCalling LayerNorm({HIDDEN}) under eqx.filter_jit on a batch of shape {batch.shape}:")
    try:
        eqx.filter_jit(norm)(batch)
    except ValueError as error:
        message = str(error)
    else:
        raise RuntimeError("LayerNorm accepted a batched input; the shape check is broken.")
    print(f"  ValueError: {message}")
    return message


def main() -> dict:
    losses = train()
    message = shape_error()
    return {"losses": losses, "shape_error": message}


if __name__ == "__main__":
    main()
