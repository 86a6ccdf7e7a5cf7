"""`safety-dpo build-data`: build a CoProV2 dataset of (safe, unsafe) image pairs."""

from __future__ import annotations

import argparse

from safety_dpo.cli.arguments import comma_list

NAME = "build-data"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Build a CoProV2 dataset of (safe, unsafe) image pairs.",
        description="Write prompt pairs for each harmful concept, draw both prompts of each pair from the same seed "
        "with the target model, and save a datasets.DatasetDict (train/test). Resumes an interrupted build in the "
        "same output directory. Under `accelerate launch` or `torchrun` the work is split across processes.",
    )
    parser.add_argument("--model", help="Path or Hub id of a diffusers text-to-image pipeline (default: microworld).")
    parser.add_argument("--taxonomy", help="YAML/JSON taxonomy file (default: the model's world, or CoProV2's).")
    parser.add_argument("--categories", type=comma_list, help="Comma-separated category ids (default: all).")
    parser.add_argument("--concepts", type=comma_list, help="Comma-separated concept ids (default: all).")
    parser.add_argument(
        "--prompt-writer",
        default="template",
        help="template | transformers:MODEL_ID | openai:BASE_URL (default: template).",
    )
    parser.add_argument("--llm-model", help="Model name to request from an openai:BASE_URL server.")
    parser.add_argument("--pairs-per-concept", type=int, default=10, help="Prompt pairs per concept (default: 10).")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="Image seeds per pair (default: 1).")
    parser.add_argument("--seed", type=int, default=0, help="Build seed (default: 0).")
    parser.add_argument(
        "--test-size", type=float, default=0.1, help="Share of pairs in the test split (default: 0.1)."
    )
    parser.add_argument("--min-similarity", type=float, default=0.5, help="Minimal-edit threshold (default: 0.5).")
    parser.add_argument("--batch-size", type=int, default=16, help="Images per pipeline call (default: 16).")
    parser.add_argument("--num-inference-steps", type=int, help="Denoising steps (default: protocol or pipeline).")
    parser.add_argument("--guidance-scale", type=float, help="Guidance scale (default: protocol or pipeline).")
    parser.add_argument("--resolution", type=int, help="Image size in pixels (default: protocol or pipeline).")
    parser.add_argument("--license", help="License recorded in the dataset card.")
    parser.add_argument("--output-dir", required=True, help="Where the dataset is written (datasets.load_from_disk).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the dataset to this Hub dataset repo.")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build a CoProV2 dataset (the microworld's when no model is named) and optionally push it."""
    from safety_dpo.data import CoProV2Builder

    builder = CoProV2Builder(
        args.model,
        taxonomy=args.taxonomy,
        prompt_writer=args.prompt_writer,
        categories=args.categories,
        concepts=args.concepts,
        pairs_per_concept=args.pairs_per_concept,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        test_size=args.test_size,
        min_similarity=args.min_similarity,
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        llm_model=args.llm_model,
        license=args.license,
    )
    dataset = builder.build(args.output_dir)
    rows = ", ".join(f"{split}: {len(dataset[split])}" for split in dataset)
    print(f"CoProV2 written to {args.output_dir} ({rows} rows); load it with datasets.load_from_disk.")
    if args.push_to_hub:
        url = builder.push_to_hub(args.push_to_hub)
        print(f"Pushed to {url}")
    return 0
