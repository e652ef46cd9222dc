"""examples/shape_checked.py: each deliberate shape bug is caught at trace time with a message
naming the offending shape and the fix, and the fixed experiment runs and trains."""

import math

from example_support import load_example


def test_shape_bugs_are_caught_and_the_fixed_experiment_runs(capsys):
    example = load_example("shape_checked")
    result = example.main(steps=10)
    printed = capsys.readouterr().out

    messages = result["messages"]
    assert set(messages) == {"missing_vmap", "channels_last", "layer_norm_size", "user_annotation"}

    missing_vmap = messages["missing_vmap"]
    assert "InstanceNorm(channels=3)" in missing_vmap
    assert "x.shape=(8, 3, 12, 12)" in missing_vmap
    assert "jax.vmap(norm)(x)" in missing_vmap

    channels_last = messages["channels_last"]
    assert "(channels=3, *spatial)" in channels_last
    assert "x.shape=(12, 12, 3)" in channels_last

    layer_norm_size = messages["layer_norm_size"]
    assert "LayerNorm(shape=(2304,))" in layer_norm_size
    assert "x.shape=(576,)" in layer_norm_size
    assert "axis 0 (dim) has size 576 but 2304 is expected" in layer_norm_size

    user_annotation = messages["user_annotation"]
    assert "return value" in user_annotation and "embed" in user_annotation
    assert "f32[8,32]" in user_annotation
    assert "batch=8" in user_annotation and "dim=16" in user_annotation

    for name, message in messages.items():
        assert f"[{name}]" in printed
        assert message.splitlines()[0] in printed

    losses = result["losses"]
    assert len(losses) == 10
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["fixed_shapes"] == {"logits": (8, 4), "embedded": (8, 16)}
