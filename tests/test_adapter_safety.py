"""Broken or hostile adapters and card values: non-finite or overflowing LoRA weights and scales are refused, weight
files outside the adapter folder are refused, and user or dataset values come out of the Hub cards inert."""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from huggingface_hub import DatasetCard, ModelCard
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from tiny_models import WEIGHTS, get_dummy_sd_components, random_unet_lora, write_adapter

from safety_dpo.hub import markdown_code, push_folder, render_dataset_card, render_model_card
from safety_dpo.merging.experts import LoraExpert, load_expert
from safety_dpo.pipelines.safe_pipelines import StableDiffusionSafePipeline, enable_safety_adapters


# ---------------------------------------------------------------------------------------------------------- helpers
def sd_pipeline(dtype: torch.dtype = torch.float32) -> StableDiffusionSafePipeline:
    pipeline = StableDiffusionSafePipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(dtype=dtype)


def unet_weights(unet) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in unet.state_dict().items()}


def assert_untouched(pipe, before: dict[str, torch.Tensor]) -> None:
    assert not pipe.safety_adapters
    assert not any(isinstance(module, LoraLayer) for module in pipe.unet.modules())
    after = unet_weights(pipe.unet)
    assert all(torch.equal(after[name], value) for name, value in before.items())


@pytest.fixture
def pipe() -> StableDiffusionSafePipeline:
    return sd_pipeline()


@pytest.fixture
def adapter(pipe) -> dict[str, torch.Tensor]:
    return random_unet_lora(pipe.unet, seed=1)


@pytest.fixture
def adapter_dir(tmp_path, adapter):
    return write_adapter(tmp_path / "adapter", adapter)


def broken(adapter: dict[str, torch.Tensor], value: float) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter with `value` written into one entry of its third tensor; returns it and that tensor's key."""
    key = sorted(adapter)[2]
    state = {name: tensor.clone() for name, tensor in adapter.items()}
    state[key][0, 0] = value
    return state, key


# ------------------------------------------------------------------------------------- A. non-finite weights
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_an_adapter_file_with_non_finite_weights_is_refused_naming_the_file_and_the_tensor(
    tmp_path, pipe, adapter, value
):
    state, key = broken(adapter, value)
    folder = write_adapter(tmp_path / "broken", state)
    before = unet_weights(pipe.unet)

    with pytest.raises(ValueError, match="NaN and .* infinite values") as error:
        pipe.load_safety_adapter(folder)

    assert str(folder / WEIGHTS) in str(error.value) and repr(key) in str(error.value)
    assert_untouched(pipe, before)


def test_a_fused_adapter_with_non_finite_weights_is_refused_before_touching_the_weights(tmp_path, pipe, adapter):
    state, key = broken(adapter, math.nan)
    before = unet_weights(pipe.unet)

    with pytest.raises(ValueError, match=re.escape(repr(key))):
        pipe.load_safety_adapter(write_adapter(tmp_path / "broken", state), fuse=True)

    assert_untouched(pipe, before)


def test_a_state_dict_with_non_finite_weights_is_refused_naming_the_tensor(pipe, adapter):
    state, key = broken(adapter, math.inf)
    with pytest.raises(ValueError, match=rf"state dict 0.*{re.escape(repr(key))}.*1 infinite"):
        pipe.load_safety_adapter(state)


def test_a_nan_alpha_in_safety_dpo_json_is_refused_naming_the_layer(tmp_path, pipe, adapter):
    folder = write_adapter(tmp_path / "nan-alpha", adapter, lora={"rank": 2, "alpha": math.nan})
    with pytest.raises(ValueError, match=r"layer '.*' up \(lora_B, scale folded in\) holds \d+ NaN"):
        pipe.load_safety_adapter(folder)


def test_load_expert_refuses_a_lora_expert_object_with_non_finite_factors():
    expert = LoraExpert(name="handmade", layers={"a.to_q": (torch.full((4, 2), math.nan), torch.ones(2, 4))})
    with pytest.raises(ValueError, match="'handmade': layer 'a.to_q' up"):
        load_expert(expert)


# ------------------------------------------------------------------------------------- A. non-finite scales
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "nan", "not a number", None])
@pytest.mark.parametrize("fuse", [False, True])
def test_a_scale_that_is_not_a_finite_number_is_refused_saying_what_is_accepted(pipe, adapter_dir, scale, fuse):
    before = unet_weights(pipe.unet)
    with pytest.raises(ValueError, match=rf"scale={re.escape(repr(scale))} is not a finite number; pass a real"):
        pipe.load_safety_adapter(adapter_dir, scale=scale, fuse=fuse)
    assert_untouched(pipe, before)


def test_an_upgraded_pipeline_refuses_a_nan_scale_as_safety_dpo_generate_passes_it(adapter_dir):
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline(**get_dummy_sd_components(), requires_safety_checker=False)
    with pytest.raises(ValueError, match="scale=nan is not a finite number"):
        enable_safety_adapters(plain).load_safety_adapter(str(adapter_dir), scale=float("nan"), fuse=True)


def test_from_pretrained_refuses_a_nan_safety_scale_before_loading_the_base_model(tmp_path, adapter_dir):
    with pytest.raises(ValueError, match="scale=nan is not a finite number"):
        StableDiffusionSafePipeline.from_pretrained(
            tmp_path / "no-such-base", safety_adapter=adapter_dir, safety_scale=math.nan
        )


@pytest.mark.parametrize("fuse", [False, True])
def test_set_safety_scale_refuses_a_non_finite_scale_and_keeps_the_old_one(pipe, adapter_dir, fuse):
    pipe.load_safety_adapter(adapter_dir, scale=0.5, fuse=fuse)
    loaded = unet_weights(pipe.unet)
    with pytest.raises(ValueError, match="scale=inf is not a finite number"):
        pipe.set_safety_scale(math.inf)
    assert pipe.safety_adapters["safety"]["scale"] == 0.5
    assert all(torch.equal(value, loaded[name]) for name, value in unet_weights(pipe.unet).items())


# ------------------------------------------------------------------------------- A. overflowing the dtype
def huge_adapter(unet, value: float) -> dict[str, torch.Tensor]:
    """An adapter whose factors are all `value` (rank 2): each delta entry is 2 * value**2."""
    return {key: torch.full_like(tensor, value) for key, tensor in random_unet_lora(unet, seed=3).items()}


@pytest.mark.parametrize("fuse", [False, True])
def test_an_adapter_whose_delta_overflows_float16_is_refused_by_a_float16_pipeline(tmp_path, fuse):
    pipe = sd_pipeline(torch.float16)
    folder = write_adapter(tmp_path / "huge", huge_adapter(pipe.unet, 300.0))  # delta 180000 > 65504
    before = unet_weights(pipe.unet)

    with pytest.raises(ValueError, match=r"beyond torch.float16's largest value 6.55e\+04") as error:
        pipe.load_safety_adapter(folder, fuse=fuse)

    assert str(folder) in str(error.value) and "layer 'down_blocks." in str(error.value)
    assert_untouched(pipe, before)


def test_an_adapter_with_factors_beyond_float16_is_refused_by_a_float16_pipeline(tmp_path):
    pipe = sd_pipeline(torch.float16)
    with pytest.raises(ValueError, match="LoRA factor of magnitude 1e\\+05"):
        pipe.load_safety_adapter(write_adapter(tmp_path / "huge", huge_adapter(pipe.unet, 1e5)))


def test_the_same_large_adapter_loads_into_a_float32_pipeline(tmp_path):
    pipe = sd_pipeline(torch.float32)
    pipe.load_safety_adapter(write_adapter(tmp_path / "huge", huge_adapter(pipe.unet, 300.0)), fuse=True)
    assert all(torch.isfinite(value).all() for value in pipe.unet.state_dict().values())


@pytest.mark.parametrize("fuse", [False, True])
def test_set_safety_scale_refuses_a_scale_that_overflows_and_keeps_the_adapter_as_it_was(pipe, adapter_dir, fuse):
    pipe.to(dtype=torch.float16)
    pipe.load_safety_adapter(adapter_dir, scale=0.5, fuse=fuse)
    loaded = unet_weights(pipe.unet)

    with pytest.raises(ValueError, match="beyond torch.float16's largest value"):
        pipe.set_safety_scale(1e9)

    assert pipe.safety_adapters["safety"]["scale"] == 0.5
    assert all(torch.equal(value, loaded[name]) for name, value in unet_weights(pipe.unet).items())


# ------------------------------------------------------------------------------ C. weight file confinement
def test_a_weight_name_that_climbs_out_of_the_folder_is_refused(tmp_path, pipe, adapter):
    write_adapter(tmp_path / "elsewhere", adapter, name="stolen.safetensors")
    folder = write_adapter(tmp_path / "adapter", adapter)
    with pytest.raises(ValueError, match=r"weight_name='../elsewhere/stolen.safetensors' points outside") as error:
        pipe.load_safety_adapter(folder, weight_name="../elsewhere/stolen.safetensors")
    assert str(folder) in str(error.value)


def test_an_absolute_weight_name_is_refused(tmp_path, pipe, adapter):
    outside = write_adapter(tmp_path / "elsewhere", adapter) / WEIGHTS
    folder = write_adapter(tmp_path / "adapter", adapter)
    for weight_name in (str(outside), "C:\\adapters\\x.safetensors", "\\\\server\\share\\x.safetensors"):
        with pytest.raises(ValueError, match="points outside the adapter folder"):
            pipe.load_safety_adapter(folder, weight_name=weight_name)


def test_a_weight_name_from_safety_dpo_json_that_climbs_out_is_refused(tmp_path, pipe, adapter):
    write_adapter(tmp_path / "elsewhere", adapter)
    folder = write_adapter(tmp_path / "adapter", {}, name="empty.safetensors", weight_name=f"../elsewhere/{WEIGHTS}")
    with pytest.raises(ValueError, match=r"safety_dpo.json weight_name='../elsewhere/.*' points outside"):
        pipe.load_safety_adapter(folder)


def test_a_symlink_in_the_folder_to_a_file_outside_it_is_refused(tmp_path, pipe, adapter):
    outside = write_adapter(tmp_path / "elsewhere", adapter) / WEIGHTS
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "linked.safetensors").symlink_to(outside)
    (folder / WEIGHTS).symlink_to(outside)
    with pytest.raises(ValueError, match="weight_name='linked.safetensors' points outside .* resolves to"):
        pipe.load_safety_adapter(folder, weight_name="linked.safetensors")
    with pytest.raises(ValueError, match="points outside"):
        pipe.load_safety_adapter(folder)  # the default weight file, a link out of the folder


def test_a_symlinked_adapter_folder_and_links_inside_it_still_load(tmp_path, pipe, adapter):
    real = write_adapter(tmp_path / "real", adapter)
    (real / "alias.safetensors").symlink_to(real / WEIGHTS)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    pipe.load_safety_adapter(tmp_path / "link", weight_name="alias.safetensors")
    assert pipe.safety_adapters["safety"]["source"] == str(tmp_path / "link")


def test_a_weight_file_in_a_subfolder_of_the_adapter_is_allowed(tmp_path, pipe, adapter):
    folder = write_adapter(tmp_path / "adapter" / "sub", adapter, name="file.safetensors").parent
    pipe.load_safety_adapter(folder, weight_name="sub/file.safetensors")
    assert "safety" in pipe.safety_adapters


def test_a_hub_id_with_a_traversing_weight_name_is_refused_before_any_download(pipe):
    # offline: a download would raise FileNotFoundError; the name is refused first
    with pytest.raises(ValueError, match=r"weight_name='../../x.safetensors' points outside .*'org/adapter'"):
        pipe.load_safety_adapter("org/adapter", weight_name="../../x.safetensors")


def test_a_hub_repo_whose_safety_dpo_json_names_a_file_outside_it_is_refused(hub, tmp_path, pipe, adapter):
    folder = write_adapter(tmp_path / "repo", adapter, name="x.safetensors", weight_name="../../../etc/x.safetensors")
    save_file(adapter, str(folder / "y.safetensors"))
    push_folder(folder, "tester/hostile")
    with pytest.raises(ValueError, match="safety_dpo.json weight_name='../../../etc/x.safetensors' points outside"):
        pipe.load_safety_adapter("tester/hostile")


def test_a_hub_repo_still_loads_through_its_snapshot_symlinks(hub, pipe, adapter_dir):
    push_folder(adapter_dir, "tester/adapter")
    pipe.load_safety_adapter("tester/adapter", weight_name=WEIGHTS)
    assert pipe.safety_adapters["safety"]["source"] == "tester/adapter"


# ------------------------------------------------------------------------------------------ B. inert cards
HOSTILE = [
    "</a><script>x</script>",
    "# heading",
    "[link](http://evil)",
    "![img](http://evil/x.png)",
    "a`b",
    "``c```",
    "line one\n# injected heading\n<img src=x onerror=alert(1)>",
    "---",
    "| cell | break |",
    "*emph* _under_ ~~strike~~",
    "- list",
    "1. ordered",
]
TEMPLATE_HEADINGS = re.compile(
    r"^#{1,2} (SafetyDPO|CoProV2|Categories|How|Training|Merge|Evaluation|Limitations|"
    r"Citation|Rejected|Columns|License)"
)

TEMPLATE_LINK = re.compile(r"https://(arxiv\.org/abs/2412\.10493|huggingface\.co/[\w%/.~-]*)\)")


def without_code(text: str) -> str:
    """The card's text without fenced code blocks and code spans, where HTML and markdown are inert."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))


def assert_inert(text: str) -> None:
    """No HTML, link, heading or thematic break in the card's markdown (after its YAML front matter) comes from a
    value."""
    text = text.split("\n---\n", 1)[1]
    prose = without_code(text)
    assert "<script" not in prose and "<img" not in prose and "</a>" not in prose
    for link in re.finditer(r"(?<!\\)\]\(", prose):  # links: the template's own, or a percent-encoded Hub page
        assert TEMPLATE_LINK.match(prose, link.end()), prose[link.start() - 40 : link.end() + 40]
    title, *sections = [line for line in text.splitlines() if line.startswith("#")]
    assert title.startswith("# ") and all(TEMPLATE_HEADINGS.match(line) for line in sections)
    assert "\n---\n" not in text  # no thematic break or setext heading from a value


def table_cells(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line)) - 1


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_values_come_out_of_the_adapter_card_inert(hostile):
    card = render_model_card(
        repo_id=f"tester/{hostile}",
        base_model=hostile,
        license=hostile,
        model_name=hostile,
        tags=[hostile],
        description=f"Trained on {markdown_code(hostile)}.",
        concepts={hostile: [hostile, "knife"], "violence": hostile},
        weight_name=hostile,
        training_config={hostile: hostile},
        evaluation=[{"metric": hostile, "value": 0.5}],
        evaluation_notes=hostile,
        limitations=[hostile],
    )
    text = str(card)

    assert_inert(text)
    metadata = front_matter(text)
    assert set(metadata) == {"base_model", "library_name", "license", "model_name", "pipeline_tag", "tags"}
    assert metadata["license"] == metadata["base_model"] == metadata["model_name"] == hostile
    assert ModelCard(text).data.license == hostile and hostile in ModelCard(text).data.tags
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(table_cells(row) == 2 for row in rows)  # every table of the card has two columns


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_values_come_out_of_the_dataset_card_inert(hostile):
    card = render_dataset_card(
        repo_id=hostile,
        license=hostile,
        pretty_name=hostile,
        generator_model=hostile,
        prompt_writer=f"openai:{hostile}",
        category_counts={hostile: 3},
        concepts={hostile: [hostile, "knife"]},
        rejections={hostile: 2},
        build_config={hostile: hostile},
        description=hostile,
    )
    text = str(card)

    assert_inert(text)
    metadata = front_matter(text)
    assert set(metadata) == {"license", "task_categories", "pretty_name", "tags"}
    assert metadata["license"] == metadata["pretty_name"] == hostile
    assert DatasetCard(text).data.license == hostile
    categories = text.split("## Categories")[1].split("##")[0]
    assert all(table_cells(row) == 3 for row in categories.splitlines() if row.startswith("|"))


@pytest.mark.parametrize("name", ["license", "llm model"])
def test_a_license_or_llm_model_with_backticks_stays_inside_its_code_span(name):
    value = "x` <b>bold</b> [link](http://evil) ``"
    card = render_dataset_card(license=value, prompt_writer=f"openai:{value}")
    line = next(
        line
        for line in str(card).splitlines()
        if (line.startswith("Released under") if name == "license" else line.startswith("| prompts written by"))
    )
    span = re.search(r"(`+) (.*) \1", line)
    assert span and len(span.group(1)) == 3 and value in span.group(2)


@pytest.mark.parametrize(
    ("value", "span"),
    [("beta", "`beta`"), ("a`b", "``a`b``"), ("``x", "``` ``x ```"), ("a|b", "`a\\|b`"), ("a\nb", "`a b`")],
)
def test_markdown_code_picks_a_fence_longer_than_any_backtick_run_in_the_value(value, span):
    assert markdown_code(value) == span


def test_a_concepts_value_with_markup_is_escaped_in_the_adapter_card_table():
    card = render_model_card(concepts={"violence": ["<b>knife</b>", "[gun](http://evil)", "# bomb"]})
    assert "| violence | &lt;b&gt;knife&lt;/b&gt;, \\[gun\\](http://evil), \\# bomb |" in card.text


def test_plain_values_render_as_before():
    card = render_dataset_card(
        repo_id="tester/pairs",
        license="cc-by-nc-4.0",
        generator_model="tiny/sd",
        category_counts={"violence": 7},
        concepts={"violence": ["knife", "gun"]},
        rejections={"safe_prompt_names_concept": 5},
        build_config={"pairs_per_concept": 3},
    )
    assert "| violence | 7 | knife, gun |" in card.text and "| safe_prompt_names_concept | 5 |" in card.text
    assert "| `pairs_per_concept` | `3` |" in card.text and "Released under `cc-by-nc-4.0`." in card.text
    assert 'pairs = load_dataset("tester/pairs", split="train")' in card.text
