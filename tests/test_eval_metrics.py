"""IP aggregation (pure functions), FID through torchmetrics with the judge's and CLIP's features, and CLIPScore."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import get_tiny_clip

from safety_dpo.evaluation.ip import (
    any_flagged,
    count_per_group,
    inappropriate_probability,
    ip_per_group,
    standard_error,
)
from safety_dpo.evaluation.quality import (
    clip_score,
    extract_features,
    fid_feature_extractor,
    fid_from_features,
    frechet_distance,
)
from safety_dpo.microworld import frechet_distance as microworld_frechet_distance
from safety_dpo.microworld import load_judge, render, sample_prompts


# -------------------------------------------------------------------------------------------------------------- IP
def test_any_flagged_applies_the_i2p_rule():
    flags = {"nudenet": [True, False, False, False], "q16": [False, True, False, True]}
    assert any_flagged(flags) == [True, True, False, True]


def test_any_flagged_refuses_detectors_that_saw_different_images():
    with pytest.raises(ValueError, match="same images.*'nudenet': 2.*'q16': 3"):
        any_flagged({"nudenet": [True, False], "q16": [False, True, True]})


def test_any_flagged_refuses_no_detector():
    with pytest.raises(ValueError, match="at least one detector"):
        any_flagged({})


def test_inappropriate_probability_is_the_share_of_flagged_images():
    assert inappropriate_probability([True, False, False, True, True]) == pytest.approx(0.6)


def test_inappropriate_probability_refuses_no_image():
    with pytest.raises(ValueError, match="at least one image"):
        inappropriate_probability([])


def test_ip_per_group_counts_an_image_in_each_of_its_categories():
    flags = [True, False, True, False]
    groups = [("sexual", "shocking"), ("sexual",), "violence", None]
    assert ip_per_group(flags, groups) == {"sexual": 0.5, "shocking": 1.0, "violence": 1.0}
    assert count_per_group(groups) == {"sexual": 2, "shocking": 1, "violence": 1}


def test_ip_per_group_skips_images_without_a_group():
    assert ip_per_group([True, True, False], [None, (), "hate"]) == {"hate": 0.0}


def test_ip_per_group_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="3 flags but 2 group labels"):
        ip_per_group([True, False, True], ["a", "b"])


def test_standard_error_is_the_binomial_one():
    assert standard_error(0.2, 100) == pytest.approx(math.sqrt(0.2 * 0.8 / 100))
    assert standard_error(0.0, 10) == 0.0


# ------------------------------------------------------------------------------------------------------------- FID
@pytest.fixture(scope="module")
def renders() -> list[Image.Image]:
    items = sample_prompts("neutral", "test", 24, seed=0)
    return [render(item.prompt, seed) for item in items for seed in (0, 1)]


@pytest.fixture(scope="module")
def judge_features():
    return fid_feature_extractor("judge")[0]


def perturb(images: list[Image.Image], sigma: float, seed: int = 0) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    noisy = []
    for image in images:
        array = np.asarray(image, dtype=np.float64) + generator.normal(0, sigma, (32, 32, 3))
        noisy.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    return noisy


def test_fid_of_a_set_against_itself_is_zero(renders, judge_features):
    assert frechet_distance(renders, renders, judge_features) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_the_perturbation(renders, judge_features):
    distances = [frechet_distance(renders, perturb(renders, sigma), judge_features) for sigma in (4, 24, 64)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_torchmetrics_fid_equals_the_microworld_frechet_distance(renders, judge_features):
    first, second = renders[0::2], renders[1::2]
    judge = load_judge()
    expected = microworld_frechet_distance(judge.features(first), judge.features(second))
    assert frechet_distance(first, second, judge_features) == pytest.approx(expected, rel=1e-4)


def test_fid_from_features_of_two_gaussians_matches_the_closed_form():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    shifted = torch.randn(20000, 2, generator=generator, dtype=torch.float64) * 2 + torch.tensor([3.0, 0.0])
    # ||mu||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) = 9 + (1 + 4 - 4) * 2 = 11
    assert fid_from_features(real, shifted) == pytest.approx(11.0, rel=0.03)


def test_fid_needs_two_images_per_set(renders, judge_features):
    with pytest.raises(ValueError, match="at least two images in each set; got 1 reference"):
        frechet_distance(renders[:1], renders, judge_features)


def test_fid_from_features_refuses_mismatched_widths():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 5\)"):
        fid_from_features(torch.zeros(4, 3), torch.zeros(4, 5))


def test_judge_features_resize_images_of_another_size(renders, judge_features):
    large = [image.resize((64, 64), Image.Resampling.BILINEAR) for image in renders[:4]]
    assert extract_features(large, judge_features).shape == (4, judge_features.num_features)


def test_an_unknown_fid_feature_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="inception, clip, judge"):
        fid_feature_extractor("vgg")


def test_clip_fid_features_need_a_clip_model():
    with pytest.raises(ValueError, match="needs a CLIP model"):
        fid_feature_extractor("clip")


def test_inception_features_without_pytorch_fid_say_which_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r"safety_dpo\[fid\]"):
        fid_feature_extractor("inception")


# ------------------------------------------------------------------------------------------------------- CLIPScore
@pytest.fixture(scope="module")
def tiny_clip():
    return get_tiny_clip()


def test_clip_score_is_100_times_the_mean_cosine_of_the_embeddings(tiny_clip, renders):
    model, processor = tiny_clip
    images = renders[:6]
    prompts = [item.prompt for item in sample_prompts("neutral", "test", 6, seed=0)]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = model.get_image_features(pixel_values=pixels)
        text = processor(text=prompts, return_tensors="pt", padding=True)
        text_embeds = model.get_text_features(**text)
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    expected = max(100 * torch.nn.functional.cosine_similarity(image_embeds, text_embeds).mean().item(), 0.0)
    assert clip_score(images, prompts, tiny_clip, batch_size=4) == pytest.approx(expected, abs=1e-3)


def test_clip_score_refuses_mismatched_prompts(tiny_clip, renders):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        clip_score(renders[:2], ["a ball"], tiny_clip)


def test_clip_fid_features_give_zero_for_identical_sets(tiny_clip, renders):
    extractor, description = fid_feature_extractor("clip", clip=tiny_clip)
    assert description["dimensions"] == 16
    assert frechet_distance(renders[:8], renders[:8], extractor) == pytest.approx(0.0, abs=1e-6)
