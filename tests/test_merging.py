"""Merging safety experts: the Co-Merge rules on hand-built tensors, peft's baselines, calibration hooks, co_merge on
tiny experts, loading the result in stock diffusers, bad input, CoMergeConfig, the Hub and `safety-dpo merge`."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import HfApi, snapshot_download
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file
from tiny_models import ATTENTION_PROJECTIONS, attention_layers, get_dummy_sd_components, random_unet_lora

from safety_dpo.cli import main
from safety_dpo.data.generation import config_digest
from safety_dpo.merging import CoMergeConfig, MergedAdapter, co_merge, functions
from safety_dpo.merging.calibration import ActivationRecorder, calibration_groups, choose_prompts
from safety_dpo.merging.experts import LoraExpert, expert_from_state_dict, load_expert

TARGETS = ATTENTION_PROJECTIONS
WEIGHTS = "pytorch_lora_weights.safetensors"
PROMPTS = {"violence": ["a knife", "a gun and blood"], "sexual": ["a naked woman", "a nude person"]}
ALL_PROMPTS = PROMPTS["violence"] + PROMPTS["sexual"]
OTHER_PROMPTS = {"violence": ["a dog in a park"], "sexual": ["a cat sleeping on a chair at night"]}


def tiny_pipeline() -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def random_lora(unet, seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    """A seeded UNet LoRA state dict in diffusers' format over the tiny UNet's attention projections."""
    return random_unet_lora(unet, seed, rank, scale_up=0.1)


def make_expert(directory, unet, seed: int, category: str = "violence", rank: int = 2, alpha=None, **info):
    """An expert folder as `safety-dpo train` writes it: the LoRA weights and `safety_dpo.json`."""
    directory.mkdir(parents=True)
    save_file(random_lora(unet, seed, rank), str(directory / WEIGHTS))
    metadata = {
        "kind": "expert",
        "base_model": "tiny-sd",
        "unet_config_sha256": config_digest(unet),
        "architecture": "sd",
        "categories": [category],
        "concepts": {category: ["knife"]},
        "lora": {"rank": rank, "alpha": alpha if alpha is not None else rank, "target_modules": list(TARGETS)},
        **info,
    }
    (directory / "safety_dpo.json").write_text(json.dumps(metadata))
    return directory


def diffusers_state(expert: LoraExpert) -> dict[str, torch.Tensor]:
    """An expert's layers (scale folded in) back as a diffusers state dict."""
    factors = {layer: {"A": down, "B": up} for layer, (up, down) in expert.layers.items()}
    return {f"unet.{layer}.lora_{k}.weight": value for layer, parts in factors.items() for k, value in parts.items()}


def calibration(prompts=None, granularity="row", **overrides) -> CoMergeConfig:
    return CoMergeConfig(
        calibration_prompts=prompts or PROMPTS,
        num_timesteps=2,
        calibration_batch_size=2,
        granularity=granularity,
        **overrides,
    )


def merged_deltas(merged: MergedAdapter) -> torch.Tensor:
    return torch.cat([merged.delta(layer).flatten() for layer in sorted(merged.layers)])


def merged_deltas_of(expert: LoraExpert) -> torch.Tensor:
    return torch.cat([expert.delta(layer).flatten() for layer in sorted(expert.layers)])


def peft_delta(pipeline, layer: str, adapter: str) -> torch.Tensor:
    module = pipeline.unet.get_submodule(layer)
    return module.lora_B[adapter].weight @ module.lora_A[adapter].weight * module.scaling[adapter]


def latents(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipeline("a knife", num_inference_steps=2, generator=generator, output_type="latent").images


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def experts(tmp_path_factory, pipe) -> list:
    root = tmp_path_factory.mktemp("experts")
    return [
        make_expert(root / "violence", pipe.unet, 0, "violence"),
        make_expert(root / "sexual", pipe.unet, 1, "sexual"),
    ]


@pytest.fixture(scope="module")
def shared_init_experts(tmp_path_factory, pipe) -> list:
    """Two experts that record the same initial LoRA factors, as `safety-dpo train` does for one seed."""
    root = tmp_path_factory.mktemp("shared-init")
    lora = {"rank": 2, "alpha": 2, "target_modules": list(TARGETS), "init_sha256": "f" * 64}
    return [
        make_expert(root / "violence", pipe.unet, 0, "violence", lora=lora),
        make_expert(root / "sexual", pipe.unet, 1, "sexual", lora=lora),
    ]


@pytest.fixture(scope="module")
def row_merge(experts, pipe) -> MergedAdapter:
    return co_merge(experts, calibration(), pipeline=pipe)


# ------------------------------------------------------------------------------------------ merge maths, by hand
def test_row_merge_gives_every_row_to_its_most_active_expert_exactly_at_the_sum_of_the_ranks():
    torch.manual_seed(0)
    ups, downs = [torch.randn(4, 2), torch.randn(4, 3)], [torch.randn(2, 5), torch.randn(3, 5)]
    activations = torch.tensor([[1.0, 0.0, 5.0, 0.0], [0.0, 2.0, 1.0, 3.0]])  # rows 0, 2 -> expert 0; 1, 3 -> 1
    up, down, winners = functions.co_merge_rows(ups, downs, activations)
    assert winners.tolist() == [0, 1, 0, 1]
    assert up.shape == (4, 5) and down.shape == (5, 5)
    deltas = [ups[0] @ downs[0], ups[1] @ downs[1]]
    torch.testing.assert_close(up @ down, torch.stack([deltas[0][0], deltas[1][1], deltas[0][2], deltas[1][3]]))


def test_element_merge_gives_every_weight_to_the_largest_activation_not_the_largest_magnitude():
    deltas = torch.tensor([[[1.0, -4.0]], [[-2.0, 1.0]]])  # (K=2, out=1, in=2)
    input_abs_means = torch.tensor([[1.0, 1.0], [1.0, 10.0]])  # expert 1 sees large inputs on feature 1
    merged, winners = functions.co_merge_elements(deltas, input_abs_means)
    assert winners.tolist() == [[1, 1]]  # activations [1, 4] vs [2, 10]: expert 1 wins column 1 though |1| < |-4|
    assert merged.tolist() == [[-2.0, 1.0]]


def test_lora_factor_merge_gives_every_a_and_b_entry_to_its_most_active_expert():
    ups = torch.tensor([[[1.0], [1.0]], [[3.0], [0.5]]])  # (K=2, out=2, r=1)
    downs = torch.tensor([[[2.0, 1.0]], [[1.0, 1.0]]])  # (K=2, r=1, in=2)
    input_abs_means = torch.tensor([[1.0, 1.0], [1.0, 5.0]])  # A activations: [2, 1] vs [1, 5]
    hidden_abs_means = torch.tensor([[4.0], [1.0]])  # B activations: [4, 4] vs [3, 0.5]
    up, down, up_winners, down_winners = functions.co_merge_lora_factors(ups, downs, input_abs_means, hidden_abs_means)
    assert down_winners.tolist() == [[0, 1]] and down.tolist() == [[2.0, 1.0]]
    assert up_winners.tolist() == [[0], [0]] and up.tolist() == [[1.0], [1.0]]


def test_select_winners_gives_a_tie_to_the_first_expert():
    assert functions.select_winners(torch.tensor([[1.0, 2.0], [1.0, 3.0]])).tolist() == [0, 1]


def test_naive_element_wise_co_merge_is_magnitude_selection():
    """The naive reading of Co-Merge, `|dW_e[i, j]| mean|x_j|` with every expert's x from the same base-model pass,
    multiplies all K candidates of a weight by the same positive mean|x_j|, which cannot change their order: the
    winner is argmax_e |dW_e[i, j]| whatever the calibration data. Data-free magnitude selection is not what the
    paper's "most active expert" asks for, so the default is row-wise on shared inputs, and element-wise only
    becomes data-dependent with per-expert inputs ("own_category", "with_expert")."""
    generator = torch.Generator().manual_seed(1)
    deltas = torch.randn(3, 6, 7, generator=generator)
    for _ in range(5):
        shared = torch.rand(7, generator=generator) * 10 + 1e-3  # any positive vector
        _, winners = functions.co_merge_elements(deltas, shared.expand(3, 7))
        assert torch.equal(winners, deltas.abs().argmax(dim=0))


@pytest.mark.parametrize("method", ["cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_baseline_merge_equals_peft_merge_utils(method):
    generator = torch.Generator().manual_seed(2)
    deltas, weights = [torch.randn(5, 4, generator=generator) for _ in range(3)], torch.tensor([1.0, 0.5, 2.0])
    torch.manual_seed(3)  # DARE's random pruning draws from the global generator
    ours = functions.baseline_merge(method, deltas, weights, density=0.4, majority_sign_method="frequency")
    torch.manual_seed(3)
    if method == "cat":
        theirs = merge_utils.task_arithmetic(deltas, weights)
    elif method in ("ties", "dare_ties"):
        theirs = getattr(merge_utils, method)(deltas, weights, 0.4, "frequency")
    else:
        theirs = getattr(merge_utils, method)(deltas, weights, 0.4)
    torch.testing.assert_close(ours, theirs)


def test_baseline_merge_rejects_an_unknown_method_listing_the_known_ones():
    with pytest.raises(ValueError, match="'fisher'.*cat, ties, dare_linear, dare_ties, magnitude_prune"):
        functions.baseline_merge("fisher", [torch.ones(2, 2)], torch.ones(1))


def test_refactorize_is_exact_at_full_rank_and_reports_the_truncation_error():
    delta = torch.randn(6, 5, generator=torch.Generator().manual_seed(5))
    up, down, error = functions.refactorize(delta, 99)  # capped at min(out, in)
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)
    assert up.shape == (6, 5) and error < 1e-6
    up, down, error = functions.refactorize(delta, 2)
    measured = (torch.linalg.norm(delta - up @ down) / torch.linalg.norm(delta)).item()
    assert error == pytest.approx(measured, rel=1e-4) and error > 0.1
    assert functions.refactorize(torch.zeros(3, 3), 1)[2] == 0.0


# ------------------------------------------------------------------------------------------ co_merge on tiny experts
@pytest.mark.parametrize(
    "settings",
    [{"granularity": "row"}, {"granularity": "element"}, {"granularity": "lora_factor"}, {"method": "linear"}],
)
def test_merging_one_expert_returns_its_delta_with_the_scale_folded_in(tmp_path, pipe, settings):
    folder = make_expert(tmp_path / "one", pipe.unet, 0, rank=2, alpha=6.0)
    merged = co_merge([folder], calibration(**settings), pipeline=pipe)
    raw = load_file(str(folder / WEIGHTS))
    assert sorted(merged.layers) == sorted(attention_layers(pipe.unet))
    for layer in merged.layers:
        expected = 6.0 / 2 * raw[f"unet.{layer}.lora_B.weight"] @ raw[f"unet.{layer}.lora_A.weight"]
        torch.testing.assert_close(merged.delta(layer), expected, atol=1e-6, rtol=1e-5)


def test_the_scale_of_a_bare_weights_file_comes_from_diffusers_adapter_metadata(tmp_path, pipe):
    state = {key.removeprefix("unet."): value for key, value in random_lora(pipe.unet, 0).items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=state, weight_name="expert.safetensors",
        unet_lora_adapter_metadata={"r": 2, "lora_alpha": 6, "target_modules": list(TARGETS)},
    )  # fmt: skip
    expert = load_expert(tmp_path / "expert.safetensors")
    layer = next(iter(expert.layers))
    expected = 3.0 * state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"]
    torch.testing.assert_close(expert.delta(layer), expected)


def test_co_merge_scales_each_expert_by_its_weight(pipe, experts):
    merged = co_merge(experts[:1], calibration(weights=[2.5]), pipeline=pipe)
    expert = load_expert(experts[0])
    torch.testing.assert_close(
        merged_deltas(merged), 2.5 * torch.cat([expert.delta(k).flatten() for k in sorted(expert.layers)])
    )


def test_cat_merge_is_the_weighted_sum_of_the_deltas_stored_exactly(experts):
    merged = co_merge(experts, CoMergeConfig(method="cat", weights=[1.0, 0.5]))
    first, second = (load_expert(path) for path in experts)
    assert merged.report["storage"] == "exact"
    for layer in first.layers:
        assert merged.layers[layer][1].shape[0] == 4
        torch.testing.assert_close(merged.delta(layer), first.delta(layer) + 0.5 * second.delta(layer))


def test_linear_is_read_as_peft_cat_with_a_warning_that_says_what_differs(experts, caplog):
    with caplog.at_level("WARNING", logger="safety_dpo.merging.config"):
        config = CoMergeConfig(method="linear")
    assert config.method == "cat" and "averages the A and B factors" in caplog.text
    merged = co_merge(experts, config)
    assert merged.config.method == "cat"
    torch.testing.assert_close(merged_deltas(merged), merged_deltas(co_merge(experts, CoMergeConfig(method="cat"))))


@pytest.mark.parametrize("inputs", ["shared", "own_category", "with_expert"])
def test_row_co_merge_takes_every_row_of_every_layer_from_one_expert_without_svd(experts, pipe, inputs):
    merged = co_merge(experts, calibration(inputs=inputs), pipeline=pipe)
    loaded = [load_expert(path) for path in experts]
    assert merged.report["storage"] == "exact" and sum(merged.report["win_share"].values()) == pytest.approx(1.0)
    for layer in loaded[0].layers:
        assert merged.layers[layer][1].shape[0] == 4  # rank 2 + 2
        candidates = torch.stack([expert.delta(layer) for expert in loaded])  # (K, out, in)
        assert ((candidates - merged.delta(layer)).abs().amax(dim=2) < 1e-6).any(dim=0).all()


def test_lora_factor_co_merge_takes_every_factor_entry_from_one_expert_at_their_rank(shared_init_experts, pipe):
    merged = co_merge(shared_init_experts, calibration(granularity="lora_factor"), pipeline=pipe)
    loaded = [load_expert(path) for path in shared_init_experts]
    for layer in loaded[0].layers:
        for factor in (0, 1):  # up, down
            candidates = torch.stack([expert.layers[layer][factor] for expert in loaded])
            assert merged.layers[layer][factor].shape == candidates.shape[1:]
            assert (candidates == merged.layers[layer][factor]).any(dim=0).all()


def test_element_co_merge_on_shared_inputs_is_magnitude_selection_whatever_the_prompts(experts, pipe):
    exact = {"granularity": "element", "storage": "svd", "rank": 8}  # full rank of the tiny layers: no truncation
    merges = [co_merge(experts, calibration(prompts, **exact), pipeline=pipe) for prompts in (PROMPTS, OTHER_PROMPTS)]
    torch.testing.assert_close(merged_deltas(merges[0]), merged_deltas(merges[1]))
    loaded = [load_expert(path) for path in experts]
    for layer in loaded[0].layers:
        deltas = torch.stack([expert.delta(layer) for expert in loaded])
        magnitude = deltas.gather(0, deltas.abs().argmax(dim=0, keepdim=True))[0]
        torch.testing.assert_close(merges[0].delta(layer), magnitude, atol=1e-5, rtol=1e-4)


def test_row_co_merge_depends_on_the_calibration_prompts(experts, pipe, row_merge):
    other = co_merge(experts, calibration(OTHER_PROMPTS), pipeline=pipe)
    assert not torch.allclose(merged_deltas(row_merge), merged_deltas(other))


def test_ties_through_co_merge_reproduces_peft_on_the_experts_deltas(experts):
    merged = co_merge(experts, CoMergeConfig(method="ties", storage="svd", rank=8, density=0.3))
    loaded = [load_expert(path) for path in experts]
    assert merged.report["svd_relative_error"]["max"] < 1e-5
    for layer in loaded[0].layers:
        expected = merge_utils.ties([expert.delta(layer) for expert in loaded], torch.ones(2), 0.3, "total")
        torch.testing.assert_close(merged.delta(layer), expected, atol=1e-5, rtol=1e-4)


def test_dare_merges_are_reproducible_from_the_seed(experts):
    first, again, other = (co_merge(experts, CoMergeConfig(method="dare_ties", seed=seed)) for seed in (0, 0, 1))
    torch.testing.assert_close(merged_deltas(first), merged_deltas(again))
    assert not torch.allclose(merged_deltas(first), merged_deltas(other))


# ------------------------------------------------------------------------------------------ properties of a merge
def change_of_basis(expert: LoraExpert, seed: int, permutation_only: bool = False) -> dict[str, torch.Tensor]:
    """The same expert factored differently, `(B R^-1, R A)` for a random invertible R per layer (or a permutation
    of its rank components): every delta weight is unchanged, every factor entry moves."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer, (up, down) in expert.layers.items():
        rank = down.shape[0]
        if permutation_only:  # the components in reverse order
            change = torch.eye(rank, dtype=torch.float64).flip(0)
        else:  # well conditioned: an orthogonal matrix times scales in [0.5, 2]
            orthogonal, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
            change = orthogonal * (0.5 + 1.5 * torch.rand(rank, generator=generator, dtype=torch.float64))
        state[f"unet.{layer}.lora_A.weight"] = (change @ down.double()).float()
        state[f"unet.{layer}.lora_B.weight"] = (up.double() @ torch.linalg.inv(change)).float()
    return state


def with_layers(expert: LoraExpert, keep) -> dict[str, torch.Tensor]:
    return {key: value for key, value in diffusers_state(expert).items() if keep(key)}


# Every merge whose result depends on the experts' delta weights only (what `storage` makes of it aside).
DELTA_MERGES = {
    "row shared": {"granularity": "row"},
    "row own_category": {"granularity": "row", "inputs": "own_category"},
    "row with_expert": {"granularity": "row", "inputs": "with_expert"},
    "element": {"granularity": "element", "storage": "svd", "rank": 8},
    "linear": {"method": "linear"},
    "linear mean": {"method": "linear", "weights": "mean"},
    "ties": {"method": "ties", "storage": "svd", "rank": 8},
    "dare_ties": {"method": "dare_ties", "storage": "svd", "rank": 8},
}


@pytest.mark.parametrize("permutation_only", [False, True], ids=["random basis", "reordered components"])
@pytest.mark.parametrize("settings", DELTA_MERGES.values(), ids=DELTA_MERGES.keys())
def test_a_merge_does_not_depend_on_how_an_expert_is_factored(pipe, experts, settings, permutation_only):
    first, second = (load_expert(path) for path in experts)
    moved = expert_from_state_dict(change_of_basis(second, 3, permutation_only), "moved", second.metadata)
    original = co_merge([first, second], calibration(**settings), pipeline=pipe)
    refactored = co_merge([first, moved], calibration(**settings), pipeline=pipe)
    torch.testing.assert_close(merged_deltas(refactored), merged_deltas(original), atol=1e-4, rtol=1e-4)


def test_factor_wise_merging_of_a_refactored_expert_is_wrong_which_is_why_it_is_refused(pipe, experts):
    """What `lora_factor` would do without its guard: an expert merged with a copy of itself whose rank components
    are only reordered yields products no expert had."""
    expert = load_expert(experts[0])
    moved = expert_from_state_dict(change_of_basis(expert, 4, permutation_only=True), "moved", expert.metadata)
    layer = next(iter(expert.layers))
    (up, down), (moved_up, moved_down) = expert.layers[layer], moved.layers[layer]
    stacked = functions.co_merge_lora_factors(
        torch.stack([up, moved_up]), torch.stack([down, moved_down]), torch.ones(2, down.shape[1]), torch.ones(2, 2)
    )
    error = torch.linalg.norm(stacked[0] @ stacked[1] - up @ down) / torch.linalg.norm(up @ down)
    assert error > 0.1
    with pytest.raises(ValueError, match="records no LoRA initialisation"):
        co_merge([expert, moved], calibration(granularity="lora_factor"), pipeline=pipe)


SELF_MERGES = {
    "row": {"granularity": "row"},
    "element": {"granularity": "element", "storage": "svd", "rank": 4},
    "lora_factor": {"granularity": "lora_factor"},
    "linear mean": {"method": "linear", "weights": "mean"},
}


@pytest.mark.parametrize("settings", SELF_MERGES.values(), ids=SELF_MERGES.keys())
def test_merging_an_expert_with_itself_returns_it(pipe, shared_init_experts, settings):
    expert = load_expert(shared_init_experts[0])
    merged = co_merge([expert, expert], calibration(**settings), pipeline=pipe)
    torch.testing.assert_close(merged_deltas(merged), merged_deltas_of(expert), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "settings", [{"granularity": "row"}, {"granularity": "element"}, {"method": "linear"}], ids=str
)
def test_experts_on_disjoint_layers_merge_to_their_union(pipe, experts, settings):
    first, second = (load_expert(path) for path in experts)
    queries = expert_from_state_dict(with_layers(first, lambda key: ".to_q." in key), "queries")
    values = expert_from_state_dict(with_layers(second, lambda key: ".to_v." in key), "values")
    merged = co_merge([queries, values], calibration(**settings), pipeline=pipe)
    assert sorted(merged.layers) == sorted([*queries.layers, *values.layers])
    for expert in (queries, values):
        for layer in expert.layers:
            torch.testing.assert_close(merged.delta(layer), expert.delta(layer), atol=1e-5, rtol=1e-4)


def test_experts_on_overlapping_layers_merge_each_layer_among_those_that_target_it(pipe, experts):
    first, second = (load_expert(path) for path in experts)
    partial = expert_from_state_dict(with_layers(second, lambda key: ".attn2." in key), "cross-attention only")
    merged = co_merge([first, partial], calibration(), pipeline=pipe)
    for layer in first.layers:
        if layer in partial.layers:
            candidates = torch.stack([first.delta(layer), partial.delta(layer)])
            assert ((candidates - merged.delta(layer)).abs().amax(dim=2) < 1e-6).any(dim=0).all()
        else:
            torch.testing.assert_close(merged.delta(layer), first.delta(layer))


@pytest.mark.parametrize("settings", [{"granularity": "row"}, {"granularity": "element"}], ids=str)
def test_experts_of_different_ranks_and_alphas_merge_with_each_ones_own_scale(tmp_path, pipe, settings):
    narrow = make_expert(tmp_path / "narrow", pipe.unet, 5, "violence", rank=2, alpha=6.0)
    wide = make_expert(tmp_path / "wide", pipe.unet, 6, "sexual", rank=4, alpha=1.0)
    merged = co_merge([narrow, wide], calibration(**settings, storage="svd", rank=8), pipeline=pipe)
    raw = [load_file(str(folder / WEIGHTS)) for folder in (narrow, wide)]
    for layer in merged.layers:
        deltas = [
            scale * weights[f"unet.{layer}.lora_B.weight"] @ weights[f"unet.{layer}.lora_A.weight"]
            for scale, weights in zip((6.0 / 2, 1.0 / 4), raw, strict=True)
        ]
        unit = "rows" if settings["granularity"] == "row" else "elements"
        taken = (torch.stack(deltas) - merged.delta(layer)).abs()
        taken = taken.amax(dim=2) if unit == "rows" else taken
        assert (taken < 1e-4).any(dim=0).all()
    linear = co_merge([narrow, wide], CoMergeConfig(method="linear"))
    for layer in linear.layers:
        expected = sum(
            scale * weights[f"unet.{layer}.lora_B.weight"] @ weights[f"unet.{layer}.lora_A.weight"]
            for scale, weights in zip((6.0 / 2, 1.0 / 4), raw, strict=True)
        )
        torch.testing.assert_close(linear.delta(layer), expected)


def test_linear_mean_is_the_sum_divided_by_the_number_of_experts(experts):
    total = co_merge(experts, CoMergeConfig(method="linear"))
    mean = co_merge(experts, CoMergeConfig(method="linear", weights="mean"))
    torch.testing.assert_close(merged_deltas(mean), merged_deltas(total) / 2)


def test_the_report_says_how_often_the_data_changed_a_winner(experts, pipe, row_merge):
    assert 0.0 <= row_merge.report["data_free_disagreement"] <= 1.0
    element = co_merge(experts, calibration(granularity="element"), pipeline=pipe)
    assert element.report["data_free_disagreement"] == 0.0  # shared inputs: a plain magnitude pick, as proven above
    assert "data_free_disagreement" not in co_merge(experts, CoMergeConfig(method="linear")).report


def test_data_free_winners_are_the_magnitude_picks_of_each_granularity():
    ups = [torch.tensor([[3.0], [0.1]]), torch.tensor([[1.0], [1.0]])]  # (out=2, r=1)
    downs = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]  # (r=1, in=2)
    assert functions.data_free_winners("row", ups, downs)["rows"].tolist() == [0, 1]  # ||row||: [3, .1] vs [2, 2]
    assert functions.data_free_winners("element", ups, downs)["elements"].tolist() == [[0, 1], [0, 1]]
    factor = functions.data_free_winners("lora_factor", ups, downs)
    assert factor["up"].tolist() == [[0], [1]] and factor["down"].tolist() == [[0, 1]]
    torch.testing.assert_close(functions.row_norms(ups[0], downs[0]), (ups[0] @ downs[0]).norm(dim=1))


# ------------------------------------------------------------------------------------------ trained experts
@pytest.fixture(scope="module")
def trained_experts(tmp_path_factory) -> dict[str, object]:
    """Experts trained by SafetyDPOTrainer on the tiny pipeline: two with seed 0, one with seed 1."""
    from tiny_models import tiny_pairs

    from safety_dpo.trainer import SafetyDPOConfig, SafetyDPOTrainer

    root = tmp_path_factory.mktemp("trained")
    folders = {}
    for name, category, seed in (("violence", "violence", 0), ("sexual", "sexual", 0), ("other-seed", "sexual", 1)):
        args = SafetyDPOConfig(
            output_dir=str(root / name), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
            report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=seed, rank=2,
        )  # fmt: skip
        trainer = SafetyDPOTrainer(model=tiny_pipeline(), args=args, train_dataset=tiny_pairs(category=category))
        trainer.train()
        trainer.save_model()
        folders[name] = root / name
    return folders


def test_trained_experts_of_one_seed_record_one_initialisation_and_merge_factor_wise(trained_experts, pipe):
    same = [trained_experts["violence"], trained_experts["sexual"]]
    digests = {load_expert(path).metadata["lora"]["init_sha256"] for path in same}
    assert len(digests) == 1
    assert load_expert(trained_experts["other-seed"]).metadata["lora"]["init_sha256"] not in digests
    merged = co_merge(same, calibration(granularity="lora_factor"), pipeline=pipe)
    assert merged.report["storage"] == "exact"
    with pytest.raises(ValueError, match="other-seed' started from other LoRA factors"):
        co_merge([*same, trained_experts["other-seed"]], calibration(granularity="lora_factor"), pipeline=pipe)


@pytest.mark.parametrize("settings", [{"granularity": "row"}, {"method": "linear", "weights": "mean"}], ids=str)
def test_a_merge_of_trained_experts_does_not_depend_on_how_they_are_factored(trained_experts, pipe, settings):
    loaded = [load_expert(trained_experts[name]) for name in ("violence", "other-seed")]
    moved = expert_from_state_dict(change_of_basis(loaded[1], 7), "moved", loaded[1].metadata)
    original = co_merge(loaded, calibration(**settings), pipeline=pipe)
    refactored = co_merge([loaded[0], moved], calibration(**settings), pipeline=pipe)
    assert merged_deltas(original).abs().max() > 0
    torch.testing.assert_close(merged_deltas(refactored), merged_deltas(original), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ LoRAs from elsewhere
def kohya_state(expert: LoraExpert, alpha: float) -> dict[str, torch.Tensor]:
    """An expert as a Kohya-style file ("lora_unet_<layer with _>.lora_down/lora_up.weight", ".alpha")."""
    state = {}
    for layer, (up, down) in expert.layers.items():
        name = "lora_unet_" + layer.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def test_a_diffusers_dpo_script_lora_merges_like_our_own(tmp_path, experts):
    """diffusers' train_diffusion_dpo.py saves `convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`
    through `save_lora_weights`: "unet.<layer>.lora.down/up.weight" keys, no alpha (its LoraConfig has alpha = r)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    expert = load_expert(experts[0])
    peft_keys = {key.removeprefix("unet."): value for key, value in diffusers_state(expert).items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(peft_keys)
    )  # fmt: skip
    assert any(".lora.down." in key for key in load_file(str(tmp_path / WEIGHTS)))
    loaded = load_expert(tmp_path)
    torch.testing.assert_close(merged_deltas_of(loaded), merged_deltas_of(expert))


def test_a_kohya_style_lora_is_converted_by_diffusers_with_its_alpha(tmp_path, experts):
    expert = load_expert(experts[0])
    save_file(kohya_state(expert, alpha=4.0), str(tmp_path / "community.safetensors"))
    loaded = load_expert(tmp_path / "community.safetensors")
    torch.testing.assert_close(merged_deltas_of(loaded), 2.0 * merged_deltas_of(expert))  # alpha 4 / rank 2


def test_a_lora_on_convolutions_is_refused_naming_the_layer(tmp_path):
    state = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 4, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(4, 2, 1, 1),
    }
    with pytest.raises(ValueError, match="layer 'down_blocks.0.resnets.0.conv1' is not a linear LoRA"):
        expert_from_state_dict(state, name="locon")


# ------------------------------------------------------------------------------------------ saving and loading
def test_save_pretrained_writes_weights_metadata_and_card(tmp_path, experts, row_merge):
    folder = row_merge.save_pretrained(tmp_path / "merged")
    assert {path.name for path in folder.iterdir()} == {WEIGHTS, "safety_dpo.json", "README.md"}
    info = json.loads((folder / "safety_dpo.json").read_text())
    assert info["kind"] == "merged" and info["merge_config"] == calibration().to_dict()
    assert [entry["name"] for entry in info["merged_from"]] == [str(path) for path in experts]
    assert info["categories"] == ["violence", "sexual"] and info["architecture"] == "sd"


def test_diffusers_loads_the_merged_adapter_with_the_merged_deltas(tmp_path, row_merge):
    pipeline = tiny_pipeline()
    pipeline.load_lora_weights(str(row_merge.save_pretrained(tmp_path / "merged")), adapter_name="merged")
    for layer in row_merge.layers:
        torch.testing.assert_close(peft_delta(pipeline, layer, "merged"), row_merge.delta(layer))


def test_loading_the_merged_adapter_changes_the_output_as_adding_its_deltas_to_the_base_weights(tmp_path, row_merge):
    base = latents(tiny_pipeline())
    with_lora = tiny_pipeline()
    with_lora.load_lora_weights(str(row_merge.save_pretrained(tmp_path / "merged")))
    by_hand = tiny_pipeline()
    with torch.no_grad():
        for layer in row_merge.layers:
            by_hand.unet.get_submodule(layer).weight += row_merge.delta(layer)
    aligned = latents(with_lora)
    assert (aligned - base).abs().max() > 1e-3
    torch.testing.assert_close(aligned, latents(by_hand), atol=1e-5, rtol=1e-4)


def test_push_to_hub_uploads_weights_metadata_and_card(hub, row_merge):
    from huggingface_hub import HfApi

    row_merge.push_to_hub("team/merged")
    assert {WEIGHTS, "safety_dpo.json", "README.md"} <= set(HfApi().list_repo_files("team/merged"))


def test_co_merge_reads_an_expert_by_hub_id(hub, experts):
    from safety_dpo.hub import push_folder

    push_folder(experts[1], "team/sexual-expert")
    merged = co_merge([experts[0], "team/sexual-expert"], CoMergeConfig(method="linear"))
    assert merged.merged_from[1]["name"] == "team/sexual-expert"
    torch.testing.assert_close(merged_deltas(merged), merged_deltas(co_merge(experts, CoMergeConfig(method="linear"))))


# ------------------------------------------------------------------------------------------ subfolders, Hub caches
@pytest.fixture
def nested(tmp_path, pipe, experts):
    """A folder holding the violence expert in "x/", and the sexual expert in "x/sub/file.safetensors" with its own
    safety_dpo.json beside it."""
    root = tmp_path / "nested"
    shutil.copytree(experts[0], root / "x")
    shutil.copytree(experts[1], root / "x" / "sub")
    (root / "x" / "sub" / WEIGHTS).rename(root / "x" / "sub" / "file.safetensors")
    return root


def test_load_expert_reads_the_adapter_and_its_safety_dpo_json_from_a_subfolder(nested, experts):
    expert = load_expert(nested, subfolder="x")
    assert expert.categories == ["violence"] and expert.name == f"{nested}/x"
    torch.testing.assert_close(merged_deltas_of(expert), merged_deltas_of(load_expert(experts[0])))


@pytest.mark.parametrize(("source", "subfolder"), [("nested", "x"), ("nested/x", None)])
def test_a_weight_name_in_a_sub_folder_reads_the_safety_dpo_json_beside_it(nested, experts, source, subfolder):
    expert = load_expert(nested.parent / source, weight_name="sub/file.safetensors", subfolder=subfolder)
    assert expert.categories == ["sexual"]
    torch.testing.assert_close(merged_deltas_of(expert), merged_deltas_of(load_expert(experts[1])))


@pytest.mark.parametrize("subfolder", ["../x", "x/../../y", "/etc", "C:\\adapters", "\\\\server\\share"])
def test_a_subfolder_outside_the_repo_is_refused_before_any_download(subfolder):
    # offline: a download would raise FileNotFoundError; the name is refused first
    with pytest.raises(ValueError, match=rf"subfolder={re.escape(repr(subfolder))} points outside .*'org/adapter'"):
        load_expert("org/adapter", subfolder=subfolder)


def test_a_subfolder_is_refused_for_a_state_dict_a_file_or_a_loaded_expert(experts):
    loaded = load_expert(experts[0])
    for source in (diffusers_state(loaded), experts[0] / WEIGHTS, loaded):
        with pytest.raises(ValueError, match="subfolder='x' applies to a folder or Hub repo, not to a file"):
            load_expert(source, subfolder="x")


def test_a_missing_subfolder_is_reported_by_name(nested):
    with pytest.raises(FileNotFoundError, match=f"'{nested}' has no folder 'y'"):
        load_expert(nested, subfolder="y")


def test_a_subfolder_linked_out_of_the_folder_is_refused(tmp_path, nested):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "x").symlink_to(nested / "x", target_is_directory=True)
    with pytest.raises(ValueError, match="subfolder='x' points outside .* resolves to"):
        load_expert(tmp_path / "repo", subfolder="x")


def test_a_weight_file_in_a_subfolder_linked_out_of_it_is_refused(tmp_path, experts):
    (tmp_path / "repo" / "x").mkdir(parents=True)
    (tmp_path / "repo" / "x" / WEIGHTS).symlink_to(experts[0] / WEIGHTS)
    with pytest.raises(ValueError, match="weight_name='pytorch_lora_weights.safetensors' points outside .* resolves"):
        load_expert(tmp_path / "repo", subfolder="x")


def test_co_merge_reads_every_expert_from_the_same_subfolder(tmp_path, experts):
    for expert in experts:
        shutil.copytree(expert, tmp_path / expert.name / "x")
    config = CoMergeConfig(method="linear")
    merged = co_merge([tmp_path / expert.name for expert in experts], config, subfolder="x")
    assert [entry["name"] for entry in merged.merged_from] == [f"{tmp_path / expert.name}/x" for expert in experts]
    torch.testing.assert_close(merged_deltas(merged), merged_deltas(co_merge(experts, config)))


def downloaded(hub) -> set[str]:
    """The paths of the repo files the loopback Hub has served ("/<org>/<name>/resolve/<revision>/<path>")."""
    return {line.split()[1].split("/", 5)[5] for line in hub.server.store.requests if "/resolve/" in line}


@pytest.fixture
def nested_repo(hub, nested, experts):
    """ "team/nested": `nested`, with a second expert in "y/" and a weight file at the root, none of them needed."""
    shutil.copytree(experts[1], nested / "y")
    save_file(random_lora(tiny_pipeline().unet, 5), str(nested / WEIGHTS))
    HfApi().create_repo("team/nested")
    HfApi().upload_folder(folder_path=nested, repo_id="team/nested")
    return "team/nested"


def test_load_expert_downloads_only_the_subfolders_files_from_the_hub(hub, nested_repo, experts):
    expert = load_expert(nested_repo, subfolder="x", weight_name=WEIGHTS)
    assert expert.categories == ["violence"] and expert.name == "team/nested/x"
    assert downloaded(hub) == {f"x/{WEIGHTS}", "x/safety_dpo.json"}
    torch.testing.assert_close(merged_deltas_of(expert), merged_deltas_of(load_expert(experts[0])))


def test_a_hub_weight_name_in_a_sub_folder_reads_the_safety_dpo_json_beside_it(hub, nested_repo, experts):
    expert = load_expert(nested_repo, subfolder="x", weight_name="sub/file.safetensors")
    assert expert.categories == ["sexual"]
    assert downloaded(hub) == {"x/sub/file.safetensors", "x/sub/safety_dpo.json"}
    torch.testing.assert_close(merged_deltas_of(expert), merged_deltas_of(load_expert(experts[1])))


def test_a_missing_hub_subfolder_is_reported_by_name(hub, nested_repo):
    with pytest.raises(FileNotFoundError, match="'team/nested' has no .safetensors file in 'y/z'"):
        load_expert(nested_repo, subfolder="y/z")


def test_a_weight_file_in_a_sub_folder_of_a_hub_cache_snapshot_is_accepted(hub, nested_repo, experts):
    """A snapshot's files are links into the repo cache's blobs/, outside the snapshot: that is allowed, also for a
    snapshot (or a folder in it) given by path."""
    snapshot = Path(snapshot_download(nested_repo))
    assert (snapshot / "x" / WEIGHTS).is_symlink()
    assert (snapshot / "x" / WEIGHTS).resolve().parent == snapshot.parents[1] / "blobs"
    expected = merged_deltas_of(load_expert(experts[0]))
    for expert in (
        load_expert(snapshot, subfolder="x"),
        load_expert(snapshot / "x"),
        load_expert(nested_repo, subfolder="x"),
    ):
        assert expert.categories == ["violence"]
        torch.testing.assert_close(merged_deltas_of(expert), expected)


def test_a_link_in_a_hub_cache_snapshot_to_a_file_outside_its_blobs_is_refused(tmp_path, experts):
    repo_cache = tmp_path / "models--team--hostile"
    (repo_cache / "blobs").mkdir(parents=True)
    folder = repo_cache / "snapshots" / ("0" * 40) / "x"
    folder.mkdir(parents=True)
    (folder / WEIGHTS).symlink_to(experts[0] / WEIGHTS)
    with pytest.raises(ValueError, match="points outside the adapter folder .* resolves to"):
        load_expert(folder.parent, subfolder="x")
    (folder / WEIGHTS).unlink()
    shutil.copy(experts[0] / WEIGHTS, repo_cache / "blobs" / "0123")
    (folder / WEIGHTS).symlink_to(repo_cache / "blobs" / "0123")
    assert load_expert(folder.parent, subfolder="x").layers


# ------------------------------------------------------------------------------------------ calibration hooks
def recorded_unet_pass(unet) -> dict[str, torch.Tensor]:
    """Run the UNet once and return every hooked layer's inputs (N, in), caught by hooks of our own."""
    inputs, handles = {}, []

    def catch(layer):
        def hook(module, args, output) -> None:
            inputs[layer] = args[0].reshape(-1, args[0].shape[-1])  # (N, in); each layer runs once per pass

        return hook

    for layer in attention_layers(unet):
        handles.append(unet.get_submodule(layer).register_forward_hook(catch(layer)))
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 16, 16, generator=generator), 10, torch.randn(2, 5, 32, generator=generator))
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def test_recorder_statistics_equal_a_hand_computation_on_the_tiny_unet(pipe):
    experts = [expert_from_state_dict(random_lora(pipe.unet, seed), name=f"e{seed}") for seed in (0, 1)]
    with ActivationRecorder(pipe.unet, experts, ["input", "hidden", "output"]) as recorder:
        recorder.recording = [0, 1]
        inputs = recorded_unet_pass(pipe.unet)
    for expert, means in zip(experts, recorder.means(), strict=True):
        for layer, (up, down) in expert.layers.items():
            x = inputs[layer]
            torch.testing.assert_close(means[layer]["input"], x.abs().mean(0))
            torch.testing.assert_close(means[layer]["hidden"], (x @ down.T).abs().mean(0))
            torch.testing.assert_close(means[layer]["output"], (x @ (up @ down).T).abs().mean(0))


def test_an_active_expert_adds_its_delta_to_the_hooked_layer_output(pipe):
    expert = expert_from_state_dict(random_lora(pipe.unet, 0), name="active")
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    caught = {}
    with ActivationRecorder(pipe.unet, [expert], ["output"]) as recorder:
        recorder.active = 0
        handle = pipe.unet.get_submodule(layer).register_forward_hook(  # after the recorder's: sees its output
            lambda module, args, output: caught.update(x=args[0], y=output)
        )
        recorded_unet_pass(pipe.unet)
        handle.remove()
    base = torch.nn.functional.linear(caught["x"], pipe.unet.get_submodule(layer).weight)
    torch.testing.assert_close(caught["y"], base + caught["x"] @ expert.delta(layer).T)


def test_recorder_removes_its_hooks_on_exit_even_after_an_error(pipe):
    expert = expert_from_state_dict(random_lora(pipe.unet, 0), name="e")
    with pytest.raises(RuntimeError), ActivationRecorder(pipe.unet, [expert], ["input"]) as recorder:
        assert all(module._forward_hooks for module in recorder.modules.values())
        raise RuntimeError
    assert not any(module._forward_hooks for module in recorder.modules.values())


@pytest.fixture
def two_experts(pipe) -> list[LoraExpert]:
    return [
        expert_from_state_dict(random_lora(pipe.unet, seed), name=name, metadata={"categories": [name]})
        for seed, name in enumerate(PROMPTS)
    ]


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [  # (prompts, recording experts, active expert) of every group
        ("shared", [(ALL_PROMPTS, [0, 1], None)]),  # one pass for everyone
        ("own_category", [(PROMPTS["violence"], [0], None), (PROMPTS["sexual"], [1], None)]),
        ("with_expert", [(ALL_PROMPTS, [0], 0), (ALL_PROMPTS, [1], 1)]),
    ],
)
def test_calibration_groups_of_each_input_mode(two_experts, inputs, expected):
    groups = calibration_groups(two_experts, PROMPTS, inputs)
    assert [(group.prompts, group.recording, group.active) for group in groups] == expected


def test_own_category_inputs_need_the_categories_of_every_expert(two_experts):
    two_experts[1].metadata = {}
    with pytest.raises(ValueError, match="'sexual' records none"):
        calibration_groups(two_experts, PROMPTS, "own_category")


def test_own_category_inputs_need_prompts_of_every_experts_category(two_experts):
    with pytest.raises(ValueError, match=r"category \['sexual'\] for expert 'sexual'"):
        calibration_groups(two_experts, {"violence": PROMPTS["violence"]}, "own_category")


def test_choose_prompts_is_a_seeded_choice_of_distinct_prompts_per_category():
    prompts = {"violence": ["a", "b", "c", "a", "d"], "sexual": ["x"]}
    chosen = choose_prompts(prompts, 3, seed=0)
    assert chosen == choose_prompts(prompts, 3, seed=0) and chosen["sexual"] == ["x"]
    assert len(set(chosen["violence"])) == 3 and set(chosen["violence"]) <= {"a", "b", "c", "d"}


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("info", "match"),
    [
        ({"unet_config_sha256": "0" * 64}, "different base UNet \\(fingerprint\\)"),
        ({"architecture": "sdxl"}, "different architecture.*'sdxl' vs 'sd'"),
    ],
)
def test_merge_rejects_experts_of_another_base_model_naming_the_expert(tmp_path, pipe, experts, info, match):
    other = make_expert(tmp_path / "other", pipe.unet, 2, **info)
    with pytest.raises(ValueError, match=f"Expert '{other}' was trained on a {match}"):
        co_merge([experts[0], other], CoMergeConfig(method="linear"))


def test_merge_rejects_experts_with_different_layer_shapes(experts):
    state = diffusers_state(load_expert(experts[0]))
    layer = sorted(load_expert(experts[0]).layers)[0]
    state[f"unet.{layer}.lora_A.weight"] = torch.randn(2, 99)
    with pytest.raises(ValueError, match=f"'state dict 1': layer '{layer}' maps 99 -> 8 features.*maps 8 -> 8"):
        co_merge([experts[0], state], CoMergeConfig(method="linear"))


def test_a_safetensors_file_without_lora_weights_is_refused(tmp_path):
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors' holds no LoRA weights.*found conv.weight"):
        load_expert(tmp_path / "model.safetensors")


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "expert.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        load_expert(tmp_path / "expert.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_files_are_refused_without_being_read(tmp_path, monkeypatch, suffix):
    def unpickle(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", unpickle)
    monkeypatch.setattr(pickle, "load", unpickle)
    path = tmp_path / f"expert{suffix}"
    path.write_bytes(pickle.dumps({"unet.x.lora_A.weight": 1}))
    with pytest.raises(ValueError, match=f"Expert '{path}' is a pickle file"):
        load_expert(path)


def test_a_folder_without_weights_is_refused_naming_its_pickles(tmp_path):
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"never read")
    with pytest.raises(
        FileNotFoundError, match=r"no pytorch_lora_weights.safetensors.*\['pytorch_lora_weights.bin'\]"
    ):
        load_expert(tmp_path)


def test_a_layer_without_its_b_factor_is_refused():
    with pytest.raises(ValueError, match="layer 'a.to_q' has \\['lora_A'\\] but needs lora_A and lora_B"):
        expert_from_state_dict({"unet.a.to_q.lora_A.weight": torch.ones(2, 3)}, name="half")


def test_merge_needs_one_weight_per_expert(experts):
    with pytest.raises(ValueError, match="weights has 1 entries for 2 experts"):
        co_merge(experts, CoMergeConfig(method="linear", weights=[1.0]))


def test_lora_factor_co_merge_refuses_experts_without_a_recorded_initialisation_naming_the_expert(experts, pipe):
    with pytest.raises(ValueError, match=f"only correct.*expert '{experts[0]}' records no LoRA initialisation"):
        co_merge(experts, calibration(granularity="lora_factor"), pipeline=pipe)


def test_lora_factor_co_merge_refuses_experts_of_another_initialisation(tmp_path, pipe, shared_init_experts):
    lora = {"rank": 4, "alpha": 4, "target_modules": list(TARGETS), "init_sha256": "0" * 64}
    wide = make_expert(tmp_path / "wide", pipe.unet, 2, "sexual", rank=4, lora=lora)
    with pytest.raises(ValueError, match=f"expert '{wide}' started from other LoRA factors than '.*violence'"):
        co_merge([shared_init_experts[0], wide], calibration(granularity="lora_factor"), pipeline=pipe)


def test_co_merge_without_calibration_prompts_or_dataset_is_refused(experts, pipe):
    with pytest.raises(ValueError, match="needs calibration prompts.*names no dataset"):
        co_merge(experts, CoMergeConfig(num_timesteps=2), pipeline=pipe)


def test_non_finite_merged_weights_are_not_saved_and_the_layer_is_named(tmp_path, experts):
    merged = co_merge(experts, CoMergeConfig(method="linear"))
    layer = sorted(merged.layers)[1]
    merged.layers[layer][0][0, 0] = float("inf")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=f"layer '{layer}' are not finite"):
        merged.save_pretrained(tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_a_merged_adapter_can_be_merged_again(tmp_path, experts):
    folder = co_merge(experts, CoMergeConfig(method="linear")).save_pretrained(tmp_path / "merged")
    again = co_merge([folder], CoMergeConfig(method="linear"))
    torch.testing.assert_close(merged_deltas(again), merged_deltas(co_merge(experts, CoMergeConfig(method="linear"))))


# ------------------------------------------------------------------------------------------ CoMergeConfig
def test_config_round_trips_through_json(tmp_path):
    config = CoMergeConfig(method="dare_ties", density=0.3, weights=[1, 2], calibration_prompts=PROMPTS, seed=7)
    config.to_json_file(tmp_path / "config.json")
    assert CoMergeConfig.from_json_file(tmp_path / "config.json") == config


def test_config_reads_the_merge_config_of_a_merged_adapter(tmp_path, row_merge):
    row_merge.save_pretrained(tmp_path / "merged")
    assert CoMergeConfig.from_json_file(tmp_path / "merged" / "safety_dpo.json") == row_merge.config


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("method", "fisher", "method='fisher'.*co_merge, cat, ties, dare_linear, dare_ties, magnitude_prune"),
        ("granularity", "column", "granularity='column'.*row, element, lora_factor"),
        ("inputs", "test", "inputs='test'.*shared, own_category, with_expert"),
        ("storage", "zip", "storage='zip'.*auto, exact, svd"),
        ("majority_sign_method", "mean", "majority_sign_method='mean'.*total, frequency"),
        ("density", 1.5, "density=1.5 must be in \\(0, 1\\]"),
        ("num_timesteps", 0, "num_timesteps=0 must be a positive integer"),
        ("rank", 0, "rank=0 must be a positive integer"),
        ("calibration_prompts", [], "calibration_prompts is empty"),
        ("weights", "median", "weights='median' is not supported.*'mean'"),
    ],
)
def test_config_rejects_a_bad_value_naming_the_field_and_what_it_accepts(field, value, match):
    with pytest.raises(ValueError, match=match):
        CoMergeConfig(**{field: value})


def test_config_refuses_exact_storage_for_ties():
    with pytest.raises(ValueError, match="storage='exact' is not possible for ties"):
        CoMergeConfig(method="ties", storage="exact")


def test_config_rejects_unknown_fields_listing_the_known_ones():
    with pytest.raises(ValueError, match="Unknown CoMergeConfig fields \\['methd'\\].*'method'"):
        CoMergeConfig.from_dict({"methd": "ties"})


# ------------------------------------------------------------------------------------------ safety-dpo merge
def test_cli_merge_writes_an_adapter_that_diffusers_loads(tmp_path, experts):
    output = tmp_path / "out"
    assert main(["merge", *map(str, experts), "--output-dir", str(output), "--method", "linear"]) == 0
    pipeline = tiny_pipeline()
    pipeline.load_lora_weights(str(output), adapter_name="merged")
    first, second = (load_expert(path) for path in experts)
    for layer in first.layers:
        torch.testing.assert_close(peft_delta(pipeline, layer, "merged"), first.delta(layer) + second.delta(layer))


def test_cli_merge_reports_a_bad_expert_path_in_one_line_and_returns_2(tmp_path, experts, capsys):
    missing = tmp_path / "no" / "such" / "expert"
    assert main(["merge", str(experts[0]), str(missing), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("safety-dpo merge: error:") and str(missing) in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_merge_refuses_an_output_dir_holding_an_expert(tmp_path, experts, capsys):
    weights = (experts[1] / WEIGHTS).read_bytes()
    assert main(["merge", str(experts[0]), "--output-dir", str(experts[1]), "--method", "linear"]) == 2
    assert "expert adapter, not a merge" in capsys.readouterr().err
    assert (experts[1] / WEIGHTS).read_bytes() == weights


def test_cli_merge_rejects_a_bad_option_before_loading_anything(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"), "--density", "2"]) == 2
    assert "CoMergeConfig.density=2.0 must be in (0, 1]" in capsys.readouterr().err
