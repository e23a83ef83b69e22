"""CPU prediction in float32 against bfloat16: speed, and whether the segmentation stays the same.

For each shipped model, on the held-out images its ``config.json`` records
(``provenance.evaluation``, read from ``$BIOUNET_DATA``): the task's scores (ISBI 2012 for
``em-membranes``, object scores for ``nuclei``, both by ``experiments/common.py``) with
float32 and with bfloat16 autocast, the share of pixels whose foreground decision
(p(cell) > 0.5) flips, and the largest probability difference. Then seconds per image of
``biounet.predict`` at both precisions on a 512² and a 2048² synthetic image (median of
``--repeats`` after one warm-up, round-robin, so a change of load hits both alike). The
load average before and after is printed.

Usage::

    BIOUNET_DATA=/data python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import common  # noqa: E402

from biounet.data import load_dataset, synthetic_cells  # noqa: E402
from biounet.model import load_model  # noqa: E402
from biounet.prediction import predict  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def scores(name: str, model, data: Path) -> list[list[str]]:
    """One table row per precision: scores on the model's recorded evaluation images, flips, max |dp|."""
    evaluation = model.info.provenance["evaluation"]
    by_name = {s.name: s for s in load_dataset(data / evaluation["dataset"], as_gray=True)}
    test = [by_name[n] for n in evaluation["images"]]
    probs = {p: [predict(model, s.image, precision=p, progress=False) for s in test] for p in PRECISIONS}
    rows = []
    for p in PRECISIONS:
        if name == "em-membranes":
            got = common.em_scores([x[1] for x in probs[p]], [s.labels for s in test])
            shown = {k: got[k] for k in ("v_rand", "v_info", "pixel_error")}
        else:
            got = common.mean_nuclei_scores([common.nuclei_scores(s.labels, x, model.info.postprocess)
                                             for s, x in zip(test, probs[p], strict=True)])  # fmt: skip
            shown = {k: got[k] for k in ("iou", "f1", "ap")} | {"merged": got["merged"]}
        flips = sum(int(np.count_nonzero((a[1] > 0.5) != (b[1] > 0.5))) for a, b in zip(probs["float32"], probs[p]))
        total = sum(a[1].size for a in probs["float32"])
        diff = max(float(np.abs(a - b).max()) for a, b in zip(probs["float32"], probs[p], strict=True))
        rows.append([name, p, f"{len(test)} images", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in shown.items()),
                     f"{flips / total:.2e}", f"{diff:.3f}"])  # fmt: skip
    return rows


def speed(model, side: int, repeats: int) -> dict[str, float]:
    image = synthetic_cells(1, (side, side), seed=0)[0][0]
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for p in PRECISIONS:
        predict(model, image, precision=p, progress=False)  # warm-up
    for _ in range(repeats):
        for p in PRECISIONS:
            t0 = time.perf_counter()
            predict(model, image, precision=p, progress=False)
            times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(t) for p, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=os.environ.get("BIOUNET_DATA") or None)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    models = {name: load_model(name) for name in ("em-membranes", "nuclei")}
    rows = []
    if args.data:
        for name, model in models.items():
            rows += scores(name, model, Path(args.data))
    timings = []
    for name, model in models.items():
        for side in (512, 2048):
            seconds = speed(model, side, args.repeats)
            timings.append([name, f"{side}²", *(f"{t:.3f}" for t in seconds.values()),
                            f"{seconds['float32'] / seconds['bfloat16']:.2f}x"])  # fmt: skip
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f}\n")  # fmt: skip
    if rows:
        print("| model | precision | images | scores | foreground flips | max abs dp |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows) + "\n")
    print("| model | image | float32 s | bfloat16 s | bfloat16 speed-up |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join("| " + " | ".join(map(str, r)) + " |" for r in timings))


if __name__ == "__main__":
    main()
