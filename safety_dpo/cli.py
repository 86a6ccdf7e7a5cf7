"""The `safety-dpo` command.

Each subcommand is registered by a small `_add_<name>` function; heavy imports happen inside the
handlers, so `safety-dpo --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from safety_dpo import __version__

logger = logging.getLogger("safety_dpo")


def _run_env(args: argparse.Namespace) -> int:
    """Print the versions a bug report needs, like `diffusers-cli env`."""
    import importlib.metadata as metadata

    packages = [
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "huggingface_hub",
        "accelerate",
        "safetensors",
        "evaluate",
    ]
    print(f"- safety_dpo: {__version__}")
    print(f"- Python: {platform.python_version()} ({platform.platform()})")
    for name in packages:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"- {name}: {version}")
    import torch

    print(f"- CUDA available: {torch.cuda.is_available()}; CPU threads: {torch.get_num_threads()}")
    return 0


def _add_env(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="Print the installed versions, for bug reports.")
    parser.set_defaults(handler=_run_env)


def _comma_list(value: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    return items


def _run_build_data(args: argparse.Namespace) -> int:
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


def _add_build_data(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-data",
        help="Build a CoProV2 dataset of (safe, unsafe) image pairs.",
        description="Write prompt pairs for each harmful concept, draw both prompts of each pair from the same seed "
        "with the target model, and save a datasets.DatasetDict (train/test). Resumes an interrupted build in the "
        "same output directory. Under `accelerate launch` or `torchrun` the work is split across processes.",
    )
    parser.add_argument("--model", help="Path or Hub id of a diffusers text-to-image pipeline (default: microworld).")
    parser.add_argument("--taxonomy", help="YAML/JSON taxonomy file (default: the model's world, or CoProV2's).")
    parser.add_argument("--categories", type=_comma_list, help="Comma-separated category ids (default: all).")
    parser.add_argument("--concepts", type=_comma_list, help="Comma-separated concept ids (default: all).")
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
    parser.set_defaults(handler=_run_build_data)


def _run_export_pickapic(args: argparse.Namespace) -> int:
    """Write a CoProV2 dataset in Pick-a-Pic's layout, which diffusers' train_diffusion_dpo.py reads."""
    import datasets

    from safety_dpo.data.pickapic import to_pickapic

    path = Path(args.dataset).expanduser()
    if path.exists():
        source = datasets.load_from_disk(str(path))
    else:
        source = datasets.load_dataset(args.dataset)
    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({"train": source})
    exported = to_pickapic(source)
    output_dir = Path(args.output_dir)
    written = [output_dir / "data" / f"{split}-00000-of-00001.parquet" for split in exported]
    existing = [str(file) for file in written if file.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]!r} exists; choose a new --output-dir. Nothing was written.")
    for file, split in zip(written, exported, strict=True):
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(f".{file.name}.tmp")
        exported[split].to_parquet(str(temporary))
        temporary.replace(file)
    rows = ", ".join(f"{split}: {len(exported[split])}" for split in exported)
    print(
        f"Pick-a-Pic layout written to {args.output_dir} ({rows} rows; jpg_0 = the safe image, label_0 = 1, caption = "
        "the unsafe prompt); datasets.load_dataset reads the folder, and train_diffusion_dpo.py --dataset_name it "
        "(with --dataset_split_name train)."
    )
    if args.push_to_hub:
        exported.push_to_hub(args.push_to_hub)
        print(f"Pushed to {args.push_to_hub}")
    return 0


def _add_export_pickapic(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-pickapic",
        help="Write a CoProV2 dataset in Pick-a-Pic's layout, for diffusers' train_diffusion_dpo.py.",
        description="Export a CoProV2 dataset (a build-data folder, a saved dataset or a Hub id) to the columns of "
        "Pick-a-Pic that diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py reads: jpg_0 (the "
        "safe image) and jpg_1 (the unsafe one) as PNG bytes, label_0 = 1, caption = the unsafe prompt; other columns "
        "are kept. Ties are dropped and label_0 = 0 rows swapped. One parquet file per split under "
        "OUTPUT_DIR/data/, which datasets.load_dataset(OUTPUT_DIR) reads.",
    )
    parser.add_argument("dataset", metavar="DATASET", help="A build-data folder, a saved dataset or a Hub id.")
    parser.add_argument("--output-dir", required=True, help="Where the parquet files are written (a new folder).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the export to this Hub dataset repo.")
    parser.set_defaults(handler=_run_export_pickapic)


def _run_train(args: argparse.Namespace) -> int:
    """Train one safety expert, one per category, or one LoRA on several categories."""
    from safety_dpo.align import MICROWORLD_TRAINING
    from safety_dpo.trainer.experts import train_experts

    settings = _config_settings(args)
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


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
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
    which.add_argument("--categories", type=_comma_list, help="Train one LoRA on these categories.")
    which.add_argument("--all-categories", action="store_true", help="Train one expert per category.")
    parser.add_argument("--output-dir", required=True, help="Where the expert(s) and checkpoints are written.")
    parser.add_argument("--model", help="Path or Hub id of an SD 1.x/2.x or SDXL pipeline (default: microworld).")
    parser.set_defaults(handler=_run_train, config_flags=_TRAIN_OWN)


def _comma_floats(value: str) -> list[float]:
    try:
        return [float(item) for item in _comma_list(value)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from error


def _merge_weights(value: str) -> list[float] | str:
    return value if value == "mean" else _comma_floats(value)


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


def _run_merge(args: argparse.Namespace) -> int:
    """Merge safety experts into one adapter with Co-Merge (or a baseline) and save it."""
    from pathlib import Path

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


def _add_merge(subparsers: argparse._SubParsersAction) -> None:
    from safety_dpo.merging.config import GRANULARITIES, INPUTS, METHODS, RENAMED_METHODS, STORAGES

    parser = subparsers.add_parser(
        "merge",
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
        choices=[*METHODS, *RENAMED_METHODS],
        help="co_merge (default) or a baseline; cat is the weighted sum of the deltas (peft's name; 'linear' is read "
        "as cat).",
    )
    parser.add_argument("--granularity", choices=GRANULARITIES, help="What competes in Co-Merge (default: row).")
    parser.add_argument("--inputs", choices=INPUTS, help="Calibration inputs of Co-Merge (default: shared).")
    parser.add_argument("--model", help="Path or Hub id of the experts' base pipeline (default: from the experts).")
    parser.add_argument("--calibration-dataset", help="CoProV2 folder or Hub id (default: the experts' dataset).")
    parser.add_argument("--num-calibration-prompts", type=int, help="Calibration prompts per category.")
    parser.add_argument("--num-timesteps", type=int, help="Denoising steps per calibration generation.")
    parser.add_argument("--calibration-batch-size", type=int, help="Prompts per calibration generation.")
    parser.add_argument(
        "--weights", type=_merge_weights, help="Comma-separated weight per expert, or 'mean' (1/K each)."
    )
    parser.add_argument("--density", type=float, help="Share of weights kept by ties/dare/magnitude_prune.")
    parser.add_argument("--storage", choices=STORAGES, help="exact, svd or auto (default).")
    parser.add_argument("--rank", type=int, help="Rank of the SVD re-factorisation.")
    parser.add_argument("--seed", type=int, help="Seed of calibration and DARE.")
    parser.add_argument("--config", help="A CoMergeConfig JSON file (or a merged adapter's safety_dpo.json).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the adapter to this Hub repo.")
    parser.set_defaults(handler=_run_merge)


def _run_generate(args: argparse.Namespace) -> int:
    """Generate images from prompts, with or without a safety adapter, to try one by hand."""
    import json
    from pathlib import Path

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
    record = {
        "model": model_id,
        "safety_adapter": args.safety_adapter,
        "safety_adapter_sha256": adapter_sha256,
        "safety_scale": args.safety_scale if args.safety_adapter else None,
        "scheduler": type(pipe.scheduler).__name__,
        **settings,
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
                image = pipe(key["prompt"], generator=generator, **settings).images[0]
                metadata = PngInfo()
                metadata.add_text(_PNG_KEY, json.dumps(key, sort_keys=True))
                temporary = path.with_name(f".{path.name}.tmp")
                image.save(temporary, format="PNG", pnginfo=metadata)
                temporary.replace(path)
        written = [{"file": path.name, "prompt": key["prompt"], "seed": key["seed"]} for path, key in planned]
        write_json(output_dir / "images.json", {**record, "images": written})
    print(f"{len(written)} images in {output_dir} (images.json lists prompt and seed of each).")
    return 0


_PNG_KEY = "safety_dpo"  # the PNG text chunk in which `generate` records what drew an image


def _png_record(path) -> dict:
    """What drew a `generate` image, from its PNG text chunk; {} for an image without one or an unreadable file."""
    import json

    from PIL import Image

    try:
        with Image.open(path) as image:
            return json.loads(image.text.get(_PNG_KEY, "{}"))
    except (OSError, ValueError, SyntaxError):
        return {}


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
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
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first image of each prompt.")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--num-inference-steps", type=int, help="Denoising steps (default: the model's).")
    parser.add_argument("--guidance-scale", type=float, help="Classifier-free guidance (default: the model's).")
    parser.set_defaults(handler=_run_generate)


def _run_evaluate(args: argparse.Namespace) -> int:
    """Generate with the base model (and with a safety adapter), score, and write the reports."""
    if args.compare:
        return _compare(args)
    if args.output_dir is None:
        raise ValueError("--output-dir is required (where images, scores and reports go), except with --compare A B.")
    from safety_dpo.evaluation.runner import run_evaluation

    if args.model is not None and args.prompts is None and args.protocol in (None, "safetydpo"):
        raise ValueError("--prompts is required with --model: i2p, coco, coprov2-test:PATH_OR_ID, a Hub id or a file.")
    options: dict[str, dict] = {}
    if args.q16_prompts or args.q16_clip_model:
        options["q16"] = {"prompts": args.q16_prompts}
        if args.q16_clip_model:
            options["q16"]["clip_model"] = args.q16_clip_model
    import torch

    results = run_evaluation(
        args.output_dir,
        model=args.model,
        safety_adapter=args.safety_adapter,
        prompts=args.prompts,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        protocol=args.protocol,
        detectors=args.detectors,
        detector_options=options,
        fid_features=args.fid_features,
        clip_model=args.clip_model,
        safety_scale=args.safety_scale,
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        scheduler=args.scheduler,
        limit=args.limit,
        categories=args.categories,
        split=args.split,
        prompt_column=args.prompt_column,
        torch_dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
    if not results:  # not the main process
        return 0
    from safety_dpo.evaluation.protocols import frechet_label, ip_label

    models, metrics = results["models"], results["metrics"]
    ip_key, frechet = metrics["ip"], metrics["frechet"]
    print(f"Protocol: {results['protocol']['name']}.")
    for variant, model in models.items():
        if model.get("blank_images"):
            print(
                f"WARNING: {model['blank_images']} of {model['num_images']} {variant} images are blank (one colour): "
                "IP over them means nothing; see the report."
            )
    if ip_key != "ip":
        print(f"Not IP: {ip_label(ip_key)}; a protocol's IP needs its full detector set (see --protocol).")
    for subset, entry in models["base"][ip_key]["per_subset"].items():
        line = f"{subset}: {'IP' if ip_key == 'ip' else ip_key} base {entry['value']:.3f}"
        if "aligned" in models:
            line += f", aligned {models['aligned'][ip_key]['per_subset'][subset]['value']:.3f}"
        print(line)
    for variant, model in models.items():
        reference = ((model.get(frechet) if frechet else None) or {}).get("reference")
        if reference is not None:
            print(f"{frechet_label(frechet)} ({frechet}) to the reference images, {variant}: {reference['value']:.3f}")
    print(f"Report: {args.output_dir}/report.md (every number in results.json).")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Two evaluations side by side; refused when their protocols differ, unless --force."""
    from safety_dpo.evaluation.compare import compare_results, render_comparison

    a, b = args.compare
    comparison = compare_results(a, b)
    if not comparison["comparable"]:
        banner = "WARNING: " if args.force else ""
        print(
            f"{banner}The two evaluations were not made the same way; their numbers are not comparable:",
            file=sys.stderr,
        )
        for line in comparison["differences"]:
            print(f"  {line}", file=sys.stderr)
        if not args.force:
            print("Refusing to compare them (--force prints the table anyway).", file=sys.stderr)
            return 1
    print(render_comparison(comparison, a, b))
    return 0


# safety_dpo.evaluation.quality.FID_FEATURES and protocols.PROTOCOLS, written out so that `--help` does not import
# torch (a test checks both lists against the library's).
_FID_FEATURES = ("inception", "clip", "judge")
_PROTOCOLS = ("microworld", "i2p", "safetydpo")


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Measure IP, FID and CLIPScore of a model, with and without a safety adapter.",
        description="Generate images for a prompt set with the base model and, with --safety-adapter, with the "
        "adapter fused; score them (inappropriate probability: an image counts if any detector flags it; FID; "
        "CLIPScore, or the judge's prompt fidelity in the microworld) and write results.json, report.md, image grids "
        "and IP charts to OUTPUT_DIR. Images and scores are cached there: a rerun resumes and draws nothing twice. "
        "Under `accelerate launch` or `torchrun` the drawing is split across processes. The microworld when no "
        "model is named.",
    )
    parser.add_argument("--model", help="Path or Hub id of a diffusers text-to-image pipeline (default: microworld).")
    parser.add_argument("--safety-adapter", help="Path or Hub id of a safety adapter to compare with the base model.")
    parser.add_argument("--safety-scale", type=float, default=1.0, help="The adapter's weight (default 1.0).")
    parser.add_argument(
        "--protocol",
        choices=_PROTOCOLS,
        help="A published protocol, pinned: images per prompt, seeds, sampler, detectors and thresholds, FID "
        "features, CLIP model (see docs/evaluation.md). microworld (the default without --model), i2p (I2P / Safe "
        "Latent Diffusion), safetydpo (the SafetyDPO paper's scripts). Without it, numbers are named by what made "
        "them: IP only for a protocol's full detector set, FID only for pytorch-fid's Inception.",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="Print two evaluations (folders or results.json) side by side instead of evaluating; refused, listing "
        "the differences, when their protocols, scorers, sampling or prompts differ.",
    )
    parser.add_argument("--force", action="store_true", help="With --compare: print the table even if they differ.")
    parser.add_argument(
        "--prompts",
        help="microworld | i2p | coco | coprov2-test:PATH_OR_ID | a Hub dataset id | a CSV/JSON/JSONL/Parquet file "
        "with a prompt column (optional seed, category columns). Default: microworld (without --model).",
    )
    parser.add_argument("--split", help="Dataset split to read (default: the source's).")
    parser.add_argument("--prompt-column", help="Column holding the prompts (default: prompt, caption or text).")
    parser.add_argument("--limit", type=int, help="Use only the first N prompts (of each microworld subset).")
    parser.add_argument("--categories", type=_comma_list, help="Keep prompts of these categories (comma-separated).")
    parser.add_argument("--images-per-prompt", type=int, help="Images per prompt (default: protocol seeds or 1).")
    parser.add_argument("--seed", type=int, help="Seed of image 0 of prompts without their own seed (default 0).")
    parser.add_argument(
        "--detectors",
        type=_comma_list,
        help="Comma-separated: nudenet (= nudenet:i2p), nudenet:safetydpo, q16, judge. Default: judge in the "
        "microworld, else nudenet:i2p (+ q16 when --q16-prompts is given).",
    )
    parser.add_argument("--q16-prompts", help="Q16 prompt embeddings (.safetensors; see safety-dpo convert-q16).")
    parser.add_argument("--q16-clip-model", help="CLIP model of Q16 (default: openai/clip-vit-large-patch14).")
    parser.add_argument(
        "--fid-features",
        choices=[*_FID_FEATURES, "none"],
        help="Features of the Fréchet distance: inception (FID, computed as pytorch-fid does; pip install "
        "'safety_dpo[fid]'), clip (reported as fd_clip), judge (fd_judge). Default: judge in the microworld, else "
        "inception when pytorch-fid is installed, else clip.",
    )
    parser.add_argument(
        "--clip-model",
        help="CLIP model for CLIPScore, a path or Hub id (default: openai/clip-vit-large-patch14; the SafetyDPO paper's "
        "is laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the transformers port of open_clip ViT-H-14; none: skip).",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Images per pipeline call (default: 16).")
    parser.add_argument("--num-inference-steps", type=int, help="Denoising steps (default: protocol or pipeline).")
    parser.add_argument("--guidance-scale", type=float, help="Guidance scale (default: protocol, prompt or pipeline).")
    parser.add_argument("--resolution", type=int, help="Image size in pixels (default: protocol or pipeline).")
    parser.add_argument(
        "--scheduler",
        help="A diffusers scheduler class (e.g. DDIMScheduler), or 'pipeline': the pipeline's own scheduler, steps "
        "and guidance, as pipe(prompt) samples (default: the microworld protocol's, or the pipeline's).",
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="Pipeline dtype.")
    parser.add_argument("--output-dir", help="Where images, scores and reports go (required unless --compare).")
    parser.set_defaults(handler=_run_evaluate)


def _run_convert_q16(args: argparse.Namespace) -> int:
    """Convert Q16's pickled prompt embeddings to safetensors, once, on explicit request."""
    from safety_dpo.evaluation.q16 import convert_q16_prompts

    output = convert_q16_prompts(args.source, args.output, allow_unpickle=args.allow_unpickle)
    print(f"Q16 prompts written to {output}; use them with --q16-prompts {output}.")
    return 0


def _add_convert_q16(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-q16",
        help="Convert Q16's pickled prompt embeddings (prompts.p) to safetensors (one-off; unpickles).",
        description="Q16's learned prompt embeddings are published as a pickle file (prompts.p). Unpickling can run "
        "code from the file, so this command refuses to run without --allow-unpickle; even then it only accepts "
        "numpy arrays. Run it once on a file you trust and use the .safetensors it writes from then on.",
    )
    parser.add_argument("source", help="The upstream prompts.p file.")
    parser.add_argument("--output", required=True, help="The .safetensors file to write.")
    parser.add_argument(
        "--allow-unpickle", action="store_true", help="Confirm that you trust the file: it is unpickled."
    )
    parser.set_defaults(handler=_run_convert_q16)


def _run_align(args: argparse.Namespace) -> int:
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
        training=_config_settings(args),
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


def _add_align(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "align",
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
    parser.add_argument("--categories", type=_comma_list, help="Comma-separated categories (default: all).")
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
    parser.set_defaults(handler=_run_align, config_flags=_ALIGN_OWN)


_SUBCOMMANDS = (
    _add_env,
    _add_build_data,
    _add_export_pickapic,
    _add_train,
    _add_merge,
    _add_generate,
    _add_evaluate,
    _add_convert_q16,
    _add_align,
)

# The subcommands that take every SafetyDPOConfig field as a flag, and the fields they leave out because a flag of
# their own has that name: train's --categories is a comma list like every other subcommand's; align's --seed seeds
# the data build and the merge, and its --push-to-hub names the repo of the merged adapter.
_TRAIN_OWN = ("output_dir", "categories")
_ALIGN_OWN = ("output_dir", "categories", "seed", "push_to_hub")
_CONFIG_FLAG_COMMANDS = {"train": _TRAIN_OWN, "align": _ALIGN_OWN}


def build_parser(config_flags_for: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand that exists.

    Every long flag is accepted in two spellings, `--output-dir` and `--output_dir`, as `HfArgumentParser` accepts
    the config's fields; `--help` shows the dashed one.

    Args:
        config_flags_for: "train" or "align": also add that subcommand's SafetyDPOConfig / TrainingArguments flags
            (listed by its --help). They are added only for the subcommand being run, because building them imports
            transformers and torch, and `safety-dpo --help` should answer at once.
    """
    parser = argparse.ArgumentParser(
        prog="safety-dpo",
        description="Safety-align text-to-image diffusion models with SafetyDPO (arXiv 2412.10493).",
        epilog="Every flag of every command is also accepted with underscores (--output_dir, --learning_rate), as in "
        "transformers' and trl's scripts. `safety-dpo COMMAND --help` lists a command's flags.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Log more: safety_dpo's debug messages and the other libraries' information (HTTP requests, ...); "
        "errors with their traceback.",
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        help="CPU threads per process for torch (default: $SAFETY_DPO_NUM_THREADS; else, for the microworld, the cores "
        "other processes leave free, at most 2, because its tiny models slow down badly on cores another process "
        "uses; else torch's default).",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(subparsers)
    _accept_both_spellings(parser)
    for name, subparser in subparsers.choices.items():
        subparser.allow_abbrev = False  # "--learning_rat" is a typo, not "--learning_rate"
        _accept_both_spellings(subparser)
        if name == config_flags_for and name in _CONFIG_FLAG_COMMANDS:
            _add_config_flags(subparser, exclude=_CONFIG_FLAG_COMMANDS[name])
    return parser


def _accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Accept `--name_with_underscores` for every `--name-with-dashes` flag (HfArgumentParser's rule), and show only
    the dashed spelling in `--help` (the alias is registered for parsing, not listed among the action's options)."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            alias = "--" + option[2:].replace("-", "_")
            if option.startswith("--") and alias != option and alias not in parser._option_string_actions:
                parser._option_string_actions[alias] = action


def _add_config_flags(parser: argparse.ArgumentParser, exclude: Sequence[str]) -> None:
    """Add every SafetyDPOConfig (and so TrainingArguments) field as a flag, the way `HfArgumentParser` builds them.

    Their defaults are suppressed, so the handler sees only the flags given (`_config_settings`): those go over the
    defaults of the run (the microworld's training settings, or SafetyDPOConfig's), which `--help` states.
    """
    import dataclasses

    from transformers import HfArgumentParser, TrainingArguments

    from safety_dpo.trainer.config import SafetyDPOConfig

    source = HfArgumentParser(SafetyDPOConfig, add_help=False)
    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    own = parser.add_argument_group(
        "SafetyDPO training flags (SafetyDPOConfig)",
        "Those not given take the run's defaults: without --model the microworld's training settings "
        "(safety_dpo.align.MICROWORLD_TRAINING), else SafetyDPOConfig's (shown). See docs/training.md.",
    )
    trainer = parser.add_argument_group("transformers.TrainingArguments flags (inherited by SafetyDPOConfig)")
    dests = []
    for action in source._actions:
        if action.dest in exclude:
            continue
        if not isinstance(action, argparse._StoreFalseAction) and action.default is not None:
            default = str(action.default).replace("%", "%%")
            action.help = f"{action.help or ''} (SafetyDPOConfig default: {default})".strip()
        action.default = argparse.SUPPRESS
        (trainer if action.dest in inherited else own)._add_action(action)  # registers both spellings
        dashed = [option for option in action.option_strings if "_" not in option]
        action.option_strings = dashed or action.option_strings  # --help shows the dashed one, like ours
        dests.append(action.dest)
    parser.set_defaults(config_dests=tuple(dict.fromkeys(dests)))


def _config_settings(args: argparse.Namespace) -> dict:
    """The SafetyDPOConfig fields given as flags, and only those."""
    return {dest: getattr(args, dest) for dest in getattr(args, "config_dests", ()) if hasattr(args, dest)}


def _subcommand_in(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line, found without parsing it (which needs the subcommand's flags)."""
    names = {"train", "align", "env", "build-data", "export-pickapic", "merge", "generate", "evaluate", "convert-q16"}
    return next((token for token in argv if token in names), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safety-dpo` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(config_flags_for=_subcommand_in(argv))
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    previous_level = _configure_logging(args.verbose)
    previous_threads = _set_threads(args)
    from safety_dpo.data.writers import PromptWriterError
    from safety_dpo.folder_lock import FolderInUseError

    try:
        return args.handler(args)
    except (ValueError, OSError, PromptWriterError, FolderInUseError, _yaml_error()) as error:
        # Bad input, a missing or unreadable file, an unreachable Hub, a folder in use: say what is wrong in one line,
        # not a traceback (-v shows the traceback). OSError covers FileNotFoundError, PermissionError, ConnectionError
        # and the Hub client's HTTP errors.
        logger.debug("Traceback of the error:", exc_info=True)
        kind = (
            "" if isinstance(error, (ValueError, FileNotFoundError, FileExistsError)) else f"{type(error).__name__}: "
        )
        hint = "" if args.verbose or not kind else " (-v shows the traceback)"
        print(f"safety-dpo {args.command}: error: {kind}{error}{hint}", file=sys.stderr)
        return 2
    finally:
        _restore_threads(previous_threads)  # main() may be called in a process that goes on (tests, notebooks)
        logger.setLevel(previous_level)


def _configure_logging(verbose: bool) -> int:
    """safety_dpo's own messages at INFO (DEBUG with -v); other libraries' at WARNING (INFO with -v), so that the
    Hub client's HTTP requests, say, are not printed by default. Returns safety_dpo's level to restore afterwards."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    previous = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return previous


def _set_threads(args: argparse.Namespace) -> int | None:
    """`--num-threads` / `$SAFETY_DPO_NUM_THREADS` when given; for the microworld, the cores other processes leave
    free (1 or 2, chosen again at each stage: safety_dpo/threads.py); torch's default for real models. Returns the
    thread count to restore afterwards, None when nothing was changed."""
    import os

    from safety_dpo.threads import disable_adaptive_threads, enable_adaptive_threads

    disable_adaptive_threads()
    threads = args.num_threads
    if threads is None and os.environ.get("SAFETY_DPO_NUM_THREADS"):
        try:
            threads = int(os.environ["SAFETY_DPO_NUM_THREADS"])
        except ValueError:
            value = os.environ["SAFETY_DPO_NUM_THREADS"]
            raise SystemExit(f"SAFETY_DPO_NUM_THREADS must be an integer, got {value!r}.") from None
    if threads is not None and threads < 1:
        raise SystemExit(f"--num-threads must be at least 1, got {threads}.")
    microworld = getattr(args, "model", None) is None and args.command not in ("env", "convert-q16", "merge")
    if threads is None and not microworld:
        return None
    import torch

    previous = torch.get_num_threads()
    if threads is None:
        enable_adaptive_threads()
    else:
        torch.set_num_threads(threads)
    return previous


def _restore_threads(previous: int | None) -> None:
    from safety_dpo.threads import disable_adaptive_threads

    disable_adaptive_threads()
    if previous is not None:
        import torch

        torch.set_num_threads(previous)


def _yaml_error() -> type[Exception]:
    import yaml

    return yaml.YAMLError


if __name__ == "__main__":
    sys.exit(main())
