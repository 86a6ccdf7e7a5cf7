"""`CoMergeConfig`: how safety experts are merged into one adapter, saved with the adapter as JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Method = Literal["co_merge", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
Granularity = Literal["row", "element", "lora_factor"]
Inputs = Literal["shared", "own_category", "with_expert"]
Storage = Literal["auto", "exact", "svd"]

METHODS: tuple[str, ...] = ("co_merge", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# "linear" is still accepted for "cat": it was this method's name before peft's was adopted. peft's own
# `add_weighted_adapter(combination_type="linear")` averages the A and the B factors separately, which is not the
# weighted sum of the deltas; nothing here does that, so the old name is translated with a warning that says so.
RENAMED_METHODS = {"linear": "cat"}
GRANULARITIES: tuple[str, ...] = ("row", "element", "lora_factor")
INPUTS: tuple[str, ...] = ("shared", "own_category", "with_expert")
STORAGES: tuple[str, ...] = ("auto", "exact", "svd")
# The merges whose result is exactly a LoRA (no SVD needed): row selection and a weighted sum are concatenations of
# the experts' factors (rank = the sum of the ranks); factor-wise selection keeps the experts' rank.
_EXACT: tuple[tuple[str, str | None], ...] = (("co_merge", "row"), ("co_merge", "lora_factor"), ("cat", None))


@dataclass
class CoMergeConfig:
    """How `co_merge` merges safety experts.

    Co-Merge (SafetyDPO, Sec. 3.3) gives every weight to the expert that is most *active* on it over calibration
    inputs. Read naively (element-wise activation `|dW_e[i, j] x_j|` on the base model's inputs) the input factor is
    the same for every expert and the rule is plain magnitude selection; the variants below make the data matter.
    docs/merging.md compares them on the microworld, which chose the default (row-wise, shared inputs).

    Parameters:
        method: "co_merge", or a baseline computed with `peft.utils.merge_utils` on the experts' delta weights:
            "cat" (task arithmetic: the weighted sum of the deltas, stored exactly by concatenating the factors, as
            peft's `add_weighted_adapter(combination_type="cat")`), "ties", "dare_linear", "dare_ties",
            "magnitude_prune" (on the deltas, as peft's "*_svd" combinations). "linear", this project's former name
            for "cat", is accepted with a warning.
        granularity: What competes in Co-Merge. "row": each output row `(dW_e x)_i`; "element": each weight
            `|dW_e[i, j]| mean|x_j|`; "lora_factor": each entry of the experts' own factors A_e (`|A_e[k, j] x_j|`)
            and B_e (`|B_e[i, k] h_k|`, `h = A_e x`), allowed only for experts that record the same initial factors
            (`safety_dpo.json` `lora.init_sha256`): a LoRA's factors are defined only up to a change of basis.
        inputs: Where the calibration inputs x of expert e come from. "shared": the base model on all calibration
            prompts (one pass for all experts); "own_category": the base model on the prompts of e's own categories;
            "with_expert": the model with e active, on all calibration prompts (one pass per expert).
        calibration_prompts: The calibration prompts, a list or a mapping category -> prompts. None: the unsafe
            prompts of `calibration_dataset`, or of the dataset named in the experts' `safety_dpo.json`.
        calibration_dataset: A CoProV2 build folder or Hub id whose train split gives the calibration prompts.
        num_calibration_prompts: Prompts per category taken from the dataset (a seeded choice).
        num_timesteps: Denoising steps of each calibration generation; every step's UNet inputs are recorded.
        calibration_batch_size: Prompts per calibration generation.
        guidance_scale: Classifier-free guidance of the calibration generations; None: the pipeline's default (for
            the microworld, its protocol's).
        weights: One weight per expert (default 1.0 each), or "mean" (1/K each: "cat" is then the average of the
            deltas, not their K-times-stronger sum). A weight multiplies its expert's delta weight `B_e A_e`, as in
            peft's delta-level combinations (`add_weighted_adapter`'s "cat", "svd" and "*_svd"); Co-Merge scales
            each delta by it before merging, the baselines pass it to `peft.utils.merge_utils`.
        density: Share of weights kept by "ties", "dare_*" and "magnitude_prune".
        majority_sign_method: "total" or "frequency", for "ties" and "dare_ties".
        storage: "exact" (a LoRA whose product is the merged delta: row-wise Co-Merge and "cat" at the sum of the
            experts' ranks, "lora_factor" at their rank), "svd" (truncated SVD to `rank`, the relative error of every
            layer reported), or "auto" (exact where the merge allows it, otherwise SVD).
        rank: Rank of the SVD re-factorisation; None: the sum of the experts' ranks (at most the layer's size).
        seed: Seed of the calibration noise, the prompt choice and DARE's random pruning.
    """

    method: Method = field(default="co_merge", metadata={"help": f"One of {', '.join(METHODS)}."})
    # row: the only Co-Merge variant that is exact as a LoRA and depends on the experts' delta weights alone (not on
    # how each is factored), and whose winners the calibration data really moves (docs/merging.md).
    granularity: Granularity = field(default="row", metadata={"help": f"One of {', '.join(GRANULARITIES)}."})
    inputs: Inputs = field(default="shared", metadata={"help": f"One of {', '.join(INPUTS)}."})
    calibration_prompts: list[str] | dict[str, list[str]] | None = field(
        default=None, metadata={"help": "Calibration prompts (list or category -> list); None: from the dataset."}
    )
    calibration_dataset: str | None = field(
        default=None, metadata={"help": "CoProV2 folder or Hub id; None: the one named in the experts' metadata."}
    )
    num_calibration_prompts: int = field(default=16, metadata={"help": "Calibration prompts per category."})
    num_timesteps: int = field(default=10, metadata={"help": "Denoising steps per calibration generation."})
    calibration_batch_size: int = field(default=16, metadata={"help": "Prompts per calibration generation."})
    guidance_scale: float | None = field(default=None, metadata={"help": "Calibration guidance; None: default."})
    weights: list[float] | Literal["mean"] | None = field(
        default=None, metadata={"help": "One weight per expert, or 'mean' (1/K each); None: 1.0 each."}
    )
    density: float = field(default=0.5, metadata={"help": "Share of weights kept by ties/dare/magnitude_prune."})
    majority_sign_method: Literal["total", "frequency"] = field(
        default="total", metadata={"help": "Sign election of ties/dare_ties: total or frequency."}
    )
    storage: Storage = field(default="auto", metadata={"help": f"One of {', '.join(STORAGES)}."})
    rank: int | None = field(default=None, metadata={"help": "SVD rank; None: the sum of the experts' ranks."})
    seed: int = field(default=0, metadata={"help": "Seed of calibration noise, prompt choice and DARE."})

    def __post_init__(self) -> None:
        if self.method in RENAMED_METHODS:
            logger.warning(
                "CoMergeConfig: method=%r is read as %r, the weighted sum of the experts' delta weights (peft's "
                "add_weighted_adapter combination_type='cat'); peft's 'linear', which averages the A and B factors "
                "separately, is not offered.",
                self.method,
                RENAMED_METHODS[self.method],
            )
            self.method = RENAMED_METHODS[self.method]
        _check_choice("method", self.method, METHODS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("inputs", self.inputs, INPUTS)
        _check_choice("storage", self.storage, STORAGES)
        _check_choice("majority_sign_method", self.majority_sign_method, ("total", "frequency"))
        for name in ("num_calibration_prompts", "num_timesteps", "calibration_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CoMergeConfig.{name}={getattr(self, name)!r} must be a positive integer.")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"CoMergeConfig.density={self.density!r} must be in (0, 1].")
        if self.rank is not None and int(self.rank) < 1:
            raise ValueError(f"CoMergeConfig.rank={self.rank!r} must be a positive integer or None.")
        if isinstance(self.weights, str):
            if self.weights != "mean":
                raise ValueError(
                    f"CoMergeConfig.weights={self.weights!r} is not supported; give one number per expert, 'mean' "
                    "(1/K each) or None (1.0 each)."
                )
        elif self.weights is not None:
            self.weights = [float(weight) for weight in self.weights]
        if isinstance(self.calibration_prompts, (list, tuple)) and not self.calibration_prompts:
            raise ValueError("CoMergeConfig.calibration_prompts is empty; give prompts or None (from the dataset).")
        if self.storage == "exact" and not self.allows_exact_storage:
            raise ValueError(
                f"CoMergeConfig.storage='exact' is not possible for {self.describe()}: its result is not a low-rank "
                "product of the experts' factors. Use storage='svd' or 'auto', or method='cat' or "
                "co_merge with granularity 'row' or 'lora_factor'."
            )

    def expert_weights(self, count: int) -> list[float]:
        """The weight of each of `count` experts: `weights`, 1/K each for "mean", 1.0 each for None."""
        if self.weights == "mean":
            return [1.0 / count] * count
        return list(self.weights) if self.weights is not None else [1.0] * count

    @property
    def allows_exact_storage(self) -> bool:
        granularity = self.granularity if self.method == "co_merge" else None
        return (self.method, granularity) in _EXACT

    @property
    def needs_calibration(self) -> bool:
        """Whether the merge reads activations (every Co-Merge variant except naive element-wise on shared inputs
        still runs calibration, which is what makes its result depend on the data at all)."""
        return self.method == "co_merge"

    def describe(self) -> str:
        if self.method != "co_merge":
            return self.method
        return f"co_merge (granularity={self.granularity}, inputs={self.inputs})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoMergeConfig:
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown CoMergeConfig fields {unknown}; the fields are {sorted(known)}.")
        return cls(**data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        path = Path(path)
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(temporary, path)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> CoMergeConfig:
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data.get("merge_config", data) if isinstance(data, dict) else data)


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"CoMergeConfig.{name}={value!r} is not supported; expected one of {', '.join(accepted)}.")
