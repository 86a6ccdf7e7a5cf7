"""Evaluation protocols (issue 19): each preset's pinned settings, the refusals, the naming of every number (IP only for
a protocol's detectors, FID only for pytorch-fid's Inception), clustered standard errors, scorer provenance, and
`safety-dpo evaluate --compare`."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import types

import pytest
import torch
from PIL import Image

from safety_dpo import cli
from safety_dpo.cli import evaluate as evaluate_command
from safety_dpo.evaluation import quality, runner, scoring
from safety_dpo.evaluation.compare import compare_results
from safety_dpo.evaluation.detectors import Detector, NudeNetDetector
from safety_dpo.evaluation.ip import clustered_standard_error, share_with_error, standard_error
from safety_dpo.evaluation.prompts import EvalPrompt, PromptSet
from safety_dpo.evaluation.protocols import (
    PAPER_CLIP_MODEL,
    PROTOCOLS,
    check_requirements,
    ip_metric_name,
    resolve_protocol,
)
from safety_dpo.evaluation.q16 import Q16_CLIP_MODEL
from safety_dpo.evaluation.runner import run_evaluation

Q16_OPTIONS = {"q16": {"prompts": "q16_prompts.safetensors"}}


# ----------------------------------------------------------------------------------------------- pinned settings
def test_the_i2p_protocol_pins_ten_images_its_detectors_and_the_prompts_own_guidance():
    settings = resolve_protocol("i2p", {}, has_model=True)
    assert settings["prompts"] == "i2p" and settings["images_per_prompt"] == 10
    assert sorted(settings["detectors"]) == ["nudenet:i2p", "q16"]
    assert settings["num_inference_steps"] == 50 and settings["resolution"] == 512
    assert settings["guidance_scale"] is None  # each I2P prompt's own sd_guidance_scale
    assert settings["fid_features"] == "none" and settings["clip_model"] == "none"


def test_the_safetydpo_protocol_pins_the_papers_scorers_and_takes_the_prompts_it_is_given():
    settings = resolve_protocol("safetydpo", {"prompts": "coco"}, has_model=True)
    assert settings["prompts"] == "coco" and settings["images_per_prompt"] == 1 and settings["seed"] == 0
    assert sorted(settings["detectors"]) == ["nudenet:safetydpo", "q16"]
    assert settings["fid_features"] == "inception" and settings["clip_model"] == PAPER_CLIP_MODEL
    assert settings["num_inference_steps"] == 50 and settings["guidance_scale"] == 7.5
    with pytest.raises(ValueError, match="used on several prompt sets; name one with --prompts"):
        resolve_protocol("safetydpo", {}, has_model=True)


def test_the_microworld_protocol_pins_the_judge_and_its_features():
    settings = resolve_protocol("microworld", {}, has_model=False)
    assert settings["detectors"] == ["judge"] and settings["fid_features"] == "judge"
    assert settings["prompts"] == "microworld" and settings["clip_model"] == "none"
    assert settings["images_per_prompt"] == 4  # the microworld protocol's seeds 0-3
    with pytest.raises(ValueError, match=r"num_inference_steps=30 \(the protocol pins the default\)"):
        resolve_protocol("microworld", {"num_inference_steps": 30}, has_model=False)


def test_a_setting_that_contradicts_a_protocol_is_refused_naming_both_values():
    with pytest.raises(ValueError, match=r"images_per_prompt=4 \(the protocol pins 10\)"):
        resolve_protocol("i2p", {"images_per_prompt": 4}, has_model=True)
    with pytest.raises(ValueError, match=r"detectors=\['nudenet:i2p'\]"):
        resolve_protocol("i2p", {"detectors": ["nudenet"]}, has_model=True)
    with pytest.raises(ValueError, match=r"guidance_scale=9.0 \(the protocol pins 7.5\)"):
        resolve_protocol("safetydpo", {"prompts": "i2p", "guidance_scale": 9.0}, has_model=True)
    with pytest.raises(ValueError, match=r"guidance_scale=7.5 \(the protocol pins the default\)"):
        resolve_protocol("i2p", {"guidance_scale": 7.5}, has_model=True)  # I2P draws with each prompt's own
    # The pinned values themselves, a spelled-out alias and a mirror of the pinned prompt set are accepted.
    same = {"images_per_prompt": 10, "detectors": ["q16", "nudenet"], "prompts": "i2p:org/i2p-mirror"}
    assert resolve_protocol("i2p", same, has_model=True)["prompts"] == "i2p:org/i2p-mirror"


def test_a_protocol_for_the_other_kind_of_model_is_refused():
    with pytest.raises(ValueError, match="needs a real text-to-image model"):
        resolve_protocol("i2p", {}, has_model=False)
    with pytest.raises(ValueError, match="scores the microworld checkpoint; drop --model"):
        resolve_protocol("microworld", {}, has_model=True)
    with pytest.raises(ValueError, match="Unknown protocol 'sld'; choose one of microworld, i2p, safetydpo"):
        resolve_protocol("sld", {}, has_model=True)


def test_missing_parts_are_listed_with_how_to_get_them(monkeypatch):
    from safety_dpo.evaluation import protocols

    monkeypatch.setattr(protocols, "_installed", lambda module: module not in ("pytorch_fid", "torchvision"))
    with pytest.raises(ValueError) as error:
        check_requirements("safetydpo", {})
    message = str(error.value)
    assert "safety-dpo convert-q16" in message and "--q16-prompts" in message
    assert "pip install 'safety_dpo[fid]'" in message and "Nothing was written" in message
    check_requirements("i2p", Q16_OPTIONS)  # NudeNet is installed, Q16's prompts are named: nothing missing
    check_requirements("microworld", {})


def test_a_refused_protocol_writes_nothing(tmp_path):
    output = tmp_path / "eval"
    with pytest.raises(ValueError, match="Q16's prompt embeddings"):
        run_evaluation(output, model="some/model", protocol="i2p", progress=False)
    with pytest.raises(ValueError, match="pins its detectors' settings"):
        run_evaluation(
            output,
            model="some/model",
            protocol="i2p",
            detector_options={**Q16_OPTIONS, "nudenet": {"threshold": 0.3}},
            progress=False,
        )
    with pytest.raises(ValueError, match="images_per_prompt=2"):
        run_evaluation(output, protocol="microworld", images_per_prompt=2, progress=False)
    assert not output.exists()


def test_the_cli_lists_exactly_the_librarys_protocols_and_feature_extractors():
    assert evaluate_command._PROTOCOLS == tuple(PROTOCOLS)
    assert evaluate_command._FID_FEATURES == quality.FID_FEATURES


def test_the_cli_refuses_a_contradicting_setting_with_exit_status_2(tmp_path, capsys):
    arguments = [
        "evaluate",
        "--protocol",
        "microworld",
        "--images-per-prompt",
        "2",
        "--output-dir",
        str(tmp_path / "x"),
    ]
    assert cli.main(arguments) == 2
    assert "images_per_prompt=2 (the protocol pins 4)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------------- naming
def _nudenet_settings(preset: str, **changes) -> dict:
    return {**NudeNetDetector(preset).settings(), **changes}


def test_only_a_protocols_full_detector_set_with_its_settings_makes_ip():
    q16 = {"detector": "q16", "clip_model": Q16_CLIP_MODEL}
    assert ip_metric_name({"nudenet:i2p": _nudenet_settings("i2p"), "q16": q16}) == "ip"
    assert ip_metric_name({"nudenet:safetydpo": _nudenet_settings("safetydpo"), "q16": q16}) == "ip"
    assert ip_metric_name({"nudenet:i2p": _nudenet_settings("i2p")}) == "ip_nudenet:i2p"
    assert ip_metric_name({"q16": q16}) == "ip_q16"
    changed = {"nudenet:i2p": _nudenet_settings("i2p", threshold=0.3), "q16": q16}
    assert ip_metric_name(changed) == "ip_nudenet:i2p+q16"  # the right detectors, not the protocol's settings
    other_clip = {"nudenet:i2p": _nudenet_settings("i2p"), "q16": {**q16, "clip_model": "some/clip"}}
    assert ip_metric_name(other_clip) == "ip_nudenet:i2p+q16"
    # Mixing presets is no protocol either.
    assert ip_metric_name({"nudenet:safetydpo": _nudenet_settings("safetydpo"), "judge": {}}).startswith("ip_")


# ------------------------------------------------------------------------------------------ clustered standard errors
def test_the_clustered_standard_error_follows_its_formula_on_hand_numbers():
    # Two prompts, all of one flagged, none of the other: p = 0.5, cluster residual sums +1 and -1.
    assert clustered_standard_error([1, 1, 0, 0], ["a", "a", "b", "b"]) == pytest.approx(math.sqrt(2 / 1 * 2) / 4)
    # The same four images as independent draws: the binomial error is half as large.
    assert standard_error(0.5, 4) == pytest.approx(0.25)
    # Flags that do not depend on the prompt: each prompt one flagged, one not; residual sums 0, no spread.
    assert clustered_standard_error([1, 0, 1, 0], ["a", "a", "b", "b"]) == 0.0
    # One image per prompt: sqrt(p (1 - p) / (N - 1)).
    flags = [1, 0, 0, 1, 1, 0, 0, 0]
    assert clustered_standard_error(flags, range(8)) == pytest.approx(math.sqrt(0.375 * 0.625 / 7))
    assert clustered_standard_error([1, 0], ["a", "a"]) is None  # one prompt: nothing to estimate from


def test_the_clustered_error_agrees_with_a_bootstrap_over_prompts():
    generator = torch.Generator().manual_seed(0)
    rates = torch.rand(40, generator=generator)
    flags = (torch.rand(40, 5, generator=generator) < rates[:, None]).flatten().tolist()
    clusters = [prompt for prompt in range(40) for _ in range(5)]
    per_prompt = torch.tensor(flags, dtype=torch.float64).view(40, 5).mean(1)
    draws = torch.randint(0, 40, (4000, 40), generator=generator)
    bootstrap = per_prompt[draws].mean(1).std().item()
    assert clustered_standard_error(flags, clusters) == pytest.approx(bootstrap, rel=0.1)
    assert share_with_error(flags, clusters)["standard_error_method"].startswith("clustered by prompt (40 prompts")
    assert share_with_error(flags[:40:5], list(range(8)))["standard_error_method"] == "binomial"


# ----------------------------------------------------------------------- a protocol run: what reaches the drawing
class _FakeQ16(Detector):
    """Q16's interface and reference settings, flagging every image of the first prompt (seen by its colour)."""

    name = "q16"

    def settings(self):
        return {"detector": "q16", "clip_model": Q16_CLIP_MODEL, "prompts_sha256": "test", "rule": "argmax"}

    def detect(self, images):
        return [{"flagged": image.getpixel((0, 0))[0] > 128, "probability": 0.0} for image in images]


def test_an_i2p_run_draws_with_the_pinned_settings_and_reports_ip_with_clustered_errors(tmp_path, monkeypatch):
    drawn = []

    def fake_draw(pipeline, jobs, cache, generation, *args, **kwargs):
        for job in jobs:
            drawn.append((job, runner._guidance(job, generation), dict(generation)))
            cache.write(job, Image.new("RGB", (64, 64), (255 if job.index == 0 else 0, 0, 0)))

    def fake_scorers(specs, options, is_microworld, fid_features, clip_model):
        assert sorted(specs) == ["nudenet:i2p", "q16"] and fid_features == "none" and clip_model == "none"
        return scoring.Scorers({"nudenet:i2p": NudeNetDetector("i2p"), "q16": _FakeQ16()})

    monkeypatch.setattr(runner, "draw_images", fake_draw)
    monkeypatch.setattr(runner, "load_pipeline", lambda *args: object())
    monkeypatch.setattr(scoring, "load_scorers", fake_scorers)
    prompts = PromptSet(
        "i2p",
        "i2p",
        [EvalPrompt("a", seed=11, categories=("violence",), subset="i2p", guidance_scale=6.0),
         EvalPrompt("b", seed=20, categories=("hate",), subset="i2p", guidance_scale=9.0)],
    )  # fmt: skip
    results = run_evaluation(
        tmp_path, model="tiny/sd", prompts=prompts, protocol="i2p", detector_options=Q16_OPTIONS, progress=False
    )
    assert len(drawn) == 20 and {job.seed for job, _, _ in drawn if job.index == 0} == set(range(11, 21))
    assert {guidance for job, guidance, _ in drawn if job.index == 1} == {9.0}  # the prompt's own guidance
    generation = drawn[0][2]
    assert generation["num_inference_steps"] == 50 and generation["resolution"] == 512
    assert results["metrics"]["ip"] == "ip" and results["protocol"]["name"] == "i2p"
    assert results["protocol"]["preset"]["images_per_prompt"] == 10
    ip = results["models"]["base"]["ip"]
    assert ip["value"] == 0.5 and ip["standard_error_method"].startswith("clustered by prompt (2 prompts")
    assert ip["standard_error"] == pytest.approx(0.5)  # sqrt(2 * (5^2 + 5^2)) / 20
    assert ip["per_subset"]["i2p"]["per_category"]["violence"]["value"] == 1.0


# -------------------------------------------------------------------------------------------------- FID's Inception
def _fake_pytorch_fid(monkeypatch) -> dict:
    """A stand-in `pytorch_fid` that records how it is built and fed."""
    seen: dict = {"inputs": []}
    package, module = types.ModuleType("pytorch_fid"), types.ModuleType("pytorch_fid.inception")
    module.FID_WEIGHTS_URL = "https://example.invalid/pt_inception-2015-12-05-6726825d.pth"

    def original_loader(url, progress=True):
        raise AssertionError("pytorch-fid's own loader unpickles without weights_only; it must not be used")

    module.load_state_dict_from_url = original_loader

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks, resize_input, normalize_input):
            super().__init__()
            seen.update(blocks=blocks, resize_input=resize_input, normalize_input=normalize_input)
            seen["state"] = module.load_state_dict_from_url(module.FID_WEIGHTS_URL, progress=True)
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            seen["inputs"].append(x.clone())
            features = x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]  # (N, 2048), distinct per image
            return [features[:, :, None, None]]

    module.InceptionV3 = InceptionV3
    package.inception = module
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    monkeypatch.setattr(quality, "_load_weights_only", lambda url, progress=True: {"checked": url})
    seen["module"], seen["original_loader"] = module, original_loader
    return seen


def test_fid_features_are_fed_as_pytorch_fid_feeds_its_inception(monkeypatch):
    seen = _fake_pytorch_fid(monkeypatch)
    extractor, description = quality.fid_feature_extractor("inception")
    assert seen["blocks"] == [3] and seen["resize_input"] and seen["normalize_input"]
    assert seen["state"] == {"checked": seen["module"].FID_WEIGHTS_URL}  # weights through the weights-only loader
    assert seen["module"].load_state_dict_from_url is seen["original_loader"]  # restored afterwards
    assert description["features"] == "inception" and description["implementation"] == "pytorch-fid"
    images = [Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (512, 512), (0, 51, 0))]
    images.append(Image.new("RGB", (64, 48), (0, 0, 102)))
    features = quality.extract_features(images, extractor)
    shapes = sorted(tuple(batch.shape) for batch in seen["inputs"])
    assert shapes == [(1, 3, 512, 512), (2, 3, 48, 64)]  # each image at its own size, nothing resized before
    assert all(batch.dtype == torch.float32 and batch.max() <= 1.0 for batch in seen["inputs"])
    # The stand-in's features are the channel means: uint8 / 255, as ToTensor gives them.
    assert features[0, :3].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert features[1, :3].tolist() == pytest.approx([0.0, 0.2, 0.0])
    assert features[2, :3].tolist() == pytest.approx([0.0, 0.0, 0.4])  # order kept across the size groups


# -------------------------------------------------------------------------------------------- provenance, compare
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("evaluation")
    return output_dir, run_evaluation(output_dir, limit=1, progress=False)


def test_results_record_the_scorers_versions_and_weight_digests(evaluated):
    from safety_dpo.microworld.judge import default_judge_path

    _, results = evaluated
    scorers = results["protocol"]["scorers"]
    judge = hashlib.sha256((default_judge_path() / "judge.safetensors").read_bytes()).hexdigest()
    assert scorers["detectors"]["judge"]["weights_sha256"] == judge
    assert scorers["frechet_features"]["weights_sha256"] == judge
    assert scorers["packages"]["torch"] == torch.__version__
    assert len(results["prompts"]["digest"]) == 16


def test_nudenet_records_its_package_and_model_digest():
    from importlib.metadata import version
    from pathlib import Path

    import nudenet

    provenance = NudeNetDetector("i2p").provenance()
    model = Path(nudenet.__file__).with_name("320n.onnx")
    assert provenance["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert provenance["packages"]["nudenet"] == version("nudenet")


def _write(tmp_path, name, results) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return str(folder)


def test_compare_prints_two_runs_of_one_protocol_side_by_side(evaluated, tmp_path, capsys):
    output_dir, results = evaluated
    other = copy.deepcopy(results)
    other["safety_adapter"], other["created"] = "another-adapter", "later"  # what is compared, not how
    other["protocol"]["scorers"]["packages"]["torch"] = "9.9"  # a version alone does not decide a number
    status = cli.main(["evaluate", "--compare", str(output_dir), _write(tmp_path, "b", other)])
    out = capsys.readouterr().out
    assert status == 0 and "ip unsafe: base" in out and "fd_judge to reference: base" in out
    assert "Package versions differ" in out and "9.9" in out


def test_compare_refuses_runs_of_different_protocols_listing_the_differences(evaluated, tmp_path, capsys):
    output_dir, results = evaluated
    other = copy.deepcopy(results)
    other["protocol"]["detectors"]["judge"]["threshold"] = 0.9
    other["generation"]["images_per_prompt"] = 1
    b = _write(tmp_path, "b", other)
    assert cli.main(["evaluate", "--compare", str(output_dir), b]) == 1
    captured = capsys.readouterr()
    assert "protocol.detectors.judge.threshold" in captured.err and "generation.images_per_prompt" in captured.err
    assert "Refusing" in captured.err and captured.out == ""
    assert cli.main(["evaluate", "--compare", str(output_dir), b, "--force"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("WARNING") and "ip unsafe: base" in captured.out
    comparison = compare_results(output_dir, b)
    assert not comparison["comparable"] and len(comparison["differences"]) == 2


def test_compare_refuses_a_folder_without_results(tmp_path, capsys):
    assert cli.main(["evaluate", "--compare", str(tmp_path), str(tmp_path)]) == 2
    assert "No results.json" in capsys.readouterr().err
