"""Training: loss against numpy, config handling, resume after SIGKILL, failures, DDP on CPU."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from biounet.data import make_sample, synthetic_cells
from biounet.training import soft_dice_loss, weighted_cross_entropy
from biounet.model import UNetConfig
from biounet.training import TrainConfig, auto_tile, largest_tile_within, train, train_steps
from biounet.errors import TrainingError
from biounet.data import split_samples

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
    from biounet.training import CsvLog
    from biounet.model import load_model

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


def test_border_recipe_trains_three_classes_and_its_model_makes_instances(tmp_path):
    from biounet import predict
    from biounet.postprocess import labels_from_probabilities
    from biounet.model import load_model

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
