"""Co-Merge cost against the number of experts, measured side by side in one run.

For each shared-input Co-Merge variant (granularity row, element and lora_factor, with inputs="shared"): the time of
a merge of 7 experts divided by the time of a merge of 1 expert, on the same calibration prompts and model. A merge
here is what `co_merge` runs after loading: the calibration generations with the statistics hooks on, and the merge
of every layer (selection, and the SVD where the variant needs one). The pipeline is loaded once, outside the timing.
`co_merge` itself skips calibration for a single expert (it wins everything); the benchmark calls the same two steps
directly so that the 1-expert merge pays for its calibration. Target: <= 1.5.

The experts are random rank-4 LoRAs on every attention projection of the UNet (what the paper trains), built in
code: a merge's cost does not depend on what the experts learned.

    python benchmarks/bench_merge.py                          # the microworld, CPU
    python benchmarks/bench_merge.py --sd15-random --device cuda --dtype float16

Medians over interleaved repetitions after a warm-up; timings are never asserted.
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

from safety_dpo.merging.calibration import calibration_groups, collect_statistics  # noqa: E402
from safety_dpo.merging.co_merge import merge_layers  # noqa: E402
from safety_dpo.merging.config import CoMergeConfig  # noqa: E402
from safety_dpo.merging.experts import LoraExpert  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROMPTS = [
    "a red circle on a blue background",
    "a dog in a park",
    "a green square beside a tree",
    "a cat on a table",
]


def random_experts(unet: torch.nn.Module, count: int, rank: int = 4, seed: int = 0) -> list[LoraExpert]:
    generator = torch.Generator().manual_seed(seed)
    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS) and ".attn" in name
    }
    experts = []
    for index in range(count):
        factors = {
            name: (
                torch.randn(module.out_features, rank, generator=generator) * 0.01,
                torch.randn(rank, module.in_features, generator=generator) * 0.01,
            )
            for name, module in layers.items()
        }
        experts.append(LoraExpert(name=f"expert {index}", layers=factors, metadata={"categories": [f"c{index}"]}))
    return experts


def merge_seconds(pipe, experts: list[LoraExpert], config: CoMergeConfig) -> float:
    start = time.perf_counter()
    groups = calibration_groups(experts, {None: PROMPTS * (config.calibration_batch_size // len(PROMPTS))}, "shared")
    stats = collect_statistics(pipe, experts, groups, config)
    merge_layers(experts, config, [1.0] * len(experts), stats)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15-random", action="store_true", help="SD1.5-sized random-weight pipeline.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--experts", type=int, default=7)
    parser.add_argument("--num-timesteps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="Calibration prompts (one generation).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.sd15_random:
        pipe = sd15_random_pipeline()
    else:
        from safety_dpo.microworld import load_pipeline

        pipe = load_pipeline()
    pipe.to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    experts = random_experts(pipe.unet, args.experts)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"}
    for granularity in ("row", "element", "lora_factor"):
        config = CoMergeConfig(
            granularity=granularity, num_timesteps=args.num_timesteps, calibration_batch_size=args.batch_size
        )
        merge_seconds(pipe, experts[:1], config)  # warm-up
        times = {1: [], args.experts: []}
        for _ in range(args.repeats):
            for count in times:
                times[count].append(merge_seconds(pipe, experts[:count], config))
        one, many = (statistics.median(times[count]) for count in times)
        results[granularity] = {
            "seconds_1_expert": round(one, 3),
            f"seconds_{args.experts}_experts": round(many, 3),
            "ratio": round(many / one, 3),
        }
        print(f"{granularity}: {args.experts} experts {many:.3f} s / 1 expert {one:.3f} s = {many / one:.2f}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
