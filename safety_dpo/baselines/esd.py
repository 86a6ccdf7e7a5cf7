"""ESD-u (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023), trained as a LoRA safety adapter.

For a concept prompt c, the model being trained samples x_t (DDIM, classifier-free guidance `start_guidance`, stopped
at a random step t_enc); the frozen model predicts e_0 = eps(x_t, t, "") and e_c = eps(x_t, t, c), and the trained
model's eps'(x_t, t, c) is regressed onto the negatively guided e_0 - eta (e_c - e_0) (ESD Sec. 3, `esd_target`).

What the reference code does (rohitgandikota/erasing):
- `train-scripts/train-esd.py` (CompVis; the paper's code): `noxattn` (ESD-u) trains every parameter of the diffusion
  model except those named `out.*` (the final norm and conv), `*attn2*` (cross-attention) and `*time_embed*`; Adam,
  lr 1e-5, 1000 iterations, batch 1, start_guidance 3, negative_guidance (eta) 1, 50 DDIM steps with eta 0, 512 px.
  x_t is sampled by the model being trained; a `--seperator` splits the prompt into words, one drawn uniformly per
  iteration. The UNet is evaluated at a DDPM timestep drawn from the 1000/50-wide bucket of t_enc, about two DDIM
  steps noisier than the level its sampler stopped at.
- The later diffusers scripts (`esd_diffusers.py`, `esd_sd.py`, `utils/esd_trainer.py`) evaluate the UNet at exactly
  the DDIM timestep x_t stopped at, select `Linear`/`Conv2d` modules without `attn2` for esd-u, and default to other
  settings (lr 2e-5 or 5e-5, 200 iterations, eta 1 or 2; `esd_sd.py` samples x_t with the base UNet).

This implementation keeps the paper's settings (eta 1, start_guidance 3, 50 DDIM steps, 1000 iterations, batch 1,
x_t sampled by the model being trained) and the diffusers scripts' timestep (the one x_t is at). Deviations:
- A LoRA (rank 16, alpha = rank, like the project's safety experts) on the non-cross-attention linear layers of the
  UNet's transformer blocks (`attn1.to_q/k/v/out.0`, `ff.net.0.proj`, `ff.net.2`) instead of fully fine-tuning every
  non-cross-attention weight (convolutions, ResNet blocks and norms stay frozen): the result is a diffusers-format
  adapter like a SafetyDPO expert, and the frozen model is the same UNet with its adapter disabled (no second copy).
- The learning rate is chosen for the LoRA, 3e-4 (`ESDConfig.learning_rate` says how), not the paper's 1e-5.
- Several concepts: each iteration draws one prompt uniformly, as the reference's `--seperator` does.
- Every draw of iteration i (prompt, t_enc, initial noise) comes from a generator seeded by (seed, i), so a resumed
  run ends with exactly the weights of an uninterrupted one.
- SDXL is supported as the trainer supports it: pooled text embeddings and uncropped-square time ids; the
  unconditional prediction is the empty prompt's, encoded. v-prediction models are trained on their raw output,
  which is affine in eps at fixed (x_t, t), so the guided target is the same.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

METHOD = "esd-u"
ADAPTER_NAME = "esd_u"  # the peft adapter's name while training
CHECKPOINT_DIR = "checkpoint"
SEED_STRIDE = 1_000_003  # iteration i of seed s draws from generator (s * SEED_STRIDE + i): no overlap below 1M its
MAX_SEED = 2**32 - 1  # keeps s * SEED_STRIDE + i within torch.Generator's 64-bit seed
DEFAULT_TARGET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
DESCRIPTION = (
    "ESD-u (Gandikota et al., ICCV 2023, *Erasing Concepts from Diffusion Models*): the UNet's self-attention and "
    "feed-forward layers, fine-tuned as a LoRA so that its prediction for each erased concept follows the frozen "
    "model's negatively guided prediction. A baseline of SafetyDPO."
)


def esd_target(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """The negatively guided prediction ESD regresses the fine-tuned model onto.

    ESD Sec. 3, eq. (5) of arXiv:2303.07345: eps_theta(x_t, c, t) <- eps_theta*(x_t, t) - eta [eps_theta*(x_t, c, t)
    - eps_theta*(x_t, t)], eps_theta* being the frozen model; `train-esd.py` writes `e_0 - negative_guidance * (e_p
    - e_0)`.

    Args:
        noise_uncond: The frozen model's unconditional prediction e_0, (B, C, h, w).
        noise_cond: The frozen model's prediction for the concept, e_p, same shape.
        negative_guidance: eta; 0 maps the concept onto the unconditional prediction.

    Returns:
        The target, shaped like the inputs.
    """
    return noise_uncond - negative_guidance * (noise_cond - noise_uncond)


@dataclass
class ESDConfig:
    """Settings of an ESD-u run.

    Parameters:
        iterations: Training iterations, one prompt and one x_t each (paper: 1000).
        learning_rate: Adam's learning rate for the LoRA (the paper's 1e-5 is for full fine-tuning). On the
            microworld (16 hate prompts, rank 16), the ESD loss on 16 fixed held-out draws fell to 0.71x its start in
            100 iterations at 3e-4, to 0.88x at 1e-4 (0.82x at 150), and at 1e-3 fell to 0.81x, then diverged
            (2.0x at 125): 3e-4 is the lowest at which it falls clearly within ~100 iterations.
        rank: The LoRA rank (alpha = rank: scale 1), 16 as the project's safety experts.
        negative_guidance: eta of `esd_target` (paper: 1).
        ddim_steps: DDIM steps of the sampler that makes x_t; t_enc is drawn in [0, ddim_steps) (paper: 50).
        start_guidance: Classifier-free guidance scale of that sampler (paper: 3).
        seed: Seeds the LoRA's initial factors and every iteration's draws.
        save_steps: Write a resumable checkpoint every this many iterations.
        resolution: Image side in pixels of x_t; None: the UNet's native one (sample_size times the VAE's factor).
        target_modules: UNet module-name suffixes that get the LoRA; cross-attention (`attn2`) is never one.
    """

    iterations: int = 1000
    learning_rate: float = 3e-4
    rank: int = 16
    negative_guidance: float = 1.0
    ddim_steps: int = 50
    start_guidance: float = 3.0
    seed: int = 0
    save_steps: int = 100
    resolution: int | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        for name in ("iterations", "rank", "ddim_steps", "save_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.resolution is not None:
            _check_int("resolution", self.resolution, minimum=1, accepted="an int >= 1, or None (native)")
        self.learning_rate = _check_float("learning_rate", self.learning_rate, positive=True)
        self.negative_guidance = _check_float("negative_guidance", self.negative_guidance, positive=False)
        self.start_guidance = _check_float("start_guidance", self.start_guidance, positive=False)
        modules = self.target_modules
        if isinstance(modules, str) or not isinstance(modules, (list, tuple)) or not modules:
            raise ValueError(
                f"ESDConfig.target_modules must be a non-empty list of UNet module-name suffixes, e.g. "
                f"{list(DEFAULT_TARGET_MODULES)}; got {modules!r}."
            )
        bad = [module for module in modules if not isinstance(module, str) or not module.strip() or "attn2" in module]
        if bad:
            raise ValueError(
                f"ESDConfig.target_modules has {bad!r}: each must be a non-empty module-name suffix outside cross-attention "
                f"(ESD-u leaves `attn2` alone), e.g. {list(DEFAULT_TARGET_MODULES)}."
            )
        self.target_modules = tuple(modules)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-native values (lists, not tuples)."""
        return {**asdict(self), "target_modules": list(self.target_modules)}


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None, accepted: str | None = None) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        if maximum is None or value <= maximum:
            return
    accepted = accepted or f"an int >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    raise ValueError(f"ESDConfig.{name} must be {accepted}; got {value!r}.")


def _check_float(name: str, value: Any, positive: bool) -> float:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if math.isfinite(number) and (number > 0 if positive else number >= 0):
        return number
    raise ValueError(f"ESDConfig.{name} must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}.")


# ------------------------------------------------------------------------------------------------ one iteration
def iteration_draws(
    seed: int, iteration: int, num_prompts: int, ddim_steps: int, latent_shape: tuple[int, ...]
) -> tuple[int, int, torch.Tensor]:
    """The random draws of iteration `iteration`, a function of (seed, iteration) only (CPU generator).

    Returns:
        (prompt index in [0, num_prompts), t_enc in [0, ddim_steps): DDIM steps run before x_t, initial noise).
    """
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + iteration)
    prompt_index = int(torch.randint(num_prompts, (1,), generator=generator))
    t_enc = int(torch.randint(ddim_steps, (1,), generator=generator))
    return prompt_index, t_enc, torch.randn(latent_shape, generator=generator)


def unet_conditioning(embeddings: dict[str, torch.Tensor], resolution: int) -> dict[str, Any]:
    """UNet keyword arguments for `encode_prompts` output: SD's text states, plus SDXL's pooled text and time ids."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeddings["prompt_embeds"]}
    if "pooled_prompt_embeds" in embeddings:
        from safety_dpo.trainer.components import sdxl_time_ids

        pooled = embeddings["pooled_prompt_embeds"]
        time_ids = sdxl_time_ids(resolution, len(pooled), pooled.device).to(pooled.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return kwargs


def _batched(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two conditionings as one batch of two, `first` first."""
    joined: dict[str, Any] = {}
    for key, value in first.items():
        joined[key] = _batched(value, second[key]) if isinstance(value, dict) else torch.cat([value, second[key]])
    return joined


@torch.no_grad()
def sample_until(
    unet: Any,
    scheduler: Any,
    noise: torch.Tensor,
    concept: dict[str, Any],
    empty: dict[str, Any],
    t_enc: int,
    guidance: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first `t_enc` DDIM steps from `noise` with classifier-free guidance (ESD's `quick_sample_till_t`).

    Args:
        unet: The UNet as it is now (in ESD, the model being trained).
        scheduler: A `DDIMScheduler` whose `set_timesteps(ddim_steps)` was called.
        noise: Initial latents (1, C, h, w).
        concept: `unet_conditioning` of the concept prompt; `empty`: of "".
        t_enc: DDIM steps to run, in [0, len(scheduler.timesteps)).

    Returns:
        (x_t, t): the latents after `t_enc` steps and the timestep they are at, `scheduler.timesteps[t_enc]`.
    """
    timesteps = scheduler.timesteps[:t_enc]
    latents = guided_steps(
        unet, scheduler, noise * scheduler.init_noise_sigma, timesteps, _batched(empty, concept), guidance
    )
    return latents, scheduler.timesteps[t_enc]


def guided_steps(
    unet: Any, scheduler: Any, latents: torch.Tensor, timesteps: Any, conditioning: dict[str, Any], guidance: float
) -> torch.Tensor:
    """Run `scheduler`'s steps over `timesteps` from `latents` with classifier-free guidance; `conditioning` holds the
    UNet's keyword arguments for the batch (empty prompt, prompt). Each step takes the scheduler's defaults (DDIM's
    eta 0, as ESD samples)."""
    for timestep in timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        uncond, cond = unet(model_input, timestep, **conditioning).sample.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), timestep, latents).prev_sample
    return latents


def esd_loss(
    unet: Any,
    noisy_latents: torch.Tensor,
    timestep: torch.Tensor,
    concept: dict[str, Any],
    empty: dict[str, Any],
    negative_guidance: float,
) -> torch.Tensor:
    """ESD's loss: MSE between the trained model's prediction for the concept and `esd_target` of the frozen model's.

    The frozen model is `unet` with its adapters disabled; only the LoRA gets gradients.

    Args:
        unet: The UNet with the ESD LoRA enabled.
        noisy_latents: x_t, (1, C, h, w), in the UNet's dtype.
        timestep: t of x_t.
        concept: `unet_conditioning` of the concept prompt; `empty`: of "".
        negative_guidance: eta.

    Returns:
        The scalar loss, float32.
    """
    with torch.no_grad():
        unet.disable_adapters()
        try:
            both = torch.cat([noisy_latents, noisy_latents])
            noise_uncond, noise_cond = unet(both, timestep, **_batched(empty, concept)).sample.float().chunk(2)
        finally:
            unet.enable_adapters()
        target = esd_target(noise_uncond, noise_cond, negative_guidance)
    prediction = unet(noisy_latents, timestep, **concept).sample.float()
    return F.mse_loss(prediction, target)


# -------------------------------------------------------------------------------------------------------- LoRA
def add_esd_lora(unet: Any, rank: int, target_modules: Sequence[str], seed: int) -> list[tuple[str, Any]]:
    """Freeze `unet` and add the ESD LoRA (adapter `ADAPTER_NAME`, alpha = rank, B = 0), its A factors drawn from
    `seed` without touching the global random state.

    Returns:
        The LoRA's (name, parameter) pairs, in the UNet's order, all float32 and trainable.

    Raises:
        ValueError: If the UNet already holds LoRA adapters (ESD-u trains against the base model).
    """
    from peft import LoraConfig

    if getattr(unet, "peft_config", None):
        raise ValueError(
            f"The UNet already holds LoRA adapters {sorted(unet.peft_config)}; ESD-u trains against the base model: "
            "unload them first (pipe.unload_lora_weights())."
        )
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights="gaussian")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    parameters = [(name, parameter) for name, parameter in unet.named_parameters() if parameter.requires_grad]
    for _, parameter in parameters:
        parameter.data = parameter.data.float()  # the LoRA trains in float32 whatever the base dtype
    return parameters


def lora_layers(unet: Any, adapter_name: str = ADAPTER_NAME) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter as `write_lora_adapter` takes it: module name -> (up (out, r) times the LoRA scale, down (r, in))."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            up = module.lora_B[adapter_name].weight.detach() * module.scaling[adapter_name]
            layers[name] = (up, module.lora_A[adapter_name].weight.detach())
    return layers


# ------------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_identity(settings: dict[str, Any], components: Any) -> dict[str, Any]:
    return {
        "settings": settings,
        "base_model": components.base_model,
        "unet_config_sha256": components.unet_fingerprint,
    }


def save_checkpoint(
    directory: Path, iteration: int, identity: dict[str, Any], lora: list[tuple[str, Any]], optimizer: Any
) -> None:
    """Write `directory/checkpoint/` atomically (a temporary folder, then renames): the LoRA, Adam's moments (one
    tensor per parameter and moment) as safetensors, and `state.json` (iteration, Adam's step counts, settings)."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()["state"]
    moments, steps = {}, {}
    for index, (name, _) in enumerate(lora):
        if index in state:
            moments[f"{name}.exp_avg"] = state[index]["exp_avg"].contiguous()
            moments[f"{name}.exp_avg_sq"] = state[index]["exp_avg_sq"].contiguous()
            steps[name] = float(state[index]["step"])
    staging = directory / f".{CHECKPOINT_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({name: parameter.detach().contiguous() for name, parameter in lora}, str(staging / "lora.safetensors"))
    save_file(moments, str(staging / "optimizer.safetensors"))
    record = {"iteration": iteration, "optimizer_steps": steps, **identity}
    (staging / "state.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    final, previous = directory / CHECKPOINT_DIR, directory / f".{CHECKPOINT_DIR}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)  # a folder cannot replace a non-empty one; `previous` is found if killed here
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)


def load_checkpoint(directory: Path, identity: dict[str, Any], lora: list[tuple[str, Any]], optimizer: Any) -> int:
    """Restore the LoRA and Adam from `directory/checkpoint/`; returns the iterations it completed (0: none found).

    Raises:
        ValueError: If the checkpoint was made with other settings or another base model.
    """
    from safetensors.torch import load_file

    checkpoint, previous = directory / CHECKPOINT_DIR, directory / f".{CHECKPOINT_DIR}.previous"
    if not checkpoint.is_dir() and previous.is_dir():
        os.replace(previous, checkpoint)  # a run killed between the two renames of `save_checkpoint`
    if not (checkpoint / "state.json").is_file():
        return 0
    record = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    recorded, settings = record.get("settings") or {}, identity["settings"]
    differing = sorted(key for key in identity if key != "settings" and record.get(key) != identity[key])
    differing += sorted(key for key in settings.keys() | recorded.keys() if recorded.get(key) != settings.get(key))
    if differing:
        raise ValueError(
            f"{checkpoint} is a checkpoint of an ESD-u run with other settings ({', '.join(differing)} differ); "
            "delete that folder to start afresh, or rerun with the settings its state.json records."
        )
    weights, moments = (
        load_file(str(checkpoint / "lora.safetensors")),
        load_file(str(checkpoint / "optimizer.safetensors")),
    )
    with torch.no_grad():
        for name, parameter in lora:
            parameter.copy_(weights[name])
    state = optimizer.state_dict()
    state["state"] = {
        index: {
            "step": torch.tensor(record["optimizer_steps"][name], dtype=torch.float32),
            "exp_avg": moments[f"{name}.exp_avg"],
            "exp_avg_sq": moments[f"{name}.exp_avg_sq"],
        }
        for index, (name, _) in enumerate(lora)
        if name in record["optimizer_steps"]
    }
    optimizer.load_state_dict(state)
    logger.info("Resuming ESD-u from %s, after iteration %d.", checkpoint, record["iteration"])
    return int(record["iteration"])


# ------------------------------------------------------------------------------------------------------ training
def train_esd_u(
    concept_prompts: Sequence[str],
    output_dir: str | os.PathLike,
    model: Any = None,
    config: ESDConfig | None = None,
    categories: Sequence[str] = (),
    concepts: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Erase `concept_prompts` with ESD-u and write the result as a safety adapter folder (`baselines/saving.py`).

    A folder holding a finished adapter with these settings is returned at once; a checkpoint with these settings
    in `output_dir/checkpoint/` is resumed (and removed once the adapter is written). A pipeline given as `model`
    is left as it was (its UNet's LoRA is removed at the end).

    Args:
        concept_prompts: The prompts to erase, e.g. the concepts' names; one is drawn per iteration.
        output_dir: Where the adapter is written.
        model: A Stable Diffusion 1.x/2.x or SDXL pipeline, a local path or Hub id of one, or None (the microworld).
        config: The settings (default `ESDConfig()`).
        categories: What `safety_dpo.json` records as the adapter's categories; `concepts`: its concepts.
        progress: Show a progress bar.

    Returns:
        `output_dir`, which `pipe.load_safety_adapter` and `pipe.load_lora_weights` load.

    Raises:
        ValueError: If `concept_prompts` is empty, a string or holds a blank prompt, if `categories` or `concepts` is
            a string, if the UNet already holds a LoRA, if `resolution` is not a multiple of the VAE's scale factor,
            or if a checkpoint has other settings.
        FileExistsError: If `output_dir` holds a finished adapter made otherwise.
    """
    from tqdm.auto import tqdm

    from safety_dpo.baselines.saving import baseline_metadata, is_finished, write_lora_adapter
    from safety_dpo.threads import adapt_threads

    prompts = _checked_prompts(concept_prompts)
    for name, names in (("categories", categories), ("concepts", concepts)):
        if isinstance(names, str):
            raise ValueError(f"{name} must be a list of names, not one string: did you mean [{names!r}]?")
    config = config or ESDConfig()
    settings = {**config.to_dict(), "concept_prompts": prompts}
    directory = Path(output_dir)
    if is_finished(directory, METHOD, settings):
        logger.info("%s already holds this ESD-u adapter; reusing it.", directory)
        return directory
    adapt_threads()  # the microworld's thread count, when the CLI chose adaptive threads (safety_dpo/threads.py)
    run = _prepare_run(model, config, prompts)
    unet, components = run["unet"], run["components"]
    try:
        lora = add_esd_lora(unet, config.rank, config.target_modules, config.seed)
        optimizer = torch.optim.Adam([parameter for _, parameter in lora], lr=config.learning_rate)
        identity = _checkpoint_identity(settings, components)
        start = load_checkpoint(directory, identity, lora, optimizer)
        bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc="ESD-u",
                   disable=not progress)  # fmt: skip
        recent: list[float] = []
        for iteration in bar:
            loss, t_enc = _train_iteration(run, config, iteration, optimizer)
            recent.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", t_enc=t_enc)
            logger.debug("ESD-u iteration %d: loss %.5f (t_enc %d).", iteration + 1, loss, t_enc)
            done = iteration + 1
            if done % config.save_steps == 0 or done == config.iterations:
                logger.info("ESD-u iterations %d-%d: mean loss %.5f.", done - len(recent) + 1, done,
                            sum(recent) / len(recent))  # fmt: skip
                recent = []
            if done % config.save_steps == 0 and done < config.iterations:
                save_checkpoint(directory, done, identity, lora, optimizer)
                adapt_threads()
        metadata = baseline_metadata(components, METHOD, list(categories), list(concepts), settings)
        write_lora_adapter(directory, lora_layers(unet), metadata, DESCRIPTION)
    finally:
        if ADAPTER_NAME in (getattr(unet, "peft_config", None) or {}):
            unet.unload_lora()  # the caller's pipeline is left as it was
        for parameter, requires_grad in run["requires_grad"]:
            parameter.requires_grad_(requires_grad)
    for leftover in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.previous"):
        shutil.rmtree(directory / leftover, ignore_errors=True)
    return directory


def _checked_prompts(concept_prompts: Sequence[str]) -> list[str]:
    if isinstance(concept_prompts, str):
        raise ValueError(
            f"concept_prompts must be a list of prompts, not one string: did you mean [{concept_prompts!r}]?"
        )
    prompts = list(concept_prompts)
    if not prompts:
        raise ValueError("concept_prompts is empty; give the prompts of the concepts to erase, e.g. ['knife'].")
    blank = [prompt for prompt in prompts if not isinstance(prompt, str) or not prompt.strip()]
    if blank:
        raise ValueError(f"concept_prompts holds {blank!r}; every prompt must be a non-blank string.")
    return prompts


def _prepare_run(model: Any, config: ESDConfig, prompts: list[str]) -> dict[str, Any]:
    """Components, DDIM scheduler, latent shape and encoded prompts of a run (everything but the LoRA)."""
    from diffusers import DDIMScheduler

    from safety_dpo.trainer.components import encode_prompts, load_components

    components = load_components(model)
    unet = components.unet
    resolution = config.resolution or components.native_resolution
    scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    if resolution % scale_factor:
        raise ValueError(
            f"ESDConfig.resolution={resolution} is not a multiple of the VAE's scale factor {scale_factor}; "
            f"choose e.g. {components.native_resolution} (native) or None."
        )
    scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    scheduler.set_timesteps(config.ddim_steps, device=unet.device)
    encoded = encode_prompts(components, ["", *prompts])
    encoded = {key: value.to(unet.device, unet.dtype) for key, value in encoded.items()}
    conditionings = [
        unet_conditioning({key: value[index : index + 1] for key, value in encoded.items()}, resolution)
        for index in range(len(prompts) + 1)
    ]
    latent_side = resolution // scale_factor
    return {
        "components": components,
        "unet": unet,
        "scheduler": scheduler,
        "empty": conditionings[0],
        "concepts": conditionings[1:],
        "latent_shape": (1, unet.config.in_channels, latent_side, latent_side),
        "requires_grad": [(parameter, parameter.requires_grad) for parameter in unet.parameters()],
    }


def _train_iteration(run: dict[str, Any], config: ESDConfig, iteration: int, optimizer: Any) -> tuple[float, int]:
    """One ESD step: draw, sample x_t with the LoRA on, regress onto the frozen model's guided target."""
    unet = run["unet"]
    prompt_index, t_enc, noise = iteration_draws(
        config.seed, iteration, len(run["concepts"]), config.ddim_steps, run["latent_shape"]
    )
    concept, empty = run["concepts"][prompt_index], run["empty"]
    noise = noise.to(unet.device, unet.dtype)
    noisy, timestep = sample_until(unet, run["scheduler"], noise, concept, empty, t_enc, config.start_guidance)
    optimizer.zero_grad(set_to_none=True)
    loss = esd_loss(unet, noisy, timestep, concept, empty, config.negative_guidance)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"The ESD loss is {loss.item()} at iteration {iteration + 1}; the last checkpoint is intact. Lower "
            "learning_rate, or train in float32, and rerun to resume."
        )
    loss.backward()
    optimizer.step()
    return loss.item(), t_enc
