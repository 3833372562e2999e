"""Device metrics and the tip rule on hand-made masks (fluorosam_common/thin.py)."""
from __future__ import annotations

import numpy as np
import pytest

from fluorosam_common.thin import centreline_scores, tip_error_px, tip_point


def _wire(shape=(200, 300), shift=0) -> np.ndarray:
    """A 3-px wire entering at the left border along row 100, turning down at x = 180 to row 150."""
    mask = np.zeros(shape, bool)
    mask[99 + shift:102 + shift, 0:181] = True
    mask[100 + shift:151 + shift, 179:182] = True
    return mask


def test_a_known_wire_scores_one_and_its_tip_is_the_inner_end():
    wire = _wire()
    assert centreline_scores(wire, wire) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert tip_error_px(wire, wire) == 0.0
    x, y = tip_point(wire)
    assert abs(x - 180) <= 1 and 146 <= y <= 150  # the end inside the frame, not the entry at x = 0


def test_a_shifted_wire_gives_the_expected_figures():
    wire = _wire()
    near = centreline_scores(_wire(shift=2), wire)  # within the 3-px tolerance everywhere
    assert near["f1"] == 1.0 and tip_error_px(_wire(shift=2), wire) == pytest.approx(2.0, abs=1.0)
    far = centreline_scores(_wire(shift=6), wire)  # the long run misses; the vertical run still overlaps itself
    assert 0.1 < far["precision"] < 0.35 and 0.1 < far["recall"] < 0.35 and far["f1"] < 0.35


def test_undefined_scores_are_none_not_zero():
    wire, empty = _wire(), np.zeros((200, 300), bool)
    assert centreline_scores(empty, wire) == {"precision": None, "recall": 0.0, "f1": 0.0}
    assert centreline_scores(wire, empty) == {"precision": None, "recall": None, "f1": None}
    assert tip_point(empty) is None and tip_error_px(empty, wire) is None


def test_a_device_wholly_inside_the_frame_enters_at_the_end_nearer_the_border():
    k_wire = np.zeros((512, 512), bool)
    for i in range(200):
        k_wire[150 + i, 100 + i:103 + i] = True  # top-left end 100 px from the border, bottom-right end 162
    x, y = tip_point(k_wire)
    assert abs(x - 301) <= 2 and abs(y - 349) <= 2


def test_a_large_wire_is_traced_at_full_resolution_after_pooling():
    wire = np.zeros((1024, 1024), bool)
    wire[500:503, 0:900] = True
    x, y = tip_point(wire)
    assert x >= 897 and 500 <= y <= 502
