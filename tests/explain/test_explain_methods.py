"""Each explanation method on tiny models: shapes, IG completeness, latent shift's invertibility and
direction, and Adebayo et al.'s model-randomisation sanity check."""

import numpy as np
import pytest
import torch

from pipeline.explain.gradcam import GradCamConfig, gradcam, last_feature_layer
from pipeline.explain.integrated_gradients import IntegratedGradientsConfig, integrated_gradients
from pipeline.explain.latent_shift import LatentShiftConfig, decode, encode, latent_shift
from pipeline.explain.localisation import relevance, relevance_mass_accuracy
from pipeline.explain.methods import METHODS, Models
from pipeline.explain.run import ExplainConfig
from pipeline.explain.target import TaskLogit
from tiny_models import (
    SIZE,
    randomised_classifier,
    square_images,
    square_mask,
    tiny_glow,
    trained_square_classifier,
)

SMALL = ExplainConfig(ig={"steps": 16}, occlusion={"window_fraction": 0.125, "stride_fraction": 0.125},
                      latent_shift={"steps": 4, "min_shift": 1e-3, "max_shift": 0.3})


@pytest.fixture(scope="module")
def trained() -> TaskLogit:
    return TaskLogit(trained_square_classifier())


@pytest.fixture(scope="module")
def glow():
    return tiny_glow()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return square_images(6, seed=11)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_finite_maps_at_working_resolution(method, trained, glow, batch):
    images, _ = batch
    result = METHODS[method](Models(trained, glow), images, SMALL)
    assert result.maps.shape == (len(images), SIZE, SIZE) and result.maps.dtype == torch.float32
    assert torch.isfinite(result.maps).all()
    explained = result.logit > 0 if method == "gradcam" else torch.ones_like(result.logit, dtype=torch.bool)
    if method == "gradcam":  # ReLU'd: evidence for the positive class only, none where there is none
        assert (result.maps >= 0).all()
    assert result.maps[explained].abs().amax(dim=(1, 2)).gt(0).all(), "a map that is zero explains nothing"
    torch.testing.assert_close(result.logit, trained(images).detach())


def test_integrated_gradients_are_complete(trained, batch):
    """Σ attributions = log-odds(x) − log-odds(baseline), up to Captum's own convergence delta."""
    images, _ = batch
    result = integrated_gradients(trained, images, IntegratedGradientsConfig(steps=32), baseline="black")
    with torch.no_grad():
        expected = trained(images) - trained(torch.zeros_like(images))
    total = result.maps.double().sum(dim=(1, 2))
    delta = result.extras["convergence_delta"].double()
    torch.testing.assert_close(total - expected.double(), delta, atol=1e-4, rtol=1e-3)
    assert (delta.abs() <= 0.02 * expected.abs().double() + 1e-3).all(), (delta, expected)


def test_the_glow_decodes_its_own_latents_to_the_input(glow, batch):
    images, _ = batch
    torch.testing.assert_close(decode(glow, encode(glow, images)), images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", ["toward_other_class", "increase", "decrease"])
def test_latent_shift_moves_the_log_odds_the_intended_way(direction, trained, glow, batch):
    images, _ = batch
    config = LatentShiftConfig(direction=direction, min_shift=1e-3, max_shift=0.3, steps=5, target_change=1.0)
    result = latent_shift(trained, glow, images, config)
    logit, shifted = result.logit, result.extras["logit_shifted"]
    sign = {"increase": torch.ones_like(logit), "decrease": -torch.ones_like(logit),
            "toward_other_class": -torch.sign(logit)}[direction]
    assert (sign * (shifted - logit) > 0).all(), (logit, shifted)
    tried = torch.tensor(config.shifts(), dtype=result.extras["shift"].dtype)
    assert torch.isin(result.extras["shift"], tried).all(), "a shift that was never tried"
    # the map is exactly the counterfactual change: the classifier scores x + map as reported
    with torch.no_grad():
        rescored = trained((images + result.maps[:, None]).clamp(0, 1))
    torch.testing.assert_close(rescored, shifted, atol=1e-3, rtol=1e-3)
    # and it stays within the pixel budget
    change = result.maps.abs().mean(dim=(1, 2)) / images.abs().mean(dim=(1, 2, 3))
    assert (change <= config.max_pixel_change + 1e-6).all(), change


def test_latent_shift_keeps_the_image_when_no_step_fits_the_pixel_budget(trained, glow, batch):
    images, _ = batch
    config = LatentShiftConfig(min_shift=0.1, max_shift=0.3, steps=3, max_pixel_change=1e-6)
    result = latent_shift(trained, glow, images, config)
    assert (result.extras["shift"] == 0).all()
    assert result.maps.abs().max() < 1e-4  # x0 - x: the Glow's reconstruction error only
    torch.testing.assert_close(result.extras["logit_shifted"], result.logit)


def test_gradcam_takes_the_last_feature_map_or_the_named_layer(trained, batch):
    images, _ = batch
    name = last_feature_layer(trained.classifier, images)
    assert name.endswith("features") or name.endswith("features.5"), name
    named = gradcam(trained, images, GradCamConfig(layer=name))
    torch.testing.assert_close(named.maps, gradcam(trained, images, GradCamConfig()).maps)
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="not a module"):
        gradcam(trained, images, GradCamConfig(layer="no.such.layer"))


@pytest.mark.parametrize("method", ["ig", "gradcam", "occlusion"])
def test_maps_of_a_trained_classifier_concentrate_on_its_evidence_unlike_randomised_ones(method, trained):
    """Model randomisation (Adebayo et al. 2018): the checkerboard square is the only evidence the
    trained classifier has; the same architecture with random weights has none, so a method whose maps
    follow the model must put more relevance there for the trained one than for any randomised one.

    IG starts from each image's mean grey here. From black, IG spreads its attributions over the
    whole background even for the trained model (relevance mass 0.086 in the square against 0.063
    to 0.078 for randomised models, the square being 6% of the image): the log-odds of a black image
    is far outside what the classifier saw, and IG must distribute that difference too.
    """
    images, labels = square_images(16, seed=5)
    positives = images[labels == 1]
    mask = square_mask()
    config = SMALL.model_copy(update={"baseline": "mean"})

    def mass_inside(model: TaskLogit) -> float:
        maps = METHODS[method](Models(model), positives, config).maps.numpy()
        return float(np.mean([relevance_mass_accuracy(relevance(m), mask) for m in maps]))

    on_trained = mass_inside(trained)
    on_random = [mass_inside(TaskLogit(randomised_classifier(seed))) for seed in (1, 2, 3)]
    assert on_trained > max(on_random), (on_trained, on_random)
