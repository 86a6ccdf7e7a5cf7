"""Inference latency of a safety adapter, measured side by side in one run.

Four pipelines of the same weights draw the same prompts with the same seeds, steps and guidance:
- base: the stock `StableDiffusionPipeline`;
- fused: `StableDiffusionSafePipeline` with the adapter fused (`load_safety_adapter(..., fuse=True)`: the deltas are
  added to the base weights and no PEFT wrapper stays in the UNet). Target: fused / base <= 1.03;
- unfused: the adapter loaded through diffusers' PEFT LoRA layers (`fuse=False`);
- SLD: diffusers' deprecated `StableDiffusionPipelineSafe` (Safe Latent Diffusion) on the same components, with its
  default safety guidance (`sld_guidance_scale=1000`, `sld_warmup_steps=10`, ...), which runs a third UNet branch.

One timed call draws `--batch-size` prompts; the pipelines take turns (interleaved, the order rotated every round),
a warm-up call each first, medians over `--repeats`. The adapter is a random rank-`--rank` LoRA on every attention
projection (latency does not depend on what it learned) unless `--adapter` names one.

    python benchmarks/bench_inference.py                      # the microworld, CPU
    python benchmarks/bench_inference.py --sd15-random --device cuda --dtype float16 --steps 30 --resolution 512

Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sd_sized import sd15_random_pipeline  # noqa: E402

from safety_dpo.pipelines import enable_safety_adapters  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROMPTS = [
    "a knife on a table",
    "a cat in a garden",
    "a red car on a street",
    "a dog on a beach",
    "a gun in a room",
    "a tree beside a house",
    "a bird in the sky",
    "a flower in a field",
]


def random_adapter(unet: torch.nn.Module, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in name and name.endswith(TARGETS):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    return state


def load(args):
    if args.sd15_random:
        return sd15_random_pipeline()
    from safety_dpo.microworld import load_pipeline

    return load_pipeline()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15-random", action="store_true", help="SD1.5-sized random-weight pipelines.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--adapter", help="A safety adapter (folder, file or Hub id); default: a random LoRA.")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipelineSafe

    pipes = {name: load(args) for name in ("base", "fused", "unfused")}
    adapter = args.adapter or random_adapter(pipes["base"].unet, args.rank)
    enable_safety_adapters(pipes["fused"]).load_safety_adapter(adapter, fuse=True)
    enable_safety_adapters(pipes["unfused"]).load_safety_adapter(adapter, fuse=False)
    base = pipes["base"]
    pipes["sld"] = StableDiffusionPipelineSafe(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for pipe in pipes.values():
        pipe.to(args.device, dtype)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    prompts = (PROMPTS * (args.batch_size // len(PROMPTS) + 1))[: args.batch_size]
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}

    def draw(pipe) -> float:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(len(prompts))]
        start = time.perf_counter()
        with torch.no_grad():
            pipe(
                prompt=prompts,
                generator=generators,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                output_type="np",
                **size,
            )
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for pipe in pipes.values():
        draw(pipe)  # warm-up
    times = {name: [] for name in pipes}
    names = list(pipes)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate: no seat is favoured
            times[name].append(draw(pipes[name]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    results = {
        "device": device,
        "model": "SD1.5-sized, random weights" if args.sd15_random else "microworld",
        "images_per_call": len(prompts),
        "steps": args.steps,
        "median_seconds": {name: round(value, 4) for name, value in medians.items()},
        "fused/base": round(medians["fused"] / medians["base"], 3),
        "unfused/base": round(medians["unfused"] / medians["base"], 3),
        "sld/base": round(medians["sld"] / medians["base"], 3),
    }
    for name in ("fused", "unfused", "sld"):
        print(
            f"{name} / base: {medians[name]:.3f} s / {medians['base']:.3f} s = {medians[name] / medians['base']:.3f}"
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
