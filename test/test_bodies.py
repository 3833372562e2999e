"""Bodies from other sources: a label map rewritten with TotalSegmentator ids, unknown labels kept unknown."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fluorosam_common.paths import config_path
from training.data.bodies import load_mapping, map_label_grid, map_labels

IRCAD_NAMES = {1: "skin", 2: "liver", 3: "bone", 4: "rightlung", 5: "leftlung", 6: "leftkidney", 7: "spleen",
               8: "rightkidney", 9: "venoussystem", 10: "artery", 11: "portalvein"}


def test_ircad_mapping_keeps_laterality_and_leaves_unlabelled_structures_unknown():
    mapping = load_mapping(config_path("bodies/ircad.yaml"))
    grid = np.arange(12).reshape(3, 4)  # every IRCAD id once (0 = outside)
    mapped = map_label_grid(grid, IRCAD_NAMES, mapping)
    by_name = {IRCAD_NAMES[i]: int(mapped.flat[i]) for i in IRCAD_NAMES}
    assert by_name["liver"] == 5 and by_name["spleen"] == 1
    assert (by_name["leftkidney"], by_name["rightkidney"]) == (3, 2)  # TotalSegmentator: 2 right, 3 left
    assert by_name["leftlung"] in (10, 11) and by_name["rightlung"] in (12, 13, 14)
    assert by_name["skin"] == by_name["bone"] == by_name["artery"] == 0  # unknown, not a class
    assert "ribs" not in mapping["known_classes"] and "left lung upper lobe" not in mapping["known_classes"]


def test_a_mapping_that_claims_a_class_it_cannot_label_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: {liver: 5}\nknown_classes: [liver, spleen]\n")
    with pytest.raises(ValueError, match="spleen"):
        load_mapping(bad)
    with pytest.raises(ValueError, match="does not have"):
        map_label_grid(np.zeros((2, 2), int), {1: "hepar"}, load_mapping(config_path("bodies/ircad.yaml")))


def test_map_labels_writes_the_same_grid_and_affine(tmp_path):
    import nibabel as nib

    grid = np.zeros((6, 5, 4), np.uint8)
    grid[1:3, 1:3, 1:3] = 2  # liver
    grid[4, 4, 3] = 3  # bone
    affine = np.diag([0.5, 0.5, 1.6, 1.0])
    nib.save(nib.Nifti1Image(grid, affine), str(tmp_path / "labels.nii.gz"))
    (tmp_path / "labels.json").write_text(json.dumps({"labels": {str(k): v for k, v in IRCAD_NAMES.items()}}))
    out = map_labels(tmp_path / "labels.nii.gz", tmp_path / "labels.json", config_path("bodies/ircad.yaml"),
                     tmp_path / "mapped.nii.gz")
    image = nib.load(str(out))
    mapped = np.asarray(image.dataobj)
    assert np.allclose(image.affine, affine) and mapped.shape == grid.shape
    assert set(np.unique(mapped)) == {0, 5} and (mapped == 5).sum() == 8


def test_an_icrp_phantom_becomes_a_ras_pseudo_ct_with_its_sides_kept(tmp_path):
    """A 4-column toy phantom: the patient's right lung in the first columns (the ICRP column order runs from
    the patient's right to left) must land at +x (RAS), the left lung at -x, with densities as HU."""
    import nibabel as nib

    from training.data.bodies import phantom_to_nifti

    organ_id = np.zeros((3, 2, 4), np.uint8)  # (slices toes -> vertex, rows anterior -> posterior, columns R -> L)
    organ_id[:, :, 0] = 99  # Lung, right, tissue
    organ_id[:, :, 3] = 97  # Lung, left, tissue
    organ_id[2, 0, 1] = 95  # Liver, top slice, front row
    np.savez(tmp_path / "toy.npz", organ_id=organ_id, voxel_mm=np.array([2.0, 2.0, 8.0]))
    used = {95: ("Liver", 1.05), 97: ("Lung, left, tissue", 0.382), 99: ("Lung, right, tissue", 0.382)}
    others = [n for n in load_mapping(config_path("bodies/icrp110.yaml"))["labels"] if n not in
              {name for name, _ in used.values()}]  # the real table names every mapped organ: so does the toy
    rows = [f"{k}    {name}    40    {rho:.3f}" for k, (name, rho) in used.items()]
    rows += [f"{150 + i}    {name}    40    1.000" for i, name in enumerate(others)]
    (tmp_path / "organs.dat").write_text("Organs\n\nOrgan Organ Tissue Density\nID number\n" + "\n".join(rows) + "\n")
    ct_path, labels_path = phantom_to_nifti(tmp_path / "toy.npz", tmp_path / "organs.dat",
                                            config_path("bodies/icrp110.yaml"), tmp_path / "out")
    ct, labels = nib.load(str(ct_path)), nib.load(str(labels_path))
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S") and ct.shape == (4, 2, 3)
    hu, ids = np.asarray(ct.dataobj), np.asarray(labels.dataobj)
    x_of_column = [nib.affines.apply_affine(ct.affine, (i, 0, 0))[0] for i in range(4)]
    right_column = int(np.argmax(x_of_column))  # RAS: +x is the patient's right
    assert (ids[right_column] == 12).all() and (ids[int(np.argmin(x_of_column))] == 10).all()
    assert hu[right_column, 0, 0] == -618 and hu.min() == -1000  # 1000 (0.382 - 1); air outside the body
    liver = np.argwhere(ids == 5)
    assert len(liver) == 1 and nib.affines.apply_affine(ct.affine, liver[0])[2] == max(
        nib.affines.apply_affine(ct.affine, (0, 0, k))[2] for k in range(3))  # the top slice is the highest z


def test_a_pair_labelled_as_one_organ_splits_at_its_own_midline():
    """ICRP-110 labels both femora as one organ: the sided mapping entry gives each half of the pair its side,
    split at the pair's centroid along the patient-left axis (wherever the body sits in the grid)."""
    mapping = {"labels": {"Femora, upper half, cortical": {"left": 75, "right": 76}, "Liver": 5}}
    grid = np.zeros((10, 3), int)
    grid[2:4, :] = 7  # the femur nearer index 0 (the patient's right when the axis runs to the left)
    grid[7:9, :] = 7
    grid[5, 1] = 3  # liver, off the pair's midline
    names = {7: "Femora, upper half, cortical", 3: "Liver"}
    mapped = map_label_grid(grid, names, mapping, left_axis=(0, 1))
    assert (mapped[2:4] == 76).all() and (mapped[7:9] == 75).all() and mapped[5, 1] == 5
    flipped = map_label_grid(grid, names, mapping, left_axis=(0, -1))
    assert (flipped[2:4] == 75).all() and (flipped[7:9] == 76).all()
    with pytest.raises(ValueError, match="patient-left axis"):
        map_label_grid(grid, names, mapping)


def test_icrp_mapping_knows_the_new_regions_by_side():
    known = set(load_mapping(config_path("bodies/icrp110.yaml"))["known_classes"])
    assert {"left femur", "right femur", "left hip bone", "right hip bone", "pelvis", "sacrum", "skull",
            "brain", "left humerus", "right humerus"} <= known
