"""Training: loss against numpy, config handling, resume after SIGKILL, failures, DDP on CPU."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biounet.data import make_sample, split_samples, synthetic_cells
from biounet.errors import InputError, TrainingError
from biounet.model import ModelInfo, UNet, UNetConfig
from biounet.training import (
    TrainConfig,
    auto_tile,
    largest_tile_within,
    loss_weights,
    soft_dice_loss,
    train,
    train_steps,
    weighted_cross_entropy,
)

TINY = ["--set", "depth=2", "--set", "base_channels=4", "--set", "tile=76", "--set", "batch_size=2",
        "--set", "val_every=1000"]  # fmt: skip


def test_weighted_cross_entropy_equals_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 4))
    target = rng.integers(0, 3, size=(2, 5, 4))
    weight = rng.random((2, 5, 4)) * 3
    weight[0, 0, :] = 0  # unlabelled pixels
    # direct: log-softmax by hand, pick the true class, weight, mean over labelled pixels
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = np.take_along_axis(log_p, target[:, None], axis=1)[:, 0]
    expected = -(weight * picked).sum() / (weight > 0).sum()
    got = weighted_cross_entropy(torch.tensor(logits), torch.tensor(target), torch.tensor(weight))
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("balance", ["image", "dataset", "none"])
def test_loss_weights_take_the_class_frequencies_the_recipe_names(balance):
    # two images: 8 of 16 pixels cells (half), 2 of 16 (an eighth); together 10 of 32
    half, sparse = np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32)
    half[:2], sparse[0, :2] = 1, 1
    samples = [make_sample(np.zeros((4, 4), np.float32), lab, name=str(i)) for i, lab in enumerate((half, sparse))]
    weights = loss_weights(TrainConfig(w0=0.0, class_balance=balance), samples)
    # w_c = 1 / (2 f_c) for two classes, f_c from the image, from all 32 pixels, or w_c = 1
    cell, background = {"image": (16 / 4, 16 / 28), "dataset": (32 / 20, 32 / 44), "none": (1.0, 1.0)}[balance]
    np.testing.assert_allclose(weights(sparse), np.where(sparse > 0, cell, background), rtol=1e-6)
    if balance != "image":  # one rule for every image: the half-cell image weighs its classes alike
        np.testing.assert_allclose(weights(half), np.where(half > 0, cell, background), rtol=1e-6)
    pair = np.zeros((4, 4), np.int32)
    pair[0, 0], pair[0, 2] = 1, 2  # the background pixel between them is 1 px from each
    border = loss_weights(TrainConfig(w0=10.0, sigma=5.0, class_balance=balance), samples)(pair) - weights(pair)
    assert border[0, 1] == pytest.approx(10 * np.exp(-(1 + 1) ** 2 / (2 * 5**2)), rel=1e-6)  # eq. 2's border term


def test_loss_weights_refuse_an_unknown_balance():
    config = TrainConfig()
    object.__setattr__(config, "class_balance", "per-image")  # past the config's own check
    with pytest.raises(InputError, match="class_balance must be 'image', 'dataset' or 'none', got 'per-image'"):
        loss_weights(config, [])
    with pytest.raises(InputError, match="TrainConfig.class_balance must be 'image', 'dataset' or 'none'"):
        TrainConfig(class_balance="per-image")


def test_loss_shape_errors_and_dice_range():
    with pytest.raises(ValueError, match="target"):
        weighted_cross_entropy(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5, 4, dtype=torch.long), torch.ones(1, 5, 4))
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    perfect = torch.where(target.bool(), 20.0, -20.0)[:, None].repeat(1, 2, 1, 1)
    perfect[:, 0] *= -1
    assert soft_dice_loss(perfect, target, torch.ones(1, 4, 4, dtype=torch.bool)).item() == pytest.approx(0, abs=1e-6)


def test_config_presets_toml_and_overrides(tmp_path):
    paper = TrainConfig.preset("paper")
    assert (paper.base_channels, paper.depth, paper.padding, paper.optimizer, paper.momentum) == (64, 4, "valid", "sgd", 0.99)
    assert (paper.w0, paper.sigma, paper.elastic_std, paper.elastic_grid, paper.tile, paper.batch_size) == (10, 5, 10, 3, "auto", 1)
    (tmp_path / "c.toml").write_text('preset = "fast"\nlr = 0.005\nnorm = "batch"\n')
    cfg = TrainConfig.from_toml(tmp_path / "c.toml").updated(["steps=7", "augment=false", "normalization=[2, 98]"])
    assert (cfg.base_channels, cfg.lr, cfg.norm, cfg.steps, cfg.augment, cfg.normalization) == (16, 0.005, "batch", 7, False, (2.0, 98.0))
    with pytest.raises(ValueError, match="unknown training option"):
        cfg.updated(["learning_rate=1"])
    with pytest.raises(ValueError, match="optimizer"):
        cfg.updated(["optimizer=lbfgs"])
    (tmp_path / "bad.toml").write_text("lr = [")
    with pytest.raises(ValueError, match="bad.toml"):
        TrainConfig.from_toml(tmp_path / "bad.toml")


def _smallest_valid_input_covering(config: UNetConfig, side: int) -> int:
    return next(n for n in range(1, 4096) if config.is_valid_input_size(n) and config.output_size(n) >= side)


@pytest.mark.parametrize("side", [256, 512, 3000])
def test_auto_tile_on_cpu_covers_the_largest_image(side):
    samples = [make_sample(np.zeros((side, 100), np.float32), np.zeros((side, 100), np.int32), name="a"),
               make_sample(np.zeros((50, 60), np.float32), np.zeros((50, 60), np.int32), name="b")]  # fmt: skip
    expected = min(_smallest_valid_input_covering(UNetConfig(), side), 1084)  # AUTO_TILE_MAX, a valid size
    assert auto_tile(TrainConfig.preset("paper"), samples, "cpu") == expected
    assert auto_tile(TrainConfig.preset("paper"), samples[1:], "cpu") == 252  # 68 px out covers 60


def test_largest_tile_within_a_memory_budget():
    cfg = UNetConfig()
    assert largest_tile_within(cfg, 700, 572, 1000.0, 1000.0 * (700 / 572) ** 2) == 700
    assert largest_tile_within(cfg, 700, 572, 1000.0, 1000.0 * (700 / 572) ** 2 - 1) == 684
    assert largest_tile_within(cfg, 700, 572, 1000.0, 1000.0) == 572
    assert largest_tile_within(cfg, 700, 572, 1000.0, 1e12) == 700
    assert largest_tile_within(cfg, 700, 572, 1000.0, 0.0) == 188  # never below the smallest valid size


def test_auto_tile_is_resolved_and_recorded(tmp_path):
    pairs = synthetic_cells(2, (40, 40), seed=1)
    samples = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(pairs)]
    cfg = TrainConfig.preset("fast", depth=2, base_channels=4, tile="auto", steps=2, val_every=1000)
    model = train(samples, tmp_path / "run", cfg, progress=False)
    expected = _smallest_valid_input_covering(model.config, 40)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["tile"] == expected
    assert model.info.provenance["recipe"]["tile"] == expected
    with pytest.raises(ValueError, match="training option tile must be an integer or one of 'auto', got 'big'"):
        TrainConfig.preset("fast", tile="big")
    with pytest.raises(ValueError, match="tile must be a positive integer"):
        TrainConfig.preset("fast", tile=0)
    assert model.info.postprocess == {"split": "distance", "min_size": 0}  # the fast preset's


def test_min_size_is_stored_as_post_processing_and_validated():
    cfg = TrainConfig.preset("fast").updated(["min_size=12"])
    assert cfg.postprocess == {"split": "distance", "min_size": 12}
    with pytest.raises(ValueError, match="min_size must be an integer >= 0"):
        TrainConfig.preset("fast", min_size=-1)
    with pytest.raises(ValueError, match="split must be one of 'none', 'distance', 'probability', 'border', got 'watershed'"):
        TrainConfig.preset("fast").updated(["split=watershed"])


def test_auto_tile_and_validation_leave_the_run_as_it_would_be(tmp_path):
    """Resolving tile="auto" draws no random numbers, and validation leaves the weights' memory layout alone."""
    pairs = synthetic_cells(3, (40, 40), seed=2)
    samples = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(pairs)]
    base = dict(depth=2, base_channels=4, steps=3, val_every=1, deterministic=True)
    auto = train(samples[:2], tmp_path / "a", TrainConfig.preset("fast", tile="auto", **base),
                 val_samples=samples[2:], progress=False)  # fmt: skip
    tile = json.loads((tmp_path / "a" / "train_config.json").read_text())["tile"]
    fixed = train(samples[:2], tmp_path / "b", TrainConfig.preset("fast", tile=tile, **base),
                  val_samples=samples[2:], progress=False)  # fmt: skip
    for (name, a), b in zip(auto.state_dict().items(), fixed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(p.is_contiguous() for p in auto.parameters())  # predict() made them channels-last meanwhile


def test_split_samples_is_deterministic_and_disjoint():
    items = [type("S", (), {"name": str(i)})() for i in range(10)]
    train_a, val_a = split_samples(items, 0.2, seed=3)
    train_b, val_b = split_samples(items, 0.2, seed=3)
    assert [s.name for s in val_a] == [s.name for s in val_b] and len(val_a) == 2
    assert not {s.name for s in train_a} & {s.name for s in val_a}
    with pytest.raises(ValueError, match="fraction"):
        split_samples(items, 1.5)


def _write_synthetic(folder: Path, n: int = 4, shape=(64, 64)) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i, (image, labels) in enumerate(synthetic_cells(n, shape, seed=5)):
        tifffile.imwrite(folder / "images" / f"s{i}.tif", image)
        tifffile.imwrite(folder / "labels" / f"s{i}.tif", labels)
    return folder


def _biounet(*args: str) -> list[str]:
    return [sys.executable, "-m", "biounet", "-q", *args]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "weights.safetensors"))


def _event_scalars(path: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of a TensorBoard event file, read by its TFRecord framing (checksums: test_logs)."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        event = Event.FromString(data[at + 12 : at + 12 + length])
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        at += 16 + length
    return out


def test_train_writes_a_complete_run_folder(tmp_path):
    data = _write_synthetic(tmp_path / "data")
    run = tmp_path / "run"
    cmd = _biounet("train", str(data), "-o", str(run), "--preset", "fast", "--steps", "6", *TINY,
                   "--set", "val_every=3", "--val-fraction", "0.25", "--no-progress")  # fmt: skip
    subprocess.run(cmd, check=True, timeout=300)
    for name in ["train_config.json", "log.csv", "checkpoint.pt", "curves.png", "last/config.json", "best/weights.safetensors"]:
        assert (run / name).is_file(), name
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,lr") and len(rows) == 7
    assert rows[3].split(",")[6] != ""  # validation IoU at step 3
    (events,) = run.glob("events.out.tfevents.*")
    scalars = _event_scalars(events)
    loss = [(step, value) for step, tag, value in scalars if tag == "loss"]
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in loss] == pytest.approx([float(r.split(",")[1]) for r in rows[1:]], rel=1e-5)
    assert [step for step, tag, _ in scalars if tag == "val_iou"] == [3, 6]
    subprocess.run(_biounet("predict", str(run / "best"), str(data / "images" / "s0.tif"), "-o", str(tmp_path / "p"),
                            "--no-progress"), check=True, timeout=120)  # fmt: skip
    assert (tmp_path / "p" / "s0_labels.tif").is_file()


def test_sigkill_then_resume_gives_the_same_weights(tmp_path):
    data = _write_synthetic(tmp_path / "data")
    common = ["--preset", "fast", "--steps", "24", *TINY, "--set", "checkpoint_every=4", "--set", "deterministic=true",
              "--seed", "7", "--no-progress"]  # fmt: skip
    subprocess.run(_biounet("train", str(data), "-o", str(tmp_path / "whole"), *common), check=True, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_biounet("train", str(data), "-o", str(run), *common))
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once a checkpoint beyond the first exists, mid-run
        if (run / "log.csv").is_file() and len((run / "log.csv").read_text().splitlines()) > 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len((run / "log.csv").read_text().splitlines()) - 1
    assert killed_at < 24, "the run finished before it could be killed"
    subprocess.run(_biounet("train", str(data), "-o", str(run), "--resume", "--no-progress"), check=True, timeout=300)
    whole, resumed = _weights(tmp_path / "whole"), _weights(run)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    steps = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 25))  # every step logged exactly once


def test_existing_run_without_resume_is_refused(tmp_path):
    data = _write_synthetic(tmp_path / "data", n=2)
    args = ("train", str(data), "-o", str(tmp_path / "r"), "--preset", "fast", "--steps", "2", *TINY, "--no-progress")
    subprocess.run(_biounet(*args), check=True, timeout=300)
    out = subprocess.run(_biounet(*args), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "--resume" in out.stderr and "Traceback" not in out.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from biounet.training import _loop as train_module

    calls = {"n": 0}

    def loss_that_breaks_at_step_7(*args):
        calls["n"] += 1
        loss = weighted_cross_entropy(*args)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(train_module, "weighted_cross_entropy", loss_that_breaks_at_step_7)
    pairs = synthetic_cells(2, (64, 64), seed=1)
    samples = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(pairs)]
    cfg = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, steps=20, checkpoint_every=3, val_every=1000)
    with pytest.raises(TrainingError, match=r"loss became nan at step 7.*last good checkpoint \(step 6\)"):
        for _ in train_steps(samples, tmp_path / "run", cfg):
            pass
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_diverging_weights_are_never_checkpointed(tmp_path):
    pairs = synthetic_cells(2, (64, 64), seed=1)
    samples = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(pairs)]
    cfg = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, steps=20, checkpoint_every=1, lr=1e38,
                             optimizer="sgd", warmup=1, val_every=1000)  # fmt: skip
    with pytest.raises(TrainingError, match="non-finite|loss became"):
        for _ in train_steps(samples, tmp_path / "run", cfg):
            pass
    if (tmp_path / "run" / "checkpoint.pt").exists():
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize(
    "setup,match",
    [("empty", "empty data set"), ("mismatch", "does not match"), ("unwritable", "cannot be written")],
)
def test_bad_data_fails_before_the_first_step(tmp_path, setup, match):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    run = tmp_path / "run"
    if setup != "empty":
        tifffile.imwrite(data / "images" / "a.tif", np.zeros((32, 32), np.uint8))
        tifffile.imwrite(data / "labels" / "a.tif", np.zeros((32, 30 if setup == "mismatch" else 32), np.uint16))
    if setup == "unwritable":
        run.write_text("a file where the run folder should be")
    out = subprocess.run(_biounet("train", str(data), "-o", str(run), "--steps", "1", "--no-progress"),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1 and match in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    data = _write_synthetic(tmp_path / "data")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "biounet", "-q", "train", str(data),
           "-o", str(run), "--preset", "fast", "--steps", "6", *TINY, "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=300, env=env)
    report = json.loads((run / "ddp.json").read_text())
    assert report["world_size"] == 2 and report["replicas_identical"]
    assert report["checksums"][0] == report["checksums"][1]
    for name in ["log.csv", "checkpoint.pt", "curves.png", "last/weights.safetensors", "best/config.json"]:
        assert (run / name).is_file(), name
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # each rank's own random streams, for --resume
    assert len(state["generators"]) == 2 and not torch.equal(*state["generators"])


def test_each_torchrun_process_takes_its_own_gpu(monkeypatch):
    from biounet.training import rank_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda:0")) == torch.device("cuda", 0)  # an explicit index is kept
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_device(torch.device("cuda")) == torch.device("cuda")


def test_resume_gives_each_rank_its_own_random_streams():
    from biounet.training._checkpoint import restore_rng_states

    streams = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    for g in streams:
        torch.rand(3, generator=g)
    state = {"generators": [g.get_state() for g in streams], "torch_rngs": [torch.get_rng_state()] * 2}
    for rank in (0, 1):
        generator = torch.Generator().manual_seed(99)
        restore_rng_states(state, generator, rank, world=2)
        assert torch.equal(generator.get_state(), streams[rank].get_state())
    generator = torch.Generator().manual_seed(99)
    restore_rng_states(state, generator, 0, world=3)  # another world size: the seed's fresh stream stays
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(99).get_state())


# ------------------------------------------------------------------------------------------
# CPU speed and selection (issue 11): precision, time budgets, best model by the task's score
# ------------------------------------------------------------------------------------------
def test_auto_precision_is_bfloat16_only_where_native(monkeypatch, caplog):
    from biounet import device as training

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert training.resolve_precision("cpu") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    with caplog.at_level("INFO", logger="biounet.device"):
        assert training.resolve_precision("cpu") == "float32"
    assert "no native bfloat16, computing in float32" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="biounet.device"):  # prediction's fallback is a DEBUG line
        assert training.resolve_precision("cpu", level=logging.DEBUG) == "float32"
    assert caplog.text == ""
    assert training.resolve_precision("meta") == "float32"


def test_new_config_fields_are_validated():
    fast = TrainConfig.preset("fast")
    assert (fast.precision, fast.channels_last, fast.minutes, fast.best_by, fast.color) == ("auto", True, None, "ap", "keep")
    for assignment, match in [("minutes=0", "minutes must be a positive"), ("minutes=inf", "minutes must be"),
                              ('minutes="ten"', "minutes must be"), ('best_by="loss"', "best_by must be"),
                              ('color="rgb"', "color must be"), ('precision="half"', "precision must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            fast.updated([assignment])


def test_plan_steps_formula():
    from biounet.training import plan_steps

    # 600 s budget, 10 s gone, 30 steps done, 0.1 s a step, 2 s a validation every 100 steps:
    # (600 - 10 - 2) / (0.1 + 0.02) = 4900 more steps
    assert plan_steps(600, 10, 30, 0.1, 2.0, 100) == 30 + 4900
    assert plan_steps(600, 10, 30, 0.1, 0.0, 100) == 30 + 5900
    assert plan_steps(5, 10, 30, 0.1, 0.0, 100) == 30  # the budget is spent already: stop where it is
    with pytest.raises(ValueError, match="budget > 0"):
        plan_steps(0, 0, 0, 0.1, 0, 1)


def _tiny_samples(n: int = 3, shape=(48, 48)):
    return [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(synthetic_cells(n, shape, seed=4))]


def test_time_budget_fixes_and_records_the_steps_and_resume_keeps_them(tmp_path, monkeypatch):
    from biounet.training import _loop as training

    def fake_clock(tick: float):  # every reading of the clock is `tick` s later: an exact, fake machine
        ticks = itertools.count(0.0, tick)
        monkeypatch.setattr(training.time, "perf_counter", lambda: next(ticks))

    samples = _tiny_samples()
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, minutes=5.0,
                                checkpoint_every=10, val_every=1000, deterministic=True)  # fmt: skip
    fake_clock(0.5)
    statuses = list(train_steps(samples, tmp_path / "whole", config))
    saved = json.loads((tmp_path / "whole" / "train_config.json").read_text())
    planned = statuses[-1].steps
    assert saved["steps"] == planned == statuses[-1].step == len(statuses) and saved["minutes"] == 5.0
    assert training.BUDGET_PROBE_STEPS + 10 < planned < 1000
    assert all(s.steps == planned for s in statuses[training.BUDGET_PROBE_STEPS - 1 :])
    # the cosine schedule runs over the planned steps: it ends at 0, and had not decayed during the probe
    from biounet.training import lr_factor

    assert statuses[-1].lr == pytest.approx(0.0, abs=1e-12)
    expected = config.lr * lr_factor(planned // 2, dataclasses.replace(config, steps=planned))
    assert statuses[planned // 2 - 1].lr == pytest.approx(expected, rel=1e-6)
    assert statuses[training.BUDGET_PROBE_STEPS - 2].lr == pytest.approx(config.lr, rel=1e-3)
    # the same run stopped after a checkpoint past the probe, resumed on a machine 50x faster,
    # keeps its planned steps and ends with the same weights
    fake_clock(0.5)
    for status in train_steps(samples, tmp_path / "cut", config):
        if status.step == training.BUDGET_PROBE_STEPS + 10:
            break
    fake_clock(0.01)
    resumed = list(train_steps(samples, tmp_path / "cut", config, resume=True))
    assert resumed[0].step == training.BUDGET_PROBE_STEPS + 11 and resumed[-1].step == planned
    for (name, a), b in zip(_weights(tmp_path / "whole").items(), _weights(tmp_path / "cut").values(), strict=True):
        assert torch.equal(a, b), name


def test_best_model_is_chosen_by_the_configured_score(tmp_path):
    from biounet.model import load_model
    from biounet.training import CsvLog

    samples = _tiny_samples(4)
    for best_by in ("v_rand", "iou"):
        config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=6, val_every=2,
                                    best_by=best_by, deterministic=True)  # fmt: skip
        train(samples[:3], tmp_path / best_by, config, val_samples=samples[3:], progress=False)
        rows = [r for r in CsvLog.read(tmp_path / best_by / "log.csv") if r.get(f"val_{best_by}") not in (None, "")]
        assert [int(r["step"]) for r in rows] == [2, 4, 6]
        scores = [float(r[f"val_{best_by}"]) for r in rows]
        best = load_model(tmp_path / best_by / "best").info.provenance["best"]
        assert best["by"] == best_by and best["value"] == pytest.approx(max(scores), rel=1e-5)  # the log has 6 digits
        assert best["step"] == int(rows[int(np.argmax(scores))]["step"])
        assert "best" not in load_model(tmp_path / best_by / "last").info.provenance


def test_best_margin_lets_a_later_model_of_nearly_the_highest_score_take_over(tmp_path):
    from biounet.model import load_model
    from biounet.training import CsvLog

    samples = _tiny_samples(4)
    for margin in (0.0, 1.0):  # 1.0: any IoU is within the margin, so the last validated model is best
        config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=6, val_every=2,
                                    best_by="iou", best_margin=margin, deterministic=True)  # fmt: skip
        run = tmp_path / f"margin{margin}"
        train(samples[:3], run, config, val_samples=samples[3:], progress=False)
        rows = [r for r in CsvLog.read(run / "log.csv") if r.get("val_iou") not in (None, "")]
        scores, steps = [float(r["val_iou"]) for r in rows], [int(r["step"]) for r in rows]
        highest, chosen = -np.inf, None
        for step, score in zip(steps, scores, strict=True):  # the rule, written out a second time
            if score > highest or (margin and score >= highest - margin):
                chosen = (step, score)
            highest = max(highest, score)
        best = load_model(run / "best").info.provenance["best"]
        assert (best["step"], best["margin"]) == (chosen[0], margin)
        assert best["value"] == pytest.approx(chosen[1], rel=1e-5) and best["highest"] == pytest.approx(max(scores), rel=1e-5)
    assert best["step"] == 6
    with pytest.raises(ValueError, match="best_margin"):
        TrainConfig(best_margin=-0.1)


def test_tune_postprocess_stores_the_tuned_options_in_best_and_last(tmp_path, monkeypatch):
    from biounet.model import load_model
    from biounet.prediction import predict
    from biounet.training import _tune, tune_postprocess

    samples = _tiny_samples(4)
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=4, val_every=2,
                                tune_postprocess=True, deterministic=True)  # fmt: skip
    calls = []

    def chosen(probabilities, truth, postprocess):  # a stand-in that always "finds" threshold 0.45
        calls.append(dict(postprocess))
        return _tune.TunedPostprocess({**postprocess, "threshold": 0.45}, 0.75, 0.5, {"threshold": (0.45,)})

    monkeypatch.setattr(_tune, "tune_postprocess", chosen)
    train(samples[:3], tmp_path / "stub", config, val_samples=samples[3:], progress=False)
    train(samples[:3], tmp_path / "stub", config, val_samples=samples[3:], progress=False, resume=True)  # finished
    assert calls == [config.postprocess] * 4  # best and last, twice; from the recipe's options each time
    for name in ("best", "last"):
        model = load_model(tmp_path / "stub" / name)
        assert model.info.postprocess == {**config.postprocess, "threshold": 0.45}
        tuning = model.info.provenance["postprocess_tuned"]
        assert (tuning["before"], tuning["after"], tuning["grid"]) == (0.5, 0.75, {"threshold": [0.45]})
    monkeypatch.undo()
    train(samples[:3], tmp_path / "run", config, val_samples=samples[3:], progress=False)
    for name in ("best", "last"):
        model = load_model(tmp_path / "run" / name)
        tuning = model.info.provenance["postprocess_tuned"]
        assert tuning["images"] == 1 and tuning["grid"]["threshold"] == [0.3, 0.4, 0.5, 0.6, 0.7]
        assert set(model.info.postprocess) <= {"split", "min_size", "threshold", "min_seed_height"}
        # the same search again, on the saved model's probabilities, from the recipe's post-processing
        again = tune_postprocess([predict(model, samples[3].image, progress=False)], [samples[3].labels],
                                 config.postprocess)  # fmt: skip
        assert again.options == model.info.postprocess
        assert (again.default_score, again.score) == pytest.approx((tuning["before"], tuning["after"]))
    with pytest.raises(ValueError, match="tune_postprocess must be true or false, got 1"):
        TrainConfig().updated(["tune_postprocess=1"])
    with pytest.raises(ValueError, match="pick must be one of 'images', 'pixels', 'objects', got 'area'"):
        TrainConfig().updated(["pick=area"])


def test_luminance_recipe_trains_on_rgb_and_the_model_converts_rgb(tmp_path):
    from skimage.color import rgb2gray

    from biounet import predict

    gray = _tiny_samples(2)
    rgb = [make_sample(np.stack([s.image, s.image // 2, s.image // 3], axis=-1), s.labels, name=s.name) for s in gray]
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=2, color="luminance")
    model = train(rgb, tmp_path / "run", config, progress=False)
    assert model.config.in_channels == 1 and model.info.color == "luminance"
    image = rgb[0].image
    np.testing.assert_array_equal(predict(model, image, channel_axis=-1, progress=False),
                                  predict(model, rgb2gray(image).astype(np.float32), progress=False))  # fmt: skip
    with pytest.raises(ValueError, match="takes 3 channels"):  # a kept-colour recipe has 3 input channels
        predict(train(rgb, tmp_path / "keep", dataclasses.replace(config, color="keep"), progress=False), image[..., 0],
                channel_axis=None, progress=False)  # fmt: skip


def test_dark_background_recipe_stores_its_rule_with_the_model(tmp_path):
    from biounet import predict
    from biounet.model import load_model

    samples = _tiny_samples(2)
    turned = [make_sample(s.image.max() + s.image.min() - s.image, s.labels, name=s.name) for s in samples]
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=2, val_every=2,
                                background="dark")  # fmt: skip
    train(turned[:1], tmp_path / "run", config, val_samples=turned[1:], progress=False)
    model = load_model(tmp_path / "run" / "last")
    assert model.info.background == "dark"
    assert json.loads((tmp_path / "run" / "last" / "config.json").read_text())["background"] == "dark"
    image = samples[1].image.astype(np.float32)  # bright cells on dark: predicted as they are
    prob = predict(model, image, progress=False, precision="float32")
    plain = dataclasses.replace(model.info, background="as-is")
    assert np.array_equal(prob, predict(_with_info(model, plain), image, progress=False, precision="float32"))


def _with_info(model, info):
    import copy

    clone = copy.copy(model)
    clone.info = info
    return clone


def test_recompute_batch_norm_is_the_plain_average_of_the_batches_statistics():
    from biounet.training import recompute_batch_norm

    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4, norm="batch", dropout=0.0).eval()
    batches = [torch.rand(2, 1, 44, 44) * (k + 1) + k for k in range(3)]
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(layers))}
    hooks = [m.register_forward_pre_hook(lambda _, args, i=i: seen[i].append(
        (args[0].mean(dim=(0, 2, 3)), args[0].var(dim=(0, 2, 3), unbiased=True)))) for i, m in enumerate(layers)]
    with torch.no_grad():  # the reference: each layer's input statistics, batch by batch, in train mode
        model.train()
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    model.eval()
    assert recompute_batch_norm(model, batches) == 3
    for i, m in enumerate(layers):
        torch.testing.assert_close(m.running_mean, torch.stack([s[0] for s in seen[i]]).mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, torch.stack([s[1] for s in seen[i]]).mean(0), rtol=1e-5, atol=1e-6)
        assert m.momentum == 0.1 and int(m.num_batches_tracked) == 3
    assert not model.training and all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    before = [m.running_mean.clone() for m in layers]
    assert recompute_batch_norm(model, []) == 0  # nothing to average over: the statistics stay
    assert all(torch.equal(m.running_mean, b) for m, b in zip(layers, before, strict=True))
    assert recompute_batch_norm(UNet(depth=2, base_channels=4), batches) == 0  # no BatchNorm layer


def test_precise_bn_changes_the_statistics_of_the_saved_models_and_not_the_training(tmp_path):
    from biounet.model import load_model

    samples = _tiny_samples(3)
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=4, val_every=2)
    train(samples[:2], tmp_path / "plain", config, val_samples=samples[2:], progress=False)
    train(samples[:2], tmp_path / "precise", dataclasses.replace(config, precise_bn=3), val_samples=samples[2:],
          progress=False)  # fmt: skip
    plain, precise = (load_model(tmp_path / name / "last").state_dict() for name in ("plain", "precise"))
    statistics = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(plain[k], precise[k]) for k in statistics)
    assert all(torch.equal(plain[k], precise[k]) for k in plain if k not in statistics and "num_batches" not in k)
    assert all(int(precise[k]) == 3 for k in precise if k.endswith("num_batches_tracked"))
    with pytest.raises(InputError, match="precise_bn must be an integer >= 0, got -1"):
        dataclasses.replace(config, precise_bn=-1)


def test_border_recipe_trains_three_classes_and_its_model_makes_instances(tmp_path):
    from biounet import predict
    from biounet.model import load_model
    from biounet.postprocess import labels_from_probabilities

    with pytest.raises(ValueError, match='target = "border" and split = "border" go together'):
        TrainConfig.preset("fast", target="border")
    with pytest.raises(ValueError, match='go together'):
        TrainConfig.preset("fast", split="border")
    samples = _tiny_samples(3)
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=3, val_every=3,
                                target="border", split="border")  # fmt: skip
    train(samples[:2], tmp_path / "run", config, val_samples=samples[2:], progress=False)
    model = load_model(tmp_path / "run" / "last")
    assert model.config.num_classes == 3 and model.info.class_names == ("background", "interior", "border")
    assert model.info.postprocess["split"] == "border"
    prob = predict(model, samples[2].image, progress=False)
    labels = labels_from_probabilities(prob, **model.info.postprocess)
    assert prob.shape == (3, *samples[2].image.shape) and labels.shape == samples[2].image.shape


def test_resume_with_another_recipe_is_refused_and_the_run_stays_resumable(tmp_path):
    """Issue 13, finding 4: --resume --set optimizer="sgd" on an AdamW run used to rewrite the config, then crash."""
    samples = _tiny_samples()
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=4, checkpoint_every=2)
    train(samples, tmp_path / "run", config, progress=False)
    saved = (tmp_path / "run" / "train_config.json").read_bytes()
    with pytest.raises(ValueError, match=r"cannot resume with a changed recipe \(optimizer 'adamw' -> 'sgd'\); only "
                                         r"steps, val_every, checkpoint_every may change"):  # fmt: skip
        train(samples, tmp_path / "run", dataclasses.replace(config, optimizer="sgd"), resume=True, progress=False)
    assert (tmp_path / "run" / "train_config.json").read_bytes() == saved
    # a run folder of an older version (no best_by, color, minutes) resumes too
    legacy = json.loads(saved)
    for key in ("best_by", "color", "minutes"):
        del legacy[key]
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(legacy))
    statuses = list(train_steps(samples, tmp_path / "run", dataclasses.replace(config, steps=6), resume=True))
    assert [s.step for s in statuses] == [5, 6]
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint.pt: not a checkpoint of this run"):
        train(samples, tmp_path / "run", dataclasses.replace(config, steps=8), resume=True, progress=False)


def test_cli_resume_of_a_budgeted_run_refuses_steps_and_a_broken_config_is_one_line(tmp_path, capsys):
    from biounet.cli import main

    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig.preset("fast", minutes=5.0, steps=1234)
    (run / "train_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    assert main(["train", str(tmp_path / "data"), "-o", str(run), "--resume", "--steps", "5000"]) == 1
    err = capsys.readouterr().err
    assert "has a time budget of 5 min and keeps the 1234 steps planned for it; --steps cannot change them" in err
    (run / "train_config.json").write_text('{"lr": "abc"')
    assert main(["train", str(tmp_path / "data"), "-o", str(run), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "train_config.json: cannot read the run's configuration" in err and err.count("\n") == 1


def test_resume_with_nothing_to_resume_says_so(tmp_path, caplog):
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=1, val_every=1000)
    with caplog.at_level("WARNING", logger="biounet.training"):
        list(train_steps(_tiny_samples(2), tmp_path / "R", config, resume=True))
    assert f"{tmp_path / 'R'}: no checkpoint to resume from; starting a new run" in caplog.text
    assert (tmp_path / "R" / "last" / "config.json").is_file()


def test_a_garbage_checkpoint_is_refused_in_one_line(tmp_path):
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=1, val_every=1000)
    list(train_steps(_tiny_samples(2), tmp_path / "R", config))
    (tmp_path / "R" / "checkpoint.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="checkpoint.pt: not a checkpoint of this run") as caught:
        list(train_steps(_tiny_samples(2), tmp_path / "R", config, resume=True))
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------
# The nested recipe (issue 12): TOML tables, to_toml, dotted --set keys, UNet(config)
# --------------------------------------------------------------------------------------------
DOCS = Path(__file__).resolve().parent.parent / "docs" / "training.md"
TABLES = ("network", "data", "augmentation", "loss", "optimization", "postprocess", "run")


def _toml_file(folder: Path, text: str, name: str = "c.toml") -> Path:
    (folder / name).write_text(text)
    return folder / name


def _as_toml_data(config: TrainConfig) -> dict:
    """What tomllib should read from ``config.to_toml()``: tables of fields, None as "none", tuples as lists."""
    flat = {k: ("none" if v is None else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(config).items()}  # fmt: skip
    return {table: {name: flat[name] for name in names} for table, names in TrainConfig.SECTIONS.items()}


def test_config_sections_hold_every_field_exactly_once():
    assert tuple(TrainConfig.SECTIONS) == TABLES
    listed = [name for names in TrainConfig.SECTIONS.values() for name in names]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert len(listed) == len(set(listed)) == len(fields) == 40
    assert set(listed) == set(fields)
    assert TrainConfig.SECTIONS["optimization"] == ("optimizer", "lr", "momentum", "weight_decay", "schedule",
                                                     "warmup", "steps", "minutes")  # fmt: skip


@pytest.mark.parametrize("preset", ["paper", "fast"])
@pytest.mark.parametrize("overrides", [
    {},
    {"norm": None, "normalization": None, "minutes": 2.5, "tile": "auto"},
    {"lr": 1e-05, "weight_decay": 0.1 + 0.2, "dropout": 0.0, "w0": 0, "augment": False, "channels_last": False},
    {"target": "border", "split": "border", "min_size": 12, "best_by": "v_rand", "color": "luminance",
     "background": "dark", "best_margin": 0.05, "pick": "objects", "tune_postprocess": True, "class_balance": "dataset"},
    {"tile": 204, "depth": 3, "padding": "same", "norm": "group", "seed": 2**63 - 1, "precision": "bfloat16"},
])  # fmt: skip
def test_to_toml_round_trips_and_writes_the_tables(tmp_path, preset, overrides):
    config = TrainConfig.preset(preset, **overrides)
    text = config.to_toml()
    assert tomllib.loads(text) == _as_toml_data(config)
    assert re.findall(r"^\[(\w+)\]$", text, flags=re.MULTILINE) == list(TABLES)
    assert TrainConfig.from_toml(_toml_file(tmp_path, text)) == config
    assert TrainConfig.from_toml(_toml_file(tmp_path, text), base=TrainConfig.preset("fast", steps=3)) == config


_POSITIVE_INT = st.integers(1, 10**6)
_FINITE = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
_FIELDS = {
    "depth": st.integers(1, 4), "base_channels": st.integers(1, 64),
    "padding": st.sampled_from(["valid", "same"]), "norm": st.sampled_from([None, "batch", "instance", "group"]),
    "dropout": st.floats(0, 1, exclude_max=True), "tile": st.one_of(st.just("auto"), _POSITIVE_INT),
    "batch_size": _POSITIVE_INT, "color": st.sampled_from(["keep", "luminance"]),
    "background": st.sampled_from(["as-is", "dark", "inverted"]), "precise_bn": st.integers(0, 1000),
    "best_margin": st.floats(0, 1), "pick": st.sampled_from(["images", "pixels", "objects"]),
    "tune_postprocess": st.booleans(), "class_balance": st.sampled_from(["image", "dataset", "none"]),
    "normalization": st.one_of(st.none(), st.tuples(st.floats(0, 49.9), st.floats(50, 100))),
    "augment": st.booleans(), "elastic_std": _FINITE, "elastic_grid": st.integers(2, 9), "w0": _FINITE,
    "sigma": _FINITE, "dice": _FINITE, "optimizer": st.sampled_from(["sgd", "adam", "adamw"]),
    "lr": st.floats(1e-300, 1e3), "momentum": st.floats(0, 1, exclude_max=True), "weight_decay": _FINITE,
    "schedule": st.sampled_from(["constant", "poly", "cosine"]), "warmup": st.integers(0, 10**6),
    "steps": _POSITIVE_INT, "minutes": st.one_of(st.none(), st.floats(1e-6, 1e6)), "min_size": st.integers(0, 10**6),
    "val_every": _POSITIVE_INT, "checkpoint_every": _POSITIVE_INT, "best_by": st.sampled_from(["v_rand", "ap", "iou"]),
    "seed": st.integers(0, 2**63 - 1), "deterministic": st.booleans(),
    "precision": st.sampled_from(["auto", "float32", "bfloat16"]), "compile": st.booleans(),
    "channels_last": st.booleans(),
}  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.fixed_dictionaries(_FIELDS),
       target_split=st.sampled_from([("binary", "none"), ("binary", "distance"), ("binary", "probability"),
                                     ("border", "border")]))  # fmt: skip
def test_to_toml_round_trips_any_recipe(tmp_path, values, target_split):
    config = TrainConfig(**values, target=target_split[0], split=target_split[1])
    assert tomllib.loads(config.to_toml()) == _as_toml_data(config)
    assert TrainConfig.from_toml(_toml_file(tmp_path, config.to_toml())) == config


def test_nested_toml_reads_tables_flat_keys_and_the_preset(tmp_path):
    nested = _toml_file(tmp_path, 'preset = "fast"\nseed = 5\n[network]\ndepth = 3\nnorm = "none"\n'
                                  '[optimization]\nlr = 0.001\nminutes = 2\n[data]\nnormalization = [2, 98]\n', "n.toml")  # fmt: skip
    flat = _toml_file(tmp_path, 'preset = "fast"\nseed = 5\ndepth = 3\nnorm = "none"\nlr = 0.001\nminutes = 2\n'
                                "normalization = [2, 98]\n", "f.toml")  # fmt: skip
    expected = dataclasses.replace(TrainConfig.preset("fast"), seed=5, depth=3, norm=None, lr=0.001, minutes=2,
                                   normalization=(2.0, 98.0))  # fmt: skip
    assert TrainConfig.from_toml(nested) == TrainConfig.from_toml(flat) == expected
    assert TrainConfig.from_toml(nested).base_channels == 16  # the rest is the fast preset's
    # without a preset key the file is laid over ``base``
    over = TrainConfig.from_toml(_toml_file(tmp_path, "[run]\nval_every = 7\n"), base=TrainConfig.preset("fast"))
    assert over == dataclasses.replace(TrainConfig.preset("fast"), val_every=7)


_TABLES_LISTED = "the tables are network, data, augmentation, loss, optimization, postprocess, run"


@pytest.mark.parametrize("text,message", [
    ("[optimization]\ndepth = 3\n", "[optimization] has no key depth: it belongs in [network]"),
    ("[optimisation]\nlr = 0.1\n", f"unknown table [optimisation] (did you mean optimization?); {_TABLES_LISTED}"),
    ("[network]\nwidth = 8\n", "[network] has no key width; its keys are depth, base_channels, padding, norm, dropout"),
    ('[optimization]\nlr = "fast"\n', "[optimization] lr must be a number, got 'fast'"),
    ("[optimization]\nlr = -1\n", "[optimization] lr must be > 0, got -1"),
    ("[network]\ndropout = 1.5\n", "[network] dropout must be in [0, 1), got 1.5"),
    ('[network]\nnorm = "layer"\n', "[network] norm must be one of 'batch', 'instance', 'group' or none, got 'layer'"),
    ("[network]\ndepth = 9\n", "[network] depth must be at most 8, got 9"),
    ("[data]\ntile = 0\n", "[data] tile must be a positive integer, got 0"),
    ("[data]\nnormalization = [99.8, 1.0]\n",
     "[data] normalization must be percentiles [low, high] with 0 <= low < high <= 100 (or none), got [99.8, 1.0]"),
    ("[run]\nseed = true\n", "[run] seed must be an integer, got True"),
    ("[augmentation]\nelastic_grid = 1\n", ("[augmentation] elastic_grid must be an integer >= 2 (control points "
      "per axis), got 1")),
    ("[loss]\nw0 = -1.0\n", "[loss] w0 must be a finite number >= 0, got -1.0"),
    ("lr = 0.1\n[optimization]\nlr = 0.2\n", "lr is given twice, as lr and as [optimization] lr"),
    ("network = 3\n", "network must be a table ([network]) of depth, base_channels, padding, norm, dropout, got 3"),
    ("learning_rate = 0.1\n", (f"unknown training option learning_rate; {_TABLES_LISTED}, and their keys may "
      "also stand at the top")),
    ("[network.deep]\ndepth = 5\n", "[network] has no key deep; its keys are"),
    ('preset = "slow"\n', "unknown preset 'slow'; choose from paper, fast"),
    ("preset = 1\n", "preset must be a string ('paper' or 'fast'), got 1"),
    ("[network]\nbase_channels = 512\n", "TrainConfig: base_channels * 2**depth = 8192 channels"),
    ('[data]\ntarget = "border"\n', 'TrainConfig: target = "border" and split = "border" go together'),
    ('[data]\nbackground = "bright"\n', "[data] background must be one of 'as-is', 'dark', 'inverted', got 'bright'"),
    ("lr = [", "cannot read training config"),
])  # fmt: skip
def test_toml_errors_name_the_file_the_table_and_the_key(tmp_path, text, message):
    path = _toml_file(tmp_path, text)
    with pytest.raises(InputError) as caught:
        TrainConfig.from_toml(path)
    assert str(caught.value).startswith(f"{path}: {message}")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"momentum": 1.0}, "TrainConfig.momentum must be in [0, 1), got 1.0"),
    ({"depth": 9}, "TrainConfig.depth must be at most 8, got 9"),
    ({"base_channels": 512}, ("TrainConfig: base_channels * 2**depth = 8192 channels at the bottom of the "
      "network, over the limit of 4096")),
    ({"normalization": (50, 10)}, "TrainConfig.normalization must be percentiles [low, high]"),
    ({"sigma": float("nan")}, "TrainConfig.sigma must be a finite number >= 0, got nan"),
    ({"lr": "fast"}, "TrainConfig.lr must be > 0, got 'fast'"),
    ({"optimizer": "lbfgs"}, "TrainConfig.optimizer must be 'sgd', 'adam' or 'adamw', got 'lbfgs'"),
])  # fmt: skip
def test_values_that_would_fail_after_the_data_is_read_fail_at_construction(kwargs, message):
    with pytest.raises(InputError) as caught:
        TrainConfig(**kwargs)
    assert str(caught.value).startswith(message)


def test_set_takes_dotted_and_flat_keys():
    fast = TrainConfig.preset("fast")
    got = fast.updated(["optimization.lr=0.001", "network.norm=none", "steps=7", "data.normalization=[2, 98]",
                        'run.precision="float32"'])  # fmt: skip
    assert got == dataclasses.replace(fast, lr=0.001, norm=None, steps=7, normalization=(2.0, 98.0),
                                      precision="float32")  # fmt: skip
    assert fast.updated(["minutes=none"]).minutes is None and fast.updated(['norm="none"']).norm is None
    for item, message in [("optimization.depth=3", "[optimization] has no key depth: it belongs in [network]"),
                          ("optimisation.lr=1", "unknown table [optimisation] (did you mean optimization?)"),
                          ("network.lr", "is not field=value")]:  # fmt: skip
        with pytest.raises(InputError) as caught:
            fast.updated([item])
        assert message in str(caught.value) and caught.value.option == "set"
    with pytest.raises(InputError, match="training option lr must be a number, got 'abc'"):
        fast.updated(["optimization.lr=abc"])


def test_cli_reads_the_whole_recipe_before_the_data(tmp_path, capsys):
    from biounet.cli import main

    missing, run = tmp_path / "no-such-data", tmp_path / "run"
    good = _toml_file(tmp_path, "[optimization]\nlr = 0.001\n", "good.toml")
    bad = _toml_file(tmp_path, '[optimization]\nlr = "abc"\n', "bad.toml")
    # with a good recipe the missing data is what stops the run: the data is read after the recipe ...
    assert main(["train", str(missing), "-o", str(run), "--config", str(good)]) == 1
    assert str(missing) in capsys.readouterr().err
    # ... so a bad recipe, or a bad --set, is reported first, whatever the data
    assert main(["train", str(missing), "-o", str(run), "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == f"biounet train: error: {bad}: [optimization] lr must be a number, got 'abc'\n"
    assert main(["train", str(missing), "-o", str(run), "--config", str(good), "--set", "optimization.depth=2"]) == 1
    err = capsys.readouterr().err
    assert err == ("biounet train: error: override 'optimization.depth=2': [optimization] has no key depth: it "
                   "belongs in [network] (--set)\n")  # fmt: skip
    assert not run.exists()


def test_the_run_folder_holds_its_recipe_as_toml_too(tmp_path):
    from biounet.training import run_config

    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile="auto", batch_size=1, steps=1, val_every=1000)
    list(train_steps(_tiny_samples(2), tmp_path / "R", config))
    saved = run_config(tmp_path / "R")  # train_config.json
    assert isinstance(saved.tile, int) and saved.precision in ("float32", "bfloat16")  # as resolved for the run
    assert TrainConfig.from_toml(tmp_path / "R" / "train_config.toml") == saved
    assert tomllib.loads((tmp_path / "R" / "train_config.toml").read_text()) == _as_toml_data(saved)


def test_unet_from_a_config_is_the_keyword_network():
    cfg = UNetConfig(in_channels=2, num_classes=3, depth=2, base_channels=4, norm="batch", dropout=0.2)
    torch.manual_seed(0)
    from_config = UNet(cfg, info=ModelInfo(class_names=("a", "b", "c"))).eval()
    torch.manual_seed(0)
    from_keywords = UNet(**cfg.to_dict()).eval()
    assert from_config.config == from_keywords.config == cfg
    assert from_config.info.class_names == ("a", "b", "c")
    a, b = from_config.state_dict(), from_keywords.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 2, 44, 44)
    assert torch.equal(from_config(x), from_keywords(x))
    for args, kwargs, named in [((cfg,), {"depth": 3}, "depth"), ((cfg, 3), {}, "num_classes"),
                                ((cfg, 3, 2), {"norm": None}, "num_classes, depth, norm")]:  # fmt: skip
        with pytest.raises(InputError) as caught:
            UNet(*args, **kwargs)
        assert str(caught.value) == f"UNet takes a UNetConfig or the architecture's arguments, not both: got a UNetConfig and {named}"
    recipe = TrainConfig.preset("fast", depth=2, base_channels=4)
    model = recipe.model(1, 2, ModelInfo())
    assert model.config == recipe.net_config(1, 2) == UNetConfig(1, 2, 2, 4, "valid", "batch", 0.1)


def test_the_docs_recipe_and_error_lines_are_what_biounet_reads_and_says(tmp_path, monkeypatch):
    text = DOCS.read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    got = TrainConfig.from_toml(_toml_file(tmp_path, example))
    assert got == TrainConfig.preset("fast", depth=5, norm="instance", tile=444, normalization=(0.5, 99.5),
                                     elastic_std=8.0, dice=0.5, lr=0.001, steps=2000, split="distance", min_size=12,
                                     best_by="ap", seed=3)  # fmt: skip
    # the table of keys: every field once, in its table, with the presets' values as to_toml writes them
    rows, table = [], None
    for named, key, paper, fast in re.findall(r"^\| (?:`\[(\w+)\]`)? *\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", text,
                                              flags=re.MULTILINE):  # fmt: skip
        table = named or table
        rows.append((table, key, paper.strip("` "), fast.strip("` ")))
    written = {preset: dict(re.findall(r"^(\w+) = (.*)$", TrainConfig.preset(preset).to_toml(), flags=re.MULTILINE))
               for preset in ("paper", "fast")}  # fmt: skip
    assert rows == [(t, n, written["paper"][n], written["fast"][n]) for t, ns in TrainConfig.SECTIONS.items() for n in ns]
    monkeypatch.chdir(tmp_path)
    lines = re.findall(r"^biounet train: error: (recipe\.toml: .*)$", text, flags=re.MULTILINE)
    assert len(lines) == 3
    for content, line in zip(['[optimization]\nlr = "fast"\n', "[optimization]\ndepth = 3\n",
                              "[optimisation]\nlr = 0.1\n"], lines, strict=True):  # fmt: skip
        Path("recipe.toml").write_text(content)
        with pytest.raises(InputError) as caught:
            TrainConfig.from_toml(Path("recipe.toml"))
        assert str(caught.value) == line
