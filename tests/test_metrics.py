"""The microworld's metric functions, on hand-made detections."""

import math

import pytest
import torch

from safety_dpo.microworld.metrics import (
    agreement_with_reference,
    concept_rates,
    frechet_distance,
    inappropriate_probability,
    ip_per_group,
    prompt_agreement,
    redirect_rate,
)

HARMFUL = {"knife", "gun"}


def test_ip_counts_images_with_any_harmful_concept():
    detections = [{"knife"}, {"apple"}, set(), {"gun", "apple"}]
    assert inappropriate_probability(detections, HARMFUL) == 0.5


def test_ip_of_no_images_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        inappropriate_probability([], HARMFUL)


def test_ip_per_group_skips_ungrouped_images():
    detections = [{"knife"}, set(), {"gun"}, {"knife"}]
    groups = ["violence", "violence", "sexual", None]
    assert ip_per_group(detections, groups, HARMFUL) == {"sexual": 1.0, "violence": 0.5}


def test_concept_rates_pool_and_find_the_worst_concept():
    detections = [{"knife"}, set(), {"apple", "knife"}, {"apple"}, {"gun"}]
    expected = ["knife", "knife", "apple", "apple", "apple"]
    rates = concept_rates(detections, expected)
    assert rates["pooled"] == pytest.approx(3 / 5)
    assert rates["per_concept"] == {"apple": pytest.approx(2 / 3), "knife": 0.5}
    assert (rates["worst_concept"], rates["worst"]) == ("knife", 0.5)


def test_concept_rates_need_one_expected_concept_per_image():
    with pytest.raises(ValueError, match="2 detections but 1"):
        concept_rates([set(), set()], ["knife"])


def test_prompt_agreement_counts_only_requested_attributes():
    descriptions = [
        {"concepts": {"knife"}, "scene": "beach", "colour": "red"},
        {"concepts": set(), "scene": "city", "colour": "none"},
    ]
    requests = [
        {"concepts": ["knife"], "scene": "beach", "colour": "blue"},  # 2 of 3
        {"concepts": ["apple"], "scene": "city", "colour": None},  # 1 of 2, colour not requested
    ]
    assert prompt_agreement(descriptions, requests) == pytest.approx(3 / 5)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([1.0, -2.0, 0, 0, 0, 0, 0, 0.5])
    assert frechet_distance(features, features + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)


def test_frechet_distance_matches_the_one_dimensional_formula():
    a = torch.tensor([[0.0], [2.0]])  # mean 1, variance 2 (unbiased)
    b = torch.tensor([[3.0], [9.0]])  # mean 6, variance 18
    expected = (1 - 6) ** 2 + 2 + 18 - 2 * math.sqrt(2 * 18)
    assert frechet_distance(a, b) == pytest.approx(expected)


def test_frechet_distance_grows_with_a_perturbation():
    features = torch.randn(256, 32, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(256, 32, generator=torch.Generator().manual_seed(3))
    small = frechet_distance(features, features + 0.1 * noise)
    large = frechet_distance(features, features + 1.0 * noise)
    assert 0 < small < large


def test_frechet_distance_handles_fewer_samples_than_dimensions():
    a = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
    assert math.isfinite(frechet_distance(a, a + 1)) and frechet_distance(a, a + 1) > 0


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


# ------------------------------------------------------------------------------------- replacement against damage
COUNTERPARTS = {"knife": "spoon", "gun": "hairdryer"}


def test_redirect_rate_counts_images_showing_the_counterpart_and_nothing_harmful():
    detections = [{"spoon"}, {"spoon", "knife"}, set(), {"hairdryer"}, {"spoon"}]
    expected = ["knife", "knife", "knife", "gun", "gun"]  # the last shows knife's counterpart, not gun's
    assert redirect_rate(detections, expected, COUNTERPARTS, HARMFUL) == pytest.approx(2 / 5)


def test_redirect_rate_of_no_images_is_an_error():
    with pytest.raises(ValueError, match="at least one image"):
        redirect_rate([], [], COUNTERPARTS, HARMFUL)


def test_agreement_with_a_reference_compares_the_chosen_attributes_image_by_image():
    seen = [
        {"concepts": {"apple"}, "scene": "beach", "colour": "red"},
        {"concepts": {"box"}, "scene": "beach", "colour": "red"},  # same layout, another object
        {"concepts": {"apple"}, "scene": "snow", "colour": "red"},
    ]
    reference = [{"concepts": {"apple"}, "scene": "beach", "colour": "red"}] * 3
    assert agreement_with_reference(seen, reference) == pytest.approx(1 / 3)
    assert agreement_with_reference(seen, reference, ("scene", "colour")) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 descriptions but 3 reference"):
        agreement_with_reference(seen[:2], reference)
