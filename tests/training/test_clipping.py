import torch

from pipeline.training.clipping import PercentileClip


def norm(grads):
    return float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads if g is not None])))


def test_ordinary_steps_pass_and_an_outlier_is_scaled_to_the_percentile():
    clip = PercentileClip(percentile=80.0, history=400)
    torch.manual_seed(0)
    for _ in range(50):
        grads = [torch.randn(10) * 0.1, None, torch.randn(3, 3) * 0.1]
        assert norm(clip(grads)) <= norm(grads) + 1e-6  # never scaled up
    typical = float(torch.tensor(list(clip.norms)).quantile(0.8))
    spike = [torch.full((10,), 100.0), None, torch.zeros(3, 3)]
    clipped = clip(spike)
    assert clipped[1] is None
    assert norm(clipped) < 2 * typical < norm(spike)
    # the direction is kept
    assert torch.allclose(clipped[0] / clipped[0].norm(), spike[0] / spike[0].norm())


def test_non_finite_gradients_are_left_for_the_caller_and_not_remembered():
    clip = PercentileClip()
    bad = [torch.tensor([float("nan"), 1.0])]
    assert clip(bad) is bad and len(clip.norms) == 0


def test_state_round_trip_reproduces_the_limit():
    clip = PercentileClip(history=5)
    for value in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        clip([torch.tensor([value])])
    restored = PercentileClip(history=5)
    restored.load_state_dict(clip.state_dict())
    assert list(restored.norms) == [2.0, 3.0, 4.0, 5.0, 6.0]
    spike = [torch.tensor([50.0])]
    assert torch.equal(restored(spike)[0], clip(spike)[0])
