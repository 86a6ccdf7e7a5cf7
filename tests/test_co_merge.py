"""Co-Merge: the merge rules on hand-built tensors, calibration hooks, co_merge on tiny experts, saving, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.utils import merge_utils
from safetensors.torch import save_file
from tiny_models import get_dummy_sd_components

from safety_dpo.cli import main
from safety_dpo.data.generation import config_digest
from safety_dpo.merging import CoMergeConfig, co_merge, functions
from safety_dpo.merging.calibration import ActivationRecorder, calibration_groups
from safety_dpo.merging.experts import expert_from_state_dict, load_expert

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROMPTS = {"violence": ["a knife", "a gun on a table"], "sexual": ["a bikini", "a nude figure"]}


# ------------------------------------------------------------------------------------------------ merge maths
def test_row_merge_takes_every_row_from_its_most_active_expert_exactly():
    torch.manual_seed(0)
    ups, downs = [torch.randn(4, 2), torch.randn(4, 3)], [torch.randn(2, 5), torch.randn(3, 5)]
    activations = torch.tensor([[1.0, 0.0, 5.0, 0.0], [0.0, 2.0, 1.0, 3.0]])  # rows 0, 2 -> expert 0; 1, 3 -> 1
    up, down, winners = functions.co_merge_rows(ups, downs, activations)
    assert winners.tolist() == [0, 1, 0, 1]
    assert up.shape == (4, 5) and down.shape == (5, 5)  # rank 2 + 3, no approximation
    expected = torch.stack([(ups[w] @ downs[w])[row] for row, w in enumerate([0, 1, 0, 1])])
    torch.testing.assert_close(up @ down, expected)


def test_element_merge_takes_every_weight_from_the_expert_with_the_largest_activation():
    deltas = torch.tensor([[[1.0, -4.0]], [[-2.0, 1.0]]])  # (K=2, out=1, in=2)
    inputs = torch.tensor([[1.0, 1.0], [1.0, 10.0]])  # expert 1's inputs are large on feature 1
    merged, winners = functions.co_merge_elements(deltas, inputs)
    # a_0 = [1, 4], a_1 = [2, 10]: expert 1 wins both, although |dW_0[0, 1]| = 4 > 1
    assert winners.tolist() == [[1, 1]]
    assert merged.tolist() == [[-2.0, 1.0]]


def test_naive_element_wise_co_merge_is_magnitude_selection():
    """With every expert's statistics from the same (base-model) inputs, the factor mean|x_j| is common to all
    experts and cancels in the comparison: the winners are those of |dW_e| alone, whatever the data. This is why
    the naive reading is not our default."""
    torch.manual_seed(1)
    deltas = torch.randn(3, 6, 7)
    for _ in range(5):
        shared = torch.rand(7) * 10
        _, winners = functions.co_merge_elements(deltas, shared.expand(3, 7))
        assert torch.equal(winners, deltas.abs().argmax(dim=0))


def test_lora_factor_merge_takes_a_and_b_entries_from_their_most_active_experts():
    ups = torch.tensor([[[1.0], [1.0]], [[3.0], [0.5]]])  # (K=2, out=2, r=1)
    downs = torch.tensor([[[2.0, 1.0]], [[1.0, 1.0]]])  # (K=2, r=1, in=2)
    inputs = torch.tensor([[1.0, 1.0], [1.0, 5.0]])
    hidden = torch.tensor([[1.0], [1.0]])
    up, down, up_winners, down_winners = functions.co_merge_lora_factors(ups, downs, inputs, hidden)
    assert down_winners.tolist() == [[0, 1]] and down.tolist() == [[2.0, 1.0]]
    assert up_winners.tolist() == [[1], [0]] and up.tolist() == [[3.0], [1.0]]


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_baselines_are_peft_merge_utils(method):
    torch.manual_seed(2)
    deltas, weights = [torch.randn(5, 4) for _ in range(3)], torch.tensor([1.0, 0.5, 2.0])
    torch.manual_seed(3)
    ours = functions.baseline_merge(method, deltas, weights, density=0.5)
    torch.manual_seed(3)
    if method == "linear":
        theirs = merge_utils.task_arithmetic(deltas, weights)
    elif method in ("ties", "dare_ties"):
        theirs = getattr(merge_utils, method)(deltas, weights, 0.5, "total")
    else:
        theirs = getattr(merge_utils, method)(deltas, weights, 0.5)
    torch.testing.assert_close(ours, theirs)


def test_refactorize_is_exact_at_full_rank_and_reports_the_truncation_error():
    torch.manual_seed(4)
    delta = torch.randn(6, 5)
    up, down, error = functions.refactorize(delta, 5)
    torch.testing.assert_close(up @ down, delta, atol=1e-5, rtol=1e-5)
    assert error < 1e-6
    up, down, error = functions.refactorize(delta, 2)
    assert up.shape == (6, 2) and down.shape == (2, 5)
    measured = (torch.linalg.norm(delta - up @ down) / torch.linalg.norm(delta)).item()
    assert error == pytest.approx(measured, rel=1e-4) and error > 0.1


# ------------------------------------------------------------------------------------------------ tiny experts
@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def attention_layers(unet) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ".attn" in name and name.endswith(TARGETS)
    }


def make_expert(directory, unet, seed: int, category: str, rank: int = 2, alpha: float | None = None, **metadata):
    """An expert folder as `safety-dpo train` writes it, with random LoRA factors."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in attention_layers(unet).items():
        state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator)
        state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
    directory.mkdir(parents=True)
    save_file(state, str(directory / "pytorch_lora_weights.safetensors"))
    info = {
        "kind": "expert",
        "base_model": "tiny-sd",
        "unet_config_sha256": config_digest(unet),
        "architecture": "sd",
        "categories": [category],
        "concepts": {category: ["knife"]},
        "lora": {"rank": rank, "alpha": alpha if alpha is not None else rank, "target_modules": list(TARGETS)},
        **metadata,
    }
    (directory / "safety_dpo.json").write_text(json.dumps(info))
    return directory


@pytest.fixture
def experts(tmp_path, pipe):
    return [
        make_expert(tmp_path / "violence", pipe.unet, 0, "violence"),
        make_expert(tmp_path / "sexual", pipe.unet, 1, "sexual"),
    ]


def calibration(**overrides) -> CoMergeConfig:
    return CoMergeConfig(calibration_prompts=PROMPTS, num_timesteps=2, calibration_batch_size=2, **overrides)


@pytest.mark.parametrize(
    "settings",
    [{"granularity": "row"}, {"granularity": "element"}, {"granularity": "lora_factor"}, {"method": "linear"}],
)
def test_merging_one_expert_returns_its_delta_with_the_scale_folded_in(tmp_path, pipe, settings):
    expert = make_expert(tmp_path / "one", pipe.unet, 0, "violence", rank=2, alpha=6.0)
    merged = co_merge([expert], calibration(**settings), pipeline=pipe)
    loaded = load_expert(expert)
    for layer in loaded.layers:
        up, down = loaded.layers[layer]
        assert merged.layers[layer][0].shape[1] == 2
        torch.testing.assert_close(merged.delta(layer), up @ down, atol=1e-5, rtol=1e-4)
    up, down = next(iter(loaded.layers.values()))
    from safetensors.torch import load_file

    raw = load_file(str(expert / "pytorch_lora_weights.safetensors"))
    name = next(iter(loaded.layers))
    torch.testing.assert_close(up @ down, 3.0 * raw[f"unet.{name}.lora_B.weight"] @ raw[f"unet.{name}.lora_A.weight"])


def test_row_co_merge_is_exact_and_takes_each_row_from_one_expert(pipe, experts):
    merged = co_merge(experts, calibration(), pipeline=pipe)
    loaded = [load_expert(path) for path in experts]
    assert merged.report["storage"] == "exact" and "svd_relative_error" not in merged.report
    for layer in loaded[0].layers:
        delta = merged.delta(layer)
        candidates = torch.stack([expert.delta(layer) for expert in loaded])
        matches = (candidates - delta).abs().amax(dim=2) < 1e-5  # (K, out): which expert's row each row is
        assert matches.any(dim=0).all()
    assert sum(merged.report["win_share"].values()) == pytest.approx(1.0)


def test_element_co_merge_on_shared_inputs_ignores_the_calibration_data_but_row_co_merge_does_not(pipe, experts):
    def deltas(config):
        merged = co_merge(experts, config, pipeline=pipe)
        return torch.cat([merged.delta(layer).flatten() for layer in sorted(merged.layers)])

    other_prompts = {"violence": ["a red circle"], "sexual": ["a dog in a park at night"]}
    element = [deltas(calibration(granularity="element", storage="svd", rank=4))]
    element.append(deltas(CoMergeConfig(calibration_prompts=other_prompts, num_timesteps=2, granularity="element")))
    torch.testing.assert_close(element[0], element[1])
    row = [deltas(calibration()), deltas(CoMergeConfig(calibration_prompts=other_prompts, num_timesteps=2))]
    assert not torch.allclose(row[0], row[1])


def test_ties_through_co_merge_matches_peft_on_the_experts_deltas(pipe, experts):
    merged = co_merge(experts, CoMergeConfig(method="ties", storage="svd", rank=64))
    loaded = [load_expert(path) for path in experts]
    for layer in loaded[0].layers:
        expected = merge_utils.ties([expert.delta(layer) for expert in loaded], torch.ones(2), 0.5, "total")
        torch.testing.assert_close(merged.delta(layer), expected, atol=1e-5, rtol=1e-4)


def test_merged_adapter_loads_in_stock_diffusers_and_changes_the_output(tmp_path, experts):
    pipe = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)  # loading wraps layers
    pipe.set_progress_bar_config(disable=True)
    merged = co_merge(experts, calibration(), pipeline=pipe)
    folder = merged.save_pretrained(tmp_path / "merged")
    assert {path.name for path in folder.iterdir()} >= {
        "pytorch_lora_weights.safetensors",
        "safety_dpo.json",
        "README.md",
    }
    info = json.loads((folder / "safety_dpo.json").read_text())
    assert info["kind"] == "merged" and [entry["name"] for entry in info["merged_from"]] == [str(p) for p in experts]
    assert info["merge_config"]["granularity"] == "row" and info["categories"] == ["violence", "sexual"]

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe("a knife", num_inference_steps=2, generator=generator, output_type="np").images

    base = generate()
    pipe.load_lora_weights(str(folder), adapter_name="merged")
    try:
        aligned = generate()
        layer = next(iter(merged.layers))
        module = pipe.unet.get_submodule(layer)
        loaded = module.lora_B["merged"].weight @ module.lora_A["merged"].weight * module.scaling["merged"]
        torch.testing.assert_close(loaded, merged.delta(layer))
    finally:
        pipe.delete_adapters("merged")
    assert abs(aligned - base).max() > 1e-3
    torch.testing.assert_close(torch.from_numpy(generate()), torch.from_numpy(base))


# ------------------------------------------------------------------------------------------------ calibration
def test_recorder_statistics_and_active_delta_match_a_hand_computation():
    layer = torch.nn.Linear(3, 2, bias=False)
    model = torch.nn.Sequential(layer)
    up, down = torch.tensor([[1.0], [-2.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    expert = expert_from_state_dict({"0.lora_A.weight": down, "0.lora_B.weight": up}, name="e")
    inputs = torch.tensor([[1.0, 2.0, -3.0], [0.0, -1.0, 1.0]])
    with ActivationRecorder(model, [expert], ["input", "hidden", "output"]) as recorder:
        recorder.recording = [0]
        base = model(inputs)
        recorder.active = 0
        active = model(inputs)
    stats = recorder.means()[0]["0"]
    torch.testing.assert_close(stats["input"], inputs.abs().mean(0))
    torch.testing.assert_close(stats["hidden"], (inputs @ down.T).abs().mean(0))
    torch.testing.assert_close(stats["output"], (inputs @ down.T @ up.T).abs().mean(0))
    torch.testing.assert_close(active, base + inputs @ (up @ down).T)
    assert not layer._forward_hooks  # removed on exit


def test_calibration_groups_per_input_mode(pipe, tmp_path):
    loaded = [
        load_expert(make_expert(tmp_path / "a", pipe.unet, 0, "violence")),
        load_expert(make_expert(tmp_path / "b", pipe.unet, 1, "sexual")),
    ]
    shared = calibration_groups(loaded, PROMPTS, "shared")
    assert len(shared) == 1 and shared[0].recording == [0, 1] and len(shared[0].prompts) == 4
    own = calibration_groups(loaded, PROMPTS, "own_category")
    assert [(group.prompts, group.recording) for group in own] == [
        (PROMPTS["violence"], [0]),
        (PROMPTS["sexual"], [1]),
    ]
    with_expert = calibration_groups(loaded, PROMPTS, "with_expert")
    assert [(group.recording, group.active) for group in with_expert] == [([0], 0), ([1], 1)]
    with pytest.raises(ValueError, match="no calibration prompts of category \\['sexual'\\]"):
        calibration_groups(loaded, {"violence": ["a knife"]}, "own_category")
    loaded[1].metadata = {}
    with pytest.raises(ValueError, match="records none"):
        calibration_groups(loaded, PROMPTS, "own_category")


# ------------------------------------------------------------------------------------------------ bad input
def test_experts_of_different_base_models_are_refused_naming_the_expert(tmp_path, pipe):
    first = make_expert(tmp_path / "a", pipe.unet, 0, "violence")
    other = make_expert(tmp_path / "b", pipe.unet, 1, "sexual", unet_config_sha256="0" * 64)
    with pytest.raises(ValueError, match=f"{other}.*base UNet \\(fingerprint\\)"):
        co_merge([first, other], CoMergeConfig(method="linear"))
    sdxl = make_expert(tmp_path / "c", pipe.unet, 1, "sexual", architecture="sdxl")
    with pytest.raises(ValueError, match="different architecture"):
        co_merge([first, sdxl], CoMergeConfig(method="linear"))


def test_experts_with_different_target_modules_or_shapes_are_refused(tmp_path, pipe):
    first = make_expert(tmp_path / "a", pipe.unet, 0, "violence")
    state = {key: value for key, value in load_expert(first).layers.items() if not key.endswith("to_q")}
    fewer = {f"{k}.lora_A.weight": d for k, (u, d) in state.items()} | {
        f"{k}.lora_B.weight": u for k, (u, d) in state.items()
    }
    with pytest.raises(ValueError, match="targets different layers.*missing"):
        co_merge([first, fewer], CoMergeConfig(method="linear"))
    layers = load_expert(first).layers
    wrong = {f"{k}.lora_A.weight": d for k, (u, d) in layers.items()} | {
        f"{k}.lora_B.weight": u for k, (u, d) in layers.items()
    }
    layer = sorted(layers)[0]
    wrong[f"{layer}.lora_A.weight"] = torch.randn(2, 99)
    with pytest.raises(ValueError, match=f"'state dict 1': layer '{layer}' maps 99 -> "):
        co_merge([first, wrong], CoMergeConfig(method="linear"))


def test_files_that_are_not_lora_weights_and_pickles_are_refused(tmp_path):
    not_lora = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    with pytest.raises(ValueError, match="holds no LoRA weights.*conv.weight"):
        load_expert(not_lora)
    pickle = tmp_path / "expert.bin"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        load_expert(pickle)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors"):
        load_expert(tmp_path / "empty")


def test_non_finite_merged_weights_are_not_saved_and_the_layer_is_named(tmp_path, pipe, experts):
    merged = co_merge(experts, CoMergeConfig(method="linear"))
    layer = sorted(merged.layers)[1]
    merged.layers[layer][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{layer}.*not finite"):
        merged.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_validates_round_trips_and_reads_a_merged_adapter(tmp_path, pipe, experts):
    with pytest.raises(ValueError, match="granularity='column'.*row, element, lora_factor"):
        CoMergeConfig(granularity="column")
    with pytest.raises(ValueError, match="storage='exact' is not possible for ties"):
        CoMergeConfig(method="ties", storage="exact")
    with pytest.raises(ValueError, match="weights has 1 entries for 2 experts"):
        co_merge(experts, CoMergeConfig(method="linear", weights=[1.0]))
    config = CoMergeConfig(method="dare_ties", density=0.3, weights=[1, 2])
    config.to_json_file(tmp_path / "config.json")
    assert CoMergeConfig.from_json_file(tmp_path / "config.json") == config
    co_merge(experts, config).save_pretrained(tmp_path / "merged")
    assert CoMergeConfig.from_json_file(tmp_path / "merged" / "safety_dpo.json") == config


# ------------------------------------------------------------------------------------------------ CLI and Hub
def test_cli_merges_and_refuses_to_overwrite_an_expert(tmp_path, experts, capsys):
    assert main(["merge", *map(str, experts), "--output-dir", str(tmp_path / "out"), "--method", "linear"]) == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["merge", str(experts[0]), "--output-dir", str(experts[1]), "--method", "linear"]) == 2
    assert "holds a expert adapter" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing.pt"), "--output-dir", str(tmp_path / "x")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_experts_from_the_hub_and_push_to_hub(hub, tmp_path, experts):
    from huggingface_hub import HfApi

    from safety_dpo.hub import push_folder

    push_folder(experts[1], "team/sexual-expert")
    merged = co_merge([experts[0], "team/sexual-expert"], CoMergeConfig(method="linear"))
    assert merged.merged_from[1]["name"] == "team/sexual-expert"
    merged.push_to_hub("team/merged")
    files = set(HfApi().list_repo_files("team/merged"))
    assert {"pytorch_lora_weights.safetensors", "safety_dpo.json", "README.md"} <= files
