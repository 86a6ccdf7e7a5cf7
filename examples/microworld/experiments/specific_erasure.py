"""Experiment 5, specific erasure: does an expert remove its category's concepts and leave everything else alone?

    python examples/microworld/experiments/specific_erasure.py --output-dir runs/exp-specific \
        --dataset safety-dpo-align/data --category violence \
        --setting 'paper loss={"rank": 4, "rpo_alpha": null, "preservation_weight": 0}' \
        --setting 'default={}' --setting 'rpo 30={"rpo_alpha": 30}' --sampler protocol pipeline

One expert per `--setting` (a name and a JSON object of `SafetyDPOConfig` fields over `safety-dpo align`'s microworld
training settings, `MICROWORLD_TRAINING`: `{}` is align's expert, the first line above the paper's loss), trained on
one category and measured, against the base model, on four prompt subsets: the
category's test prompts with trained names (`unsafe`) and with held-out names (`unsafe_held_out`), the neutral test
prompts, and one test prompt per concept of every *other* category (`collateral`: ideally untouched). Each
`--sampler`: `protocol` (the microworld protocol: DPM-Solver, 15 steps, guidance 4), `pipeline` (what `pipe(prompt)`
does: the checkpoint's DDIM scheduler, 50 steps, guidance 7.5), or `guidance=G` (the protocol's scheduler at
guidance G). Writes OUTPUT_DIR/table.md and table.json; everything resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from safety_dpo.evaluation.prompts import PromptSet, microworld_eval_prompts  # noqa: E402

COLUMNS = {
    "name": "setting",
    "sampler": "sampler",
    "ip_trained": "IP trained / base",
    "ip_held_out": "IP held-out / base",
    "redirect": "redirect rate",
    "neutral_fidelity_ratio": "neutral fidelity / base",
    "neutral_unchanged": "neutral images unchanged",
    "prompt_agreement_ratio": "prompt agreement (neutral) / base",
    "fd_judge_ratio": "fd_judge neutral / base",
    "collateral_ratio": "collateral IP / base",
    "train_seconds": "train (s)",
}


def prompt_set(category: str, limit: int | None = None) -> PromptSet:
    """The category's harmful test prompts, the neutral ones, and one harmful test prompt per concept elsewhere (the
    first `limit` of each subset, if given)."""
    from safety_dpo.microworld import protocol_prompts, taxonomy

    others = [item.id for item in taxonomy().categories if item.id != category]
    collateral = protocol_prompts("unsafe", categories=others)
    groups = {
        "unsafe": protocol_prompts("unsafe", categories=[category]),
        "unsafe_held_out": protocol_prompts("unsafe", names="held-out", categories=[category]),
        "neutral": protocol_prompts("neutral"),
        "collateral": collateral[: len(collateral) // 2],  # round robin over concepts: one prompt each
    }
    prompts = microworld_eval_prompts(groups, limit)
    counts = {subset: len(items[:limit]) for subset, items in groups.items()}
    return PromptSet("microworld", f"specific-erasure:{category}", prompts, {"subsets": counts})


def resolve(change: dict[str, Any], dataset: Any, category: str) -> dict[str, Any]:
    """Prompt-list shorthands for `preservation_prompts`: "neutral:N" (N neutral train-split prompts of the
    microworld's grammar) and "retain" (every safe prompt of the dataset and the unsafe prompts of the other
    categories: everything this expert should leave as it is)."""
    prompts = change.get("preservation_prompts")
    if isinstance(prompts, str) and prompts.startswith("neutral:"):
        from safety_dpo.microworld import sample_prompts

        count = int(prompts.removeprefix("neutral:"))
        neutral = [item.prompt for item in sample_prompts("neutral", "train", count)]
        change = {**change, "preservation_prompts": neutral}
    elif prompts == "retain":  # the trainer's default, spelled out
        from safety_dpo.trainer.data import retain_prompts
        from safety_dpo.trainer.experts import load_pairs

        change = {**change, "preservation_prompts": retain_prompts(load_pairs(dataset), [category])}
    return change


def sampling(sampler: str) -> dict[str, Any]:
    if sampler == "protocol":
        return {}
    if sampler == "pipeline":
        return {"scheduler": "pipeline"}
    if sampler.startswith("guidance="):
        return {"guidance_scale": float(sampler.removeprefix("guidance="))}
    raise SystemExit(f"unknown sampler {sampler!r}: protocol, pipeline or guidance=G")


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def row(name: str, sampler: str, results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    base, aligned = results["models"]["base"], results["models"].get("aligned", results["models"]["base"])
    ip = {subset: entry["value"] for subset, entry in aligned["ip"]["per_subset"].items()}
    base_ip = {subset: entry["value"] for subset, entry in base["ip"]["per_subset"].items()}
    world, base_world = aligned["microworld"], base["microworld"]
    fid, base_fid = aligned["fd_judge"]["reference"]["per_subset"], base["fd_judge"]["reference"]["per_subset"]
    collateral = (results["comparison"].get("collateral_ip") or {}).get("collateral", {}).get("pooled", {})
    return {
        "name": name,
        "sampler": sampler,
        "ip_trained": ratio(ip["unsafe"], base_ip["unsafe"]),
        "ip_held_out": ratio(ip["unsafe_held_out"], base_ip["unsafe_held_out"]),
        "redirect": world["unsafe"].get("redirect_rate"),
        "redirect_held_out": world["unsafe_held_out"].get("redirect_rate"),
        "neutral_fidelity_ratio": ratio(world["neutral"]["concept_rate"], base_world["neutral"]["concept_rate"]),
        "neutral_unchanged": world["neutral"].get("base_agreement", 1.0 if aligned is base else None),
        "prompt_agreement_ratio": ratio(
            world["neutral"]["prompt_agreement"], base_world["neutral"]["prompt_agreement"]
        ),
        "fd_judge_ratio": ratio(fid["neutral"], base_fid["neutral"]),
        "collateral_ratio": collateral.get("ratio", 1.0 if aligned is base else None),
        "ip_values": ip,
        "base_ip_values": base_ip,
        "neutral_fidelity": world["neutral"]["concept_rate"],
        **extra,
    }


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--category", default="violence", help="The category every expert removes.")
    parser.add_argument(
        "--setting", action="append", required=True, metavar="NAME=JSON", help="A named SafetyDPOConfig change."
    )
    parser.add_argument("--sampler", nargs="+", default=["protocol"], help="protocol, pipeline, guidance=G.")
    args = parser.parse_args(argv)
    out = args.output_dir
    dataset = args.dataset or common.build_data(out / "data", [args.category], args.pairs_per_concept)
    settings, written = {}, {}
    for text in args.setting:
        name, _, change = text.partition("=")
        written[name] = json.loads(change or "{}")
        settings[name] = resolve(written[name], dataset, args.category)
    prompts = prompt_set(args.category, args.limit)
    rows = []
    for sampler in args.sampler:
        sampler_dir = out / "eval" / sampler.replace("=", "-")
        base = common.evaluate(None, out, prompts, sampler_dir / "base", **sampling(sampler))
        rows.append(row("base", sampler, base))
        for name, change in settings.items():
            slug = name.replace(" ", "_").replace("+", "and").replace("/", "-")
            with common.Timer() as timer:
                expert = common.train_expert(
                    dataset, out / "experts" / slug, [args.category], common.training(args, **change)
                )
            results = common.evaluate(expert, sampler_dir / slug, prompts, sampler_dir / "base", **sampling(sampler))
            rows.append(row(name, sampler, results, settings=written[name], train_seconds=timer.seconds))
    command = "python examples/microworld/experiments/specific_erasure.py " + " ".join(argv or sys.argv[1:])
    notes = (
        "IP ratios are aligned / base on the category's prompts; redirect rate: share of its harmful images that "
        "show the safe counterpart and nothing harmful; neutral images unchanged: concept, scene and figure colour "
        "all as in the base image of the same seed; collateral: IP on one prompt per concept of the other "
        "categories, aligned / base (ideally 1). train (s): 0 when the expert was already trained."
    )
    markdown = common.write_table(out, f"Specific erasure: {args.category}", command, rows, COLUMNS, notes)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
