"""Renderer geometry and labels: analytic sphere phantom, laterality in AP and PA, group unions, tools."""
import nibabel as nib
import numpy as np
import pytest

from fluorosam_common.vocabulary import Vocabulary
from training.data.ct import load_ct, render_line_integrals
from training.data.geometry import CArmPose, camera, sample_pose
from training.data.render import ClassMasker, render_view
from training.data.tools import TOOL_NAMES, Cylinder, Tool, make_tool

SIZE = 64


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


@pytest.fixture(scope="module")
def example_ct():
    """The bundled chest CT, downsampled to 5 mm so that the tests stay fast."""
    return load_ct(voxel_mm=5.0)


def _sphere_ct(tmp_path, center_ijk, radius_mm, spacing=2.0, shape=(96, 96, 96)):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    inside = np.linalg.norm((ijk - np.array(center_ijk)) * spacing, axis=-1) <= radius_mm
    hu = np.where(inside, 1000, 0).astype(np.int16)  # a bone sphere in a water cube
    affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "sphere.nii.gz")
    nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), tmp_path / "sphere_labels.nii.gz")
    return load_ct(tmp_path / "sphere.nii.gz", tmp_path / "sphere_labels.nii.gz", voxel_mm=None)


@pytest.mark.slow
@pytest.mark.parametrize("base,primary,secondary", [("AP", 0, 0), ("PA", 30, -20), ("AP", 90, 10)])
def test_sphere_projects_to_predicted_disc(tmp_path, base, primary, secondary):
    radius = 30.0
    ct = _sphere_ct(tmp_path, center_ijk=(55, 40, 52), radius_mm=radius)
    center = ct.voxel_to_world(np.array([55, 40, 52]))
    pose = CArmPose(base, primary, secondary, sdd_mm=1000, sod_mm=700, fov_mm=240, isocenter=(0.0, 0.0, 0.0))
    cam = camera(pose, SIZE)
    targets = cam.targets()
    _, hits = render_line_integrals(ct, cam.source, targets)
    rendered = hits[1].numpy().reshape(SIZE, SIZE)
    # analytic: pixels whose ray passes within `radius` of the centre
    dirs = targets - cam.source
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rel = center - cam.source
    distance = np.linalg.norm(rel - (dirs @ rel)[:, None] * dirs, axis=1).reshape(SIZE, SIZE)
    predicted = distance <= radius
    pixel_at_sphere = cam.pixel_mm * (rel @ cam.direction) / cam.sod
    wrong = rendered != predicted
    assert predicted.sum() > 100
    assert np.all(np.abs(distance[wrong] - radius) <= pixel_at_sphere), "mask differs from the disc by > 1 px"
    rows, cols = np.nonzero(rendered)
    col, row = cam.project(center)
    assert abs(cols.mean() - col) < 0.5 and abs(rows.mean() - row) < 0.5


def _column_of(masks, vocab, name):
    m = masks[vocab.names.index(name)]
    assert m.any(), name
    return np.nonzero(m)[1].mean()


@pytest.mark.slow
@pytest.mark.parametrize("base,primary", [("AP", 0), ("PA", 0), ("AP", 30), ("PA", -40)])
def test_patient_left_is_on_image_right(example_ct, vocab, base, primary):
    pose = CArmPose(base, primary, 5, 1100, 750, 320, tuple(example_ct.anchors["chest"]))
    view = render_view(example_ct, pose, SIZE, ClassMasker(vocab))
    assert _column_of(view.masks, vocab, "left lung") > _column_of(view.masks, vocab, "right lung") + 10
    assert _column_of(view.masks, vocab, "liver") < SIZE / 2  # the liver is on the patient's right
    # head up: the trachea is above the liver
    trachea_row = np.nonzero(view.masks[vocab.names.index("trachea")])[0].mean()
    liver_row = np.nonzero(view.masks[vocab.names.index("liver")])[0].mean()
    assert trachea_row < liver_row


@pytest.mark.slow
def test_pa_chest_is_a_mirror_of_the_source_view(example_ct, vocab):
    cam = camera(CArmPose("PA", 0, 0, 1100, 750, 320, (0.0, 0.0, 0.0)), SIZE)
    assert cam.mirrored
    assert not camera(CArmPose("AP", 0, 0, 1100, 750, 320, (0.0, 0.0, 0.0)), SIZE).mirrored


@pytest.mark.slow
def test_group_masks_are_unions_of_members_minus_what_hides_them(example_ct, vocab):
    rng = np.random.default_rng(3)
    view = render_view(example_ct, sample_pose(rng, example_ct.anchors), SIZE, ClassMasker(vocab))
    anatomy = {c.label_ids[0]: i for i, c in enumerate(vocab.classes) if c.kind == "anatomy"}
    checked = 0
    for g, cls in enumerate(vocab.classes):
        if cls.kind == "group":
            union = np.any([view.masks[anatomy[i]] for i in cls.label_ids], axis=0)
            hiding = [view.masks[vocab.names.index(h)] for h in cls.hidden_by]
            expected = union & ~np.any(hiding, axis=0) if hiding else union
            assert np.array_equal(view.masks[g], expected), cls.name
            checked += union.any()
    assert checked >= 5


def test_hidden_by_removes_only_overlapped_pixels(tmp_path):
    """Synthetic ray hits: lung pixels whose ray also meets the liver or spleen leave the lung field only."""
    path = tmp_path / "v.yaml"
    path.write_text("classes:\n- {name: lobe, kind: anatomy, label_ids: [10]}\n"
                    "- {name: liver, kind: anatomy, label_ids: [5]}\n- {name: spleen, kind: anatomy, label_ids: [1]}\n"
                    "- {name: lung field, kind: group, label_ids: [10], hidden_by: [liver, spleen]}\n")
    vocab = Vocabulary.load(path)
    hits = np.zeros((11, 4, 4), bool)
    hits[10] = True
    hits[5, 3, :2] = True
    hits[1, 0, 3] = True
    lobe, liver, spleen, field = ClassMasker(vocab).masks(hits, {})
    assert lobe.all() and liver.sum() == 2 and spleen.sum() == 1
    assert not field[3, :2].any() and not field[0, 3] and field.sum() == 16 - 3


@pytest.mark.slow
def test_tool_is_visible_labelled_and_only_there(example_ct, vocab):
    pose = CArmPose("AP", 0, 0, 1100, 750, 320, tuple(example_ct.anchors["chest"]))
    masker = ClassMasker(vocab)
    plain = render_view(example_ct, pose, SIZE, masker)
    c = example_ct.anchors["heart"]
    wire = Tool("k-wire", [Cylinder(c - np.array([60.0, 0, 40]), c + np.array([60.0, 0, 40]), 1.0, 40.0)])
    with_tool = render_view(example_ct, pose, SIZE, masker, [wire])
    mask = with_tool.masks[vocab.names.index("k-wire")]
    assert not plain.masks[vocab.names.index("k-wire")].any()
    assert mask.sum() >= 20
    assert np.all(with_tool.image[mask] > plain.image[mask])
    np.testing.assert_array_equal(with_tool.image[~mask], plain.image[~mask])
    assert np.array_equal(np.delete(with_tool.masks, vocab.names.index("k-wire"), 0),
                          np.delete(plain.masks, vocab.names.index("k-wire"), 0))
    assert with_tool.tools == ["k-wire"]


@pytest.mark.slow
def test_every_tool_kind_lands_in_view(example_ct, vocab):
    masker = ClassMasker(vocab)
    pose = CArmPose("AP", 0, 0, 1100, 750, 330, tuple(example_ct.anchors["chest"]))
    for k, name in enumerate(TOOL_NAMES):
        tool = make_tool(name, np.random.default_rng(k), example_ct)
        assert tool is not None, name
        view = render_view(example_ct, pose, SIZE, masker, [tool])
        assert view.masks[vocab.names.index(name)].any(), name


def test_bad_pose_is_rejected():
    with pytest.raises(ValueError, match="base"):
        camera(CArmPose("LAT", 0, 0, 1000, 700, 300, (0.0, 0.0, 0.0)), 64)
    with pytest.raises(ValueError, match="sod"):
        camera(CArmPose("AP", 0, 0, 1000, 1200, 300, (0.0, 0.0, 0.0)), 64)


def test_zoom_out_moves_masks_with_the_image_and_puts_air_around():
    from training.data.augment import ZOOM_OUT_SCALE, zoom_out

    rng = np.random.default_rng(0)
    raw = np.zeros((64, 64), np.float32)
    raw[10:50, 8:30] = 2.0   # two "organs" of distinct density
    raw[20:60, 36:60] = 5.0
    masks = np.stack([raw == 2.0, raw == 5.0] + [rng.random((64, 64)) < 0.5 for _ in range(9)])
    image, out = zoom_out(raw, masks, seed=3)
    again_image, again = zoom_out(raw, masks, seed=3)
    assert np.array_equal(image, again_image) and np.array_equal(out, again)  # seeded
    assert out.shape == masks.shape and out.dtype == bool and image.shape == raw.shape
    # the frame now has air (0) around the shrunken render, and each organ's mask sits on its own density
    # (area averaging blends a boundary pixel with its neighbour, so only most pixels are exact)
    assert (image == 0).mean() > 1 - ZOOM_OUT_SCALE[1] ** 2 - 1e-6
    for k, value in ((0, 2.0), (1, 5.0)):
        assert out[k].sum() < masks[k].sum()
        assert (np.abs(image[out[k]] - value) < 1e-5).mean() > 0.8
    assert not np.array_equal(zoom_out(raw, masks, seed=4)[0], image)
    with pytest.raises(ValueError, match="expected image"):
        zoom_out(raw, masks[:, :32], seed=0)


def test_inspiration_stretch_lowers_the_lung_base_under_a_fixed_apex():
    from training.data.augment import INSPIRATION_SCALE, inspiration_stretch

    rng = np.random.default_rng(0)
    raw = np.zeros((64, 64), np.float32)
    raw[8:30, 10:54] = 1.0   # "lungs" and, under the dome, "liver", of distinct densities
    raw[30:56, 10:54] = 4.0
    # 40 classes: 5 packed bytes per pixel, more channels than OpenCV's 4-channel fast paths
    masks = np.stack([raw == 1.0, raw == 4.0] + [rng.random((64, 64)) < 0.5 for _ in range(38)])
    image, out = inspiration_stretch(raw, masks, lungs=0, seed=3)
    again_image, again = inspiration_stretch(raw, masks, lungs=0, seed=3)
    assert np.array_equal(image, again_image) and np.array_equal(out, again)  # seeded
    assert out.shape == masks.shape and out.dtype == bool and image.shape == raw.shape
    rows = np.flatnonzero(out[0].any(axis=1))
    assert rows[0] == 8  # the apex stays
    assert 29 < rows[-1] <= 8 + 22 * INSPIRATION_SCALE[1]  # the base went down, by at most the largest scale
    assert np.array_equal(out[0].any(axis=0), masks[0].any(axis=0))  # nothing moves sideways
    for k, value in ((0, 1.0), (1, 4.0)):  # each mask still sits on its own density (no edge blending)
        assert (np.abs(image[out[k]] - value) < 1e-5).mean() > 0.95
    liver = np.flatnonzero(out[1].any(axis=1))
    assert liver[0] == rows[-1] + 1 and liver.size == 26  # the abdomen below moved down, unscaled
    alone = inspiration_stretch(raw, masks[[0, 39]], lungs=0, seed=3)[1]
    assert np.array_equal(alone[1], out[39])  # the last packed byte moved as that class would alone
    assert not np.array_equal(inspiration_stretch(raw, masks, lungs=0, seed=4)[1][0], out[0])
    no_lungs = masks.copy()
    no_lungs[0] = False
    unchanged = inspiration_stretch(raw, no_lungs, lungs=0, seed=3)
    assert unchanged[0] is raw and unchanged[1] is no_lungs


def test_surgical_views_aim_only_where_the_body_reaches():
    """The pelvis, lumbar and hip families are drawn for a body with those anchors and never for one without;
    asking for one the body lacks is a clear error; inlet and outlet tilt both ways."""
    from training.data.geometry import VIEW_FAMILIES

    chest_only = {"chest": np.zeros(3), "heart": np.ones(3)}
    families = {sample_pose(np.random.default_rng(s), chest_only).family for s in range(200)}
    assert families <= {n for n, f in VIEW_FAMILIES.items() if f.anchors is None or "chest" in f.anchors}
    with pytest.raises(ValueError, match="does not have"):
        sample_pose(np.random.default_rng(0), chest_only, family="ap_pelvis")
    whole = {**chest_only, "pelvis": np.array([0.0, 0.0, -400.0]), "left hip": np.array([-90.0, 0.0, -450.0]),
             "right hip": np.array([90.0, 0.0, -450.0]), "lumbar spine": np.array([0.0, -30.0, -250.0])}
    families = {sample_pose(np.random.default_rng(s), whole).family for s in range(300)}
    assert {"ap_pelvis", "pelvic_inlet_outlet", "ap_lumbar", "lateral_lumbar", "hip", "oblique"} <= families
    tilts = [sample_pose(np.random.default_rng(s), whole, family="pelvic_inlet_outlet").secondary_deg
             for s in range(40)]
    assert min(tilts) <= -20 and max(tilts) >= 20 and all(abs(t) >= 20 for t in tilts)
    hip = sample_pose(np.random.default_rng(1), whole, family="hip")
    assert min(np.linalg.norm(np.array(hip.isocenter) - whole[k]) for k in ("left hip", "right hip")) < 100
