"""The project-made CLIP tokenizer, its test fixture, and the tiny SD 1.x / SDXL pipelines built on it."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny_models import (
    IMAGE_SIZE,
    TOKENIZER_DIR,
    get_dummy_inputs,
    get_dummy_sd_components,
    get_dummy_sdxl_components,
    load_fixture_tokenizer,
)
from transformers import CLIPTokenizer

from safety_dpo.microworld.tokenizer import build_clip_tokenizer

PIPELINES = {
    "sd": (StableDiffusionPipeline, get_dummy_sd_components),
    "sdxl": (StableDiffusionXLPipeline, get_dummy_sdxl_components),
}
TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
# Words whose endings and beginnings overlap in many ways ("at" ends "cat", "scat", "heat"; "he" starts "heat"
# and "heather"), where merges of ordinary BPE vocabularies would fire inside each other.
OVERLAPPING_WORDS = ["a", "at", "ate", "cat", "scat", "eat", "heat", "he", "heather", "then", "the", "tea", "banana"]


def _load_make_tokenizer() -> ModuleType:
    # The script lives beside its fixture rather than in an importable package, so it is loaded from its path.
    path = Path(__file__).resolve().parent / "fixtures" / "make_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(pipeline_name: str, components_seed: int = 0, inputs_seed: int = 0) -> np.ndarray:
    pipeline_class, get_components = PIPELINES[pipeline_name]
    pipeline = pipeline_class(**get_components(seed=components_seed))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(**get_dummy_inputs(seed=inputs_seed)).images


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # Intra-op threads cannot speed up models this small, and on a busy 2-core machine (or beside a second
    # pytest-xdist worker) their hand-offs made these tests about ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return load_fixture_tokenizer()


def test_fixture_tokenizer_is_what_make_tokenizer_writes(tmp_path):
    _load_make_tokenizer().main(tmp_path)

    assert sorted(path.name for path in TOKENIZER_DIR.iterdir()) == TOKENIZER_FILES
    for name in TOKENIZER_FILES:
        assert (TOKENIZER_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_each_fixture_word_encodes_to_one_token(tokenizer):
    vocab = tokenizer.get_vocab()
    for word in _load_make_tokenizer().WORDS:
        assert tokenizer(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]], word


def test_fixture_tokenizer_decodes_what_it_encodes(tokenizer):
    prompt = "a photo of a woman wearing a red hat, holding an umbrella on the beach!"

    input_ids = tokenizer(prompt).input_ids

    assert input_ids[0] == tokenizer.bos_token_id and input_ids[-1] == tokenizer.eos_token_id
    assert (
        tokenizer.decode(input_ids, skip_special_tokens=True)
        == "a photo of a woman wearing a red hat , holding an umbrella on the beach !"
    )


def test_unlisted_words_are_spelled_out_and_foreign_characters_become_unknown(tokenizer):
    assert tokenizer.tokenize("Zebras") == ["z", "e", "b", "r", "a", "s</w>"]
    # "é" is two bytes and the snowman three; each byte-level symbol is outside the vocabulary.
    input_ids = tokenizer("é ☃", add_special_tokens=False).input_ids

    assert input_ids == [tokenizer.unk_token_id] * 5
    assert tokenizer.unk_token == tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_words_stay_one_token_whatever_the_order_of_merges(tmp_path):
    build_clip_tokenizer(OVERLAPPING_WORDS, tmp_path)
    header, *merges = (tmp_path / "merges.txt").read_text().splitlines()
    for order in (merges[::-1], random.Random(0).sample(merges, len(merges))):
        (tmp_path / "merges.txt").write_text("\n".join([header, *order]) + "\n")
        shuffled = CLIPTokenizer.from_pretrained(tmp_path)

        assert [shuffled.tokenize(word) for word in OVERLAPPING_WORDS] == [
            [word + "</w>"] for word in OVERLAPPING_WORDS
        ]


def test_build_clip_tokenizer_ignores_word_order_and_duplicates(tmp_path):
    build_clip_tokenizer(OVERLAPPING_WORDS, tmp_path / "sorted")
    build_clip_tokenizer(OVERLAPPING_WORDS[::-1] + OVERLAPPING_WORDS, tmp_path / "shuffled")

    for name in TOKENIZER_FILES:
        assert (tmp_path / "sorted" / name).read_bytes() == (tmp_path / "shuffled" / name).read_bytes(), name


@pytest.mark.parametrize("word", ["Cat", "red hat", "3d", "10", "café", "t-shirt", ""])
def test_build_clip_tokenizer_rejects_words_that_cannot_be_one_token(tmp_path, word):
    with pytest.raises(ValueError, match=re.escape(f"Cannot make {word!r} one token")):
        build_clip_tokenizer(["cat", word], tmp_path)


@pytest.mark.parametrize("pipeline_name", sorted(PIPELINES))
def test_tiny_pipeline_makes_images_in_two_steps_on_cpu(pipeline_name):
    images = _run(pipeline_name)

    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("pipeline_name", sorted(PIPELINES))
def test_tiny_pipeline_same_seeds_give_identical_images(pipeline_name):
    np.testing.assert_array_equal(_run(pipeline_name), _run(pipeline_name))


@pytest.mark.parametrize("pipeline_name", sorted(PIPELINES))
@pytest.mark.parametrize("seeds", [{"components_seed": 1}, {"inputs_seed": 1}], ids=["components", "inputs"])
def test_tiny_pipeline_different_seeds_give_different_images(pipeline_name, seeds):
    assert np.abs(_run(pipeline_name) - _run(pipeline_name, **seeds)).max() > 1e-3


@pytest.mark.parametrize("pipeline_name", sorted(PIPELINES))
def test_tiny_pipeline_survives_save_and_load_as_safetensors(pipeline_name, tmp_path):
    pipeline_class, get_components = PIPELINES[pipeline_name]
    pipeline_class(**get_components()).save_pretrained(tmp_path, safe_serialization=True)
    loaded = pipeline_class.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)

    assert {"unet", "vae", "text_encoder"} <= {path.parent.name for path in tmp_path.glob("*/*.safetensors")}
    assert not list(tmp_path.glob("*/*.bin"))
    np.testing.assert_array_equal(loaded(**get_dummy_inputs()).images, _run(pipeline_name))
