"""Experiment 7, the baselines: SafetyDPO against ESD-u, UCE and SLD on all seven categories, in one harness.

    python examples/microworld/experiments/baselines.py --output-dir runs/exp-baselines \
        --safetydpo safety-dpo-align --all-single runs/exp-scaling-18/share-1/all-single

Every model is measured by the benchmark runner on the runner's default microworld test prompts and seeds (the same
sample as the headline table of docs/results.md), base images drawn once and shared. Rows:

- SafetyDPO: the `safety-adapter` of a `safety-dpo align` output folder (Co-Merge of seven experts); its wall time is
  the run's data + experts + merge stages (`align.json`).
- All-single: one LoRA trained on every category with the experts' total steps (an existing one, or trained here on
  the align run's data); wall time: the data stage + its `train_runtime`.
- ESD-u and UCE: `make_baseline` with the papers' settings (docs/baselines.md), erasing every harmful concept's
  trained names; wall time: the run that made the adapter.
- SLD weak / medium / strong / max: the base model sampled with safe guidance; no adapter, so no making time; the
  evaluation's drawing time shows its cost at inference.

`--collateral` adds the one-category comparison: each method asked to remove violence only, with the IP of the six
other categories (ideally unchanged). Writes table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

from safety_dpo.evaluation.runner import run_evaluation  # noqa: E402

SLD_PRESETS = ("sld-weak", "sld-medium", "sld-strong", "sld-max")
COLUMNS = {
    "name": "method",
    "ip_trained": "IP trained",
    "ip_held_out": "IP held-out",
    "neutral_fidelity_ratio": "neutral fidelity / base",
    "neutral_unchanged": "neutral unchanged",
    "neutral_ip": "neutral IP",
    "redirect": "redirect, trained / held-out",
    "fd_judge_ratio": "fd_judge neutral / base",
    "collateral_ratio": "collateral IP / base",
    "make_seconds": "time to make (s)",
    "evaluation_seconds": "evaluation (s)",
}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path, help="Where everything goes; reruns resume.")
    parser.add_argument(
        "--safetydpo", type=Path, help="A `safety-dpo align` output folder (for safetydpo, all-single)."
    )
    parser.add_argument("--all-single", type=Path, help="An All-single LoRA to reuse (default: trained here).")
    parser.add_argument("--methods", default="safetydpo,all-single,esd-u,uce," + ",".join(SLD_PRESETS))
    parser.add_argument("--collateral", action="store_true", help="Also each method on violence alone.")
    parser.add_argument("--limit", type=int, help="Evaluate only the first N test prompts per subset (tests).")
    parser.add_argument("--esd-iterations", type=int, help="ESD-u iterations (default: ESDConfig's).")
    args = parser.parse_args(argv)
    out = args.output_dir
    methods = args.methods.split(",")
    if args.safetydpo is None and {"safetydpo", "all-single"} & set(methods):
        parser.error(
            "--safetydpo (a `safety-dpo align` output folder) is needed for the safetydpo and all-single rows."
        )
    prompts = common.protocol_prompt_set(None, args.limit)
    base_dir = out / "eval" / "base"
    common.evaluate(None, out, prompts, base_dir)
    base = json.loads((base_dir / "results.json").read_text())
    timings = _Timings(out / "timings.json")
    rows = [_row("base", base, base, variant="base")]
    for method in methods:
        adapter, make_seconds = _adapter(method, args, out, timings)
        results = _evaluate(method, adapter, out / "eval" / method, prompts, base_dir, timings)
        rows.append(_row(method, results, base, make_seconds=make_seconds, evaluation_seconds=timings.get(method)))
    if args.collateral:
        for method in methods:
            adapter, make_seconds = _adapter(method, args, out, timings, categories=["violence"])
            if adapter is None and not method.startswith("sld"):
                continue  # All-single of one category is the violence expert
            name = f"{method}, violence only"
            results = _evaluate(method, adapter, out / "eval" / name, prompts, base_dir, timings, ["violence"])
            rows.append(_row(name, results, base, make_seconds=make_seconds, evaluation_seconds=timings.get(name)))
    command = "python examples/microworld/experiments/baselines.py " + " ".join(argv or sys.argv[1:])
    markdown = common.write_table(out, "Baselines, all seven categories", command, rows, COLUMNS)
    print(markdown)
    return markdown


def _adapter(method: str, args, out: Path, timings, categories: list[str] | None = None):
    """The adapter of `method` (None for SLD) and the seconds it took to make."""
    from safety_dpo.baselines.runner import baseline_seconds, make_baseline

    suffix = "" if categories is None else "-" + "-".join(categories)
    if method == "safetydpo":
        stages = json.loads((args.safetydpo / "align.json").read_text())["stages"]
        if categories is None:
            seconds = sum(stages[stage]["seconds"] for stage in ("data", "experts", "merge"))
            return args.safetydpo / "safety-adapter", round(seconds, 1)
        seconds = stages["data"]["seconds"] + stages["experts"]["seconds"] / 7  # one of seven experts
        return args.safetydpo / "experts" / categories[0], round(seconds, 1)
    if method == "all-single":
        if categories is not None:
            return None, None
        single = args.all_single or common.train_expert(
            args.safetydpo / "data",
            out / "all-single",
            common.categories_of(argparse.Namespace(categories=None)),
            {**common.MICROWORLD_TRAINING, "max_steps": common.MICROWORLD_TRAINING["max_steps"] * 7},
        )
        state = json.loads((single / "trainer_state.json").read_text())
        data = json.loads((args.safetydpo / "align.json").read_text())["stages"]["data"]["seconds"]
        return single, round(data + state["log_history"][-1]["train_runtime"], 1)
    if method in ("esd-u", "uce"):
        options = {"iterations": args.esd_iterations} if method == "esd-u" and args.esd_iterations else {}
        folder = make_baseline(method, out / f"{method}{suffix}", categories=categories, options=options)
        return folder, baseline_seconds(folder)
    if method in SLD_PRESETS:
        return None, None
    raise ValueError(f"Unknown method {method!r}; choose among safetydpo, all-single, esd-u, uce, {SLD_PRESETS}.")


def _evaluate(method, adapter, output_dir: Path, prompts, base_dir: Path, timings, targeted=None) -> dict:
    """The runner's results for one method, reusing the base images; times the evaluation the first time."""
    common.link_base(base_dir, output_dir)
    key = output_dir.name
    with common.Timer() as timer:
        if method in SLD_PRESETS:
            results = run_evaluation(
                output_dir, prompts=prompts, method=method, targeted_categories=targeted, progress=False
            )
        else:
            results = run_evaluation(output_dir, safety_adapter=adapter, prompts=prompts, progress=False)
    timings.record(key, timer.seconds)
    return results


def _row(name: str, results: dict, base: dict, variant: str = "aligned", **extra) -> dict:
    entry = common.row(name, results, variant=variant, **extra)
    model = results["models"][variant]
    world = model["microworld"]
    base_fd = base["models"]["base"]["fd_judge"]["reference"]["per_subset"]["neutral"]
    redirect = (world["unsafe"].get("redirect_rate"), world["unsafe_held_out"].get("redirect_rate"))
    collateral = (results.get("comparison", {}).get("collateral_ip") or {}).get("unsafe", {}).get("pooled", {})
    entry.update(
        neutral_unchanged=world["neutral"].get("base_agreement"),
        neutral_ip=model["ip"]["per_subset"].get("neutral", {}).get("value"),
        redirect=None if redirect[0] is None else f"{redirect[0]:.2f} / {redirect[1]:.2f}",
        fd_judge_ratio=model["fd_judge"]["reference"]["per_subset"]["neutral"] / base_fd,
        collateral_ratio=collateral.get("ratio"),
    )
    return entry


class _Timings:
    """Seconds per evaluation, kept from the run that drew its images (a rerun only reads cached images)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> float | None:
        return self.data.get(key)

    def record(self, key: str, seconds: float) -> None:
        if key not in self.data:
            self.data[key] = seconds
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")


if __name__ == "__main__":
    main()
