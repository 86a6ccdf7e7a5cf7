"""`safety-dpo align`: the main job, from CoProV2 data through experts and merge to the evaluation."""

from __future__ import annotations

import argparse

from safety_dpo.cli.arguments import comma_list, config_settings

NAME = "align"

# Every SafetyDPOConfig field is also a flag of `align` (arguments.add_config_flags), except those named like a flag
# of its own: --categories is a comma list; --seed seeds the data build and the merge, and --push-to-hub names the
# repo of the merged adapter.
OWN_FLAGS = ("output_dir", "categories", "seed", "push_to_hub")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        usage="safety-dpo align [--output-dir OUTPUT_DIR] [--model MODEL] [--categories A,B] [options] [training flags]",
        help="The main job: build CoProV2, train one expert per category, merge them, evaluate (default: microworld).",
        description="Make a model safe in one command: build a CoProV2 dataset with the model, train one SafetyDPO "
        "expert per harm category, merge them with Co-Merge into one safety adapter, and evaluate base vs aligned. "
        "With no arguments: the microworld, all categories, output in ./safety-dpo-align. Every stage resumes where it "
        "stopped when the command is run again with the same arguments. SafetyDPOConfig / TrainingArguments fields "
        "are accepted as flags for the experts (--learning-rate 1e-4, --max-steps 500, --bf16, ...; listed below).",
    )
    parser.add_argument("--output-dir", default="safety-dpo-align", help="Where everything goes.")
    parser.add_argument("--model", help="Path or Hub id of an SD 1.x/2.x or SDXL pipeline (default: microworld).")
    parser.add_argument("--categories", type=comma_list, help="Comma-separated categories (default: all).")
    parser.add_argument(
        "--prompt-writer",
        default="template",
        help="template | transformers:MODEL_ID | openai:BASE_URL (default: template, the microworld's grammar).",
    )
    parser.add_argument("--llm-model", help="Model name to request from an openai:BASE_URL server.")
    parser.add_argument("--merge-method", default="co_merge", help="co_merge (default), cat, ties, dare_ties, ...")
    parser.add_argument("--pairs-per-concept", type=int, default=10, help="CoProV2 pairs per concept (default 10).")
    parser.add_argument("--evaluation-prompts", help="Prompt source of the evaluation (default: microworld, or the "
                        "test split of the alignment's own CoProV2 build).")  # fmt: skip
    parser.add_argument("--images-per-prompt", type=int, help="Evaluation images per prompt.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data build and the merge (default 0).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the merged adapter to this Hub repo.")
    parser.set_defaults(handler=run, config_flags=OWN_FLAGS)
    return parser


def run(args: argparse.Namespace) -> int:
    """The main job: data, experts, merge, evaluation, in one resumable run."""
    from safety_dpo.align import align, render_summary

    evaluation = {"images_per_prompt": args.images_per_prompt} if args.images_per_prompt else {}
    summary = align(
        args.output_dir,
        model=args.model,
        categories=args.categories,
        prompt_writer=args.prompt_writer,
        merge_method=args.merge_method,
        pairs_per_concept=args.pairs_per_concept,
        training=config_settings(args),
        evaluation_prompts=args.evaluation_prompts,
        evaluation=evaluation,
        llm_model=args.llm_model,
        seed=args.seed,
        push_to_hub=args.push_to_hub,
    )
    print(render_summary(summary))
    print(f"Load the adapter with pipe.load_safety_adapter({summary['adapter']!r}).")
    if summary.get("pushed"):
        print(f"Pushed: {summary['pushed']}")
    return 0
