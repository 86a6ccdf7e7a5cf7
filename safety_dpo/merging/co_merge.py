"""`co_merge`: safety experts -> one adapter, by Co-Merge or by one of peft's baseline merges."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from safety_dpo.merging import functions
from safety_dpo.merging.adapter import MergedAdapter
from safety_dpo.merging.calibration import (
    calibration_dataset_prompts,
    calibration_groups,
    choose_prompts,
    collect_statistics,
)
from safety_dpo.merging.config import CoMergeConfig
from safety_dpo.merging.experts import LoraExpert, check_shared_initialisation, load_experts

logger = logging.getLogger(__name__)


def co_merge(
    experts: list[Any], config: CoMergeConfig | None = None, pipeline: Any = None, **hub_kwargs: Any
) -> MergedAdapter:
    """Merge safety experts into one LoRA.

    Args:
        experts: Expert folders (`safety-dpo train` outputs), `.safetensors` files, Hub ids or UNet LoRA state dicts.
        config: How to merge; `CoMergeConfig()` (row-wise Co-Merge on shared inputs) by default.
        pipeline: The experts' base model, for calibration: a pipeline, a path or Hub id. None: the `base_model` in
            the experts' `safety_dpo.json` (the microworld when they name none). Baselines need no pipeline.
        **hub_kwargs: Where in a folder or Hub repo the experts are (`subfolder`, `weight_name`) and `huggingface_hub`
            download arguments for experts given by Hub id (`revision`, `token`, ...), as `load_lora_weights` takes.

    Returns:
        The merged adapter; `save_pretrained(dir)` writes a LoRA that stock diffusers `load_lora_weights` reads.

    Raises:
        ValueError: If the experts do not fit together (base model, layers, shapes), are not LoRA weights, or the
            weights do not match the experts.
    """
    config = config or CoMergeConfig()
    loaded = load_experts(list(experts), **hub_kwargs)
    weights = config.expert_weights(len(loaded))
    if len(weights) != len(loaded):
        raise ValueError(f"CoMergeConfig.weights has {len(weights)} entries for {len(loaded)} experts; give one each.")
    logger.info("Merging %d experts with %s.", len(loaded), config.describe())
    statistics, calibration = None, None
    if config.method == "co_merge" and config.granularity == "lora_factor":
        check_shared_initialisation(loaded)
    if config.method == "co_merge":
        loaded = [_weighted(expert, weight) for expert, weight in zip(loaded, weights, strict=True)]
        if len(loaded) > 1:  # one expert wins everything: nothing to calibrate
            statistics, calibration = _calibrate(loaded, config, pipeline)
    layers, report = merge_layers(loaded, config, weights, statistics)
    if calibration:
        report["calibration"] = calibration
    return MergedAdapter(
        layers=layers,
        config=config,
        merged_from=[
            {"name": expert.name, "categories": expert.categories, "weight": weight}
            for expert, weight in zip(loaded, weights, strict=True)
        ],
        metadata=_shared_metadata(loaded),
        report=report,
    )


def merge_layers(
    experts: list[LoraExpert],
    config: CoMergeConfig,
    weights: list[float],
    statistics: list[dict[str, dict[str, torch.Tensor]]] | None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Merge every layer any expert targets; return layer -> (up, down) and the report (win shares, agreement with
    the data-free pick, SVD errors).

    A layer is merged among the experts that target it; an expert that does not target a layer adds nothing there,
    as a zero delta would, so experts on disjoint layers merge to their union.
    """
    merged, errors = {}, {}
    wins = [0.0] * len(experts)
    differing, compared = 0, 0
    layers = list(dict.fromkeys(layer for expert in experts for layer in expert.layers))
    for number, layer in enumerate(layers):
        present = [index for index, expert in enumerate(experts) if layer in expert.layers]
        members = [experts[index] for index in present]
        ups = [expert.layers[layer][0] for expert in members]
        downs = [expert.layers[layer][1] for expert in members]
        layer_weights = [weights[index] for index in present]
        layer_statistics = None if statistics is None else [statistics[index] for index in present]
        result = _merge_layer(layer, number, ups, downs, members, config, layer_weights, layer_statistics)
        if result.exact is not None and config.storage != "svd":
            merged[layer] = result.exact
        else:
            delta = result.delta if result.delta is not None else result.exact[0] @ result.exact[1]
            rank = config.rank or sum(down.shape[0] for down in downs)
            up, down, error = functions.refactorize(delta, rank)
            merged[layer], errors[layer] = (up, down), round(error, 6)
        for index, share in zip(present, result.shares, strict=True):
            wins[index] += share
        for winners, free in result.winners.values():
            differing += int((winners != free).sum())
            compared += winners.numel()
    report: dict[str, Any] = {"storage": "svd" if errors else "exact"}
    if config.method == "co_merge":
        report["win_share"] = {
            expert.name: round(total / len(layers), 4) for expert, total in zip(experts, wins, strict=True)
        }
    if compared:
        # How data-dependent this merge was: the share of winners that differ from what the same rule picks with no
        # calibration data (a plain magnitude pick, `functions.data_free_winners`).
        report["data_free_disagreement"] = round(differing / compared, 6)
    if errors:
        report["svd_relative_error"] = {
            "mean": round(sum(errors.values()) / len(errors), 6),
            "max": max(errors.values()),
            "per_layer": errors,
        }
    return merged, report


@dataclass
class _LayerMerge:
    exact: tuple[torch.Tensor, torch.Tensor] | None  # (up, down) when the merge is exactly a LoRA
    delta: torch.Tensor | None  # the merged delta otherwise
    shares: list[float]  # each participating expert's share of the weights it won
    # Co-Merge's winners and the data-free pick of the same rule (functions.data_free_winners), by what competed
    winners: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _merge_layer(layer, number, ups, downs, experts, config, weights, statistics) -> _LayerMerge:
    count = len(experts)
    even = [1.0 / count] * count
    if config.method == "cat":
        if config.storage != "svd":
            return _LayerMerge(functions.concatenate_weighted(ups, downs, weights), None, even)
        deltas = [up @ down for up, down in zip(ups, downs, strict=True)]
        return _LayerMerge(None, functions.baseline_merge("cat", deltas, torch.tensor(weights)), even)
    if config.method != "co_merge":
        deltas = [up @ down for up, down in zip(ups, downs, strict=True)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + number)  # DARE's random pruning, reproducible per layer
            delta = functions.baseline_merge(
                config.method, deltas, torch.tensor(weights), config.density, config.majority_sign_method
            )
        return _LayerMerge(None, delta, even)
    if count == 1:  # one expert targets this layer (or only one was given): it wins everything there
        return _LayerMerge((ups[0], downs[0]), None, [1.0])
    stats = [expert_statistics[layer] for expert_statistics in statistics]
    if config.granularity == "row":
        up, down, winners = functions.co_merge_rows(ups, downs, torch.stack([stat["output"] for stat in stats]))
        free = functions.data_free_winners("row", ups, downs)
        return _LayerMerge((up, down), None, _shares(winners, count), {"rows": (winners, free["rows"])})
    inputs = torch.stack([stat["input"] for stat in stats])
    if config.granularity == "element":
        deltas = torch.stack([up @ down for up, down in zip(ups, downs, strict=True)])  # (K, out, in)
        delta, winners = functions.co_merge_elements(deltas, inputs)
        free = functions.data_free_winners("element", ups, downs, deltas)
        return _LayerMerge(None, delta, _shares(winners, count), {"elements": (winners, free["elements"])})
    hidden = torch.stack([stat["hidden"] for stat in stats])
    up, down, up_winners, down_winners = functions.co_merge_lora_factors(
        torch.stack(ups), torch.stack(downs), inputs, hidden
    )
    free = functions.data_free_winners("lora_factor", ups, downs)
    shares = [(a + b) / 2 for a, b in zip(_shares(up_winners, count), _shares(down_winners, count), strict=True)]
    winners = {"up": (up_winners, free["up"]), "down": (down_winners, free["down"])}
    return _LayerMerge((up, down), None, shares, winners)


def _calibrate(experts: list[LoraExpert], config: CoMergeConfig, pipeline: Any):
    from safety_dpo.data.generation import load_text_to_image_pipeline
    from safety_dpo.worlds import default_world, default_world_name

    if pipeline is None:
        base_model = experts[0].metadata.get("base_model")
        # Experts that name no base model, or the default world's, calibrate on the default world's pipeline.
        pipeline = None if base_model in (None, default_world_name()) else base_model
        logger.info("Calibrating on %s.", base_model or "the microworld")
        if pipeline is None and config.guidance_scale is None:
            config = dataclasses.replace(config, guidance_scale=default_world().load_protocol().guidance_scale)
    pipeline, model_id = load_text_to_image_pipeline(pipeline, {})
    prompts = _calibration_prompts(experts, config)
    groups = calibration_groups(experts, prompts, config.inputs)
    statistics = collect_statistics(pipeline, experts, groups, config)
    calibration = {
        "model": model_id,
        "prompts": sum(len(group) for group in prompts.values()),
        "generations": sum(len(group.prompts) for group in groups),
        "guidance_scale": config.guidance_scale,
        "num_timesteps": config.num_timesteps,
    }
    return statistics, calibration


def _calibration_prompts(experts: list[LoraExpert], config: CoMergeConfig) -> dict[str | None, list[str]]:
    if isinstance(config.calibration_prompts, dict):
        return {category: list(prompts) for category, prompts in config.calibration_prompts.items()}
    if config.calibration_prompts is not None:
        return {None: list(config.calibration_prompts)}
    dataset = config.calibration_dataset or next(
        (expert.metadata["dataset"] for expert in experts if expert.metadata.get("dataset")), None
    )
    if dataset is None:
        raise ValueError(
            "Co-Merge needs calibration prompts, but none were given and the experts' safety_dpo.json names no "
            "dataset. Set CoMergeConfig.calibration_prompts or calibration_dataset (--calibration-dataset)."
        )
    from safety_dpo.trainer.experts import load_pairs

    pairs = load_pairs(dataset, split="train")
    # An expert that records no category was trained on every pair of its dataset: it calibrates on every prompt.
    wanted = (
        None
        if any(not expert.categories for expert in experts)
        else {category for expert in experts for category in expert.categories}
    )
    by_category = calibration_dataset_prompts(pairs, wanted, str(dataset))
    return choose_prompts(by_category, config.num_calibration_prompts, config.seed)


def _weighted(expert: LoraExpert, weight: float) -> LoraExpert:
    if weight == 1.0:
        return expert
    layers = {layer: (up * weight, down) for layer, (up, down) in expert.layers.items()}
    return LoraExpert(name=expert.name, layers=layers, metadata=expert.metadata)


def _shares(winners: torch.Tensor, count: int) -> list[float]:
    return (torch.bincount(winners.flatten(), minlength=count).double() / winners.numel()).tolist()


def _shared_metadata(experts: list[LoraExpert]) -> dict[str, Any]:
    first = experts[0].metadata
    categories = list(dict.fromkeys(category for expert in experts for category in expert.categories))
    concepts: dict[str, list[str]] = {}
    for expert in experts:
        for category, names in (expert.metadata.get("concepts") or {}).items():
            concepts.setdefault(category, [])
            concepts[category] += [name for name in names if name not in concepts[category]]
    targets = dict.fromkeys(
        module for expert in experts for module in ((expert.metadata.get("lora") or {}).get("target_modules") or [])
    )
    datasets = Counter(expert.metadata.get("dataset") for expert in experts if expert.metadata.get("dataset"))
    return {
        "base_model": first.get("base_model"),
        "unet_config_sha256": first.get("unet_config_sha256"),
        "architecture": first.get("architecture"),
        "categories": categories,
        "concepts": concepts,
        "dataset": datasets.most_common(1)[0][0] if datasets else None,
        "target_modules": list(targets) or None,
    }
