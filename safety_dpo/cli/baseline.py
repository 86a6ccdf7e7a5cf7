"""`safety-dpo baseline`: erase harmful concepts with ESD-u or UCE, the methods SafetyDPO is compared with."""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_dpo.cli.arguments import comma_list

NAME = "baseline"

# safety_dpo.baselines.runner.ADAPTER_METHODS, written out so that `--help` does not import torch.
_METHODS = ("esd-u", "uce")
# Flag -> (method, config field). Only the flags given reach the config; the rest are the paper's defaults.
_OPTIONS = {
    "iterations": ("esd-u", "iterations"),
    "learning_rate": ("esd-u", "learning_rate"),
    "rank": ("esd-u", "rank"),
    "negative_guidance": ("esd-u", "negative_guidance"),
    "ddim_steps": ("esd-u", "ddim_steps"),
    "start_guidance": ("esd-u", "start_guidance"),
    "save_steps": ("esd-u", "save_steps"),
    "resolution": ("esd-u", "resolution"),
    "seed": ("esd-u", "seed"),
    "lamb": ("uce", "lamb"),
    "erase_scale": ("uce", "erase_scale"),
    "preserve_scale": ("uce", "preserve_scale"),
    "guide": ("uce", "guide"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Erase harmful concepts with a baseline method (ESD-u, UCE) into a safety adapter.",
        description="Erase the harmful concepts of some categories with ESD-u (Gandikota et al., 2023: fine-tunes the "
        "UNet's non-cross-attention layers, here as a LoRA) or UCE (Gandikota et al., 2024: a closed-form edit of the "
        "cross-attention keys and values) and write a safety adapter that `pipe.load_safety_adapter(DIR)`, "
        "`safety-dpo evaluate --safety-adapter DIR` and stock diffusers' `load_lora_weights(DIR)` read. The concepts' "
        "trained names are erased (never their held-out names). The microworld when no model is named. A finished "
        "adapter with the same settings is reused; an interrupted ESD-u run resumes. SLD, the third baseline, works "
        "at sampling time: `safety-dpo evaluate --method sld-strong`. Options left out are the papers' "
        "(docs/baselines.md).",
    )
    parser.add_argument("method", choices=_METHODS, help="esd-u or uce.")
    parser.add_argument("--output-dir", required=True, help="Where the adapter is written.")
    parser.add_argument("--model", help="Path or Hub id of a Stable Diffusion pipeline (default: microworld).")
    parser.add_argument("--categories", type=comma_list, help="Harm categories to erase (default: all).")
    parser.add_argument("--concepts", type=comma_list, help="Only these harmful concept ids of those categories.")
    parser.add_argument(
        "--taxonomy", help="A taxonomy YAML/JSON file (default: the microworld's, or CoProV2's with --model)."
    )
    esd = parser.add_argument_group("ESD-u options")
    esd.add_argument("--iterations", type=int, help="Training iterations, one concept prompt each.")
    esd.add_argument("--learning-rate", type=float, help="Adam learning rate of the LoRA.")
    esd.add_argument("--rank", type=int, help="LoRA rank.")
    esd.add_argument(
        "--negative-guidance", type=float, help="eta of the target eps(x_t) - eta (eps(x_t, c) - eps(x_t))."
    )
    esd.add_argument("--ddim-steps", type=int, help="DDIM steps of the sampling that gives x_t.")
    esd.add_argument("--start-guidance", type=float, help="Classifier-free guidance of that sampling.")
    esd.add_argument("--save-steps", type=int, help="Iterations between resumable checkpoints.")
    esd.add_argument("--resolution", type=int, help="Image size in pixels (default: the model's).")
    esd.add_argument("--seed", type=int, help="Seed of the concept, timestep and noise draws.")
    uce = parser.add_argument_group("UCE options")
    uce.add_argument("--lamb", type=float, help="Weight of ||W - W_old||^2, which keeps the edit small.")
    uce.add_argument("--erase-scale", type=float, help="Weight of the erased concepts' terms.")
    uce.add_argument("--preserve-scale", type=float, help="Weight of the preserved concepts' terms.")
    uce.add_argument(
        "--guide",
        choices=["counterpart", "empty"],
        help="What an erased name is mapped to: its safe counterpart's name (default) or the empty prompt.",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the adapter to this Hub repo.")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Make the baseline adapter, reusing a finished one made the same way."""
    from safety_dpo.baselines.runner import TIMING_NAME, baseline_seconds, make_baseline
    from safety_dpo.folder_lock import FolderLock, folder_contents
    from safety_dpo.trainer.adapter_io import METADATA_NAME

    options = {}
    for flag, (method, field) in _OPTIONS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if method != args.method:
            raise ValueError(f"--{flag.replace('_', '-')} is an option of {method}, not of {args.method}; drop it.")
        options[field] = value
    output_dir = Path(args.output_dir)
    ours = {METADATA_NAME, TIMING_NAME, "README.md", "pytorch_lora_weights.safetensors", "checkpoint"}
    others = [name for name in folder_contents(output_dir) if name not in ours and not name.startswith(".")]
    if others:  # e.g. the user's own README.md next to other files: never overwritten
        raise FileExistsError(
            f"--output-dir {args.output_dir!r} holds files that are not a baseline adapter ({', '.join(others[:5])}"
            + (", ..." if len(others) > 5 else "")
            + "); choose a new or empty directory. Nothing was written."
        )
    with FolderLock(output_dir, f"safety-dpo baseline {args.method}"):
        make_baseline(
            args.method,
            output_dir,
            model=args.model,
            categories=args.categories,
            concepts=args.concepts,
            taxonomy=args.taxonomy,
            options=options,
        )
    seconds = baseline_seconds(output_dir)
    print(
        f"{args.method} adapter written to {args.output_dir}"
        + (f" in {seconds:.0f} s" if seconds is not None else "")
        + f" (load it with pipe.load_safety_adapter({args.output_dir!r}); measure it with `safety-dpo evaluate "
        f"--safety-adapter {args.output_dir} --output-dir EVAL_DIR`)."
    )
    if args.push_to_hub:
        from safety_dpo.hub import push_folder

        url = push_folder(output_dir, args.push_to_hub, commit_message=f"Upload {args.method} safety adapter")
        print(f"Pushed: {url}")
    return 0
