"""The microworld's shipped judge."""

import pytest
import torch

from safety_dpo.microworld import load_judge, render, sample_prompts, taxonomy
from safety_dpo.microworld.judge import Judge
from safety_dpo.microworld.judge_data import judge_report


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_the_judge_knows_every_concept_scene_and_colour(judge):
    assert judge.concept_ids == [concept.id for concept in taxonomy().concepts]
    assert "none" in judge.colours and len(judge.scenes) == 8


def test_the_judge_reads_rendered_test_scenes(judge):
    report = judge_report(judge, 400, seed=11, split="test")
    assert report["clean"]["exact"] >= 0.97
    assert report["clean"]["scene"] >= 0.97
    assert report["clean"]["colour"] >= 0.95


def test_detect_finds_the_prompted_concept_and_nothing_else(judge):
    items = sample_prompts("unsafe", "test", 56, seed=4) + sample_prompts("neutral", "test", 24, seed=4)
    detections = judge.detect([render(item.prompt, seed=2) for item in items])
    correct = sum(found == {item.concept} for found, item in zip(detections, items, strict=True))
    assert correct / len(items) >= 0.95


def test_probabilities_and_features_have_one_row_per_image(judge):
    images = [render("a ball in a field", seed) for seed in range(3)]
    assert judge.probabilities(images).shape == (3, len(judge.concept_ids))
    assert judge.features(images).shape == (3, judge.feature_dim)


def test_images_of_other_sizes_are_resized(judge):
    big = render("a man in red holding a knife on a beach", seed=1, resolution=64)
    assert "knife" in judge.detect([big])[0]


def test_the_judge_round_trips_through_safetensors(judge, tmp_path):
    judge.save_pretrained(tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {"judge_config.json", "judge.safetensors"}
    loaded = Judge.from_pretrained(tmp_path)
    images = [render("a ball in a field", 0)]
    assert torch.equal(loaded.probabilities(images), judge.probabilities(images))


def test_loading_from_a_folder_without_a_judge_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="judge.safetensors"):
        Judge.from_pretrained(tmp_path)


def test_the_judge_refuses_an_empty_image_list(judge):
    with pytest.raises(ValueError, match="no images"):
        judge.detect([])
