"""Thin structures (wires, catheters, tubes): centreline scores and the device tip, shared by evaluation and node.

IoU says little about a 2-px wire (a one-pixel shift halves it), so devices are also judged as guidewire and
catheter segmentation work judges them: by their centrelines (skeletons, scikit-image) matched within a pixel
tolerance (precision, recall, F1), and by where the tip is.

The tip rule: the centreline end farthest, along the centreline, from the point where the device enters the
frame, the centreline pixel nearest the frame's border. A device reaches the field of view from outside the
body (a guidewire or catheter from its access site, a tube from the mouth or nose), so its leading end is the
one inside; the node has no body mask to say which end is "deepest", but the frame border is always known. A
device lying wholly inside the frame (a K-wire, a needle) has its entry at the end nearer the border, which is
the end a surgeon drives from in the usual views; that is a guess the geometry cannot check, and is stated as one.
"""
from __future__ import annotations

import numpy as np

CENTRELINE_TOLERANCE_PX = 3.0
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def centreline(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) one-pixel-wide skeleton of a mask (8-connected), computed on the mask's bounding box."""
    from skimage.morphology import skeletonize

    mask = np.asarray(mask, bool)
    line = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size:
        box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
        line[box] = skeletonize(mask[box])
    return line


def centreline_scores(pred: np.ndarray, truth: np.ndarray, tolerance_px: float = CENTRELINE_TOLERANCE_PX) -> dict:
    """Centreline precision (share of the predicted centreline within ``tolerance_px`` of the true one), recall
    (the converse) and F1. Precision is None when nothing is predicted; all are None when the truth is empty."""
    from scipy.ndimage import distance_transform_edt

    true_line, pred_line = centreline(truth), centreline(pred)
    if not true_line.any():
        return {"precision": None, "recall": None, "f1": None}
    if not pred_line.any():
        return {"precision": None, "recall": 0.0, "f1": 0.0}
    precision = float(np.mean(distance_transform_edt(~true_line)[pred_line] <= tolerance_px))
    recall = float(np.mean(distance_transform_edt(~pred_line)[true_line] <= tolerance_px))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def tip_point(mask: np.ndarray, max_side: int = 256) -> tuple[float, float] | None:
    """(x, y) frame pixels of a device's tip by the module's rule; None for an empty mask.

    The centreline is traced on the mask's bounding box pooled (any) to at most ``max_side`` pixels, which keeps a
    wire connected and a confused, blob-like mask from costing the node more than tens of milliseconds; the tip is
    then the mask pixel of its pooled cell farthest from the entry, at full resolution.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    y0, x0 = int(rows[0]), int(cols[0])
    box = mask[y0:rows[-1] + 1, x0:cols[-1] + 1]
    stride = max(1, -(-max(box.shape) // max_side))
    padded = np.zeros((-(-box.shape[0] // stride) * stride, -(-box.shape[1] // stride) * stride), bool)
    padded[:box.shape[0], :box.shape[1]] = box
    pooled = padded.reshape(padded.shape[0] // stride, stride, padded.shape[1] // stride, stride).any(axis=(1, 3))
    line = centreline(pooled)
    ys, xs = np.nonzero(line)
    full_y, full_x = y0 + ys * stride + (stride - 1) / 2, x0 + xs * stride + (stride - 1) / 2
    entry = int(np.argmin(np.minimum.reduce([full_y, full_x, h - 1 - full_y, w - 1 - full_x])))
    index = np.full(line.shape, -1, np.int64)
    index[ys, xs] = np.arange(ys.size)
    starts, ends, lengths = [], [], []
    for dy, dx in _NEIGHBOURS:  # the centreline as a graph: 8-neighbours, diagonal steps sqrt(2) long
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < line.shape[0]) & (nx >= 0) & (nx < line.shape[1])
        neighbour = np.full(ys.size, -1, np.int64)
        neighbour[inside] = index[ny[inside], nx[inside]]
        linked = neighbour >= 0
        starts.append(np.flatnonzero(linked))
        ends.append(neighbour[linked])
        lengths.append(np.full(int(linked.sum()), np.hypot(dy, dx)))
    graph = coo_matrix((np.concatenate(lengths), (np.concatenate(starts), np.concatenate(ends))),
                       shape=(ys.size, ys.size)).tocsr()
    along = dijkstra(graph, indices=entry)
    along[~np.isfinite(along)] = -1.0  # other pieces of a broken mask are not this device's centreline
    tip = int(np.argmax(along))
    cell = padded[ys[tip] * stride:(ys[tip] + 1) * stride, xs[tip] * stride:(xs[tip] + 1) * stride]
    cy, cx = np.nonzero(cell)
    cy, cx = cy + y0 + ys[tip] * stride, cx + x0 + xs[tip] * stride
    far = int(np.argmax(np.hypot(cy - full_y[entry], cx - full_x[entry])))
    return float(cx[far]), float(cy[far])


def tip_error_px(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Distance in pixels between the tips of the predicted and the true mask (both by the rule); None when
    either has no tip."""
    predicted, true = tip_point(pred), tip_point(truth)
    if predicted is None or true is None:
        return None
    return float(np.hypot(predicted[0] - true[0], predicted[1] - true[1]))
