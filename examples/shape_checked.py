"""A shape-checked experiment: four shape bugs in a small image classifier, each caught while
`eqx.filter_jit` traces (before XLA compiles or runs anything), its message printed, then fixed.

    python examples/shape_checked.py

The experiment: a convolutional classifier (`InstanceNorm` on the input, a stride-2 convolution,
`GroupNorm`, a `LayerNorm` on the flattened features, a linear head) trained for a few steps of
SGD on synthetic images. The bugs are the ones people make:

1. `missing_vmap`: the loss calls the model on the whole batch instead of `jax.vmap(model)`.
2. `channels_last`: the images arrive channels-last (NHWC, as image loaders and Flax use), but
   Equinox and eqxnorm layers take channels first.
3. `layer_norm_size`: the `LayerNorm` is sized for the features before the stride-2
   convolution halved the image.
4. `user_annotation`: a user's own function, annotated with jaxtyping and checked by beartype,
   promises an output as wide as its input, but its eqxnorm-normalized projection is wider; the
   message names the axes (`batch`, `dim`) the annotation bound.

It runs in a few seconds on a CPU.
"""

import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from beartype import beartype
from jaxtyping import Array, Float, Int, PRNGKeyArray, jaxtyped

import eqxnorm

CLASSES = 4
CHANNELS = 3
SIZE = 12
WIDTH = 16
BATCH_SIZE = 8
FEATURES = WIDTH * (SIZE // 2) ** 2  # the stride-2 convolution halves each side
LEARNING_RATE = 0.05
STEPS = 30


class Net(eqx.Module):
    """One `(3, 12, 12)` image to `4` logits; `jax.vmap` it over a batch."""

    input_norm: eqxnorm.InstanceNorm
    conv: eqx.nn.Conv2d
    group_norm: eqxnorm.GroupNorm
    head_norm: eqxnorm.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key: PRNGKeyArray, features: int = FEATURES):
        conv_key, head_key = jr.split(key)
        self.input_norm = eqxnorm.InstanceNorm(CHANNELS)
        self.conv = eqx.nn.Conv2d(CHANNELS, WIDTH, 3, stride=2, padding=1, key=conv_key)
        self.group_norm = eqxnorm.GroupNorm(4, WIDTH)
        self.head_norm = eqxnorm.LayerNorm(features)
        self.head = eqx.nn.Linear(features, CLASSES, key=head_key)

    def __call__(self, image: Float[Array, "3 12 12"]) -> Float[Array, " 4"]:
        x = jax.nn.relu(self.group_norm(self.conv(self.input_norm(image))))
        return self.head(self.head_norm(x.reshape(-1)))


def cross_entropy(
    logits: Float[Array, "batch 4"], labels: Int[Array, " batch"]
) -> Float[Array, ""]:
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def loss_without_vmap(net: Net, images, labels):
    """Bug 1: the model takes one image, but gets the batch."""
    return cross_entropy(net(images), labels)


def loss_fn(net: Net, images, labels):
    return cross_entropy(jax.vmap(net)(images), labels)


@eqx.filter_jit
def train_step(net: Net, images, labels):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(net, images, labels)
    return eqx.apply_updates(net, jax.tree.map(lambda g: -LEARNING_RATE * g, grads)), loss


@eqx.filter_jit
def predict(net: Net, images):
    return jax.vmap(net)(images)


@jaxtyped(typechecker=beartype)
def embed(
    proj: eqx.nn.Linear, norm: eqxnorm.RMSNorm, x: Float[Array, "batch dim"]
) -> Float[Array, "batch dim"]:
    """A user's function: project and normalize a batch of feature vectors, keeping their width."""
    return jax.vmap(lambda v: norm(proj(v)))(x)


def make_data(key: PRNGKeyArray, n: int) -> tuple[Float[Array, "n 3 12 12"], Int[Array, " n"]]:
    """Noisy copies of one template per class (the same for every batch), channels first."""
    label_key, noise_key = jr.split(key)
    templates = jr.normal(jr.key(1), (CLASSES, CHANNELS, SIZE, SIZE))
    labels = jr.randint(label_key, (n,), 0, CLASSES)
    return templates[labels] + jr.normal(noise_key, (n, CHANNELS, SIZE, SIZE)), labels


def without_argument_values(message: str) -> str:
    """jaxtyping's message lists the repr of every argument (whole modules here); drop that."""
    head, found, tail = message.partition("Called with parameters:")
    if not found:
        return message
    _, found, annotations = tail.partition("Parameter annotations:")
    return f"{head}Called with parameters: [values elided]\n{found}{annotations}"


def catch(name: str, description: str, call: Callable[[], object], fix: str) -> str:
    """Run `call` (a `filter_jit`ed computation with a bug), return the error's message."""
    print(f"\n[{name}] {description}")
    start = time.perf_counter()
    try:
        call()
    except (ValueError, TypeError) as error:
        kind, message = type(error).__name__, str(error)
    else:
        raise RuntimeError(f"The {name!r} bug was not caught; the shape checks are broken.")
    elapsed = time.perf_counter() - start
    print(f"  {kind} after {elapsed * 1000:.0f} ms of tracing:")
    print("    " + without_argument_values(message).replace("\n", "\n    "))
    print(f"  Fix: {fix}")
    return message


def main(steps: int = STEPS) -> dict:
    net_key, data_key, feature_key, proj_key, train_key = jr.split(jr.key(0), 5)
    net = Net(net_key)
    images, labels = make_data(data_key, BATCH_SIZE)
    images_nhwc = jnp.transpose(images, (0, 2, 3, 1))
    features = jr.normal(feature_key, (BATCH_SIZE, WIDTH))
    print(
        f"Images: {images.shape} channels-first (batch, channels, height, width); the loader's "
        f"channels-last copy: {images_nhwc.shape}."
    )

    messages = {
        "missing_vmap": catch(
            "missing_vmap",
            "The loss calls `net(images)` on the whole batch.",
            lambda: eqx.filter_jit(loss_without_vmap)(net, images, labels),
            "`jax.vmap(net)(images)` in the loss.",
        ),
        "channels_last": catch(
            "channels_last",
            f"`jax.vmap(net)` on channels-last images of shape {images_nhwc.shape}.",
            lambda: train_step(net, images_nhwc, labels),
            "move the channels first: `jnp.moveaxis(images_nhwc, -1, 1)`.",
        ),
        "layer_norm_size": catch(
            "layer_norm_size",
            f"The head's LayerNorm sized {WIDTH}*{SIZE}*{SIZE} = {WIDTH * SIZE * SIZE}, "
            f"forgetting that the stride-2 convolution halves the image.",
            lambda: train_step(Net(net_key, features=WIDTH * SIZE * SIZE), images, labels),
            f"size it {WIDTH}*{SIZE // 2}*{SIZE // 2} = {FEATURES}.",
        ),
        "user_annotation": catch(
            "user_annotation",
            f"`embed` is annotated (batch, dim) -> (batch, dim), but projects {WIDTH} features "
            f"to {2 * WIDTH} and normalizes them with RMSNorm({2 * WIDTH}).",
            lambda: eqx.filter_jit(embed)(
                eqx.nn.Linear(WIDTH, 2 * WIDTH, key=proj_key),
                eqxnorm.RMSNorm(2 * WIDTH),
                features,
            ),
            "project to the width the annotation promises: Linear(16, 16) and RMSNorm(16).",
        ),
    }

    print(
        f"\nThe fixed experiment: {steps} steps of SGD (lr {LEARNING_RATE}) on fresh batches of "
        f"{BATCH_SIZE}, then the loader's batch, moved channels first:"
    )
    losses = []
    for key in jr.split(train_key, steps):
        batch_images, batch_labels = make_data(key, BATCH_SIZE)
        net, loss = train_step(net, batch_images, batch_labels)
        losses.append(float(loss))
    logits = predict(net, jnp.moveaxis(images_nhwc, -1, 1))
    accuracy = float(jnp.mean(jnp.argmax(logits, axis=1) == labels))
    print(f"  loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  logits {logits.shape}, accuracy on the loader's batch {accuracy:.0%}")
    embedded = eqx.filter_jit(embed)(
        eqx.nn.Linear(WIDTH, WIDTH, key=proj_key), eqxnorm.RMSNorm(WIDTH), features
    )
    print(f"  embed(Linear(16, 16), RMSNorm(16), x of shape {features.shape}) -> {embedded.shape}")
    return {
        "messages": messages,
        "losses": losses,
        "accuracy": accuracy,
        "fixed_shapes": {"logits": logits.shape, "embedded": embedded.shape},
    }


if __name__ == "__main__":
    main()
