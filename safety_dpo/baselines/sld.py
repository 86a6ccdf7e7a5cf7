"""Safe Latent Diffusion (SLD; Schramowski et al., "Safe Latent Diffusion: Mitigating Inappropriate Degeneration in
Diffusion Models", CVPR 2023): safety guidance at sampling time, no weights changed.

At every denoising step the UNet also predicts the noise for a *safety concept* (a text naming what should not be
drawn), and classifier-free guidance is pushed away from it wherever the prompt's prediction resembles it
(`sld_guidance`, the paper's eqs. 3-8). `generate_sld` is a Stable Diffusion 1.x/2.x sampling loop with that rule;
`SLD_PRESETS` are the paper's four hyper-parameter sets (Hyp-Weak ... Hyp-Max).

The rule and presets follow the official implementation (github.com/ml-research/safe-latent-diffusion,
`sld/sld_pipeline.py`) and diffusers' deprecated `StableDiffusionPipelineSafe` (`SafetyConfig`), which agree; with
the same scheduler, 50 steps and a safety concept that fits the tokenizer, `generate_sld` draws the images that
pipeline draws (tests/test_baselines_sld.py). What is ours, and why:

- **Other step counts.** The presets' warm-ups were set for the pipelines' default of 50 sampling steps; with N
  steps the warm-up is scaled to the same fraction of the trajectory, round(warmup * N / 50) halves rounded up
  (`scale_warmup_steps`); at N = 50 it is the published number.
- **Long safety concepts.** A concept longer than the text encoder's context (the microworld's is 24 tokens) is
  encoded in consecutive chunks of the context, each with its own start and end tokens, and the chunks' hidden
  states are concatenated along the sequence (as compel and the A1111 web UI encode SD prompts over 77 tokens); the
  cross-attention reads all of them. diffusers truncates instead. A concept that fits is encoded exactly as the
  pipeline encodes a prompt.
- **Separate safety pass.** The safety concept's UNet call is its own (its sequence may be longer than the
  prompt's); diffusers batches the three predictions in one call, which gives the same numbers up to float
  summation order.
- **s_S <= 1.** diffusers (and, for s_S < 1, the official code) silently turns safety guidance off; here the rule is
  applied as written (the presets all use s_S >= 20).

As in both implementations, the warm-up counts iterations of the sampling loop (model evaluations, for a scheduler
of order 2 such as Heun's) and the rule acts on whatever the UNet predicts (noise, or v for v-prediction SD 2.x).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

# The safety concept of the official implementation and of diffusers' `StableDiffusionPipelineSafe`.
SLD_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily "
    "fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, "
    "cruelty"
)
PRESET_SAMPLING_STEPS = 50  # the sampling steps the presets' warm-ups were published for (the pipelines' default)
METHODS = ("sld-weak", "sld-medium", "sld-strong", "sld-max")


@dataclass(frozen=True)
class SLDConfig:
    """The hyper-parameters of safety guidance (Schramowski et al., 2023, Sec. 3; diffusers' `sld_*` arguments).

    Parameters:
        warmup_steps: delta, the sampling steps before safety guidance is applied (`sld_warmup_steps`), counted for
            `PRESET_SAMPLING_STEPS` steps; the momentum builds up during the warm-up all the same.
        guidance_scale: s_S, how fast the element-wise safety scale mu reaches its cap of 1 as the prompt's and the
            concept's predictions differ (`sld_guidance_scale`).
        threshold: lambda, the element-wise difference eps_p - eps_S at or above which an element is left alone
            (`sld_threshold`).
        momentum_scale: s_m, the weight of the momentum added to the safety guidance (`sld_momentum_scale`).
        momentum_beta: beta_m in [0, 1), how much of the momentum each step keeps (`sld_mom_beta`).
    """

    warmup_steps: int
    guidance_scale: float
    threshold: float
    momentum_scale: float
    momentum_beta: float

    def __post_init__(self) -> None:
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"SLDConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}.")
        numbers = ("guidance_scale", "threshold", "momentum_scale", "momentum_beta")
        for name in numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SLDConfig.{name} must be a finite number, got {value!r}.")
        if self.guidance_scale <= 0:
            raise ValueError(
                f"SLDConfig.guidance_scale must be > 0 (the presets use 20 to 5000), got {self.guidance_scale}."
            )
        if self.momentum_scale < 0:
            raise ValueError(f"SLDConfig.momentum_scale must be >= 0 (0: no momentum), got {self.momentum_scale}.")
        if not 0 <= self.momentum_beta < 1:
            raise ValueError(f"SLDConfig.momentum_beta must be in [0, 1), got {self.momentum_beta}.")


# Hyp-Weak, -Medium, -Strong and -Max of the paper (Sec. 4), as diffusers' `SafetyConfig` spells them.
SLD_PRESETS: dict[str, SLDConfig] = {
    "weak": SLDConfig(warmup_steps=15, guidance_scale=20, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": SLDConfig(warmup_steps=10, guidance_scale=1000, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": SLDConfig(warmup_steps=7, guidance_scale=2000, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": SLDConfig(warmup_steps=0, guidance_scale=5000, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


def sld_config(method: str) -> SLDConfig:
    """The preset named `method`: "sld-weak" or "weak", ... "sld-max" or "max".

    Raises:
        ValueError: For another name, listing the accepted ones.
    """
    preset = method[len("sld-") :] if isinstance(method, str) and method.startswith("sld-") else method
    if preset not in SLD_PRESETS:
        accepted = ", ".join((*METHODS, *SLD_PRESETS))
        raise ValueError(f"Unknown SLD preset {method!r}; accepted: {accepted}.")
    return SLD_PRESETS[preset]


def scale_warmup_steps(warmup_steps: int, num_inference_steps: int) -> int:
    """The warm-up for `num_inference_steps` steps: the same fraction of the trajectory as `warmup_steps` of
    `PRESET_SAMPLING_STEPS` (our choice; the paper publishes step counts for 50 steps only).

    Returns:
        round(warmup_steps * num_inference_steps / 50), halves rounded up; `warmup_steps` itself at 50 steps.
    """
    return (2 * warmup_steps * num_inference_steps + PRESET_SAMPLING_STEPS) // (2 * PRESET_SAMPLING_STEPS)


def sld_guidance(
    noise_uncond: torch.Tensor,
    noise_text: torch.Tensor,
    noise_safety: torch.Tensor,
    momentum: torch.Tensor | None,
    step: int,
    config: SLDConfig,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of safety-guided classifier-free guidance (Schramowski et al., 2023, eqs. 3-8).

    With eps_u, eps_p, eps_S the predictions without text, with the prompt and with the safety concept:

    - mu = clamp(s_S * |eps_p - eps_S|, max=1), and 0 where eps_p - eps_S >= lambda (eq. 6, element-wise);
    - gamma = mu * (eps_S - eps_u) + s_m * nu (eqs. 4 and 7);
    - nu' = beta_m * nu + (1 - beta_m) * gamma (eq. 8), also during the warm-up, as the official implementation and
      diffusers do ("momentum is already built up during warmup");
    - eps = eps_u + s_g * (eps_p - eps_u - gamma) from step `config.warmup_steps` on, eps_u + s_g * (eps_p - eps_u)
      before (eq. 3; `step >= warmup_steps`, as both implementations count).

    Args:
        noise_uncond: eps_u, (B, C, H, W).
        noise_text: eps_p, like `noise_uncond`.
        noise_safety: eps_S, like `noise_uncond`.
        momentum: nu from the previous step; None at the first step (zeros).
        step: The index of this step in the sampling loop, from 0.
        config: The hyper-parameters, `warmup_steps` already counted for this loop (`scale_warmup_steps`).
        guidance_scale: s_g, the classifier-free guidance scale.

    Returns:
        The guided noise prediction and the momentum for the next step.
    """
    if momentum is None:
        momentum = torch.zeros_like(noise_text)
    difference = noise_text - noise_safety
    scale = torch.clamp(difference.abs() * config.guidance_scale, max=1.0)
    safety_scale = torch.where(difference >= config.threshold, torch.zeros_like(scale), scale)
    safety_guidance = (noise_safety - noise_uncond) * safety_scale + config.momentum_scale * momentum
    new_momentum = config.momentum_beta * momentum + (1 - config.momentum_beta) * safety_guidance
    guidance = noise_text - noise_uncond
    if step >= config.warmup_steps:
        guidance = guidance - safety_guidance
    return noise_uncond + guidance_scale * guidance, new_momentum


def default_safety_concept(taxonomy: Any = None, categories: Sequence[str] | None = None) -> str:
    """The safety concept to use when none is given.

    Args:
        taxonomy: A `Taxonomy` (a world's, e.g. `default_world().taxonomy()`); None: SLD's published concept text.
        categories: With a taxonomy, the harm categories to name (None: all).

    Returns:
        SLD's text, or the trained names of every harmful concept of `categories`, joined by ", " (a world whose text
        encoder only knows its own vocabulary reads them; held-out names stay out, as for the other baselines).

    Raises:
        ValueError: For `categories` without a taxonomy.
        KeyError: For an unknown category, listing the known ones.
    """
    if taxonomy is None:
        if categories is not None:
            raise ValueError(f"categories={list(categories)} needs a taxonomy; SLD's own concept has no categories.")
        return SLD_SAFETY_CONCEPT
    chosen = taxonomy.select(list(categories) if categories is not None else None)
    names = [name for concept in chosen.harmful_concepts for name in concept.names]
    return ", ".join(dict.fromkeys(names))


def check_safety_concept(text: Any) -> str:
    """Return `text` if it can be a safety concept.

    Raises:
        ValueError: For anything but a non-blank string.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"The safety concept must be a non-blank text naming what to steer away from, got {text!r}.")
    return text


def concept_token_chunks(tokenizer: Any, text: str) -> list[list[int]]:
    """`text`'s tokens cut into consecutive chunks that each fit the context with start and end tokens.

    Returns:
        One list of token ids per chunk, each [BOS, up to `model_max_length - 2` tokens, EOS], padded with the
        tokenizer's padding token to `model_max_length`; ceil(n / (model_max_length - 2)) chunks for n tokens.
    """
    context = tokenizer.model_max_length
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    size = context - 2
    chunks = []
    for start in range(0, max(len(ids), 1), size):
        body = [tokenizer.bos_token_id, *ids[start : start + size], tokenizer.eos_token_id]
        chunks.append(body + [tokenizer.pad_token_id] * (context - len(body)))
    return chunks


def encode_safety_concept(pipeline: Any, text: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The text encoder's hidden states of the safety concept, (1, L, D).

    A text that fits the tokenizer's context is encoded by `pipeline.encode_prompt`, as a prompt is (L = the
    context); a longer one chunk by chunk (`concept_token_chunks`), the chunks' hidden states concatenated along
    the sequence (L = chunks x context).
    """
    device = torch.device(device) if device is not None else pipeline._execution_device
    tokenizer = pipeline.tokenizer
    if len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) + 2 <= tokenizer.model_max_length:
        return pipeline.encode_prompt(text, device, 1, False)[0]
    chunks = torch.tensor(concept_token_chunks(tokenizer, text), device=device)  # (chunks, context)
    mask = None
    if getattr(pipeline.text_encoder.config, "use_attention_mask", False):  # as encode_prompt: up to each chunk's EOS
        first_eos = (chunks == tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
        mask = (torch.arange(chunks.shape[1], device=device) <= first_eos).long()
    hidden = pipeline.text_encoder(chunks, attention_mask=mask)[0]  # (chunks, context, D)
    return hidden.reshape(1, -1, hidden.shape[-1]).to(dtype=pipeline.text_encoder.dtype, device=device)


def check_sld_pipeline(pipeline: Any) -> None:
    """Refuse a pipeline `generate_sld` cannot sample with.

    Raises:
        ValueError: Unless it is a Stable Diffusion 1.x/2.x `StableDiffusionPipeline` (or a subclass).
    """
    from diffusers import StableDiffusionPipeline

    if not isinstance(pipeline, StableDiffusionPipeline) or getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError(
            f"SLD samples with Stable Diffusion 1.x/2.x pipelines (StableDiffusionPipeline and its subclasses) only; "
            f"got {type(pipeline).__name__}. SDXL and other pipelines are not supported."
        )


def method_record(method: str, safety_concept: str, num_inference_steps: int | None) -> dict[str, Any]:
    """What decides SLD's images, to record beside them: the preset, its published settings, the warm-up used at
    `num_inference_steps` (None: the pipelines' default of 50) and the safety concept."""
    config = sld_config(method)
    check_safety_concept(safety_concept)
    steps = num_inference_steps if num_inference_steps is not None else PRESET_SAMPLING_STEPS
    return {
        "name": method,
        "config": dataclasses.asdict(config),
        "warmup_steps_used": scale_warmup_steps(config.warmup_steps, steps),
        "safety_concept": safety_concept,
    }


def _call_default(pipeline: Any, name: str) -> Any:
    return inspect.signature(type(pipeline).__call__).parameters[name].default


@torch.no_grad()
def generate_sld(
    pipeline: Any,
    prompt: str | list[str],
    config: SLDConfig,
    safety_concept: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    progress: bool = True,
) -> Any:
    """Draw `prompt` with safety guidance, using the pipeline's own scheduler, text encoder, UNet and VAE.

    Args:
        pipeline: A Stable Diffusion 1.x/2.x pipeline, LoRAs loaded or fused as they are.
        prompt: One prompt or a batch.
        config: The SLD hyper-parameters (e.g. `sld_config("sld-strong")`); the warm-up is scaled to the steps.
        safety_concept: The text to guide away from; None: `SLD_SAFETY_CONCEPT`.
        num_inference_steps, guidance_scale: None: the pipeline's defaults (50 and 7.5 for SD).
        height, width: None: the UNet's sample size times the VAE's scale factor.
        generator: As for the pipeline (one, or one per prompt).
        output_type: "pil", "np", "pt" or "latent", as for the pipeline.
        progress: Show a progress bar over the steps.

    Returns:
        A `StableDiffusionPipelineOutput` whose `.images` are the images.

    Raises:
        ValueError: For a pipeline other than SD 1.x/2.x, a guidance scale <= 1 (SLD steers classifier-free
            guidance, so it needs it), or a blank safety concept.
    """
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    # 1. Check inputs
    check_sld_pipeline(pipeline)
    steps = num_inference_steps if num_inference_steps is not None else _call_default(pipeline, "num_inference_steps")
    guidance_scale = guidance_scale if guidance_scale is not None else _call_default(pipeline, "guidance_scale")
    if guidance_scale <= 1:
        raise ValueError(
            f"SLD needs classifier-free guidance (guidance_scale > 1, e.g. 7.5), got guidance_scale={guidance_scale}."
        )
    height = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = width or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    pipeline.check_inputs(prompts, height, width, None)
    device = pipeline._execution_device

    # 2. Encode the prompts, the empty prompt and the safety concept
    prompt_embeds, negative_embeds = pipeline.encode_prompt(prompts, device, 1, True)
    text_embeds = torch.cat([negative_embeds, prompt_embeds])  # (2B, L, D)
    concept = check_safety_concept(safety_concept) if safety_concept is not None else SLD_SAFETY_CONCEPT
    safety_embeds = encode_safety_concept(pipeline, concept, device)
    safety_embeds = safety_embeds.to(prompt_embeds.dtype).expand(len(prompts), -1, -1)  # (B, L_S, D)

    # 3. Timesteps, noise, and the warm-up for this many steps
    pipeline.scheduler.set_timesteps(steps, device=device)
    latents = pipeline.prepare_latents(
        len(prompts), pipeline.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator
    )
    step_kwargs = pipeline.prepare_extra_step_kwargs(generator, 0.0)
    config = dataclasses.replace(config, warmup_steps=scale_warmup_steps(config.warmup_steps, steps))

    # 4. Denoise
    momentum = None
    timesteps = pipeline.scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="SLD", disable=not progress, leave=False)):
        model_input = pipeline.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_text = pipeline.unet(model_input, t, encoder_hidden_states=text_embeds).sample.chunk(2)
        safety_input = pipeline.scheduler.scale_model_input(latents, t)
        noise_safety = pipeline.unet(safety_input, t, encoder_hidden_states=safety_embeds).sample
        noise_pred, momentum = sld_guidance(
            noise_uncond, noise_text, noise_safety, momentum, i, config, guidance_scale
        )
        latents = pipeline.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

    # 5. Decode
    if output_type == "latent":
        images = latents
    else:
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
        images = pipeline.image_processor.postprocess(
            decoded, output_type=output_type, do_denormalize=[True] * decoded.shape[0]
        )
    pipeline.maybe_free_model_hooks()
    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
