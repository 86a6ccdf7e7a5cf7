"""A text-encoder white-box attack in the manner of MMA-Diffusion (Yang et al., CVPR 2024), text modality.

MMA-Diffusion reads only the text encoder: it searches for adversarial tokens whose text embedding matches the
harmful prompt's, with the harmful words banned from the vocabulary, by greedy coordinate gradient (GCG) token
substitution: the gradient of the loss with respect to each free token's one-hot vector ranks, per position, the
`top_k` tokens most likely to lower it; a batch of prompts with one random swap among those candidates each is
encoded, and the best swap is kept. Because the UNet never enters, one search serves every model that shares the
text encoder (every safety adapter and baseline here, which change only the UNet).

Differences from the paper, all for the microworld's size and the budget: the loss is one minus the cosine of the
full last hidden states (what SD's UNet reads) rather than of the pooled embedding; the banned words' places keep
the rest of the prompt (MMA writes a whole 20-token prompt); and the defaults are 60 steps of 128 candidates (the
paper's 1,000 steps of 512 for SD1.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safety_dpo.attacks.core import (
    Attack,
    AttackConfig,
    AttackContext,
    AttackOutcome,
    AttackTarget,
    Budget,
    PromptTemplate,
    encode_ids,
    encode_text,
    free_token_gradient,
    make_template,
    sample_substitutions,
    sequence_cosine,
)


@dataclass
class MMAConfig(AttackConfig):
    """MMA-style attack settings.

    Args:
        steps: Token-substitution steps per prompt.
        top_k: Candidate tokens per free position, ranked by the gradient.
        batch_size: Candidate prompts (one swap each) encoded per step.
    """

    steps: int = 60
    top_k: int = 32
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


def token_gradients(
    context: AttackContext, template: PromptTemplate, free_ids: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """d loss / d one-hot of each free token, (num_free, vocab), with loss = 1 - cosine to `target`."""
    return free_token_gradient(
        context.text_encoder, template, free_ids, lambda states: 1 - sequence_cosine(states, target)
    )[1]


class MMAAttack(Attack):
    """Greedy coordinate gradient token substitution matching the harmful prompt's text embedding."""

    name = "mma"
    config_class = MMAConfig

    def attack(self, target: AttackTarget, context: AttackContext) -> AttackOutcome:
        self.check_context(context)
        config: MMAConfig = self.config
        generator = self.generator(target)
        template = make_template(context.tokenizer, target.prompt, context.vocabulary, config.num_tokens)
        allowed = context.vocabulary.allowed_ids
        free_ids = allowed[torch.randint(len(allowed), (config.num_tokens,), generator=generator)]
        budget = Budget(max_steps=config.steps, max_seconds=config.max_seconds)
        with torch.no_grad():
            harmful = encode_text(context.tokenizer, context.text_encoder, target.prompt)
            best_loss = float(1 - sequence_cosine(encode_ids(context.text_encoder, template.ids(free_ids)), harmful))
        while not budget.exhausted():
            gradient = token_gradients(context, template, free_ids, harmful)
            candidates = sample_substitutions(
                context.vocabulary, free_ids, gradient, config.top_k, config.batch_size, generator
            )
            with torch.no_grad():
                losses = 1 - sequence_cosine(encode_ids(context.text_encoder, template.ids(candidates)), harmful)
            budget.steps += 1
            best = int(losses.argmin())
            if float(losses[best]) < best_loss:
                best_loss, free_ids = float(losses[best]), candidates[best]
        return AttackOutcome(
            prompt=template.text(context.tokenizer, free_ids),
            token_ids=template.ids(free_ids).tolist(),
            loss=best_loss,
            steps=budget.steps,
            stopped=budget.stop_reason() or "steps",
        )
