"""`safety-dpo train`: train SafetyDPO safety experts (Diffusion-DPO LoRAs) on a CoProV2 dataset."""

from __future__ import annotations

import argparse

from safety_dpo.cli.arguments import comma_list, config_settings

NAME = "train"

# Every SafetyDPOConfig field is also a flag of `train` (arguments.add_config_flags), except those named like a flag
# of its own: --output-dir, and --categories, a comma list like every other subcommand's.
OWN_FLAGS = ("output_dir", "categories")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        usage="safety-dpo train --dataset DATASET --output-dir OUTPUT_DIR [--category NAME | --categories A,B | "
        "--all-categories] [--model MODEL] [training flags]",
        help="Train SafetyDPO safety experts (Diffusion-DPO LoRAs) on a CoProV2 dataset.",
        description="Train a LoRA safety expert with the Diffusion-DPO loss. --category NAME trains one expert; "
        "--categories a,b one LoRA on several categories; --all-categories one expert per category into "
        "OUTPUT_DIR/<category>/, one after another, resuming where a previous run stopped. Every SafetyDPOConfig "
        "and TrainingArguments field is accepted as a flag (--learning-rate 1e-4, --beta 2500, "
        "--per-device-train-batch-size 8, --bf16, ...; listed below). Without a category flag: one expert on every "
        "pair of the dataset. Without --model (the microworld) the defaults are the microworld's training settings "
        "of `safety-dpo align` (MICROWORLD_TRAINING); with --model, SafetyDPOConfig's.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="CoProV2 dataset: a build-data folder or a Hub id; also the published CoProV2 / Pick-a-Pic layout "
        "(jpg_0, jpg_1, label_0, caption).",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--category", help="Train one expert on this category.")
    which.add_argument("--categories", type=comma_list, help="Train one LoRA on these categories.")
    which.add_argument("--all-categories", action="store_true", help="Train one expert per category.")
    parser.add_argument("--output-dir", required=True, help="Where the expert(s) and checkpoints are written.")
    parser.add_argument("--model", help="Path or Hub id of an SD 1.x/2.x or SDXL pipeline (default: microworld).")
    parser.set_defaults(handler=run, config_flags=OWN_FLAGS)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train one safety expert, one per category, or one LoRA on several categories."""
    from safety_dpo.align import MICROWORLD_TRAINING
    from safety_dpo.trainer.experts import train_experts

    settings = config_settings(args)
    if args.model is None:
        # The embedded default gets the settings that work there, as `safety-dpo align` uses them; the paper's
        # SafetyDPOConfig defaults barely move the tiny checkpoint (docs/training.md). Flags still win.
        settings = {**MICROWORLD_TRAINING, **settings}
        shown = ", ".join(f"{key}={value}" for key, value in MICROWORLD_TRAINING.items())
        print(f"No --model: the microworld, with its training settings ({shown}) under your flags.")
    max_steps = settings.pop("max_steps", None)
    trained = train_experts(
        dataset=args.dataset,
        output_dir=args.output_dir,
        model=args.model,
        category=args.category,
        categories=args.categories,
        all_categories=args.all_categories,
        max_steps=max_steps,
        **settings,
    )
    for directory in trained:
        load = f"pipe.load_safety_adapter({str(directory)!r})"
        if directory in trained.reused:
            print(
                f"Safety expert {directory} was already trained with these settings; nothing was trained (load it "
                f"with {load})."
            )
        else:
            print(f"Safety expert written to {directory} (load it with {load}).")
    return 0
