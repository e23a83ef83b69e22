"""The second nuclei peer: Cellpose 3.1 trained from scratch with its own training code.

Cellpose (Stringer et al. 2021; Pachitariu & Stringer 2022) predicts flows and a cell
probability and follows the flows to instances. This peer trains its default network
(``CPnet``, widths 32-256, a style vector, 3 outputs) from random weights with
``cellpose.train.train_seg`` on the same training images as the biounet run, for the same
budget, and segments the same test images with ``CellposeModel.eval``; biounet's functions
score the masks. Everything Cellpose-specific is Cellpose's own default (:data:`RECIPE`):
AdamW at 0.005 with weight decay 1e-5 and its warm-up and halving schedule, 224 px crops in
batches of 8 with its rotation and rescaling augmentation, the flow and probability losses,
images with fewer than 5 objects left out, objects rescaled to a diameter of 17 px (its
nuclei models' ``diam_mean``), and at prediction its default flow and probability
thresholds, the test image rescaled by the mean training diameter.

Two choices are ours, both through arguments of ``train_seg``: the input is the same
luminance image biounet trains on (2D float, ``channels=[0, 0]``), and an "epoch" is one
batch (``nimg_per_epoch = 8``), so Cellpose's schedule (10 warm-up epochs, then constant,
then halvings) counts steps, as biounet's does; with a whole pass per epoch a few minutes on
a CPU would end inside its warm-up. The budget: ``steps`` batches, or with ``minutes`` as
many as fit, timed on two short probe runs (a fixed start-up plus a time per batch) that
are not counted; the flows of the training labels are computed once before and not counted
either (biounet's weight maps are not counted in its budget).

Cellpose pins NumPy below what biounet uses (through numba and OpenCV), so it runs in its
own environment, ``.venv-cellpose`` (``make peers``): :func:`train_and_segment`
writes the images as ``.npy`` files with a ``spec.json`` and runs this file there
(``python peer_cellpose.py SPEC``), which writes ``masks/<name>.npy`` and ``peer.json``.

References
----------
C. Stringer, T. Wang, M. Michaelos, M. Pachitariu (2021). Cellpose: a generalist algorithm
for cellular segmentation. Nature Methods 18, 100-106.
M. Pachitariu, C. Stringer (2022). Cellpose 2.0: how to train your own model. Nature
Methods 19, 1634-1641.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
#: The Cellpose environment's interpreter (``make peers``).
PYTHON = ROOT / ".venv-cellpose" / "bin" / "python"
#: The Cellpose version the page's numbers come from.
VERSION = "3.1.1.3"
#: Cellpose's own training and prediction settings (``train_seg`` and ``eval`` defaults,
#: ``diam_mean`` of its nuclei models), and one batch per epoch (see the module docstring).
RECIPE: dict[str, Any] = {
    "diam_mean": 17.0, "batch_size": 8, "nimg_per_epoch": 8, "learning_rate": 0.005, "weight_decay": 1e-5,
    "bsize": 224, "min_train_masks": 5, "flow_threshold": 0.4, "cellprob_threshold": 0.0, "min_size": 15,
}  # fmt: skip
#: Probe runs that time the start-up and the batches: (epochs of the short one, of the long one).
PROBE_EPOCHS = (2, 6)
#: The fields of the biounet run that the peer shares (a peer run is reused when these and
#: :data:`RECIPE` are unchanged).
RECIPE_FIELDS = ("steps", "minutes", "seed")


def train_and_segment(
    train: Sequence[Any], test: Sequence[Any], run_dir: Path, *, steps: int, minutes: float | None, seed: int,
    threads: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Train Cellpose on ``train`` and segment ``test`` (biounet ``Sample``s with 2D images).

    Returns the masks by sample name and the run's facts (``peer.json``: epochs, seconds,
    parameters, version). Raises RuntimeError with the Cellpose run's last lines if it fails,
    or if ``.venv-cellpose`` is missing.
    """
    if not PYTHON.is_file():
        raise RuntimeError(f"the Cellpose peer needs its environment {PYTHON.parent.parent}: run `make peers`")
    data = run_dir / "input"
    data.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"train": [], "test": [], "steps": steps, "minutes": minutes, "seed": seed,
                            "threads": threads, "recipe": RECIPE, "out": str(run_dir)}  # fmt: skip
    for role, samples in (("train", train), ("test", test)):
        for s in samples:
            if s.image.ndim != 2:
                raise ValueError(f"{s.name}: the Cellpose peer takes 2D (luminance) images, got {s.image.shape}")
            image = data / f"{role}-{s.name}-image.npy"
            np.save(image, s.image.astype(np.float32))
            entry = {"name": s.name, "image": str(image)}
            if role == "train":
                entry["labels"] = str(data / f"{role}-{s.name}-labels.npy")
                np.save(entry["labels"], s.labels)
            spec[role].append(entry)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CELLPOSE_LOCAL_MODELS_PATH": str(run_dir / "cellpose-home")}
    done = subprocess.run([str(PYTHON), __file__, str(spec_path)], env=env, capture_output=True, text=True)
    (run_dir / "cellpose.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"the Cellpose peer failed (exit {done.returncode}); {run_dir / 'cellpose.log'}:\n{tail}")
    facts = json.loads((run_dir / "peer.json").read_text())
    masks = {s.name: np.load(run_dir / "masks" / f"{s.name}.npy") for s in test}
    return masks, facts


# ============================================================================================
# The part that runs in the Cellpose environment
# ============================================================================================
def _worker(spec_path: Path) -> None:
    import torch
    from cellpose import dynamics, models
    from cellpose import train as cellpose_train
    from cellpose.version import version as cellpose_version

    spec = json.loads(spec_path.read_text())
    recipe, out = spec["recipe"], Path(spec["out"])
    torch.set_num_threads(spec["threads"])
    images = [np.load(e["image"]) for e in spec["train"]]
    labels = [np.load(e["labels"]) for e in spec["train"]]
    t0 = time.perf_counter()
    flows = dynamics.labels_to_flows(labels, device=torch.device("cpu"))
    flow_seconds = time.perf_counter() - t0

    def fresh() -> Any:
        torch.manual_seed(spec["seed"])
        np.random.seed(spec["seed"])
        return models.CellposeModel(gpu=False, pretrained_model=False, diam_mean=recipe["diam_mean"], nchan=2,
                                    mkldnn=False)  # fmt: skip

    def run(epochs: int, folder: Path) -> tuple[Path, float]:
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        path = cellpose_train.train_seg(
            fresh().net, train_data=images, train_labels=flows, channels=[0, 0], normalize=True,
            n_epochs=epochs, batch_size=recipe["batch_size"], nimg_per_epoch=recipe["nimg_per_epoch"],
            learning_rate=recipe["learning_rate"], weight_decay=recipe["weight_decay"], bsize=recipe["bsize"],
            min_train_masks=recipe["min_train_masks"], save_path=str(folder), model_name="peer",
            save_every=10**9,
        )[0]  # fmt: skip
        return Path(path), time.perf_counter() - started

    probe_seconds, epochs = 0.0, spec["steps"]
    if spec["minutes"]:
        short, long_ = (run(n, out / f"probe{n}")[1] for n in PROBE_EPOCHS)
        per_epoch = max((long_ - short) / (PROBE_EPOCHS[1] - PROBE_EPOCHS[0]), 1e-6)
        start_up = max(short - PROBE_EPOCHS[0] * per_epoch, 0.0)
        epochs = max(1, int((60 * spec["minutes"] - start_up) / per_epoch))
        probe_seconds = short + long_
    weights, train_seconds = run(epochs, out)
    model = models.CellposeModel(gpu=False, pretrained_model=str(weights))
    parameters = sum(p.numel() for p in model.net.parameters())  # before eval, which may convert to MKL-DNN
    (out / "masks").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for entry in spec["test"]:
        masks = model.eval(np.load(entry["image"]), channels=[0, 0], diameter=None,
                           flow_threshold=recipe["flow_threshold"], cellprob_threshold=recipe["cellprob_threshold"],
                           min_size=recipe["min_size"])[0]  # fmt: skip
        np.save(out / "masks" / f"{entry['name']}.npy", np.asarray(masks, dtype=np.int32))
    facts = {
        "epochs": epochs, "steps": epochs * -(-recipe["nimg_per_epoch"] // recipe["batch_size"]),
        "train_seconds": train_seconds, "probe_seconds": probe_seconds, "flow_seconds": flow_seconds,
        "segment_seconds": time.perf_counter() - t0, "parameters": parameters,
        "diam_labels": float(model.diam_labels), "cellpose": cellpose_version, "torch": torch.__version__,
    }  # fmt: skip
    (out / "peer.json").write_text(json.dumps(facts, indent=1) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _worker(Path(sys.argv[1]))
