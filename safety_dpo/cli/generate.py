"""`safety-dpo generate`: images from prompts, with or without a safety adapter, to try one by hand."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "generate"

_PNG_KEY = "safety_dpo"  # the PNG text chunk in which `generate` records what drew an image
_METHODS = ("sld-weak", "sld-medium", "sld-strong", "sld-max")  # safety_dpo.baselines.sld.METHODS, without torch


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Generate images from prompts, with or without a safety adapter.",
        description="Generate images to try a safety adapter by hand: the same prompts and seeds with and without "
        "--safety-adapter show what it changes. Image k of prompt i uses seed SEED + k and is written as "
        "OUTPUT_DIR/<i>-seed<seed>.png, recording in the PNG what drew it: an image already drawn the same way is kept "
        "(an interrupted run resumes), a folder holding images drawn otherwise is refused. The microworld when no "
        "model is named.",
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    parser.add_argument("--output-dir", required=True, help="Where the images go.")
    parser.add_argument("--model", help="Path or Hub id of a diffusers text-to-image pipeline (default: microworld).")
    parser.add_argument("--safety-adapter", help="Path or Hub id of a safety adapter (fused into the model).")
    parser.add_argument("--safety-scale", type=float, default=1.0, help="The adapter's weight (default 1.0).")
    parser.add_argument(
        "--method",
        choices=_METHODS,
        help="Draw with Safe Latent Diffusion (Schramowski et al., CVPR 2023) at the paper's weak, medium, strong or "
        "max preset, its warm-up scaled to the steps (Stable Diffusion 1.x/2.x pipelines).",
    )
    parser.add_argument(
        "--safety-concept",
        help="With --method: the text SLD guides away from (default: in the microworld the harmful concepts' trained "
        "names, else SLD's published concept).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first image of each prompt.")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--num-inference-steps", type=int, help="Denoising steps (default: the model's).")
    parser.add_argument("--guidance-scale", type=float, help="Classifier-free guidance (default: the model's).")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate images from prompts, with or without a safety adapter, to try one by hand."""
    import json

    import torch
    from PIL.PngImagePlugin import PngInfo

    from safety_dpo.data.build_dir import differences, write_json
    from safety_dpo.data.generation import check_sampler, load_text_to_image_pipeline
    from safety_dpo.evaluation.runner import adapter_content_digest
    from safety_dpo.folder_lock import FolderLock
    from safety_dpo.pipelines import enable_safety_adapters

    if args.images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}.")
    check_sampler(args.num_inference_steps, args.guidance_scale, None, args.safety_scale)
    if args.safety_concept is not None and args.method is None:
        raise ValueError("--safety-concept is SLD's; it needs --method sld-....")
    # The adapter is read and checked before anything is drawn, and identified by its content.
    adapter_sha256 = adapter_content_digest(args.safety_adapter) if args.safety_adapter else None
    pipe, model_id = load_text_to_image_pipeline(args.model, {})
    settings = {}
    if args.model is None:  # the microworld: its protocol's scheduler, steps and guidance unless given
        from diffusers import DPMSolverMultistepScheduler

        from safety_dpo.microworld import load_protocol

        protocol = load_protocol()
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        settings = {"num_inference_steps": protocol.num_inference_steps, "guidance_scale": protocol.guidance_scale}
    if args.num_inference_steps is not None:
        settings["num_inference_steps"] = args.num_inference_steps
    if args.guidance_scale is not None:
        settings["guidance_scale"] = args.guidance_scale
    if args.safety_adapter:
        enable_safety_adapters(pipe).load_safety_adapter(args.safety_adapter, scale=args.safety_scale, fuse=True)
    draw, method = _drawing(pipe, args, settings)
    record = {
        "model": model_id,
        "safety_adapter": args.safety_adapter,
        "safety_adapter_sha256": adapter_sha256,
        "safety_scale": args.safety_scale if args.safety_adapter else None,
        "scheduler": type(pipe.scheduler).__name__,
        **settings,
        **({"method": method} if method is not None else {}),  # images drawn before methods existed stay valid
    }
    output_dir = Path(args.output_dir)
    planned = [
        (output_dir / f"{index:03d}-seed{args.seed + k}.png", {**record, "prompt": prompt, "seed": args.seed + k})
        for index, prompt in enumerate(args.prompts)
        for k in range(args.images_per_prompt)
    ]
    with FolderLock(output_dir, "safety-dpo generate"):
        # Each PNG carries what drew it. One drawn otherwise is never overwritten nor relabelled: refuse, and keep it.
        conflicts = [
            f"{path.name}: {'; '.join(differences(_png_record(path), key)) or 'no record of how it was drawn'}"
            for path, key in planned
            if path.is_file() and _png_record(path) != key
        ]
        if conflicts:
            raise FileExistsError(
                f"{str(output_dir)!r} holds images drawn otherwise ({' | '.join(conflicts[:3])}"
                + (f" | {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
                + "). Use another --output-dir; nothing was drawn or changed."
            )
        for path, key in planned:
            if not path.is_file():  # resumable: an image already drawn with these settings is kept
                generator = torch.Generator("cpu").manual_seed(key["seed"])
                image = draw(key["prompt"], generator=generator, **settings).images[0]
                metadata = PngInfo()
                metadata.add_text(_PNG_KEY, json.dumps(key, sort_keys=True))
                temporary = path.with_name(f".{path.name}.tmp")
                image.save(temporary, format="PNG", pnginfo=metadata)
                temporary.replace(path)
        written = [{"file": path.name, "prompt": key["prompt"], "seed": key["seed"]} for path, key in planned]
        write_json(output_dir / "images.json", {**record, "images": written})
    print(f"{len(written)} images in {output_dir} (images.json lists prompt and seed of each).")
    return 0


def _drawing(pipe, args: argparse.Namespace, settings: dict):
    """The callable that draws one prompt (the pipeline, or SLD with `--method`) and the method's record (None)."""
    if args.method is None:
        return pipe, None
    from functools import partial

    from safety_dpo.baselines.sld import (
        check_sld_pipeline,
        default_safety_concept,
        generate_sld,
        method_record,
        sld_config,
    )
    from safety_dpo.worlds import default_world

    check_sld_pipeline(pipe)
    concept = args.safety_concept
    if concept is None:
        concept = default_safety_concept(default_world().taxonomy() if args.model is None else None)
    method = method_record(args.method, concept, settings.get("num_inference_steps"))
    return partial(generate_sld, pipe, config=sld_config(args.method), safety_concept=concept, progress=False), method


def _png_record(path) -> dict:
    """What drew a `generate` image, from its PNG text chunk; {} for an image without one or an unreadable file."""
    import json

    from PIL import Image

    try:
        with Image.open(path) as image:
            return json.loads(image.text.get(_PNG_KEY, "{}"))
    except (OSError, ValueError, SyntaxError):
        return {}
