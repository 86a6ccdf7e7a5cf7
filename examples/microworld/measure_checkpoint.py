"""Measure the microworld checkpoint under the protocol, and tune the protocol's sampler to it.

    # tune scheduler, steps and guidance on train-split prompts, then write protocol.json into the checkpoint
    python examples/microworld/measure_checkpoint.py --checkpoint DIR --tune
    # measure on the protocol's test-split prompt sets
    python examples/microworld/measure_checkpoint.py --checkpoint DIR --output runs/checkpoint_measurements.json

Tuning uses train-split prompts (one per concept, two seeds), so the test prompts stay untouched by the choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from safety_dpo.microworld import evaluate_pipeline, load_protocol, protocol_prompts, sample_prompts
from safety_dpo.microworld.evaluate import generate_images
from safety_dpo.microworld.protocol import Protocol

CANDIDATES = [
    ("DDIMScheduler", 25, 2.0),
    ("DDIMScheduler", 25, 4.0),
    ("DDIMScheduler", 25, 6.0),
    ("DPMSolverMultistepScheduler", 15, 2.0),
    ("DPMSolverMultistepScheduler", 15, 4.0),
    ("DPMSolverMultistepScheduler", 15, 6.0),
]


def tune(pipe, checkpoint: Path) -> Protocol:
    unsafe = sample_prompts("unsafe", "train", 56, seed=99) + sample_prompts(
        "unsafe", "train", 56, seed=98, names="held-out"
    )
    neutral = sample_prompts("neutral", "train", 48, seed=99)
    rows = []
    for scheduler, steps, guidance in CANDIDATES:
        protocol = dataclasses.replace(
            load_protocol(checkpoint), scheduler=scheduler, num_inference_steps=steps, guidance_scale=guidance
        )
        bad = evaluate_pipeline(pipe, unsafe, seeds=(0, 1), protocol=protocol, progress=False)
        good = evaluate_pipeline(pipe, neutral, seeds=(0, 1), protocol=protocol, progress=False)
        score = min(bad["concept_rate"], good["concept_rate"]) - good["ip"]
        rows.append((score, scheduler, steps, guidance, bad["concept_rate"], good["concept_rate"], good["ip"]))
        print(
            f"{scheduler:28s} steps={steps:3d} guidance={guidance:3.1f}  unsafe concept rate={bad['concept_rate']:.3f}  "
            f"fidelity={good['concept_rate']:.3f}  neutral IP={good['ip']:.3f}"
        )
    best = max(rows)
    protocol = dataclasses.replace(
        load_protocol(checkpoint), scheduler=best[1], num_inference_steps=best[2], guidance_scale=best[3]
    )
    protocol.save(checkpoint)
    print("chosen:", protocol.to_dict())
    return protocol


def speed(pipe, protocol: Protocol, batch_size: int = 16, batches: int = 4) -> float:
    prompts = [item.prompt for item in sample_prompts("neutral", "test", batch_size * batches, seed=5)]
    generate_images(pipe, prompts[:batch_size], (0,), protocol, batch_size, progress=False)  # warm-up
    started = time.perf_counter()
    generate_images(pipe, prompts, (0,), protocol, batch_size, progress=False)
    return len(prompts) / (time.perf_counter() - started)


def measure(pipe, checkpoint: Path) -> dict:
    protocol = load_protocol(checkpoint)
    results = {}
    for name, kind, names in (
        ("unsafe_trained_names", "unsafe", "trained"),
        ("unsafe_held_out_names", "unsafe", "held-out"),
        ("neutral", "neutral", "trained"),
    ):
        results[name] = evaluate_pipeline(
            pipe, protocol_prompts(kind, names=names, protocol=protocol), protocol=protocol
        )
    results["images_per_second_batch16"] = speed(pipe, protocol)
    results["torch_threads"] = torch.get_num_threads()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="Checkpoint folder (default: the shipped one).")
    parser.add_argument(
        "--tune", action="store_true", help="Choose scheduler, steps and guidance; write protocol.json."
    )
    parser.add_argument("--output", default="runs/checkpoint_measurements.json")
    args = parser.parse_args()
    from safety_dpo.microworld.checkpoint import checkpoint_path

    checkpoint = Path(args.checkpoint) if args.checkpoint else checkpoint_path()
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    if args.tune:
        tune(pipe, checkpoint)
        return
    results = measure(pipe, checkpoint)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    summary = {
        name: {
            key: value
            for key, value in metrics.items()
            if key not in ("concept_rate_per_concept", "protocol", "ip_per_category")
        }
        for name, metrics in results.items()
        if isinstance(metrics, dict)
    }
    print(json.dumps(summary, indent=2))
    print("images/s (batch 16):", round(results["images_per_second_batch16"], 2))


if __name__ == "__main__":
    main()
