"""The Diffusion-DPO losses against numbers worked out by hand."""

import math

import pytest
import torch

from safety_dpo.trainer.losses import diffusion_dpo_loss, per_sample_mse, reward_accuracy, safety_dpo_loss

# One pair where the policy improved on the chosen image and got worse on the rejected one, one where it did the
# opposite. logits = (ref_w - pol_w) - (ref_l - pol_l):
#   pair 0: (0.30 - 0.20) - (0.40 - 0.50) = 0.10 + 0.10 = 0.20
#   pair 1: (0.30 - 0.35) - (0.40 - 0.38) = -0.05 - 0.02 = -0.07
POLICY_CHOSEN = torch.tensor([0.20, 0.35])
POLICY_REJECTED = torch.tensor([0.50, 0.38])
REFERENCE_CHOSEN = torch.tensor([0.30, 0.30])
REFERENCE_REJECTED = torch.tensor([0.40, 0.40])
LOGITS = [0.20, -0.07]


def loss(beta: float, loss_type: str):
    return diffusion_dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta, loss_type)


def test_logits_are_the_reference_minus_policy_error_differences():
    assert loss(1.0, "sigmoid").logits.tolist() == pytest.approx(LOGITS)


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_times_logits():
    beta = 10.0
    # -log(sigmoid(2.0)) = log(1 + e^-2) = 0.126928; -log(sigmoid(-0.7)) = log(1 + e^0.7) = 1.103186
    assert loss(beta, "sigmoid").losses.tolist() == pytest.approx([0.126928, 1.103186], abs=1e-6)
    assert loss(beta, "sigmoid").losses.tolist() == pytest.approx([math.log1p(math.exp(-beta * x)) for x in LOGITS])


def test_hinge_loss_is_relu_of_one_minus_beta_times_logits():
    # beta 10: 1 - 2.0 < 0 -> 0; 1 + 0.7 = 1.7
    assert loss(10.0, "hinge").losses.tolist() == pytest.approx([0.0, 1.7])


def test_ipo_loss_is_the_squared_distance_of_logits_to_one_over_two_beta():
    # beta 10: target 0.05; (0.20 - 0.05)^2 = 0.0225; (-0.07 - 0.05)^2 = 0.0144
    assert loss(10.0, "ipo").losses.tolist() == pytest.approx([0.0225, 0.0144])


def test_rewards_are_beta_times_the_error_reduction_against_the_reference():
    output = loss(10.0, "sigmoid")
    assert output.chosen_rewards.tolist() == pytest.approx([1.0, -0.5])  # 10 * (0.30 - 0.20), 10 * (0.30 - 0.35)
    assert output.rejected_rewards.tolist() == pytest.approx([-1.0, 0.2])  # 10 * (0.40 - 0.50), 10 * (0.40 - 0.38)
    margins = output.chosen_rewards - output.rejected_rewards
    assert margins.tolist() == pytest.approx([10 * x for x in LOGITS])


def test_the_papers_beta_5000_with_its_half_factor_equals_our_2500():
    paper = -torch.nn.functional.logsigmoid(-0.5 * 5000 * -torch.tensor(LOGITS) * 1e-3)
    ours = diffusion_dpo_loss(
        POLICY_CHOSEN * 1e-3, POLICY_REJECTED * 1e-3, REFERENCE_CHOSEN * 1e-3, REFERENCE_REJECTED * 1e-3, 2500.0
    ).losses
    assert torch.allclose(paper, ours)


def test_a_policy_equal_to_the_reference_has_loss_log_two_and_zero_rewards():
    errors = torch.tensor([0.1, 0.2, 0.3])
    output = diffusion_dpo_loss(errors, errors + 0.1, errors, errors + 0.1, beta=2500.0)
    assert output.losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert output.chosen_rewards.abs().max() == 0 and output.rejected_rewards.abs().max() == 0


def test_reward_accuracy_counts_ties_as_one_half():
    chosen = torch.tensor([1.0, 0.0, 2.0, 3.0])
    rejected = torch.tensor([0.0, 1.0, 2.0, 1.0])
    assert reward_accuracy(chosen, rejected).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_per_sample_mse_averages_everything_but_the_batch_dimension():
    prediction = torch.zeros(2, 4, 2, 2)
    target = torch.cat([torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 3.0)])
    assert per_sample_mse(prediction.half(), target).tolist() == [1.0, 9.0]
    assert per_sample_mse(prediction.half(), target).dtype == torch.float32


def test_the_loss_gradient_lowers_the_policy_error_on_the_chosen_image():
    policy_chosen = torch.tensor([0.3], requires_grad=True)
    policy_rejected = torch.tensor([0.3], requires_grad=True)
    output = diffusion_dpo_loss(policy_chosen, policy_rejected, torch.tensor([0.3]), torch.tensor([0.3]), beta=100.0)
    output.losses.sum().backward()
    assert policy_chosen.grad.item() > 0 and policy_rejected.grad.item() < 0  # descent lowers chosen, raises rejected


@pytest.mark.parametrize(("beta", "loss_type", "message"), [(0.0, "sigmoid", "beta must be > 0"), (1.0, "kto", "ipo")])
def test_bad_settings_are_refused(beta, loss_type, message):
    with pytest.raises(ValueError, match=message):
        loss(beta, loss_type)


# ------------------------------------------------------------------------------------------ the added terms
DPO_LOSSES = torch.tensor([0.5, 1.5])  # mean 1.0


def test_without_added_terms_the_objective_is_the_mean_dpo_loss():
    loss, parts = safety_dpo_loss(DPO_LOSSES, POLICY_CHOSEN)
    assert loss.item() == pytest.approx(1.0) and set(parts) == {"dpo"}


def test_the_supervised_term_adds_rpo_alpha_times_the_chosen_denoising_error():
    # mean(policy chosen mse) = (0.20 + 0.35) / 2 = 0.275; 1.0 + 2 * 0.275 = 1.55
    loss, parts = safety_dpo_loss(DPO_LOSSES, POLICY_CHOSEN, rpo_alpha=2.0)
    assert loss.item() == pytest.approx(1.55) and parts["sft"].item() == pytest.approx(0.275)


def test_the_preservation_term_adds_its_weight_times_the_mean_prediction_difference():
    # mean([0.1, 0.3]) = 0.2; 1.0 + 0.5 * 0.275 + 10 * 0.2 = 3.1375
    loss, parts = safety_dpo_loss(
        DPO_LOSSES, POLICY_CHOSEN, torch.tensor([0.1, 0.3]), rpo_alpha=0.5, preservation_weight=10.0
    )
    assert loss.item() == pytest.approx(3.1375) and parts["preservation"].item() == pytest.approx(0.2)


def test_the_added_terms_pull_gradients_towards_the_safe_image_and_the_reference():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    preservation = torch.tensor([0.1, 0.3], requires_grad=True)
    loss, _ = safety_dpo_loss(DPO_LOSSES, policy_chosen, preservation, rpo_alpha=2.0, preservation_weight=4.0)
    loss.backward()
    assert policy_chosen.grad.tolist() == pytest.approx([1.0, 1.0])  # d/dx of 2 * mean: lower the safe error
    assert preservation.grad.tolist() == pytest.approx([2.0, 2.0])  # 4 * mean: lower the drift from the reference


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"rpo_alpha": -1.0}, "rpo_alpha must be >= 0"),
        ({"preservation_weight": -1.0}, "preservation_weight must be >= 0"),
        ({"preservation_weight": 1.0}, "needs preservation_mse"),
    ],
)
def test_the_objective_rejects_bad_weights(settings, match):
    with pytest.raises(ValueError, match=match):
        safety_dpo_loss(DPO_LOSSES, POLICY_CHOSEN, **settings)
