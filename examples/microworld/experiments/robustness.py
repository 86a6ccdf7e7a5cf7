"""Experiment 8, robustness: five attack families against the base model, SafetyDPO, All-single and the baselines.

    python examples/microworld/experiments/robustness.py --output-dir runs/exp-robustness \
        --all-single runs/exp-scaling-18/share-1/all-single --baselines-dir runs/exp-baselines

Every attack runs with its default budget on the protocol's harmful test prompts (trained names, 2 per concept, 112
prompts), their harmful words banned (every name of every harmful concept), and is scored on the protocol's seeds
0-3 by the judge (`safety_dpo.attacks.run_attack`). Models:

- base: the microworld checkpoint;
- safetydpo: the shipped reference adapter (or `--safetydpo`, a `safety-dpo align` output folder's adapter);
- all-single: one LoRA on every category (`--all-single`);
- esd-u, uce: the adapters of experiment 7 (`--baselines-dir`, holding `esd-u/` and `uce/`);
- sld-strong: SLD's strong preset (sampling-time: only the attacks that do not differentiate through the UNet).

The text-encoder attacks (ring-a-bell, mma) read no UNet, so their prompts are searched once, on the base model,
and drawn on every other model (`transfer_from`): exactly what a search on that model would find, since every model
here shares the base's text encoder. The UNet white-box (unlearndiff, soft-prompt) and black-box (sneaky) attacks
search on each model. Writes table.md (IP under attack per model and attack, clean IP beside) and table.json (with
the per-category numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safety_dpo.attacks.runner import run_attack
from safety_dpo.data.build_dir import write_json

ATTACKS = ("ring-a-bell", "mma", "unlearndiff", "sneaky", "soft-prompt")
TEXT_ONLY = ("ring-a-bell", "mma")  # read only the text encoder: searched once, drawn on every model
WHITE_BOX_UNET = ("unlearndiff", "soft-prompt")  # not against SLD, which changes sampling rather than weights
MODELS = ("base", "safetydpo", "all-single", "esd-u", "uce", "sld-strong")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path, help="Where everything goes; reruns resume.")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="Attack families, comma-separated.")
    parser.add_argument("--models", default=",".join(MODELS), help="Models, comma-separated.")
    parser.add_argument("--safetydpo", type=Path, help="A SafetyDPO adapter (default: the shipped reference one).")
    parser.add_argument("--all-single", type=Path, help="An All-single LoRA (needed for the all-single row).")
    parser.add_argument("--baselines-dir", type=Path, help="A folder with esd-u/ and uce/ adapters (experiment 7).")
    parser.add_argument("--limit", type=int, help="Attack only the first N prompts (tests).")
    parser.add_argument("--set", action="append", default=[], metavar="ATTACK:FIELD=VALUE", help="Budget overrides.")
    args = parser.parse_args(argv)
    attacks, models = args.attacks.split(","), args.models.split(",")
    unknown = sorted(set(attacks) - set(ATTACKS)) + sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown attacks or models: {', '.join(unknown)}")
    attacked = {model: _attacked(model, args, parser) for model in models}
    overrides = _overrides(args.set, parser)
    rows = []
    for attack in attacks:
        source = None
        for model in sorted(models, key=lambda name: name != "base"):  # the base first: the text attacks' source
            if attack in WHITE_BOX_UNET and model.startswith("sld"):
                continue
            transfer = source if attack in TEXT_ONLY and model != "base" else None
            output_dir = args.output_dir / attack / model
            results = run_attack(
                attack,
                output_dir,
                **attacked[model],
                options=overrides.get(attack),
                limit=args.limit,
                transfer_from=transfer,
                progress=False,
            )
            if model == "base":
                source = output_dir
            rows.append(_row(attack, model, results, _wall_seconds(output_dir), transfer))
            print(f"{attack} on {model}: {json.dumps(_brief(rows[-1]))}", flush=True)
    command = "python examples/microworld/experiments/robustness.py " + " ".join(argv or sys.argv[1:])
    markdown = _write(args.output_dir, command, rows, attacks, models)
    print(markdown)
    return markdown


def _attacked(model: str, args, parser) -> dict:
    """run_attack's keyword arguments that name the attacked model."""
    if model == "base":
        return {}
    if model == "safetydpo":
        from safety_dpo.microworld import reference_adapter_path

        adapter = args.safetydpo / "safety-adapter" if args.safetydpo else reference_adapter_path()
        return {"safety_adapter": str(adapter)}
    if model == "all-single":
        if args.all_single is None:
            parser.error("--all-single is needed for the all-single row.")
        return {"safety_adapter": str(args.all_single)}
    if model in ("esd-u", "uce"):
        if args.baselines_dir is None:
            parser.error(f"--baselines-dir (with {model}/ inside) is needed for the {model} row.")
        return {"baseline": str(args.baselines_dir / model)}
    return {"baseline": model}


def _overrides(items: list[str], parser) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for item in items:
        attack, _, setting = item.partition(":")
        field, separator, value = setting.partition("=")
        if attack not in ATTACKS or not separator:
            parser.error(f"--set {item!r}: write ATTACK:FIELD=VALUE, e.g. mma:steps=30.")
        found.setdefault(attack, {})[field] = json.loads(value)
    return found


def _row(attack: str, model: str, results: dict, seconds: float, transfer) -> dict:
    metrics = results["metrics"]
    return {
        "attack": attack,
        "model": model,
        "budget": _budget(results["config"]),
        "num_prompts": metrics["num_prompts"],
        "ip_attack": metrics["ip_attack"],
        "asr": metrics["asr"],
        "ip_clean": metrics["ip_clean"],
        "ip_removed": metrics["ip_removed"],
        "ip_any_attack": metrics["ip_any_attack"],
        "search_seconds": metrics["attack_seconds"],
        "wall_seconds": seconds,
        "transferred": transfer is not None,
        "per_category": {category: rates["ip_attack"] for category, rates in metrics["per_category"].items()},
    }


def _wall_seconds(output_dir: Path) -> float:
    """From the run's start (attack.json) to its last prompt record: searching, drawing and scoring, without loading
    the model; a run that was interrupted and resumed counts the pause too. Read from the files, so that a rerun that
    only assembles the table reports the time of the run that did the work."""
    records = list((output_dir / "prompts").glob("*.json"))
    return max(path.stat().st_mtime for path in records) - (output_dir / "attack.json").stat().st_mtime


def _budget(config: dict) -> str:
    keys = ("steps", "generations", "population", "max_queries", "num_tokens", "max_seconds")
    return ", ".join(f"{key} {config[key]}" for key in keys if config.get(key) is not None)


def _brief(row: dict) -> dict:
    return {key: row[key] for key in ("ip_attack", "asr", "ip_clean", "ip_removed", "search_seconds", "wall_seconds")}


def _write(output_dir: Path, command: str, rows: list[dict], attacks: list[str], models: list[str]) -> str:
    cell = {(row["model"], row["attack"]): row for row in rows}
    header = ["model", "IP clean", "IP words removed", *(f"{attack}" for attack in attacks)]
    lines = ["# Robustness: IP under attack", "", f"`{command}`", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    for model in models:
        found = [cell[(model, attack)] for attack in attacks if (model, attack) in cell]
        if not found:
            continue
        cells = [model, _fmt(found[0]["ip_clean"]), _fmt(found[0]["ip_removed"])]
        cells += [_fmt(cell[(model, attack)]["ip_attack"]) if (model, attack) in cell else "n/a" for attack in attacks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| attack | budget per prompt | search time (s) | wall time per model (s) |",
        "| --- | --- | --- | --- |",
    ]
    for attack in attacks:
        found = [row for row in rows if row["attack"] == attack]
        if found:
            searched = [row["search_seconds"] for row in found if not row["transferred"]]
            walls = [row["wall_seconds"] for row in found]
            lines.append(
                f"| {attack} | {found[0]['budget']} | {_fmt(max(searched), 0)} | {_fmt(min(walls), 0)}-{_fmt(max(walls), 0)} |"
            )
    categories = sorted({category for row in rows for category in row["per_category"]})
    lines += ["", "IP under attack per category:", "", "| model | attack | " + " | ".join(categories) + " |"]
    lines.append("|" + "|".join(" --- " for _ in range(len(categories) + 2)) + "|")
    for model in models:
        for attack in attacks:
            if (model, attack) in cell:
                found = cell[(model, attack)]["per_category"]
                lines.append(f"| {model} | {attack} | " + " | ".join(_fmt(found.get(c)) for c in categories) + " |")
    markdown = "\n".join(lines) + "\n"
    (output_dir / "table.md").write_text(markdown, encoding="utf-8")
    write_json(output_dir / "table.json", {"title": "Robustness", "command": command, "rows": rows})
    return markdown


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
