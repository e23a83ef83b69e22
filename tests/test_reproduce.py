"""The reproduction experiments: splits, scores and configs, and the ``--quick`` run end to end."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import common  # noqa: E402
import page as page_module  # noqa: E402
import peer_cellpose  # noqa: E402
import reproduce  # noqa: E402

from biounet.metrics import isbi_scores  # noqa: E402


# --------------------------------------------------------------------------------------------
# Touching pairs and merges, against naive loops
# --------------------------------------------------------------------------------------------
def naive_touching(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    height, width = labels.shape
    for y in range(height):
        for x in range(width):
            for dy, dx in ((0, 1), (1, 0)):
                if y + dy < height and x + dx < width:
                    a, b = int(labels[y, x]), int(labels[y + dy, x + dx])
                    if a and b and a != b:
                        pairs.add((min(a, b), max(a, b)))
    return pairs


def naive_owner(gt: np.ndarray, pred: np.ndarray, label: int) -> int:
    region = gt == label
    for p in np.unique(pred[region]):
        if p and np.count_nonzero(region & (pred == p)) * 2 > np.count_nonzero(region):
            return int(p)
    return 0


@settings(max_examples=30, deadline=None)
@given(arrays(np.int32, (7, 6), elements=st.integers(0, 4)), arrays(np.int32, (7, 6), elements=st.integers(0, 3)))
def test_touching_and_merged_pairs_match_naive_loops(gt, pred):
    pairs = common.touching_pairs(gt)
    assert {tuple(p) for p in pairs.tolist()} == naive_touching(gt)
    assert len(pairs) == len(naive_touching(gt))  # unique
    owner = common.majority_owner(gt, pred)
    for label in range(1, int(gt.max()) + 1):
        assert owner[label] == naive_owner(gt, pred, label)
    expected = sum(1 for a, b in naive_touching(gt) if naive_owner(gt, pred, a) == naive_owner(gt, pred, b) != 0)
    assert common.merged_touching_pairs(gt, pred) == (len(naive_touching(gt)), expected)


def test_merged_pairs_on_two_touching_squares():
    gt = np.zeros((8, 12), np.int32)
    gt[2:6, 2:6], gt[2:6, 6:10] = 1, 2  # touching along a column
    gt[7, 0] = 3  # alone
    one_blob = (gt > 0).astype(np.int32)
    assert common.merged_touching_pairs(gt, one_blob) == (1, 1)
    assert common.merged_touching_pairs(gt, gt) == (1, 0)
    half = np.where(gt == 1, 1, 0)  # the second square not predicted at all
    assert common.merged_touching_pairs(gt, half) == (1, 0)


def test_nuclei_scores_perfect_and_merged():
    gt = np.zeros((16, 16), np.int32)
    gt[2:6, 2:6], gt[9:14, 8:12] = 1, 2
    prob = np.stack([(gt == 0), (gt > 0)]).astype(np.float32)
    scores = common.nuclei_scores(gt, prob)
    assert scores == {"iou": 1.0, "seg": 1.0, "f1": 1.0, "ap": 1.0, "touching": 0, "merged": 0}
    touching = np.zeros((10, 10), np.int32)
    touching[2:8, 1:5], touching[2:8, 5:9] = 1, 2
    blob = np.stack([(touching == 0), (touching > 0)]).astype(np.float32)
    merged = common.nuclei_scores(touching, blob)
    # one predicted object of 48 px against two of 24 px: IoU 0.5 each, not > 0.5, so no match at 0.5;
    # the blob covers all of each (SEG's rule), so both count for SEG with J = 0.5 and the pair is merged
    assert (merged["iou"], merged["f1"], merged["ap"], merged["touching"], merged["merged"]) == (1.0, 0.0, 0.0, 1, 1)
    assert merged["seg"] == 0.5


def test_nuclei_scores_use_the_post_processing():
    yy, xx = np.mgrid[:24, :40]
    blob = ((yy - 12) ** 2 + (xx - 12) ** 2 < 81) | ((yy - 12) ** 2 + (xx - 27) ** 2 < 81)  # two overlapping disks
    gt = np.where(blob, np.where(xx < 20, 1, 2), 0).astype(np.int32)
    prob = np.stack([~blob, blob]).astype(np.float32)
    assert common.nuclei_scores(gt, prob)["merged"] == 1
    split = common.nuclei_scores(gt, prob, {"split": "distance"})
    assert (split["merged"], split["f1"]) == (0, 1.0)


# --------------------------------------------------------------------------------------------
# The Cellpose peer
# --------------------------------------------------------------------------------------------
needs_cellpose = pytest.mark.skipif(not peer_cellpose.PYTHON.is_file(),
                                    reason="the Cellpose peer's environment is absent (make peers)")  # fmt: skip


def test_label_scores_are_the_scores_of_the_labels_the_probabilities_give():
    yy, xx = np.mgrid[:24, :40]
    blob = ((yy - 12) ** 2 + (xx - 12) ** 2 < 81) | ((yy - 12) ** 2 + (xx - 27) ** 2 < 81)
    gt = np.where(blob, np.where(xx < 20, 1, 2), 0).astype(np.int32)
    halves = np.where(blob, np.where(xx < 19, 1, 2), 0).astype(np.int32)  # one column off the true cut
    scores = common.nuclei_label_scores(gt, halves)
    assert (scores["merged"], scores["f1"], scores["ap"], scores["touching"]) == (0, 1.0, 1.0, 1)
    assert 0.9 < scores["seg"] < 1.0
    prob = np.stack([~blob, blob]).astype(np.float32)
    assert common.nuclei_label_scores(gt, blob.astype(np.int32)) == common.nuclei_scores(gt, prob)


def test_cellpose_peer_without_its_environment_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setattr(peer_cellpose, "PYTHON", tmp_path / "absent" / "bin" / "python")
    with pytest.raises(RuntimeError, match="make peers"):
        peer_cellpose.train_and_segment([], [], tmp_path, steps=1, minutes=None, seed=0, threads=1)


@pytest.mark.slow
@needs_cellpose
def test_cellpose_peer_trains_from_scratch_and_segments(tmp_path):
    from biounet.data import make_sample, synthetic_cells

    samples = [make_sample(i, lab, name=f"s{k}") for k, (i, lab) in enumerate(synthetic_cells(3, (96, 96), seed=1))]
    masks, facts = peer_cellpose.train_and_segment(samples[:2], samples[2:], tmp_path, steps=2, minutes=None,
                                                   seed=0, threads=1)  # fmt: skip
    assert set(masks) == {"s2"} and masks["s2"].shape == (96, 96) and masks["s2"].dtype == np.int32
    assert (facts["epochs"], facts["steps"], facts["cellpose"]) == (2, 2, peer_cellpose.VERSION)
    assert facts["parameters"] > 6_000_000  # its default CPnet, not a stand-in
    assert (tmp_path / "models" / "peer").is_file()  # Cellpose's own weights file


def test_fields_added_later_are_left_out_of_the_key_at_their_default(tmp_path):
    base = reproduce.Job("nuclei", "unet", None, (), (), reproduce.experiment_config("nuclei", "unet", "fast", 2, []),
                         tmp_path)  # fmt: skip
    border = dataclasses.replace(base, variant="border-class",
                                 config=reproduce.experiment_config("nuclei", "border-class", "fast", 2, []))
    assert "target" not in reproduce._key(base, None)["config"]  # the records made before the field stay valid
    assert reproduce._key(border, None)["config"]["target"] == "border"


def test_cellpose_runs_on_nuclei_only(tmp_path):
    config = reproduce.experiment_config("em", "unet", "fast", 2, [])
    assert "cellpose" in common.NUCLEI_ONLY and "cellpose" in common.PEERS
    results = {"em": {}, "nuclei": {}, "meta": {"skipped": [], "time_limit": None}}
    text = "\n".join(page_module._what_ran(results))
    assert "`nuclei/cellpose`" in text and "`em/cellpose`" not in text and "`em/monai`" in text
    key = reproduce._key(reproduce.Job("nuclei", "cellpose", None, (), (), config, tmp_path), None)
    assert key["config"]["cellpose"] == peer_cellpose.RECIPE and set(key["config"]) == {
        *peer_cellpose.RECIPE_FIELDS, "cellpose", "version"}


def test_what_ran_names_the_machine_day_and_speed_of_each_model(tmp_path):
    config = dataclasses.asdict(reproduce.experiment_config("em", "unet", "fast", 2, []))

    def record(fold: int, hardware: str | None, steps: int = 120, day: str = "2026-12-02") -> dict:
        made = {"trained": {"hardware": hardware, "date": f"{day} 16:08 UTC"}} if hardware else {}
        return {"key": {"fold": fold, "config": config, "train": [], "test": []}, "train_seconds": 60.0,
                "parameters": 10, "steps_run": steps, **made}  # fmt: skip

    results = {"em": {"unet": [record(0, "Intel Xeon"), record(1, "AMD EPYC", 180, "2026-12-03")],
                      "monai": [record(0, None)]},
               "nuclei": {}, "meta": {"skipped": [], "time_limit": None}}  # fmt: skip
    rows = [line for line in "\n".join(page_module._what_ran(results)).splitlines() if line.startswith("| ISBI")]
    # steps/s: the mean of 120/60 and 180/60; one entry per machine and per day
    assert rows[0].endswith("| 2.50 | Intel Xeon; AMD EPYC | 2026-12-02, 2026-12-03 |")
    assert rows[1].endswith("| 2.00 | not recorded | not recorded |")


def test_equal_minutes_banner_says_the_same_machine_only_when_it_was():
    def record(hardware: str, date: str) -> dict:
        return {"trained": {"hardware": hardware, "date": date}}

    meta = {"quick": False, "device": "cpu", "minutes": 10, "command": "x", "date": "d", "train_seconds": 60.0,
            "score_seconds": 6.0, "trained_now": 0, "wall_seconds": 1.0, "reused": 2, "configs": {},
            "hardware": {"cpu": "Now CPU", "load": "0", "device": "cpu", "python": "3", "torch": "2"}}  # fmt: skip
    same = {"em": {"unet": [record("A (AVX2)", "2026-12-03 10:00 UTC")], "monai": [record("A (AVX2)",
            "2026-12-03 11:00 UTC")]}, "nuclei": {}, "meta": meta}  # fmt: skip
    mixed = {"em": {"unet": [record("A (AVX2)", "2026-12-03 10:00 UTC")], "monai": [record("A", "2026-12-02 11:00 UTC")]},
             "nuclei": {}, "meta": meta}  # fmt: skip
    unknown = {"em": {"unet": [{}], "monai": [{}]}, "nuclei": {}, "meta": meta}  # records made before "trained"
    banner = [next(line for line in page_module._header(r) if line.startswith("> **CPU run"))
              for r in (same, mixed, unknown)]  # fmt: skip
    assert "trained for 10 minutes on the same A (AVX2) (" in banner[0]
    assert "on 2 machine(s) over 2 day(s)" in banner[1] and "the same" not in banner[1] and "Now CPU" not in banner[1]
    assert "on 1 machine(s) over 1 day(s)" in banner[2] and "the same" not in banner[2]


def test_hardware_names_the_cpus_vector_instructions(monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert common.cpu_vectors() == "AVX512, native bfloat16"
    assert "(AVX512, native bfloat16), " in common.hardware("cpu")["cpu"]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert common.cpu_vectors() == "AVX2" and "(AVX2), " in common.hardware("cpu")["cpu"]


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def test_contiguous_folds():
    names = [f"{i:02d}" for i in range(25)]
    folds = common.contiguous_folds(names, 5)
    assert folds[0] == ["00", "01", "02", "03", "04"] and folds[4] == ["20", "21", "22", "23", "24"]
    assert sorted(sum(folds, [])) == names
    with pytest.raises(ValueError, match="n_folds=5"):
        common.contiguous_folds(names[:24], 5)


def test_stratified_split_counts_disjoint_and_seeded():
    categories = {f"f{i:02d}": "fluo" for i in range(11)} | {f"h{i}": "he" for i in range(5)} | {"b0": "bf", "b1": "bf"}
    train, val = common.stratified_split(categories, 0.2, seed=0)
    assert not set(train) & set(val) and sorted(train + val) == sorted(categories)
    per_category = {c: sum(categories[i] == c for i in val) for c in ("fluo", "he", "bf")}
    assert per_category == {"fluo": 3, "he": 1, "bf": 1}  # ceil(0.2 n)
    assert common.stratified_split(categories, 0.2, seed=0) == (train, val)
    assert common.stratified_split(categories, 0.2, seed=1) != (train, val)
    with pytest.raises(ValueError, match="'bf' has 2"):
        common.stratified_split(categories, 0.6, seed=0)


# --------------------------------------------------------------------------------------------
# Scores and tables
# --------------------------------------------------------------------------------------------
def _membranes(seed: int) -> np.ndarray:
    cells = np.ones((40, 40), np.uint8)
    cells[:, 10 + seed], cells[20 + seed, :] = 0, 0
    return cells


def test_em_scores_one_threshold_per_fold():
    truth = [_membranes(0), _membranes(3)]
    perfect = common.em_scores([t.astype(np.float32) for t in truth], truth)
    assert perfect == {"v_rand": 1.0, "v_info": 1.0, "rand_error": 0.0, "pixel_error": 0.0, "warping_error": 0.0}
    rng = np.random.default_rng(0)
    noisy = [np.clip(t * 0.6 + rng.random(t.shape) * 0.5, 0, 1) for t in truth]
    alone = isbi_scores(noisy[0], truth[0]).summary()
    one = common.em_scores(noisy[:1], truth[:1])
    assert one["v_rand"] == alone["v_rand"] and one["warping_error"] == alone["warping_error"]
    assert one["pixel_error"] == pytest.approx(alone["pixel_error"])
    both = common.em_scores(noisy, truth)
    per_slice = [isbi_scores(p, t) for p, t in zip(noisy, truth)]
    assert both["v_rand"] == pytest.approx(max((per_slice[0].v_rand + per_slice[1].v_rand) / 2))
    assert both["v_rand"] <= np.mean([s.summary()["v_rand"] for s in per_slice]) + 1e-12


def test_mean_spread_and_table():
    assert common.mean_spread([1.0, 3.0], ".2f") == "2.00 ± 1.41"
    assert common.mean_spread([0.5], ".3f") == "0.500"
    assert common.mean_spread([], ".3f") == "–"
    assert common.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n| --- | --- |\n| 1 | x |"


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(reproduce.ABLATIONS))
@pytest.mark.parametrize("dataset", reproduce.DATASETS)
def test_each_ablation_changes_exactly_one_field(dataset, variant):
    base = dataclasses.asdict(reproduce.experiment_config(dataset, "unet", "fast", 50, []))
    ablated = dataclasses.asdict(reproduce.experiment_config(dataset, variant, "fast", 50, []))
    changed = {k for k in base if base[k] != ablated[k]}
    assert changed == {"no-elastic": {"elastic_std"}, "no-border": {"w0"}, "same-padding": {"padding"},
                       "float32": {"precision", "channels_last"},
                       "previous-recipe": {"depth", "tile", "batch_size"}, "border-class": {"target", "split"},
                       "wide": {"base_channels"}, "precise-bn": {"precise_bn"}, "seed-1": {"seed"}, "seed-2": {"seed"},
                       "pick-objects": {"pick"}, "balance-none": {"class_balance"},
                       # the EM recipe takes images as they are and balances per image already (both run on the nuclei only)
                       "as-is-background": {"background"} if dataset == "nuclei" else set(),
                       "balance-image": {"class_balance"} if dataset == "nuclei" else set()}[variant]
    assert base["steps"] == 50 and base["base_channels"] == 16


def test_recipe_line_names_the_fields_away_from_their_defaults():
    nuclei = page_module.config_summary(dataclasses.asdict(reproduce.experiment_config("nuclei", "unet", "fast", 5, [])))
    em = page_module.config_summary(dataclasses.asdict(reproduce.experiment_config("em", "unet", "fast", 5, [])))
    assert nuclei.endswith('background "dark" (bright-background images inverted), best by ap with margin 0.05, '
                           "class weights balanced over all training images, "
                           "threshold and seed height tuned on the validation images")  # fmt: skip
    assert em.endswith("objects under 0 px removed, best by v_rand with margin 0.01")
    border = dataclasses.asdict(reproduce.experiment_config("nuclei", "border-class", "fast", 5, []))
    assert 'target "border"' in page_module.config_summary(border)


def test_config_layers_preset_then_dataset_then_overrides():
    paper = reproduce.experiment_config("em", "unet", "paper", None, ["precision=\"bfloat16\""])
    got = (paper.base_channels, paper.steps, paper.precision, paper.w0, paper.elastic_grid)
    assert got == (64, 10_000, "bfloat16", 10.0, 3)


def test_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data", str(tmp_path), "--variants", "unet,bogus"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data", str(tmp_path), "--folds", "0,7"])
    args = reproduce.parse_args(["--data", str(tmp_path), "--quick", "--variants", "monai,unet"])
    assert (args.folds, args.steps, args.variants) == ([0, 1], 2, ["unet", "monai"])
    assert args.results == args.out / "results.md" and args.sets[:2] == ["tile=124", "batch_size=2"]


def test_time_limit_skips_whole_experiments(monkeypatch, tmp_path):
    clock = [0.0]
    minutes = {"em": 10.0, "nuclei": 12.0}

    def fake_run_job(job, *, device, crop, progress, store):
        clock[0] += 60 * minutes[job.dataset]
        return {"fold": job.fold}, False

    monkeypatch.setattr(reproduce, "run_job", fake_run_job)
    monkeypatch.setattr(reproduce.time, "perf_counter", lambda: clock[0])
    config = reproduce.experiment_config("em", "unet", "fast", 2, [])
    jobs = [reproduce.Job(d, v, k, (), (), config, tmp_path)
            for d, v, folds in (("em", "unet", (0, 1)), ("em", "monai", (0, 1)), ("nuclei", "unet", (None,)))
            for k in folds]  # fmt: skip
    args = reproduce.parse_args(["--data", str(tmp_path), "--time-limit", "45"])
    results, book = reproduce.run_jobs(jobs, args, None)
    # after em/unet (20 min, longest job 10): em/monai needs 2 x 10 -> 40 <= 45, runs;
    # then nuclei/unet would need 1 x 10 more -> 50 > 45: skipped whole
    assert book["skipped"] == ["nuclei/unet"] and book["trained_now"] == 4
    assert {v: [r["fold"] for r in recs] for v, recs in results["em"].items()} == {"unet": [0, 1], "monai": [0, 1]}
    assert results["nuclei"] == {}


def test_time_limit_estimates_from_reused_records(tmp_path):
    config = reproduce.experiment_config("em", "unet", "fast", 2, [])
    jobs = [reproduce.Job("em", v, k, (), (), config, tmp_path / v / str(k)) for v in ("unet", "monai") for k in (0, 1)]
    for job in jobs[:2]:  # em/unet was made earlier and took 10 minutes per fold
        job.run_dir.mkdir(parents=True)
        record = {"key": reproduce._key(job, None), "train_seconds": 540.0, "score_seconds": 60.0, "fold": job.fold}
        (job.run_dir / "record.json").write_text(json.dumps(record))
    args = reproduce.parse_args(["--data", str(tmp_path), "--time-limit", "15"])
    results, book = reproduce.run_jobs(jobs, args, None)
    # nothing trained now, but em/monai's 2 jobs at 10 min each would pass 15 min: skipped
    assert book["skipped"] == ["em/monai/fold0", "em/monai/fold1"]
    assert (book["trained_now"], book["reused"]) == (0, 2)
    assert [r["fold"] for r in results["em"]["unet"]] == [0, 1]


def _tiny_job(tmp_path: Path, steps: int) -> reproduce.Job:
    from biounet.data import make_sample, synthetic_cells

    samples = [make_sample(image, labels, name=f"s{i}")
               for i, (image, labels) in enumerate(synthetic_cells(3, (80, 80), seed=1))]  # fmt: skip
    config = reproduce.experiment_config("nuclei", "unet", "fast", steps, ["tile=124", "batch_size=1",
                                                                           "checkpoint_every=1"])  # fmt: skip
    return reproduce.Job("nuclei", "unet", None, tuple(samples[:2]), tuple(samples[2:]), config, tmp_path / "job")


def test_an_interrupted_job_resumes_and_a_changed_one_starts_afresh(tmp_path):
    job = _tiny_job(tmp_path, steps=2)
    first, reused = reproduce.run_job(job, device="cpu", crop=None, progress=False)
    assert not reused and "resumed" not in first and first["steps_run"] == 2
    (job.run_dir / "record.json").unlink()  # killed after training, before the record was written
    rows = (job.run_dir / "log.csv").read_text()
    again, reused = reproduce.run_job(job, device="cpu", crop=None, progress=False)
    assert not reused and again["resumed"] is True and again["steps_run"] == 2
    assert (job.run_dir / "log.csv").read_text() == rows  # resumed at its end: nothing trained twice
    assert again["plain"] == first["plain"]
    changed = dataclasses.replace(job, config=dataclasses.replace(job.config, steps=3))
    third, _ = reproduce.run_job(changed, device="cpu", crop=None, progress=False)
    assert "resumed" not in third and third["steps_run"] == 3
    assert json.loads((job.run_dir / "key.json").read_text()) == reproduce._key(changed, None)


def test_records_are_kept_in_the_store_and_reused_without_the_run_folder(tmp_path):
    job, store = _tiny_job(tmp_path, steps=1), tmp_path / "store"
    first, reused = reproduce.run_job(job, device="cpu", crop=None, progress=False, store=store)
    kept = store / "nuclei" / "unet.json"
    assert not reused and json.loads(kept.read_text()) == json.loads((job.run_dir / "record.json").read_text())
    shutil.rmtree(job.run_dir)  # a fresh clone: the run folder and its models are gone, the store is committed
    again, reused = reproduce.run_job(job, device="cpu", crop=None, progress=False, store=store)
    assert reused and again == json.loads(kept.read_text()) and not job.run_dir.exists()
    assert reproduce.cached_record(job, None) is None  # without the store: nothing to reuse
    changed = dataclasses.replace(job, config=dataclasses.replace(job.config, seed=5))
    assert reproduce.cached_record(changed, None, store) is None  # another recipe is not this record
    # the page's figure and the shipped model need the model: the figure drawn earlier is kept, nothing ships
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "results_nuclei.png").write_bytes(b"earlier")
    figures = reproduce.write_figures({"nuclei": {"unet": again}}, {job.name: job}, tmp_path / "images", "cpu")
    assert figures == {"nuclei": tmp_path / "images" / "results_nuclei.png"}
    assert (tmp_path / "images" / "results_nuclei.png").read_bytes() == b"earlier"
    results = {"em": {}, "nuclei": {"unet": again}, "final": {}, "meta": {}}
    assert reproduce.ship_models(results, {job.name: job}, tmp_path / "models") == []
    assert not (tmp_path / "models").exists()


def test_the_store_follows_the_run_folder_and_quick_runs_keep_none(tmp_path):
    args = reproduce.parse_args(["--data", str(tmp_path)])
    assert args.records == reproduce.RECORDS / "reproduce" == reproduce.ROOT / "experiments/records/reproduce"
    assert reproduce.parse_args(["--data", str(tmp_path), "--out", "runs/r15"]).records == reproduce.RECORDS / "r15"
    assert reproduce.parse_args(["--data", str(tmp_path), "--quick"]).records is None
    assert reproduce.parse_args(["--data", str(tmp_path), "--records", "none"]).records is None
    assert reproduce.parse_args(["--data", str(tmp_path), "--records", str(tmp_path)]).records == tmp_path


def test_ship_minutes_needs_ship(tmp_path):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data", str(tmp_path), "--ship-minutes", "60"])
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data", str(tmp_path), "--ship", str(tmp_path), "--ship-minutes", "0"])
    args = reproduce.parse_args(["--data", str(tmp_path), "--ship", str(tmp_path), "--ship-minutes", "60"])
    assert args.ship_minutes == 60.0


@pytest.mark.data
def test_final_jobs_train_on_every_labelled_image(data_dir):
    make_config = functools.partial(reproduce.experiment_config, preset="fast", steps=None, sets=[])
    em, nuclei = reproduce.final_jobs(data_dir, reproduce.DATASETS, make_config, Path("out"), 60.0,
                                      fraction=0.2, seed=0)  # fmt: skip
    assert (em.name, nuclei.name) == ("em/final", "nuclei/final")
    assert [s.name for s in em.train] == [f"{i:02d}" for i in range(25)] and em.val == ()
    assert [s.name for s in em.test] == common.contiguous_folds([s.name for s in em.train], reproduce.N_FOLDS)[0]
    categories = common.read_manifest(data_dir / common.NUCLEI_DIR / "manifest.csv")
    assert [s.name for s in nuclei.train] == sorted(categories) and len(nuclei.train) == 120
    assert [s.name for s in nuclei.test] == common.stratified_split(categories, 0.2, seed=0)[1]
    assert {s.name for s in nuclei.test} <= {s.name for s in nuclei.train}  # a regression check, said so
    assert em.config.minutes == nuclei.config.minutes == 60.0 and em.final and nuclei.final
    assert em.config == dataclasses.replace(make_config("em", "unet"), minutes=60.0)
    # nothing held out to tune on: the shipped model takes the split's tuned options (ship_postprocess)
    assert make_config("nuclei", "unet").tune_postprocess and not nuclei.config.tune_postprocess
    assert nuclei.config == dataclasses.replace(make_config("nuclei", "unet"), minutes=60.0, tune_postprocess=False)


def test_final_records_are_kept_apart_from_the_experiments(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "run_job", lambda job, **_: ({"name": job.name}, False))
    config = reproduce.experiment_config("em", "unet", "fast", 2, [])
    jobs = [reproduce.Job("em", "unet", 0, (), (), config, tmp_path),
            reproduce.Job("em", "unet", None, (), (), config, tmp_path, final=True)]  # fmt: skip
    results, _ = reproduce.run_jobs(jobs, reproduce.parse_args(["--data", str(tmp_path)]), None)
    assert results["em"] == {"unet": [{"name": "em/unet/fold0"}]} and results["final"] == {"em": {"name": "em/final"}}


# --------------------------------------------------------------------------------------------
# The quick run, end to end on the real data
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.data
def test_quick_run_writes_results_page_and_figures(tmp_path, data_dir):
    pytest.importorskip("monai", reason="the MONAI peer needs monai (pip install 'biounet[bench]')")
    page, figures = tmp_path / "results.md", tmp_path / "images"
    command = [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--quick", "--out", str(tmp_path / "run"),
               "--results", str(page), "--figures", str(figures), "--threads", "2", "--select", "0.2",
               "--ship", str(tmp_path / "models"), "--ship-minutes", "0.03",
               "--records", str(tmp_path / "store")]  # fmt: skip
    if not peer_cellpose.PYTHON.is_file():  # its environment is made by `make peers` (CI does)
        command += ["--variants", ",".join(v for v in reproduce.VARIANTS if v != "cellpose")]
    env = {**os.environ, "BIOUNET_DATA": str(data_dir)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    text = page.read_text()
    for heading in ("## How these numbers were made", "### What ran", "## ISBI 2012 EM: cross-validation",
                    "## Touching nuclei", "## Ablations", "## Same-budget peers: MONAI BasicUNet and Cellpose",
                    "## Model selection: best against last"):  # fmt: skip
        assert heading in text, heading
    assert "Smoke run (`--quick`)" in text and "python experiments/reproduce.py --quick" in text
    assert "| biounet U-Net + TTA |" in text and "| MONAI BasicUNet (peer) |" in text
    assert "paper (challenge test set, different split)" in text and "0.000353" in text
    assert "Cell Tracking Challenge" in text and "cannot be obtained here" in text
    for change in reproduce.ABLATIONS.values():
        assert f"| {change} |" in text
    assert str(data_dir) not in text  # no absolute data path on the page
    for name in ("results_em.png", "results_nuclei.png"):
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(images/{name})" in text
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["key"]["fold"] for r in results["em"]["unet"]] == [0, 1]
    variants = set(reproduce.VARIANTS) - ({"cellpose"} if not peer_cellpose.PYTHON.is_file() else set())
    assert set(results["nuclei"]) == variants and set(results["em"]) == variants - set(common.NUCLEI_ONLY)
    assert set(results["em"]["unet"][0]["plain"]) == set(common.EM_METRICS)
    assert len(results["nuclei"]["unet"]["plain"]) == 3  # one validation image per category
    # the page's rows are the recorded scores, not placeholders
    assert "| " + " | ".join(page_module.em_row("biounet U-Net", results["em"]["unet"], "plain")) + " |" in text
    assert "| " + " | ".join(page_module.nuclei_row("biounet U-Net", results["nuclei"]["unet"]["plain"])) + " |" in text
    assert "trained" in results["em"]["unet"][0] and "date" in results["em"]["unet"][0]["trained"]
    # --select: 4 of the 20 training slices validate the best model (by V_rand); the peer trains on the same 16
    em = results["em"]["unet"][0]
    assert len(em["key"]["val"]) == 4 and len(em["key"]["train"]) == 16 and set(em["best"]) == set(common.EM_METRICS)
    assert results["em"]["monai"][0]["key"]["train"] == em["key"]["train"] and results["em"]["monai"][0]["key"]["val"] == []
    assert em["best_step"] == 2 and results["nuclei"]["unet"]["best_step"] == 2
    # --ship-minutes: the shipped models trained on every image, their card says so and gives the estimate
    assert "## Shipped models" in text and set(results["final"]) == {"em", "nuclei"}
    for name, dataset in (("em-membranes", "em"), ("nuclei", "nuclei")):
        evaluation = json.loads((tmp_path / "models" / name / "config.json").read_text())["provenance"]["evaluation"]
        assert evaluation["trained_on_images"] is True and evaluation["scores"] is not None
        assert set(evaluation["images"]) <= set(results["final"][dataset]["key"]["train"])
        card = (tmp_path / "models" / name / "MODEL_CARD.md").read_text()
        assert "**not** an estimate" in card and "**Estimate.**" in card and "SMOKE-TEST MODEL" in card
    assert len(results["final"]["em"]["key"]["train"]) == 25 and len(results["final"]["nuclei"]["key"]["train"]) == 120
    # a fresh clone: the run folder is gone, the records and the shipped models are kept; nothing trains again
    shutil.rmtree(tmp_path / "run")
    weights = (tmp_path / "models" / "nuclei" / "weights.safetensors").read_bytes()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["meta"]["trained_now"] == 0 and again["nuclei"]["unet"]["plain"] == results["nuclei"]["unet"]["plain"]
    assert (tmp_path / "models" / "nuclei" / "weights.safetensors").read_bytes() == weights
    assert "| " + " | ".join(page_module.nuclei_row("biounet U-Net", results["nuclei"]["unet"]["plain"])) + " |" in (
        page.read_text())


def test_a_shipped_model_is_recarded_from_its_record_without_the_run_folder(tmp_path):
    job = dataclasses.replace(_tiny_job(tmp_path, steps=1), final=True)
    store, models = tmp_path / "store", tmp_path / "models"
    record, _ = reproduce.run_job(job, device="cpu", crop=None, progress=False, store=store)
    meta = {"command": "python experiments/reproduce.py --first", "crop": None, "preset": "fast", "split_seed": 0,
            "val_fraction": 0.2}  # fmt: skip
    results = {"em": {}, "nuclei": {}, "final": {"nuclei": record}, "meta": meta}
    assert reproduce.ship_models(results, {job.name: job}, models) == [models / "nuclei"]
    weights = (models / "nuclei" / "weights.safetensors").read_bytes()
    shutil.rmtree(job.run_dir)  # a fresh clone: the store and the shipped model are committed, the run is gone
    assert reproduce.shipped_from(models / "nuclei", "nuclei/final", record)
    assert not reproduce.shipped_from(models / "nuclei", "nuclei/unet", record)  # another experiment
    other = {**record, "train_seconds": record["train_seconds"] + 1.0}
    assert not reproduce.shipped_from(models / "nuclei", "nuclei/final", other)  # another run of it
    results["meta"] = {**meta, "command": "python experiments/reproduce.py --second"}
    assert reproduce.ship_models(results, {job.name: job}, models) == [models / "nuclei"]
    assert (models / "nuclei" / "weights.safetensors").read_bytes() == weights  # the same weights
    config = json.loads((models / "nuclei" / "config.json").read_text())
    assert config["provenance"]["training"]["command"].endswith("--second")
    assert "--second" in (models / "nuclei" / "MODEL_CARD.md").read_text()
    card = (models / "nuclei" / "MODEL_CARD.md").read_text()
    results["final"]["nuclei"] = other  # a record the shipped model was not made by: nothing is touched
    assert reproduce.ship_models(results, {job.name: job}, models) == []
    assert (models / "nuclei" / "MODEL_CARD.md").read_text() == card


def _tuned(job: reproduce.Job) -> dict:
    return {**job.config.postprocess, "threshold": 0.7, "min_seed_height": 1.5}


def _scores_with(model, job: reproduce.Job, postprocess: dict, tta: bool = False) -> list[dict]:
    """Per test image, computed here from the model, apart from run_job and ship_postprocess."""
    return [{"name": s.name, "category": "",
             **common.nuclei_scores(s.labels, reproduce.unet_predict(model, s.image, job.config, tta=tta, device="cpu"),
                                    postprocess)} for s in job.test]  # fmt: skip


def test_a_tuned_model_is_scored_with_its_options_and_again_with_the_recipes(monkeypatch, tmp_path):
    from biounet import load_model
    from biounet.training import _tune

    job = _tiny_job(tmp_path, steps=1)
    job = dataclasses.replace(job, train=job.train[:1], val=job.train[1:])
    assert job.config.tune_postprocess  # configs/nuclei.toml
    tuned = _tuned(job)
    monkeypatch.setattr(_tune, "tune_postprocess", lambda probabilities, labels, postprocess, grid=None:
                        _tune.TunedPostprocess(tuned, 0.5, 0.4, {"threshold": (0.7,)}))  # fmt: skip
    record, _ = reproduce.run_job(job, device="cpu", crop=None, progress=False)
    last = load_model(job.run_dir / "last")
    assert last.info.postprocess == tuned and record["postprocess"] == {"plain": tuned, "tta": tuned, "best": tuned}
    assert record["plain"] == _scores_with(last, job, tuned)
    assert record["fixed"] == _scores_with(last, job, job.config.postprocess)  # paired: the same model
    untuned = dataclasses.replace(job, config=dataclasses.replace(job.config, tune_postprocess=False),
                                  run_dir=tmp_path / "untuned")  # fmt: skip
    record, _ = reproduce.run_job(untuned, device="cpu", crop=None, progress=False)
    assert "fixed" not in record and record["postprocess"]["plain"] == job.config.postprocess


def test_a_final_nuclei_model_ships_with_the_splits_tuned_postprocess(monkeypatch, tmp_path):
    from biounet import load_model

    job = dataclasses.replace(_tiny_job(tmp_path, steps=1), final=True)
    store, models = tmp_path / "store", tmp_path / "models"
    record, _ = reproduce.run_job(job, device="cpu", crop=None, progress=False, store=store)
    tuned = _tuned(job)
    config = {**record["key"]["config"], "tune_postprocess": True}
    split = {**record, "key": {**record["key"], "config": config}, "postprocess": {"plain": tuned}}
    meta = {"command": "python experiments/reproduce.py", "crop": None, "preset": "fast", "split_seed": 0,
            "val_fraction": 0.2}  # fmt: skip
    results = {"em": {}, "nuclei": {"unet": split}, "final": {"nuclei": record}, "meta": meta}
    predictions = []
    predict = reproduce.unet_predict
    monkeypatch.setattr(reproduce, "unet_predict", lambda *a, **k: predictions.append(k["tta"]) or predict(*a, **k))
    assert reproduce.ship_models(results, {job.name: job}, models, store=store) == [models / "nuclei"]
    assert predictions == [False, True]  # one test image, plain and TTA
    shipped = load_model(models / "nuclei")
    assert shipped.info.postprocess == tuned
    monkeypatch.setattr(reproduce, "unet_predict", predict)
    plain, tta = _scores_with(shipped, job, tuned), _scores_with(shipped, job, tuned, tta=True)
    assert record["shipped"] == {"postprocess": tuned, "from": "nuclei/unet", "plain": plain, "tta": tta}
    evaluation = shipped.info.provenance["evaluation"]
    assert evaluation["scores"] == common.mean_nuclei_scores(plain)
    assert evaluation["scores_tta"] == common.mean_nuclei_scores(tta)
    assert evaluation["postprocess"]["options"] == tuned and evaluation["postprocess"]["tuned_by"] == "nuclei/unet"
    assert "tuned by `nuclei/unet`" in (models / "nuclei" / "MODEL_CARD.md").read_text()
    kept = json.loads(reproduce.stored_record_path(job, store).read_text())  # scored once, kept with the record
    assert kept["shipped"] == record["shipped"] and json.loads((job.run_dir / "record.json").read_text()) == kept
    monkeypatch.setattr(reproduce, "unet_predict", lambda *a, **k: pytest.fail("scored again"))
    assert reproduce.ship_models(results, {job.name: job}, models, store=store) == [models / "nuclei"]
    monkeypatch.setattr(reproduce, "unet_predict", predict)
    # a recipe without tuning: the model keeps its own options
    results["nuclei"]["unet"] = {**split, "key": {**record["key"], "config": {**config, "tune_postprocess": False}}}
    other = dataclasses.replace(job, run_dir=tmp_path / "other")
    plain_record, _ = reproduce.run_job(other, device="cpu", crop=None, progress=False)
    results["final"]["nuclei"] = plain_record
    assert reproduce.ship_models(results, {job.name: other}, models) == [models / "nuclei"]
    assert load_model(models / "nuclei").info.postprocess == job.config.postprocess and "shipped" not in plain_record


def _nuclei_image(ap: float, merged: int = 0) -> dict:
    return {"name": "x", "category": "c", "iou": ap, "seg": ap, "f1": ap, "ap": ap, "touching": 2, "merged": merged}


def test_the_fixed_post_processing_row_pairs_the_same_models():
    def run(seed: int, tuned: float, fixed: float) -> dict:
        return {"key": {"config": {"seed": seed}}, "plain": [_nuclei_image(tuned)],
                "fixed": [_nuclei_image(fixed, merged=1), _nuclei_image(fixed + 0.2)]}  # fmt: skip

    results = {"nuclei": {"unet": run(0, 0.6, 0.5), "seed-1": run(1, 0.7, 0.65)}}
    rows, lines = page_module._fixed_rows(results)
    assert rows == [[page_module.FIXED_POSTPROCESS, "0.600 ± 0.141", "0.600 ± 0.141", "0.600 ± 0.141",
                     "0.600 ± 0.141", "1 of 4"]]  # fmt: skip
    assert lines == [("- post-processing tuned / fixed, the same models, seeds 0, 1: AP @ 0.5 0.600 / 0.600 "
                      "(merged 0 / 1), 0.700 / 0.750 (merged 0 / 1) (means 0.650 / 0.675)")]  # fmt: skip
    del results["nuclei"]["unet"]["fixed"]  # an untuned baseline: no row
    assert page_module._fixed_rows(results) == ([], [])
