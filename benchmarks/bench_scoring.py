"""Scoring throughput of the detectors (images/s), measured side by side in one run on the same images.

The images are microworld renders of unsafe and neutral test prompts, at the microworld's 32 px and enlarged to
512 px (Stable Diffusion 1.5's size: NudeNet letterboxes to 320 px either way, so only its preprocessing differs).
Each detector scores every image set `--repeats` times, the detectors taking turns; medians are printed.

    python benchmarks/bench_scoring.py                 # 2-core CPU: judge, NudeNet (i2p preset)
    python benchmarks/bench_scoring.py --images 512 --repeats 5

Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from PIL import Image

from safety_dpo.evaluation.detectors import load_detector
from safety_dpo.microworld import render, sample_prompts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="Images per set (default 256).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    half = args.images // 2
    prompts = sample_prompts("unsafe", "test", half, seed=0) + sample_prompts("neutral", "test", half, seed=0)
    small = [render(item.prompt, seed=index) for index, item in enumerate(prompts)]
    large = [image.resize((512, 512), Image.Resampling.BICUBIC) for image in small]
    setups = {
        "judge, 32 px": (load_detector("judge"), small),
        "nudenet:i2p, 32 px": (load_detector("nudenet:i2p"), small),
        "nudenet:i2p, 512 px": (load_detector("nudenet:i2p"), large),
    }
    for detector, images in setups.values():
        detector.detect(images[:16])  # warm-up: model loading, ONNX session
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, (detector, images) in setups.items():
            start = time.perf_counter()
            detector.detect(images)
            times[name].append(time.perf_counter() - start)
    results = {
        "device": f"cpu x{torch.get_num_threads()}",
        "images": len(small),
        "images_per_second": {
            name: round(len(small) / statistics.median(values), 1) for name, values in times.items()
        },
    }
    for name, rate in results["images_per_second"].items():
        print(f"{name}: {rate} images/s")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
