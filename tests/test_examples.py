"""The tour example, the README's main job: it trains (the loss goes down) and shows a shape
error caught at trace time."""

import math

from example_support import load_example


def test_tour_trains_and_reports_a_shape_error(capsys):
    tour = load_example("tour")
    result = tour.main()
    printed = capsys.readouterr().out

    losses = result["losses"]
    assert len(losses) == tour.STEPS
    assert all(math.isfinite(loss) for loss in losses)
    # Four balanced classes: the first loss is near log(4) ≈ 1.39; training must halve it.
    assert losses[-1] < 0.5 * losses[0], losses

    message = result["shape_error"]
    assert "LayerNorm" in message and "x.shape=(64, 32)" in message
    assert "jax.vmap(norm)(x)" in message
    assert message in printed
    assert f"step {tour.STEPS - 1:2d}  loss {losses[-1]:.4f}" in printed
