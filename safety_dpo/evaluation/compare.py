"""Put two evaluations side by side, only if the same protocol made their numbers.

`compare_results(a, b)` reads two `results.json` (or the folders holding them), lists every difference in what
decides a number (the protocol: detectors and their settings, scorer versions and weight digests, Fréchet features,
CLIP model; the sampling; the prompts and seeds) and gives the headline numbers of both. `safety-dpo evaluate
--compare A B` prints them and refuses (exit status 1) when anything that decides a number differs, unless
`--force`, which prints the table under a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# What may differ between comparable runs: when and by which safety_dpo they were written, where their files are.
_IGNORED = {
    "created",
    "files",
    "safety_dpo_version",
    "model",
    "safety_adapter",
    "safety_adapter_sha256",
    "safety_scale",
    "method",  # what the aligned variant is, like the adapter: two methods may be compared
    "models",
    "comparison",
}
# Package versions that do not decide a number (the weights' digests, compared too, decide it).
_VERSION_KEYS = ("packages",)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json, given as the file or the evaluation folder holding it."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No results.json at {str(path)!r}: name an evaluation folder or its results.json.")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(file)!r} is not valid JSON ({error}); evaluate again to rewrite it.") from error
    if not isinstance(results, dict) or "metrics" not in results or "protocol" not in results:
        raise ValueError(
            f"{str(file)!r} is not a results.json of this safety_dpo version (no 'metrics'/'protocol'); evaluate again "
            "into the same folder to rescore its images."
        )
    return results


def protocol_differences(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(differences that decide numbers, differences in package versions only), as 'path: a != b' lines."""
    deciding, versions = [], []
    for path, left, right in _diff(_comparable(a), _comparable(b), ""):
        line = f"{path}: {_short(left)} != {_short(right)}"
        is_version = any(f".{key}." in f".{path}." for key in _VERSION_KEYS) or path.endswith("_version")
        (versions if is_version else deciding).append(line)
    return deciding, versions


def _comparable(results: dict[str, Any]) -> dict[str, Any]:
    kept = {key: value for key, value in results.items() if key not in _IGNORED}
    prompts = dict(kept.get("prompts", {}))
    kept["prompts"] = prompts
    return kept


def _diff(left: Any, right: Any, path: str):
    if isinstance(left, dict) and isinstance(right, dict):
        for key in sorted(set(left) | set(right), key=str):
            yield from _diff(left.get(key, _MISSING), right.get(key, _MISSING), f"{path}.{key}" if path else str(key))
    elif left != right:
        yield path, left, right


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, _Missing) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def headline_rows(results: dict[str, Any]) -> dict[str, float | None]:
    """Metric label -> value, for every model variant: the IP (under its name) per subset, the Fréchet distance to
    the reference and to the base, CLIPScore, and the microworld's fidelity."""
    rows: dict[str, float | None] = {}
    metrics = results["metrics"]
    for variant, model in results["models"].items():
        for subset, entry in model[metrics["ip"]]["per_subset"].items():
            rows[f"{metrics['ip']} {subset}: {variant}"] = entry["value"]
        frechet = metrics.get("frechet")
        for name, entry in ((model.get(frechet) if frechet else None) or {}).items():
            rows[f"{frechet} to {name}: {variant}"] = entry["value"]
        if "clip_score" in model:
            rows[f"CLIPScore: {variant}"] = model["clip_score"]["value"]
        for subset, entry in (model.get("microworld") or {}).items():
            rows[f"concept rate {subset}: {variant}"] = entry.get("concept_rate")
    return rows


def compare_results(a: str | os.PathLike, b: str | os.PathLike) -> dict[str, Any]:
    """Both runs' headline numbers and every difference in how they were made.

    Returns:
        {"comparable": bool, "differences": [...], "version_differences": [...], "rows": {label: (a, b)},
        "names": (a's model and adapter, b's)}.
    """
    left, right = load_results(a), load_results(b)
    deciding, versions = protocol_differences(left, right)
    rows_a, rows_b = headline_rows(left), headline_rows(right)
    rows = {label: (rows_a.get(label), rows_b.get(label)) for label in dict.fromkeys([*rows_a, *rows_b])}
    return {
        "comparable": not deciding,
        "differences": deciding,
        "version_differences": versions,
        "rows": rows,
        "names": tuple(_name(results) for results in (left, right)),
    }


def _name(results: dict[str, Any]) -> str:
    adapter = results.get("safety_adapter") or (results.get("method") or {}).get("name")
    return f"{results.get('model')}" + (f" + {adapter}" if adapter else "")


def render_comparison(comparison: dict[str, Any], a: str, b: str) -> str:
    lines = [f"A: {a} ({comparison['names'][0]})", f"B: {b} ({comparison['names'][1]})", ""]
    width = max((len(label) for label in comparison["rows"]), default=10)
    lines.append(f"{'metric'.ljust(width)}  {'A':>10}  {'B':>10}")
    for label, (left, right) in comparison["rows"].items():
        lines.append(f"{label.ljust(width)}  {_cell(left):>10}  {_cell(right):>10}")
    if comparison["version_differences"]:
        lines += ["", "Package versions differ (the scorers' weights are the same):"]
        lines += [f"  {line}" for line in comparison["version_differences"]]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
