"""The ResNet-on-digits example: every normalization variant trains (the loss falls, held-out
accuracy well above chance after a few steps at a tiny width), the table and plot come out,
and bad arguments are refused before any training."""

import math

import pytest

from example_support import load_example


def test_every_variant_trains_and_the_report_and_plot_come_out(tmp_path, capsys):
    example = load_example("resnet_digits")
    plot_path = tmp_path / "resnet.png"
    steps = 60
    result = example.main(steps=steps, batch_size=32, width=8, eval_every=30, plot_path=plot_path)
    printed = capsys.readouterr().out

    variants = result["variants"]
    assert list(variants) == list(example.VARIANTS)
    for name, run in variants.items():
        losses = run["losses"]
        assert len(losses) == steps, name
        assert all(math.isfinite(loss) for loss in losses), (name, losses)
        assert run["eval_steps"] == [30, 60], name
        assert run["test_accuracies"][-1] == pytest.approx(run["test_accuracy"]), name
        # The table row carries this run's own numbers.
        assert f"{run['test_accuracy']:>8.2%}" in printed, name
    for name in ("gn_ws", "batch_norm", "layer_norm"):
        losses = variants[name]["losses"]
        # Ten balanced classes: the first loss is near log(10) ≈ 2.3.
        assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, (name, losses)
        # Chance is 10%; BatchNorm is evaluated in inference mode with its running statistics.
        assert variants[name]["test_accuracy"] > 0.4, (name, variants[name]["test_accuracy"])
    # Without normalization, a few steps at this width barely leave chance.
    assert variants["gn_ws"]["test_accuracy"] > variants["none"]["test_accuracy"] + 0.2
    # GroupNorm + WS and BatchNorm share the architecture: the same convolution weights, and
    # each norm's (channels,) scale and shift.
    assert variants["gn_ws"]["parameters"] == variants["batch_norm"]["parameters"]

    assert result["plot_path"] == plot_path
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GroupNorm + WS" in printed and "no normalization" in printed


def test_bad_arguments_are_refused_before_training():
    example = load_example("resnet_digits")
    with pytest.raises(ValueError, match=r"Unknown variant\(s\) \['group_norm'\]"):
        example.main(variants=("gn_ws", "group_norm"))
    with pytest.raises(ValueError, match="width=6 must be a multiple of 4"):
        example.main(width=6)
