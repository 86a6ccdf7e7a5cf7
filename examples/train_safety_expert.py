"""Train one SafetyDPO safety expert: `accelerate launch examples/train_safety_expert.py ...`.

Every `SafetyDPOConfig` / `TrainingArguments` field is a flag. The recipes below use the hyperparameters of the
SafetyDPO authors' launchers (`launchers/train_lora_sd15.sh`, `train_lora_sdxl.sh` in Visualignment/SafetyDPO):
per-device batch 4, gradient accumulation 4, 2000 steps, beta_dpo 5000 in their convention = `--beta 2500` here.

Stable Diffusion 1.5 (their learning rate 1e-5 is scaled by the total batch, `--scale_lr`: 1e-5 x 4 x 4 x 8 GPUs =
1.28e-3 on 8 GPUs; 1.6e-4 on one):

    accelerate launch --num_processes 8 --mixed_precision fp16 examples/train_safety_expert.py \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset my-org/coprov2-sd15 --category violence \
        --output_dir experts-sd15/violence --per_device_train_batch_size 4 --gradient_accumulation_steps 4 \
        --max_steps 2000 --lr_scheduler_type constant_with_warmup --warmup_steps 500 --learning_rate 1.28e-3 \
        --beta 2500 --fp16 --gradient_checkpointing --save_steps 500

SDXL (unscaled 1e-5, Adafactor, the fp16-safe VAE):

    accelerate launch --num_processes 8 --mixed_precision fp16 examples/train_safety_expert.py \
        --model stabilityai/stable-diffusion-xl-base-1.0 --vae madebyollin/sdxl-vae-fp16-fix \
        --dataset my-org/coprov2-sdxl --category violence --output_dir experts-sdxl/violence \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --max_steps 2000 \
        --lr_scheduler_type constant_with_warmup --learning_rate 1e-5 --optim adafactor --beta 2500 --fp16 \
        --gradient_checkpointing --save_steps 500

The microworld, on a CPU (the defaults of docs/training.md):

    python examples/train_safety_expert.py --dataset coprov2-micro --category violence --output_dir expert-violence

With `--push_to_hub --hub_model_id org/name` the expert is uploaded once at the end (and at each checkpoint, unless
`--hub_strategy end`): the weights, `safety_dpo.json` and the card; `--push_logs` adds the TensorBoard runs.

Run it again with the same arguments to resume from the last checkpoint. `safety-dpo train --all-categories` trains
one expert per category in a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from safety_dpo.trainer import SafetyDPOConfig, SafetyDPOTrainer
from safety_dpo.trainer.experts import load_pairs


@dataclass
class ScriptArguments:
    dataset: str = field(metadata={"help": "A `safety-dpo build-data` folder or a Hub dataset id."})
    category: str | None = field(default=None, metadata={"help": "Train on this category (default: every row)."})
    model: str | None = field(default=None, metadata={"help": "Pipeline path or Hub id (default: microworld)."})
    vae: str | None = field(default=None, metadata={"help": "Replace the pipeline's VAE (e.g. an fp16-safe one)."})


def main() -> None:
    script, config = HfArgumentParser((ScriptArguments, SafetyDPOConfig)).parse_args_into_dataclasses()
    if script.category is not None:
        config.categories = [script.category]
    config.dataset_name = config.dataset_name or script.dataset
    model = script.model
    if script.vae is not None:
        from diffusers import AutoencoderKL, DiffusionPipeline

        model = DiffusionPipeline.from_pretrained(model, vae=AutoencoderKL.from_pretrained(script.vae))
    trainer = SafetyDPOTrainer(model=model, args=config, train_dataset=load_pairs(script.dataset))
    resume = any(Path(config.output_dir).glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    if config.push_to_hub:
        trainer.push_to_hub()  # saves the expert into output_dir and uploads it, in one commit
    else:
        trainer.save_model()


if __name__ == "__main__":
    main()
