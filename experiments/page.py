"""Markdown written by ``reproduce.py``: the results page and the model cards.

Both are built from the records of the run (``results.json``), never from typed numbers;
the only constants are the paper's published scores, labelled as such.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common import (
    ABLATIONS, DATASETS, EM_DIR, EM_METRICS, LABELS, N_FOLDS, NUCLEI_DIR, NUCLEI_METRICS, NUCLEI_ONLY, PAPER_EM, PEERS,
    SEED_VARIANTS,
    VARIANTS,
    markdown_table, mean_nuclei_scores, mean_spread, minutes,
)  # fmt: skip

EM_HEADER = ["model", "V_rand ↑", "V_info ↑", "Rand error ↓", "pixel error ↓", "warping error ↓"]
NUCLEI_HEADER = ["model", "foreground IoU ↑", "SEG ↑", "F1 @ 0.5 ↑", "AP @ 0.5 ↑", "merged touching pairs ↓"]
#: The nuclei ablation row made without training: the baseline's own models, the recipe's options untuned.
FIXED_POSTPROCESS = ("the same models with the recipe's fixed post-processing, not tuned: p(cell) > 0.5, seed height "
                     "2 px (`tune_postprocess = false`; paired, the same probabilities)")
TITLES = {"em": "ISBI 2012 EM", "nuclei": "Nuclei"}


def config_summary(config: dict[str, Any]) -> str:
    """One line naming the fields of a ``TrainConfig`` (as a dict) that define a run."""
    grid = config["elastic_grid"]
    return (
        f"width {config['base_channels']}, depth {config['depth']}, {config['padding']} padding, "
        f"{config.get('norm') or 'no'} normalisation layers, tile "
        f"{config['tile']}, batch {config['batch_size']}, {config['optimizer']} lr {config['lr']} "
        f"({config['schedule']}), {budget(config)}, {_precision(config.get('precision', 'float32'))}, "
        f"w0 {config['w0']}, sigma {config['sigma']}, "
        f"elastic std {config['elastic_std']} px on a {grid}x{grid} grid, post-processing split "
        f"\"{config.get('split', 'none')}\", objects under {config.get('min_size', 0)} px removed"
        + _extras(config)
    )


#: How the recipe's ``class_balance`` reads in the recipe line.
_BALANCE_WORDS = {"dataset": "over all training images", "none": "not at all (w_c = 1)"}


def _extras(config: dict[str, Any]) -> str:
    """The fields added after the first records, named where they are not at their defaults."""
    extras = []
    if config.get("background", "as-is") != "as-is":
        extras.append(f"background \"{config['background']}\" (bright-background images inverted)"
                      if config["background"] == "dark" else f"background \"{config['background']}\"")  # fmt: skip
    if config.get("target", "binary") != "binary":
        extras.append(f"target \"{config['target']}\"")
    if config.get("precise_bn"):
        extras.append(f"precise BN over {config['precise_bn']} batches")
    if config.get("best_margin"):
        extras.append(f"best by {config.get('best_by', 'ap')} with margin {config['best_margin']:g}")
    if config.get("pick", "images") != "images":
        extras.append(f"training tiles from images in proportion to their {config['pick']}")
    if config.get("class_balance", "image") != "image":
        extras.append(f"class weights balanced {_BALANCE_WORDS[config['class_balance']]}")
    if config.get("tune_postprocess"):
        extras.append("threshold and seed height tuned on the validation images")
    return "".join(f", {e}" for e in extras)


def _precision(precision: str) -> str:
    if precision == "auto":
        return "precision `auto` (bfloat16 autocast where the CPU or GPU computes it natively, else float32)"
    return f"{precision} precision"


def budget(config: dict[str, Any]) -> str:
    """``"N steps"`` or ``"M minutes"`` (a time budget fixes the steps when the run starts)."""
    return f"{config['minutes']:g} minutes" if config.get("minutes") else f"{config['steps']} steps"


def em_row(label: str, records: Sequence[dict], run: str) -> list[str]:
    """Label and mean ± std over folds of each EM metric; ``run`` is ``"plain"`` or ``"tta"``."""
    return [label, *(mean_spread([r[run][m] for r in records], fmt) for m, (_, fmt) in EM_METRICS.items())]


def nuclei_row(label: str, images: Sequence[dict]) -> list[str]:
    """Label, mean ± std over images of each nuclei metric, and merged of touching pairs."""
    cells = [mean_spread([i[m] for i in images], fmt) for m, (_, fmt) in NUCLEI_METRICS.items()]
    touching, merged = sum(i["touching"] for i in images), sum(i["merged"] for i in images)
    return [label, *cells, f"{merged} of {touching}"]


def _records(value: dict | list) -> list[dict]:
    return value if isinstance(value, list) else [value]


def _made(record: dict) -> tuple[str, str]:
    """The machine a model was trained on and the day (UTC), or "not recorded"."""
    trained = record.get("trained", {})
    return trained.get("hardware", "not recorded"), trained["date"][:10] if "date" in trained else "not recorded"


def _made_on(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The distinct (machine, day) pairs of the page's models, in the order they appear."""
    return list(dict.fromkeys(_made(r) for d in DATASETS for v in results.get(d, {}).values() for r in _records(v)))


# --------------------------------------------------------------------------------------------
# Results page
# --------------------------------------------------------------------------------------------
def _header(results: dict[str, Any]) -> list[str]:
    meta, hw = results["meta"], results["meta"]["hardware"]
    lines = ["# Results: U-Net on real data", "",
             "*This page is written by `experiments/reproduce.py`; nothing on it is typed by hand. "
             "Rerun the command below to reproduce it.*", ""]  # fmt: skip
    if meta["quick"]:
        lines += [f"> **Smoke run (`--quick`)**: {meta['steps']} training steps on {meta['crop']} px crops. "
                  "The numbers only show that the machinery runs end to end; they say nothing about U-Net.",
                  ""]  # fmt: skip
    elif meta["device"] == "cpu" and meta.get("minutes"):
        made = _made_on(results)
        where = (f"on the same {made[0][0]}" if len(made) == 1 and made[0][0] != "not recorded" else
                 f"on {len({m for m, _ in made})} machine(s) over {len({d for _, d in made})} day(s) (*What ran* "
                 "names each model's, where its record does; a cloud machine's speed can change between days, so "
                 "compare steps/s: rows of different speeds are not an equal-wall-clock comparison)")  # fmt: skip
        lines += [f"> **CPU run at equal wall-clock.** Every model, biounet's and the peers', trained for "
                  f"{meta['minutes']:g} minutes {where} (the steps that fit were timed on each "
                  "model's first steps, then fixed; see *What ran*); the paper trained for 10 hours on a GPU. "
                  "Differences between rows of this size may be noise.", ""]  # fmt: skip
    elif meta["device"] == "cpu":
        lines += [f"> **CPU-scale run.** `{meta['preset']}` preset, {meta['steps']} training steps per model, on a "
                  "shared CPU; the paper trained for 10 hours on a GPU. These numbers show what this budget gives, "
                  "not what U-Net can do, and differences between rows of this size may be noise. The load of the "
                  "shared CPU varied during the run, so training times of different rows are not comparable.",
                  ""]  # fmt: skip
    gpu = f"; GPU {hw['gpu']}" if "gpu" in hw else ""
    monai = f", MONAI {hw['monai']}" if "monai" in hw else ""
    cellpose = results["nuclei"].get("cellpose", {}).get("peer", {}).get("cellpose")
    monai += f", Cellpose {cellpose} (its own environment)" if cellpose else ""
    return lines + [
        "## How these numbers were made", "",
        f"- Command: `BIOUNET_DATA=<data folder> {meta['command']}`",
        f"- Date: {meta['date']}. Wall-clock time, measured when each model was made: training "
        f"{minutes(meta['train_seconds'])}, prediction and scoring {minutes(meta['score_seconds'])}. This "
        f"invocation trained {meta['trained_now']} model(s) in {minutes(meta['wall_seconds'])} and reused "
        f"{meta['reused']} from earlier invocations with identical settings.",
        f"- Hardware of this invocation: {hw['cpu']}; load average at start {hw['load']}{gpu}; device "
        f"`{hw['device']}`. Records reused from earlier invocations may come from another machine: *What ran* "
        "names each model's and the day; only rows made on the same machine compare at equal minutes, and a cloud "
        "machine of the same name can run at other speeds on other days (compare a model's steps/s across rows).",
        f"- Software: Python {hw['python']}, torch {hw['torch']}{monai}",
        *(f"- Recipe, {TITLES[d]} (`{meta['preset']}` preset + `configs/{d}.toml`): {config_summary(c)}"
          for d, c in meta["configs"].items()),
        "",
    ]  # fmt: skip


def _what_ran(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    rows = []
    for dataset in DATASETS:
        for variant, value in results[dataset].items():
            records = _records(value)
            seconds = [r["train_seconds"] for r in records]
            key = records[0]["key"]
            where = (f"folds {', '.join(str(r['key']['fold']) for r in records)}" if dataset == "em"
                     else f"{len(key['train'])} train / {len(key['test'])} validation images")  # fmt: skip
            steps = [r.get("steps_run", r["key"]["config"]["steps"]) for r in records]
            made = [_made(r) for r in records]
            machines, days = dict.fromkeys(m for m, _ in made), dict.fromkeys(d for _, d in made)
            rates = [n / s for n, s in zip(steps, seconds, strict=True)]
            rows.append([TITLES[dataset], LABELS[variant], where, budget(key["config"]),
                         f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}",
                         f"{records[0]['parameters']:,}", minutes(sum(seconds)),
                         minutes(float(np.mean(seconds))), f"{np.mean(rates):.2f}", "; ".join(machines),
                         ", ".join(days)])  # fmt: skip
    header = ["data", "model", "trained on", "budget", "steps", "parameters", "training time", "per model",
              "steps/s", "machine", "trained"]
    lines = ["### What ran", "", markdown_table(header, rows), ""]
    skipped = list(dict.fromkeys(name.rsplit("/fold", 1)[0] for name in meta["skipped"]))
    if skipped:
        lines += [f"Not run: they would have ended after this invocation's `--time-limit` of {meta['time_limit']} min "
                  "(estimated from the longest model so far): " + ", ".join(f"`{s}`" for s in skipped) + ". Which "
                  "experiments fit the limit depends on the machine's speed; without `--time-limit` all run.",
                  ""]  # fmt: skip
    absent = [f"`{d}/{v}`" for d in DATASETS for v in VARIANTS
              if v not in results[d] and f"{d}/{v}" not in skipped and (d == "nuclei" or v not in NUCLEI_ONLY)]
    if absent:
        lines += ["Not selected in this run (see `--datasets` and `--variants`): " + ", ".join(absent) + ".", ""]
    return lines


def _em_section(records: list[dict], figure: str | None) -> list[str]:
    folds = ", ".join(f"fold {r['key']['fold']}: slices {r['key']['test'][0]}-{r['key']['test'][-1]}" for r in records)
    paper = ["paper (challenge test set, different split)", "–", "–", f"{PAPER_EM['rand_error']}",
             f"{PAPER_EM['pixel_error']}", f"{PAPER_EM['warping_error']}"]  # fmt: skip
    per_fold = [[r["key"]["fold"], tta, *(format(r[run][m], fmt) for m, (_, fmt) in EM_METRICS.items())]
                for r in records for tta, run in (("no", "plain"), ("yes", "tta"))]  # fmt: skip
    lines = [
        "## ISBI 2012 EM: cross-validation", "",
        f"The 25 labelled slices of `$BIOUNET_DATA/{EM_DIR}` in {N_FOLDS} folds of 5 consecutive slices "
        "(neighbouring slices look alike, so blocks rather than interleaved slices); each model trains on the other "
        f"20{_select_note(records)}. Run here: {folds}. Scores follow the challenge's Fiji evaluation (`biounet.metrics.isbi_scores`): per "
        "threshold the mean over a fold's 5 slices, then the best threshold, one per fold. Rand error = 1 - V_rand, "
        "pixel error = 1 - best pixel F-score. Mean ± standard deviation over folds. TTA: the mean of the 8 flips "
        "and 90-degree rotations.", "",
        markdown_table(EM_HEADER, [em_row(LABELS["unet"], records, "plain"),
                                   em_row(LABELS["unet"] + " + TTA", records, "tta"), paper]),
        "",
        "The paper's row is **not comparable**: it is the ISBI 2012 challenge's 30-slice test set, scored by the "
        "challenge's evaluation of 2015, after 10 hours of training on a GPU. Ours is cross-validation on the 25 "
        "public training slices (5 of the 30 training slices are held back by our data curator and are not here).",
        "",
        "Per fold:", "",
        markdown_table(["fold", "TTA", *EM_HEADER[1:]], per_fold),
        "",
    ]  # fmt: skip
    if figure:
        lines += [f"![EM slice: input, prediction, ground truth, errors]({figure})", ""]
    return lines


def _select_note(records: list[dict]) -> str:
    n_val = len(records[0]["key"].get("val", []))
    return f" ({20 - n_val} of them, and {n_val} to pick its best model: see *Model selection*)" if n_val else ""


def _nuclei_section(record: dict, meta: dict, figure: str | None) -> list[str]:
    val = record["plain"]
    counts = {c: sum(1 for i in val if i["category"] == c) for c in sorted({i["category"] for i in val})}
    by_category = [nuclei_row(f"{c} ({n})", [i for i in val if i["category"] == c]) for c, n in counts.items()]
    lines = [
        "## Touching nuclei (2018 Data Science Bowl subset)", "",
        "**Stand-in.** The paper's cell experiments used the Cell Tracking Challenge sets PhC-U373 and DIC-HeLa, "
        "which cannot be obtained here; 120 nuclei images of the 2018 Data Science Bowl "
        f"(`$BIOUNET_DATA/{NUCLEI_DIR}`, three imaging types) stand in for them.", "",
        f"Split: stratified by the manifest's category, {meta['val_fraction']:.0%} of each category held out "
        f"(rounded up), seed {meta['split_seed']} (`common.stratified_split`): {len(record['key']['train'])} "
        f"training and {len(val)} validation images (" + ", ".join(f"{n} {c}" for c, n in counts.items()) + "). "
        "Colour images are read as luminance. Objects: `biounet.postprocess.probabilities_to_labels` "
        + _objects_words(record) + ", the labels `biounet predict` writes. Scores are per validation "
        "image, mean ± standard deviation over images. A touching pair is two true nuclei with 4-adjacent "
        "pixels; it is merged when one predicted object covers more than half of each.", "",
        markdown_table(NUCLEI_HEADER, [nuclei_row(LABELS["unet"], val),
                                       nuclei_row(LABELS["unet"] + " + TTA", record["tta"])]),
        "",
        "By category (no TTA):", "",
        markdown_table(["category", *NUCLEI_HEADER[1:]], by_category),
        "",
    ]  # fmt: skip
    if figure:
        lines += [f"![Nuclei image: input, prediction, ground truth, errors]({figure})", ""]
    return lines + ["<details><summary>Validation image ids</summary>", "",
                    ", ".join(f"`{n}`" for n in record["key"]["test"]), "", "</details>", ""]  # fmt: skip


def _objects_words(record: dict) -> str:
    """How the nuclei section's objects are made: the recipe's post-processing, tuned or fixed."""
    config = record["key"]["config"]
    fixed = f"`split = \"{config['split']}\"`, `min_size = {config.get('min_size', 0)}`"
    if not config.get("tune_postprocess"):
        return f"on p(cell) > 0.5 with the recipe's post-processing ({fixed}; the peers' probabilities get the same)"
    tuned = ", ".join(f"`{k} = {v}`" for k, v in record["postprocess"]["plain"].items()
                      if k in ("threshold", "min_seed_height", "seed_threshold"))  # fmt: skip
    return (f"with the recipe's post-processing ({fixed}) and the threshold and seed setting each U-Net tuned on its "
            f"validation images after training (`tune_postprocess`; this one: {tuned or 'the defaults'}); the peers' "
            "probabilities get the untuned options (p(cell) > 0.5, seed height 2 px)")


def _fixed_rows(results: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The baseline's models scored again with the recipe's fixed post-processing: a row and a line per seed.

    Paired: the same probabilities, so the difference is the tuning's alone, not the run's.
    """
    runs = [v for v in ("unet", *SEED_VARIANTS["unet"]) if "fixed" in results["nuclei"].get(v, {})]
    if "unet" not in runs:
        return [], []
    row = [FIXED_POSTPROCESS, *nuclei_row("fixed", results["nuclei"]["unet"]["fixed"])[1:]]
    def pair(v: str) -> str:
        tuned, fixed = (mean_nuclei_scores(results["nuclei"][v][run]) for run in ("plain", "fixed"))
        return f"{tuned['ap']:.3f} / {fixed['ap']:.3f} (merged {tuned['merged']} / {fixed['merged']})"

    seeds = ", ".join(str(results["nuclei"][v]["key"]["config"]["seed"]) for v in runs)
    means = [np.mean([mean_nuclei_scores(results["nuclei"][v][run])["ap"] for v in runs]) for run in ("plain", "fixed")]
    return [row], [f"- post-processing tuned / fixed, the same models, seeds {seeds}: AP @ 0.5 "
                   + ", ".join(pair(v) for v in runs) + f" (means {means[0]:.3f} / {means[1]:.3f})"]


def _ablation_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Ablations", "",
             "Each row changes one thing against the baseline (one setting, or the fields that make it, named in "
             "the row), on the same folds or split, with the same budget and seeds (`configs/ablation-*.toml`), "
             "but for the rows that change the seed: their spread is the run-to-run noise that a difference "
             "between rows must exceed; "
             "the baseline row is its mean over the folds the ablations ran on. The TTA ablation is the baseline's "
             "with/without-TTA pair above. "
             "*Seam* is the largest difference of p(cell) on the first held-out slice between prediction tiled at "
             "the training tile and prediction in one tile (largest over folds): zero up to float rounding for "
             "valid padding (exact overlap-tile), not for same padding.", ""]  # fmt: skip
    for dataset in DATASETS:
        variants = [v for v in ("unet", *ABLATIONS) if v in results[dataset]]
        if not set(variants) & set(ABLATIONS):
            continue
        rows = []
        for v in variants:
            change = "none (baseline)" if v == "unet" else ABLATIONS[v]
            if dataset == "em":
                folds = {r["key"]["fold"] for r in results["em"][v]}
                ablated_folds = {r["key"]["fold"] for a in ABLATIONS for r in results["em"].get(a, [])}
                records = [r for r in results["em"][v] if v != "unet" or r["key"]["fold"] in (ablated_folds or folds)]
                seam = format(max(r["seam"] for r in records), ".1e")
                where = ", ".join(str(r["key"]["fold"]) for r in records)
                rows.append([change, where, *em_row(v, records, "plain")[1:], seam])
            else:
                rows.append([change, *nuclei_row(v, results["nuclei"][v]["plain"])[1:]])
        fixed_rows, fixed_lines = _fixed_rows(results) if dataset == "nuclei" else ([], [])
        rows[1:1] = fixed_rows
        header = ["change", *(["folds", *EM_HEADER[1:], "seam"] if dataset == "em" else NUCLEI_HEADER[1:])]
        lines += [f"**{TITLES[dataset]}**", "", markdown_table(header, rows), ""]
        notes = [line for line in _seed_spread(results, dataset) if line] + fixed_lines
        lines += notes + [""] if notes else []
    return lines


def _seed_spread(results: dict[str, Any], dataset: str) -> list[str]:
    """One line per recipe trained with several seeds: its score for each seed, their mean and range."""
    name, score = ("V_rand", "v_rand") if dataset == "em" else ("AP @ 0.5", "ap")
    lines = []
    for base, others in SEED_VARIANTS.items():
        runs = [v for v in (base, *others) if v in results[dataset]]
        if len(runs) < 2:
            continue
        if dataset == "em":  # the fold the seed rows ran on
            folds = {r["key"]["fold"] for v in runs[1:] for r in results["em"][v]}
            values = [r["plain"][score] for v in runs for r in results["em"][v] if r["key"]["fold"] in folds]
        else:
            values = [float(np.mean([i[score] for i in results["nuclei"][v]["plain"]])) for v in runs]
        seeds = ", ".join(str(results[dataset][v][0]["key"]["config"]["seed"] if dataset == "em"
                              else results[dataset][v]["key"]["config"]["seed"]) for v in runs)  # fmt: skip
        lines.append(f"- {'the baseline' if base == 'unet' else f'`{base}`'}, seeds {seeds}: {name} "
                     f"{', '.join(f'{x:.3f}' for x in values)} (mean {np.mean(values):.3f}, range "
                     f"{min(values):.3f}-{max(values):.3f})")  # fmt: skip
    return lines + [""] if lines else []


def _peer_section(results: dict[str, Any]) -> list[str]:
    same = ("the same wall-clock minutes on the same machine" if results["meta"].get("minutes")
            else "the same number of steps")  # fmt: skip
    lines = ["## Same-budget peers: MONAI BasicUNet and Cellpose", "",
             "MONAI's `BasicUNet` (zero padding, instance norm, LeakyReLU; widths 16, 32, 64, 128, 256, 16: four "
             "poolings) trained the way MONAI users train it (`experiments/peer_monai.py`: 256 px crops in batches "
             "of 4, Adam at a constant 1e-4, float32) with MONAI's own augmentation (`RandSpatialCropd`, flips, "
             "`RandRotate90d`, `Rand2DElasticd`, intensity scaling, shifting and noise) and `DiceCELoss`, on the "
             f"same images, for {same}; predicted with `sliding_window_inference` (25 % overlap, Gaussian blending) "
             "and scored by the same functions. No TTA on any row.", ""]  # fmt: skip
    cellpose = results["nuclei"].get("cellpose")
    if cellpose:
        peer = cellpose.get("peer", {})
        lines += ["On the nuclei, Cellpose (`experiments/peer_cellpose.py`; Cellpose "
                  f"{peer.get('cellpose', '–')} in its own environment) is trained from random weights with its own "
                  "`train_seg` and its defaults (the `CPnet` of widths 32-256 with its style vector, flow and cell "
                  "probability losses, AdamW at 0.005 with its warm-up and halvings, 224 px crops in batches of 8 "
                  "with its rotation and rescaling, objects rescaled to 17 px, its nuclei models' size) on the same "
                  f"luminance images, one batch per epoch, for {same} "
                  f"({peer.get('epochs', '–')} batches; its flows and budget probes are not counted, as biounet's "
                  "weight maps are not), and segmented by `CellposeModel.eval` with its default thresholds.",
                  ""]  # fmt: skip
    for dataset in DATASETS:
        if not any(p in results[dataset] for p in PEERS):
            continue
        rows = []
        for v in (v for v in ("unet", *PEERS) if v in results[dataset]):
            value = results[dataset][v]
            rows.append(em_row(LABELS[v], value, "plain") if dataset == "em" else nuclei_row(LABELS[v], value["plain"]))
        header = EM_HEADER if dataset == "em" else NUCLEI_HEADER
        lines += [f"**{TITLES[dataset]}**", "", markdown_table(header, rows), ""]
    return lines


def _selection_section(results: dict[str, Any]) -> list[str]:
    """``best`` (picked on held-out training images by the task's score) beside ``last``, per fold or split."""
    lines = ["## Model selection: best against last", "",
             f"Each U-Net held out {results['meta']['select']:.0%} of its training images (rounded up) and was "
             "validated on them every `val_every` steps; `best` is the model with the highest validation score of "
             "its task (`best_by`: V_rand for EM, AP @ 0.5 for nuclei), or a later one at most `best_margin` below "
             "it (the recipe line above names the margin where it is not 0), `last` the final one. Both are scored "
             "on the same held-out fold or split as above, without TTA.", ""]  # fmt: skip
    em = [r for r in results["em"].get("unet", []) if "best" in r]
    if em:
        rows = [[r["key"]["fold"], r.get("best_step", "–"), r["steps_run"],
                 *(f"{r['best'][m]:.4f} / {r['plain'][m]:.4f}" for m in ("v_rand", "v_info", "pixel_error"))]
                for r in em]  # fmt: skip
        diffs = [r["best"]["v_rand"] - r["plain"]["v_rand"] for r in em]
        lines += [f"**{TITLES['em']}** (best / last)", "",
                  markdown_table(["fold", "best at step", "of steps", "V_rand", "V_info", "pixel error"], rows), "",
                  f"V_rand of best minus last: mean {np.mean(diffs):+.4f}, worst {min(diffs):+.4f}.", ""]
    nuclei = results["nuclei"].get("unet")
    if nuclei and "best" in nuclei:
        lines += [f"**{TITLES['nuclei']}** (best at step {nuclei.get('best_step', '–')} of {nuclei['steps_run']})",
                  "", markdown_table(NUCLEI_HEADER, [nuclei_row("best", nuclei["best"]),
                                                     nuclei_row("last", nuclei["plain"])]), ""]  # fmt: skip
    return lines


def results_page(results: dict[str, Any], page: Path, figures: dict[str, Path]) -> str:
    """The Markdown of the results page at ``page``; ``figures`` maps ``"em"``/``"nuclei"`` to PNG paths."""
    rel = {k: os.path.relpath(v, page.parent) for k, v in figures.items()}
    lines = _header(results) + _what_ran(results)
    if "unet" in results["em"]:
        lines += _em_section(results["em"]["unet"], rel.get("em"))
    if "unet" in results["nuclei"]:
        lines += _nuclei_section(results["nuclei"]["unet"], results["meta"], rel.get("nuclei"))
    if any(v in results[d] for d in DATASETS for v in ABLATIONS):
        lines += _ablation_section(results)
    if any(p in results[d] for d in DATASETS for p in PEERS):
        lines += _peer_section(results)
    if results["meta"].get("select") and any("best" in r for r in _records(results["em"].get("unet", []))
                                              + _records(results["nuclei"].get("unet", []))):
        lines += _selection_section(results)
    if results.get("final"):
        lines += _shipped_section(results)
    return "\n".join(lines).rstrip() + "\n"


def _shipped_section(results: dict[str, Any]) -> list[str]:
    """The models trained on every labelled image (``--ship-minutes``): how long, and their estimate."""
    rows = []
    for dataset in DATASETS:
        record = results["final"].get(dataset)
        if record is None:
            continue
        trained = record.get("trained", {})
        rows.append([f"`{'em-membranes' if dataset == 'em' else 'nuclei'}`", TITLES[dataset],
                     f"all {len(record['key']['train'])}", budget(record["key"]["config"]), str(record["steps_run"]),
                     minutes(record["train_seconds"]) + (" (last invocation)" if record.get("resumed") else ""),
                     f"{trained.get('date', '–')}, {trained.get('hardware', '–')} (load {trained.get('load', '–')})",
                     ("none run" if "unet" not in results[dataset]
                      else "the cross-validation above" if dataset == "em" else "the split above")])  # fmt: skip
    header = ["model", "data", "images", "budget", "steps", "training time", "trained", "estimate of its accuracy"]
    return ["## Shipped models", "",
            "The baseline recipe above, trained on every labelled image (nothing held out, the last model ships; "
            "`--ship-minutes`). No image is left to score them on, so their accuracy is estimated by the same "
            "recipe's held-out scores above, at its shorter budget; the model cards record the scores each "
            "shipped file reproduces on images it was trained on.", "",
            markdown_table(header, rows), ""]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------
def model_card(name: str, job_name: str, record: dict, provenance: dict, results: dict) -> str:
    """The ``MODEL_CARD.md`` of a shipped model (data, recipe, scores, limits, use)."""
    meta, evaluation = results["meta"], provenance["evaluation"]
    key, em = record["key"], record["key"]["dataset"] == "em"
    final = evaluation.get("trained_on_images", False)
    metrics = EM_METRICS if em else NUCLEI_METRICS
    rows = [["no", *(format(evaluation["scores"][m], f) for m, (_, f) in metrics.items())]]
    if evaluation["scores_tta"]:
        rows.append(["yes", *(format(evaluation["scores_tta"][m], f) for m, (_, f) in metrics.items())])
    header = ["TTA", *(EM_HEADER[1:] if em else NUCLEI_HEADER[1:5])]
    scored_on = (f"On the held-out images above ({provenance['selection']})" if not final else
                 f"On {len(key['test'])} of the images it was trained on ({', '.join(n[:12] for n in key['test'][:5])}"
                 f"{', …' if len(key['test']) > 5 else ''}; all in `config.json`): a check that this file reproduces them, **not** an "
                 "estimate of its accuracy on new images (see the estimate below)")  # fmt: skip
    if final:
        data, caveat = _final_data_and_estimate(key, evaluation, results)
    elif em:
        data = (f"ISBI 2012 EM training slices (`{EM_DIR}`), trained on the {len(key['train'])} slices outside fold "
                f"{key['fold']}, scored on its held-out slices {', '.join(key['test'])}.")  # fmt: skip
        fold_records = results["em"][key["variant"]]
        spread = ", ".join(f"{m} {mean_spread([r['plain'][m] for r in fold_records], f)}"
                           for m, (_, f) in metrics.items())  # fmt: skip
        caveat = (f"Across the {len(fold_records)} fold(s) run of this recipe: {spread}. This model was picked as the "
                  "best fold by its own held-out V_rand, so its row above is optimistic; the cross-validation mean is "
                  "the fair estimate.")  # fmt: skip
    else:
        data = (f"2018 Data Science Bowl nuclei subset (`{NUCLEI_DIR}`): {len(key['train'])} training images, scored "
                f"on the {len(key['test'])} validation images of the split stratified by category (seed "
                f"{meta['split_seed']}); colour images as luminance. Scores are means over the images; merged "
                f"touching pairs: {evaluation['scores']['merged']} of {evaluation['scores']['touching']}.")  # fmt: skip
        images = record["plain"]
        categories = sorted({i["category"] for i in images})
        by_category = [nuclei_row(f"{c} ({sum(i['category'] == c for i in images)})",
                                  [i for i in images if i["category"] == c]) for c in categories]  # fmt: skip
        caveat = "By category (no TTA):\n\n" + markdown_table(["category", *NUCLEI_HEADER[1:]], by_category)
    trained = record.get("trained", {})
    where = "a shared CPU" if record["device"] == "cpu" else str(record["device"])
    if "hardware" in trained:
        where += f" ({trained['hardware']}, load {trained.get('load', '–')}, {trained.get('date', '')})"
    limits = [
        f"Trained for {record.get('steps_run', key['config']['steps'])} steps with the `{meta['preset']}` preset on {where} "
        f"({budget(key['config']) if record.get('resumed') else minutes(record['train_seconds'])}); the paper "
        "trained for 10 hours on a GPU. Expect worse results than a full run.",
        "It has only seen the images described under Data; other microscopes, stains or pixel sizes need retraining.",
    ]
    if meta["crop"]:
        limits.insert(0, f"SMOKE-TEST MODEL: trained on {meta['crop']} px crops for a few steps. Do not use.")
    if not em:
        held_out = (results["nuclei"]["unet"]["plain"] if "unet" in results["nuclei"] else []) if final else record["plain"]
        scores = {c: mean_nuclei_scores([i for i in held_out if i["category"] == c])["f1"]
                  for c in sorted({i["category"] for i in held_out})}  # fmt: skip
        weak = [f"{c} (F1 @ 0.5 {f1:.2f})" for c, f1 in scores.items() if f1 < 0.5]
        if weak:
            limits.append(f"Imaging types it handles badly at this budget: {', '.join(weak)}; check the scores by "
                          "category above before using it on such images.")  # fmt: skip
        split = key["config"]["split"]
        how = ("only by the predicted background lines between them" if split == "none"
               else f"by the predicted background lines and a `{split}` watershed")  # fmt: skip
        limits.append(f"Touching nuclei are kept apart {how}; see the merged pairs above before relying on object "
                      "counts.")  # fmt: skip
    return "\n".join([
        f"# `{name}`: biounet U-Net for {'EM membranes' if em else 'nuclei'}", "",
        "*Written by `experiments/reproduce.py`.*", "",
        "## Data", "", data, "",
        "## Recipe", "",
        f"`{job_name}` of `{meta['command']}`: {config_summary(key['config'])}. Parameters: {record['parameters']:,}. "
        f"Input normalisation: percentiles {key['config']['normalization']} per image.{_tuned_words(evaluation)}", "",
        "## Scores", "",
        f"{scored_on}; recorded in `config.json` (`provenance.evaluation`) and checked by "
        "`tests/test_shipped_models.py`.", "",
        markdown_table(header, rows), "", caveat, "",
        "## Limits", "", *(f"- {item}" for item in limits), "",
        "## Use", "", "```", f"biounet predict --model {name} IMAGE -o OUT", *_export_lines(name, key["config"]), "```",
        "",
    ])  # fmt: skip


def _tuned_words(evaluation: dict) -> str:
    """The card's sentence on post-processing taken from the split's run (``ship_postprocess``), or nothing."""
    tuned = evaluation.get("postprocess")
    if not tuned:
        return ""
    options = ", ".join(f"`{k} = {v}`" for k, v in tuned["options"].items())
    return (f" Post-processing: {options}, tuned by `{tuned['tuned_by']}` (the same recipe) on {tuned['on']}; this "
            "model was trained on every image, so none was left to tune on.")


def _export_lines(name: str, config: dict) -> list[str]:
    """The card's export commands: a model that inverts bright backgrounds needs one package per kind of image."""
    if config.get("background") != "dark":
        return [f"biounet export {name} -o {name}.zip"]
    return [f"biounet export {name} -o {name}-fluorescence.zip --background dark    # bright nuclei, dark background",
            f"biounet export {name} -o {name}-brightfield.zip --background bright  # dark nuclei, bright background"]


def _final_data_and_estimate(key: dict, evaluation: dict, results: dict) -> tuple[str, str]:
    """The Data line and the estimate paragraph of a model trained on every labelled image."""
    em = key["dataset"] == "em"
    n, budget_ = len(key["train"]), budget(key["config"])
    if em:
        data = (f"All {n} labelled ISBI 2012 EM training slices (`{EM_DIR}`), {budget_}; no image held out, the "
                "last model ships.")  # fmt: skip
    else:
        data = (f"All {n} images of the 2018 Data Science Bowl nuclei subset (`{NUCLEI_DIR}`), {budget_}; colour "
                "images as luminance; no image held out, the last model ships.")  # fmt: skip
    estimate = evaluation.get("estimate")
    if not estimate:
        return data, "No held-out estimate of this recipe was run with it."
    length = (f"{estimate['minutes']:g} minutes" if estimate.get("minutes")
              else f"{', '.join(str(n) for n in sorted(set(estimate['steps'])))} steps")  # fmt: skip
    if em:
        fold_records = results["em"]["unet"]
        spread = ", ".join(f"{m} {mean_spread([r['plain'][m] for r in fold_records], f)}"
                           for m, (_, f) in EM_METRICS.items())  # fmt: skip
        return data, (f"**Estimate.** The same recipe, trained for {length} on the slices outside each fold and "
                      f"scored on the held-out fold ({len(fold_records)} folds, last models, no TTA): {spread}. This "
                      f"model trained {budget_} on all slices; no slice is left to measure it on.")  # fmt: skip
    images = results["nuclei"]["unet"]["plain"]
    rows = [nuclei_row(f"{c} ({sum(i['category'] == c for i in images)})", [i for i in images if i["category"] == c])
            for c in sorted({i["category"] for i in images})]  # fmt: skip
    rows.append(nuclei_row(f"all ({len(images)})", images))
    return data, (f"**Estimate.** The same recipe, trained for {length} on the split's "
                  f"{len(results['nuclei']['unet']['key']['train'])} training images and scored on its "
                  f"{len(images)} validation images (last model, no TTA):\n\n"
                  + markdown_table(["category", *NUCLEI_HEADER[1:]], rows))  # fmt: skip
