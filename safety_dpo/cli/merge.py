"""`safety-dpo merge`: merge safety experts into one adapter with Co-Merge (or cat/TIES/DARE)."""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_dpo.cli.arguments import comma_floats

NAME = "merge"

# safety_dpo.merging.config's METHODS, RENAMED_METHODS, GRANULARITIES, INPUTS and STORAGES, written out so that
# `--help` does not import torch (importing safety_dpo.merging does; a test checks these against the library's).
_METHODS = ("co_merge", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_RENAMED_METHODS = ("linear",)
_GRANULARITIES = ("row", "element", "lora_factor")
_INPUTS = ("shared", "own_category", "with_expert")
_STORAGES = ("auto", "exact", "svd")

# The CoMergeConfig fields that are flags of `merge`; those given go over --config's.
_MERGE_OPTIONS = (
    "method",
    "granularity",
    "inputs",
    "calibration_dataset",
    "num_calibration_prompts",
    "num_timesteps",
    "calibration_batch_size",
    "weights",
    "density",
    "storage",
    "rank",
    "seed",
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Merge safety experts into one adapter with Co-Merge (or cat/TIES/DARE).",
        description="Merge safety experts (folders written by `safety-dpo train`, .safetensors files or Hub ids) into "
        "one LoRA. Co-Merge gives every weight to the expert most active on it over calibration generations of "
        "the model (the experts' base model, or the microworld when they name none); the baselines need no model. "
        "Options left out come from --config, then from CoMergeConfig's defaults.",
    )
    parser.add_argument("experts", nargs="+", metavar="EXPERT", help="Expert folder, .safetensors file or Hub id.")
    parser.add_argument("--output-dir", required=True, help="Where the merged adapter is written.")
    parser.add_argument(
        "--method",
        choices=[*_METHODS, *_RENAMED_METHODS],
        help="co_merge (default) or a baseline; cat is the weighted sum of the deltas (peft's name; 'linear' is read "
        "as cat).",
    )
    parser.add_argument("--granularity", choices=_GRANULARITIES, help="What competes in Co-Merge (default: row).")
    parser.add_argument("--inputs", choices=_INPUTS, help="Calibration inputs of Co-Merge (default: shared).")
    parser.add_argument("--model", help="Path or Hub id of the experts' base pipeline (default: from the experts).")
    parser.add_argument("--calibration-dataset", help="CoProV2 folder or Hub id (default: the experts' dataset).")
    parser.add_argument("--num-calibration-prompts", type=int, help="Calibration prompts per category.")
    parser.add_argument("--num-timesteps", type=int, help="Denoising steps per calibration generation.")
    parser.add_argument("--calibration-batch-size", type=int, help="Prompts per calibration generation.")
    parser.add_argument(
        "--weights", type=_merge_weights, help="Comma-separated weight per expert, or 'mean' (1/K each)."
    )
    parser.add_argument("--density", type=float, help="Share of weights kept by ties/dare/magnitude_prune.")
    parser.add_argument("--storage", choices=_STORAGES, help="exact, svd or auto (default).")
    parser.add_argument("--rank", type=int, help="Rank of the SVD re-factorisation.")
    parser.add_argument("--seed", type=int, help="Seed of calibration and DARE.")
    parser.add_argument("--config", help="A CoMergeConfig JSON file (or a merged adapter's safety_dpo.json).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the adapter to this Hub repo.")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Merge safety experts into one adapter with Co-Merge (or a baseline) and save it."""
    from safety_dpo.folder_lock import FolderLock, folder_contents
    from safety_dpo.merging import CoMergeConfig, co_merge
    from safety_dpo.trainer.adapter_io import read_metadata

    settings = CoMergeConfig.from_json_file(args.config).to_dict() if args.config else {}
    settings.update({name: getattr(args, name) for name in _MERGE_OPTIONS if getattr(args, name) is not None})
    config = CoMergeConfig(**settings)  # a bad option fails before any work
    output_dir = Path(args.output_dir)
    existing = read_metadata(output_dir) if output_dir.is_dir() else None
    if existing is not None and existing.get("kind") != "merged":
        raise FileExistsError(
            f"--output-dir {args.output_dir!r} holds an adapter of kind {existing.get('kind')!r} (an expert adapter, "
            "not a merge); choose another directory (a merged adapter there would replace it)."
        )
    if existing is None and output_dir.is_dir():
        others = folder_contents(output_dir)
        if others:  # e.g. the user's own README.md, which the adapter card would overwrite
            raise FileExistsError(
                f"--output-dir {args.output_dir!r} holds files that are not a merged adapter ({', '.join(others[:5])}"
                + (", ..." if len(others) > 5 else "")
                + "); choose a new or empty directory. Nothing was written."
            )
    with FolderLock(output_dir, "safety-dpo merge"):
        merged = co_merge(args.experts, config, pipeline=args.model)
        merged.save_pretrained(output_dir, repo_id=args.push_to_hub)
    print(f"Merged adapter written to {args.output_dir} (load it with pipe.load_safety_adapter({args.output_dir!r})).")
    report = merged.report
    if "win_share" in report:
        print(
            "Share of the weights each expert won: "
            + ", ".join(f"{k}: {v:.2f}" for k, v in report["win_share"].items())
        )
    if "svd_relative_error" in report:
        error = report["svd_relative_error"]
        print(f"SVD re-factorisation, relative error per layer: mean {error['mean']:.4f}, max {error['max']:.4f}.")
    if args.push_to_hub:
        print(f"Pushed: {merged.push_to_hub(args.push_to_hub)}")
    return 0


def _merge_weights(value: str) -> list[float] | str:
    return value if value == "mean" else comma_floats(value)
