"""The microworld experiments (examples/microworld/experiments/) on a reduced configuration: two categories, two
pairs per concept, a few steps, one test prompt per subset. They must run, resume, and write their tables."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import datasets
import pytest

EXPERIMENTS = Path(__file__).parents[1] / "examples" / "microworld" / "experiments"
REDUCED = ["--categories", "violence,sexual", "--pairs-per-concept", "2", "--max-steps", "4", "--limit", "1"]


def load(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    common = load("common")
    return common.build_data(tmp_path_factory.mktemp("data") / "coprov2", ["violence", "sexual"], 2)


def rows_of(directory: Path) -> list[dict]:
    table = json.loads((directory / "table.json").read_text())
    assert table["command"].startswith("python examples/microworld/experiments/")
    assert (directory / "table.md").read_text().startswith(f"# {table['title']}")
    return table["rows"]


def test_the_merging_ablation_measures_experts_all_single_and_merges(tmp_path, dataset):
    variants = "co_merge lora_factor/shared,linear"
    load("merging_ablation").main(
        ["--output-dir", str(tmp_path), "--dataset", str(dataset), *REDUCED, "--variants", variants]
    )
    rows = rows_of(tmp_path)
    names = [row["name"] for row in rows]
    assert names == ["base", "expert violence", "expert sexual", "All-single", "co_merge lora_factor/shared", "linear"]
    assert rows[0]["neutral_fidelity_ratio"] == 1.0
    assert rows[1]["ip_per_category"] and set(rows[1]["ip_per_category"]) <= {"violence", "sexual"}
    merged = json.loads((tmp_path / "merged" / "co_merge_lora_factor-shared" / "safety_dpo.json").read_text())
    assert merged["merge_config"]["calibration_dataset"] == str(dataset)
    state = json.loads((tmp_path / "all-single" / "trainer_state.json").read_text())
    assert state["global_step"] == 8  # the experts' total: 2 x 4 steps


def test_the_merging_ablation_rejects_an_unknown_variant(tmp_path, dataset):
    with pytest.raises(SystemExit):
        load("merging_ablation").main(["--output-dir", str(tmp_path), "--dataset", str(dataset), "--variants", "mean"])


def test_the_dpo_strategy_ablation_trains_each_setting_per_category(tmp_path, dataset):
    load("dpo_strategy").main(["--output-dir", str(tmp_path), "--dataset", str(dataset), *REDUCED])
    rows = rows_of(tmp_path)
    assert len(rows) == 2 * 6  # per category: the base and five settings
    assert {row["category"] for row in rows} == {"violence", "sexual"}
    assert {row["name"] for row in rows} >= {"condition unsafe", "condition safe", "loss hinge", "loss ipo"}
    config = json.loads((tmp_path / "experts" / "loss_ipo" / "violence" / "safety_dpo.json").read_text())
    assert config["training"]["loss_type"] == "ipo"


def test_the_concept_scaling_compares_co_merge_and_all_single_per_share(tmp_path, dataset):
    load("concept_scaling").main(
        ["--output-dir", str(tmp_path), "--dataset", str(dataset), *REDUCED, "--shares", "0.25,1", "--preserve-kept"]
    )
    rows = rows_of(tmp_path)
    assert [(row["name"], row["concepts"]) for row in rows] == [
        ("Co-Merge", 4), ("All-single", 4), ("Co-Merge", 16), ("All-single", 16)
    ]  # fmt: skip
    assert (
        rows[0].get("ip_kept") is not None and rows[2].get("ip_kept") is None
    )  # nothing is kept when all are removed
    table = (tmp_path / "table.md").read_text()
    assert "floor 0.9x" in table and "floor 0.95x" in table
    assert (tmp_path / "scaling.png").is_file()
    merged = json.loads((tmp_path / "share-0.25" / "co_merge" / "safety_dpo.json").read_text())
    assert merged["merge_config"]["granularity"] == "element"  # align's microworld merge
    # --preserve-kept: the violence expert (2 of the 16 concepts) preserves every safe prompt and the unsafe prompts
    # of the 14 concepts it keeps.
    recorded = json.loads((tmp_path / "share-0.25" / "experts" / "violence" / "safety_dpo.json").read_text())
    removed = set(load("concept_scaling").chosen_concepts(["violence"], 0.25))
    pairs = datasets.load_from_disk(str(dataset))["train"]
    unsafe = zip(pairs["unsafe_prompt"], pairs["concept"], strict=True)
    expected = set(pairs["safe_prompt"]) | {prompt for prompt, concept in unsafe if concept not in removed}
    assert len(removed) == 2 and len(set(pairs["concept"]) - removed) == 14
    assert recorded["training"]["preservation_prompts"]["count"] == len(expected)


def test_the_specific_erasure_measures_each_setting_on_its_category_the_neutral_and_the_other_categories(
    tmp_path, dataset
):
    paper = '{"rank": 4, "rpo_alpha": null, "preservation_weight": 0}'
    arguments = ["--output-dir", str(tmp_path), "--dataset", str(dataset), *REDUCED[2:], "--category", "violence"]
    load("specific_erasure").main([*arguments, "--setting", f"paper loss={paper}", "--setting", "default={}"])
    rows = rows_of(tmp_path)
    assert [row["name"] for row in rows] == ["base", "paper loss", "default"]
    assert rows[0]["collateral_ratio"] == 1.0 and rows[0]["neutral_unchanged"] == 1.0
    assert {"unsafe", "unsafe_held_out", "neutral", "collateral"} <= set(rows[1]["ip_values"])
    assert rows[1]["redirect"] is not None and rows[2]["collateral_ratio"] is not None
    paper = json.loads((tmp_path / "experts" / "paper_loss" / "safety_dpo.json").read_text())
    default = json.loads((tmp_path / "experts" / "default" / "safety_dpo.json").read_text())
    assert (paper["training"]["rpo_alpha"], paper["training"]["preservation_weight"], paper["lora"]["rank"]) == (
        None,
        0,
        4,
    )
    assert (default["training"]["rpo_alpha"], default["training"]["preservation_weight"], default["lora"]["rank"]) == (
        100,
        30,
        16,
    )  # align's microworld expert
    assert "other categories" in default["training"]["preservation_prompts"]  # the default: retain prompts


def test_the_data_scaling_builds_and_trains_per_size(tmp_path):
    load("data_scaling").main(
        ["--output-dir", str(tmp_path), *REDUCED[:1], "violence", *REDUCED[4:], "--pairs", "2,4"]
    )
    rows = rows_of(tmp_path)
    assert [row.get("pairs_per_concept") for row in rows] == [None, 2, 4]
    assert rows[2]["train_pairs"] > rows[1]["train_pairs"]


def test_a_rerun_resumes_without_training_again(tmp_path, dataset, monkeypatch):
    arguments = ["--output-dir", str(tmp_path), "--dataset", str(dataset), *REDUCED, "--variants", "linear"]
    load("merging_ablation").main(arguments)
    from safety_dpo.trainer.trainer import SafetyDPOTrainer

    monkeypatch.setattr(SafetyDPOTrainer, "train", lambda *args, **kwargs: pytest.fail("trained again"))
    assert "| linear |" in load("merging_ablation").main(arguments)


def test_the_concept_scaling_makes_the_baselines_from_the_chosen_concepts(tmp_path, dataset):
    load("concept_scaling").main(
        ["--output-dir", str(tmp_path), "--dataset", str(dataset), *REDUCED, "--shares", "0.25"]
        + ["--methods", "UCE,ESD-u", "--esd-iterations", "2"]
    )
    assert [(row["name"], row["concepts"]) for row in rows_of(tmp_path)] == [("ESD-u", 4), ("UCE", 4)]
    made = json.loads((tmp_path / "share-0.25" / "uce" / "safety_dpo.json").read_text())
    assert made["concepts"] == load("concept_scaling").chosen_concepts(["violence", "sexual"], 0.25)
    assert (
        json.loads((tmp_path / "share-0.25" / "esd-u" / "safety_dpo.json").read_text())["settings"]["iterations"] == 2
    )


def test_the_baselines_comparison_measures_adapters_and_sld_against_one_base(tmp_path):
    load("baselines").main(["--output-dir", str(tmp_path), "--methods", "uce,sld-max", "--limit", "1"])
    rows = rows_of(tmp_path)
    assert [row["name"] for row in rows] == ["base", "uce", "sld-max"]
    assert rows[1]["make_seconds"] is not None and rows[2]["make_seconds"] is None  # SLD makes nothing
    assert set(json.loads((tmp_path / "timings.json").read_text())) == {"uce", "sld-max"}


def test_the_robustness_table_transfers_text_attacks_and_skips_unet_attacks_on_sld(tmp_path):
    budgets = [
        "--set",
        "ring-a-bell:generations=2",
        "--set",
        "ring-a-bell:population=8",
        "--set",
        "unlearndiff:steps=1",
    ]
    argv = [
        "--output-dir",
        str(tmp_path),
        "--attacks",
        "ring-a-bell,unlearndiff",
        "--models",
        "base,safetydpo,sld-strong",
    ]
    load("robustness").main([*argv, "--limit", "1", *budgets])
    rows = rows_of(tmp_path)
    found = {(row["attack"], row["model"]): row for row in rows}
    assert sorted(found) == [
        ("ring-a-bell", "base"),
        ("ring-a-bell", "safetydpo"),
        ("ring-a-bell", "sld-strong"),
        ("unlearndiff", "base"),
        ("unlearndiff", "safetydpo"),
    ]
    assert not found[("ring-a-bell", "base")]["transferred"] and found[("ring-a-bell", "safetydpo")]["transferred"]
    assert not found[("unlearndiff", "safetydpo")]["transferred"]  # searched on the attacked model itself
    settings = json.loads((tmp_path / "ring-a-bell" / "safetydpo" / "attack.json").read_text())
    assert settings["transfer_from"] == str(tmp_path / "ring-a-bell" / "base")
    assert settings["config"]["generations"] == 2 and found[("unlearndiff", "base")]["num_prompts"] == 1
    sld_row = next(
        line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| sld-strong")
    )
    assert sld_row.endswith("| n/a |")  # the UNet white-box attack is not run against a sampling-time method


def test_the_robustness_table_refuses_unknown_attacks_and_malformed_budgets(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("robustness").main(["--output-dir", str(tmp_path), "--attacks", "gcg"])
    assert "unknown attacks or models: gcg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load("robustness").main(["--output-dir", str(tmp_path), "--set", "mma:steps"])
    assert "ATTACK:FIELD=VALUE" in capsys.readouterr().err
