"""The Lipschitz example: with SpectralNorm every layer's effective weight keeps spectral norm
1 throughout training (while its raw weight does not), so the network's Lipschitz bound stays
at 1; the unconstrained twin's layers and bound grow past 1. Both fits improve."""

import math

import pytest

from example_support import load_example


def test_spectral_norm_holds_every_layer_at_one_and_the_plain_mlp_drifts(tmp_path, capsys):
    example = load_example("lipschitz")
    plot_path = tmp_path / "lipschitz.png"
    steps, depth = 200, 3
    result = example.main(
        steps=steps,
        batch_size=64,
        width=16,
        depth=depth,
        learning_rate=3e-3,
        record_every=10,
        print_every=50,
        plot_path=plot_path,
    )
    printed = capsys.readouterr().out
    constrained, plain = result["spectral_norm"], result["plain"]

    for name, run in (("SpectralNorm", constrained), ("plain", plain)):
        losses = run["losses"]
        assert len(losses) == steps, name
        assert all(math.isfinite(loss) for loss in losses), (name, losses)
        assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:10]) / 10, (name, losses)
        assert run["step"] == list(range(0, steps + 1, 10)), name

    # Every measurement, every layer: the effective weight W/σ̂ has spectral norm 1, from
    # above (σ̂ = u·Wv never exceeds σ(W)), up to the power iteration's lag.
    for step, sigmas in zip(constrained["step"], constrained["effective_sigma"], strict=True):
        assert len(sigmas) == depth
        for sigma in sigmas:
            assert 1 - 1e-4 <= sigma <= 1.05, (step, sigmas)
    # ... while the raw weights underneath are unconstrained (layer 1, 16×2, starts near 1.5).
    assert max(abs(s - 1) for s in constrained["raw_sigma"][-1]) > 0.2, constrained["raw_sigma"]
    # The product bounds the Lipschitz constant, and the gradient respects the bound.
    for bound, gradient in zip(
        constrained["lipschitz_bound"], constrained["max_gradient_norm"], strict=True
    ):
        assert bound == pytest.approx(1, abs=0.1) and gradient <= bound * (1 + 1e-5)

    # The unconstrained twin: layers above 1, and a Lipschitz bound that grows past 1.
    assert max(plain["raw_sigma"][-1]) > 1.2, plain["raw_sigma"][-1]
    bounds = plain["lipschitz_bound"]
    assert bounds[-1] > 1.2 and bounds[-1] > 1.2 * bounds[0], bounds

    assert result["plot_path"] == plot_path
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{steps:>5}  {constrained['losses'][-1]:>8.5f}" in printed


def test_an_odd_width_is_refused():
    example = load_example("lipschitz")
    with pytest.raises(ValueError, match="width=7 must be even: MaxMin pairs"):
        example.main(width=7)
