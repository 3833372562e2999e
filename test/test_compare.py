"""`fluorosam compare`: paired per-item differences, from records that `fluorosam evaluate` writes."""
import argparse
import json

import numpy as np
import pytest
from synthetic_evalset import Oracle, write_evalset

from fluorosam_ros.cli import main as cli_main
from training.compare import add_arguments, compare, main, paired_difference
from training.evaluate import RECORDS_FILE, evaluate_items, load_eval_items, summarize, write_records


def _rows(values: dict[tuple[str, str], float], points: int = 0) -> list[dict]:
    return [{"points": points, "item": item, "prompt": prompt, "iou": iou} for (item, prompt), iou in values.items()]


def test_paired_difference_averages_classes_per_item_then_pairs_items():
    old = _rows({("a", "x"): 0.2, ("a", "y"): 0.4, ("b", "x"): 0.5, ("b", "y"): 0.5, ("c", "x"): 0.9})
    new = _rows({("a", "x"): 0.4, ("a", "y"): 0.4, ("b", "x"): 0.6, ("b", "y"): 0.6, ("d", "x"): 0.1})
    result = paired_difference(old, new, points=0)
    # item means: old a 0.3, b 0.5; new a 0.4, b 0.6 -> differences 0.1, 0.1; c and d are unpaired
    assert result["items"] == 2 and result["unpaired_items"] == 2
    assert result["old"] == pytest.approx(0.4) and result["new"] == pytest.approx(0.5)
    assert result["difference"] == pytest.approx(0.1) and result["stderr"] == pytest.approx(0.0)
    only_y = paired_difference(old, new, points=0, classes={"y"})
    assert only_y["items"] == 2 and only_y["difference"] == pytest.approx(0.05)
    diffs = np.array([0.0, 0.1])
    assert only_y["stderr"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError, match="same eval set"):
        paired_difference(old, _rows({("z", "x"): 1.0}), points=0)


def test_compare_pairs_two_evaluations_written_by_evaluate(tmp_path):
    items = list(load_eval_items(write_evalset(tmp_path / "set")))
    for name, perfect in (("perfect", True), ("empty", False)):
        raw = evaluate_items(Oracle(perfect), items, [0, 2], show_progress=False)
        (tmp_path / name).mkdir()
        write_records(raw["records"], tmp_path / name / RECORDS_FILE)
        (tmp_path / name / "metrics.json").write_text(json.dumps(summarize(raw)))
    rows = [json.loads(line) for line in (tmp_path / "perfect" / RECORDS_FILE).read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2 and {r["points"] for r in rows} == {0, 2}
    result = compare(tmp_path / "perfect", tmp_path / "empty", {"lungs": {"left lung", "right lung"}})
    for k in ("0", "2"):
        assert result["lungs"][k]["items"] == 3 and result["lungs"][k]["difference"] == -1.0

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "compare.json"
    plot = tmp_path / "compare.png"
    assert main(parser.parse_args([str(tmp_path / "empty"), str(tmp_path / "perfect"), "--out", str(out),
                                   "--plot", str(plot)])) == 0
    written = json.loads(out.read_text())
    assert set(written) == {"15 largest", "all classes"}
    assert written["all classes"]["0"]["difference"] == 1.0
    assert list(written["all classes"]["0"]["per_item"].values()) == [[0.0, 1.0]] * 3
    assert plot.stat().st_size > 0
    assert main(parser.parse_args([str(tmp_path / "empty"), str(tmp_path / "set")])) == 2  # no records there
    assert cli_main(["compare", str(tmp_path / "empty"), str(tmp_path / "perfect")]) == 0  # the console script
