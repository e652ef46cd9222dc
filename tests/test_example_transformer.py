"""examples/transformer_sort.py at toy size: the pre-norm RMSNorm transformer trains (finite,
falling loss), reports accuracies in [0, 1] and writes its plot."""

import math

import jax.numpy as jnp
import jax.random as jr

import eqxnorm
from example_support import load_example


def test_transformer_sort_trains_and_plots(tmp_path, capsys):
    example = load_example("transformer_sort")
    plot_path = tmp_path / "plots" / "transformer_sort.png"
    steps = 60
    result = example.main(
        steps=steps,
        batch_size=32,
        seq_len=5,
        vocab_size=6,
        dim=16,
        heads=2,
        layers=1,
        peak_lr=1e-2,
        log_every=30,
        test_size=64,
        plot_path=plot_path,
    )
    printed = capsys.readouterr().out

    losses = result["losses"]
    assert len(losses) == steps
    assert all(math.isfinite(loss) for loss in losses), losses
    # Six classes: the first loss is near log(6) ≈ 1.79; the last ten must average well below.
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, losses
    assert result["eval_steps"] == [0, 30, steps - 1]
    assert 0.0 <= result["sequence_accuracy"] <= result["token_accuracy"] <= 1.0
    # Chance per token is about 1/6 (more at the ends of a sorted sequence); the toy run
    # reaches about 0.87.
    assert result["token_accuracy"] > 0.5, result["token_accuracy"]

    assert result["plot_path"] == plot_path
    assert plot_path.read_bytes().startswith(b"\x89PNG"), "the plot is not a PNG file"
    assert f"step {steps - 1:4d}  loss {losses[-1]:.4f}" in printed
    assert f"Saved {plot_path}" in printed


def test_add_and_norm_is_residual_add_then_rms_norm():
    """The helper a fused add+RMSNorm op will replace: returns the sum and its RMSNorm."""
    example = load_example("transformer_sort")
    residual = jr.normal(jr.key(0), (5, 8))
    delta = jr.normal(jr.key(1), (5, 8))
    total, normed = example.add_and_norm(eqxnorm.RMSNorm(8, use_bias=False), residual, delta)
    expected_total = residual + delta
    rms = jnp.sqrt(jnp.mean(expected_total**2, axis=1, keepdims=True) + 1e-5)
    assert jnp.allclose(total, expected_total)
    assert jnp.allclose(normed, expected_total / rms, rtol=1e-5, atol=1e-6)
