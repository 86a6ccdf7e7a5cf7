"""`safety-dpo evaluate`: IP, FID and CLIPScore of a model with and without a safety adapter, and `--compare`."""

from __future__ import annotations

import argparse
import sys

from safety_dpo.cli.arguments import comma_list

NAME = "evaluate"

# safety_dpo.evaluation.quality.FID_FEATURES and protocols.PROTOCOLS, written out so that `--help` does not import
# torch (a test checks both lists against the library's).
_FID_FEATURES = ("inception", "clip", "judge")
_PROTOCOLS = ("microworld", "i2p", "safetydpo")
_METHODS = ("sld-weak", "sld-medium", "sld-strong", "sld-max")  # safety_dpo.baselines.sld.METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME,
        help="Measure IP, FID and CLIPScore of a model, with and without a safety adapter.",
        description="Generate images for a prompt set with the base model and, with --safety-adapter, with the "
        "adapter fused (or, with --method, with a sampling-time baseline); score them (inappropriate probability: an "
        "image counts if any detector flags it; FID; CLIPScore, or the judge's prompt fidelity in the microworld) and "
        "write results.json, report.md, image grids "
        "and IP charts to OUTPUT_DIR. Images and scores are cached there: a rerun resumes and draws nothing twice. "
        "Under `accelerate launch` or `torchrun` the drawing is split across processes. The microworld when no "
        "model is named.",
    )
    parser.add_argument("--model", help="Path or Hub id of a diffusers text-to-image pipeline (default: microworld).")
    parser.add_argument("--safety-adapter", help="Path or Hub id of a safety adapter to compare with the base model.")
    parser.add_argument("--safety-scale", type=float, default=1.0, help="The adapter's weight (default 1.0).")
    parser.add_argument(
        "--method",
        choices=_METHODS,
        help="Compare the base model with a sampling-time baseline instead of an adapter: Safe Latent Diffusion "
        "(Schramowski et al., CVPR 2023) with the paper's weak, medium, strong or max preset, its warm-up scaled to "
        "the steps. Not with --safety-adapter.",
    )
    parser.add_argument(
        "--safety-concept",
        help="With --method: the text SLD guides away from (default: in the microworld the harmful concepts' trained "
        "names, else SLD's published concept).",
    )
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
    parser.add_argument("--categories", type=comma_list, help="Keep prompts of these categories (comma-separated).")
    parser.add_argument("--images-per-prompt", type=int, help="Images per prompt (default: protocol seeds or 1).")
    parser.add_argument("--seed", type=int, help="Seed of image 0 of prompts without their own seed (default 0).")
    parser.add_argument(
        "--detectors",
        type=comma_list,
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
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
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
        method=args.method,
        safety_concept=args.safety_concept,
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
