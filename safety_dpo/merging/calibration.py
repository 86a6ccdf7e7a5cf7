"""Activation statistics for Co-Merge: forward hooks on the layers the experts target, during calibration generations.

One calibration *group* is a list of prompts, the experts that record statistics on them, and optionally one expert
whose delta is active during the group's generations. The three `inputs` modes of `CoMergeConfig` are three ways of
forming groups (`calibration_groups`); all recording experts of a group share its UNet passes, so the "shared" mode
costs one generation pass however many experts there are, plus a little matrix work per expert in the hooks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from safety_dpo.merging.config import CoMergeConfig
from safety_dpo.merging.experts import LoraExpert

logger = logging.getLogger(__name__)

# statistic -> what it is, per expert and layer: mean over recorded inputs x of ...
STATISTICS = {
    "input": "|x_j| (in)",
    "hidden": "|(A_e x)_k| (r)",
    "output": "|(dW_e x)_i| (out)",
}
_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 for the batched |dW_e x| of all experts
NEEDED_STATISTICS = {"row": ("output",), "element": ("input",), "lora_factor": ("input", "hidden")}


@dataclass
class CalibrationGroup:
    prompts: list[str]
    recording: list[int]  # indices of the experts that accumulate statistics on these prompts
    active: int | None = None  # the expert whose delta is added to the layers' outputs


class ActivationRecorder:
    """Forward hooks on a UNet's targeted linear layers that accumulate every recording expert's statistics and add
    the active expert's delta to the output. Use as a context manager; the hooks are removed on exit.

    Args:
        unet: The base UNet (diffusers `UNet2DConditionModel`).
        experts: The loaded experts; their layer names are the UNet module names.
        statistics: Which of "input", "hidden", "output" to accumulate.
    """

    def __init__(self, unet: torch.nn.Module, experts: Sequence[LoraExpert], statistics: Sequence[str]) -> None:
        self.experts = list(experts)
        self.statistics = tuple(statistics)
        self.recording: list[int] = []
        self.active: int | None = None
        owners = {}  # every targeted layer -> the first expert that targets it (experts may target different layers)
        for expert in experts:
            for layer in expert.layers:
                owners.setdefault(layer, expert.name)
        self.modules = {layer: _linear(unet, layer, owner) for layer, owner in owners.items()}
        device = next(unet.parameters()).device
        # The factors move to the model's device once, not in every hook call.
        self.factors = [
            {layer: (up.to(device), down.to(device)) for layer, (up, down) in expert.layers.items()}
            for expert in experts
        ]
        self.sums: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in experts]
        self.counts: list[dict[str, int]] = [dict.fromkeys(expert.layers, 0) for expert in experts]
        self._handles: list = []
        self._stack_cache: dict = {}

    def __enter__(self) -> ActivationRecorder:
        for layer, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def means(self) -> list[dict[str, dict[str, torch.Tensor]]]:
        """Per expert, layer -> statistic -> mean over the inputs it recorded."""
        means = []
        for index, sums in enumerate(self.sums):
            counts = self.counts[index]
            means.append(
                {
                    layer: {name: (total / max(counts[layer], 1)).cpu() for name, total in stats.items()}
                    for layer, stats in sums.items()
                }
            )
        return means

    def _hook(self, layer: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            inputs = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, in)
            recording = tuple(index for index in self.recording if layer in self.factors[index])
            if recording:
                self._record(layer, inputs, recording)
            if self.active is None or layer not in self.factors[self.active]:
                return None
            up, down = self.factors[self.active][layer]
            delta_output = (inputs @ down.T) @ up.T  # (N, out)
            return output + delta_output.reshape(output.shape).to(output.dtype)

        return hook

    def _record(self, layer: str, inputs: torch.Tensor, recording: tuple[int, ...]) -> None:
        """Accumulate the statistics of the recording experts that target `layer`."""
        count = inputs.shape[0]
        if "input" in self.statistics:
            input_sum = inputs.abs().sum(0)  # the same for every recording expert
            for index in recording:
                _accumulate(self.sums[index].setdefault(layer, {}), "input", input_sum)
        if "hidden" in self.statistics or "output" in self.statistics:
            ups, downs, ranks = self._stacked(layer, recording)
            hidden = inputs @ downs.T  # (N, sum r): every recording expert's A_e x in one product
            hidden_sums = hidden.abs().sum(0).split(ranks)
            output_sums = self._output_sums(hidden, ups, ranks) if "output" in self.statistics else None
            for position, index in enumerate(recording):
                sums = self.sums[index].setdefault(layer, {})
                if "hidden" in self.statistics:
                    _accumulate(sums, "hidden", hidden_sums[position])
                if output_sums is not None:
                    _accumulate(sums, "output", output_sums[position])
        for index in recording:
            self.counts[index][layer] += count

    def _stacked(self, layer: str, recording: tuple[int, ...]):
        """The recording experts' factors of a layer, concatenated once per group: ups, downs (sum r, in), ranks."""
        key = (layer, recording)
        if key not in self._stack_cache:
            ups = [self.factors[index][layer][0] for index in recording]
            downs = [self.factors[index][layer][1] for index in recording]
            ranks = [down.shape[0] for down in downs]
            stacked_ups = torch.stack(ups) if len(set(ranks)) == 1 else ups  # (K, out, r) when the ranks agree
            self._stack_cache[key] = (stacked_ups, torch.cat(downs), ranks)
        return self._stack_cache[key]

    @staticmethod
    def _output_sums(hidden: torch.Tensor, ups, ranks: list[int]) -> list[torch.Tensor]:
        """Sum over inputs of |dW_e x| = |B_e (A_e x)| for every expert, (out,) each."""
        if isinstance(ups, list):
            return [(part @ up.T).abs().sum(0) for part, up in zip(hidden.split(ranks, dim=1), ups, strict=True)]
        experts, out_features, rank = ups.shape
        per_expert = hidden.reshape(-1, experts, rank).transpose(0, 1)  # (K, N, r)
        chunk = max(1, _CHUNK_ELEMENTS // (experts * out_features))  # bound the (K, chunk, out) intermediate
        total = hidden.new_zeros(experts, out_features)
        for start in range(0, per_expert.shape[1], chunk):
            total += torch.bmm(per_expert[:, start : start + chunk], ups.transpose(1, 2)).abs().sum(1)
        return list(total)


def calibration_groups(
    experts: Sequence[LoraExpert], prompts: dict[str | None, list[str]], inputs: str
) -> list[CalibrationGroup]:
    """The calibration groups of an `inputs` mode.

    Args:
        experts: The experts (their `categories` matter for "own_category").
        prompts: Category -> prompts; the key None holds prompts without a category.
        inputs: "shared", "own_category" or "with_expert".

    Raises:
        ValueError: For "own_category", if an expert records no category or a category has no prompts.
    """
    everyone = list(range(len(experts)))
    all_prompts = [prompt for group in prompts.values() for prompt in group]
    if inputs == "shared":
        return [CalibrationGroup(all_prompts, everyone)]
    if inputs == "with_expert":
        return [CalibrationGroup(all_prompts, [index], active=index) for index in everyone]
    groups = []
    for expert in experts:
        if not expert.categories:
            raise ValueError(
                f"inputs='own_category' needs each expert's categories, but {expert.name!r} records none (its "
                "safety_dpo.json is missing or has no 'categories'). Use inputs='shared' or 'with_expert'."
            )
        missing = [category for category in expert.categories if not prompts.get(category)]
        if missing:
            raise ValueError(
                f"inputs='own_category': no calibration prompts of category {missing} for expert {expert.name!r}; "
                f"the calibration prompts cover {sorted(key for key in prompts if key)}."
            )
    for category, group_prompts in prompts.items():
        recording = [index for index, expert in enumerate(experts) if category in expert.categories]
        if recording:
            groups.append(CalibrationGroup(list(group_prompts), recording))
    return groups


def collect_statistics(
    pipeline, experts: Sequence[LoraExpert], groups: Sequence[CalibrationGroup], config: CoMergeConfig
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Generate every group's prompts with the hooks on and return each expert's mean statistics per layer."""
    statistics = NEEDED_STATISTICS[config.granularity]
    batches = [
        (group, number, group.prompts[start : start + config.calibration_batch_size])
        for group in groups
        for number, start in enumerate(range(0, len(group.prompts), config.calibration_batch_size))
    ]
    previous_bar = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)
    try:
        with ActivationRecorder(pipeline.unet, experts, statistics) as recorder, torch.no_grad():
            for group, number, batch in tqdm(batches, desc="Co-Merge calibration", unit="batch"):
                recorder.recording, recorder.active = group.recording, group.active
                # Every group restarts the seed sequence, so the with_expert passes all start from the same noise.
                generator = torch.Generator("cpu").manual_seed(config.seed + number)
                guidance = {} if config.guidance_scale is None else {"guidance_scale": config.guidance_scale}
                pipeline(
                    prompt=batch,
                    **guidance,
                    num_inference_steps=config.num_timesteps,
                    generator=generator,
                    output_type="latent",
                )
    finally:
        pipeline._progress_bar_config = previous_bar
    return recorder.means()


def calibration_dataset_prompts(
    pairs, categories: Iterable[str] | None, dataset_name: str
) -> dict[str | None, list[str]]:
    """The unsafe prompts of a calibration dataset, by category.

    They come from `unsafe_prompt`, else from `caption`: CoProV2 as published, in Pick-a-Pic's layout, holds its
    unsafe prompt there. A dataset without a `category` column cannot be split by category, so all its prompts are
    returned, under the key None, whatever `categories` says.

    Args:
        pairs: A `datasets.Dataset` (a CoProV2 train split).
        categories: Keep the prompts of these categories; None or empty: every prompt.
        dataset_name: How to name the dataset in errors.

    Raises:
        ValueError: If the dataset has neither prompt column, or no prompt of `categories`.
    """
    columns = pairs.column_names
    column = next((name for name in ("unsafe_prompt", "caption") if name in columns), None)
    if column is None:
        raise ValueError(
            f"Calibration dataset {dataset_name!r} has no 'unsafe_prompt' or 'caption' column (columns: {columns}); "
            "pass a CoProV2 build, or a dataset in Pick-a-Pic's layout whose caption is the unsafe prompt."
        )
    if "category" not in columns:
        return {None: list(pairs[column])}
    wanted = set(categories or ())
    by_category: dict[str | None, list[str]] = {}
    for category, prompt in zip(pairs["category"], pairs[column], strict=True):
        if not wanted or category in wanted:
            by_category.setdefault(category, []).append(prompt)
    if not by_category:
        raise ValueError(
            f"Calibration dataset {dataset_name!r} has no prompts of the experts' categories {sorted(wanted)}."
        )
    return by_category


def choose_prompts(prompts_by_category: dict[str, list[str]], per_category: int, seed: int) -> dict[str, list[str]]:
    """A seeded choice of `per_category` distinct prompts of every category (all of them if there are fewer)."""
    chosen = {}
    for category, prompts in sorted(prompts_by_category.items()):
        unique = sorted(set(prompts))
        random.Random(f"{seed}-{category}").shuffle(unique)
        chosen[category] = unique[:per_category]
    return chosen


def _accumulate(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value.clone()


def _linear(unet: torch.nn.Module, layer: str, expert_name: str) -> torch.nn.Module:
    try:
        module = unet.get_submodule(layer)
    except AttributeError as error:
        raise ValueError(
            f"The calibration model has no layer {layer!r}, which expert {expert_name!r} targets; the experts were "
            "trained on a different model. Pass the experts' base model as `pipeline` (or --model)."
        ) from error
    module = getattr(module, "base_layer", module)  # a PEFT-wrapped layer: hook the base layer it wraps
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"Layer {layer!r} of the calibration model is a {type(module).__name__}, not a Linear layer.")
    return module
