"""`SafetyDPOTrainer`: trains a LoRA safety expert with the Diffusion-DPO loss, as a `transformers.Trainer`.

One step (compare diffusers' `examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`):
1. latents of the preferred (safe) and rejected (unsafe) image, from the cache or the VAE;
2. one noise sample and one timestep per pair, shared by both images;
3. the policy (UNet + LoRA) predicts on both images in one batch of 2B; so does the reference, which is the same
   UNet with its adapters disabled (no second UNet);
4. `safety_dpo.trainer.losses.diffusion_dpo_loss` on the per-image errors.

Every checkpoint and the finished expert record the settings that decided their weights (`training_settings.json`);
`train(resume_from_checkpoint=True)` sets aside checkpoints that a killed run left incomplete and refuses to resume
one trained with other settings.

Evaluation draws its noise, timesteps and latent samples per eval example, from `eval_seed` and the example's index,
and leaves the global random state as it found it. A push to the Hub holds `PUSHED_FILES` (and the TensorBoard runs
with `push_logs`), never a pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, set_seed

from safety_dpo.trainer import adapter_io
from safety_dpo.trainer.components import DPOUNet, encode_images, encode_prompts, load_components, sdxl_time_ids
from safety_dpo.trainer.config import SafetyDPOConfig, lora_fields_from_peft_config
from safety_dpo.trainer.data import (
    PairExamples,
    collate_examples,
    effective_prompt_condition,
    precompute,
    prepare_pairs,
    retain_prompts,
)
from safety_dpo.trainer.hub_push import ExpertPushMixin
from safety_dpo.trainer.losses import diffusion_dpo_loss, per_sample_mse, reward_accuracy, safety_dpo_loss
from safety_dpo.trainer.sampling import (
    IndexedExamples,
    example_generator,
    global_random_state_kept,
    randint,
    randn_like,
)

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger(__name__)

INCOMPLETE_DIR = "_incomplete"  # starts with "_": Trainer.push_to_hub leaves it out


class SafetyDPOTrainer(ExpertPushMixin, Trainer):
    """Train one safety expert: a LoRA on the UNet, preferring each pair's safe image over its unsafe one.

    Args:
        model: A Stable Diffusion 1.x/2.x or SDXL pipeline, a local path or Hub id of one, or None for the microworld.
        args: The `SafetyDPOConfig`.
        train_dataset: A CoProV2-style `datasets.Dataset` (see `safety_dpo.data.schema`).
        eval_dataset: Optional pairs to evaluate the same loss and rewards on.
        callbacks: `transformers` callbacks.
        pipeline_kwargs: Passed to `DiffusionPipeline.from_pretrained` when `model` is a path or Hub id.
        peft_config: A `peft.LoraConfig`, as trl's trainers take one. It wins over `args`: its `r`, `lora_alpha`,
            `target_modules` and `lora_dropout` replace `args.rank`, `alpha`, `target_modules` and `lora_dropout`
            (`target_modules=None` keeps `args.target_modules`), and they are what the expert records. Other LoRA
            options are refused (see `config.lora_fields_from_peft_config`).

    With `load_best_model_at_end`, training ends with the LoRA of the checkpoint with the best `metric_for_best_model`
    (default `eval_loss`), and `save_model` and `push_to_hub` save that one.

    Logged metrics, in trl's naming: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    `rewards/accuracies`, `mse/policy_chosen`, `mse/policy_rejected`, `mse/reference_chosen`,
    `mse/reference_rejected` (with an `eval_` prefix on the eval set).
    """

    def __init__(
        self,
        model: Any = None,
        args: SafetyDPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        callbacks: list | None = None,
        pipeline_kwargs: dict[str, Any] | None = None,
        peft_config: LoraConfig | None = None,
    ) -> None:
        if args is None:
            args = SafetyDPOConfig(output_dir="safety-expert")
        if not isinstance(args, SafetyDPOConfig):
            raise TypeError(f"args must be a SafetyDPOConfig, got {type(args).__name__}.")
        if peft_config is not None:  # a copy: the caller's config stays as it was
            args = dataclasses.replace(args, **lora_fields_from_peft_config(peft_config, args))
        if train_dataset is None:
            raise ValueError("train_dataset is required: a CoProV2-style dataset (see safety_dpo.data).")
        condition = effective_prompt_condition(train_dataset, args.prompt_condition)  # what the columns allow
        if condition != args.prompt_condition:  # a copy again, recording the condition really trained with
            args = dataclasses.replace(args, prompt_condition=condition)
        set_seed(args.seed)  # the LoRA's initial weights are drawn before Trainer.__init__ seeds anything
        self.components = load_components(model, **(pipeline_kwargs or {}))
        self.resolution = args.resolution or self.components.native_resolution
        train_pairs = prepare_pairs(train_dataset, args.categories, args.prompt_condition)
        eval_pairs = prepare_pairs(eval_dataset, args.categories, args.prompt_condition) if eval_dataset else None
        self.concepts = _concepts_by_category(train_pairs)
        self.dataset_fingerprint = getattr(train_dataset, "_fingerprint", None)
        self._freeze_and_add_lora(args)
        device = args.device
        for module in (self.components.vae, *self.components.text_encoders):
            module.to(device)
        self.components.unet.to(device)
        train_examples = self._examples(train_pairs, args, "train")
        eval_examples = IndexedExamples(self._examples(eval_pairs, args, "eval")) if eval_pairs is not None else None
        self.empty_prompt = {key: value[0] for key, value in encode_prompts(self.components, [""]).items()}
        self.preservation_conditioning = self._preservation_conditioning(args, train_dataset)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.best_model_loaded = False  # set by _load_best_model: the LoRA is that of state.best_global_step
        super().__init__(
            model=DPOUNet(self.components.unet),
            args=args,
            train_dataset=train_examples,
            eval_dataset=eval_examples,
            data_collator=collate_examples,
            callbacks=callbacks,
        )

    # ------------------------------------------------------------------------------------------------- setup
    def _freeze_and_add_lora(self, args: SafetyDPOConfig) -> None:
        from peft import LoraConfig

        for module in (self.components.unet, self.components.vae, *self.components.text_encoders):
            module.requires_grad_(False)
        self.lora_config = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.lora_dropout,
            target_modules=list(args.target_modules),
            init_lora_weights="gaussian",
        )
        self.components.unet.add_adapter(self.lora_config)
        for parameter in self.components.unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # LoRA weights train in float32 whatever the base dtype
        # Experts with the same initial factors can be merged factor by factor (CoMergeConfig lora_factor); this
        # digest is how a merge proves it. A resumed run draws the same initial factors, so it records the same one.
        self.lora_init_sha256 = lora_init_digest(self.components.unet)

    def _preservation_conditioning(self, args: SafetyDPOConfig, dataset) -> dict[str, torch.Tensor] | None:
        """The benign prompts of the preservation term, encoded once: key -> (P, ...) on the CPU."""
        if args.preservation_weight == 0:
            return None
        prompts = args.preservation_prompts or retain_prompts(dataset, args.categories)
        encoded: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for start in range(0, len(prompts), args.precompute_batch_size):
                batch = list(prompts[start : start + args.precompute_batch_size])
                for key, value in encode_prompts(self.components, batch).items():
                    encoded.setdefault(key, []).append(value.float().cpu())
        logger.info("Preservation term: %d benign prompts, weight %s.", len(prompts), args.preservation_weight)
        return {key: torch.cat(values) for key, values in encoded.items()}

    def _examples(self, pairs, args: SafetyDPOConfig, split: str) -> PairExamples:
        cache = None
        if args.precompute:
            cache = precompute(
                pairs,
                self.components,
                args.prompt_condition,
                self.resolution,
                args.precompute_batch_size,
                args.output_dir,
            )
        return PairExamples(pairs, args.prompt_condition, self.resolution, cache)

    # -------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        generators = None if model.training else self._eval_generators(inputs)
        chosen, rejected, conditioning = self._latents_and_conditioning(inputs, generators)
        batch = chosen.shape[0]
        scheduler = self.components.noise_scheduler
        noise = randn_like(chosen, generators)
        timesteps = randint(scheduler.config.num_train_timesteps, chosen, generators)
        latents = torch.cat([chosen, rejected])  # (2B, C, h, w): both images of a pair share noise and timestep
        noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unsupported prediction_type {scheduler.config.prediction_type!r}.")
        conditioning = {key: value.repeat(2, *([1] * (value.ndim - 1))) for key, value in conditioning.items()}
        benign = self._benign_conditioning(batch, chosen.device) if model.training else None
        if benign is not None:  # (3B, ...): the safe images' noisy latents once more, under benign prompts
            noisy, timesteps = torch.cat([noisy, noisy[:batch]]), torch.cat([timesteps, timesteps[:batch]])
            conditioning = {key: torch.cat([value, benign[key]]) for key, value in conditioning.items()}
        unet_inputs = {"encoder_hidden_states": conditioning["prompt_embeds"]}
        if "pooled_prompt_embeds" in conditioning:
            unet_inputs["added_cond_kwargs"] = {
                "text_embeds": conditioning["pooled_prompt_embeds"],
                "time_ids": sdxl_time_ids(self.resolution, len(noisy), chosen.device),
            }
        unwrapped = self.accelerator.unwrap_model(model)
        dtype = self.components.unet.dtype
        noisy, unet_inputs = noisy.to(dtype), _cast(unet_inputs, dtype)
        policy_prediction = model(noisy, timesteps, **unet_inputs)
        reference_prediction = unwrapped.reference(noisy, timesteps, **unet_inputs)
        policy_mse = per_sample_mse(policy_prediction[: 2 * batch], target)
        reference_mse = per_sample_mse(reference_prediction[: 2 * batch], target)
        output = diffusion_dpo_loss(
            *policy_mse.chunk(2), *reference_mse.chunk(2), beta=self.args.beta, loss_type=self.args.loss_type
        )
        preservation_mse = None
        if benign is not None:
            preservation_mse = per_sample_mse(policy_prediction[2 * batch :], reference_prediction[2 * batch :])
        loss, parts = safety_dpo_loss(
            output.losses,
            policy_mse[:batch],
            preservation_mse,
            rpo_alpha=self.args.rpo_alpha,
            preservation_weight=self.args.preservation_weight if benign is not None else 0.0,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The DPO loss is {loss.item()} at step {self.state.global_step}. Nothing of this step was saved; "
                f"the last checkpoint in {self.args.output_dir} is intact. Lower learning_rate or beta, or train in "
                "float32, and resume from that checkpoint."
            )
        self._record(mode, output, policy_mse, reference_mse, parts)
        return (loss, {"logits": output.logits}) if return_outputs else loss

    def _benign_conditioning(self, batch: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        """One benign prompt per pair, drawn from the preservation prompts (None without a preservation term)."""
        if self.preservation_conditioning is None:
            return None
        bank = self.preservation_conditioning
        chosen = torch.randint(0, len(bank["prompt_embeds"]), (batch,))
        return {key: value[chosen].to(device) for key, value in bank.items()}

    def _eval_generators(self, inputs: dict[str, Any]) -> list[torch.Generator] | None:
        """One generator per eval example, seeded by `eval_seed` and the example's index (None without an index: an
        eval set given to `evaluate` unindexed is indexed there, so only a direct `compute_loss` call lacks one)."""
        if "example_index" not in inputs:
            return None
        return [example_generator(self.args.eval_seed, int(index)) for index in inputs["example_index"].tolist()]

    def _latents_and_conditioning(self, inputs: dict[str, Any], generators: list[torch.Generator] | None = None):
        device = self.args.device
        if "chosen_mean" in inputs:  # precomputed
            chosen_mean, chosen_std = inputs["chosen_mean"], inputs["chosen_std"]
            rejected_mean, rejected_std = inputs["rejected_mean"], inputs["rejected_std"]
            conditioning = {key: inputs[key] for key in ("prompt_embeds", "pooled_prompt_embeds") if key in inputs}
        else:
            chosen_mean, chosen_std = encode_images(self.components.vae, inputs["pixels_chosen"])
            rejected_mean, rejected_std = encode_images(self.components.vae, inputs["pixels_rejected"])
            conditioning = encode_prompts(self.components, inputs["prompt"])
        # One sample of each VAE posterior; in evaluation from the example's own generator, chosen first
        chosen = chosen_mean + chosen_std * randn_like(chosen_std, generators)
        rejected = rejected_mean + rejected_std * randn_like(rejected_std, generators)
        conditioning = {key: value.to(device).float() for key, value in conditioning.items()}
        if self.args.empty_prompt_probability > 0 and self.model.training:
            dropped = torch.rand(chosen.shape[0], device=device) < self.args.empty_prompt_probability
            for key, value in conditioning.items():
                empty = self.empty_prompt[key].to(device, value.dtype).expand_as(value)
                mask = dropped.view(-1, *([1] * (value.ndim - 1)))
                conditioning[key] = torch.where(mask, empty, value)
        return chosen.to(device).float(), rejected.to(device).float(), conditioning

    def _record(self, mode: str, output, policy_mse: torch.Tensor, reference_mse: torch.Tensor, parts) -> None:
        gather = self.accelerator.gather_for_metrics
        chosen, rejected = gather(output.chosen_rewards), gather(output.rejected_rewards)
        metrics = self._metrics[mode]
        if len(parts) > 1:  # the loss has more than its DPO term: log each part (trl logs "nll_loss" for rpo_alpha)
            for name, value in parts.items():
                metrics[f"loss/{name}"].append(gather(value.reshape(1)).mean().item())
        metrics["rewards/chosen"].append(chosen.mean().item())
        metrics["rewards/rejected"].append(rejected.mean().item())
        metrics["rewards/margins"].append((chosen - rejected).mean().item())
        metrics["rewards/accuracies"].append(reward_accuracy(chosen, rejected).item())
        for name, values in (("policy", policy_mse), ("reference", reference_mse)):
            chosen_mse, rejected_mse = values.detach().chunk(2)
            metrics[f"mse/{name}_chosen"].append(gather(chosen_mse).mean().item())
            metrics[f"mse/{name}_rejected"].append(gather(rejected_mse).mean().item())

    def evaluate(self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """`Trainer.evaluate` on fixed draws: every eval example gets its noise, timestep and latent samples from
        `eval_seed` and its index, so the same weights give the same `eval_loss`, whatever the batch size. The global
        random state (Python, NumPy, torch) is left as it was, so a run with evaluations trains as one without."""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, IndexedExamples)):
            eval_dataset = IndexedExamples(eval_dataset)
        with global_random_state_kept():
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[f"{prefix}{key}"] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # -------------------------------------------------------------------------------------------- save/load
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        adapter_io.save_expert(
            output_dir,
            unet=self.components.unet,
            architecture=self.components.architecture,
            metadata=self.adapter_metadata(),
            training_settings=self.training_settings(),
            repo_id=self.hub_model_id,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        adapter_io.load_lora_into_unet(self.components.unet, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """Load the best checkpoint's LoRA (`Trainer` looks for transformers' or peft's weight files, which an expert
        does not write)."""
        checkpoint = self.state.best_model_checkpoint
        logger.info("Loading the best LoRA, from %s (%s %s).", checkpoint, self.args.metric_for_best_model,
                    self.state.best_metric)  # fmt: skip
        adapter_io.load_lora_into_unet(self.components.unet, checkpoint)
        self.best_model_loaded = True

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train`, resuming only what is whole and was trained with these settings.

        With `resume_from_checkpoint=True`, checkpoints that a killed run left incomplete are moved to
        `output_dir/_incomplete/` (with a warning) and training resumes from the last complete one, or from scratch
        when none is left.

        Raises:
            ValueError: If the checkpoint to resume recorded other training settings (they are listed), or a
                checkpoint named by its path is incomplete.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            gaps = adapter_io.checkpoint_gaps(resume_from_checkpoint, adapter_io.saves_optimizer(self.args))
            if gaps:
                raise ValueError(
                    f"Checkpoint {str(resume_from_checkpoint)!r} is incomplete (it lacks {', '.join(gaps)}); resume "
                    "from another checkpoint."
                )
            adapter_io.check_training_settings(resume_from_checkpoint, self.training_settings())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _last_complete_checkpoint(self) -> str | bool | None:
        """The newest complete checkpoint, after setting aside the newer incomplete ones; None when none is left,
        True when there was none to begin with (so that `Trainer.train` reports it)."""
        found = adapter_io.checkpoints(self.args.output_dir)
        if not found:
            return True
        for checkpoint in reversed(found):
            gaps = adapter_io.checkpoint_gaps(checkpoint, adapter_io.saves_optimizer(self.args))
            if not gaps:
                return str(checkpoint)
            aside = Path(self.args.output_dir) / INCOMPLETE_DIR / checkpoint.name
            logger.warning(
                "Checkpoint %s is incomplete (it lacks %s: the run stopped while writing it); moving it to %s.",
                checkpoint, ", ".join(gaps), aside,
            )  # fmt: skip
            if self.args.should_save:
                shutil.rmtree(aside, ignore_errors=True)
                aside.parent.mkdir(exist_ok=True)
                os.replace(checkpoint, aside)
        logger.warning("No complete checkpoint is left in %s; training from scratch.", self.args.output_dir)
        return None

    def training_settings(self) -> dict[str, Any]:
        """What decides this expert's weights; see `expert_training_settings`."""
        return expert_training_settings(self.args, self.components.base_model, self.dataset_fingerprint)

    def adapter_metadata(self) -> dict[str, Any]:
        """What `safety_dpo.json` says of this expert."""
        args = self.args
        return {
            "kind": "expert",
            "base_model": self.components.base_model,
            "unet_config_sha256": self.components.unet_fingerprint,
            "architecture": self.components.architecture,
            "categories": list(args.categories or self.concepts),
            "concepts": self.concepts,
            "dataset": args.dataset_name,
            "lora": {
                "rank": args.rank,
                "alpha": args.alpha,
                "target_modules": list(args.target_modules),
                "dropout": args.lora_dropout,
                "init_sha256": self.lora_init_sha256,
            },
            "training": {
                "beta": args.beta,
                "loss_type": args.loss_type,
                "prompt_condition": args.prompt_condition,
                "empty_prompt_probability": args.empty_prompt_probability,
                "rpo_alpha": args.rpo_alpha,
                "preservation_weight": args.preservation_weight,
                "preservation_prompts": _describe_prompts(args.preservation_prompts),
                "learning_rate": args.learning_rate,
                "steps": self.state.best_global_step if self.best_model_loaded else self.state.global_step,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "resolution": self.resolution,
                "seed": args.seed,
                "precompute": args.precompute,
                **self._best_model_record(),
            },
        }

    def _best_model_record(self) -> dict[str, Any]:
        """What `safety_dpo.json` says of a best model loaded at the end (nothing otherwise)."""
        if not self.best_model_loaded:
            return {}
        return {
            "steps_trained": self.state.global_step,
            "metric_for_best_model": self.args.metric_for_best_model,
            "best_metric": self.state.best_metric,
        }

    def create_model_card(self, model_name: str | None = None, **kwargs: Any) -> None:
        """Write the adapter card (`hub_cards/adapter_card.md`) as `README.md` in `output_dir`."""
        if self.is_world_process_zero():
            adapter_io.write_card(self.args.output_dir, self.adapter_metadata(), repo_id=self.hub_model_id)


def expert_training_settings(
    args: SafetyDPOConfig, base_model: str, dataset_fingerprint: str | None
) -> dict[str, Any]:
    """Everything that decides an expert's weights: the base model, the training rows (the `datasets` fingerprint of
    the dataset given to the trainer, before choosing categories) and `args.training_settings()`. Every checkpoint and
    finished expert records it in `training_settings.json`; resuming or reusing one takes the same settings."""
    return {"base_model": base_model, "dataset_fingerprint": dataset_fingerprint, **args.training_settings()}


def _describe_prompts(prompts: list[str] | None) -> dict[str, Any] | str:
    if prompts is None:
        return "the dataset's safe prompts and the other categories' unsafe prompts"
    joined = "\n".join(prompts).encode()
    return {"count": len(prompts), "sha256": hashlib.sha256(joined).hexdigest(), "first": prompts[0]}


def lora_init_digest(unet: torch.nn.Module) -> str:
    """sha256 of a freshly added LoRA's factors (names, shapes, float32 values, in name order): equal digests mean
    two experts started from the same factors, the condition under which their factors can be merged entry by entry."""
    digest = hashlib.sha256()
    for name, parameter in sorted(unet.named_parameters()):
        if "lora_" in name:
            digest.update(f"{name}:{tuple(parameter.shape)}".encode())
            digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _concepts_by_category(pairs) -> dict[str, list[str]]:
    if "category" not in pairs.column_names:
        return {}
    concepts: dict[str, set[str]] = defaultdict(set)
    names = pairs["concept"] if "concept" in pairs.column_names else [None] * len(pairs)
    for category, concept in zip(pairs["category"], names, strict=True):
        if concept is not None:
            concepts[category].add(concept)
        else:
            concepts.setdefault(category, set())
    return {category: sorted(values) for category, values in sorted(concepts.items())}


def _cast(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    cast = {}
    for key, value in inputs.items():
        cast[key] = _cast(value, dtype) if isinstance(value, dict) else value.to(dtype)
    return cast
