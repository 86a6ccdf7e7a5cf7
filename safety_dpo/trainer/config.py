"""`SafetyDPOConfig`: the settings of a safety expert's Diffusion-DPO training, on `transformers.TrainingArguments`."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainingArguments

from safety_dpo.trainer.losses import LOSS_TYPES

if TYPE_CHECKING:
    from peft import LoraConfig

PROMPT_CONDITIONS: tuple[str, ...] = ("unsafe", "safe", "both")
PAPER_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
PUSHABLE_HUB_STRATEGIES: tuple[str, ...] = ("every_save", "end")  # the others push checkpoints, pickles included

# What a `peft.LoraConfig` given to the trainer sets (as rank, alpha, target_modules, lora_dropout). Its other options
# must keep peft's defaults: an expert is a plain LoRA that diffusers' loader, Co-Merge and safety_dpo.json describe.
PEFT_LORA_FIELDS: tuple[str, ...] = ("r", "lora_alpha", "target_modules", "lora_dropout")
# LoraConfig entries that describe the config rather than the LoRA (or that the trainer checks on its own).
_PEFT_BOOKKEEPING = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
     "inference_mode", "init_lora_weights"}
)  # fmt: skip

# The fields that do not change an expert's weights: where files go, what is logged and evaluated, and how fast the
# same computation runs. Every other field is a training setting (`SafetyDPOConfig.training_settings`), which an expert
# records and a rerun must match; listing what is left out, rather than what is kept, means that a field a later
# transformers adds is compared until someone decides it does not matter.
NON_TRAINING_FIELDS = frozenset(
    {
        # where files go and what is recorded of the run
        "output_dir", "dataset_name", "run_name", "project", "report_to", "disable_tqdm", "skip_memory_metrics",
        "include_num_input_tokens_seen", "push_to_hub", "push_logs", "resume_from_checkpoint", "do_train", "do_eval",
        "do_predict",
        # evaluation (the eval set is not part of the expert either)
        "per_device_eval_batch_size", "prediction_loss_only", "include_for_metrics", "batch_eval_metrics",
        "bf16_full_eval", "fp16_full_eval",
        # how fast the same computation runs, and on what: same maths, so a resumed run may change them
        "use_cpu", "local_rank", "debug", "precompute", "precompute_batch_size", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs",
        "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "enable_jit_checkpoint",
    }
)  # fmt: skip
NON_TRAINING_PREFIXES = ("logging_", "log_", "eval_", "save_", "hub_", "trackio_", "ddp_")


@dataclass
class SafetyDPOConfig(TrainingArguments):
    r"""Configuration of [`SafetyDPOTrainer`]: the DPO, LoRA and data settings below, plus every
    `transformers.TrainingArguments` field (`output_dir`, `max_steps`, `learning_rate`, `per_device_train_batch_size`,
    `gradient_accumulation_steps`, `bf16`, `gradient_checkpointing`, `save_steps`, `push_to_hub`, ...).

    `transformers.HfArgumentParser(SafetyDPOConfig)` turns it into command-line flags, as `safety-dpo train` does.

    Parameters:
        > The DPO objective

        beta (`float`, defaults to `2500.0`):
            Strength of the KL regularisation towards the base model. Convention of diffusers' Diffusion-DPO script
            (no 0.5 factor): 2500 here equals the 5000 of the Diffusion-DPO and SafetyDPO papers' code, which
            multiplies by 0.5. Higher keeps the expert closer to the base model.
        loss_type (`str`, defaults to `"sigmoid"`):
            `"sigmoid"` (DPO), `"hinge"` (SLiC) or `"ipo"`; see `safety_dpo.trainer.losses`.
        prompt_condition (`str`, defaults to `"both"`):
            Which prompt conditions a pair: `"unsafe"` (the unsafe prompt: the model learns to draw the safe image
            when asked for the unsafe one), `"safe"`, or `"both"` (every pair is used once with each prompt, the
            paper's DPO-strategy ablation).
        empty_prompt_probability (`float`, defaults to `0.2`):
            Probability of conditioning a pair on the empty prompt instead (SafetyDPO uses 0.2), which keeps
            classifier-free guidance working.

        > Keeping what the expert should not change (off by default: the paper's loss)

        rpo_alpha (`float` or `None`, defaults to `None`):
            Weight of a supervised term, the preferred (safe) image's denoising error, added to the DPO loss (trl's
            `rpo_alpha`). DPO optimises only the gap between the safe and the unsafe image's errors, and the cheapest
            way to widen it is often to denoise both worse; this term makes the expert draw the safe image instead.
            `None`: no term.
        preservation_weight (`float`, defaults to `0.0`):
            Weight of a preservation term: the mean squared difference between the expert's and the base model's
            predictions on benign prompts (`preservation_prompts`), at the same noisy latents as the pair. It keeps
            the expert from changing anything but the harmful concepts. `0`: no term.
        preservation_prompts (`list[str]` or `None`, defaults to `None`):
            The benign prompts of the preservation term; each step draws one per pair. `None`: the dataset's safe
            prompts (benign by construction) and the unsafe prompts of the categories the expert does not remove
            (`trainer.data.retain_prompts`), so that one expert leaves the other categories to their own experts.

        > The expert

        categories (`list[str]` or `None`, defaults to `None`):
            Train one LoRA on the rows of these categories; one category makes one expert. `None` uses every row.
        rank (`int`, defaults to `4`):
            LoRA rank (the paper's r = 4).
        alpha (`float` or `None`, defaults to `None`):
            LoRA alpha; `None` means `rank` (the paper's alpha = r).
        target_modules (`list[str]`, defaults to `["to_k", "to_q", "to_v", "to_out.0"]`):
            UNet modules that get a LoRA (the paper's: the attention projections).
        lora_dropout (`float`, defaults to `0.0`):
            Dropout on the LoRA input.

        > The data

        resolution (`int` or `None`, defaults to `None`):
            Training images are resized (shorter side) and centre-cropped to this size; `None` uses the model's native
            size (the UNet's sample size times the VAE's scale factor: 32 for the microworld, 512 for SD1.5).
        precompute (`bool`, defaults to `True`):
            Encode every image with the VAE and every prompt with the text encoder(s) once, before training, and cache
            the results in `output_dir/precomputed/`; training then never runs the VAE or the text encoders.
        precompute_batch_size (`int`, defaults to `16`):
            Batch size of that encoding pass.
        dataset_name (`str` or `None`, defaults to `None`):
            The dataset's Hub id or path, recorded in the expert's `safety_dpo.json` and card.

        > Evaluation and publishing

        eval_seed (`int`, defaults to `0`):
            Seed of evaluation's noise, timesteps and latent samples, drawn per eval example from this seed and the
            example's index: every evaluation of the same weights gives the same `eval_loss`, whatever the batch size,
            so `load_best_model_at_end` and early stopping compare checkpoints, not noise. Independent of `seed`, so
            runs with different training seeds are evaluated on the same draws.
        push_logs (`bool`, defaults to `False`):
            Also push the TensorBoard runs (`output_dir/runs/`) with the expert. A push holds the weights,
            `safety_dpo.json` and the card only; never the optimizer, scheduler or RNG states (pickles), which stay
            in the local checkpoints.

    `hub_strategy` must be `"every_save"` or `"end"`: `"checkpoint"` and `"all_checkpoints"` would push the checkpoints'
    optimizer, scheduler and RNG states, which are pickles.

    Numbers are checked: `max_steps` must be >= 1 (or -1, "train `num_train_epochs` epochs"); `learning_rate`, `beta`,
    `alpha` and `num_train_epochs` must be finite and > 0; batch sizes and `gradient_accumulation_steps` >= 1.

    Defaults that differ from `TrainingArguments`: `learning_rate=1e-4` (a LoRA rate), `logging_steps=10`,
    `remove_unused_columns=False` (the trainer reads its own columns), `report_to` = TensorBoard when it is installed.
    """

    beta: float = field(
        default=2500.0,
        metadata={"help": "KL strength; diffusers' convention: 2500 equals the papers' 5000 (which multiply by 0.5)."},
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), hinge or ipo."})
    prompt_condition: str = field(
        default="both", metadata={"help": "Prompt that conditions a pair: unsafe, safe or both (each pair twice)."}
    )
    empty_prompt_probability: float = field(
        default=0.2, metadata={"help": "Probability of conditioning on the empty prompt (paper: 0.2)."}
    )
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Weight of the safe image's denoising error added to the DPO loss (trl's)."}
    )
    preservation_weight: float = field(
        default=0.0, metadata={"help": "Weight of the prediction-preservation term on benign prompts (0: off)."}
    )
    preservation_prompts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompts of the preservation term; default: the safe prompts and other categories' unsafe ones."
        },
    )
    categories: list[str] | None = field(
        default=None, metadata={"help": "Train on the rows of these categories only (one category = one expert)."}
    )
    rank: int = field(default=4, metadata={"help": "LoRA rank (paper: 4)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default: the rank (paper: alpha = r)."})
    target_modules: list[str] = field(
        default_factory=lambda: list(PAPER_TARGET_MODULES),
        metadata={"help": "UNet modules that get a LoRA (paper: to_k to_q to_v to_out.0)."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    resolution: int | None = field(
        default=None, metadata={"help": "Training image size; default: the model's native size."}
    )
    precompute: bool = field(
        default=True, metadata={"help": "Cache VAE latents and text embeddings once, before training."}
    )
    precompute_batch_size: int = field(default=16, metadata={"help": "Batch size of the precompute pass."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id or path of the dataset, recorded in safety_dpo.json and the card."}
    )
    eval_seed: int = field(
        default=0,
        metadata={"help": "Seed of evaluation's noise and timesteps (per example: same weights, same loss)."},
    )
    push_logs: bool = field(
        default=False, metadata={"help": "Also push the TensorBoard runs (output_dir/runs/) with the expert."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Initial AdamW learning rate (a LoRA rate)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer reads its own columns."}
    )
    report_to: None | str | list[str] = field(
        default=None, metadata={"help": "Integrations to log to; default: tensorboard when installed, else none."}
    )

    def __post_init__(self) -> None:
        if self.report_to is None:
            self.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}.")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not supported; use one of {', '.join(LOSS_TYPES)}.")
        if self.prompt_condition not in PROMPT_CONDITIONS:
            raise ValueError(
                f"prompt_condition={self.prompt_condition!r} is not supported; use one of "
                f"{', '.join(PROMPT_CONDITIONS)}."
            )
        self._check_numbers()
        if self.preservation_prompts is not None and not self.preservation_prompts:
            raise ValueError("preservation_prompts is empty; pass None to use the dataset's safe prompts.")
        for name, value in (
            ("empty_prompt_probability", self.empty_prompt_probability),
            ("lora_dropout", self.lora_dropout),
        ):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8 (>= 8), got {self.resolution}.")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name the UNet modules that get a LoRA, e.g. to_k to_q to_v.")
        if self.categories is not None and not self.categories:
            raise ValueError("categories is empty; pass None to train on every row.")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must stay False: SafetyDPOTrainer reads its own columns.")
        hub_strategy = getattr(self.hub_strategy, "value", self.hub_strategy)
        if hub_strategy not in PUSHABLE_HUB_STRATEGIES:
            raise ValueError(
                f"hub_strategy={hub_strategy!r} is not supported; use one of {', '.join(PUSHABLE_HUB_STRATEGIES)}. "
                "Checkpoints hold the optimizer, scheduler and RNG states as pickles; they stay local."
            )
        if self.dataloader_pin_memory and not _has_accelerator():
            self.dataloader_pin_memory = False  # pinning is for host-to-GPU copies; on a CPU it only warns
        super().__post_init__()

    def _check_numbers(self) -> None:
        """Refuse the numbers that `Trainer` would misread rather than reject (`max_steps=0` trains one step,
        `max_steps=-5` trains `num_train_epochs` epochs, `learning_rate=0` trains nothing)."""
        if (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or not (self.max_steps >= 1 or self.max_steps == -1)
        ):
            raise ValueError(
                f"max_steps must be a whole number >= 1 (the optimizer steps to train), or -1 to train "
                f"num_train_epochs epochs instead; got {self.max_steps!r}."
            )
        for name, value in (
            ("learning_rate", self.learning_rate),
            ("beta", self.beta),
            ("alpha", self.alpha),
            ("num_train_epochs", self.num_train_epochs),
        ):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be > 0 and finite, got {value!r}.")
        for name, value in (
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("precompute_batch_size", self.precompute_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
        if self.rpo_alpha is not None and not (self.rpo_alpha >= 0 and math.isfinite(self.rpo_alpha)):
            raise ValueError(f"rpo_alpha must be >= 0 and finite, or None, got {self.rpo_alpha}.")
        if not (self.preservation_weight >= 0 and math.isfinite(self.preservation_weight)):
            raise ValueError(f"preservation_weight must be >= 0 and finite, got {self.preservation_weight}.")

    def training_settings(self) -> dict[str, Any]:
        """The fields that decide the trained weights (all but `NON_TRAINING_FIELDS`), as they read back from JSON."""
        settings = {
            name: value
            for name, value in self.to_dict().items()
            if name not in NON_TRAINING_FIELDS and not name.startswith(NON_TRAINING_PREFIXES)
        }
        return json.loads(json.dumps(settings, default=str))


def lora_fields_from_peft_config(peft_config: LoraConfig, args: SafetyDPOConfig) -> dict[str, Any]:
    """The `SafetyDPOConfig` fields that a `peft.LoraConfig` given to the trainer sets, as trl's trainers take one.

    The LoraConfig wins: its `r`, `lora_alpha`, `target_modules` and `lora_dropout` replace `rank`, `alpha`,
    `target_modules` and `lora_dropout`, peft's defaults included (`LoraConfig(r=16)` has `lora_alpha=8`).
    `target_modules=None` keeps `args.target_modules`, as peft's None means "the model's usual modules".

    Args:
        peft_config: The `peft_config` given to `SafetyDPOTrainer`.
        args: The config it applies to.

    Returns:
        `{"rank": ..., "alpha": ..., "target_modules": [...], "lora_dropout": ...}`, for `dataclasses.replace(args, ...)`.

    Raises:
        TypeError: If `peft_config` is not a `peft.LoraConfig`.
        ValueError: For a task type (the LoRA goes on a UNet, which has none), an initialisation other than gaussian,
            target modules given as a pattern, or any other LoRA option changed from peft's default, naming it.
    """
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}.")
    if peft_config.task_type is not None:
        raise ValueError(
            f"peft_config.task_type={str(peft_config.task_type)!r} does not apply: the LoRA goes on the diffusion "
            "UNet, which has no task type; leave task_type=None."
        )
    if peft_config.init_lora_weights not in (True, "gaussian"):
        raise ValueError(
            f"peft_config.init_lora_weights={peft_config.init_lora_weights!r} is not supported; use True or "
            "'gaussian': an expert always starts as diffusers' scripts start a LoRA (gaussian A, zero B), so that the "
            "reference is the UNet with its adapter off and experts started alike merge factor by factor."
        )
    defaults = LoraConfig().to_dict()
    for name, value in peft_config.to_dict().items():
        if name not in PEFT_LORA_FIELDS and name not in _PEFT_BOOKKEEPING and value != defaults.get(name):
            raise ValueError(
                f"peft_config.{name}={value!r} is not supported; leave it at peft's default ({defaults.get(name)!r}). "
                f"SafetyDPOTrainer reads {', '.join(PEFT_LORA_FIELDS)} from a LoraConfig: an expert is a plain LoRA."
            )
    target_modules = peft_config.target_modules
    if isinstance(target_modules, str):
        raise ValueError(
            f"peft_config.target_modules={target_modules!r} is a pattern; list the UNet modules instead, e.g. "
            f"{PAPER_TARGET_MODULES}."
        )
    return {
        "rank": peft_config.r,
        "alpha": float(peft_config.lora_alpha),
        "target_modules": sorted(target_modules) if target_modules is not None else list(args.target_modules),
        "lora_dropout": peft_config.lora_dropout,
    }


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def given_training_flags(flags: Sequence[str]) -> dict[str, Any]:
    """The `SafetyDPOConfig` fields that command-line flags set, and only those (unlike a plain parse, which also
    returns every default), so that they can go over a run's own defaults (`align`'s, `train_experts`' keywords).

    Raises:
        ValueError: For a flag `SafetyDPOConfig` does not know.
    """
    import argparse

    from transformers import HfArgumentParser

    parser = HfArgumentParser(SafetyDPOConfig)
    parser.allow_abbrev = False  # "--learning_rat" is a typo, not "--learning_rate"
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    namespace, unknown = parser.parse_known_args([*flags, "--output_dir", "unused"])
    if unknown:
        raise ValueError(f"Unknown training flags {unknown}; see `safety-dpo train --help` and SafetyDPOConfig.")
    return {key: value for key, value in vars(namespace).items() if key != "output_dir"}
