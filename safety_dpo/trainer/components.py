"""The parts of a Stable Diffusion (1.x/2.x) or SDXL pipeline that training needs, and how they encode inputs.

`load_components` takes a pipeline, a path or Hub id, or None (the default world, the microworld); `encode_prompts` and
`encode_images` turn prompts and pixels into what the UNet is conditioned on and denoises; `DPOUNet` is the module
the `transformers.Trainer` holds: the UNet with its LoRA, whose adapters can be switched off for the reference pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from safety_dpo.data.generation import config_digest
from safety_dpo.worlds import default_world

Architecture = Literal["sd", "sdxl"]


@dataclass
class DiffusionComponents:
    """What training uses of a pipeline. `architecture` is "sd" (SD 1.x/2.x) or "sdxl"."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    architecture: Architecture
    base_model: str
    native_resolution: int

    @property
    def unet_fingerprint(self) -> str | None:
        return config_digest(self.unet)


def load_components(model: Any = None, **pipeline_kwargs: Any) -> DiffusionComponents:
    """Take the training components out of a pipeline, a local folder or Hub id of one, or the microworld (None).

    Raises:
        ValueError: If the pipeline is neither Stable Diffusion 1.x/2.x nor SDXL (no UNet, VAE and CLIP text encoder).
    """
    from diffusers import DDPMScheduler, DiffusionPipeline

    if model is None:
        world = default_world()
        pipeline, base_model = world.load_pipeline(**pipeline_kwargs), world.name
    elif isinstance(model, (str, os.PathLike)):
        pipeline, base_model = DiffusionPipeline.from_pretrained(str(model), **pipeline_kwargs), str(model)
    else:
        pipeline = model
        base_model = str(getattr(pipeline, "name_or_path", None) or type(pipeline).__name__)
    needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [name for name in needed if getattr(pipeline, name, None) is None]
    if missing:
        raise ValueError(
            f"model must be a Stable Diffusion 1.x/2.x or SDXL pipeline (or its path or Hub id); "
            f"{type(pipeline).__name__} has no {', '.join(missing)}."
        )
    is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    text_encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if is_sdxl else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if is_sdxl else [])
    vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return DiffusionComponents(
        unet=pipeline.unet,
        vae=pipeline.vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        architecture="sdxl" if is_sdxl else "sd",
        base_model=base_model,
        native_resolution=int(pipeline.unet.config.sample_size) * vae_scale_factor,
    )


@torch.no_grad()
def encode_prompts(components: DiffusionComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning of `prompts`: `prompt_embeds` (N, L, D), and for SDXL `pooled_prompt_embeds` (N, D2).

    SD: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states, concatenated, and the
    second encoder's projected pooled output (as `StableDiffusionXLPipeline.encode_prompt` does).
    """
    device = components.unet.device
    if components.architecture == "sd":
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        return {"prompt_embeds": encoder(torch.tensor(ids.input_ids, device=device))[0]}
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        output = encoder(torch.tensor(ids.input_ids, device=device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        pooled = output[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
    return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}


@torch.no_grad()
def encode_images(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of images in [-1, 1]: its mean and standard deviation, scaled to the UNet's latent space.

    Args:
        vae: An `AutoencoderKL`.
        pixels: (N, 3, H, W).

    Returns:
        (mean, std), each (N, C, H / f, W / f); a latent sample is `mean + std * noise`.
    """
    distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (distribution.mean - shift) * scale, distribution.std * scale


def sdxl_time_ids(resolution: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped square image: (original size, crop top-left, target size), (B, 6)."""
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32, device=device)
    return time_ids.repeat(batch_size, 1)


class DPOUNet(nn.Module):
    """The module the Trainer optimises: the UNet with a LoRA; only the LoRA's parameters require gradients.

    `forward` returns the UNet's prediction; `reference` runs the same UNet with its adapters disabled, which is the
    base model: no second copy of the UNet is ever made.
    """

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample

    @torch.no_grad()
    def reference(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.unet.disable_adapters()
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.unet.enable_adapters()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Called by the Trainer when `gradient_checkpointing=True`."""
        self.unet.enable_gradient_checkpointing()

    activation_checkpointing_enable = gradient_checkpointing_enable
