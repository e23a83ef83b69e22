"""Large images on the CPU: tiling efficiency, throughput against one large tile and MONAI, peak memory.

Three parts, each printing a Markdown table (all in one run by default):

``tiling``
    For the paper U-Net (depth 4, valid padding) and square images from 512 to 20000 px:
    biounet's tile layout (:func:`biounet.plan_tiles`), its tiling efficiency (useful output
    pixels over computed output pixels, :func:`biounet.tiling_efficiency`) and GFLOP per
    output megapixel, against fixed 572 px tiles (the paper's, 388 px output) and MONAI's
    sliding window (roi 512, overlap 0.25, which computes every window in full). FLOPs are
    counted by ``torch.utils.flop_counter`` on the meta device (a multiply-add is 2 FLOPs).
``cpu``
    On one square image (default 1024 px) and a U-Net of ``--width`` base channels (64: the
    paper net): the "bare" forward pass of one large tile (700 px input, batch 1, input
    ready: the convolution throughput ceiling) in channels-last (as ``biounet.predict``
    runs it) and channels-first memory format; ``biounet.predict`` at batch sizes 1 and 4
    and in bfloat16; the out-of-core path (``biounet.prediction.predict_dask``, 1024 px
    chunks, local threads); MONAI's ``sliding_window_inference`` (roi 512, overlap 0.25,
    Gaussian blending) with ``BasicUNet`` of the same widths, as is (channels-first,
    sw_batch_size 4, as in ``benchmarks/predict.py``) and channels-last (sw_batch_size 1
    and 4), with its bare 512 px tile. Everything is timed from a host array to host
    probabilities, round-robin, ``--repeats`` times after a warm-up on a 512 px image; the
    table gives the fastest run (wall clock) and its CPU time (all threads); "of bare" is
    output Mpx/s over the same net's faster bare tile (channels-last or -first).
``threads``
    The out-of-core path on a 2 x ``--size`` px uint8 image with the narrow U-Net below, for
    1 or 2 Dask worker threads times 1 or 2 torch threads, against ``biounet.predict`` and
    against the bare 700 px tile of the same net in channels-last and channels-first format.
``memory``
    Out-of-core prediction of synthetic uint8 Zarr images (``--memory-sizes``, e.g. 20000)
    with a narrow U-Net (``--narrow-depth`` 3, ``--narrow-width`` 8), writing probabilities
    and labels to OME-Zarr with :func:`biounet.prediction.predict_to_zarr`, each in a fresh
    process whose peak resident memory (VmHWM) is reported; for sizes up to
    ``--in-memory-up-to`` the in-memory ``biounet.predict`` of the same image (with TIFF
    outputs, as ``biounet predict`` writes them) is measured the same way, for comparison.
    Like ``biounet predict``, the child processes run with ``OMP_WAIT_POLICY=PASSIVE``
    unless the variable is set.

The load average is printed before and after: other jobs on the machine slow CPU timings.

Usage::

    python benchmarks/large_image.py                               # about 15 minutes on 2 idle cores
    python benchmarks/large_image.py --part cpu --width 32 --size 1024 --repeats 3
    python benchmarks/large_image.py --part memory --memory-sizes 4096 20000
    python benchmarks/large_image.py --quick                       # smoke check, a minute
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import biounet
from biounet.prediction import predict_dask, predict_to_zarr
from biounet.prediction import plan_tiles, tile_input_shapes, tiling_efficiency

PAPER_TILE = 572
MONAI_ROI, MONAI_OVERLAP = 512, 0.25


# ------------------------------------------------------------------------------------------
# tiling
# ------------------------------------------------------------------------------------------
def flops_per_tile(model: torch.nn.Module, shape: tuple[int, int]) -> int:
    meta = biounet.UNet(**model.config.to_dict()).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.empty(1, model.config.in_channels, *shape, device="meta"))
    return counter.get_total_flops()


def monai_windows(size: int) -> int:
    """Windows per axis of MONAI's sliding window (roi 512, overlap 0.25) on a ``size`` px axis."""
    if size <= MONAI_ROI:
        return 1
    step = int(MONAI_ROI * (1 - MONAI_OVERLAP))
    return math.ceil((size - MONAI_ROI) / step) + 1


def tiling_table(sizes: Sequence[int]) -> str:
    paper = biounet.UNet()
    flops: dict[tuple[int, int], int] = {}

    def gflop_per_mpx(shapes: dict[tuple[int, int], int], size: int) -> float:
        for shape in shapes:
            flops.setdefault(shape, flops_per_tile(paper, shape))
        return sum(n * flops[shape] for shape, n in shapes.items()) / 1e9 / (size * size / 1e6)

    lines = ["| image | biounet tiles | efficiency | GFLOP / Mpx | 572 px tiles | efficiency | GFLOP / Mpx "
             "| MONAI windows (512, 0.25) | efficiency |", "|" + "---|" * 9]  # fmt: skip
    for size in sizes:
        layout = plan_tiles(paper.config, (size, size))
        shapes = tile_input_shapes(layout)
        tiles = " + ".join(f"{n} x {'x'.join(map(str, shape))}" for shape, n in shapes.items())
        fixed = math.ceil(size / paper.output_size(PAPER_TILE)) ** 2
        fixed_eff = size * size / (fixed * paper.output_size(PAPER_TILE) ** 2)
        windows = monai_windows(size) ** 2
        monai_eff = size * size / (windows * MONAI_ROI**2)
        fixed_gflop = gflop_per_mpx({(PAPER_TILE, PAPER_TILE): fixed}, size)
        lines.append(
            f"| {size}² | {tiles} | {tiling_efficiency(layout):.3f} | {gflop_per_mpx(shapes, size):.0f} "
            f"| {fixed} x {PAPER_TILE}² | {fixed_eff:.3f} | {fixed_gflop:.0f} "
            f"| {windows} x {MONAI_ROI}² | {monai_eff:.3f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# cpu
# ------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_table(width: int, size: int, repeats: int, chunk: int) -> tuple[str, list[str]]:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    widths = tuple(width * 2**level for level in range(5))
    ours_nchw = biounet.UNet(base_channels=width).eval()
    ours = copy.deepcopy(ours_nchw).to(memory_format=torch.channels_last)  # as biounet.predict runs it
    theirs = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(*widths, width)).eval()
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    cl = torch.channels_last
    rng = np.random.default_rng(0)
    image, small = rng.random((size, size), dtype=np.float32), rng.random((512, 512), dtype=np.float32)
    tile, roi = torch.rand(1, 1, 700, 700), torch.rand(1, 1, MONAI_ROI, MONAI_ROI)

    def bare(net: torch.nn.Module, x: torch.Tensor) -> Callable[[np.ndarray], object]:
        def run(_: np.ndarray) -> None:
            with torch.inference_mode():
                net(x)

        return run

    def monai(net: torch.nn.Module, batch: int) -> Callable[[np.ndarray], object]:
        def run(pixels: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(pixels)[None, None]
            with torch.inference_mode():
                logits = sliding_window_inference(x, MONAI_ROI, batch, net, overlap=MONAI_OVERLAP, mode="gaussian")
                return torch.softmax(logits, dim=1)[0].numpy()

        return run

    def ours_predict(batch: int, precision: str = "float32") -> Callable[[np.ndarray], object]:
        return lambda pixels: biounet.predict(ours, pixels, batch_size=batch, precision=precision, progress=False)

    def ours_streamed(pixels: np.ndarray) -> np.ndarray:
        return predict_dask(ours, da.from_array(pixels, chunks=chunk), chunk=chunk, batch_size=1).compute()

    tile_px, roi_px, image_px = ours.output_size(700) ** 2, MONAI_ROI**2, size * size
    tile_cl, roi_cl = tile.contiguous(memory_format=cl), roi.contiguous(memory_format=cl)
    methods: dict[str, tuple[Callable[[np.ndarray], object], int]] = {
        "bare forward, biounet U-Net, 1 x 700², channels-last": (bare(ours, tile_cl), tile_px),
        "bare forward, biounet U-Net, 1 x 700², channels-first": (bare(ours_nchw, tile), tile_px),
        f"bare forward, BasicUNet, 1 x {MONAI_ROI}², channels-last": (bare(theirs_cl, roi_cl), roi_px),
        f"bare forward, BasicUNet, 1 x {MONAI_ROI}², channels-first": (bare(theirs, roi), roi_px),
        "biounet.predict, batch 1": (ours_predict(1), image_px),
        "biounet.predict, batch 4": (ours_predict(4), image_px),
        "biounet.predict, batch 1, bfloat16": (ours_predict(1, "bfloat16"), image_px),
        f"biounet out-of-core (predict_dask, {chunk} px chunks)": (ours_streamed, image_px),
        "MONAI sliding window, BasicUNet, sw_batch 4": (monai(theirs, 4), image_px),
        "MONAI sliding window, BasicUNet channels-last, sw_batch 1": (monai(theirs_cl, 1), image_px),
        "MONAI sliding window, BasicUNet channels-last, sw_batch 4": (monai(theirs_cl, 4), image_px),
    }  # fmt: skip
    for fn, _ in methods.values():  # warm-up: the kernels of every tile shape, on a 512² image
        fn(small)
    best = {name: (math.inf, math.inf) for name in methods}
    for _ in range(repeats):  # round-robin, so that other load slows every method alike
        for name, (fn, _) in methods.items():
            wall, cpu = timed(lambda: fn(image))
            if wall < best[name][0]:
                best[name] = (wall, cpu)
    mpx = {name: methods[name][1] / 1e6 / best[name][0] for name in methods}
    names = list(methods)
    lines = ["| method | image | s (wall) | s (CPU) | output Mpx/s | of bare |", "|---|---|---|---|---|---|"]
    fastest_bare = {net: max(names[k : k + 2], key=mpx.get) for net, k in (("biounet", 0), ("BasicUNet", 2))}
    for name in names:
        reference = fastest_bare["BasicUNet" if "BasicUNet" in name else "biounet"]
        image_cell = "—" if name.startswith("bare") else f"{size}²"
        lines.append(
            f"| {name} | {image_cell} | {best[name][0]:.2f} | {best[name][1]:.2f} | {mpx[name]:.4f} "
            f"| {mpx[name] / mpx[reference]:.0%} |"
        )
    float32 = [n for n in names if n.startswith("biounet.predict") and "bfloat16" not in n]
    ours_best = max(float32, key=mpx.get)
    theirs_best = max((n for n in names if n.startswith("MONAI")), key=mpx.get)
    notes = [
        f"- best float32 biounet.predict ({ours_best}): {mpx[ours_best] / mpx[fastest_bare['biounet']]:.0%} of "
        f"the fastest bare 700² tile's output Mpx/s",
        f"- out-of-core: {mpx[names[7]] / mpx[fastest_bare['biounet']]:.0%} of the bare tile",
        f"- biounet / MONAI, each at its best float32 setting: {mpx[ours_best] / mpx[theirs_best]:.2f}x output Mpx/s "
        f"({ours_best} vs {theirs_best})",
        f"- biounet / MONAI as MONAI users run it (channels-first, sw_batch 4): "
        f"{mpx[ours_best] / mpx[names[8]]:.2f}x",
    ]
    return "\n".join(lines), notes


def threads_table(size: int, chunk: int, repeats: int, depth: int, width: int) -> str:
    """Out-of-core throughput for Dask worker threads x torch threads (and in-memory for reference)."""
    torch.manual_seed(0)
    model = biounet.UNet(depth=depth, base_channels=width, dropout=0.0).eval()
    image = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    lazy = da.from_array(image, chunks=chunk)
    configs = [(1, 2), (2, 1), (2, 2)] if (os.cpu_count() or 1) >= 2 else [(1, 1)]
    initial = torch.get_num_threads()

    def run(workers: int | None, threads: int) -> Callable[[], object]:
        def go() -> object:
            torch.set_num_threads(threads)
            if workers is None:
                return biounet.predict(model, image, batch_size=1, progress=False)
            prob = predict_dask(model, lazy, chunk=chunk, batch_size=1)
            return prob.compute(scheduler="threads", num_workers=workers)

        return go

    def bare(memory_format: torch.memory_format) -> Callable[[], object]:
        net = copy.deepcopy(model).to(memory_format=memory_format)
        x = torch.rand(1, 1, 700, 700).contiguous(memory_format=memory_format)

        def go() -> None:
            torch.set_num_threads(initial)
            with torch.inference_mode():
                net(x)

        return go

    methods = {f"out-of-core, {w} Dask worker(s) x {t} torch thread(s)": run(w, t) for w, t in configs}
    methods[f"in memory (biounet.predict), {initial} torch threads"] = run(None, initial)
    methods["bare forward, 1 x 700², channels-last"] = bare(torch.channels_last)
    methods["bare forward, 1 x 700², channels-first"] = bare(torch.contiguous_format)
    for fn in methods.values():
        fn()
    best = dict.fromkeys(methods, math.inf)
    for _ in range(repeats):
        for name, fn in methods.items():
            best[name] = min(best[name], timed(fn)[0])
    torch.set_num_threads(initial)
    pixels = {name: model.output_size(700) ** 2 if name.startswith("bare") else size * size for name in methods}
    lines = ["| configuration | s (wall) | output Mpx/s |", "|---|---|---|"]
    lines += [f"| {name} | {best[name]:.3f} | {pixels[name] / 1e6 / best[name]:.2f} |" for name in methods]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
def _synthetic_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """Bright round cells on a dark noisy background, from global coordinates (any chunking)."""
    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    cells = np.cos(y / 9.0) * np.cos(x / 11.0) + 0.5 * np.cos((x + y) / 37.0)
    noise = np.random.default_rng(y0 * 100003 + x0).integers(0, 30, cells.shape)
    return np.clip(60 + 120 * (cells > 0.6) + noise, 0, 255).astype(np.uint8)


def write_synthetic(path: Path, size: int, chunk: int = 1024) -> None:
    import zarr

    target = zarr.create_array(str(path), shape=(size, size), chunks=(chunk, chunk), dtype=np.uint8)
    pixels = da.map_blocks(_synthetic_block, da.empty((size, size), chunks=chunk, dtype=np.uint8), dtype=np.uint8)
    da.store(pixels, target, lock=False)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). ``ru_maxrss`` is no substitute in a child
    process: Linux carries the parent's value over ``fork`` + ``exec``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> int:
    """Predict one Zarr image in this (fresh) process; print seconds and peak RSS as JSON."""
    import zarr

    from biounet.io import open_image

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    model = biounet.UNet(depth=args.narrow_depth, base_channels=args.narrow_width, dropout=0.0).eval()
    baseline = peak_rss_mib()
    start = time.perf_counter()
    if args.child_mode == "stream":
        source = open_image(args.child_input)
        items = source.array[None, None]
        predict_to_zarr(model, items, Path(args.child_output), "image", chunk=args.chunk, batch_size=1, progress=False)
    else:
        from biounet.postprocess import labels_from_probabilities

        image = zarr.open_array(args.child_input, mode="r")[:]
        prob = biounet.predict(model, image, batch_size=1, progress=False)
        biounet.write_tiff(Path(args.child_output) / "image_probabilities.tif", prob)
        biounet.write_tiff(Path(args.child_output) / "image_labels.tif", labels_from_probabilities(prob))
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "baseline_rss_mib": baseline}))
    return 0


def memory_table(args: argparse.Namespace) -> str:
    lines = ["| image | path | chunk | s | output Mpx/s | peak RSS MiB | after imports MiB |", "|" + "---|" * 7]
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for size in args.memory_sizes:
            source = Path(work) / f"image{size}.zarr"
            write_synthetic(source, size)
            modes = ["stream"] + (["in-memory"] if size <= args.in_memory_up_to else [])
            for mode in modes:
                out = Path(work) / f"out{size}-{mode}"
                out.mkdir()
                command = [sys.executable, __file__, "--child-input", str(source), "--child-output", str(out),
                           "--child-mode", mode, "--chunk", str(args.chunk), "--narrow-depth", str(args.narrow_depth),
                           "--narrow-width", str(args.narrow_width)]  # fmt: skip
                if args.threads:
                    command += ["--threads", str(args.threads)]
                env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}  # as the CLI
                done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                result = json.loads(done.stdout)
                lines.append(
                    f"| {size}² | {'out-of-core, OME-Zarr' if mode == 'stream' else 'in memory, TIFF'} "
                    f"| {args.chunk if mode == 'stream' else '—'} | {result['seconds']:.1f} "
                    f"| {size * size / 1e6 / result['seconds']:.2f} | {result['peak_rss_mib']:.0f} "
                    f"| {result['baseline_rss_mib']:.0f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
                shutil.rmtree(out)
            shutil.rmtree(source)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "tiling", "cpu", "threads", "memory"), default="all")
    parser.add_argument("--quick", action="store_true", help="smoke check: small sizes, narrow nets")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--tiling-sizes", type=int, nargs="+", default=[512, 1000, 2048, 8192, 20000])
    parser.add_argument("--width", type=int, default=64, help="base channels of the cpu part's nets (64: paper)")
    parser.add_argument("--size", type=int, default=1024, help="image side of the cpu part")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024, help="out-of-core chunk (cpu part), 2048 (memory part)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--in-memory-up-to", type=int, default=8192)
    parser.add_argument("--narrow-depth", type=int, default=3)
    parser.add_argument("--narrow-width", type=int, default=8)
    parser.add_argument("--workdir", help="folder for the temporary Zarr images (default: the system's)")
    parser.add_argument("--child-input", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", choices=("stream", "in-memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tiling_sizes, args.width, args.size, args.repeats = [512, 2048], 8, 600, 1
        args.memory_sizes, args.in_memory_up_to = [1024], 1024
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_input:
        return child(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"# Large images and CPU efficiency ({datetime.date.today().isoformat()})\n")
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
          f"torch {torch.__version__}, dask {dask.__version__}\n")  # fmt: skip
    if args.part in ("all", "tiling"):
        print("## Tiling efficiency (paper U-Net)\n")
        print(tiling_table(args.tiling_sizes) + "\n")
    if args.part in ("all", "cpu"):
        print(f"## CPU throughput, {args.size}² image, U-Net widths {args.width}..{16 * args.width}, "
              f"best of {args.repeats}\n")  # fmt: skip
        table, notes = cpu_table(args.width, args.size, args.repeats, args.chunk)
        print(table + "\n\n" + "\n".join(notes) + "\n")
    if args.part in ("all", "threads"):
        print(f"## Threads, out-of-core {args.size * 2}² uint8 image, {args.chunk} px chunks, U-Net depth "
              f"{args.narrow_depth} width {args.narrow_width}, best of {args.repeats}\n")  # fmt: skip
        print(threads_table(args.size * 2, args.chunk, args.repeats, args.narrow_depth, args.narrow_width) + "\n")
    if args.part in ("all", "memory"):
        if args.chunk == 1024 and not args.quick:
            args.chunk = 2048
        print(f"## Peak memory, uint8 Zarr images, U-Net depth {args.narrow_depth} width {args.narrow_width}\n")
        print(memory_table(args) + "\n")
    print("load average (1, 5, 15 min) before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
        *load_before, *os.getloadavg()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
