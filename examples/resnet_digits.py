"""A small ResNet on the scikit-learn digits (8×8 grayscale, 10 classes), trained once per
normalization: GroupNorm + Weight Standardization, BatchNorm, LayerNorm, and none. It prints
each run's train loss, test accuracy and time, then one side-by-side table, and saves the
loss and test-accuracy curves to `examples/out/resnet_digits.png` (or to the path given as the
only argument).

    python examples/resnet_digits.py

The images ship inside scikit-learn (nothing is downloaded); a fixed, stratified 80/20 split
gives 1437 training and 360 test images. Each variant is the same network (stem convolution,
three residual blocks, global average pooling, linear head) with a different layer after
every convolution: `eqxnorm.GroupNorm` with groups of 4 channels behind convolutions wrapped
in `eqxnorm.WeightStandardization`; `eqxnorm.BatchNorm`, its statistics pooled over the
`jax.vmap` axis in training and its running statistics (an `eqx.nn.State`) used for the test
set; `eqxnorm.LayerNorm` over each whole `(channels, height, width)` activation, with an
elementwise affine (hence its extra parameters); or nothing. All are trained with the same
seed, batches and hand-written Adam (a few lines of `jax.tree.map`, cosine learning-rate
decay) under `eqx.filter_jit`. About a minute on a 2-core CPU.
"""

import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import eqxnorm
from _training import Adam, smooth  # examples/_training.py

CLASSES = 10
BATCH_AXIS = "batch"
CHANNELS_PER_GROUP = 4
# A user's run writes to the ignored examples/out/; the README's figure in examples/plots/ is
# refreshed on purpose: `python examples/resnet_digits.py examples/plots/resnet_digits.png`.
PLOT_PATH = Path(__file__).resolve().parent / "out" / "resnet_digits.png"

# What each variant puts after every convolution (and whether its convolutions are wrapped
# in WeightStandardization), named as in the printed table.
VARIANTS = {
    "gn_ws": "GroupNorm + WS",
    "batch_norm": "BatchNorm",
    "layer_norm": "LayerNorm",
    "none": "no normalization",
}


def make_conv(
    variant: str, in_channels: int, out_channels: int, kernel: int, stride: int, key
) -> eqx.Module:
    # Every normalization but "none" has its own shift, which makes a convolution bias
    # redundant.
    conv = eqx.nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=kernel // 2,
        use_bias=variant == "none",
        key=key,
    )
    return eqxnorm.WeightStandardization(conv) if variant == "gn_ws" else conv


def make_norm(variant: str, channels: int, size: int) -> eqx.Module | None:
    """The normalization after a convolution with `channels` outputs of `size × size`."""
    if variant == "gn_ws":
        return eqxnorm.GroupNorm(channels // CHANNELS_PER_GROUP, channels)
    if variant == "batch_norm":
        return eqxnorm.BatchNorm(channels, axis_name=BATCH_AXIS)
    if variant == "layer_norm":
        return eqxnorm.LayerNorm((channels, size, size))
    return None


def normalize(norm: eqx.Module | None, x: Array, state: eqx.nn.State):
    # Every eqxnorm layer takes and returns the state (only BatchNorm changes it), so the
    # variants share one forward pass.
    return (x, state) if norm is None else norm(x, state)


class Block(eqx.Module):
    """conv-norm-relu-conv-norm plus a shortcut (a strided 1×1 convolution and a norm when
    the shape changes), then relu."""

    conv1: eqx.Module
    norm1: eqx.Module | None
    conv2: eqx.Module
    norm2: eqx.Module | None
    shortcut: eqx.Module | None
    shortcut_norm: eqx.Module | None

    def __init__(
        self, variant: str, in_channels: int, out_channels: int, stride: int, size: int, key
    ):
        keys = jr.split(key, 3)
        out_size = size // stride
        self.conv1 = make_conv(variant, in_channels, out_channels, 3, stride, keys[0])
        self.norm1 = make_norm(variant, out_channels, out_size)
        self.conv2 = make_conv(variant, out_channels, out_channels, 3, 1, keys[1])
        self.norm2 = make_norm(variant, out_channels, out_size)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = None
            self.shortcut_norm = None
        else:
            self.shortcut = make_conv(variant, in_channels, out_channels, 1, stride, keys[2])
            self.shortcut_norm = make_norm(variant, out_channels, out_size)

    def __call__(self, x: Float[Array, "c h w"], state: eqx.nn.State):
        y, state = normalize(self.norm1, self.conv1(x), state)
        y, state = normalize(self.norm2, self.conv2(jax.nn.relu(y)), state)
        if self.shortcut is not None:
            x, state = normalize(self.shortcut_norm, self.shortcut(x), state)
        return jax.nn.relu(x + y), state


class ResNet(eqx.Module):
    """One `(1, 8, 8)` image to 10 logits: a stem convolution, a block at 8×8 with `width`
    channels, a strided block to 4×4 with `2 width`, a block at 4×4, global average pooling
    and a linear head. `jax.vmap` it over a batch with `axis_name=BATCH_AXIS`."""

    stem: eqx.Module
    stem_norm: eqx.Module | None
    blocks: tuple[Block, ...]
    head: eqx.nn.Linear

    def __init__(self, variant: str, width: int, key: PRNGKeyArray):
        keys = jr.split(key, 5)
        self.stem = make_conv(variant, 1, width, 3, 1, keys[0])
        self.stem_norm = make_norm(variant, width, 8)
        self.blocks = (
            Block(variant, width, width, 1, 8, keys[1]),
            Block(variant, width, 2 * width, 2, 8, keys[2]),
            Block(variant, 2 * width, 2 * width, 1, 4, keys[3]),
        )
        self.head = eqx.nn.Linear(2 * width, CLASSES, key=keys[4])

    def __call__(
        self, x: Float[Array, "1 8 8"], state: eqx.nn.State
    ) -> tuple[Float[Array, " 10"], eqx.nn.State]:
        x, state = normalize(self.stem_norm, self.stem(x), state)
        x = jax.nn.relu(x)
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(jnp.mean(x, axis=(1, 2))), state


def batched(model: ResNet):
    """The model over a batch: BatchNorm pools its statistics over the named axis; the state
    (running statistics) is shared, not batched."""
    return jax.vmap(model, axis_name=BATCH_AXIS, in_axes=(0, None), out_axes=(0, None))


def cross_entropy(logits: Float[Array, "n 10"], labels: Int[Array, " n"]) -> Float[Array, ""]:
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def loss_fn(model, state, images, labels):
    logits, state = batched(model)(images, state)
    return cross_entropy(logits, labels), state


@eqx.filter_jit
def train_step(model, state, opt, images, labels, learning_rate):
    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, state, images, labels
    )
    model, opt = opt.apply(model, grads, learning_rate)
    return model, state, opt, loss


@eqx.filter_jit
def evaluate(model, state, images, labels):
    """Loss and accuracy in inference mode (BatchNorm uses its running statistics)."""
    logits, _ = batched(eqx.nn.inference_mode(model))(images, state)
    accuracy = jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))
    return cross_entropy(logits, labels), accuracy


def load_data(seed: int):
    """The digits as `(n, 1, 8, 8)` float32 in [0, 1] and int32 labels, split 80/20 with
    every class in the same proportion in both parts."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    return jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(test_x), jnp.asarray(test_y)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """`(steps, batch_size)` indices: shuffled epochs, each dropping its last partial batch."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    order = [rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(order).reshape(-1, batch_size)[:steps]


def train_variant(variant, data, *, steps, batch_size, width, learning_rate, eval_every, seed):
    train_x, train_y, test_x, test_y = data
    model, state = eqx.nn.make_with_state(ResNet)(variant, width, jr.key(seed))
    opt = Adam.init(model)
    parameters = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    losses, eval_steps, test_accuracies = [], [], []
    start = time.perf_counter()
    for step, index in enumerate(batch_indices(train_x.shape[0], batch_size, steps, seed)):
        # Cosine decay to 0. An array, not a Python float: filter_jit would recompile for
        # every new float.
        rate = jnp.float32(learning_rate * 0.5 * (1 + np.cos(np.pi * step / steps)))
        model, state, opt, loss = train_step(
            model, state, opt, train_x[index], train_y[index], rate
        )
        losses.append(float(loss))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            _, accuracy = evaluate(model, state, test_x, test_y)
            eval_steps.append(step + 1)
            test_accuracies.append(float(accuracy))
    test_loss, test_accuracy = (float(v) for v in evaluate(model, state, test_x, test_y))
    tail = losses[-max(1, steps // 10) :]
    return {
        "name": VARIANTS[variant],
        "parameters": parameters,
        "losses": losses,
        "eval_steps": eval_steps,
        "test_accuracies": test_accuracies,
        "final_train_loss": sum(tail) / len(tail),
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "seconds": time.perf_counter() - start,
    }


def plot(results: dict, path: Path, title: str) -> None:
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for result in results.values():
        window = max(1, len(result["losses"]) // 20)
        steps = np.arange(1, len(result["losses"]) + 1)
        loss_axes.plot(steps, smooth(result["losses"], window), label=result["name"])
        accuracy_axes.plot(
            result["eval_steps"],
            100 * np.asarray(result["test_accuracies"]),
            marker=".",
            label=f"{result['name']} ({result['test_accuracy']:.1%})",
        )
    loss_axes.set(
        xlabel="step", ylabel="train loss (moving average)", yscale="log", title="Training loss"
    )
    accuracy_axes.set(xlabel="step", ylabel="test accuracy (%)", title="Held-out accuracy")
    accuracy_axes.set_ylim(max(0, accuracy_axes.get_ylim()[0]), 100)
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main(
    steps: int = 600,
    batch_size: int = 64,
    width: int = 16,
    plot_path: str | Path | None = PLOT_PATH,
    variants: tuple[str, ...] = tuple(VARIANTS),
    learning_rate: float = 3e-3,
    eval_every: int = 50,
    seed: int = 0,
) -> dict:
    """Train one ResNet per variant; print and return the results. `plot_path=None` skips
    the plot."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(
            f"Unknown variant(s) {unknown}; choose from {list(VARIANTS)}, e.g. "
            f"`variants=('gn_ws', 'batch_norm')`."
        )
    if width % CHANNELS_PER_GROUP != 0:
        raise ValueError(
            f"width={width} must be a multiple of {CHANNELS_PER_GROUP}: GroupNorm uses groups "
            f"of {CHANNELS_PER_GROUP} channels. Pass e.g. width={CHANNELS_PER_GROUP * 4}."
        )
    data = load_data(seed)
    print(
        f"Digits: {data[0].shape[0]} training and {data[2].shape[0]} test images of 8×8.\n"
        f"ResNet of width {width}, {steps} steps of Adam (batch {batch_size}, "
        f"lr {learning_rate} with cosine decay), seed {seed}."
    )
    results = {}
    for variant in variants:
        result = train_variant(
            variant,
            data,
            steps=steps,
            batch_size=batch_size,
            width=width,
            learning_rate=learning_rate,
            eval_every=eval_every,
            seed=seed,
        )
        results[variant] = result
        print(
            f"  {result['name']:<17} train loss {result['final_train_loss']:.4f}  "
            f"test accuracy {result['test_accuracy']:.2%}  "
            f"({result['seconds']:.1f} s, compilation included)"
        )

    header = f"{'normalization':<17} {'params':>7} {'train loss':>10} {'test loss':>9}"
    header += f" {'test acc':>8} {'time (s)':>8}"
    print(f"\n{header}\n{'-' * len(header)}")
    for result in results.values():
        print(
            f"{result['name']:<17} {result['parameters']:>7} "
            f"{result['final_train_loss']:>10.4f} {result['test_loss']:>9.4f} "
            f"{result['test_accuracy']:>8.2%} {result['seconds']:>8.1f}"
        )
    print(f"(train loss: mean over the last {max(1, steps // 10)} steps' batches)")

    if plot_path is not None:
        plot_path = Path(plot_path)
        title = f"ResNet (width {width}) on scikit-learn digits, {steps} steps of Adam"
        plot(results, plot_path, title)
        print(f"Plot saved to {plot_path}")
    return {"variants": results, "plot_path": plot_path}


if __name__ == "__main__":
    main(plot_path=sys.argv[1] if len(sys.argv) > 1 else PLOT_PATH)
