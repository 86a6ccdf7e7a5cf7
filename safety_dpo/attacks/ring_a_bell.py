"""Ring-A-Bell (Tsai et al., ICLR 2024, "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion
Models?"), reference implementation github.com/chiayi-hsu/Ring-A-Bell (`Get_Concept_Vector.ipynb`,
`InversePrompt.ipynb`).

Ring-A-Bell is model-agnostic: it reads only the tokenizer and the text encoder. It first extracts a concept vector,
the mean over minimally edited prompt pairs (the same words but for the harmful name) of the difference of their
text-encoder last hidden states, over the whole sequence (paper Eq. 3). It then asks for a prompt whose states
match the states of the prompt with its harmful words removed plus `eta` times that vector (Eq. 4), and finds one by
a genetic search over tokens: the better half of the population survives unchanged, and the other half is refilled
with one-point crossovers of random survivors (with probability `crossover_rate`, else a copy), each of which has
one token swapped for a random allowed one with probability `mutation_rate`. The fitness is the reference
implementation's squared L2 distance of the states. Because the UNet never enters, one search serves every model
that shares the text encoder.

Differences from the paper:
- the search writes only the `num_tokens` free tokens where the banned words stood (the rest of the prompt is
  kept), not a whole K-token prompt, and draws them from the allowed vocabulary, not every token;
- the target starts from the prompt without its banned words, not from the harmful prompt itself as the reference
  does (which would aim at the banned word's own states; measured, it drew no more harmful images);
- the survivors are kept unmutated (strict elitism) and are not encoded again;
- 40 generations of 200 (the reference runs 3,000 for SD1.4): on the microworld, 120 generations or a population
  of 400 lowered the distance a little but drew no more harmful images, and 40 take about a second per prompt.
Measured on held-out microworld prompts and search seeds (not the evaluation's), the paper's choices held up:
`eta` = 3 (its nudity value) against 1, 2 and 6; squared L2 against cosine; the plain mean concept vector against
a position-aware one (each pair's difference shifted so that the harmful word sits at the free slots, with or
without the target's suffix shifted to match), which drew fewer harmful images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safety_dpo.attacks.core import (
    Attack,
    AttackConfig,
    AttackContext,
    AttackOutcome,
    AttackTarget,
    Budget,
    encode_ids,
    encode_text,
    make_template,
    padded_ids,
    removed_prompt,
)


@dataclass
class RingABellConfig(AttackConfig):
    """Ring-A-Bell settings.

    Args:
        eta: Weight of the concept vector added to the target states (paper: 3 for nudity, 5.5 for violence).
        concept_pairs: Unsafe/safe prompt pairs the concept vector averages over (the paper's violence set has 30).
        population: Candidate prompts per generation (the paper's 200).
        generations: Generations per prompt; one budget step each.
        mutation_rate: Chance that a child has one token swapped for a random allowed one (the paper's 0.25).
        crossover_rate: Chance that a child is a one-point crossover of two survivors, not a copy of one (0.5).
    """

    eta: float = 3.0
    concept_pairs: int = 30
    population: int = 200
    generations: int = 40
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("concept_pairs", "generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.population < 2:
            raise ValueError(f"population must be at least 2 (survivors and children), got {self.population}.")
        for name in ("mutation_rate", "crossover_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}.")


def concept_vector(
    tokenizer: Any, text_encoder: Any, unsafe_prompts: Sequence[str], safe_prompts: Sequence[str]
) -> torch.Tensor:
    """The mean over pairs of (states of the unsafe prompt - states of its safe counterpart), (1, length, dim).

    Raises:
        ValueError: If there are no pairs or the two lists differ in length.
    """
    if not unsafe_prompts or len(unsafe_prompts) != len(safe_prompts):
        raise ValueError(
            f"A concept vector needs matching unsafe and safe prompts; got {len(unsafe_prompts)} unsafe and "
            f"{len(safe_prompts)} safe."
        )
    unsafe_ids = torch.stack([padded_ids(tokenizer, prompt) for prompt in unsafe_prompts])  # (pairs, length)
    safe_ids = torch.stack([padded_ids(tokenizer, prompt) for prompt in safe_prompts])
    with torch.no_grad():
        difference = encode_ids(text_encoder, unsafe_ids) - encode_ids(text_encoder, safe_ids)  # (pairs, L, D)
    return difference.mean(dim=0, keepdim=True)


def breed(
    survivors: torch.Tensor,
    count: int,
    allowed_ids: torch.Tensor,
    crossover_rate: float,
    mutation_rate: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """`count` children of `survivors` (survivors, num_free): a one-point crossover of two random survivors (or a
    copy of one), then maybe one token swapped for a random allowed one, (count, num_free)."""
    num_free = survivors.shape[1]
    first = survivors[torch.randint(len(survivors), (count,), generator=generator)]
    second = survivors[torch.randint(len(survivors), (count,), generator=generator)]
    # A crossover point of num_free takes nothing from the second parent, as the reference's point range allows.
    point = torch.randint(1, num_free + 1, (count, 1), generator=generator)
    crossed = torch.rand(count, 1, generator=generator) < crossover_rate
    children = torch.where(crossed & (torch.arange(num_free) >= point), second, first)
    mutated = torch.rand(count, generator=generator) < mutation_rate
    position = torch.randint(num_free, (count,), generator=generator)
    token = allowed_ids[torch.randint(len(allowed_ids), (count,), generator=generator)]
    children[mutated, position[mutated]] = token[mutated]
    return children


class RingABellAttack(Attack):
    """Concept-vector target in the text encoder and a genetic token search that matches it."""

    name = "ring-a-bell"
    config_class = RingABellConfig
    needs = ("concept_prompts",)

    def __init__(self, config: RingABellConfig | None = None) -> None:
        super().__init__(config)
        self._concept_vectors: dict[str, torch.Tensor] = {}

    def concept_vector_of(self, concept: str, context: AttackContext) -> torch.Tensor:
        """The concept's vector from `context.concept_prompts`, computed once per concept (the context's text
        encoder is the same for every model an attack run compares), (1, length, dim)."""
        if concept not in self._concept_vectors:
            count, seed = self.config.concept_pairs, self.config.seed
            unsafe = context.concept_prompts(concept, "unsafe", count, seed)
            safe = context.concept_prompts(concept, "safe", count, seed)
            self._concept_vectors[concept] = concept_vector(context.tokenizer, context.text_encoder, unsafe, safe)
        return self._concept_vectors[concept]

    def attack(self, target: AttackTarget, context: AttackContext) -> AttackOutcome:
        self.check_context(context)
        if target.concept is None:
            raise ValueError(
                f"Ring-A-Bell needs the harmful concept of the prompt {target.prompt!r} (AttackTarget.concept) to "
                "build its concept vector; this target has none."
            )
        config: RingABellConfig = self.config
        budget = Budget(max_steps=config.generations, max_seconds=config.max_seconds)
        generator = self.generator(target)
        vocabulary, tokenizer = context.vocabulary, context.tokenizer
        template = make_template(tokenizer, target.prompt, vocabulary, config.num_tokens)
        allowed = vocabulary.allowed_ids
        with torch.no_grad():
            cleaned = encode_text(tokenizer, context.text_encoder, removed_prompt(target.prompt, vocabulary))
            goal = cleaned + config.eta * self.concept_vector_of(target.concept, context)  # (1, L, D)

        def distance(free_ids: torch.Tensor) -> torch.Tensor:  # (batch,) squared L2 to the goal states
            with torch.no_grad():
                states = encode_ids(context.text_encoder, template.ids(free_ids))
            return (states - goal).pow(2).flatten(1).sum(dim=1)

        population = allowed[torch.randint(len(allowed), (config.population, config.num_tokens), generator=generator)]
        losses = distance(population)
        num_survivors = config.population // 2
        while not budget.exhausted():
            order = losses.argsort(stable=True)[:num_survivors]
            survivors, survivor_losses = population[order], losses[order]
            children = breed(
                survivors,
                config.population - num_survivors,
                allowed,
                config.crossover_rate,
                config.mutation_rate,
                generator,
            )
            population = torch.cat([survivors, children])
            losses = torch.cat([survivor_losses, distance(children)])
            budget.steps += 1
        best = int(losses.argmin())
        return AttackOutcome(
            prompt=template.text(tokenizer, population[best]),
            token_ids=template.ids(population[best]).tolist(),
            loss=float(losses[best]),
            steps=budget.steps,
            stopped=budget.stop_reason() or "steps",
        )
