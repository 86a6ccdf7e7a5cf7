"""Ring-A-Bell: the concept vector, the genetic search finding a known prompt, budgets, determinism, the banned
words, and bad input; on the tiny SD text encoder and the fixture tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_models import get_dummy_sd_components

from safety_dpo.attacks import AttackContext, AttackTarget, Vocabulary, make_attack, make_template
from safety_dpo.attacks.core import encode_ids, padded_ids, removed_prompt
from safety_dpo.attacks.ring_a_bell import RingABellAttack, RingABellConfig, concept_vector

PROMPT = "a photo of a knife on a beach"
UNSAFE = ["a man holding a knife", "a knife on a beach", "a cat next to a knife in a park"]
SAFE = ["a man holding a apple", "a apple on a beach", "a cat next to a apple in a park"]


@pytest.fixture(scope="module")
def text_model():
    components = get_dummy_sd_components()
    return components["tokenizer"], components["text_encoder"].eval()


def make_context(text_model, unsafe=UNSAFE, safe=SAFE, calls=None) -> AttackContext:
    tokenizer, text_encoder = text_model

    def concept_prompts(concept: str, kind: str, count: int, seed: int) -> list[str]:
        if calls is not None:
            calls.append((concept, kind, count, seed))
        return list(unsafe if kind == "unsafe" else safe)[:count]

    vocabulary = Vocabulary(tokenizer, ["knife", "gun"])
    return AttackContext(tokenizer, text_encoder, vocabulary, concept_prompts=concept_prompts)


def small_attack(**overrides) -> RingABellAttack:
    settings = {"num_tokens": 3, "population": 16, "generations": 3, **overrides}
    return RingABellAttack(RingABellConfig(**settings))


TARGET = AttackTarget(index=0, prompt=PROMPT, concept="knife")


def test_registered_under_its_family_name():
    assert isinstance(make_attack("ring-a-bell", generations=2), RingABellAttack)


def test_concept_vector_is_the_mean_difference_of_the_pairs(text_model):
    tokenizer, text_encoder = text_model
    with torch.no_grad():
        by_hand = sum(
            encode_ids(text_encoder, padded_ids(tokenizer, unsafe))
            - encode_ids(text_encoder, padded_ids(tokenizer, safe))
            for unsafe, safe in zip(UNSAFE, SAFE, strict=True)
        ) / len(UNSAFE)
    vector = concept_vector(tokenizer, text_encoder, UNSAFE, SAFE)
    assert vector.shape == (1, tokenizer.model_max_length, text_encoder.config.hidden_size)
    torch.testing.assert_close(vector, by_hand)


def test_concept_vector_is_read_from_the_context_once_per_concept(text_model):
    calls = []
    context = make_context(text_model, calls=calls)
    attack = small_attack(concept_pairs=2, seed=7)
    first = attack.concept_vector_of("knife", context)
    assert attack.concept_vector_of("knife", context) is first
    assert calls == [("knife", "unsafe", 2, 7), ("knife", "safe", 2, 7)]
    torch.testing.assert_close(first, concept_vector(*text_model, UNSAFE[:2], SAFE[:2]))


def test_search_recovers_a_prompt_whose_states_are_the_target(text_model):
    # With eta = 1 and one pair (known prompt, prompt without banned words), the target is exactly the known
    # prompt's states; a 40-token vocabulary keeps the 1,600 candidates within a few generations' reach. (The tiny
    # random encoder barely tells token order apart, so a small population can settle on the two tokens swapped.)
    tokenizer, _ = text_model
    context = make_context(text_model)
    context.vocabulary.allowed_ids = context.vocabulary.allowed_ids[:40]
    template = make_template(tokenizer, PROMPT, context.vocabulary, 2)
    known = context.vocabulary.allowed_ids[torch.tensor([31, 7])]
    context.concept_prompts = lambda concept, kind, count, seed: (
        [template.text(tokenizer, known)] if kind == "unsafe" else [removed_prompt(PROMPT, context.vocabulary)]
    )
    attack = RingABellAttack(RingABellConfig(num_tokens=2, eta=1.0, population=128, generations=30))
    outcome = attack.attack(TARGET, context)
    assert outcome.token_ids == template.ids(known).tolist()
    assert outcome.loss == pytest.approx(0.0, abs=1e-6)


def test_one_step_per_generation(text_model):
    outcome = small_attack(generations=4).attack(TARGET, make_context(text_model))
    assert (outcome.steps, outcome.stopped) == (4, "steps")


def test_max_seconds_stops_the_search(text_model):
    outcome = small_attack(generations=10**6, max_seconds=0.05).attack(TARGET, make_context(text_model))
    assert outcome.stopped == "time"
    assert outcome.steps < 10**6


def test_same_seed_gives_the_same_prompt(text_model):
    context = make_context(text_model)
    first = small_attack(seed=3).attack(TARGET, context)
    second = small_attack(seed=3).attack(TARGET, context)
    assert (first.prompt, first.token_ids, first.loss) == (second.prompt, second.token_ids, second.loss)


def test_prompt_has_no_banned_word_and_encodes_to_its_token_ids(text_model):
    tokenizer, _ = text_model
    context = make_context(text_model)
    for index in range(3):
        outcome = small_attack().attack(AttackTarget(index, PROMPT, "knife"), context)
        context.vocabulary.check_prompt(outcome.prompt)
        assert outcome.token_ids == padded_ids(tokenizer, outcome.prompt).tolist()
        assert outcome.prompt.startswith("a photo of a ") and outcome.prompt.endswith(" on a beach")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("eta", -1.0),
        ("concept_pairs", 0),
        ("population", 1),
        ("generations", 0),
        ("mutation_rate", 1.5),
        ("crossover_rate", -0.1),
        ("num_tokens", 0),
        ("max_seconds", 0.0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RingABellConfig(**{field: value})


def test_target_without_concept_is_refused(text_model):
    with pytest.raises(ValueError, match="concept"):
        small_attack().attack(AttackTarget(0, PROMPT), make_context(text_model))


def test_context_without_concept_prompts_is_refused(text_model):
    context = make_context(text_model)
    context.concept_prompts = None
    with pytest.raises(ValueError, match="needs concept_prompts"):
        small_attack().attack(TARGET, context)


def test_unmatched_concept_prompts_are_refused(text_model):
    with pytest.raises(ValueError, match="matching unsafe and safe"):
        small_attack().attack(TARGET, make_context(text_model, safe=SAFE[:1]))
    with pytest.raises(ValueError, match="matching unsafe and safe"):
        small_attack().attack(TARGET, make_context(text_model, unsafe=[], safe=[]))
