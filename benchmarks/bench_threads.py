"""Torch threads for the microworld, on an idle machine and on one shared with another busy process.

Draws the same microworld images with 1 thread, with torch's default (one per core), and with the default under
`OMP_WAIT_POLICY=PASSIVE` (OpenMP threads sleep instead of spinning while they wait), and with the CLI's choice
(safety_dpo/threads.py: the cores other processes leave free, at most 2), first alone, then while a
second process keeps every core busy (a matrix-multiply loop with torch's default threads, like another training
job). Each setting runs in a fresh process (torch's thread pool is fixed once used); the settings alternate and
each is measured `--rounds` times; medians of images per second.

    python benchmarks/bench_threads.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

DRAW = """
import json, sys, time, torch
threads = int(sys.argv[1])
if threads == -1:  # what the CLI does for the microworld: the cores other processes leave free
    from safety_dpo.threads import free_threads
    torch.set_num_threads(free_threads())
elif threads:
    torch.set_num_threads(threads)
from safety_dpo.microworld import load_pipeline, load_protocol, sample_prompts
from safety_dpo.data.generation import use_scheduler
pipe = load_pipeline()
protocol = load_protocol()
prompts = [item.prompt for item in sample_prompts("unsafe", "test", int(sys.argv[2]), seed=0)]
with use_scheduler(pipe, protocol.scheduler):
    pipe(prompts[:2], num_inference_steps=protocol.num_inference_steps, guidance_scale=protocol.guidance_scale)
    started = time.perf_counter()
    for start in range(0, len(prompts), 16):
        batch = prompts[start : start + 16]
        pipe(batch, num_inference_steps=protocol.num_inference_steps, guidance_scale=protocol.guidance_scale,
             generator=[torch.Generator().manual_seed(i) for i in range(len(batch))])
    seconds = time.perf_counter() - started
print(json.dumps({"threads": torch.get_num_threads(), "images_per_second": len(prompts) / seconds}))
"""

BUSY = """
import torch, time
a = torch.randn(512, 512)
end = time.time() + 3600
while time.time() < end:
    a = (a @ a).tanh()
"""


def draw(threads: int, images: int, env: dict[str, str]) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", DRAW, str(threads), str(images)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="Images per measurement (default 64).")
    parser.add_argument("--rounds", type=int, default=3, help="Measurements per setting (default 3).")
    args = parser.parse_args()
    cores = os.cpu_count()
    default = f"torch default ({torch_default()} threads)"
    settings = {
        "1 thread": (1, {}),
        default: (0, {}),
        f"{default}, OMP_WAIT_POLICY=PASSIVE": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
        "free cores (the CLI's choice for the microworld)": (-1, {}),
    }
    results: dict[str, dict[str, list[float]]] = {}
    for load in ("idle", "shared with a busy process"):
        busy = None
        if load != "idle":
            busy = subprocess.Popen([sys.executable, "-c", BUSY])
            time.sleep(2)
        try:
            for _ in range(args.rounds):
                for name, (threads, env) in settings.items():
                    rate = draw(threads, args.images, env)["images_per_second"]
                    results.setdefault(load, {}).setdefault(name, []).append(rate)
        finally:
            if busy is not None:
                busy.kill()
    print(f"{cores} cores; microworld, {args.images} images per measurement, medians of {args.rounds}:\n")
    print("| machine | " + " | ".join(settings) + " |")
    print("| --- | " + " | ".join("---" for _ in settings) + " |")
    for load, rates in results.items():
        medians = [statistics.median(rates[name]) for name in settings]
        print(f"| {load} | " + " | ".join(f"{value:.1f} img/s" for value in medians) + " |")


def torch_default() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    multiprocessing.freeze_support()
    main()
