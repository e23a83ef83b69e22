"""Tests of biounet.evaluation: pairing prediction and ground-truth files, scoring them
(``biounet evaluate``) and writing the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from test_metrics import cells_and_membranes, merged_and_missed, soft

from biounet import evaluation as E
from biounet import metrics as M
from biounet.cli import main


# --------------------------------------------------------------------------------------------
# Pairing files
# --------------------------------------------------------------------------------------------
def test_pairing_key():
    assert E.pairing_key("out/A_probabilities.tif") == "a"
    assert E.pairing_key("a_labels_mask.PNG") == "a"
    assert E.pairing_key("x.ome.tif") == "x"
    assert E.pairing_key("man_seg007.tif") == E.pairing_key("mask007.tif") == "007"
    assert E.pairing_key("mask.tif") == "mask" and E.pairing_key("_labels.tif") == "_labels"


def test_pair_files_errors(tmp_path):
    for name in ("a_probabilities.tif", "a_labels.tif", "b.tif", "a.png", "c.png"):
        (tmp_path / name).touch()
    pairs = E.pair_files([tmp_path / "a_probabilities.tif", tmp_path / "a_labels.tif"], [tmp_path / "a.png"])
    assert pairs == [(tmp_path / "a_probabilities.tif", tmp_path / "a.png")]
    pairs = E.pair_files([tmp_path / "a_probabilities.tif", tmp_path / "a_labels.tif"], [tmp_path / "a.png"],
                         prefer="labels")  # fmt: skip
    assert pairs == [(tmp_path / "a_labels.tif", tmp_path / "a.png")]
    with pytest.raises(ValueError, match=r"no ground truth for .*b\.tif"):
        E.pair_files([tmp_path / "b.tif"], [tmp_path / "a.png"])
    with pytest.raises(ValueError, match=r"no prediction for ground truth .*c\.png"):
        E.pair_files([tmp_path / "a_labels.tif"], [tmp_path / "a.png", tmp_path / "c.png"])
    with pytest.raises(ValueError, match=r"a_labels\.tif and .*a\.png both pair with the name key 'a'"):
        E.pair_files([tmp_path / "a_labels.tif", tmp_path / "a.png"], [tmp_path / "a.png"])
    with pytest.raises(ValueError, match=r"missing\.tif: no such prediction file"):
        E.pair_files([tmp_path / "missing.tif"], [tmp_path / "a.png"])


def test_pair_files_pairs_cell_tracking_challenge_folders(tmp_path):
    res, gt_seg = tmp_path / "01_RES", tmp_path / "01_GT" / "SEG"
    for folder in (res, gt_seg):
        folder.mkdir(parents=True)
    for t in range(3):
        (res / f"mask{t:03d}.tif").touch()
    for t in (0, 2):  # CTC ground truth annotates only some frames
        (gt_seg / f"man_seg{t:03d}.tif").touch()
    names = [(p.name, g.name) for p, g in E.pair_files([res], [gt_seg])]
    assert names == [("mask000.tif", "man_seg000.tif"), ("mask002.tif", "man_seg002.tif")]  # mask001: no GT


# --------------------------------------------------------------------------------------------
# Scoring files and the command
# --------------------------------------------------------------------------------------------
def write_isbi_like(folder: Path, rng) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    import imageio.v3 as iio

    folder.mkdir()
    gt = cells_and_membranes()
    prob = soft(rng, gt.shape, sigma=1.0) * 0.4 + (gt > 0) * 0.6
    gt_path, pred_path = folder / "s01.png", folder / "s01_probabilities.tif"
    iio.imwrite(gt_path, gt)
    tifffile.imwrite(pred_path, np.stack([1 - prob, prob]).astype(np.float32))  # classes first
    return pred_path, gt_path, prob.astype(np.float32), gt


def test_cli_evaluate_writes_report(tmp_path, capsys):
    rng = np.random.default_rng(8)
    pred_path, gt_path, prob, gt = write_isbi_like(tmp_path / "data", rng)
    report = tmp_path / "report.csv"
    assert main(["evaluate", str(pred_path), "--gt", str(gt_path), "-o", str(report), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "s01_probabilities.tif" in printed and "mean" in printed
    rows = list(csv.DictReader(report.open()))
    assert [r["prediction"] for r in rows] == [str(pred_path), "mean"]
    expected = M.isbi_scores(prob, gt).summary()
    for key in ("v_rand", "v_info", "pixel_error", "warping_error", "splits_mergers_error"):
        assert float(rows[0][key]) == pytest.approx(expected[key]) == pytest.approx(float(rows[1][key]))
    labels = ndimage.label(prob > 0.5)[0]
    assert float(rows[0]["seg"]) == pytest.approx(M.seg_score(ndimage.label(gt > 0)[0], labels))

    json_report = tmp_path / "report.json"
    argv = ["evaluate", str(pred_path), "--gt", str(gt_path), "--metrics", "cells", "--split", "distance",
            "--min-size", "5", "-o", str(json_report), "--no-progress"]
    assert main(argv) == 0
    data = json.loads(json_report.read_text())
    assert "v_rand" not in data["mean"] and data["images"][0]["seg"] == data["mean"]["seg"]
    from biounet.postprocess import probabilities_to_labels

    labels = probabilities_to_labels(prob, split="distance", min_size=5)
    expected = M.match_objects(ndimage.label(gt > 0)[0], labels).mean_average_precision
    assert data["mean"]["map"] == pytest.approx(expected)


def test_cell_scores_are_those_of_score_instances(tmp_path):
    gt, pred = merged_and_missed()
    tifffile.imwrite(tmp_path / "a.tif", gt)
    tifffile.imwrite(tmp_path / "a_labels.tif", pred)
    (row,) = E.evaluate_files([(tmp_path / "a_labels.tif", tmp_path / "a.tif")], metrics="cells", progress=False)
    s = M.score_instances(gt, pred, thresholds=M.IOU_THRESHOLDS)
    i75 = M.IOU_THRESHOLDS.index(0.75)
    assert row == {
        "prediction": str(tmp_path / "a_labels.tif"), "ground_truth": str(tmp_path / "a.tif"),
        "iou": s.foreground_iou, "dice": s.foreground_dice, "seg": s.seg, "ap50": s.average_precision[0],
        "ap75": s.average_precision[i75], "map": s.mean_average_precision, "precision50": s.precision[0],
        "recall50": s.recall[0], "f1_50": s.f1[0], "n_true": 4.0, "n_pred": 2.0,
    }  # fmt: skip
    # by hand (test_metrics.merged_and_missed): 24 of 36 foreground pixels shared, D alone matched (IoU 0.6)
    assert (row["iou"], row["dice"], row["ap50"], row["f1_50"], row["ap75"]) == (24 / 36, 0.8, 1 / 5, 1 / 3, 0.0)


def test_cli_evaluate_errors_name_both_files(tmp_path, capsys):
    import imageio.v3 as iio

    rng = np.random.default_rng(9)
    pred_path, gt_path, _, _ = write_isbi_like(tmp_path / "data", rng)
    wrong = tmp_path / "s01_gt.png"
    iio.imwrite(wrong, np.zeros((10, 10), np.uint8))
    assert main(["evaluate", str(pred_path), "--gt", str(wrong), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(pred_path) in err and str(wrong) in err and "(40, 48)" in err and "(10, 10)" in err
    assert main(["evaluate", str(pred_path), "--gt", str(gt_path), "-o", str(tmp_path / "r.txt")]) == 1
    assert "must be a .csv or .json file" in capsys.readouterr().err
    missing = str(tmp_path / "missing.tif")
    assert main(["evaluate", missing, "--gt", missing, "-o", str(tmp_path / "r.txt")]) == 1
    assert "r.txt: the report must be" in capsys.readouterr().err  # checked before the files are


def test_a_report_path_that_is_a_folder_is_refused_before_scoring(tmp_path):
    (tmp_path / "rep.json").mkdir()
    with pytest.raises(ValueError, match="rep.json: a folder; the report must be a file"):
        E.check_report_path(tmp_path / "rep.json")


def test_check_report_path():
    assert E.check_report_path("out/R.JSON") == Path("out/R.JSON")
    with pytest.raises(ValueError, match=r"r\.txt: the report must be a \.csv or \.json file"):
        E.check_report_path("r.txt")


def test_write_report_json(tmp_path):
    rows = [{"prediction": "a", "ground_truth": "x", "seg": 0.5}, {"prediction": "b", "ground_truth": "y", "seg": 1.0}]
    out = E.write_report(tmp_path / "r.json", rows)
    data = json.loads(out.read_text())
    assert data["images"] == rows and data["mean"]["seg"] == 0.75
    assert not [p for p in tmp_path.iterdir() if p.name != "r.json"]  # no temporary file left


def test_stack_probabilities_from_predict_are_read_on_their_class_axis(tmp_path):
    """``biounet predict`` writes stacks as (Z, C, Y, X): evaluate must take C = 1, not Z = 1."""
    import tifffile

    from biounet.evaluation import evaluate_files
    from biounet.io import write_tiff

    gt = np.zeros((2, 16, 16), np.uint16)
    gt[0, 2:8, 2:8] = 1
    gt[1, 8:14, 3:12] = 1
    prob = np.stack([1.0 - (gt > 0), (gt > 0).astype(float)], axis=1)  # (Z, C, Y, X), a perfect prediction
    write_tiff(tmp_path / "s_probabilities.tif", prob, axes="ZCYX")
    tifffile.imwrite(tmp_path / "s.tif", gt)
    (row,) = evaluate_files([(tmp_path / "s_probabilities.tif", tmp_path / "s.tif")], metrics="cells", progress=False)
    assert row["iou"] == 1.0


def test_options_are_checked_and_never_silently_ignored(tmp_path, capsys):
    """Issue 13, finding 6: ``--threshold 2``/``nan`` on a predict folder gave the default scores."""
    from biounet.evaluation import evaluate_files
    from biounet.io import write_tiff

    gt = np.zeros((16, 16), np.uint16)
    gt[2:8, 2:8], gt[9:14, 3:12] = 1, 2
    prob = np.zeros((2, 16, 16), np.float32)
    prob[1] = np.where(gt > 0, 0.7, 0.1)
    prob[0] = 1 - prob[1]
    folder = tmp_path / "pred"
    folder.mkdir()
    write_tiff(folder / "s_probabilities.tif", prob, axes="CYX")
    write_tiff(folder / "s_labels.tif", (gt == 1).astype(np.uint16))  # what predict wrote: one of the two
    tifffile_gt = tmp_path / "s.tif"
    write_tiff(tifffile_gt, gt)
    for bad, message in (("2", "threshold must be in [0, 1), got 2.0"), ("nan", "threshold must be finite")):
        assert main(["evaluate", str(folder), "--gt", str(tifffile_gt), "--metrics", "cells", "--threshold", bad,
                     "--no-progress"]) == 1  # fmt: skip
        assert message in capsys.readouterr().err
    # without options the cell metrics score predict's labels; with them, the probabilities
    report = tmp_path / "r.json"
    assert main(["evaluate", str(folder), "--gt", str(tifffile_gt), "--metrics", "cells", "-o", str(report),
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads(report.read_text())["mean"]["n_pred"] == 1
    assert main(["evaluate", str(folder), "--gt", str(tifffile_gt), "--metrics", "cells", "--threshold", "0.8",
                 "-o", str(report), "--no-progress"]) == 0  # fmt: skip
    assert json.loads(report.read_text())["mean"]["n_pred"] == 0  # nothing above 0.8: the option was used
    assert main(["evaluate", str(folder), "--gt", str(tifffile_gt), "--metrics", "cells", "--threshold", "0.5",
                 "-o", str(report), "--no-progress"]) == 0  # fmt: skip
    assert json.loads(report.read_text())["mean"]["n_pred"] == 2
    with pytest.raises(ValueError, match="s_labels.tif: a label image; threshold applies to probability maps only"):
        evaluate_files([(folder / "s_labels.tif", tifffile_gt)], metrics="cells", threshold=0.3, progress=False)
    with pytest.raises(ValueError, match="min_size: the ISBI scores take the probabilities as they are"):
        evaluate_files([(folder / "s_probabilities.tif", tifffile_gt)], metrics="isbi", min_size=3, progress=False)
    with pytest.raises(ValueError, match="unknown|split must be"):
        evaluate_files([(folder / "s_labels.tif", tifffile_gt)], metrics="cells", split="bogus", progress=False)
