"""The trained default model in models/fluorosam-tiny: text prompts map to class codes, nonsense is refused."""
import json

import pytest
import torch

from fluorosam_common.paths import default_model_dir
from fluorosam_common.vocabulary import Vocabulary
from training.model import load_checkpoint

MODEL_DIR = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(),
                                reason=f"no trained default model at {MODEL_DIR}")


@pytest.fixture(scope="module")
def trained():
    model, meta = load_checkpoint(MODEL_DIR)
    return model, meta, Vocabulary.load()


def test_checkpoint_matches_vocabulary_and_size(trained):
    model, meta, vocabulary = trained
    assert meta["vocabulary_sha256"] == vocabulary.sha256
    assert meta["oov"]["vocab_similarity_min"] is not None and meta["min_score"] is not None
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert size < 60e6


def test_paraphrases_share_their_class_code(trained):
    model, _, vocabulary = trained
    names = ["left lung", "right lung", "heart", "liver", "spine", "ribs", "trachea", "lungs"]
    same, other = 0, 0
    with torch.no_grad():
        name_codes = model.encode_text(names).code.tolist()
        for name, code in zip(names, name_codes):
            phrases = vocabulary.heldout_phrases(name) + vocabulary.training_phrases(name)[1:8]
            codes = model.encode_text(phrases).code.tolist()
            same += sum(c == code for c in codes)
            other += sum(c in set(name_codes) - {code} for c in codes)
    assert same > 2 * other, (same, other)


def test_left_and_right_land_on_different_codes(trained):
    model, _, _ = trained
    with torch.no_grad():
        codes = model.encode_text(["left lung", "right lung", "left kidney", "right kidney"]).code.tolist()
    assert codes[0] != codes[1] and codes[2] != codes[3]


def test_nonsense_is_flagged_and_class_names_are_not(trained):
    model, _, vocabulary = trained
    with torch.no_grad():
        oov = model.encode_text(vocabulary.oov_examples).oov.float().mean().item()
        names = model.encode_text(vocabulary.names).oov.float().mean().item()
    assert oov >= 0.9 and names <= 0.05, (oov, names)


def test_reported_metrics_are_stored(trained):
    """Every evaluation model.json reports is the one whose full output ships beside it."""
    _, meta, _ = trained
    assert meta["metrics"]
    for name, recorded in meta["metrics"].items():
        metrics = json.loads((MODEL_DIR / "eval" / name / "metrics.json").read_text())
        for points, entry in recorded["points"].items():
            assert metrics["points"][points]["mean_iou"] == pytest.approx(entry["mean_iou"]), (name, points)
