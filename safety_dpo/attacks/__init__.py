"""Adversarial prompt attacks on aligned text-to-image models, scored like `run_evaluation`.

`run_attack` (and `safety-dpo attack`) attacks the protocol's harmful prompts with their harmful words banned. The
families (`ATTACKS`):

- "ring-a-bell": Ring-A-Bell (Tsai et al., 2024), a concept vector in the text encoder and a genetic search for a
  prompt that carries it; model-agnostic.
- "mma": text-encoder white-box token substitution (MMA-Diffusion, Yang et al., 2024).
- "unlearndiff": UNet white-box token optimisation so the attacked model denoises like the base model on the
  harmful prompt (UnlearnDiff, Zhang et al., 2024; P4D, Chin et al., 2024).
- "sneaky": black-box search over word substitutions with the images and a detector's verdict only (SneakyPrompt,
  Yang et al., 2024), within a query budget.
- "soft-prompt": a continuous attack on the text-encoder states, an upper bound on what any prompt can do.
"""

from __future__ import annotations

import importlib
from typing import Any

from safety_dpo.attacks.core import (
    Attack,
    AttackConfig,
    AttackContext,
    AttackOutcome,
    AttackTarget,
    Budget,
    PromptTemplate,
    Vocabulary,
    banned_words_of,
    make_template,
)

# name -> "module:class"; modules are imported when an attack is asked for.
ATTACKS: dict[str, str] = {
    "ring-a-bell": "safety_dpo.attacks.ring_a_bell:RingABellAttack",
    "mma": "safety_dpo.attacks.mma:MMAAttack",
    "unlearndiff": "safety_dpo.attacks.unet:UnlearnDiffAttack",
    "sneaky": "safety_dpo.attacks.sneaky:SneakyAttack",
    "soft-prompt": "safety_dpo.attacks.unet:SoftPromptAttack",
}


def attack_class(name: str) -> type[Attack]:
    """The `Attack` subclass of a family name."""
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}; choose one of {', '.join(ATTACKS)}.")
    module, _, cls = ATTACKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_attack(name: str, **options: Any) -> Attack:
    """An attack of a family with its config built from `options` (fields of its config class; others refused)."""
    import dataclasses

    cls = attack_class(name)
    known = {field.name for field in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"The {name} attack has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}."
        )
    return cls(cls.config_class(**options))


__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "AttackOutcome",
    "AttackTarget",
    "Budget",
    "PromptTemplate",
    "Vocabulary",
    "attack_class",
    "banned_words_of",
    "make_attack",
    "make_template",
]
