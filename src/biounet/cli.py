"""Command-line interface: ``biounet <command> ...`` and ``python -m biounet``.

Only the standard library is imported at module level so that ``biounet --help`` answers
instantly; each command imports what it needs inside its handler.  Every command turns an
expected failure (:class:`biounet.errors.BiounetError`, ``OSError``, ``ValueError``) into one
clear line on stderr and a non-zero exit status; ``--debug`` shows the traceback instead. The
library's messages name its own arguments; where an error is about one (``error.option``),
the line ends with the flag that sets it (:data:`FLAGS`): the flags' wording lives here only.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("biounet")

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------------
# predict (issue 2)
# --------------------------------------------------------------------------------------------
PREDICT_OUTPUTS = ("probabilities", "labels", "overlay", "objects")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images with a saved model (overlap-tile)",
        description="Segment images of any size tile by tile. MODEL is a model folder or the name of a "
        "shipped model (or give it with --model and list only inputs). An INPUT is an image file, a Zarr/OME-Zarr "
        "image or a folder of them (filtered by --pattern, searched with --recursive; files named like the "
        "outputs of an earlier run, *_labels.* *_probabilities.* *_overlay.png, and the output folder are skipped).",
    )
    p.add_argument("paths", nargs="+", metavar="[MODEL] INPUT", help="model (unless --model), then images and folders")
    p.add_argument("-m", "--model", help="model folder or shipped model name")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if missing)")
    p.add_argument("--tile", type=int, help="largest input tile per axis in px (default 700 for 2D models)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (default cpu)")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto (default): bfloat16 where the CPU or GPU computes it natively (about 2x faster on such "
                   "CPUs, the same segmentation: docs/benchmarks.md), else float32")
    p.add_argument(
        "--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
        help="run the network through torch.compile (MODE default; reduce-overhead adds CUDA graphs); "
        "pays off for many tiles on a GPU",
    )  # fmt: skip
    p.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    p.add_argument("--channel-axis", type=int, help="axis of the input holding the channels (else read from the file)")
    p.add_argument(
        "--chunk", type=int, metavar="PX",
        help="stream every input chunk by chunk (PX output pixels per axis, e.g. 2048); Zarr/OME-Zarr inputs and "
        "TIFFs over 8192x8192 px are always streamed (the same segmentation, without --tta and overlays)",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=("auto", "tiff", "ome-zarr"), default="auto", dest="output_format",
        help="file format of probabilities and labels (default auto: the input's, OME-Zarr for Zarr inputs, else "
        "TIFF, tiled BigTIFF when streamed); OME-Zarr keeps the labels in the probabilities' labels/ group, as "
        "napari reads them",
    )  # fmt: skip
    p.add_argument("--pyramid", type=int, default=1, metavar="LEVELS", dest="levels",
                   help="resolution levels of OME-Zarr outputs (default 1; e.g. 4 for a pyramid that viewers browse "
                   "fast)")  # fmt: skip
    p.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="stream on a dask.distributed cluster, e.g. tcp://10.0.0.5:8786 (workers must see the files)",
    )  # fmt: skip
    p.add_argument(
        "--save", default="probabilities,labels", help=f"comma-separated outputs among {','.join(PREDICT_OUTPUTS)} "
        "(objects: a CSV of one row per object, as --measure)",
    )
    p.add_argument("--measure", action="store_true", help="also write <stem>_objects.csv: label, area, centroid, "
                   "bounding box and mean intensity (of the input before normalisation) of every object")
    p.add_argument("--pattern", metavar="GLOB", help="only the images of folders whose name matches, e.g. '*.tif' "
                   "or '*_dapi.*' (case-insensitive)")
    p.add_argument("-r", "--recursive", action="store_true", help="search the subfolders of folders too")
    p.add_argument(
        "--name", default="{stem}_{kind}{ext}", metavar="TEMPLATE",
        help="output names (default {stem}_{kind}{ext}): {stem} the input's name without suffix, {kind} "
        "probabilities/labels/overlay/objects, {ext} .tif/.png/.csv/.ome.zarr (last), {dir} the input's subfolder "
        "in the folder it was found in; e.g. '{dir}/{stem}_{kind}{ext}' mirrors the subfolders",
    )  # fmt: skip
    p.add_argument("--threshold", type=float, help="foreground probability threshold, instead of the model's "
                   "(default 0.5)")
    p.add_argument("--min-size", type=int, metavar="PX", help="drop objects below this many pixels, instead of the "
                   "model's")
    p.add_argument("--split", choices=("none", "distance", "probability", "border"),
                   help="how touching objects are separated, instead of the model's")  # fmt: skip
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize", metavar="LOW,HIGH", help="normalise each image between these percentiles "
                      "instead of the model's, e.g. 1,99.8")
    norm.add_argument("--no-normalize", action="store_true", help="feed the pixels as they are (no normalisation)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist already (never an input, "
                   "and never the output of another input of the same call)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    # Idle OpenMP threads sleep rather than spin (read when torch loads): up to 4x faster on a
    # shared 2-core machine, never slower there (docs/benchmarks.md, "CPU tiling").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from biounet.prediction import PredictOptions, predict_files

    paths = list(args.paths)
    model = args.model if args.model else paths.pop(0)
    if not paths:
        raise ValueError("no input images given")
    save = tuple(s.strip() for s in args.save.split(",") if s.strip())
    save += ("objects",) if args.measure and "objects" not in save else ()
    unknown = sorted(set(save) - set(PREDICT_OUTPUTS))
    if unknown or not save:
        raise ValueError(f"--save: unknown output(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PREDICT_OUTPUTS)}")
    if args.chunk is not None and args.chunk < 1:
        raise ValueError(f"--chunk must be a positive number of pixels, got {args.chunk}")
    normalization: Any = "none" if args.no_normalize else "model"
    if args.normalize is not None:
        try:
            low, high = (float(v) for v in args.normalize.split(","))
        except ValueError:
            raise ValueError(f"--normalize takes two percentiles LOW,HIGH such as 1,99.8; got {args.normalize!r}") from None
        normalization = (low, high)
    postprocess = {k: v for k, v in (("threshold", args.threshold), ("min_size", args.min_size), ("split", args.split))
                   if v is not None}  # fmt: skip
    options = PredictOptions(tile=args.tile, batch_size=args.batch_size, device=args.device, precision=args.precision,
                             compile=args.compile or False, tta=args.tta, progress=not args.no_progress)  # fmt: skip
    report = predict_files(
        model,
        [Path(p) for p in paths],
        Path(args.output),
        options=options,
        save=save,
        channel_axis=args.channel_axis,
        chunk=args.chunk,
        scheduler=args.scheduler,
        debug=args.debug,
        overwrite=args.overwrite,
        pattern=args.pattern,
        recursive=args.recursive,
        name=args.name,
        postprocess=postprocess,
        normalization=normalization,
        output_format=args.output_format,
        levels=args.levels,
    )
    return 0 if not report.failed else 1


# --------------------------------------------------------------------------------------------
# export (issue 14)
# --------------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    from biounet.export import FORMATS  # standard library only: --help stays instant

    p = sub.add_parser(
        "export",
        help="export a model for Fiji/deepImageJ, QuPath, ilastik, napari (bioimage.io), TorchScript or ONNX",
        description="Export MODEL (a model folder or the name of a shipped model). bioimageio: a bioimage.io model "
        "package (OUT ending in .zip: zipped, else a folder) with pytorch_state_dict, TorchScript and ONNX weights, "
        "test tensors, a cover and the model card, tested with bioimageio.core before it is written. torchscript, "
        "onnx: one file taking normalised images and returning class probabilities (docs/export.md).",
    )
    p.add_argument("model", metavar="MODEL", help="model folder or shipped model name")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="file or folder to write")
    p.add_argument("--format", choices=FORMATS, default="bioimageio", help="default bioimageio")
    p.add_argument("--sample", metavar="IMAGE", help="bioimageio: an image for the test tensors and the cover "
                   "(default: synthetic cells)")
    p.add_argument("--author", action="append", metavar="NAME", help="bioimageio: an author of the model "
                   "(repeatable; default: biounet developers)")
    p.add_argument("--license", metavar="SPDX", help="bioimageio: the weights' licence (default BSD-3-Clause)")
    p.add_argument("--background", choices=("dark", "bright"), help="bioimageio, for a model that inverts "
                   "bright-background images (such as the shipped nuclei): the background of the images the "
                   "package is for, dark (fluorescence) or bright (brightfield, H&E)")
    p.add_argument("--no-check", action="store_true", help="skip running the export against PyTorch (and "
                   "bioimageio's test) before writing it")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from biounet.export import export_model

    given = {"authors": tuple(args.author) if args.author else None, "license": args.license,
             "background": args.background}
    path = export_model(args.model, args.output, format=args.format, overwrite=args.overwrite, check=not args.no_check,
                        sample=args.sample, **{k: v for k, v in given.items() if v is not None})  # fmt: skip
    log.info("exported %s as %s to %s", args.model, args.format, path)
    return 0


# --------------------------------------------------------------------------------------------
# synth (issue 3, datasets)
# --------------------------------------------------------------------------------------------
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic touching-cells data set (images/ + labels/)",
        description="Write N synthetic images of clumps of touching cells as DIR/images/synth_NNN.tif "
        "(uint16 camera counts) and DIR/labels/synth_NNN.tif (uint16 instance labels, 0 = background).",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created; must not hold data)")
    p.add_argument("-n", type=int, default=20, help="number of images (default 20)")
    p.add_argument("--shape", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="default 256 256")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--style", choices=("fluorescence", "phase"), default="fluorescence", help="default fluorescence")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from biounet.data import synthetic_cells
    from biounet.io import write_tiff

    if args.n < 1:
        raise ValueError(f"-n must be at least 1, got {args.n}")
    root = Path(args.output)
    folders = (root / "images", root / "labels")
    for folder in folders:
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"{folder} is not empty; choose a new output folder")
    data = synthetic_cells(args.n, shape=tuple(args.shape), seed=args.seed, style=args.style)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(args.n - 1)))
    for i, (image, labels) in enumerate(data):
        write_tiff(folders[0] / f"synth_{i:0{width}d}.tif", image)
        write_tiff(folders[1] / f"synth_{i:0{width}d}.tif", labels)
    log.info("wrote %d %s images and labels to %s", len(data), args.style, root)
    return 0


# --------------------------------------------------------------------------------------------
# show-weights (issue 3, weight maps)
# --------------------------------------------------------------------------------------------
def _add_show_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show-weights",
        help="render the paper's border weight map of a label image",
        description="Compute the loss weight map of the U-Net paper (eq. 2) for an instance label image "
        "(0 = background) and save it as a colour PNG like the paper's Fig. 3d (blue = low, red = high).",
    )
    p.add_argument("labels", metavar="LABELS", help="2D instance label image (TIFF, PNG, .npy), or a mask with --binary")
    p.add_argument("-o", "--output", required=True, help="the PNG file to write")
    p.add_argument("--w0", type=float, default=10.0, help="amplitude of the border term (default: 10)")
    p.add_argument("--sigma", type=float, default=5.0, help="width of the border term in pixels (default: 5)")
    p.add_argument(
        "--border",
        choices=("background", "all"),
        default="background",
        help="add the border term on background pixels only (default) or on all pixels",
    )
    p.add_argument(
        "--binary",
        action="store_true",
        help="LABELS is a binary mask: split its cells into 4-connected components first",
    )
    p.add_argument(
        "--foreground-value",
        type=float,
        default=None,
        help="with --binary: the mask value of cells (default: every non-zero pixel; ISBI: 255)",
    )
    p.add_argument("--vmax", type=float, default=None, help="weight shown in dark red (default: the maximum)")
    p.set_defaults(handler=_cmd_show_weights)


def _cmd_show_weights(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from biounet.data import binary_to_instances, render_weight_map, weight_map
    from biounet.io import read_image, write_png

    if Path(args.output).suffix.lower() != ".png":
        raise ValueError(f"{args.output}: the output must be a .png file")
    if Path(args.output).resolve() == Path(args.labels).resolve():
        raise ValueError(f"{args.output}: is the input label image; choose another output file")
    labels = read_image(args.labels)
    if labels.ndim != 2:
        raise ValueError(f"{args.labels}: expected a 2D label image, got shape {labels.shape}")
    if args.binary:
        labels = binary_to_instances(labels, foreground_value=args.foreground_value)
    elif args.foreground_value is not None:
        raise ValueError("--foreground-value needs --binary")
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"{args.labels}: labels must be integers, got {labels.dtype}; pass --binary for a mask")
    n_cells = np.unique(labels[labels > 0]).size
    if n_cells < 2:
        log.warning("%s: %d cell(s), so the border term is 0; pass --binary if this is a mask", args.labels, n_cells)
    weights = weight_map(labels, w0=args.w0, sigma=args.sigma, border=args.border)
    write_png(args.output, render_weight_map(weights, vmax=args.vmax))
    log.info("%s: %d cells, weights %.3g..%.3g -> %s", args.labels, n_cells, weights.min(), weights.max(), args.output)
    return 0


# --------------------------------------------------------------------------------------------
# evaluate (issue 5)
# --------------------------------------------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions against ground truth (ISBI 2012, CTC, object F1)",
        description="Score predictions against ground truth. PRED are probability maps (float TIFF; the "
        "(C, H, W) maps of 'biounet predict' give class 1, the cells) or label images; GT are label "
        "images (instances, or binary masks such as the ISBI labels, nonzero = cell). Folders stand for "
        "their images. Files pair by name: lower case, without extension, without endings such as "
        "_probabilities, _labels, _mask, _pred, _gt, and without the CTC prefixes man_seg/mask "
        "(a_probabilities.tif pairs with a.png, mask007.tif with man_seg007.tif).",
    )
    p.add_argument("pred", nargs="+", metavar="PRED", help="prediction files or folders")
    p.add_argument("--gt", nargs="+", required=True, metavar="GT", help="ground-truth files or folders")
    p.add_argument(
        "--metrics", choices=("isbi", "cells", "all"), default="all",
        help="isbi: V_rand, V_info, pixel and warping error (Fiji's ISBI 2012 evaluation); cells: IoU, "
        "Dice, CTC SEG, object AP/F1 (DSB 2018); default all",
    )
    p.add_argument("-o", "--output", metavar="REPORT", help="write the scores to a .csv or .json file")
    p.add_argument("--threshold", type=float, help="foreground threshold for cell instances of probability maps "
                   "(0.5); given, --split or --min-size make the cell metrics score the probability maps of a "
                   "predict folder instead of its labels")  # fmt: skip
    p.add_argument(
        "--split", choices=("none", "distance", "probability"),
        help="separate touching cells of probability maps by a seeded watershed (default none)",
    )
    p.add_argument("--min-size", type=int, help="drop predicted cells below this many pixels (0)")
    p.add_argument("--no-warping", action="store_true", help="skip the warping error (the slowest ISBI score)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from biounet.evaluation import (
        check_report_path,
        evaluate_files,
        mean_row,
        pair_files,
        write_report,
    )

    if args.output:
        check_report_path(args.output)
    options = {k: v for k, v in (("threshold", args.threshold), ("split", args.split), ("min_size", args.min_size))
               if v is not None}  # fmt: skip
    # cell metrics score the labels that predict wrote with the model's post-processing, if both are
    # there, unless post-processing options are given: then the probabilities, with them
    prefer = "labels" if args.metrics == "cells" and not options else "probabilities"
    rows = evaluate_files(pair_files(args.pred, args.gt, prefer=prefer), metrics=args.metrics, **options,
                          warping=not args.no_warping, progress=not args.no_progress)  # fmt: skip
    shown = [
        k for k in ("v_rand", "v_info", "rand_error", "pixel_error", "warping_error", "splits_mergers_error",
                    "iou", "dice", "seg", "ap50", "map", "f1_50")
        if k in rows[0]
    ]
    lines = [["prediction", *shown]]
    lines += [[Path(str(r["prediction"])).name, *(f"{r[k]:.4f}" for k in shown)] for r in [*rows, mean_row(rows)]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        sys.stdout.write("  ".join(cells) + "\n")
    if args.output:
        log.info("wrote %s", write_report(args.output, rows))
    return 0


# --------------------------------------------------------------------------------------------
# train (issue 4)
# --------------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a U-Net on annotated images (images/ + labels/, ISBI or CTC layout)",
        description="Train with the paper's recipe (--preset paper) or a narrow CPU-friendly one (--preset fast). "
        "Precedence: preset < --config TOML < --set field=value < --steps/--seed. The paper preset trains on one "
        "tile per step, the largest that the images and the device's memory allow (--set tile=572: the paper's).",
    )
    p.add_argument("data", help="data set folder (layout detected: images/+labels/, ISBI 2012, Cell Tracking Challenge)")
    p.add_argument("-o", "--output", required=True, metavar="RUNDIR", help="run folder (logs, checkpoints, models)")
    p.add_argument("--preset", choices=("paper", "fast"), default="paper")
    p.add_argument("--config", metavar="FILE", help="TOML file of training options: tables [network], [data], "
                   "[augmentation], [loss], [optimization], [postprocess], [run] (or flat keys); every run folder "
                   "holds its own as train_config.toml")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one option, e.g. lr=0.001 or optimization.lr=0.001 (repeatable)")  # fmt: skip
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", metavar="DATA", help="validation data set folder")
    val.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of the images")
    p.add_argument("--layout", choices=("auto", "folders", "isbi", "ctc"), default="auto")
    p.add_argument("--gray", action="store_true", help="train on the luminance of colour images; the model "
                   "converts colour images the same way when it predicts (same as --set color=\"luminance\")")
    p.add_argument("--minutes", type=float, help="time budget: train as many steps as fit in this many minutes "
                   "(timed on the first steps, then fixed and recorded)")
    p.add_argument("--steps", type=int, help="number of training steps")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUNDIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from biounet.data import load_dataset, split_samples
    from biounet.training import TrainConfig, run_config, train

    run_dir = Path(args.output)
    config = run_config(run_dir) if args.resume else None
    if config is not None:
        if config.minutes is not None and args.steps is not None:
            raise ValueError(f"{run_dir}: this run has a time budget of {config.minutes:g} min and keeps the "
                             f"{config.steps} steps planned for it; --steps cannot change them")  # fmt: skip
    else:
        config = TrainConfig.preset(args.preset)
        if args.config:
            config = TrainConfig.from_toml(Path(args.config), base=config)
    overrides = list(args.set)
    overrides += [f"steps={args.steps}"] if args.steps is not None else []
    overrides += [f"seed={args.seed}"] if args.seed is not None else []
    overrides += [f"minutes={args.minutes}"] if args.minutes is not None else []
    overrides += ['color="luminance"'] if args.gray else []
    config = config.updated(overrides)
    gray = config.color == "luminance"
    samples = load_dataset(args.data, args.layout, as_gray=gray, progress=not args.no_progress)
    if args.val:
        val_samples = load_dataset(args.val, args.layout, as_gray=gray)
    else:
        samples, val_samples = split_samples(samples, args.val_fraction, seed=config.seed)
    log.info("training on %d image(s), validating on %d; %s", len(samples), len(val_samples), run_dir)
    train(samples, run_dir, config, val_samples=val_samples, device=args.device, resume=args.resume,
          progress=not args.no_progress)  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------
# demo (issue 2, then issue 4)
# --------------------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on synthetic cells and segment a held-out image (CPU, minutes)")
    p.add_argument("-o", "--output", default="demo-output", metavar="OUTDIR", help="output folder")
    p.add_argument("--steps", type=int, help="training steps (default: the fast preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from biounet.demo import run_demo

    result = run_demo(args.output, steps=args.steps, progress=not args.no_progress)
    out = sys.stdout
    out.write(f"trained the fast preset in {result.train_seconds:.0f} s on synthetic touching cells\n")
    out.write(f"segmented a held-out 480x640 image in {result.predict_seconds:.2f} s ({result.tiles} tiles)\n")
    out.write(f"held-out foreground IoU {result.iou:.3f}, object F1 at IoU 0.5 {result.f1:.3f}\n")
    if result.shipped is not None:
        shipped = result.shipped
        size = "x".join(map(str, shipped.shape))
        out.write(f"shipped model '{shipped.model}': segmented a {size} {shipped.source} in {shipped.seconds:.2f} s, "
                  f"{shipped.objects} objects, object F1 at IoU 0.5 {shipped.f1:.3f}\n")  # fmt: skip
    out.write("files:\n" + "".join(f"  {p}\n" for p in result.files))
    return 0


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``biounet`` argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="biounet",
        description="U-Net for microscopy: exact overlap-tile segmentation, training, evaluation.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_predict, _add_export, _add_train, _add_evaluate, _add_synth, _add_show_weights, _add_demo):
        add(sub)
    return parser


#: the name of the stderr handler that :func:`main` puts on the ``biounet`` logger
_HANDLER_NAME = "biounet-cli"


def _setup_logging(level: int) -> None:
    """Log lines to the current ``sys.stderr``; :func:`main` routes them through ``tqdm.write`` around bars."""
    logger = logging.getLogger("biounet")
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:  # main ran before
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings duplicate our error lines


#: The flag of each library argument that an error can be about (``BiounetError.option``).
FLAGS = {"resume": "--resume", "tta": "--tta", "scheduler": "--scheduler", "set": "--set", "overwrite": "--overwrite",
         "threshold": "--threshold", "min_size": "--min-size", "split": "--split", "normalization": "--normalize",
         "name": "--name", "pattern": "--pattern", "levels": "--pyramid", "output_format": "--format"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``biounet`` console script."""
    from biounet.errors import BiounetError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO)
    if args.version:
        from importlib.metadata import version

        sys.stdout.write(f"biounet {version('biounet')}\n")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    handler: Handler = args.handler
    terminated = []

    def on_sigterm(signum: int, frame: object) -> None:  # batch schedulers stop jobs with SIGTERM
        terminated.append(signum)
        raise KeyboardInterrupt

    from tqdm.contrib.logging import logging_redirect_tqdm

    restore = _install(signal.SIGTERM, on_sigterm)
    try:
        with logging_redirect_tqdm([logging.getLogger("biounet")]):  # log lines do not break progress bars
            return int(handler(args) or 0)
    except KeyboardInterrupt:  # atomic writes remove their temporary files; checkpoints stay resumable
        sys.stderr.write(f"biounet: {'terminated' if terminated else 'interrupted'}\n")
        return 143 if terminated else 130
    except (BiounetError, ValueError, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        flag = FLAGS.get(getattr(exc, "option", None) or "")
        sys.stderr.write(f"biounet {args.command}: error: {exc}{f' ({flag})' if flag else ''}\n")
        return 1
    except MemoryError:
        if args.debug:
            raise
        sys.stderr.write(f"biounet {args.command}: error: out of memory; use smaller tiles (--tile) or images\n")
        return 1
    except Exception as exc:  # a bug, not a bad input: still one line, the traceback with --debug
        if args.debug:
            raise
        sys.stderr.write(f"biounet {args.command}: error: unexpected {type(exc).__name__}: {exc} (a bug in "
                         "biounet; rerun with --debug for the traceback and report it)\n")  # fmt: skip
        return 1
    finally:
        restore()


def _install(signum: int, handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """Set a signal handler where Python may (the main thread) and the signal is not ignored.

    Returns what puts the previous handler back (the default one where the previous was
    installed outside Python).
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signum) == signal.SIG_IGN:
        return lambda: None
    previous = signal.signal(signum, handler)
    return lambda: signal.signal(signum, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
