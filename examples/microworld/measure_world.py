"""Measure the microworld's instruments: judge accuracy, and every metric on rendered (ground-truth) images.

    python examples/microworld/measure_world.py --output runs/world_measurements.json

Rendered images are the upper bound a generator can reach: IP of unsafe renders should be 1, fidelity 1,
IP of neutral renders 0, and the fd_judge of renders against renders of other seeds is the floor of the
distance between two samples of the same world.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safety_dpo.microworld import load_judge, load_protocol, protocol_prompts, render, score_images
from safety_dpo.microworld.judge_data import judge_report


def _rendered_metrics(kind: str, names: str = "trained") -> dict:
    protocol = load_protocol()
    items = protocol_prompts(kind, names=names)
    seeds = protocol.seeds
    images = [render(item.prompt, seed) for item in items for seed in seeds]
    # Reference: the same prompts with other seeds, so fd_judge measures two samples of one distribution.
    references = [render(item.prompt, seed + 1000) for item in items for seed in seeds]
    per_image = [item for item in items for _ in seeds]
    results = score_images(images, per_image, references)
    results.pop("concept_rate_per_concept", None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/world_measurements.json")
    parser.add_argument("--judge-images", type=int, default=8000, help="Rendered test-split scenes for the judge.")
    args = parser.parse_args()
    started = time.time()
    report = judge_report(load_judge(), args.judge_images, seed=7, split="test")
    measurements = {
        "judge": report,
        "rendered": {
            "unsafe_trained_names": _rendered_metrics("unsafe"),
            "unsafe_held_out_names": _rendered_metrics("unsafe", "held-out"),
            "safe": _rendered_metrics("safe"),
            "neutral": _rendered_metrics("neutral"),
        },
        "protocol": load_protocol().to_dict(),
        "seconds": round(time.time() - started, 1),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(measurements, indent=2) + "\n")
    summary = {key: value for key, value in report.items() if key != "per_concept"}
    print(json.dumps({"judge": summary, "rendered": measurements["rendered"]}, indent=2))


if __name__ == "__main__":
    main()
