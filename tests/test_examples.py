"""The tour example, the README's main job: it trains (the loss goes down) and shows a shape
error caught at trace time."""

import importlib.util
import math
from pathlib import Path

TOUR = Path(__file__).resolve().parents[1] / "examples" / "tour.py"


def _load_tour():
    spec = importlib.util.spec_from_file_location("eqxnorm_examples_tour", TOUR)
    assert spec is not None and spec.loader is not None, f"cannot load {TOUR}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tour_trains_and_reports_a_shape_error(capsys):
    tour = _load_tour()
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
