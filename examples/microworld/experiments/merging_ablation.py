"""Experiment 1, the merging ablation: do per-category experts merged with Co-Merge beat one LoRA on everything?

    python examples/microworld/experiments/merging_ablation.py --output-dir runs/exp-merging \
        --dataset safety-dpo-align/data --experts-dir safety-dpo-align/experts

Measured, all seven categories, protocol seeds, test prompts: each expert alone; "All-single", one LoRA trained on
every category with the experts' total steps (7 x 300); Co-Merge in each variant (granularity x inputs); the
baselines linear (the sum and the mean of the deltas), TIES and DARE-TIES. Experts found in `--experts-dir` (a `safety-dpo align` run's) are reused,
missing ones trained. Writes OUTPUT_DIR/table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

VARIANTS = {
    f"co_merge {granularity}/{inputs}": {"granularity": granularity, "inputs": inputs}
    for granularity in ("row", "element", "lora_factor")
    for inputs in ("shared", "own_category", "with_expert")
} | {
    "linear": {"method": "cat"},  # the sum of the deltas: K times the strength of one expert
    "linear mean": {"method": "cat", "weights": "mean"},  # their average, at one expert's strength
    "ties": {"method": "ties"},
    "dare_ties": {"method": "dare_ties"},
}

COLUMNS = {
    "name": "model",
    "ip_trained": "IP trained",
    "ip_held_out": "IP held-out",
    "neutral_fidelity_ratio": "neutral fidelity / base",
    "fd_judge": "fd_judge",
    "prompt_agreement_neutral": "prompt agreement (neutral)",
    "data_free_disagreement": "winners moved by the data",
}


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("/", "-")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--experts-dir", type=Path, help="One expert per category to reuse (default: trained here).")
    parser.add_argument("--variants", help="Comma-separated subset of the merge variants (default: all).")
    parser.add_argument("--skip-all-single", action="store_true", help="Leave out All-single (one LoRA on all).")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    categories = common.categories_of(args)
    out = args.output_dir
    dataset = args.dataset or common.build_data(out / "data", categories, args.pairs_per_concept)
    settings = common.training(args)
    experts_dir = args.experts_dir or out / "experts"
    experts = [common.train_expert(dataset, experts_dir / c, [c], settings) for c in categories]
    all_single = None
    if not args.skip_all_single:
        all_single = common.train_expert(
            dataset, out / "all-single", categories, {**settings, "max_steps": settings["max_steps"] * len(categories)}
        )
    prompts = common.protocol_prompt_set(categories, args.limit)
    base_dir = out / "eval" / "base"
    rows = [common.row("base", common.evaluate(None, out, prompts, base_dir), variant="base")]
    candidates = {f"expert {c}": expert for c, expert in zip(categories, experts, strict=True)}
    if all_single is not None:
        candidates["All-single"] = all_single
    for name in chosen:
        config = {"calibration_dataset": str(dataset), **VARIANTS[name]}
        candidates[name] = common.merge(experts, out / "merged" / slug(name), **config)
    for name, adapter in candidates.items():
        results = common.evaluate(adapter, out / "eval" / slug(name), prompts, base_dir)
        # Co-Merge's share of winners that differ from the data-free (magnitude) pick, from the merge's report.
        report = json.loads((adapter / "safety_dpo.json").read_text()).get("merge_report", {})
        rows.append(common.row(name, results, data_free_disagreement=report.get("data_free_disagreement")))
    columns = {**COLUMNS, **{f"ip_{c}": f"IP {c}" for c in categories}}
    for entry in rows:
        entry.update({f"ip_{c}": value for c, value in entry["ip_per_category"].items()})
    command = "python examples/microworld/experiments/merging_ablation.py " + " ".join(argv or sys.argv[1:])
    markdown = common.write_table(out, "Merging ablation", command, rows, columns)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
