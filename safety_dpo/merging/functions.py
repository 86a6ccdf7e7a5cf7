"""Merge maths: small, pure tensor-in/tensor-out functions, in the style of `peft.utils.merge_utils`.

Notation, for one layer and K experts: the delta of expert e is `dW_e = up_e @ down_e` (out x in), the LoRA factors
`up_e = B_e` (out x r, the LoRA scale folded in) and `down_e = A_e` (r x in); x is a layer input (in), `h_e = A_e x`.
Co-Merge (SafetyDPO, arXiv 2412.10493, Sec. 3.3) gives each weight to the expert with the largest activation on it.
"""

from __future__ import annotations

from typing import Literal

import torch

BASELINES: tuple[str, ...] = ("cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def element_activations(deltas: torch.Tensor, input_abs_means: torch.Tensor) -> torch.Tensor:
    """Element-wise activation `a_e[i, j] = |dW_e[i, j]| * mean|x_j|` of every expert.

    When every expert's statistics come from the same inputs (the base model's), `input_abs_means` is one vector
    repeated K times, and the ranking of `a_e[i, j]` over e is the ranking of `|dW_e[i, j]|`: the calibration data
    cannot change the winner (see `test_naive_element_wise_co_merge_is_magnitude_selection`).

    Args:
        deltas: (K, out, in) the experts' delta weights.
        input_abs_means: (K, in) mean absolute layer input per expert (each over that expert's calibration inputs).

    Returns:
        (K, out, in) activations.
    """
    return deltas.abs() * input_abs_means[:, None, :]


def select_winners(activations: torch.Tensor) -> torch.Tensor:
    """The index of the most active expert for every position (the first one on ties).

    Args:
        activations: (K, ...) one activation map per expert.

    Returns:
        (...) long tensor of expert indices.
    """
    # max(dim=0).indices, not argmax(dim=0): the same first-index rule, but about 10x faster on CPU for (K, out, in)
    return activations.max(dim=0).indices


def take_winners(candidates: torch.Tensor, winners: torch.Tensor) -> torch.Tensor:
    """Each position's value from its winning expert.

    Args:
        candidates: (K, ...) the experts' values.
        winners: (...) expert indices, from `select_winners`.

    Returns:
        (...) the merged values.
    """
    return candidates.gather(0, winners.unsqueeze(0)).squeeze(0)


def co_merge_elements(deltas: torch.Tensor, input_abs_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise Co-Merge: every weight from the expert with the largest `|dW_e[i, j]| mean|x_j|`.

    Args:
        deltas: (K, out, in) the experts' delta weights.
        input_abs_means: (K, in) mean absolute layer input per expert.

    Returns:
        The merged delta (out, in) and the winners (out, in).
    """
    winners = select_winners(element_activations(deltas, input_abs_means))
    return take_winners(deltas, winners), winners


def co_merge_rows(ups: list[torch.Tensor], downs: list[torch.Tensor], row_activations: torch.Tensor):
    """Row-wise Co-Merge: every output row from the expert with the largest `mean |(dW_e x)_i|`, exactly as a LoRA.

    Row i of the merged delta is row i of the winner's `up_e @ down_e`, so the merged delta is
    `concat_e(mask_e * up_e) @ concat_e(down_e)`: a LoRA of rank `sum_e r_e` with no approximation.

    Args:
        ups: K tensors (out, r_e), the experts' B factors with their scale folded in.
        downs: K tensors (r_e, in), the experts' A factors.
        row_activations: (K, out) mean absolute output of each expert's delta, per row.

    Returns:
        The merged up (out, sum r_e) and down (sum r_e, in) factors, and the winners (out,).
    """
    winners = select_winners(row_activations)
    masked_ups = [up * (winners == index).to(up.dtype)[:, None] for index, up in enumerate(ups)]
    return torch.cat(masked_ups, dim=1), torch.cat(downs, dim=0), winners


def co_merge_lora_factors(
    ups: torch.Tensor, downs: torch.Tensor, input_abs_means: torch.Tensor, hidden_abs_means: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor-wise Co-Merge, the most literal reading: each entry of A from the expert with the largest
    `|A_e[k, j]| mean|x_j|`, each entry of B from the expert with the largest `|B_e[i, k]| mean|h_e,k|`.

    Args:
        ups: (K, out, r) the experts' B factors, scale folded in (every expert must have the same rank).
        downs: (K, r, in) the experts' A factors.
        input_abs_means: (K, in) mean absolute layer input per expert.
        hidden_abs_means: (K, r) mean absolute `A_e x` per expert.

    Returns:
        The merged up (out, r) and down (r, in) factors, and their winners.
    """
    down_winners = select_winners(downs.abs() * input_abs_means[:, None, :])
    up_winners = select_winners(ups.abs() * hidden_abs_means[:, None, :])
    return take_winners(ups, up_winners), take_winners(downs, down_winners), up_winners, down_winners


def row_norms(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`||dW[i, :]||_2` of every row of `dW = up @ down`, without forming dW.

    Args:
        up: (out, r).
        down: (r, in).

    Returns:
        (out,) row norms.
    """
    gram = down @ down.T  # (r, r)
    return ((up @ gram) * up).sum(dim=1).clamp_min(0).sqrt()


def data_free_winners(
    granularity: str, ups: list[torch.Tensor], downs: list[torch.Tensor], deltas: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The winners each Co-Merge granularity would pick with no calibration data: for isotropic Gaussian inputs
    `x ~ N(0, I)`, `E|w . x|` is proportional to `||w||_2`, so every activation becomes a plain magnitude.

    `row`: `||dW_e[i, :]||`; `element`: `|dW_e[i, j]|`; `lora_factor`: `|A_e[k, j]|` and `|B_e[i, k]| ||A_e[k, :]||`.
    Comparing these with the calibrated winners measures how much a variant depends on its data at all.

    Args:
        granularity: "row", "element" or "lora_factor".
        ups: K tensors (out, r_e), scale folded in.
        downs: K tensors (r_e, in).
        deltas: (K, out, in) the experts' deltas when the caller has them already (element-wise), else None.

    Returns:
        Name -> winners, shaped like the calibrated winners of the same granularity ("rows"; "elements"; "up" and
        "down").
    """
    if granularity == "row":
        return {
            "rows": select_winners(torch.stack([row_norms(up, down) for up, down in zip(ups, downs, strict=True)]))
        }
    if granularity == "element":
        if deltas is None:
            deltas = torch.stack([up @ down for up, down in zip(ups, downs, strict=True)])
        return {"elements": select_winners(deltas.abs())}
    stacked_ups, stacked_downs = torch.stack(ups), torch.stack(downs)  # (K, out, r), (K, r, in)
    hidden_norms = stacked_downs.norm(dim=2)  # (K, r)
    return {
        "up": select_winners(stacked_ups.abs() * hidden_norms[:, None, :]),
        "down": select_winners(stacked_downs.abs()),
    }


def concatenate_weighted(ups: list[torch.Tensor], downs: list[torch.Tensor], weights: list[float]):
    """`sum_e w_e up_e @ down_e` exactly as one LoRA of rank `sum_e r_e`: (out, sum r_e) and (sum r_e, in)."""
    return torch.cat([up * weight for up, weight in zip(ups, weights, strict=True)], dim=1), torch.cat(downs, dim=0)


def baseline_merge(
    method: str,
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    density: float = 0.5,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """A baseline merge of delta weights with `peft.utils.merge_utils` (DARE draws from torch's global generator).

    Args:
        method: "cat" (task arithmetic: the weighted sum), "ties", "dare_linear", "dare_ties" or "magnitude_prune".
        deltas: K tensors (out, in).
        weights: (K,) one weight per expert.
        density: Share of weights kept by the pruning methods.
        majority_sign_method: Sign election of "ties" and "dare_ties".

    Returns:
        The merged delta (out, in).
    """
    from peft.utils import merge_utils

    if method == "cat":
        return merge_utils.task_arithmetic(deltas, weights)
    if method in ("ties", "dare_ties"):
        return getattr(merge_utils, method)(deltas, weights, density, majority_sign_method)
    if method in ("dare_linear", "magnitude_prune"):
        return getattr(merge_utils, method)(deltas, weights, density)
    raise ValueError(f"Unknown baseline merge {method!r}; expected one of {', '.join(BASELINES)}.")


def refactorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` LoRA of a delta (truncated SVD, Eckart-Young), split evenly: `up = U sqrt(S)`,
    `down = sqrt(S) V^T`.

    Args:
        delta: (out, in).
        rank: The LoRA rank; capped at min(out, in).

    Returns:
        up (out, rank), down (rank, in), and the relative error `||delta - up @ down||_F / ||delta||_F` (0 for a
        zero delta).
    """
    rank = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(delta.dtype)
    down = (root[:, None] * vh[:rank]).to(delta.dtype)
    total = s.square().sum()
    error = (s[rank:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return up, down, error
