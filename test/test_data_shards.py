"""Shards, manifest, reader, augmentation, splits, eval-set export and the Ray backend."""
import json
from pathlib import Path

import numpy as np
import pytest

from fluorosam_common.paths import config_path
from training.data.augment import anatomy_warp, domain_randomize
from training.data.evalset import export_evalset
from training.data.jobs import CTSpec, plan_jobs, render_dataset
from training.data.shards import (
    ShardDataset,
    add_shard,
    new_manifest,
    read_manifest,
    split_by_ct,
    write_manifest,
    write_shard,
)

CLASSES = ["left lung", "right lung", "heart"]


def _fake_folder(root, ct_ids=("a", "b", "c"), n=3, size=16):
    """A shard folder written through the real writer, with known images and masks."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    manifest = new_manifest(size, CLASSES, "sha", {"views": n})
    truth = {}
    for ct in ct_ids:
        images = rng.normal(50, 10, (n, size, size)).astype(np.float32)
        masks = rng.random((n, len(CLASSES), size, size)) > 0.7
        masks[:, 2] = False  # "heart" absent everywhere
        write_shard(root / f"shard-{ct}-00000.npz", images, masks)
        add_shard(manifest, f"shard-{ct}-00000.npz", ct,
                  [{"seed": 100 * ord(ct) + k, "pose": {}, "tools": [], "present": []} for k in range(n)])
        truth[ct] = (images, masks)
    write_manifest(root, manifest)
    return truth


def test_manifest_and_shards_round_trip(tmp_path):
    truth = _fake_folder(tmp_path)
    data = ShardDataset(tmp_path)
    assert data.classes == CLASSES and len(data) == 9
    for i in range(len(data)):
        sample = data[i]
        images, masks = truth[sample["ct_id"]]
        k = data.items[i]["index"]
        np.testing.assert_allclose(sample["image"], images[k].astype(np.float16).astype(np.float32))
        assert sample["masks"].dtype == bool and np.array_equal(sample["masks"], masks[k])
        assert np.array_equal(sample["present"], masks[k].reshape(3, -1).any(-1))
        assert sample["index"] == i
    assert not any(f.name.endswith(".tmp") for f in tmp_path.iterdir())
    with pytest.raises(IndexError):
        data[9]


def test_reader_filters_by_ct_and_refreshes(tmp_path):
    _fake_folder(tmp_path, ct_ids=("a",))
    data = ShardDataset(tmp_path, ct_ids=["a", "b"])
    assert len(data) == 3
    _fake_folder(tmp_path, ct_ids=("a", "b"))
    data.refresh()
    assert len(data) == 6 and {data[i]["ct_id"] for i in range(6)} == {"a", "b"}


def test_split_by_ct_is_disjoint_and_reproducible(tmp_path):
    _fake_folder(tmp_path, ct_ids=("a", "b", "c", "d", "e"))
    train, val = split_by_ct(tmp_path, 0.4, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and set(train) | set(val) == set("abcde")
    assert split_by_ct(tmp_path, 0.4, seed=1) == (train, val)
    with pytest.raises(ValueError):
        split_by_ct(tmp_path, 1.0, seed=1)


def test_single_ct_is_never_split(tmp_path):
    _fake_folder(tmp_path, ct_ids=("a",))
    assert split_by_ct(tmp_path, 0.2, seed=0) == (["a"], [])


def test_augmentation_is_reproducible_and_seed_dependent():
    raw = np.random.default_rng(0).gamma(4, 10, (64, 64)).astype(np.float32)
    a = domain_randomize(raw, seed=3, epoch=1, index=7)
    assert np.array_equal(a, domain_randomize(raw, seed=3, epoch=1, index=7))
    assert a.dtype == np.float32 and a.shape == raw.shape and 0 <= a.min() and a.max() <= 1
    others = [domain_randomize(raw, seed=3, epoch=2, index=7), domain_randomize(raw, seed=4, epoch=1, index=7),
              domain_randomize(raw, seed=3, epoch=1, index=8)]
    assert all(not np.array_equal(a, o) for o in others)


def test_augmented_dataset_keeps_masks_and_is_reproducible(tmp_path):
    _fake_folder(tmp_path, ct_ids=("a",))
    plain, augmented = ShardDataset(tmp_path), ShardDataset(tmp_path, augment=True, seed=5)
    first = augmented[1]["image"]
    assert np.array_equal(augmented[1]["masks"], plain[1]["masks"])
    assert np.array_equal(first, augmented[1]["image"])
    augmented.set_epoch(1)
    assert not np.array_equal(first, augmented[1]["image"])


def test_anatomy_warp_moves_image_and_masks_together():
    """An image that equals its mask stays equal to it after the warp; no flip; reproducible per seed."""
    image = np.zeros((96, 96), np.float32)
    image[20:80, 10:40] = 1.0
    masks = np.zeros((10, 96, 96), bool)
    masks[0] = image > 0.5
    masks[9, 40:60, 60:90] = True  # beyond the first packed byte: bit packing must keep every class
    warped, warped_masks = anatomy_warp(image, masks, seed=1, epoch=0, index=3)
    assert warped.shape == image.shape and warped_masks.shape == masks.shape and warped_masks.dtype == bool
    assert not np.array_equal(warped_masks[0], masks[0])
    assert ((warped > 0.5) == warped_masks[0]).mean() > 0.99
    assert not warped_masks[1:9].any()
    cols = np.arange(96)[None, :]
    assert cols.repeat(96, 0)[warped_masks[0]].mean() < 48 < cols.repeat(96, 0)[warped_masks[9]].mean()
    again = anatomy_warp(image, masks, seed=1, epoch=0, index=3)
    assert np.array_equal(again[0], warped) and np.array_equal(again[1], warped_masks)
    assert not np.array_equal(anatomy_warp(image, masks, seed=1, epoch=1, index=3)[1], warped_masks)


def test_dataset_warp_probability(tmp_path):
    _fake_folder(tmp_path, ct_ids=("a",))
    plain = ShardDataset(tmp_path)
    always = ShardDataset(tmp_path, augment=True, seed=5, warp_prob=1.0)
    assert all(not np.array_equal(always[i]["masks"], plain[i]["masks"]) for i in range(3))
    assert np.array_equal(always[1]["masks"], always[1]["masks"])


def test_dataset_inspiration_probability(tmp_path):
    """Anchored on the "lungs" class: applied where it exists, a folder without it is left alone."""
    size = 32
    manifest = new_manifest(size, ["lungs", "liver"], "sha", {"views": 2})
    masks = np.zeros((2, 2, size, size), bool)
    masks[:, 0, 2:22, 6:26] = True
    masks[:, 1, 22:30, 6:26] = True
    write_shard(tmp_path / "shard-a-00000.npz", masks[:, 0].astype(np.float32), masks)
    add_shard(manifest, "shard-a-00000.npz", "a",
              [{"seed": k, "pose": {}, "tools": [], "present": []} for k in range(2)])
    write_manifest(tmp_path, manifest)
    never = ShardDataset(tmp_path, augment=True, seed=5)
    always = ShardDataset(tmp_path, augment=True, seed=5, inspiration_prob=1.0)
    for i in range(2):
        base = np.flatnonzero(always[i]["masks"][0].any(axis=1))[-1]
        assert base > 21 and np.array_equal(never[i]["masks"], masks[i])
    _fake_folder(tmp_path / "other", ct_ids=("a",))
    other = ShardDataset(tmp_path / "other")
    assert all(np.array_equal(ShardDataset(tmp_path / "other", augment=True, inspiration_prob=1.0)[i]["masks"],
                              other[i]["masks"]) for i in range(3))


def test_bad_manifest_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version"):
        read_manifest(tmp_path)


def test_plan_is_deterministic_with_disjoint_seeds(tmp_path):
    cts = [CTSpec("a"), CTSpec("b", "a.nii", "b.nii")]
    jobs = plan_jobs(cts, tmp_path, views=10, size=64, seed=7, shard_size=4, tool_probability=0.5)
    assert [j.file for j in jobs[:3]] == ["shard-a-00000.npz", "shard-a-00001.npz", "shard-a-00002.npz"]
    seeds = [s for j in jobs for s in j.seeds]
    assert len(seeds) == 20 == len(set(seeds)) and seeds[0] == 7
    with pytest.raises(ValueError):
        plan_jobs(cts, tmp_path, views=10, size=60, seed=0, shard_size=4, tool_probability=0.5)


def test_export_evalset(tmp_path):
    from PIL import Image

    _fake_folder(tmp_path / "data", ct_ids=("a",))
    manifest = export_evalset(tmp_path / "data", tmp_path / "eval", classes=["left lung", "heart"], progress=False)
    assert len(manifest["items"]) == 3
    item = json.loads((tmp_path / "eval" / "manifest.json").read_text())["items"][0]
    image = np.array(Image.open(tmp_path / "eval" / item["image"]))
    assert image.dtype == np.uint16 and image.shape == (16, 16)
    assert list(item["masks"]) == ["left lung"]  # heart is absent, right lung not requested
    mask = np.array(Image.open(tmp_path / "eval" / item["masks"]["left lung"])) > 0
    assert np.array_equal(mask, ShardDataset(tmp_path / "data")[0]["masks"][0])
    with pytest.raises(ValueError, match="not in the rendered data"):
        export_evalset(tmp_path / "data", tmp_path / "eval2", classes=["banana"], progress=False)


@pytest.mark.slow
def test_ray_backend_renders_a_tiny_set(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        manifest = render_dataset([CTSpec("example", voxel_mm=8.0)], tmp_path, views=2, size=64, seed=11,
                                  shard_size=1, backend="ray", progress=False)
    finally:
        ray.shutdown()
    on_disk = read_manifest(tmp_path)
    assert on_disk == manifest
    assert [s["file"] for s in on_disk["shards"]] == ["shard-example-00000.npz", "shard-example-00001.npz"]
    assert [it["seed"] for it in on_disk["items"]] == [11, 12]
    assert "left lung" in on_disk["items"][0]["present"] or "right lung" in on_disk["items"][0]["present"]
    data = ShardDataset(tmp_path)
    assert len(data) == 2 and data[0]["masks"].shape == (len(on_disk["classes"]), 64, 64)
    # a rerun with the same settings finds every shard done and renders nothing
    again = render_dataset([CTSpec("example", voxel_mm=8.0)], tmp_path, views=2, size=64, seed=11, shard_size=1,
                           progress=False)
    assert again["items"] == on_disk["items"]
    with pytest.raises(FileExistsError):
        render_dataset([CTSpec("example", voxel_mm=8.0)], tmp_path, views=3, size=64, seed=11, progress=False)


def test_cli_rejects_ct_without_labels(tmp_path, capsys):
    import argparse

    from training.data import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["render", "--ct", "a.nii.gz", "--views", "1", "--out", str(tmp_path)])
    assert cli.main(args) == 2
    assert "--labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["render", "--example", "--ct", "a.nii.gz", "--views", "1", "--out", str(tmp_path)])


@pytest.mark.slow
def test_relabel_matches_a_fresh_render_with_the_new_vocabulary(tmp_path):
    """A render made without hidden_by, relabelled to diaphragm-only lung fields, equals rendering again bit for bit."""
    import yaml

    from fluorosam_common.vocabulary import Vocabulary
    from training.data.relabel import relabel_dataset

    doc = yaml.safe_load(Path(config_path("vocabulary.yaml")).read_text())
    for c in doc["classes"]:
        c.pop("hidden_by", None)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(doc, sort_keys=False))
    for c in doc["classes"]:
        if c["name"] in ("left lung", "right lung", "lungs"):
            c["hidden_by"] = ["liver", "spleen", "stomach", "colon"]
    diaphragm = tmp_path / "diaphragm.yaml"
    diaphragm.write_text(yaml.safe_dump(doc, sort_keys=False))
    for c in doc["classes"]:
        if c["name"] in ("left lung", "right lung", "lungs"):
            c["hidden_by"] = ["liver"]
    liver_only = tmp_path / "liver_only.yaml"
    liver_only.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = [CTSpec("example", voxel_mm=8.0)]
    render_dataset(spec, tmp_path / "old", views=3, size=64, seed=21, shard_size=2, vocabulary=str(plain),
                   progress=False)
    fresh = render_dataset(spec, tmp_path / "fresh", views=3, size=64, seed=21, shard_size=2,
                           vocabulary=str(diaphragm), progress=False)
    relabelled = relabel_dataset(tmp_path / "old", tmp_path / "new", vocabulary=str(diaphragm), progress=False)

    assert relabelled["vocabulary_sha256"] == Vocabulary.load(diaphragm).sha256 == fresh["vocabulary_sha256"]
    assert relabelled["items"] == fresh["items"] and relabelled["shards"] == fresh["shards"]
    assert relabelled["hidden_by"] == fresh["hidden_by"] == {n: ["liver", "spleen", "stomach", "colon"]
                                                             for n in ("left lung", "right lung", "lungs")}
    old, new, again = (ShardDataset(tmp_path / d) for d in ("old", "new", "fresh"))
    lung = old.classes.index("left lung")
    cut = 0
    for k in range(len(fresh["items"])):
        assert np.array_equal(new[k]["masks"], again[k]["masks"]) and np.array_equal(new[k]["image"], again[k]["image"])
        cut += int(old[k]["masks"][lung].sum() - new[k]["masks"][lung].sum())
    assert cut > 0  # the rule removed lung pixels under the diaphragm, so the comparison is not vacuous
    with pytest.raises(ValueError, match="no hidden_by"):
        relabel_dataset(tmp_path / "old", tmp_path / "again", vocabulary=str(plain), progress=False)
    with pytest.raises(ValueError, match="must differ"):
        relabel_dataset(tmp_path / "old", tmp_path / "old", vocabulary=str(diaphragm), progress=False)
    # The relabelled folder records its rules: dropping one of them cannot be done by relabelling.
    with pytest.raises(ValueError, match="left lung by spleen.*cannot come back"):
        relabel_dataset(tmp_path / "new", tmp_path / "fewer", vocabulary=str(liver_only), progress=False)
    assert relabel_dataset(tmp_path / "old", tmp_path / "liver", vocabulary=str(liver_only),
                           progress=False)["hidden_by"]["lungs"] == ["liver"]


@pytest.mark.slow
def test_default_renders_end_every_lung_class_at_the_diaphragm(tmp_path):
    """The shipped convention (radiologists' lung fields): no lung pixel where an upper-abdomen organ projects."""
    render_dataset([CTSpec("example", voxel_mm=8.0)], tmp_path / "d", views=2, size=64, seed=21, shard_size=2,
                   progress=False)
    data = ShardDataset(tmp_path / "d")
    lungs = [n for n in data.classes if "lung" in n]
    assert len(lungs) == 8  # five lobes, left, right, both
    abdomen = [data.classes.index(n) for n in ("liver", "spleen", "stomach", "colon")]
    for k in range(len(data)):
        masks = data[k]["masks"]
        below = masks[abdomen].any(axis=0)
        assert below.any() and masks[data.classes.index("lungs")].any()  # not vacuous
        for name in lungs:
            assert not (masks[data.classes.index(name)] & below).any(), name
