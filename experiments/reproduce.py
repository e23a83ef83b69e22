"""Reproduce the U-Net paper on real data and write the results page.

Experiments (the data comes from ``$BIOUNET_DATA``):

* **ISBI 2012 EM** (``isbi2012-em``, 25 labelled slices): 5-fold cross-validation, 5
  consecutive slices held out per fold; V_rand, V_info, Rand, pixel and warping error per
  fold, with and without 8-fold test-time augmentation (TTA).
* **Touching nuclei** (``dsb2018-nuclei``, 120 images in three imaging types): a fixed
  train/validation split, stratified by the manifest's category and seeded; foreground
  IoU, SEG, object F1 and AP at IoU 0.5, and the touching true pairs that come out merged.
* **Ablations**, each changing one thing on the same folds (``configs/ablation-*.toml``):
  no elastic deformation, no border term (w0 = 0), same padding (tiled, with its seams).
  The TTA ablation is the with/without-TTA pair of the baseline.
* **Same-budget peers**: MONAI ``BasicUNet`` with MONAI's augmentation and Dice-CE loss, on
  the same folds and budget (``peer_monai.py``), and on the nuclei Cellpose 3.1 trained from
  scratch with its own training code (``peer_cellpose.py``, in its own ``.venv-cellpose``),
  scored by the same functions.

Every trained model lands in ``--out`` (default ``runs/reproduce``) with a ``record.json`` of
its scores; a rerun with the same settings reuses them, so an interrupted run continues
where it stopped (a U-Net killed mid-training resumes from its last checkpoint, exactly; its
``key.json`` says which settings it was started with) and the page can be rewritten
without training. A copy of every record is kept in ``experiments/records/<name of --out>/``
(``--records``), which is committed: on a fresh clone the page is rewritten from it, and
only the figures and shipped models need the run folder's models. The page
(``docs/results.md``), its figures (``docs/images/results_*.png``) and, with ``--ship``, the
shipped models and their cards are written by this script only.

Examples
--------
Smoke run (fast preset, 2 steps, 2 folds, 128 px crops; a few minutes on 2 CPU cores)::

    BIOUNET_DATA=/data python experiments/reproduce.py --quick

CPU-scale run of the baseline and the peer on two folds, shipping the models::

    BIOUNET_DATA=/data python experiments/reproduce.py --preset fast --steps 300 --folds 0,1 \\
        --variants unet,monai --ship src/biounet/models

The shipped models: the same experiments (reused from their records), then the baseline
recipe on every labelled image for 60 minutes per data set, shipped with cards that give the
held-out scores of the recipe as the estimate (rerun the same command to resume)::

    BIOUNET_DATA=/data python experiments/reproduce.py --preset fast --minutes 5 --select 0.1 \\
        --ship src/biounet/models --ship-minutes 60

Full run on a GPU::

    BIOUNET_DATA=/data python experiments/reproduce.py --preset paper --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common
import page
import peer_cellpose
import peer_monai
from common import ABLATIONS, DATASETS, EM_DIR, N_FOLDS, NUCLEI_DIR, NUCLEI_ONLY, PEERS, VARIANTS
from biounet.data import Sample, load_dataset
from biounet.io import atomic_folder, atomic_write
from biounet.model import UNet, load_model
from biounet.prediction import predict
from biounet.training import TrainConfig, train
from biounet.data import split_samples

log = logging.getLogger("reproduce")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
#: Records kept in the repository (``--records``), by run folder name.
RECORDS = ROOT / "experiments" / "records"
QUICK = {"steps": 2, "folds": "0,1", "crop": 128, "nuclei_per_category": (2, 1), "sets": ("tile=124", "batch_size=2")}
SHIP_LIMIT_BYTES = 25 * 2**20


# ============================================================================================
# Jobs
# ============================================================================================
@dataclass(frozen=True)
class Job:
    """One model to train and score: a variant on one fold (EM) or the split (nuclei)."""

    dataset: str
    variant: str
    fold: int | None
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    config: TrainConfig
    run_dir: Path
    categories: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Images held out of ``train`` to pick the ``best`` model by ``config.best_by`` (``--select``).
    val: tuple[Sample, ...] = ()
    #: A model to ship (``--ship-minutes``): trained on every labelled image, so ``test`` is a
    #: subset of ``train`` and its scores are a regression check, not an estimate.
    final: bool = False

    @property
    def name(self) -> str:
        if self.final:
            return f"{self.dataset}/final"
        return f"{self.dataset}/{self.variant}" + ("" if self.fold is None else f"/fold{self.fold}")


def experiment_config(
    dataset: str, variant: str, preset: str, steps: int | None, sets: Sequence[str], minutes: float | None = None
) -> TrainConfig:
    """Preset, then ``configs/<dataset>.toml``, then the ablation's TOML, then ``--steps``, ``--minutes``, ``--set``.

    The MONAI peer's recipe (:func:`peer_monai.peer_config`) is laid over last.
    """
    config = TrainConfig.from_toml(CONFIGS / f"{dataset}.toml", TrainConfig.preset(preset))
    if variant in ABLATIONS:
        config = TrainConfig.from_toml(CONFIGS / f"ablation-{variant}.toml", config)
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    if minutes is not None:
        config = dataclasses.replace(config, minutes=minutes)
    config = config.updated(sets)
    if config.tile == "auto":  # one fixed tile for every variant, fold and machine: the paper's
        config = dataclasses.replace(config, tile=572)
    return peer_monai.peer_config(config) if variant == "monai" else config


def unet_predict(model: UNet, image: np.ndarray, config: TrainConfig, *, tta: bool, device: str) -> np.ndarray:
    """Class probabilities; same-padding models are tiled at the training tile (so they show seams).

    Valid-padding predictions are exact whatever the tile, so they use the default tiles.
    """
    tile = config.tile if config.padding == "same" else None
    return predict(model, image, tile=tile, tta=tta, device=device, progress=False)


def seam_error(model: UNet, image: np.ndarray, config: TrainConfig, device: str) -> float:
    """Max |p(cell)| difference between prediction tiled at the training tile and in one tile."""
    whole = predict(model, image, tile=max(image.shape) + 2 * model.halo + 2 * model.config.stride,
                    device=device, progress=False)  # fmt: skip
    tiled = predict(model, image, tile=config.tile, device=device, progress=False)
    return float(np.abs(whole[1] - tiled[1]).max())


#: TrainConfig fields added after records were made: left out of a record's key at their
#: default, so the records of runs that could not have set them stay valid.
KEY_OMITS_AT_DEFAULT = {"target": "binary", "background": "as-is", "precise_bn": 0, "best_margin": 0.0,
                        "pick": "images", "tune_postprocess": False, "class_balance": "image"}


def _key(job: Job, crop: int | None) -> dict[str, Any]:
    """What makes a job's record: data, split and the recipe fields the job's model uses."""
    config = dataclasses.asdict(job.config)
    for name, default in KEY_OMITS_AT_DEFAULT.items():
        if config[name] == default:
            del config[name]
    if job.variant == "monai":  # the peer ignores the U-Net's own fields (norm, w0, padding, ...)
        config = {name: config[name] for name in peer_monai.RECIPE_FIELDS}
    elif job.variant == "cellpose":  # Cellpose's own recipe, and the budget and seed
        config = {**{name: config[name] for name in peer_cellpose.RECIPE_FIELDS}, "cellpose": peer_cellpose.RECIPE,
                  "version": peer_cellpose.VERSION}  # fmt: skip
    key = {
        "dataset": job.dataset, "variant": job.variant, "fold": job.fold, "crop": crop, "config": config,
        "train": [s.name for s in job.train], "test": [s.name for s in job.test], "val": [s.name for s in job.val],
    }  # fmt: skip
    return json.loads(json.dumps(key))


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def stored_record_path(job: Job, store: Path) -> Path:
    """Where ``store`` (``--records``) keeps the job's record: ``<store>/<dataset>/<variant>[/fold<k>].json``."""
    return store / f"{job.name}.json"


def cached_record(job: Job, crop: int | None, store: Path | None = None) -> dict[str, Any] | None:
    """The job's record if it was made with the same settings, else None.

    From the run folder's ``record.json``, else from ``store`` (``--records``: the records kept
    in the repository, which outlive the run folders and their models).
    """
    key = _key(job, crop)
    for path in (job.run_dir / "record.json", *([stored_record_path(job, store)] if store else [])):
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("key") == key:
                return record
    return None


def run_job(
    job: Job, *, device: str, crop: int | None, progress: bool, store: Path | None = None
) -> tuple[dict[str, Any], bool]:
    """Train and score one job, or reuse its record if the settings are the same.

    A new record is written to the run folder and, with ``store``, copied there. Returns the
    record and whether it was reused.
    """
    key = _key(job, crop)
    record_path, key_path = job.run_dir / "record.json", job.run_dir / "key.json"
    cached = cached_record(job, crop, store)
    if cached is not None:
        log.info("%s: reusing its record%s", job.name, "" if (job.run_dir / "record.json").is_file() else
                 f" from {store} (its model is not on this machine)")  # fmt: skip
        return cached, True
    resume = (job.variant not in PEERS and (job.run_dir / "checkpoint.pt").is_file() and key_path.is_file()
              and json.loads(key_path.read_text()) == key)  # fmt: skip
    if not resume:
        if job.run_dir.exists():
            shutil.rmtree(job.run_dir)
        job.run_dir.mkdir(parents=True)
        _write_json(key_path, key)
    budget = f"{job.config.minutes:g} min" if job.config.minutes else f"{job.config.steps} steps"
    log.info("%s: %s %s on %d images (%d validation)", job.name, "resuming" if resume else "training", budget,
             len(job.train), len(job.val))  # fmt: skip
    started = time.perf_counter()
    models: dict[str, Any] = {}
    masks: dict[str, np.ndarray] = {}
    if job.variant == "cellpose":
        masks, facts = peer_cellpose.train_and_segment(job.train, job.test, job.run_dir, steps=job.config.steps,
                                                       minutes=job.config.minutes, seed=job.config.seed,
                                                       threads=torch.get_num_threads())  # fmt: skip
        parameters, steps_run, peer_facts = facts["parameters"], facts["steps"], facts
    elif job.variant == "monai":
        net = peer_monai.train_peer(job.train, job.run_dir, job.config, device=device, progress=progress)
        parameters = peer_monai.count_parameters(net)
        steps_run = json.loads((job.run_dir / "peer.json").read_text())["steps"]

        def predictor(image: np.ndarray, tta: bool, run: str = "plain") -> np.ndarray:
            return peer_monai.predict_peer(net, image, job.config, device=device)
    else:
        models["last"] = train(job.train, job.run_dir, job.config, val_samples=job.val, device=device,
                               resume=resume, progress=progress)  # fmt: skip
        if job.val:
            models["best"] = load_model(job.run_dir / "best", device=device)
        parameters = sum(p.numel() for p in models["last"].parameters())
        steps_run = json.loads((job.run_dir / "train_config.json").read_text())["steps"]

        def predictor(image: np.ndarray, tta: bool, run: str = "plain") -> np.ndarray:
            chosen = models["best" if run == "best" else "last"]
            return unet_predict(chosen, image, job.config, tta=tta, device=device)
    seconds = time.perf_counter() - started
    log.info("%s: trained in %.0f s; scoring %d images", job.name, seconds, len(job.test))
    hw = common.hardware(device)
    record: dict[str, Any] = {
        "key": key, "train_seconds": seconds, "parameters": parameters, "device": device, "steps_run": steps_run,
        "trained": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "hardware": hw.get("gpu", hw["cpu"]), "load": hw["load"]},
    }  # fmt: skip
    if resume:  # train_seconds counts this invocation only
        record["resumed"] = True
    if masks:  # Cellpose segments as it trains; its own clock for each part
        record |= {"train_seconds": peer_facts["train_seconds"], "peer": peer_facts}
        record["plain"] = [{"name": s.name, "category": job.categories.get(s.name, ""),
                            **common.nuclei_label_scores(s.labels, masks[s.name])} for s in job.test]  # fmt: skip
        record["score_seconds"] = time.perf_counter() - started - seconds
        _keep(record, record_path, job, store)
        return record, False
    runs = {"plain": False, "tta": True} if job.variant == "unet" else {"plain": False}
    if "best" in models:
        runs["best"] = False
        best = models["best"].info.provenance.get("best", {})
        record["best_step"], record["best_value"] = best.get("step"), best.get("value")
    for label, tta in runs.items():
        probabilities = [predictor(s.image, tta, label) for s in job.test]
        if job.dataset == "em":
            record[label] = common.em_scores([p[1] for p in probabilities], [s.labels for s in job.test])
        else:
            # the U-Net's own (tuned on its validation images with tune_postprocess); the recipe's for the peer
            postprocess = (models["best" if label == "best" else "last"].info.postprocess if models
                           else job.config.postprocess)  # fmt: skip
            record[label] = _nuclei_records(job, probabilities, postprocess)
            record.setdefault("postprocess", {})[label] = postprocess
            if label == "plain" and models and job.config.tune_postprocess:  # the same model, the recipe's options
                record["fixed"] = _nuclei_records(job, probabilities, job.config.postprocess)
    if job.dataset == "em" and job.variant not in PEERS:
        record["seam"] = seam_error(models["last"], job.test[0].image, job.config, device)
    record["score_seconds"] = time.perf_counter() - started - seconds
    _keep(record, record_path, job, store)
    return record, False


def _nuclei_records(job: Job, probabilities: Sequence[np.ndarray], postprocess: dict[str, Any]) -> list[dict]:
    """Per test image: its name, category and :func:`common.nuclei_scores` with ``postprocess``."""
    return [{"name": s.name, "category": job.categories.get(s.name, ""),
             **common.nuclei_scores(s.labels, p, postprocess)}
            for s, p in zip(job.test, probabilities, strict=True)]  # fmt: skip


def _keep(record: dict[str, Any], record_path: Path, job: Job, store: Path | None) -> None:
    _write_json(record_path, record)
    if store is not None:
        stored = stored_record_path(job, store)
        stored.parent.mkdir(parents=True, exist_ok=True)
        _write_json(stored, record)


# ============================================================================================
# Data
# ============================================================================================
ConfigFor = Callable[[str, str], TrainConfig]


def held_out(train: Sequence[Sample], fraction: float, seed: int) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """``train`` split into images to train on and ``fraction`` of them to select the best model on."""
    if not fraction:
        return tuple(train), ()
    fit, val = split_samples(train, fraction, seed=seed)
    return tuple(fit), tuple(val)


def em_jobs(
    root: Path, variants: Sequence[str], folds: Sequence[int], make_config: ConfigFor, out: Path, crop: int | None,
    select: float = 0.0, ablation_folds: Sequence[int] | None = None,
) -> list[Job]:  # fmt: skip
    """One job per variant and fold of the ISBI slices (``crop``: top-left corners only, for ``--quick``).

    With ``select``, that fraction of each fold's training slices validates the ``best``
    model instead of training it (the peer trains on the same images, without validation).
    Ablations run on ``ablation_folds`` (default: ``folds``).
    """
    samples = load_dataset(root / EM_DIR, layout="isbi")
    if crop:
        samples = [common.crop_sample(s, crop) for s in samples]
    blocks = common.contiguous_folds([s.name for s in samples], N_FOLDS)
    jobs = []
    for variant in (v for v in variants if v not in NUCLEI_ONLY):
        for k in (ablation_folds if variant in ABLATIONS and ablation_folds is not None else folds):
            held = set(blocks[k])
            fit, val = held_out([s for s in samples if s.name not in held], select, seed=k)
            jobs.append(Job("em", variant, k, fit, tuple(s for s in samples if s.name in held),
                            make_config("em", variant), out / "em" / variant / f"fold{k}",
                            val=() if variant in PEERS else val))  # fmt: skip
    return jobs


def nuclei_jobs(
    root: Path, variants: Sequence[str], make_config: ConfigFor, out: Path, *, fraction: float, seed: int,
    crop: int | None, select: float = 0.0,
) -> list[Job]:  # fmt: skip
    """One job per variant on the stratified split (``crop``: a few cropped images per category, for ``--quick``)."""
    categories = common.read_manifest(root / NUCLEI_DIR / "manifest.csv")
    train_ids, val_ids = common.stratified_split(categories, fraction, seed=seed)
    if crop:
        n_train, n_val = QUICK["nuclei_per_category"]
        train_ids, val_ids = (
            [i for c in sorted(set(categories.values())) for i in [t for t in ids if categories[t] == c][:n]]
            for ids, n in ((train_ids, n_train), (val_ids, n_val))
        )
    samples = {s.name: s for s in load_dataset(root / NUCLEI_DIR, layout="folders", as_gray=True)}
    missing = sorted(set(categories) - set(samples))
    if missing:
        raise ValueError(f"{root / NUCLEI_DIR}: manifest ids without images: {', '.join(missing[:3])}")
    def pick(name: str) -> Sample:
        return common.crop_sample(samples[name], crop) if crop else samples[name]

    test_set = tuple(pick(i) for i in val_ids)
    fit, val = held_out([pick(i) for i in train_ids], select, seed=seed)
    return [Job("nuclei", variant, None, fit, test_set, make_config("nuclei", variant), out / "nuclei" / variant,
                categories, val=() if variant in PEERS else val) for variant in variants]  # fmt: skip


def final_jobs(
    root: Path, datasets: Sequence[str], make_config: ConfigFor, out: Path, minutes: float, *, fraction: float,
    seed: int, crop: int | None = None,
) -> list[Job]:  # fmt: skip
    """The models to ship: the baseline recipe on every labelled image for ``minutes``, no selection.

    The last model ships. Its recorded scores are on images it was trained on (EM: fold 0's
    slices; nuclei: the split's validation images), a check that the shipped file reproduces
    them, not an estimate; the cross-validation and split of the same recipe are the estimate.
    ``crop`` (``--quick``): top-left corners only.
    """
    def pick(samples: Sequence[Sample]) -> tuple[Sample, ...]:
        return tuple(common.crop_sample(s, crop) for s in samples) if crop else tuple(samples)

    jobs = []
    if "em" in datasets:
        samples = load_dataset(root / EM_DIR, layout="isbi")
        first_fold = set(common.contiguous_folds([s.name for s in samples], N_FOLDS)[0])
        jobs.append(Job("em", "unet", None, pick(samples), pick([s for s in samples if s.name in first_fold]),
                        dataclasses.replace(make_config("em", "unet"), minutes=minutes), out / "em" / "final",
                        final=True))  # fmt: skip
    if "nuclei" in datasets:
        categories = common.read_manifest(root / NUCLEI_DIR / "manifest.csv")
        _, val_ids = common.stratified_split(categories, fraction, seed=seed)
        samples = {s.name: s for s in load_dataset(root / NUCLEI_DIR, layout="folders", as_gray=True)}
        jobs.append(Job("nuclei", "unet", None, pick([samples[i] for i in sorted(categories)]),
                        pick([samples[i] for i in val_ids]),
                        # nothing is held out to tune on: the model ships with the split's tuned options
                        dataclasses.replace(make_config("nuclei", "unet"), minutes=minutes, tune_postprocess=False),
                        out / "nuclei" / "final", categories, final=True))  # fmt: skip
    return jobs


# ============================================================================================
# Figures and shipped models
# ============================================================================================
def write_figures(results: dict[str, Any], jobs: dict[str, Job], folder: Path, device: str) -> dict[str, Path]:
    """One EM slice and one nuclei image of the baseline (U-Net, no TTA): input | prediction | truth | errors.

    A baseline whose record came from ``--records`` without its model keeps the figure drawn
    when it was trained, if that is in ``folder``.
    """
    figures = {}
    baselines = {"em": [j for j in jobs.values() if j.dataset == "em" and j.variant == "unet"],
                 "nuclei": [jobs["nuclei/unet"]] if "nuclei/unet" in jobs else []}  # fmt: skip
    jobs = {k: j for k, j in jobs.items() if (j.run_dir / "last").is_dir()}  # the models on this machine
    for name, runs in baselines.items():
        if runs and not any(j.name in jobs for j in runs):
            if (folder / f"results_{name}.png").is_file():
                figures[name] = folder / f"results_{name}.png"
            log.info("%s/unet: no model on this machine; %s figure", name, "the earlier" if name in figures else "no")
    em = [j for j in jobs.values() if j.dataset == "em" and j.variant == "unet"]
    if em:
        job = em[0]
        sample = job.test[0]
        model = load_model(job.run_dir / "last", device=device)
        prob = unet_predict(model, sample.image, job.config, tta=False, device=device)[1]
        figures["em"] = common.em_figure(folder / "results_em.png", sample, prob,
                                         f"ISBI 2012 slice {sample.name} (held out in fold {job.fold})")  # fmt: skip
    nuclei = jobs.get("nuclei/unet")
    if nuclei is not None:
        images = results["nuclei"]["unet"]["plain"]
        best = max(range(len(images)), key=lambda i: (images[i]["touching"], -i))  # the most touching nuclei
        sample = nuclei.test[best]
        model = load_model(nuclei.run_dir / "last", device=device)
        prob = unet_predict(model, sample.image, nuclei.config, tta=False, device=device)
        touching, merged = images[best]["touching"], images[best]["merged"]
        figures["nuclei"] = common.nuclei_figure(
            folder / "results_nuclei.png", sample, prob,
            f"{images[best]['category']} validation image {sample.name[:12]}…: "
            f"{merged} of {touching} touching pairs merged", model.info.postprocess,
        )  # fmt: skip
    return figures


def ship_models(results: dict[str, Any], jobs: dict[str, Job], folder: Path, *, device: str = "cpu",
                store: Path | None = None) -> list[Path]:  # fmt: skip
    """Copy the best EM and nuclei U-Nets into ``folder/<name>/`` with provenance and a model card.

    Only valid-padding U-Nets ship, the ones whose tiled prediction is exact (seam-free).
    EM: the variant with the highest mean held-out V_rand over its folds, and of it the fold
    model with the highest V_rand; nuclei: the variant with the highest mean validation AP
    at IoU 0.5. Weights are stored as float16 if float32 would exceed 25 MB. A nuclei model
    trained on every image takes the post-processing of the split (:func:`ship_postprocess`).
    """
    def exact(record: dict[str, Any]) -> bool:
        return record["key"]["variant"] not in PEERS and record["key"]["config"]["padding"] == "valid"

    folds = {r["key"]["fold"] for r in results["em"].get("unet", [])}  # variants run on fewer folds do not compete
    em_variants = {v: recs for v, recs in results["em"].items()
                   if recs and all(exact(r) for r in recs) and {r["key"]["fold"] for r in recs} == folds}  # fmt: skip
    em_best = max(em_variants, key=lambda v: np.mean([r["plain"]["v_rand"] for r in em_variants[v]]), default=None)
    candidates = {
        "em-membranes": [(r["plain"]["v_rand"], f"em/{em_best}/fold{r['key']['fold']}", r)
                         for r in em_variants.get(em_best, [])],
        "nuclei": [(common.mean_nuclei_scores(r["plain"])["ap"], f"nuclei/{v}", r)
                   for v, r in results["nuclei"].items() if exact(r)],
    }  # fmt: skip
    for name, dataset in (("em-membranes", "em"), ("nuclei", "nuclei")):
        if dataset in results.get("final", {}):  # --ship-minutes: the model trained on everything ships
            candidates[name] = [(0.0, f"{dataset}/final", results["final"][dataset])]
    written = []
    for name, options in candidates.items():
        if not options:
            continue
        _, job_name, record = max(options, key=lambda option: option[0])
        source = jobs[job_name].run_dir / "last"
        if not source.is_dir():  # a record from --records, its model not here
            if not shipped_from(folder / name, job_name, record):
                log.warning("%s (%s): its model is not in %s; not shipped", name, job_name, jobs[job_name].run_dir)
                continue
            source = folder / name
            log.info("%s (%s): the shipped model is this record's; its card and provenance are rewritten", name,
                     job_name)  # fmt: skip
        model = load_model(source)
        if jobs[job_name].final and jobs[job_name].dataset == "nuclei":
            ship_postprocess(model, jobs[job_name], record, results, device=device, store=store)
        provenance = {**model.info.provenance, **_provenance(name, job_name, record, len(options), results)}
        model.info = dataclasses.replace(model.info, provenance=provenance)
        if sum(p.numel() * 4 for p in model.parameters()) > SHIP_LIMIT_BYTES:
            model = model.half()
            provenance["weights"] = "float16 (scores above were measured with the float32 weights)"
            model.info = dataclasses.replace(model.info, provenance=provenance)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        if size > SHIP_LIMIT_BYTES:
            log.warning("%s (%s): %.0f MiB even in float16, over the %d MiB limit: not shipped",
                        name, job_name, size / 2**20, SHIP_LIMIT_BYTES // 2**20)  # fmt: skip
            continue
        target = folder / name
        card = page.model_card(name, job_name, record, provenance, results)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_folder(target) as tmp:  # weights, config and card replace the old model together
            model.save(tmp)
            (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        written.append(target)
        log.info("shipped %s (%s) to %s", name, job_name, target)
    return written


def ship_postprocess(model: UNet, job: Job, record: dict[str, Any], results: dict[str, Any], *, device: str,
                     store: Path | None) -> None:  # fmt: skip
    """Give a nuclei model trained on every image the post-processing its recipe tuned on the split.

    With ``tune_postprocess`` a run tunes its threshold and seed height on its validation
    images; one trained on every image has none, so it takes the options that the same
    recipe's run on the split (``nuclei/unet``, its last model, as the last model ships)
    tuned on the split's validation images, never on the images it is scored on here. Its
    recorded images are scored again with them, once: ``record["shipped"]`` keeps the options
    and the scores (``plain``, ``tta``), and the record is saved again. Without tuning in
    the recipe the model keeps its own options. ``model.info`` is replaced, nothing else.
    """
    split = results["nuclei"].get("unet")
    if not split or not split["key"]["config"].get("tune_postprocess") or "postprocess" not in split:
        return
    options = split["postprocess"]["plain"]
    model.info = dataclasses.replace(model.info, postprocess=options)
    if record.get("shipped", {}).get("postprocess") == options:
        return
    log.info("%s: scoring its %d images again with the split's tuned post-processing %s", job.name, len(job.test),
             options)  # fmt: skip
    record["shipped"] = {"postprocess": options, "from": "nuclei/unet"}
    for run, tta in (("plain", False), ("tta", True)):
        probabilities = [unet_predict(model, s.image, job.config, tta=tta, device=device) for s in job.test]
        record["shipped"][run] = _nuclei_records(job, probabilities, options)
    if job.run_dir.is_dir():
        _write_json(job.run_dir / "record.json", record)
    if store is not None and stored_record_path(job, store).is_file():
        _write_json(stored_record_path(job, store), record)


def shipped_from(shipped: Path, job_name: str, record: dict[str, Any]) -> bool:
    """Whether the model shipped in ``shipped`` is the one ``record`` describes.

    True when its provenance names the same experiment and the same training run (the
    recorded training seconds, a float no other run repeats). Then a later invocation that
    reuses the record without its run folder can rewrite the card and provenance (its
    command, the page's estimate) around the same weights.
    """
    config = shipped / "config.json"
    if not config.is_file():
        return False
    try:
        provenance = json.loads(config.read_text()).get("provenance", {})
    except json.JSONDecodeError:
        return False
    return (provenance.get("experiment") == job_name
            and provenance.get("training", {}).get("seconds") == record["train_seconds"])  # fmt: skip


def _provenance(name: str, job_name: str, record: dict, n_options: int, results: dict) -> dict[str, Any]:
    """What a shipped model's ``config.json`` records beside the training recipe.

    A model trained on every image (``--ship-minutes``) records its scores on training images
    (``trained_on_images``: true) and, as ``estimate``, the scores of the same recipe on the
    images the page's experiment held out.
    """
    meta, em, final = results["meta"], record["key"]["dataset"] == "em", job_name.endswith("/final")

    scored = record.get("shipped", record)  # a nuclei model shipped with the split's post-processing: its scores

    def summary(run: str, of: Any = scored) -> dict[str, float] | None:
        if run not in of:
            return None
        return of[run] if em else common.mean_nuclei_scores(of[run])

    if final:
        selection = f"none: the last model of a run on all {len(record['key']['train'])} labelled images"
    else:
        selected_by = ("held-out V_rand, among the folds of the valid-padding variant with the best mean V_rand" if em
                       else "validation AP at IoU 0.5, among the valid-padding variants")  # fmt: skip
        selection = f"best of {n_options} model(s) by {selected_by}"
    evaluation = {
        "dataset": EM_DIR if em else NUCLEI_DIR, "images": record["key"]["test"], "crop": meta["crop"],
        "trained_on_images": final, "tta": False, "scores": summary("plain"), "scores_tta": summary("tta"),
        "how": "experiments/common.py: " + ("em_scores" if em else "nuclei_scores, mean over images"),
    }  # fmt: skip
    if "shipped" in record:  # ship_postprocess
        evaluation["postprocess"] = {"options": record["shipped"]["postprocess"], "tuned_by": record["shipped"]["from"],
                                     "on": "the validation images of the split (tune_postprocess)"}  # fmt: skip
    reference = results["em" if em else "nuclei"].get("unet")
    if final and reference:
        records = reference if em else [reference]
        evaluation["estimate"] = {
            "experiment": f"em/unet, cross-validation on folds {', '.join(str(r['key']['fold']) for r in records)} "
            "(mean over folds)" if em else "nuclei/unet, the stratified split's validation images",
            "minutes": records[0]["key"]["config"].get("minutes"),
            "steps": [r.get("steps_run") for r in records],
            "scores": ({m: float(np.mean([r["plain"][m] for r in records])) for m in records[0]["plain"]} if em
                       else summary("plain", reference)),
        }  # fmt: skip
    return {
        "name": name,
        "experiment": job_name,
        "selection": selection,
        "evaluation": evaluation,
        "training": {  # when and where the record was made (it may be reused by later invocations)
            "steps": record.get("steps_run", record["key"]["config"]["steps"]),
            "minutes": record["key"]["config"].get("minutes"), "seconds": record["train_seconds"], "device": record["device"],
            **record.get("trained", {"date": "not recorded", "hardware": "not recorded"}),
            "command": meta["command"],
        },
    }  # fmt: skip


# ============================================================================================
# Command line
# ============================================================================================
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fast preset, 2 steps, folds 0,1, 128 px crops, "
                   "a few nuclei images; writes into --out unless --results/--figures are given")  # fmt: skip
    p.add_argument("--preset", choices=("fast", "paper"), default="fast", help="base recipe (default fast)")
    p.add_argument("--steps", type=int, help="training steps per model (default: the preset's)")
    p.add_argument("--minutes", type=float, help="wall-clock budget per model instead of steps: every model, "
                   "biounet's and the peer's, trains as many steps as fit in this many minutes on this machine")
    p.add_argument("--select", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this fraction of each model's training images to pick its best model by the "
                   "task's score (V_rand for EM, AP@0.5 for nuclei); the page shows best beside last")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field for every model, e.g. --set precision=\"bfloat16\" (the "
                   "MONAI peer's own recipe, peer_monai.PEER_RECIPE, is laid over it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--folds", default="all", help="EM folds to run: 'all' or indices like 0,1 (of 0-4)")
    p.add_argument("--ablation-folds", help="EM folds of the ablations (default: --folds); the page compares "
                   "each ablation with the baseline on the folds it ran on")
    p.add_argument("--ablation-datasets", help="data sets of the ablations (default: --datasets)")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"subset of {','.join(DATASETS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--val-fraction", type=float, default=0.2, help="nuclei held out per category (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the nuclei split (default 0)")
    p.add_argument("--time-limit", type=float, metavar="MIN",
                   help="start no new model once this many minutes have passed (the page lists what was skipped)")
    p.add_argument("--out", type=Path, help="run folder (default runs/reproduce, or runs/reproduce-quick)")
    p.add_argument("--records", help="folder that keeps a copy of every record, to be committed: the page can be "
                   "rewritten from it on a fresh clone, without the run folder (default experiments/records/<name "
                   "of --out>; 'none' keeps none; --quick: none)")
    p.add_argument("--results", type=Path, help="results page (default docs/results.md; quick: OUT/results.md)")
    p.add_argument("--figures", type=Path, help="figure folder (default docs/images; quick: OUT/images)")
    p.add_argument("--ship", type=Path, metavar="DIR", help="save the best EM and nuclei models to DIR/<name>/")
    p.add_argument("--ship-minutes", type=float, metavar="MIN",
                   help="with --ship: train the baseline recipe on every labelled image for MIN minutes per data "
                   "set and ship those last models (resumable: rerun the same command to continue)")
    p.add_argument("--data", type=Path, default=os.environ.get("BIOUNET_DATA") or None,
                   help="data folder ($BIOUNET_DATA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    args = p.parse_args(argv)
    if args.data is None or not Path(args.data).is_dir():
        p.error("no data: set BIOUNET_DATA (or --data) to the folder holding isbi2012-em/ and dsb2018-nuclei/")
    if args.ship_minutes is not None and (args.ship is None or not args.ship_minutes > 0):
        p.error(f"--ship-minutes needs --ship and a positive number of minutes, got {args.ship_minutes}")
    args.ablation_datasets = args.ablation_datasets or args.datasets
    for name, allowed in (("datasets", DATASETS), ("variants", VARIANTS), ("ablation_datasets", DATASETS)):
        chosen = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        if not chosen or set(chosen) - set(allowed):
            p.error(f"--{name} must be a comma-separated subset of {','.join(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, [v for v in allowed if v in chosen])
    if args.quick:
        args.steps, args.folds = args.steps or QUICK["steps"], QUICK["folds"] if args.folds == "all" else args.folds
        args.sets = [*QUICK["sets"], *args.sets]
    for name in ("folds", "ablation_folds"):
        value = getattr(args, name)
        if value is None:
            continue
        try:
            value = list(range(N_FOLDS)) if value == "all" else sorted({int(k) for k in value.split(",")})
        except ValueError:
            p.error(f"--{name.replace('_', '-')} must be 'all' or comma-separated integers, got {value!r}")
        if not set(value) <= set(range(N_FOLDS)):
            p.error(f"--{name.replace('_', '-')} must be in 0..{N_FOLDS - 1}, got {value}")
        setattr(args, name, value)
    if args.ablation_folds is not None and not set(args.ablation_folds) <= set(args.folds):
        p.error(f"--ablation-folds {args.ablation_folds} must be among --folds {args.folds}: the page compares "
                "each ablation with the baseline on the same folds")
    args.out = args.out or ROOT / ("runs/reproduce-quick" if args.quick else "runs/reproduce")
    if args.records is None:
        args.records = None if args.quick else RECORDS / args.out.name
    else:
        args.records = None if args.records == "none" else Path(args.records)
    args.results = args.results or (args.out / "results.md" if args.quick else ROOT / "docs/results.md")
    args.figures = args.figures or (args.out / "images" if args.quick else ROOT / "docs/images")
    return args


def run_jobs(jobs: Sequence[Job], args: argparse.Namespace, crop: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run (or reuse) the jobs, experiment by experiment (a variant on a data set, all its folds).

    With ``--time-limit`` an experiment is skipped whole when the jobs it still has to train
    would end past the limit, each estimated at the longest job seen so far (trained now, or
    reused with the time it took then, this experiment's own earlier jobs included); so every
    experiment on the page ran on all its folds. Returns the results by data set and
    variant, and the bookkeeping.
    """
    started = time.perf_counter()
    results: dict[str, Any] = {"em": {}, "nuclei": {}, "final": {}}
    done: dict[str, Job] = {}
    skipped, trained, longest = [], 0, 0.0
    experiments: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        experiments.setdefault((job.dataset, "final" if job.final else job.variant), []).append(job)
    for (dataset, variant), group in experiments.items():
        cached = [cached_record(job, crop, args.records) for job in group]
        longest = max([longest, *(r["train_seconds"] + r["score_seconds"] for r in cached if r is not None)])
        to_train = [job for job, r in zip(group, cached, strict=True) if r is None]
        needed = sum(max(longest, 60 * (job.config.minutes or 0)) for job in to_train)  # a budget is a floor
        elapsed = time.perf_counter() - started
        if args.time_limit is not None and to_train and elapsed + needed > 60 * args.time_limit:
            skipped += [job.name for job in group]
            log.warning("%s/%s: skipped, the time limit of %s min would be passed", dataset, variant, args.time_limit)
            continue
        for job in group:
            t0 = time.perf_counter()
            record, reused = run_job(job, device=args.device, crop=crop, progress=args.progress, store=args.records)
            if not reused:
                trained += 1
                longest = max(longest, time.perf_counter() - t0)
            done[job.name] = job
            if job.final:
                results["final"][dataset] = record
            elif dataset == "em":
                results["em"].setdefault(variant, []).append(record)
            else:
                results["nuclei"][variant] = record
    return results, {"done": done, "skipped": skipped, "trained_now": trained, "reused": len(done) - trained}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    hardware = common.hardware(args.device)
    crop = QUICK["crop"] if args.quick else None
    make_config = functools.partial(experiment_config, preset=args.preset, steps=args.steps, sets=args.sets,
                                    minutes=args.minutes)  # fmt: skip
    jobs: list[Job] = []
    if "em" in args.datasets:
        variants = [v for v in args.variants if v not in ABLATIONS or "em" in args.ablation_datasets]
        jobs += em_jobs(args.data, variants, args.folds, make_config, args.out, crop, select=args.select,
                        ablation_folds=args.ablation_folds)  # fmt: skip
    if "nuclei" in args.datasets:
        variants = [v for v in args.variants
                    if v not in ABLATIONS or "nuclei" in args.ablation_datasets or v in NUCLEI_ONLY]
        jobs += nuclei_jobs(args.data, variants, make_config, args.out, fraction=args.val_fraction,
                            seed=args.split_seed, crop=crop, select=args.select)  # fmt: skip
    jobs.sort(key=lambda j: (VARIANTS.index(j.variant), DATASETS.index(j.dataset), j.fold or 0))
    if args.ship_minutes:  # last, so the page's experiments are done first
        jobs += final_jobs(args.data, args.datasets, make_config, args.out, args.ship_minutes,
                           fraction=args.val_fraction, seed=args.split_seed, crop=crop)  # fmt: skip
    results, book = run_jobs(jobs, args, crop)

    configs = {dataset: make_config(dataset, "unet") for dataset in args.datasets}
    records = ([r for v in results["em"].values() for r in v] + list(results["nuclei"].values())
               + list(results["final"].values()))  # fmt: skip
    results["meta"] = {
        "command": "python experiments/reproduce.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware, "device": args.device, "preset": args.preset,
        "steps": configs[args.datasets[0]].steps, "minutes": args.minutes, "select": args.select,
        "ship_minutes": args.ship_minutes,
        "quick": args.quick, "crop": crop,
        "configs": {dataset: dataclasses.asdict(config) for dataset, config in configs.items()},
        "val_fraction": args.val_fraction, "split_seed": args.split_seed, "time_limit": args.time_limit,
        "skipped": book["skipped"], "trained_now": book["trained_now"], "reused": book["reused"],
        "train_seconds": sum(r["train_seconds"] for r in records),
        "score_seconds": sum(r["score_seconds"] for r in records),
    }  # fmt: skip
    figures = write_figures(results, book["done"], args.figures, args.device)
    if args.ship:
        ship_models(results, book["done"], args.ship, device=args.device, store=args.records)
    results["meta"]["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)  # absent on a fresh clone that reuses every record
    _write_json(args.out / "results.json", results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.results) as tmp:
        tmp.write_text(page.results_page(results, args.results, figures))
    log.info("wrote %s (%s)", args.results, ", ".join(str(f) for f in figures.values()) or "no figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
