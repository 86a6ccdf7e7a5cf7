"""UNet white-box attacks: UnlearnDiff / Prompting4Debugging (discrete tokens) and a soft prompt (continuous states).

Both read the attacked UNet and the base model's (`AttackContext.reference_unet`) and change only the adversarial
input, never a weight. The target is the base model's own image of the harmful prompt, drawn once per prompt in
latent space with the base UNet, the pipeline's scheduler and the search seed `context.search_seeds[0]`, noised as
in training, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, at a few timesteps (one per stratum of [0, T)). The loss is the
mean squared error of the attacked UNet's prediction on the adversarial conditioning against either
"p4d": the base UNet's prediction on the harmful prompt at the same (x_t, t) (Chin et al., ICML 2024,
"Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic Prompts"), or
"unlearndiff": the true noise (or v), the attacked model's own diffusion loss on the target image (Zhang et al., ECCV
2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate Unsafe Images ...").

`UnlearnDiffAttack` searches the `num_tokens` free tokens that replace the banned words (`make_template`) by greedy
coordinate gradient: the gradient with respect to their one-hot vectors ranks candidate swaps, scored on the same
(t, noise). `SoftPromptAttack` optimises the text-encoder output states (1, L, D) with Adam from the encoding of the
prompt without its banned words: no text, an upper bound on what any prompt can do.

Differences from the papers: P4D optimises soft embeddings projected to their nearest tokens and UnlearnDiff relaxed
one-hot vectors with projection, where the discrete search here is GCG (as MMA's) over a vocabulary without the
banned words, with the free tokens in the banned words' place rather than prepended; the discrete search keeps one
(t, noise) batch throughout (its loss stays comparable and never rises; resampling measured no better) while the
soft prompt draws one per step; the defaults (the UnlearnDiff objective for the discrete attack, P4D's for the soft
prompt, each the stronger on the microworld) spend hundreds of UNet evaluations per prompt, the papers thousands.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

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
    free_token_gradient,
    make_template,
    padded_ids,
    removed_prompt,
    sample_substitutions,
)
from safety_dpo.baselines.esd import guided_steps

OBJECTIVES = ("p4d", "unlearndiff")
MAX_UNET_ROWS = 128  # UNet inputs per forward pass when scoring candidates: bounds memory on a full-size model


@dataclass
class DenoisingAttackConfig(AttackConfig):
    """Settings shared by the UNet attacks.

    Args:
        steps: Optimisation steps per prompt.
        timesteps: (timestep, noise) pairs the loss averages over at each step.
        resample: Draw new (timestep, noise) pairs at every step (True) or once per prompt (False).
        objective: "p4d": match the base UNet's prediction on the harmful prompt; "unlearndiff": the attacked UNet's
            own diffusion loss on the base model's image of the harmful prompt.
    """

    steps: int = 20
    timesteps: int = 4
    resample: bool = False
    objective: Literal["p4d", "unlearndiff"] = "p4d"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")


@dataclass
class UnlearnDiffConfig(DenoisingAttackConfig):
    """UnlearnDiff / P4D settings (GCG token substitution).

    Args:
        top_k: Candidate tokens per free position, ranked by the gradient.
        batch_size: Candidate prompts (one swap each) scored per step.
    """

    steps: int = 12  # each step scores batch_size x timesteps UNet inputs; ~2 s a prompt on one idle CPU core
    timesteps: int = 3
    objective: Literal["p4d", "unlearndiff"] = "unlearndiff"  # measured stronger than "p4d" here, see the docstring
    top_k: int = 32
    batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


@dataclass
class SoftPromptConfig(DenoisingAttackConfig):
    """Soft-prompt settings (Adam on the text-encoder states).

    Args:
        learning_rate: Adam's step size on the states (CLIP's last hidden states are layer-normed, O(1)).
    """

    steps: int = 40  # each step is one UNet forward and backward on `timesteps` inputs; ~2.5 s on an idle core
    timesteps: int = 2
    resample: bool = True
    learning_rate: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")


# ------------------------------------------------------------------------------------------------------ the maths


def denoising_loss(
    unet: Any, states: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of the UNet's prediction against `target`, per conditioning, averaged over the pairs.

    Args:
        unet: A `UNet2DConditionModel`.
        states: Text conditionings, (B, L, D).
        noisy: Noisy latents x_t, (T, C, H, W).
        timesteps: Their timesteps, (T,).
        target: What each prediction should be, (T, C, H, W).

    Returns:
        (B,): for each conditioning b, mean over t and elements of (unet(x_t, t, states[b]) - target_t) ** 2.
    """
    batch, pairs = states.shape[0], noisy.shape[0]
    prediction = unet(
        noisy.repeat(batch, 1, 1, 1), timesteps.repeat(batch), encoder_hidden_states=states.repeat_interleave(pairs, 0)
    ).sample  # (B * T, C, H, W), conditioning-major
    errors = (prediction.float() - target.float().repeat(batch, 1, 1, 1)).pow(2).flatten(1).mean(1)
    return errors.view(batch, pairs).mean(1)


@contextlib.contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; every flag restored after, so no weight can be trained."""
    flags = [(parameter, parameter.requires_grad) for module in modules for parameter in module.parameters()]
    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval().requires_grad_(False)
        yield
    finally:  # in reverse, so a module given twice ends as it was first seen
        for parameter, flag in reversed(flags):
            parameter.requires_grad_(flag)
        for sub, training in reversed(modes):
            sub.training = training


@torch.no_grad()
def draw_latents(
    unet: Any, scheduler: Any, conditioning: torch.Tensor, noise: torch.Tensor, steps: int, guidance_scale: float
) -> torch.Tensor:
    """The latents x_0 a UNet draws from initial `noise` (1, C, H, W) with classifier-free guidance, `conditioning`
    (2, L, D) holding the empty prompt's states then the prompt's; a fresh copy of `scheduler` runs the loop, so the
    pipeline's own is left as it was."""
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    return guided_steps(
        unet, scheduler, latents, scheduler.timesteps, {"encoder_hidden_states": conditioning}, guidance_scale
    )


class DenoisingObjective:
    """The attacks' loss on a batch of noisy copies of the target latents (`sample` draws the batch)."""

    def __init__(
        self, attacked: Any, base: Any, scheduler: Any, latents: torch.Tensor, harmful: torch.Tensor, kind: str
    ) -> None:
        self.attacked, self.base, self.latents, self.harmful, self.kind = attacked, base, latents, harmful, kind
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if kind == "unlearndiff" and self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"The unlearndiff objective does not know prediction_type={self.prediction_type!r}.")

    def sample(self, count: int, generator: torch.Generator) -> None:
        """Draw `count` timesteps (one per stratum of [0, T)) and noises; set x_t and the target of each."""
        total = len(self.alphas_cumprod)
        timesteps = ((torch.arange(count) + torch.rand(count, generator=generator)) * total / count).long()
        noise = torch.randn((count, *self.latents.shape[1:]), generator=generator)
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x0 = self.latents.float().cpu()
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise  # (T, C, H, W), DDPM's q(x_t | x_0)
        device, dtype = self.latents.device, self.latents.dtype
        self.noisy, self.timesteps = noisy.to(device, dtype), timesteps.to(device)
        if self.kind == "p4d":
            with torch.no_grad():
                states = self.harmful.expand(count, -1, -1)
                self.target = self.base(self.noisy, self.timesteps, encoder_hidden_states=states).sample
        else:
            velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
            truth = {"epsilon": noise, "v_prediction": velocity, "sample": x0.expand_as(noise)}
            self.target = truth[self.prediction_type].to(device, dtype)

    def loss(self, states: torch.Tensor) -> torch.Tensor:
        """(B,) loss of each conditioning of `states` (B, L, D) on the current batch."""
        return denoising_loss(self.attacked, states, self.noisy, self.timesteps, self.target)

    @torch.no_grad()
    def losses(self, states: torch.Tensor) -> torch.Tensor:
        """`loss` without gradients, in chunks of at most MAX_UNET_ROWS UNet inputs."""
        chunk = max(1, MAX_UNET_ROWS // len(self.timesteps))
        return torch.cat([self.loss(part) for part in states.split(chunk)])


# ---------------------------------------------------------------------------------------------------- the attacks


class _DenoisingAttack(Attack):
    needs = ("pipeline", "reference_unet")

    def check_context(self, context: AttackContext) -> None:
        super().check_context(context)
        if getattr(context.pipeline, "text_encoder_2", None) is not None:
            raise ValueError(f"The {self.name} attack supports Stable Diffusion 1.x/2.x pipelines, not SDXL.")

    def denoising_objective(self, target: AttackTarget, context: AttackContext) -> DenoisingObjective:
        """The loss for one prompt: the base model draws its image of the harmful prompt under the evaluation's
        sampler settings (`context.generation`), with the pipeline's scheduler."""
        pipeline = context.pipeline
        config: DenoisingAttackConfig = self.config
        unet, base = pipeline.unet, context.reference_unet()
        generation = context.generation
        resolution = generation.get("resolution")
        size = resolution // pipeline.vae_scale_factor if resolution else unet.config.sample_size
        seed = int(context.search_seeds[0])
        dtype = next(base.parameters()).dtype
        with torch.no_grad():
            ids = torch.stack([padded_ids(context.tokenizer, text) for text in ("", target.prompt)])
            conditioning = encode_ids(context.text_encoder, ids).to(base.device, dtype)  # (2, L, D): empty, harmful
        noise = torch.randn((1, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed))
        latents = draw_latents(
            base,
            pipeline.scheduler,
            conditioning,
            noise.to(base.device, dtype),
            generation.get("num_inference_steps") or 25,  # the evaluation's sampler settings, else diffusers'
            generation.get("guidance_scale", 7.5),
        )
        return DenoisingObjective(unet, base, pipeline.scheduler, latents, conditioning[1:], config.objective)

    def _modules(self, context: AttackContext) -> tuple[Any, ...]:
        return context.pipeline.unet, context.reference_unet(), context.text_encoder

    def _details(self, context: AttackContext, first_loss: float, losses: list[float]) -> dict[str, Any]:
        return {
            "initial_loss": first_loss,
            "losses": losses,  # per step: the best (discrete) or the batch's (soft)
            "objective": self.config.objective,
            "image_seed": context.search_seeds[0],
        }


class UnlearnDiffAttack(_DenoisingAttack):
    """GCG token substitution so that the attacked UNet denoises the base model's harmful image from the prompt."""

    name = "unlearndiff"
    config_class = UnlearnDiffConfig

    def attack(self, target: AttackTarget, context: AttackContext) -> AttackOutcome:
        self.check_context(context)
        config: UnlearnDiffConfig = self.config
        generator = self.generator(target)
        budget = Budget(max_steps=config.steps, max_seconds=config.max_seconds)  # the target image counts too
        template = make_template(context.tokenizer, target.prompt, context.vocabulary, config.num_tokens)
        allowed = context.vocabulary.allowed_ids
        free_ids = allowed[torch.randint(len(allowed), (config.num_tokens,), generator=generator)]
        history = []
        with frozen(*self._modules(context)):
            objective = self.denoising_objective(target, context)
            objective.sample(config.timesteps, generator)
            best_loss = first_loss = float(objective.losses(encode_ids(context.text_encoder, template.ids(free_ids))))
            while not budget.exhausted():
                if config.resample and budget.steps > 0:
                    objective.sample(config.timesteps, generator)
                loss, gradient = free_token_gradient(context.text_encoder, template, free_ids, objective.loss)
                if config.resample:  # the current prompt's loss on the new batch, which the candidates must beat
                    best_loss = loss
                candidates = sample_substitutions(
                    context.vocabulary, free_ids, gradient, config.top_k, config.batch_size, generator
                )
                losses = objective.losses(encode_ids(context.text_encoder, template.ids(candidates)))
                budget.steps += 1
                best = int(losses.argmin())
                if float(losses[best]) < best_loss:
                    best_loss, free_ids = float(losses[best]), candidates[best]
                history.append(best_loss)
        text = template.text(context.tokenizer, free_ids)
        context.vocabulary.check_prompt(text)
        return AttackOutcome(
            prompt=text,
            token_ids=template.ids(free_ids).tolist(),
            loss=best_loss,
            steps=budget.steps,
            stopped=budget.stop_reason() or "steps",
            details=self._details(context, first_loss, history),
        )


class SoftPromptAttack(_DenoisingAttack):
    """Adam on the text-encoder states themselves, from the encoding of the prompt without its banned words."""

    name = "soft-prompt"
    config_class = SoftPromptConfig
    gives_text = False

    def attack(self, target: AttackTarget, context: AttackContext) -> AttackOutcome:
        self.check_context(context)
        config: SoftPromptConfig = self.config
        generator = self.generator(target)
        budget = Budget(max_steps=config.steps, max_seconds=config.max_seconds)
        history = []
        with frozen(*self._modules(context)):
            objective = self.denoising_objective(target, context)
            objective.sample(config.timesteps, generator)
            with torch.no_grad():
                start = removed_prompt(target.prompt, context.vocabulary)
                initial = encode_text(context.tokenizer, context.text_encoder, start)  # (1, L, D)
            first_loss = float(objective.losses(initial))
            states = initial.detach().clone().float().requires_grad_(True)  # fp32 for Adam, whatever the model's
            optimizer = torch.optim.Adam([states], lr=config.learning_rate)
            while not budget.exhausted():
                if config.resample and budget.steps > 0:
                    objective.sample(config.timesteps, generator)
                loss = objective.loss(states.to(initial.dtype)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                budget.steps += 1
                history.append(float(loss.detach()))
            final = states.detach().to(initial.dtype)
            final_loss = float(objective.losses(final))
        return AttackOutcome(
            prompt_embeds=final,
            loss=final_loss,
            steps=budget.steps,
            stopped=budget.stop_reason() or "steps",
            details=self._details(context, first_loss, history),
        )
