"""Merge microworld safety experts by every Co-Merge variant and the baselines, and measure each merge.

    python examples/microworld/measure_merge.py --experts-dir runs/experts --categories violence,sexual,shocking \
        --output-dir runs/merge

`--experts-dir` holds one expert per category (`safety-dpo train --all-categories` writes that). For the base model,
each expert alone and each merge, the script measures IP on every category's unsafe test prompts (trained names)
and the concept rate on the neutral test prompts, under the microworld protocol. It resumes: merges already in
`OUTPUT_DIR/merged/<name>/` are reused and measurements already in `OUTPUT_DIR/measurements.json` are kept.
Writes `measurements.json` and `table.md` (the table of docs/merging.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from safety_dpo.merging import CoMergeConfig, co_merge
from safety_dpo.microworld import evaluate_pipeline, load_pipeline, protocol_prompts

VARIANTS = {
    f"co_merge {granularity}, {inputs}": {"granularity": granularity, "inputs": inputs}
    for granularity in ("row", "element", "lora_factor")
    for inputs in ("shared", "own_category", "with_expert")
} | {method: {"method": method} for method in ("cat", "ties", "dare_ties")}


def measure(pipe, categories: list[str]) -> dict:
    results = {"ip": {}}
    for category in categories:
        metrics = evaluate_pipeline(pipe, protocol_prompts("unsafe", categories=[category]), progress=False)
        results["ip"][category] = metrics["ip"]
    neutral = evaluate_pipeline(pipe, protocol_prompts("neutral"), progress=False)
    results["neutral_concept_rate"] = neutral["concept_rate"]
    results["neutral_fd_judge"] = neutral["fd_judge"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts-dir", required=True)
    parser.add_argument("--categories", default="violence,sexual,shocking")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--variants", default=None, help="Comma-separated subset of the variant names.")
    parser.add_argument("--num-timesteps", type=int, default=None, help="CoMergeConfig.num_timesteps")
    args = parser.parse_args()
    categories = args.categories.split(",")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "measurements.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    experts = [Path(args.experts_dir) / category for category in categories]
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def record(name: str, adapter_dir: Path | None, merge_seconds: float | None = None) -> None:
        if name in results:
            return
        if adapter_dir is not None:
            pipe.load_lora_weights(str(adapter_dir), adapter_name="measured")
        try:
            results[name] = {**measure(pipe, categories), "merge_seconds": merge_seconds}
        finally:
            if adapter_dir is not None:
                pipe.delete_adapters("measured")
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps(results[name]))

    record("base", None)
    for category, expert in zip(categories, experts, strict=True):
        record(f"expert {category}", expert)
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    for name in chosen:
        merged_dir = output_dir / "merged" / name.replace(" ", "_").replace(",", "")
        seconds = None
        if not (merged_dir / "safety_dpo.json").is_file():
            settings = dict(VARIANTS[name])
            if args.num_timesteps:
                settings["num_timesteps"] = args.num_timesteps
            start = time.perf_counter()
            merged = co_merge(experts, CoMergeConfig(**settings))
            seconds = round(time.perf_counter() - start, 1)
            merged.save_pretrained(merged_dir)
        record(name, merged_dir, seconds)
    (output_dir / "table.md").write_text(table(results, categories) + "\n")
    print(table(results, categories))


def table(results: dict, categories: list[str]) -> str:
    base = results["base"]
    header = "| model | " + " | ".join(f"IP {c} (x own expert)" for c in categories)
    lines = [header + " | worst IP ratio | neutral fidelity (x base) | fd_judge neutral | merge time |"]
    lines.append("| --- " * (len(categories) + 5) + "|")
    for name, row in results.items():
        cells, ratios = [], []
        for category in categories:
            ip = row["ip"][category]
            expert_ip = results.get(f"expert {category}", {}).get("ip", {}).get(category)
            ratio = ip / expert_ip if expert_ip else None
            if name not in ("base", f"expert {category}") and ratio is not None:
                ratios.append(ratio)
            cells.append(f"{ip:.3f}" + (f" ({ratio:.2f}x)" if ratio is not None and name != "base" else ""))
        fidelity = row["neutral_concept_rate"] / base["neutral_concept_rate"]
        worst = f"{max(ratios):.2f}x" if ratios and len(ratios) == len(categories) else ""
        seconds = f"{row['merge_seconds']} s" if row.get("merge_seconds") is not None else ""
        fid = row["neutral_fd_judge"]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {worst} | {row['neutral_concept_rate']:.3f} ({fidelity:.2f}x) "
            f"| {fid:.1f} | {seconds} |"
        )
    lines.append(f"\nthreads: {torch.get_num_threads()}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
