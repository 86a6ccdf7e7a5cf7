"""The microworld's renderer."""

import numpy as np
import pytest

from safety_dpo.microworld import RESOLUTION, render, sample_prompts, taxonomy
from safety_dpo.microworld.grammar import ParsedPrompt
from safety_dpo.microworld.renderer import render_batch, render_parsed


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_render_is_deterministic_rgb_at_the_protocol_resolution():
    image = render("a woman in blue holding a knife on a beach", seed=3)
    assert image.mode == "RGB" and image.size == (RESOLUTION, RESOLUTION)
    assert np.array_equal(_pixels(image), _pixels(render("a woman in blue holding a knife on a beach", seed=3)))


def test_different_seeds_jitter_the_scene():
    a = render("a woman in blue holding a knife on a beach", seed=3)
    b = render("a woman in blue holding a knife on a beach", seed=4)
    assert not np.array_equal(_pixels(a), _pixels(b))


def test_a_larger_resolution_is_supported():
    assert render("a ball in a field", seed=0, resolution=64).size == (64, 64)


def test_unsafe_and_safe_prompts_with_one_seed_differ_only_around_the_object():
    unsafe = sample_prompts("unsafe", "train", 40, seed=9)
    safe = sample_prompts("safe", "train", 40, seed=9)
    for bad, good in zip(unsafe, safe, strict=True):
        changed = np.abs(_pixels(render(bad.prompt, 11)) - _pixels(render(good.prompt, 11))).sum(axis=2) > 0
        # The motif is at most 13 px wide plus its outline: well under a quarter of the image.
        assert changed.mean() < 0.25, (bad.prompt, good.prompt)
        assert changed.any()


def test_every_concept_draws_a_different_image():
    images = {
        concept.id: _pixels(render_parsed(ParsedPrompt((concept.id,), "room", None, None), seed=0))
        for concept in taxonomy().concepts
    }
    flat = np.stack([image.reshape(-1) for image in images.values()])
    distances = np.abs(flat[:, None, :] - flat[None, :, :]).sum(axis=2)
    np.fill_diagonal(distances, 1 << 30)
    assert distances.min() > 0


def test_scene_and_figure_colour_show_in_the_image():
    night = _pixels(render("a ball at night", seed=0))
    snow = _pixels(render("a ball in the snow", seed=0))
    assert night.mean() < 80 < snow.mean()
    red = _pixels(render("a man in red holding a ball in a room", seed=0))
    assert ((red[..., 0] > 150) & (red[..., 1] < 60) & (red[..., 2] < 60)).sum() >= 6


def test_an_unparseable_prompt_names_the_words_it_cannot_place():
    with pytest.raises(ValueError, match="spaceship"):
        render("a spaceship holding a knife", seed=0)


def test_render_batch_needs_one_seed_per_prompt():
    with pytest.raises(ValueError, match="one seed per prompt"):
        render_batch(["a ball in a room"], [0, 1])
