"""The Diffusion-DPO loss, as pure functions on tensors.

Diffusion-DPO (Wallace et al., 2023, arXiv 2311.12908, eq. 14) replaces the log-likelihood ratios of DPO by
denoising errors. With `mse` the per-sample squared error of the noise (or velocity) prediction at a shared noisy
input and timestep, and w / l the preferred ("chosen", the safe image) and rejected (the unsafe image) samples:

    logits = (mse_ref(w) - mse_policy(w)) - (mse_ref(l) - mse_policy(l))
    sigmoid: loss = -log sigmoid(beta * logits)
    hinge:   loss = max(0, 1 - beta * logits)                 (SLiC, Zhao et al., 2023)
    ipo:     loss = (logits - 1 / (2 * beta)) ** 2            (IPO, Azar et al., 2023)

**The beta convention.** The Diffusion-DPO paper's code, which SafetyDPO's training script follows, computes
`-0.5 * beta_dpo * (model_diff - ref_diff)` with beta_dpo = 5000; diffusers' research script
(`examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`) drops the 0.5 and defaults to 2500. We follow
diffusers: our beta = 2500 is the paper's 5000. (That script's `ipo` branch reads an undefined `args.beta`; ours
uses `beta`.)

Rewards follow trl's naming and definition (`trl/trainer/dpo_trainer.py`): the implicit reward of a sample is
`beta` times how much more likely the policy makes it than the reference, here `beta * (mse_ref - mse_policy)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "hinge", "ipo"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOLossOutput:
    """Per-pair values of one Diffusion-DPO step; every tensor has shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    logits: torch.Tensor


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in float32.

    Args:
        prediction: (N, C, H, W) model output.
        target: (N, C, H, W) noise (epsilon-prediction) or velocity (v-prediction).

    Returns:
        (N,) tensor.
    """
    squared = (prediction.float() - target.float()) ** 2
    return squared.mean(dim=tuple(range(1, squared.ndim)))


def diffusion_dpo_loss(
    policy_chosen_mse: torch.Tensor,
    policy_rejected_mse: torch.Tensor,
    reference_chosen_mse: torch.Tensor,
    reference_rejected_mse: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
) -> DPOLossOutput:
    """The Diffusion-DPO loss of each pair (see the module docstring for the formulas and the beta convention).

    Args:
        policy_chosen_mse: (B,) denoising error of the trained model on the preferred images.
        policy_rejected_mse: (B,) the same on the rejected images.
        reference_chosen_mse: (B,) denoising error of the reference model (adapters off) on the preferred images.
        reference_rejected_mse: (B,) the same on the rejected images.
        beta: Strength of the KL regularisation (diffusers' convention: 2500 = the paper's 5000).
        loss_type: "sigmoid" (DPO), "hinge" or "ipo".

    Returns:
        Per-pair losses, chosen and rejected rewards, and the logits.

    Raises:
        ValueError: For an unknown `loss_type` or a `beta` that is not positive.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; use one of {', '.join(LOSS_TYPES)}.")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    chosen_improvement = reference_chosen_mse - policy_chosen_mse
    rejected_improvement = reference_rejected_mse - policy_rejected_mse
    logits = chosen_improvement - rejected_improvement
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_improvement.detach(),
        rejected_rewards=beta * rejected_improvement.detach(),
        logits=logits.detach(),
    )


def safety_dpo_loss(
    dpo_losses: torch.Tensor,
    policy_chosen_mse: torch.Tensor,
    preservation_mse: torch.Tensor | None = None,
    rpo_alpha: float | None = None,
    preservation_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective: the Diffusion-DPO loss, plus two optional terms that keep what the expert should not
    change.

        loss = mean(dpo) + rpo_alpha * mean(mse_policy(w)) + preservation_weight * mean(mse(eps_policy, eps_ref | benign))

    - The supervised term (trl's `rpo_alpha`, from RPO, Pang et al. 2024, arXiv 2404.19733, eq. 5, where it is the
      chosen answer's NLL; for a diffusion model the chosen image's denoising error, the Diffusion-DPO paper's own
      SFT objective). DPO only optimises the gap between the chosen and the rejected error, so both may rise
      together: the model learns to draw the unsafe image worse, not the safe one better. This term holds the
      chosen error down, so the expert has to draw the safe counterpart.
    - The preservation term: the policy's prediction held to the reference's (the base model) on benign
      conditioning, as concept-erasure methods preserve other concepts (ESD, Gandikota et al. 2023; UCE's preserved
      set; EraseAnything's anchor loss): whatever the expert changes must be specific to the harmful concepts.

    `rpo_alpha=None` and `preservation_weight=0` give the paper's loss.

    Args:
        dpo_losses: (B,) per-pair Diffusion-DPO losses (`diffusion_dpo_loss(...).losses`).
        policy_chosen_mse: (B,) the trained model's denoising error on the preferred images.
        preservation_mse: (P,) per-sample `mse(policy prediction, reference prediction)` on benign conditioning, or
            None when there is no preservation term.
        rpo_alpha: Weight of the supervised term; None: no term.
        preservation_weight: Weight of the preservation term.

    Returns:
        The scalar loss, and its parts (`dpo`, and `sft` / `preservation` when present, unweighted) for logging.

    Raises:
        ValueError: If a weight is negative, or `preservation_weight > 0` without `preservation_mse`.
    """
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0 or None, got {rpo_alpha}.")
    if preservation_weight < 0:
        raise ValueError(f"preservation_weight must be >= 0, got {preservation_weight}.")
    parts = {"dpo": dpo_losses.mean()}
    loss = parts["dpo"]
    if rpo_alpha is not None:
        parts["sft"] = policy_chosen_mse.mean()
        loss = loss + rpo_alpha * parts["sft"]
    if preservation_weight > 0:
        if preservation_mse is None:
            raise ValueError("preservation_weight > 0 needs preservation_mse (the predictions on benign prompts).")
        parts["preservation"] = preservation_mse.mean()
        loss = loss + preservation_weight * parts["preservation"]
    return loss, {name: value.detach() for name, value in parts.items()}


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen reward beats the rejected one; a tie counts one half (as diffusers' script)."""
    wins = (chosen_rewards > rejected_rewards).float()
    ties = (chosen_rewards == rejected_rewards).float()
    return (wins + 0.5 * ties).mean()
