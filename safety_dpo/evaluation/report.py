"""The files an evaluation writes: `results.json`, `report.md`, image grids and IP bar charts.

```
OUTPUT_DIR/results.json          every number, with the protocol that produced it
OUTPUT_DIR/report.md             tables per subset and per category, base and aligned side by side
OUTPUT_DIR/grids/<subset>.png    the first prompts of a subset, base (top row) over aligned, same seeds
OUTPUT_DIR/ip_per_category.png   IP per category (per subset), base vs aligned (needs matplotlib)
```
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from safety_dpo.data.build_dir import write_json, write_text
from safety_dpo.evaluation.cache import ImageCache, Job
from safety_dpo.evaluation.protocols import frechet_label, ip_label

logger = logging.getLogger(__name__)

GRID_COLUMNS = 8
GRID_CELL = 128  # pixels per image in a grid: the microworld's 32 px images are enlarged, SD's reduced


def write_report(output_dir: str | os.PathLike, results: dict[str, Any], jobs: list[Job], variants: list[str]) -> None:
    """Write results.json, report.md, the grids and the charts; `results` gains `files` and `created`."""
    import safety_dpo

    output_dir = Path(output_dir)
    files = {"results": "results.json", "report": "report.md", "grids": write_grids(output_dir, jobs, variants)}
    chart = write_ip_chart(output_dir / "ip_per_category.png", results, variants)
    files["ip_chart"] = chart
    results["files"] = files
    results["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["safety_dpo_version"] = safety_dpo.__version__
    write_json(output_dir / "results.json", results)
    write_text(output_dir / "report.md", render_markdown(results, variants))


# ------------------------------------------------------------------------------------------------------------ grids
def write_grids(output_dir: Path, jobs: list[Job], variants: list[str]) -> dict[str, str]:
    """One grid per subset: its first `GRID_COLUMNS` prompts at their first seed, a row per variant."""
    grids = {}
    (output_dir / "grids").mkdir(exist_ok=True)
    for subset in dict.fromkeys(job.prompt.subset for job in jobs):
        chosen = [job for job in jobs if job.prompt.subset == subset and job.k == 0][:GRID_COLUMNS]
        grid = Image.new("RGB", (GRID_CELL * len(chosen), (GRID_CELL + 14) * len(variants)), "white")
        draw = ImageDraw.Draw(grid)
        for row, variant in enumerate(variants):
            cache = ImageCache(output_dir / "images", variant)
            top = row * (GRID_CELL + 14)
            draw.text((2, top), variant, fill="black")
            for column, job in enumerate(chosen):
                image = cache.read(job)
                if image is not None:
                    # Enlarged pixels stay sharp squares; reduced images are filtered.
                    small = image.width < GRID_CELL
                    resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
                    cell = image.resize((GRID_CELL, GRID_CELL), resample)
                    grid.paste(cell, (column * GRID_CELL, top + 14))
        name = f"grids/{_file_safe(subset)}.png"
        grid.save(output_dir / name)
        grids[subset] = name
    return grids


def _file_safe(name: str) -> str:
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in name)


# ----------------------------------------------------------------------------------------------------------- charts
def write_ip_chart(path: Path, results: dict[str, Any], variants: list[str]) -> str | None:
    """Grouped bars of IP per category (one panel per subset that has categories); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("No IP chart: matplotlib is not installed (pip install 'safety_dpo[eval]').")
        return None
    ip_key = results["metrics"]["ip"]
    panels = {
        subset: entry["per_category"]
        for subset, entry in results["models"]["base"][ip_key]["per_subset"].items()
        if entry["per_category"]
    }
    if not panels:
        return None
    panel_width = max(4.0, 2.0 + 0.9 * max(len(categories) for categories in panels.values()))
    figure, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 4), squeeze=False)
    width = 0.8 / len(variants)
    for axis, (subset, categories) in zip(axes[0], panels.items(), strict=True):
        names = list(categories)
        for offset, variant in enumerate(variants):
            per_category = results["models"][variant][ip_key]["per_subset"][subset]["per_category"]
            values = [per_category.get(name, {}).get("value", 0.0) for name in names]
            axis.bar([i + offset * width for i in range(len(names))], values, width, label=variant)
        axis.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(names))], names, rotation=30)
        axis.set_ylim(0, 1)
        axis.set_ylabel("inappropriate probability" if ip_key == "ip" else ip_label(ip_key))
        axis.set_title(subset)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name


# --------------------------------------------------------------------------------------------------------- markdown
def render_markdown(results: dict[str, Any], variants: list[str]) -> str:
    """The human-readable report: overview per subset, IP per category, quality, and the protocol."""
    models, ip_key = results["models"], results["metrics"]["ip"]
    ip = "IP" if ip_key == "ip" else f"`{ip_key}`"
    lines = [
        "# Evaluation report",
        "",
        f"- model: `{results['model']}`",
        _compared_with(results),
        f"- prompts: `{results['prompts']['source']}` ({_count(results)} images, "
        f"{results['generation']['images_per_prompt']} per prompt)",
        f"- protocol: `{results['protocol']['name']}`"
        + ("" if results["protocol"]["name"] != "custom" else " (settings of your own: no published protocol)"),
        f"- rule: {results['protocol']['ip_rule']}; detectors: "
        + ", ".join(f"`{spec}`" for spec in results["protocol"]["detectors"]),
        *_naming_notes(results),
        "",
        "## Inappropriate probability per subset" if ip_key == "ip" else f"## {ip_label(ip_key)} per subset",
        "",
        _table(
            ["subset", "images"]
            + [f"{ip} {variant}" for variant in variants]
            + (["aligned / base"] if len(variants) > 1 else []),
            [
                [subset, str(entry["num_images"])]
                + [_ip_cell(models[variant][ip_key]["per_subset"][subset]) for variant in variants]
                + ([_number(results["comparison"]["ip_ratio"].get(subset))] if len(variants) > 1 else [])
                for subset, entry in models["base"][ip_key]["per_subset"].items()
            ],
        ),
        "",
        f"± is the standard error: {models['base'][ip_key]['standard_error_method']}.",
    ]
    for subset, entry in models["base"][ip_key]["per_subset"].items():
        if not entry["per_category"]:
            continue
        rows = []
        for category, base_entry in entry["per_category"].items():
            values = [models[v][ip_key]["per_subset"][subset]["per_category"][category]["value"] for v in variants]
            ratio = [_number(values[1] / values[0]) if values[0] else "-"] if len(variants) > 1 else []
            rows.append([category, str(base_entry["num_images"])] + [_number(v) for v in values] + ratio)
        headers = (
            ["category", "images"]
            + [f"{ip} {v}" for v in variants]
            + (["aligned / base"] if len(variants) > 1 else [])
        )
        lines += ["", f"### {ip} per category: {subset}", "", _table(headers, rows)]
    lines += _collateral_section(results)
    lines += _quality_section(results, variants)
    lines += ["", "## Protocol", "", "```json", _json(results["protocol"]), "```", ""]
    lines += ["Generation:", "", "```json", _json(results["generation"]), "```", ""]
    if results.get("files", {}).get("grids"):
        lines += ["## Images", ""] + [f"![{s}]({path})" for s, path in results["files"]["grids"].items()]
    if results.get("files", {}).get("ip_chart"):
        lines += ["", f"![IP per category]({results['files']['ip_chart']})"]
    return "\n".join(lines) + "\n"


def _naming_notes(results: dict[str, Any]) -> list[str]:
    """Say plainly when a number is not the published metric its cousin would be, or rests on blank images."""
    notes = []
    for variant, model in results["models"].items():
        if model.get("blank_images"):
            notes.append(
                f"- **{model['blank_images']} of {model['num_images']} {variant} images are blank** (a single "
                "colour): non-finite or overflowing weights, or a safety checker, draw these; no detector flags "
                "them, so a low IP over them is not safety."
            )
    ip_key, frechet = results["metrics"]["ip"], results["metrics"].get("frechet")
    if ip_key != "ip":
        notes.append(
            f"- **`{ip_key}` is not IP**: the share of images that {', '.join(results['protocol']['detectors'])} "
            "flag, without the rest of a protocol's detectors (I2P's IP adds Q16, which makes most of its flags)."
        )
    if frechet and frechet != "fid":
        notes.append(
            f"- **`{frechet}` is not FID**: a Fréchet distance on {results['protocol']['frechet']['features']} features, "
            "comparable only with the same features (FID is Inception features computed as pytorch-fid does)."
        )
    return notes


def _quality_section(results: dict[str, Any], variants: list[str]) -> list[str]:
    models, frechet = results["models"], results["metrics"].get("frechet")
    rows = []
    for variant in variants:
        metrics = models[variant]
        for name, entry in ((metrics.get(frechet) if frechet else None) or {}).items():
            label = f"{frechet_label(frechet)} (`{frechet}`) to {name}"
            rows.append([variant, label, _number(entry["value"])] + _subset_cells(entry.get("per_subset")))
        if "clip_score" in metrics:
            entry = metrics["clip_score"]
            rows.append([variant, "CLIPScore", _number(entry["value"])] + _subset_cells(entry["per_subset"]))
            if "per_subset_safe_prompt" in entry:
                rows.append(
                    [variant, "CLIPScore with the safe prompt", ""] + _subset_cells(entry["per_subset_safe_prompt"])
                )
        for subset, entry in (metrics.get("microworld") or {}).items():
            for key, label in _MICROWORLD_ROWS.items():
                if key in entry:
                    rows.append([variant, f"{label}: {subset}", _number(entry[key]), ""])
    if not rows:
        return []
    return ["", "## Quality and prompt fidelity", "", _table(["model", "metric", "all", "per subset"], rows)]


_MICROWORLD_ROWS = {
    "concept_rate": "concept rate",
    "prompt_agreement": "prompt agreement",
    "redirect_rate": "redirect rate (safe counterpart drawn)",
    "base_agreement": "same as the base image (concepts, scene, colour)",
    "layout_agreement": "base image's layout kept (scene, colour)",
}


def _collateral_section(results: dict[str, Any]) -> list[str]:
    """IP of the categories the adapter was not trained to remove: ideally the base model's."""
    collateral = results.get("comparison", {}).get("collateral_ip") or {}
    lines = []
    for subset, entry in collateral.items():
        rows = [
            [category, _number(values["base"]), _number(values["aligned"]), _number(values["ratio"])]
            for category, values in entry["per_category"].items()
        ]
        pooled = entry["pooled"]
        rows.append(["all of them", _number(pooled["base"]), _number(pooled["aligned"]), _number(pooled["ratio"])])
        targeted = ", ".join(entry["targeted_categories"])
        lines += [
            "",
            f"### Collateral IP: {subset}, categories not targeted (the adapter targets {targeted})",
            "",
            _table(["category", "IP base", "IP aligned", "aligned / base"], rows),
        ]
    return lines


def _subset_cells(per_subset: dict[str, Any] | None) -> list[str]:
    return [", ".join(f"{subset}: {_number(value)}" for subset, value in (per_subset or {}).items())]


def _ip_cell(entry: dict[str, Any]) -> str:
    error = entry["standard_error"]
    return f"{entry['value']:.3f}" + ("" if error is None else f" ± {error:.3f}")


def _compared_with(results: dict[str, Any]) -> str:
    """What the aligned variant is: a safety adapter, a sampling method (SLD), or nothing (base model only)."""
    if results.get("safety_adapter"):
        return f"- safety adapter: `{results['safety_adapter']}` (scale {results['safety_scale']})"
    method = results.get("method")
    if method:
        return f"- sampling method: `{method['name']}` (no adapter; `safety_dpo.baselines.sld`), settings {method['config']}"
    return "- safety adapter: none (base model only)"


def _count(results: dict[str, Any]) -> int:
    return results["models"]["base"]["num_images"]


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, default=str)
