"""Train the microworld's tiny Stable Diffusion checkpoint from scratch on rendered scenes.

    python examples/microworld/train_microworld.py --output-dir safety_dpo/microworld/assets/checkpoint

Stages, each resumable (run the same command again after a crash and it goes on where it stopped):

1. tokenizer: a CLIP tokenizer whose vocabulary is every word of the prompt grammar;
2. data: prompts of the train split (trained and held-out names, harmful and neutral concepts) and their renders;
3. vae: an `AutoencoderKL` (32 x 32 pixels <-> 8 x 8 x 4 latents), checkpointed every `--checkpoint-every` steps;
4. latents: the VAE posterior of every render, computed once, and the latent scaling factor;
5. unet: the `UNet2DConditionModel` and the `CLIPTextModel` trained together (epsilon prediction, min-SNR
   weighting, classifier-free-guidance dropout, EMA of the weights), checkpointed likewise;
6. export: the EMA weights as a stock `StableDiffusionPipeline` folder (safetensors) with its `protocol.json`.

Everything is seeded; data order, noise and timesteps of a step are functions of the seed and the step, so a
resumed run continues exactly as an uninterrupted one would. Losses go to `<work-dir>/*_log.jsonl` and to
TensorBoard when it is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from safety_dpo.microworld.checkpoint import (
    LATENT_CHANNELS,
    MAX_PROMPT_TOKENS,
    TEXT_HIDDEN_SIZE,
    VAE_BLOCK_CHANNELS,
    microworld_vocabulary,
)
from safety_dpo.microworld.grammar import sample_prompts
from safety_dpo.microworld.protocol import Protocol
from safety_dpo.microworld.renderer import render
from safety_dpo.microworld.tokenizer import build_clip_tokenizer
from safety_dpo.microworld.training import load_optimizer, save_optimizer, write_json, write_tensors

logger = logging.getLogger("train_microworld")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="safety_dpo/microworld/assets/checkpoint")
    parser.add_argument("--work-dir", default="runs/microworld", help="Data, checkpoints, logs and samples.")
    parser.add_argument("--num-images", type=int, default=100_000, help="Rendered training scenes.")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch-size", type=int, default=64)
    parser.add_argument("--vae-learning-rate", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=4500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=7e-4)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR weighting (Hang et al. 2023).")
    parser.add_argument("--uncond-probability", type=float, default=0.1, help="Empty-prompt dropout for CFG.")
    parser.add_argument("--ema-power", type=float, default=0.75, help="EMA warm-up power (diffusers' EMAModel).")
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 96, 112])
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Logger:
    """Append metrics to a JSONL file, and to TensorBoard when installed."""

    def __init__(self, work_dir: Path, name: str) -> None:
        self.path = work_dir / f"{name}_log.jsonl"
        self.name = name
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tensorboard"))
        except ImportError:
            self.writer = None

    def log(self, step: int, **metrics: float) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"{self.name}/{key}", value, step)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero; a pure function of the step, so resuming is exact."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------------------------------- 1. tokenizer
def stage_tokenizer(work_dir: Path) -> CLIPTokenizer:
    directory = work_dir / "tokenizer"
    if not (directory / "vocab.json").is_file():
        build_clip_tokenizer(microworld_vocabulary(), directory, model_max_length=MAX_PROMPT_TOKENS)
    return CLIPTokenizer.from_pretrained(directory)


# -------------------------------------------------------------------------------------------------------- 2. data
def stage_data(work_dir: Path, tokenizer: CLIPTokenizer, num_images: int, seed: int) -> dict[str, torch.Tensor]:
    path = work_dir / "data.safetensors"
    if path.is_file():
        return load_file(str(path))
    rng = random.Random(seed)
    # Harmful and neutral prompts in proportion to their concepts (56 : 24), so every concept is seen equally;
    # half of the harmful prompts use held-out names, which the base model must know too.
    per_kind = {
        ("unsafe", "trained"): num_images * 28 // 80,
        ("unsafe", "held-out"): num_images * 28 // 80,
    }
    per_kind[("neutral", "trained")] = num_images - sum(per_kind.values())
    prompts = []
    for (kind, names), count in per_kind.items():
        prompts += [item.prompt for item in sample_prompts(kind, "train", count, seed=seed, names=names)]
    rng.shuffle(prompts)
    seeds = [rng.getrandbits(31) for _ in prompts]
    pixels = np.stack(
        [
            np.asarray(render(prompt, image_seed))
            for prompt, image_seed in tqdm(list(zip(prompts, seeds, strict=True)), desc="rendering")
        ]
    )
    input_ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    data = {"pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), "input_ids": input_ids}
    write_tensors(path, data)
    write_json(work_dir / "prompts.json", {"prompts": prompts, "seeds": seeds})
    return data


# --------------------------------------------------------------------------------------------------------- 3. vae
def build_vae() -> AutoencoderKL:
    n = len(VAE_BLOCK_CHANNELS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=VAE_BLOCK_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=32,
    )


def stage_vae(args: argparse.Namespace, work_dir: Path, pixels: torch.Tensor) -> AutoencoderKL:
    final = work_dir / "vae"
    if (final / "config.json").is_file():
        return AutoencoderKL.from_pretrained(final)
    checkpoint = work_dir / "vae_checkpoint"
    torch.manual_seed(args.seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    start = 0
    if (checkpoint / "progress.json").is_file():
        vae = AutoencoderKL.from_pretrained(checkpoint / "model")
        optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
        load_optimizer(checkpoint / "optimizer.safetensors", optimizer)
        start = json.loads((checkpoint / "progress.json").read_text())["step"]
        logger.info("VAE: resuming at step %d.", start)
    log = Logger(work_dir, "vae")
    vae.train()
    for step in tqdm(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc="vae"):
        generator = torch.Generator().manual_seed(args.seed * 100_003 + step)
        index = torch.randint(0, len(pixels), (args.vae_batch_size,), generator=generator)
        images = pixels[index].float() / 127.5 - 1.0  # (B, 3, 32, 32)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, images)
        # A tiny KL weight, as in SD's VAE: latents stay near unit scale without blurring the reconstruction.
        loss = mse + 1e-6 * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_learning_rate, 50)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0:
            log.log(step, mse=mse.item())
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps:
            vae.save_pretrained(checkpoint / "model")
            save_optimizer(checkpoint / "optimizer.safetensors", optimizer)
            write_json(checkpoint / "progress.json", {"step": step + 1})
    vae.eval()
    vae.save_pretrained(final)
    return vae


# ----------------------------------------------------------------------------------------------------- 4. latents
@torch.no_grad()
def stage_latents(work_dir: Path, vae: AutoencoderKL, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    path = work_dir / "latents.safetensors"
    if path.is_file():
        return load_file(str(path))
    vae.eval()
    means, stds = [], []
    for start in tqdm(range(0, len(pixels), 512), desc="encoding"):
        posterior = vae.encode(pixels[start : start + 512].float() / 127.5 - 1.0).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)  # (N, 4, 8, 8) each
    # SD scales latents to unit variance; the factor is stored in the VAE config like SD's 0.18215.
    scaling_factor = 1.0 / (mean.square().mean() + std.square().mean()).sqrt()
    latents = {"mean": mean, "std": std, "scaling_factor": scaling_factor.reshape(1)}
    write_tensors(path, latents)
    return latents


# -------------------------------------------------------------------------------------------------------- 5. unet
def build_unet(channels: list[int]) -> UNet2DConditionModel:
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, layers: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_scheduler() -> DDIMScheduler:
    # Stable Diffusion's noise schedule; no clipping: latents are scaled to unit variance, not to [-1, 1].
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def stage_unet(args, work_dir: Path, tokenizer: CLIPTokenizer, data: dict, latents: dict):
    checkpoint = work_dir / "unet_checkpoint"
    torch.manual_seed(args.seed)
    unet = build_unet(args.unet_channels)
    text_encoder = build_text_encoder(tokenizer, args.text_layers)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=1e-2)
    ema = EMAModel(parameters, decay=0.9999, use_ema_warmup=True, power=args.ema_power)
    start = 0
    if (checkpoint / "progress.json").is_file():
        unet.load_state_dict(load_file(str(checkpoint / "unet.safetensors")))
        text_encoder.load_state_dict(load_file(str(checkpoint / "text_encoder.safetensors")))
        load_optimizer(checkpoint / "optimizer.safetensors", optimizer)
        progress = json.loads((checkpoint / "progress.json").read_text())
        shadow = load_file(str(checkpoint / "ema.safetensors"))
        ema.load_state_dict({**progress["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        start = progress["step"]
        logger.info("UNet: resuming at step %d.", start)
    if start >= args.unet_steps:
        return unet, text_encoder, ema
    scheduler = build_scheduler()
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_PROMPT_TOKENS, return_tensors="pt").input_ids
    scaling_factor = latents["scaling_factor"].item()
    log = Logger(work_dir, "unet")
    unet.train()
    text_encoder.train()
    progress_bar = tqdm(range(start, args.unet_steps), initial=start, total=args.unet_steps, desc="unet")
    for step in progress_bar:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        index = torch.randint(0, len(latents["mean"]), (args.batch_size,), generator=generator)
        mean, std = latents["mean"][index], latents["std"][index]
        clean = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor  # (B, 4, 8, 8)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        input_ids = data["input_ids"][index].clone()
        drop = torch.rand(args.batch_size, generator=generator) < args.uncond_probability
        input_ids[drop] = empty_ids
        hidden = text_encoder(input_ids)[0]  # (B, T, D)
        prediction = unet(noisy, timesteps, hidden).sample
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=args.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weight).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.learning_rate, args.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.step(parameters)
        if step % 25 == 0:
            log.log(step, loss=loss.item(), mse=per_sample.mean().item(), lr=optimizer.param_groups[0]["lr"])
            progress_bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.unet_steps:
            checkpoint.mkdir(parents=True, exist_ok=True)
            write_tensors(checkpoint / "unet.safetensors", unet.state_dict())
            write_tensors(checkpoint / "text_encoder.safetensors", text_encoder.state_dict())
            write_tensors(checkpoint / "ema.safetensors", {str(i): p for i, p in enumerate(ema.shadow_params)})
            save_optimizer(checkpoint / "optimizer.safetensors", optimizer)
            ema_state = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
            write_json(checkpoint / "progress.json", {"step": step + 1, "ema": ema_state})
    return unet, text_encoder, ema


# ------------------------------------------------------------------------------------------------------ 6. export
def stage_export(args, output_dir: Path, tokenizer, vae, unet, text_encoder, ema, latents, protocol: Protocol):
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    ema.copy_to(parameters)
    vae.register_to_config(scaling_factor=latents["scaling_factor"].item())
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; the slow CLIPTokenizer of older versions reads these two.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(args.work_dir) / "tokenizer" / name, output_dir / "tokenizer" / name)
    protocol.save(output_dir)
    return pipe


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work_dir, output_dir = Path(args.work_dir), Path(args.output_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(work_dir / "args.json", vars(args))
    timings = {}
    started = time.time()
    tokenizer = stage_tokenizer(work_dir)
    data = stage_data(work_dir, tokenizer, args.num_images, args.seed)
    timings["data"] = time.time() - started
    vae = stage_vae(args, work_dir, data["pixels"])
    timings["vae"] = time.time() - started - sum(timings.values())
    latents = stage_latents(work_dir, vae, data["pixels"])
    timings["latents"] = time.time() - started - sum(timings.values())
    unet, text_encoder, ema = stage_unet(args, work_dir, tokenizer, data, latents)
    timings["unet"] = time.time() - started - sum(timings.values())
    stage_export(args, output_dir, tokenizer, vae, unet, text_encoder, ema, latents, Protocol())
    timings["export"] = time.time() - started - sum(timings.values())
    logger.info(
        "Saved the pipeline to %s. Seconds per stage (this run): %s",
        output_dir,
        json.dumps({k: round(v) for k, v in timings.items()}),
    )
    write_json(work_dir / "timings.json", timings)


if __name__ == "__main__":
    main()
