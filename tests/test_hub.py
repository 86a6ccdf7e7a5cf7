"""Round trips through the loopback Hub (tests/hub_server.py) with the real `huggingface_hub` and `datasets` clients,
and the `safety_dpo.hub` helpers on top of them."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import (
    DatasetCard,
    HfApi,
    ModelCard,
    hf_hub_download,
    list_repo_files,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from PIL import Image

from safety_dpo.hub import ensure_local_or_download, push_folder, render_dataset_card, render_model_card

ADAPTER_FILES = {
    "README.md": b"# adapter\n",
    "adapter_config.json": b'{"r": 4}\n',
    "pytorch_lora_weights.safetensors": bytes(range(256)) * 4,  # binary: travels through LFS
    "experts/violence/adapter_config.json": b'{"r": 2}\n',
}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def read_folder(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def tiny_image(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8))


def preference_pairs(n: int, offset: int = 0) -> datasets.Dataset:
    features = datasets.Features(
        {
            "jpg_0": datasets.Image(),
            "jpg_1": datasets.Image(),
            "label_0": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "category": datasets.Value("string"),
            "seed": datasets.Value("int64"),
        }
    )
    rows = {
        "jpg_0": [tiny_image(10 * (i + offset)) for i in range(n)],
        "jpg_1": [tiny_image(255 - 10 * (i + offset)) for i in range(n)],
        "label_0": [1] * n,
        "caption": [f"a person holding a knife, take {i + offset}" for i in range(n)],
        "category": ["violence"] * n,
        "seed": [i + offset for i in range(n)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def assert_same_rows(loaded: datasets.Dataset, expected: datasets.Dataset) -> None:
    assert loaded.column_names == expected.column_names
    assert len(loaded) == len(expected)
    for loaded_row, expected_row in zip(loaded, expected, strict=True):
        for column, value in expected_row.items():
            if isinstance(value, Image.Image):
                np.testing.assert_array_equal(np.asarray(loaded_row[column]), np.asarray(value))
            else:
                assert loaded_row[column] == value


# ---------------------------------------------------------------------------------------------------- real clients


def test_create_repo_makes_model_and_dataset_repos_and_honours_exist_ok(hub):
    api = HfApi()
    model_url = api.create_repo("tester/adapter")
    dataset_url = api.create_repo("tester/pairs", repo_type="dataset")

    assert (model_url.repo_id, model_url.repo_type) == ("tester/adapter", "model")
    assert (dataset_url.repo_id, dataset_url.repo_type) == ("tester/pairs", "dataset")
    assert api.create_repo("tester/adapter", exist_ok=True) == model_url
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("tester/adapter")
    assert error.value.response.status_code == 409


def test_upload_folder_round_trips_through_downloads(hub, tmp_path):
    folder = write_folder(tmp_path / "adapter", ADAPTER_FILES)
    api = HfApi()
    api.create_repo("tester/adapter")

    commit = api.upload_folder(folder_path=folder, repo_id="tester/adapter", commit_message="Add adapter")

    assert commit.commit_url.startswith(f"{hub.endpoint}/tester/adapter/commit/")
    assert set(list_repo_files("tester/adapter")) == {".gitattributes", *ADAPTER_FILES}
    weights = hf_hub_download("tester/adapter", "pytorch_lora_weights.safetensors")
    assert Path(weights).read_bytes() == ADAPTER_FILES["pytorch_lora_weights.safetensors"]
    assert Path(weights).is_relative_to(hub.home)  # the test's own cache, never the user's
    snapshot = read_folder(Path(snapshot_download("tester/adapter")))
    assert snapshot == {".gitattributes": snapshot[".gitattributes"], **ADAPTER_FILES}


def test_binary_files_go_through_lfs_and_text_files_do_not(hub, tmp_path):
    folder = write_folder(tmp_path / "adapter", ADAPTER_FILES)
    HfApi().create_repo("tester/adapter")

    HfApi().upload_folder(folder_path=folder, repo_id="tester/adapter")

    tree = {entry.path: entry for entry in HfApi().list_repo_tree("tester/adapter", recursive=True)}
    assert tree["pytorch_lora_weights.safetensors"].lfs is not None
    assert tree["adapter_config.json"].lfs is None
    assert tree["experts/violence"].tree_id  # folders are listed too, as on the Hub


def test_files_stay_readable_at_the_commit_that_wrote_them(hub):
    api = HfApi()
    api.create_repo("tester/adapter")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id="tester/adapter")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="notes.txt", repo_id="tester/adapter")

    assert Path(hf_hub_download("tester/adapter", "notes.txt")).read_bytes() == b"v2"
    assert Path(hf_hub_download("tester/adapter", "notes.txt", revision=first.oid)).read_bytes() == b"v1"
    assert api.model_info("tester/adapter").sha != first.oid


def test_deleting_a_file_removes_it_from_main(hub, tmp_path):
    api = HfApi()
    api.create_repo("tester/adapter")
    api.upload_folder(folder_path=write_folder(tmp_path / "adapter", ADAPTER_FILES), repo_id="tester/adapter")

    api.delete_file("adapter_config.json", repo_id="tester/adapter")

    assert "adapter_config.json" not in list_repo_files("tester/adapter")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("tester/adapter", "adapter_config.json", force_download=True)


def test_missing_repo_raises_repository_not_found(hub):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/nowhere", "README.md")


def test_dataset_push_to_hub_round_trips_rows_and_images(hub):
    pairs = preference_pairs(3)

    pairs.push_to_hub("tester/pairs")
    loaded = datasets.load_dataset("tester/pairs", split="train")

    assert_same_rows(loaded, pairs)
    assert isinstance(loaded.features["jpg_0"], datasets.Image)


def test_dataset_dict_push_to_hub_round_trips_train_and_test_splits(hub):
    splits = datasets.DatasetDict(train=preference_pairs(3), test=preference_pairs(2, offset=3))

    splits.push_to_hub("tester/pairs")
    loaded = datasets.load_dataset("tester/pairs")

    assert set(loaded) == {"train", "test"}
    assert_same_rows(loaded["train"], splits["train"])
    assert_same_rows(loaded["test"], splits["test"])


def test_without_the_hub_fixture_downloads_raise_the_offline_error(tmp_path):
    with pytest.raises(OfflineModeIsEnabled):
        HfApi().model_info("tester/adapter")
    with pytest.raises(LocalEntryNotFoundError) as error:
        hf_hub_download("tester/adapter", "README.md", cache_dir=tmp_path)
    assert isinstance(error.value.__cause__, OfflineModeIsEnabled)


# ---------------------------------------------------------------------------------------------------- safety_dpo.hub


def test_push_folder_creates_the_repo_and_returns_the_commit_url(hub, tmp_path):
    folder = write_folder(tmp_path / "adapter", ADAPTER_FILES)

    url = push_folder(folder, "tester/adapter", commit_message="Add safety adapter")
    again = push_folder(write_folder(folder, {"extra.txt": b"more"}), "tester/adapter")

    assert url.startswith(f"{hub.endpoint}/tester/adapter/commit/") and again != url
    assert set(list_repo_files("tester/adapter")) == {".gitattributes", "extra.txt", *ADAPTER_FILES}


def test_push_folder_pushes_dataset_repos(hub, tmp_path):
    folder = write_folder(tmp_path / "pairs", {"data/train.jsonl": b'{"caption": "a knife"}\n'})

    url = push_folder(folder, "tester/pairs", repo_type="dataset")

    assert url.startswith(f"{hub.endpoint}/datasets/tester/pairs/commit/")
    assert "data/train.jsonl" in list_repo_files("tester/pairs", repo_type="dataset")


def test_push_folder_rejects_a_missing_folder_and_unknown_repo_types(tmp_path):
    with pytest.raises(NotADirectoryError, match="missing"):
        push_folder(tmp_path / "missing", "tester/adapter")
    with pytest.raises(ValueError, match="repo_type='space'.*model, dataset"):
        push_folder(tmp_path, "tester/adapter", repo_type="space")


def test_ensure_local_or_download_returns_a_local_directory_as_is(tmp_path):
    assert ensure_local_or_download(tmp_path) == tmp_path


def test_ensure_local_or_download_downloads_a_repo_id(hub, tmp_path):
    push_folder(write_folder(tmp_path / "adapter", ADAPTER_FILES), "tester/adapter")

    local = ensure_local_or_download("tester/adapter", allow_patterns="*.json")

    assert local.is_dir() and local.is_relative_to(hub.home)
    assert set(read_folder(local)) == {"adapter_config.json", "experts/violence/adapter_config.json"}


def test_ensure_local_or_download_names_an_input_that_is_neither(hub):
    with pytest.raises(FileNotFoundError, match="'tester/nowhere' is neither a local directory nor a reachable"):
        ensure_local_or_download("tester/nowhere")
    with pytest.raises(FileNotFoundError, match="'./no/such/dir' is neither"):
        ensure_local_or_download("./no/such/dir")


def test_ensure_local_or_download_fails_clearly_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match="'tester/adapter' is neither .*LocalEntryNotFoundError"):
        ensure_local_or_download("tester/adapter", cache_dir=tmp_path)


def test_model_card_renders_metadata_and_variables():
    card = render_model_card(
        repo_id="tester/sd-safety",
        base_model="tiny/sd",
        license="creativeml-openrail-m",
        tags=["microworld"],
        concepts={"violence": ["knife", "gun"]},
        training_config={"beta": 5000},
        evaluation={"IP": 0.05},
    )

    assert card.data.base_model == "tiny/sd" and card.data.license == "creativeml-openrail-m"
    assert card.data.tags[0] == "safety_dpo" and "microworld" in card.data.tags
    assert 'pipe.load_safety_adapter("tester/sd-safety")' in card.text
    assert 'pipe.load_lora_weights("tester/sd-safety")' in card.text
    assert "| violence | knife, gun |" in card.text and "| `beta` | `5000` |" in card.text
    assert "| IP | 0.05 |" in card.text and "@article{liu2024safetydpo" in card.text


@pytest.mark.parametrize("render", [render_model_card, render_dataset_card])
def test_cards_render_without_optional_variables(render):
    text = str(render())

    assert text.startswith("---\n") and "@article{liu2024safetydpo" in text
    assert "None" not in text and "{{" not in text and "{%" not in text


def test_dataset_card_renders_counts_rejections_and_columns():
    card = render_dataset_card(
        repo_id="tester/pairs",
        license="cc-by-nc-4.0",
        generator_model="tiny/sd",
        category_counts={"violence": 7},
        rejections={"judge: unsafe image looks safe": 3},
        extra_metadata={"configs": [{"config_name": "default", "data_files": "data/*"}]},
    )

    assert card.data.license == "cc-by-nc-4.0" and card.data.configs[0]["config_name"] == "default"
    assert "Content warning" in card.text and "| violence | 7 |" in card.text
    assert "| judge: unsafe image looks safe | 3 |" in card.text
    for column in ("jpg_0", "jpg_1", "label_0", "caption", "safe_prompt", "unsafe_prompt", "concept", "seed"):
        assert f"| `{column}` |" in card.text


def test_cards_never_show_a_placeholder_for_what_is_known():
    # a local base model and a local adapter folder: the card's code names them, not "<base-model-id>"
    local = str(render_model_card(base_model_source="/models/my-sd", adapter_source="out/adapter"))
    assert 'from_pretrained("/models/my-sd")' in local and 'load_safety_adapter("out/adapter")' in local
    microworld = str(render_model_card(base_model_source="safety_dpo-microworld", repo_id="me/adapter"))
    assert "from safety_dpo.microworld import checkpoint_path" in microworld
    assert "from_pretrained(checkpoint_path())" in microworld and 'load_safety_adapter("me/adapter")' in microworld
    unknown = str(render_model_card())  # nothing recorded: a sentence, not code with a placeholder
    for text in (local, microworld, unknown):
        assert "<base-model-id>" not in text and "<this-repo-id>" not in text
    dataset = str(render_dataset_card(local_path="builds/coprov2"))
    assert 'load_from_disk("builds/coprov2")["train"]' in dataset and "<this-repo-id>" not in dataset


def test_card_settings_are_written_out_not_printed_as_python():
    card = str(
        render_model_card(training_config={"target_modules": ["to_k", "to_q"], "generation": {"steps": 2, "cfg": 4}})
    )
    assert "| `target_modules` | `to_k, to_q` |" in card and "| `generation` | `steps: 2, cfg: 4` |" in card
    assert "['to_k'" not in card and "{'steps'" not in card


def test_a_build_card_names_only_the_categories_that_were_built(tmp_path):
    from safety_dpo.data.publish import render_build_card

    report = {
        "num_rows": 4, "num_pairs": 4, "split_rows": {"train": 2, "test": 2}, "rejections": {},
        "category_counts": {"violence": 2, "sexual": 2, "hate": 0, "harassment": 0},
        "concepts": {"violence": ["knife"], "sexual": ["nudity"], "hate": ["nazi"], "harassment": ["bully"]},
        "generator_model": "tiny/sd", "prompt_writer": "template",
        "settings": {"pairs_per_concept": 2, "images_per_prompt": 1, "seed": 0, "min_similarity": 0.5,
                     "generation": {"num_inference_steps": 2, "guidance_scale": 4.0}},
    }  # fmt: skip
    text = str(render_build_card(report, local_path=tmp_path))
    assert "harm categories violence, sexual." in text and "| violence | 2 | knife |" in text
    assert "hate" not in text and "harassment" not in text and "nazi" not in text
    assert "| `rows per split` | `train: 2, test: 2` |" in text
    assert "| `generation: guidance_scale` | `4.0` |" in text


def test_unknown_card_template_is_named_in_the_error():
    with pytest.raises(ValueError, match="'nope.md' is neither a template of safety_dpo.hub_cards"):
        render_model_card("nope.md")


def test_rendered_cards_push_and_load_back(hub):
    HfApi().create_repo("tester/adapter")
    HfApi().create_repo("tester/pairs", repo_type="dataset")

    render_model_card(repo_id="tester/adapter", base_model="tiny/sd").push_to_hub("tester/adapter")
    render_dataset_card(repo_id="tester/pairs", pretty_name="Pairs").push_to_hub("tester/pairs")

    assert ModelCard.load("tester/adapter").data.base_model == "tiny/sd"
    assert DatasetCard.load("tester/pairs", repo_type="dataset").data.pretty_name == "Pairs"


def test_hub_id_or_none_keeps_hub_ids_and_drops_local_paths(tmp_path, monkeypatch):
    from safety_dpo.hub import hub_id_or_none

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "data").mkdir(parents=True)
    assert hub_id_or_none("my-org/coprov2") == "my-org/coprov2"
    assert hub_id_or_none("runs/data") is None  # exists here: a local folder
    assert hub_id_or_none("/tmp/a/b") is None and hub_id_or_none("coprov2") is None and hub_id_or_none(None) is None
