"""What every baseline shares: the concepts it is given, `make_baseline`, the adapter folder and `safety-dpo baseline`.

The methods themselves are specified in test_baselines_esd.py, test_baselines_uce.py and test_baselines_sld.py.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from safety_dpo.baselines.concepts import erasure_targets
from safety_dpo.baselines.runner import baseline_seconds, make_baseline
from safety_dpo.baselines.saving import is_finished
from safety_dpo.cli import main
from safety_dpo.data.taxonomy import Category, Concept, Taxonomy
from safety_dpo.microworld import taxonomy as microworld_taxonomy
from tests.tiny_models import get_dummy_sd_components


def _taxonomy() -> Taxonomy:
    knife = Concept("knife", ("knife", "blade"), ("dagger",), counterpart="spoon", category="violence")
    gun = Concept("gun", ("gun",), ("pistol",), counterpart="ball", category="violence")
    nude = Concept("nude", ("nude",), ("naked",), counterpart="coat", category="sexual")
    spoon, ball = Concept("spoon", ("spoon",)), Concept("ball", ("ball",))
    return Taxonomy(
        categories=(Category("violence", (knife, gun)), Category("sexual", (nude,))), neutral=(spoon, ball)
    )


# ------------------------------------------------------------------------------------------------ what is erased
def test_targets_erase_every_trained_name_never_a_held_out_one_and_guide_each_to_its_counterpart():
    targets = erasure_targets(_taxonomy(), ["violence"])
    assert targets.categories == ["violence"]
    assert targets.concepts == ["knife", "gun"]
    assert targets.erase_prompts == ["knife", "blade", "gun"]
    assert targets.guide_prompts == ["spoon", "spoon", "ball"]
    assert not {"dagger", "pistol", "naked"} & set(targets.erase_prompts + targets.preserve_prompts)


def test_targets_preserve_the_neutral_concepts_and_the_harmful_ones_not_erased():
    targets = erasure_targets(_taxonomy(), ["violence"], ["knife"])
    assert targets.erase_prompts == ["knife", "blade"]
    assert targets.preserve_prompts == ["spoon", "ball", "gun", "nude"]
    assert erasure_targets(_taxonomy()).preserve_prompts == ["spoon", "ball"]  # everything harmful is erased


def test_targets_of_the_microworld_cover_its_56_concepts_with_their_trained_names():
    world = microworld_taxonomy()
    targets = erasure_targets(world)
    assert len(targets.concepts) == len(world.harmful_concepts) == 56
    assert len(targets.erase_prompts) == sum(len(concept.names) for concept in world.harmful_concepts)


def test_targets_refuse_unknown_categories_and_concepts_outside_the_chosen_categories():
    with pytest.raises(KeyError, match="violense.*known categories: violence, sexual"):
        erasure_targets(_taxonomy(), ["violense"])
    with pytest.raises(ValueError, match=r"\['nude'\] are not in the categories chosen \(violence\)"):
        erasure_targets(_taxonomy(), ["violence"], ["nude"])
    with pytest.raises(ValueError, match="neutral"):
        erasure_targets(_taxonomy(), None, ["spoon"])


# ------------------------------------------------------------------------------------------------ make_baseline
def test_make_baseline_refuses_an_unknown_method_and_points_sld_to_evaluate(tmp_path):
    with pytest.raises(ValueError, match="esd-u, uce.*sld-strong"):
        make_baseline("sld-strong", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_make_baseline_refuses_an_option_the_method_does_not_have(tmp_path):
    with pytest.raises(ValueError, match="uce has no option.*'iterations'.*its options are"):
        make_baseline("uce", tmp_path / "out", options={"iterations": 3})
    with pytest.raises(ValueError, match="guide='nothing'.*'counterpart' or 'empty'"):
        make_baseline("uce", tmp_path / "out", options={"guide": "nothing"})


def test_is_finished_reuses_the_same_settings_and_refuses_other_ones(tmp_path):
    assert not is_finished(tmp_path, "uce", {"lamb": 0.5})
    (tmp_path / "safety_dpo.json").write_text(
        json.dumps({"kind": "baseline", "method": "uce", "settings": {"lamb": 0.5}})
    )
    assert is_finished(tmp_path, "uce", {"lamb": 0.5})
    with pytest.raises(FileExistsError, match="other settings"):
        is_finished(tmp_path, "uce", {"lamb": 1.0})
    with pytest.raises(FileExistsError, match="baseline 'uce'"):
        is_finished(tmp_path, "esd-u", {"lamb": 0.5})


@pytest.fixture
def tiny_model(tmp_path):
    folder = tmp_path / "tiny-sd"
    StableDiffusionPipeline(**get_dummy_sd_components()).save_pretrained(folder)
    taxonomy_file = tmp_path / "taxonomy.json"
    _taxonomy().save(taxonomy_file)
    return folder, taxonomy_file


def test_uce_from_the_command_line_writes_an_adapter_that_pipelines_load_and_reuses_it(tiny_model, tmp_path, capsys):
    from safety_dpo.pipelines import StableDiffusionSafePipeline

    model, taxonomy_file = tiny_model
    out = tmp_path / "uce"
    command = ["baseline", "uce", "--model", str(model), "--taxonomy", str(taxonomy_file), "--output-dir", str(out)]
    assert main([*command, "--categories", "violence"]) == 0
    assert "load_safety_adapter" in capsys.readouterr().out
    metadata = json.loads((out / "safety_dpo.json").read_text())
    assert (metadata["kind"], metadata["method"], metadata["categories"]) == ("baseline", "uce", ["violence"])
    assert metadata["concepts"] == ["knife", "gun"]
    pipe = StableDiffusionSafePipeline.from_pretrained(model)
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    pipe.load_safety_adapter(str(out), fuse=True)
    changed = {name for name, p in pipe.unet.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".attn2.to_k." in name or ".attn2.to_v." in name for name in changed)
    recorded = baseline_seconds(out)
    weights = (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert main([*command, "--categories", "violence"]) == 0  # finished: reused, not made again
    assert baseline_seconds(out) == recorded and (out / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert main([*command, "--categories", "violence", "--lamb", "2.0"]) == 2  # other settings: refused, kept
    assert "other settings" in capsys.readouterr().err
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == weights


def test_baseline_refuses_another_methods_option_and_a_folder_holding_other_files(tmp_path, capsys):
    assert main(["baseline", "uce", "--iterations", "3", "--output-dir", str(tmp_path / "a")]) == 2
    assert "--iterations is an option of esd-u, not of uce" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert main(["baseline", "esd-u", "--output-dir", str(tmp_path / "b")]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------- reports of an SLD run
def test_an_sld_runs_report_and_comparison_name_its_method_and_two_presets_compare():
    from safety_dpo.evaluation.compare import _name, protocol_differences
    from safety_dpo.evaluation.report import _compared_with

    strong = {
        "model": "m",
        "safety_adapter": None,
        "method": {"name": "sld-strong", "config": {"guidance_scale": 2000}},
    }
    maximum = {**strong, "method": {"name": "sld-max", "config": {"guidance_scale": 5000}}}
    assert "sld-strong" in _compared_with(strong) and "none" not in _compared_with(strong)
    assert _compared_with({"model": "m", "safety_adapter": None, "method": None}).endswith("none (base model only)")
    assert _name(strong) == "m + sld-strong"
    assert protocol_differences(strong, maximum) == ([], [])


def test_every_baseline_flag_names_a_field_of_its_methods_config():
    import dataclasses

    from safety_dpo.baselines.esd import ESDConfig
    from safety_dpo.baselines.uce import UCEConfig
    from safety_dpo.cli.baseline import _OPTIONS

    fields = {
        "esd-u": {field.name for field in dataclasses.fields(ESDConfig)},
        "uce": {field.name for field in dataclasses.fields(UCEConfig)} | {"guide"},  # guide: make_baseline's own
    }
    assert all(field in fields[method] for method, field in _OPTIONS.values())
