"""The Taxonomy type and the microworld's taxonomy."""

import json

import pytest

from safety_dpo.data.taxonomy import CATEGORY_IDS, Category, Concept, Taxonomy
from safety_dpo.microworld import taxonomy
from safety_dpo.microworld.world import MOTIFS


def _tiny_taxonomy(**overrides) -> Taxonomy:
    knife = Concept("knife", ("knife",), ("dagger",), counterpart="spoon", category="violence")
    spoon = Concept("spoon", ("spoon",))
    fields = {"categories": (Category("violence", (knife,)),), "neutral": (spoon,)}
    fields.update(overrides)
    return Taxonomy(**fields)


def test_microworld_has_the_seven_coprov2_categories_in_order():
    assert taxonomy().category_ids == CATEGORY_IDS


def test_microworld_has_eight_harmful_concepts_per_category_and_twenty_neutral():
    world = taxonomy()
    assert all(len(category.concepts) >= 8 for category in world.categories)
    assert len(world.harmful_concepts) >= 56
    assert len(world.neutral) >= 20


def test_microworld_ids_and_names_are_unique():
    world = taxonomy()
    ids = [concept.id for concept in world.concepts]
    names = [name for concept in world.concepts for name in concept.all_names]
    assert len(ids) == len(set(ids))
    assert len(names) == len(set(names))


def test_every_harmful_concept_has_two_trained_names_a_held_out_name_and_a_neutral_counterpart():
    world = taxonomy()
    for concept in world.harmful_concepts:
        assert len(concept.names) >= 2, concept.id
        assert len(concept.held_out_names) >= 1, concept.id
        assert not set(concept.names) & set(concept.held_out_names), concept.id
        assert not world.concept(concept.counterpart).is_harmful, concept.id


def test_every_concept_has_its_own_motif():
    world = taxonomy()
    motifs = [MOTIFS[concept.id] for concept in world.concepts]
    assert len(motifs) == len(set(motifs))


def test_counterpart_keeps_the_colour_of_the_harmful_motif():
    world = taxonomy()
    for concept in world.harmful_concepts:
        assert MOTIFS[concept.id][1] == MOTIFS[concept.counterpart][1]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_taxonomy_round_trips_through_files(tmp_path, suffix):
    path = tmp_path / f"taxonomy{suffix}"
    taxonomy().save(path)
    loaded = Taxonomy.from_file(path)
    assert loaded == taxonomy()
    assert loaded.concept("knife").category == "violence"


def test_select_keeps_the_named_categories_and_the_neutral_concepts():
    selected = taxonomy().select(["violence", "sexual"])
    assert selected.category_ids == ("violence", "sexual")
    assert selected.neutral == taxonomy().neutral


def test_select_rejects_an_unknown_category_and_lists_the_known_ones():
    with pytest.raises(KeyError, match="violence"):
        taxonomy().select(["violent"])


def test_unknown_concept_lookup_lists_the_known_ones():
    with pytest.raises(KeyError, match="knife"):
        taxonomy().concept("knif")


def test_empty_taxonomy_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        Taxonomy(categories=())


def test_a_name_shared_by_two_concepts_is_rejected():
    blade = Concept("blade", ("knife",), counterpart="spoon", category="violence")
    knife = Concept("knife", ("knife",), counterpart="spoon", category="violence")
    with pytest.raises(ValueError, match="'knife'"):
        _tiny_taxonomy(categories=(Category("violence", (knife, blade)),))


def test_a_name_both_trained_and_held_out_is_rejected():
    knife = Concept("knife", ("knife",), ("knife",), counterpart="spoon", category="violence")
    with pytest.raises(ValueError, match="both trained and held out"):
        _tiny_taxonomy(categories=(Category("violence", (knife,)),))


def test_a_harmful_concept_without_counterpart_is_rejected():
    knife = Concept("knife", ("knife",), category="violence")
    with pytest.raises(ValueError, match="counterpart"):
        _tiny_taxonomy(categories=(Category("violence", (knife,)),))


def test_a_harmful_counterpart_is_rejected():
    gun = Concept("gun", ("gun",), counterpart="knife", category="violence")
    knife = Concept("knife", ("knife",), counterpart="spoon", category="violence")
    with pytest.raises(ValueError, match="itself harmful"):
        _tiny_taxonomy(categories=(Category("violence", (gun, knife)),))


def test_a_plain_counterpart_name_is_used_as_is():
    knife = Concept("knife", ("knife",), counterpart="wooden spoon", category="violence")
    assert _tiny_taxonomy(categories=(Category("violence", (knife,)),)).counterpart_name("knife") == "wooden spoon"


def test_a_file_with_unknown_keys_names_them(tmp_path):
    path = tmp_path / "bad.json"
    data = {"categories": [{"id": "violence", "concepts": [{"id": "knife", "names": ["knife"], "colour": "red"}]}]}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="colour"):
        Taxonomy.from_file(path)


def test_an_unsupported_file_extension_is_rejected(tmp_path):
    path = tmp_path / "taxonomy.txt"
    path.write_text("categories: []")
    with pytest.raises(ValueError, match=".yaml"):
        Taxonomy.from_file(path)
