"""Prediction speed: biounet's overlap-tile ``predict`` against MONAI's sliding window.

Measures in one run, on one device, for the paper U-Net (``biounet.UNet()``: depth 4,
64-128-256-512-1024 channels, valid padding; random weights, which do not change the time):

* ``biounet.predict`` on square random images (default 512 and 1024 px on the CPU; 512,
  2048 and 8192 px on a GPU): seconds per image, output megapixels per second, the tile
  layout and its tiling efficiency (useful over computed output pixels,
  :func:`biounet.prediction.tiling_efficiency`), GFLOP per image and the achieved GFLOP/s;
* MONAI's ``sliding_window_inference`` (overlap 0.25, Gaussian blending, the same batch
  size) with ``BasicUNet`` of the same widths on the same images, with the same numbers.
  BasicUNet is *not* the paper net: its convolutions are zero-padded ("same"), it has
  instance norm and LeakyReLU, and it sees no mirrored context at the image border;
* "bare" forward passes of one tile (the paper net at 572 and 700 px, BasicUNet at the ROI
  size), batch 1, no tiling, no copies: the convolution throughput ceiling of each net on
  this machine. "of bare" in the table is a method's output Mpx/s over its own net's bare
  Mpx/s on its largest tile (700 px for the paper net, the ROI for BasicUNet).

Every measurement is warmed up once, then all are timed round-robin ``--repeats`` times (so
a change of machine load hits every method alike); the median is reported (min and max go
to the JSON file). Times run from a host float32 array to host class probabilities
(softmax) for both libraries; biounet's time includes its per-image percentile
normalisation. FLOPs are counted once per tile shape by ``torch.utils.flop_counter`` on the
meta device (a multiply-add is 2 FLOPs). The load average is recorded before and after,
because other jobs on the machine change CPU timings.

Usage::

    python benchmarks/predict.py                      # CPU, about 4 minutes on 2 idle cores
    python benchmarks/predict.py --device cuda        # GPU (when torch.cuda.is_available())
    python benchmarks/predict.py --quick              # smoke check with 8-channel nets, seconds
    python benchmarks/predict.py --sizes 512 2048 --repeats 5 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import monai
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import biounet
from biounet.io import atomic_write
from biounet.prediction import plan_tiles, tile_input_shapes, tiling_efficiency

#: Input tiles of the bare forward passes of the paper net (388 and 516 px outputs).
BARE_TILES = (572, 700)
DEFAULT_SIZES = {"cpu": (512, 1024), "cuda": (512, 2048, 8192)}
DEFAULT_REPEATS = {"cpu": 3, "cuda": 10}
OVERLAP = 0.25
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Side of the square matrices of the matrix-product rate (the machine's dense-math ceiling).
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    device: torch.device
    sizes: tuple[int, ...]
    repeats: int
    batch_size: int
    roi: int
    base_channels: int
    precision: str = "float32"
    compile: str | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's precision (both libraries alike); nothing for float32."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])


@dataclass(frozen=True)
class Row:
    """One line of the table; times in seconds, per image (or per tile for bare rows)."""

    method: str
    image: int | None
    tiles: str
    efficiency: float | None
    seconds: float
    seconds_min: float
    seconds_max: float
    output_mpx: float
    mpx_per_s: float
    gflop: float
    gflop_per_s: float
    of_bare: float | None
    peak_memory_mib: float | None
    of_matmul: float | None = None


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Case:
    """One thing to time.

    ``describe`` returns (tiles, tiling efficiency, FLOPs per call); it is called after the
    warm-up, when MONAI's window count is known. ``ceiling`` is the bare case whose output
    Mpx/s bounds this one (None for bare cases).
    """

    method: str
    image: int | None
    output_px: int
    run: Callable[[], object]
    describe: Callable[[], tuple[str, float | None, int]]
    ceiling: Case | None = None


def measure(cases: Sequence[Case], repeats: int, device: torch.device) -> list[Row]:
    """Warm every case up once, then time them round-robin ``repeats`` times.

    Round-robin rather than one case after the other: a change of machine load (other jobs)
    then slows every case alike and the ratios between them stay meaningful.
    """
    described = []
    for case in cases:
        case.run()
        described.append(case.describe())
    times: list[list[float]] = [[] for _ in cases]
    peaks: list[float | None] = [None] * len(cases)
    for _ in range(repeats):
        for i, case in enumerate(cases):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            case.run()
            _sync(device)
            times[i].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[i] = max(peaks[i] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
    rows: dict[int, Row] = {}
    for case, (tiles, efficiency, flops), case_times, peak in zip(cases, described, times, peaks, strict=True):
        seconds = statistics.median(case_times)
        mpx_per_s = case.output_px / 1e6 / seconds
        ceiling = rows[id(case.ceiling)].mpx_per_s if case.ceiling is not None else None
        rows[id(case)] = Row(
            method=case.method,
            image=case.image,
            tiles=tiles,
            efficiency=efficiency,
            seconds=seconds,
            seconds_min=min(case_times),
            seconds_max=max(case_times),
            output_mpx=case.output_px / 1e6,
            mpx_per_s=mpx_per_s,
            gflop=flops / 1e9,
            gflop_per_s=flops / 1e9 / seconds,
            of_bare=mpx_per_s / ceiling if ceiling else None,
            peak_memory_mib=peak,
        )
    return list(rows.values())


class FlopCount:
    """FLOPs of one forward pass of ``net`` per input tile shape, counted on the meta device."""

    def __init__(self, net: nn.Module) -> None:
        self._meta = copy.deepcopy(net).to("meta").eval()
        self._cache: dict[tuple[int, ...], int] = {}

    def __call__(self, *spatial: int) -> int:
        if spatial not in self._cache:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                self._meta(torch.empty(1, 1, *spatial, device="meta"))
            self._cache[spatial] = counter.get_total_flops()
        return self._cache[spatial]


class CountingPredictor:
    """Wraps a network for MONAI and counts the windows it is given."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.windows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.net(x)


def bare_case(method: str, net: nn.Module, flops: FlopCount, size: int, output: int, settings: Settings) -> Case:
    """One forward pass of one ``size``-px tile, batch 1, input already on the device."""
    x = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0)).to(settings.device)

    def run() -> None:
        with torch.inference_mode(), settings.autocast():
            net(x)

    return Case(method, None, output * output, run, lambda: (f"1 x {size}²", None, flops(size, size)))


def biounet_case(
    model: biounet.UNet, flops: FlopCount, image: np.ndarray, ceiling: Case, settings: Settings, compile: str | None
) -> Case:
    layout = plan_tiles(model.config, image.shape)
    shapes = tile_input_shapes(layout)

    def run() -> None:
        biounet.predict(model, image, batch_size=settings.batch_size, device=settings.device,
                        precision=settings.precision, compile=compile or False, progress=False)  # fmt: skip

    def describe() -> tuple[str, float, int]:
        tiles = " + ".join(f"{n} x {'x'.join(map(str, shape))}" for shape, n in shapes.items())
        return tiles, tiling_efficiency(layout), sum(n * flops(*shape) for shape, n in shapes.items())

    method = "biounet.predict (paper U-Net)" + (f", compiled ({compile})" if compile else "")
    return Case(method, image.shape[0], image.size, run, describe, ceiling)


def monai_case(net: nn.Module, flops: FlopCount, image: np.ndarray, ceiling: Case, settings: Settings) -> Case:
    predictor = CountingPredictor(net)

    def run() -> np.ndarray:
        x = torch.from_numpy(image)[None, None].to(settings.device)
        with torch.inference_mode(), settings.autocast():
            logits = sliding_window_inference(
                x, settings.roi, settings.batch_size, predictor, overlap=OVERLAP, mode="gaussian"
            )
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy()

    def describe() -> tuple[str, float, int]:  # after exactly one call: the warm-up
        windows = predictor.windows
        efficiency = image.size / (windows * settings.roi**2)
        return f"{windows} x {settings.roi}²", efficiency, windows * flops(settings.roi, settings.roi)

    return Case("MONAI sliding window (BasicUNet)", image.shape[0], image.size, run, describe, ceiling)


def matmul_tflops(device: torch.device, precision: str, repeats: int) -> float:
    """Dense matrix-product rate in TFLOP/s (``2 n**3`` per product), best of ``repeats`` timings.

    Square ``n x n`` products (8192 on a GPU, 2048 on a CPU), 10 on a GPU and 2 on a CPU per
    timing, after a warm-up: the rate the convolutions could reach at best on this machine.
    """
    n = MATMUL_SIZE[device.type]
    calls = 10 if device.type == "cuda" else 2
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, DTYPES[precision]) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):  # the first is the warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * calls / best / 1e12


# ------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------
def machine(settings: Settings, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": str(settings.device),
    }
    if settings.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(settings.device)
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Row]) -> str:
    show_memory = any(r.peak_memory_mib is not None for r in rows)
    head = ["method", "image", "tiles", "tiling eff.", "s / image", "output Mpx/s", "GFLOP / image", "GFLOP/s",
            "of bare"]
    head += ["peak GPU MiB"] if show_memory else []
    show_matmul = any(r.of_matmul is not None for r in rows)
    head += ["of matmul"] if show_matmul else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.method,
            "—" if r.image is None else f"{r.image}²",
            r.tiles,
            _fmt(r.efficiency, ".3f"),
            f"{r.seconds:.3g}",
            f"{r.mpx_per_s:.3g}",
            f"{r.gflop:.0f}",
            f"{r.gflop_per_s:.0f}",
            _fmt(r.of_bare, ".0%"),
        ]
        cells += [_fmt(r.peak_memory_mib, ".0f")] if show_memory else []
        cells += [_fmt(r.of_matmul, ".0%")] if show_matmul else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(rows: Sequence[Row]) -> list[str]:
    ours = {r.image: r for r in rows if r.method == "biounet.predict (paper U-Net)"}
    theirs = {r.image: r for r in rows if r.method.startswith("MONAI")}
    return [
        f"- {size}²: biounet {ours[size].mpx_per_s / theirs[size].mpx_per_s:.2f}x MONAI's output Mpx/s"
        for size in ours
        if size in theirs
    ]


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="square image sides in px (default: by device)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 3 on CPU, 10 on GPU)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=4, help="biounet batch_size = MONAI sw_batch_size")
    parser.add_argument("--roi", type=int, default=512, help="MONAI roi_size (default 512)")
    parser.add_argument("--precision", choices=tuple(DTYPES), default="float32",
                        help="autocast precision of every row and of the matrix-product rate (default float32)")
    parser.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                        help="add rows of biounet.predict(compile=MODE) (reduce-overhead: CUDA graphs)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 8-channel nets, one 256 px image")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    for name in ("repeats", "threads", "batch_size", "roi"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.sizes and min(args.sizes) < 1:
        parser.error(f"--sizes must be positive, got {args.sizes}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        device=torch.device(args.device),
        sizes=tuple(args.sizes or ((256,) if args.quick else DEFAULT_SIZES[args.device])),
        repeats=args.repeats or (1 if args.quick else DEFAULT_REPEATS[args.device]),
        batch_size=args.batch_size,
        roi=args.roi,
        base_channels=8 if args.quick else 64,
        precision=args.precision,
        compile=args.compile,
    )
    torch.manual_seed(0)
    widths = tuple(settings.base_channels * 2**level for level in range(5))
    ours = biounet.UNet(base_channels=settings.base_channels).to(settings.device).eval()
    theirs = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(*widths, widths[0]))
    theirs = theirs.to(settings.device).eval()
    ours_flops, theirs_flops = FlopCount(ours), FlopCount(theirs)
    rng = np.random.default_rng(0)
    images = [rng.random((size, size), dtype=np.float32) for size in settings.sizes]

    load_before = os.getloadavg()
    start = time.perf_counter()
    precisions = dict.fromkeys([settings.precision, "bfloat16"])  # the reference is the bf16 rate
    matmul = {p: matmul_tflops(settings.device, p, settings.repeats) for p in precisions}
    bare = [bare_case("bare forward, paper U-Net", ours, ours_flops, size, ours.output_size(size), settings)
            for size in BARE_TILES]
    bare_theirs = bare_case("bare forward, BasicUNet", theirs, theirs_flops, settings.roi, settings.roi, settings)
    cases = [*bare, bare_theirs]
    for image in images:
        cases.append(biounet_case(ours, ours_flops, image, bare[-1], settings, None))
        if settings.compile:
            cases.append(biounet_case(ours, ours_flops, image, bare[-1], settings, settings.compile))
        cases.append(monai_case(theirs, theirs_flops, image, bare_theirs, settings))
    rows = measure(cases, settings.repeats, settings.device)
    rows = [dataclasses.replace(r, of_matmul=r.gflop_per_s / 1e3 / matmul[settings.precision]) for r in rows]
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()

    meta = machine(settings, torch.get_num_threads())
    meta |= {
        "widths": widths,
        "repeats": settings.repeats,
        "batch_size": settings.batch_size,
        "monai_roi": settings.roi,
        "monai_overlap": OVERLAP,
        "precision": settings.precision,
        "compile": settings.compile,
        "matmul_tflops": matmul,
        "matmul_size": MATMUL_SIZE[settings.device.type],
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_seconds": elapsed,
        "command": " ".join(["python", "benchmarks/predict.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(f"# Prediction benchmark ({meta['date']})\n")
    print(f"device {meta.get('gpu', 'cpu')}, {meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads, "
          f"Python {meta['python']}, torch {meta['torch']}, MONAI {meta['monai']}")
    print(f"precision {settings.precision}, compile {settings.compile}; matrix product "
          + ", ".join(f"{p} {rate:.3g} TFLOP/s" for p, rate in matmul.items())
          + f" ({meta['matmul_size']}² x {meta['matmul_size']}²)")
    print(f"widths {widths}, batch {settings.batch_size}, MONAI roi {settings.roi} overlap {OVERLAP} gaussian, "
          f"median of {settings.repeats} round-robin runs after 1 warm-up, {elapsed:.0f} s in all")
    print("load average (1, 5, 15 min) before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}\n".format(
        *load_before, *load_after))
    print(markdown_table(rows))
    print("\n" + "\n".join(speedups(rows)))
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps({"machine": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
