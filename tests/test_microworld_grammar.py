"""The microworld's prompt grammar: sampling, splits, minimal edits and parsing."""

import re

import pytest

from safety_dpo.microworld import parse_prompt, sample_prompts, taxonomy, to_safe_prompt
from safety_dpo.microworld.grammar import composition_split


def _words(prompt: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", prompt.lower()))


def test_sampling_is_deterministic_and_returns_n_items():
    first = sample_prompts("unsafe", "train", 30, seed=7)
    assert first == sample_prompts("unsafe", "train", 30, seed=7)
    assert len(first) == 30
    assert first != sample_prompts("unsafe", "train", 30, seed=8)


def test_prompts_vary_in_wording_and_order():
    prompts = [item.prompt for item in sample_prompts("unsafe", "train", 200, seed=0)]
    first_words = {prompt.split()[0] for prompt in prompts}
    assert len(first_words) >= 5


def test_every_harmful_concept_is_covered_round_robin():
    items = sample_prompts("unsafe", "test", 56, seed=0)
    assert {item.concept for item in items} == {concept.id for concept in taxonomy().harmful_concepts}


def test_categories_restrict_the_concepts():
    items = sample_prompts("unsafe", "train", 40, seed=0, categories=["violence"])
    assert {item.category for item in items} == {"violence"}


def test_neutral_prompts_contain_no_harmful_name():
    harmful_names = {name for concept in taxonomy().harmful_concepts for name in concept.all_names}
    for item in sample_prompts("neutral", "train", 200, seed=0):
        assert not _words(item.prompt) & harmful_names
        assert item.category is None


@pytest.mark.parametrize("names", ["trained", "held-out"])
def test_unsafe_prompts_use_only_the_requested_name_set(names):
    world = taxonomy()
    for item in sample_prompts("unsafe", "test", 120, seed=1, names=names):
        concept = world.concept(item.concept)
        allowed, forbidden = (
            (concept.names, concept.held_out_names) if names == "trained" else (concept.held_out_names, concept.names)
        )
        assert _words(item.prompt) & set(allowed), item.prompt
        assert not _words(item.prompt) & set(forbidden), item.prompt


def test_train_and_test_compositions_are_disjoint():
    def compositions(split, kind):
        return {(i.concept, i.scene, i.colour) for i in sample_prompts(kind, split, 2000, seed=3)}

    for kind in ("unsafe", "neutral"):
        train, test = compositions("train", kind), compositions("test", kind)
        assert train and test
        assert not train & test
        assert all(composition_split(*c) == "test" for c in test)


def test_safe_prompts_are_the_item_by_item_minimal_edits_of_the_unsafe_ones():
    world = taxonomy()
    unsafe = sample_prompts("unsafe", "train", 100, seed=5)
    safe = sample_prompts("safe", "train", 100, seed=5)
    for bad, good in zip(unsafe, safe, strict=True):
        concept = world.concept(bad.concept)
        assert good.source_concept == bad.concept
        assert good.concept == concept.counterpart
        assert (good.scene, good.colour, good.figure) == (bad.scene, bad.colour, bad.figure)
        assert not _words(good.prompt) & set(concept.all_names)
        assert good.prompt == to_safe_prompt(bad.prompt)


def test_minimal_edit_removes_every_name_of_every_harmful_concept():
    world = taxonomy()
    for concept in world.harmful_concepts:
        for name in concept.all_names:
            safe = to_safe_prompt(f"a man in red holding a {name} on a beach")
            assert not _words(safe) & set(concept.all_names), safe
            assert world.counterpart_name(concept) in _words(safe)
            assert safe.endswith("on a beach") and safe.startswith("a man in red holding")


def test_minimal_edit_leaves_a_neutral_prompt_unchanged():
    assert to_safe_prompt("a ball in a forest") == "a ball in a forest"


def test_parsing_recovers_what_the_sampler_asked_for():
    for kind in ("unsafe", "safe", "neutral"):
        for item in sample_prompts(kind, "train", 150, seed=2):
            parsed = parse_prompt(item.prompt)
            assert parsed.concepts == (item.concept,), item.prompt
            assert parsed.scene == item.scene, item.prompt
            assert parsed.colour == item.colour, item.prompt
            assert parsed.figure == item.figure, item.prompt


def test_held_out_names_parse_to_their_concept():
    for item in sample_prompts("unsafe", "test", 56, seed=2, names="held-out"):
        assert parse_prompt(item.prompt).concepts == (item.concept,)


def test_parsing_names_the_words_it_cannot_place():
    with pytest.raises(ValueError, match=r"\['spaceship', 'mars'\]"):
        parse_prompt("a spaceship on mars holding a knife")


@pytest.mark.parametrize(
    "arguments",
    [{"kind": "harmful"}, {"split": "validation"}, {"names": "synonyms"}],
)
def test_bad_sampler_arguments_are_rejected_with_the_accepted_values(arguments):
    call = {"kind": "unsafe", "split": "train", "n": 3, **arguments}
    with pytest.raises(ValueError, match="use one of"):
        sample_prompts(**call)


def test_an_unknown_category_is_rejected():
    with pytest.raises(KeyError, match="known categories"):
        sample_prompts("unsafe", "train", 3, categories=["weapons"])
