"""Torture table: hostile or careless inputs through the ``biounet`` CLI, each classified automatically.

Every case builds its inputs in a fresh temporary folder, runs ``python -m biounet ...`` there as a
subprocess (timeout 120 s, one thread per library, one case at a time) and gets one outcome:

* ``clean``: what the case expects. An expected error exits with status 1 (2 for argparse usage
  errors) and its error text is ONE line that names everything the case lists in ``names`` (each
  name a substring; ``a|b`` accepts either), without "Traceback" or "unexpected ". The error line
  is the first stderr line starting with ``biounet <cmd>: error:``, ``biounet: error:`` or (the
  per-file lines of ``biounet predict``) ``error:``; log lines before it (INFO, warnings, progress
  bars, argparse's usage block) are ignored, and so are predict's summary lines after it
  (``segmented N of M image(s)``, ``failed (N): ...``). ``biounet`` without a command prints its
  help to stdout and exits 2: its ``usage:`` line is then the error line. An expected success exits
  0 and passes the case's ``check`` (if any) on the case folder.
* ``traceback``: stderr holds "Traceback" or "unexpected " (the CLI prints ``error: unexpected <Type>``
  for bugs), whatever the exit status.
* ``silent``: exit 0 where an error was expected, or a ``check`` fails after the run, or a file listed
  in ``must_keep`` (the bytes of every file in the folder are recorded before the run) was changed,
  replaced or deleted.
* ``misleading``: the expected error came (status != 0, one line) but it does not name what the case
  says it must, or there is no error line at all.
* ``multiline``: the error text runs over several lines (e.g. an exception message with newlines).
* ``refused``: an error (status != 0) where the case expects success.
* ``crash``: killed by a signal (negative status) or an exit status other than 0, 1, 2.
* ``hang``: the 120 s timeout.
* ``skipped``: not run (e.g. permission cases when running as root, who can read and write anything).
* ``setup-error``: building the case's inputs failed (a bug of this script, not of biounet).

Run it from the repository root (several minutes on a 2-core CPU; it only trains for 2 steps)::

    .venv/bin/python experiments/torture.py                    # every case
    .venv/bin/python experiments/torture.py --only model-      # cases whose id contains "model-"
    .venv/bin/python experiments/torture.py --json torture.json --keep

It prints a Markdown table (case, group, what, outcome, first error line) and a summary line with
the count of each outcome, and exits 0 whatever the outcomes are: a non-clean outcome is a finding
about biounet, not a failure of this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import imageio.v3 as iio
import numpy as np
import tifffile

TIMEOUT_S = 120
OUTCOMES = ("clean", "traceback", "silent", "misleading", "multiline", "refused", "crash", "hang", "skipped",
            "setup-error")  # fmt: skip
ERROR_RE = re.compile(r"^(?:biounet(?: [\w-]+)?: error:|error: )")
SUMMARY_RE = re.compile(r"^(?:failed \(\d+\): |segmented \d+ of \d+ image)")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: Options that keep a training run to seconds.
TINY_TRAIN = ["--steps", "2", "--set", "depth=2", "--set", "base_channels=4", "--set", "tile=76",
              "--set", "batch_size=1", "--set", "val_every=1000", "--no-progress"]  # fmt: skip

Setup = Callable[[Path], object]
Check = Callable[[Path], bool]


@dataclass
class Case:
    """One hostile input: how to build it, the command line, and what a good CLI does with it."""

    id: str
    group: str
    what: str
    argv: list[str]
    setup: Setup
    expect: Literal["error", "ok"]
    names: tuple[str, ...]
    must_keep: tuple[str, ...] = ()
    check: Check | None = None
    needs_non_root: bool = False


@dataclass
class Result:
    id: str
    group: str
    what: str
    outcome: str
    rc: int | None
    seconds: float
    error_line: str
    argv: list[str]
    changed: list[str] = field(default_factory=list)
    stderr_tail: str = ""


# --------------------------------------------------------------------------------------------
# building inputs
# --------------------------------------------------------------------------------------------
_CACHE: dict[str, Path] = {}


def blobs(shape: tuple[int, int] = (64, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image of bright disks on a dark background and its uint16 instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i in range(1, 5):
        cy, cx = rng.integers(8, max(9, shape[0] - 8)), rng.integers(8, max(9, shape[1] - 8))
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(16, 50)] = i
    image = (20 + 180 * (labels > 0) + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8)
    return image, labels


def write(path: Path, data: np.ndarray | bytes | str) -> Path:
    """Write bytes, text or an array (by suffix: TIFF, PNG/JPEG, .npy) to ``path``, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    elif path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(path, data)
    elif path.suffix.lower() == ".npy":
        np.save(path, data, allow_pickle=data.dtype == object)
    else:
        iio.imwrite(path, data, extension=path.suffix.lower())
    return path


def image(d: Path, name: str = "x.tif", seed: int = 0) -> Path:
    return write(d / name, blobs(seed=seed)[0])


def dataset(d: Path, folder: str = "data", n: int = 3) -> None:
    """``folder/images`` + ``folder/labels``: ``n`` 64x64 uint8 images and uint16 instance labels."""
    for i in range(n):
        img, lab = blobs(seed=i)
        write(d / folder / "images" / f"s{i}.tif", img)
        write(d / folder / "labels" / f"s{i}.tif", lab)


def cached_model(key: str, **kwargs: Any) -> Path:
    """A tiny model saved once per run of this script (``UNet(**kwargs)``, NaN weights for ``nan=True``)."""
    if key not in _CACHE:
        import torch

        from biounet import UNet

        nan = kwargs.pop("nan", False)
        model = UNet(**{"depth": 1, "base_channels": 2, **kwargs})
        if nan:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        _CACHE[key] = model.save(Path(tempfile.mkdtemp(prefix="torture-model-")) / "model")
    return _CACHE[key]


def model(d: Path, name: str = "model", key: str = "tiny", **kwargs: Any) -> Path:
    target = d / name
    shutil.copytree(cached_model(key, **kwargs), target)
    return target


def edit_config(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads((folder / "config.json").read_text())
    change(document)
    (folder / "config.json").write_text(json.dumps(document, indent=2))


def write_weights(folder: Path, state: dict[str, Any], record_sha: bool = True) -> None:
    """Replace a model's weights with ``state``; record their SHA-256 in config.json unless told not to."""
    from safetensors.torch import save_file

    save_file(state, str(folder / "weights.safetensors"))
    if record_sha:
        sha = hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest()
        edit_config(folder, lambda doc: doc.__setitem__("weights_sha256", sha))


def model_with(change: Callable[[dict[str, Any]], None]) -> Setup:
    """Setup: tiny model ``model/`` whose config.json is edited by ``change``, and image ``x.tif``."""

    def setup(d: Path) -> None:
        edit_config(model(d), change)
        image(d)

    return setup


def model_config_text(text: str | bytes) -> Setup:
    def setup(d: Path) -> None:
        write(model(d) / "config.json", text)
        image(d)

    return setup


def weights_setup(make: Callable[[Path], object]) -> Setup:
    def setup(d: Path) -> None:
        make(model(d))
        image(d)

    return setup


def setups(*steps: Setup) -> Setup:
    def setup(d: Path) -> None:
        for step in steps:
            step(d)

    return setup


def files(**contents: np.ndarray | bytes | str) -> Setup:
    """Setup writing each ``name=data`` (``__`` in a name stands for ``/``)."""

    def setup(d: Path) -> None:
        for name, data in contents.items():
            write(d / name.replace("__", "/"), data)

    return setup


def with_model(*more: Setup) -> Setup:
    """Setup: the tiny model ``model/``, then ``more``."""
    return setups(model, *more)


def at(name: str, seed: int = 0) -> Setup:
    """Setup: a 64x64 test image under ``name``."""
    return lambda d: image(d, name, seed)


def folders(*names: str) -> Setup:
    def setup(d: Path) -> None:
        for name in names:
            (d / name).mkdir(parents=True, exist_ok=True)

    return setup


def run_biounet(d: Path, argv: Sequence[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``python -m biounet argv`` in ``d`` (used by setups and checks; cases go through :func:`execute`)."""
    command = [sys.executable, "-m", "biounet", *argv]
    return subprocess.run(command, cwd=d, capture_output=True, text=True, timeout=timeout, env=child_env(), check=False)


def trained_run(preset: str = "paper") -> Setup:
    """Setup: data set ``data/`` and a finished 2-step run in ``R/``."""

    def setup(d: Path) -> None:
        dataset(d)
        done = run_biounet(d, ["train", "data", "-o", "R", "--preset", preset, *TINY_TRAIN])
        if done.returncode != 0:
            raise RuntimeError(f"setup training failed: {done.stderr.strip()[-400:]}")

    return setup


# --------------------------------------------------------------------------------------------
# checks after a run
# --------------------------------------------------------------------------------------------
def read_tif(path: Path) -> np.ndarray:
    return tifffile.imread(path)


def outputs(stem: str, shape: tuple[int, ...] | None = None, folder: str = "out") -> Check:
    """Check: ``<stem>_probabilities.tif`` (finite, in [0, 1]) and ``<stem>_labels.tif`` exist, of ``shape``."""

    def check(d: Path) -> bool:
        prob_path, labels_path = d / folder / f"{stem}_probabilities.tif", d / folder / f"{stem}_labels.tif"
        if not prob_path.is_file() or not labels_path.is_file():
            return False
        prob, labels = read_tif(prob_path), read_tif(labels_path)
        if not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1:
            return False
        return shape is None or tuple(labels.shape) == shape

    return check


def stdout_has(text: str) -> Check:
    return lambda d: text in (d / "torture.stdout").read_text()


def exists(*names: str) -> Check:
    return lambda d: all((d / n).exists() for n in names)


def resume_still_works(d: Path) -> bool:
    """Check: the refused resume left a run that a plain ``--resume`` continues, recipe unchanged."""
    done = run_biounet(d, ["train", "data", "-o", "R", "--resume", "--no-progress"])
    recipe = json.loads((d / "R" / "train_config.json").read_text())
    return done.returncode == 0 and recipe.get("optimizer") == "adamw"


# --------------------------------------------------------------------------------------------
# running and classifying
# --------------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"  # a long training run may share the CPU
    env["PYTHONUNBUFFERED"] = "1"
    return env


def snapshot(d: Path) -> dict[str, bytes]:
    """The bytes of every regular file under ``d`` (symlinks and unreadable files skipped)."""
    found: dict[str, bytes] = {}
    for path in d.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(d).as_posix()] = path.read_bytes()
        except OSError:
            continue
    return found


def changed_files(d: Path, before: dict[str, bytes]) -> list[str]:
    after = snapshot(d)
    return sorted(name for name, data in before.items() if after.get(name) != data)


def execute(argv: Sequence[str], cwd: Path) -> tuple[int | None, str, str, float]:
    """Run ``python -m biounet argv`` in its own process group; (status or None on timeout, stdout, stderr, s)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "biounet", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", env=child_env(),
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the case's own process group, started above
        out, err = proc.communicate()
        rc = None
    return rc, out, err, time.perf_counter() - started


def stderr_lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def error_text(stderr: str, stdout: str, rc: int | None) -> list[str]:
    """The error lines: from the first error line to the end, predict's summary lines left out."""
    lines = stderr_lines(stderr)
    first = next((i for i, line in enumerate(lines) if ERROR_RE.match(line)), None)
    if first is None:
        out = stderr_lines(stdout)
        return out[:1] if rc == 2 and not lines and out and out[0].startswith("usage:") else []
    return [line for line in lines[first:] if not SUMMARY_RE.match(line)]


def names_all(line: str, names: Sequence[str]) -> bool:
    return all(any(alt in line for alt in name.split("|")) for name in names)


def classify(case: Case, rc: int | None, stdout: str, stderr: str, kept: bool, checked: bool) -> str:
    """The outcome of one run (see the module docstring for the rules, in this order)."""
    if rc is None:
        return "hang"
    if "Traceback" in stderr or "unexpected " in stderr:
        return "traceback"
    if rc < 0 or rc not in (0, 1, 2):
        return "crash"
    if not kept or not checked:
        return "silent"
    if case.expect == "ok":
        return "clean" if rc == 0 else "refused"
    if rc == 0:
        return "silent"
    text = error_text(stderr, stdout, rc)
    if not text:
        return "misleading"
    if len(text) > 1:
        return "multiline"
    return "clean" if names_all(text[0], case.names) else "misleading"


def shown_line(stderr: str, stdout: str, rc: int | None) -> str:
    """The line for the table: the first error line, else the last stderr line."""
    text = error_text(stderr, stdout, rc)
    if text:
        return text[0]
    lines = stderr_lines(stderr)
    unexpected = [line for line in lines if "unexpected " in line]
    return (unexpected or lines or ["(no stderr)" if rc is not None else "(timeout)"])[-1]


def substitute(argv: Sequence[str], d: Path) -> list[str]:
    return [arg.replace("{d}", str(d)) for arg in argv]


def restore_permissions(d: Path) -> None:
    for path in [d, *d.rglob("*")]:
        try:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        except OSError:
            continue


def run_case(case: Case, base: Path, keep: bool) -> Result:
    if case.needs_non_root and IS_ROOT:
        return Result(case.id, case.group, case.what, "skipped", None, 0.0, "(running as root)", case.argv)
    d = Path(tempfile.mkdtemp(prefix=f"{case.id}-", dir=base))
    argv = substitute(case.argv, d)
    try:
        case.setup(d)
        before = snapshot(d)
        rc, out, err, seconds = execute(argv, d)
        (d / "torture.stdout").write_text(out)
        changed = changed_files(d, before)
        kept = not any(name in changed for name in case.must_keep)
        checked, why = True, ""
        if case.check is not None and rc is not None:
            try:
                checked = bool(case.check(d))
            except Exception as exc:  # noqa: BLE001 - a check that cannot read what it expects: the run did not deliver
                checked, why = False, f" ({type(exc).__name__}: {exc})"
        outcome = classify(case, rc, out, err, kept, checked)
        line = shown_line(err, out, rc)
        if outcome == "silent" and (not kept or not checked):
            line = f"{'changed ' + ', '.join(changed) if not kept else 'check failed' + why}; {line}"
        return Result(case.id, case.group, case.what, outcome, rc, seconds, line, argv, changed, err[-2000:])
    except Exception as exc:  # noqa: BLE001 - a broken setup is this script's bug; report it and go on
        return Result(case.id, case.group, case.what, "setup-error", None, 0.0, f"{type(exc).__name__}: {exc}", argv)
    finally:
        restore_permissions(d)
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------
def predict(*inputs: str, out: str = "out", model_arg: str = "model", extra: Sequence[str] = ()) -> list[str]:
    return ["predict", "--model", model_arg, "--no-progress", "-o", out, *extra, *inputs]


def evaluate(*args: str) -> list[str]:
    return ["evaluate", "--no-progress", *args]


def train(*args: str, tiny: bool = True) -> list[str]:
    return ["train", *args, *(TINY_TRAIN if tiny else ["--no-progress"])]


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def tif_bytes(array: np.ndarray, **kwargs: Any) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.tif"
        tifffile.imwrite(path, array, **kwargs)
        return path.read_bytes()


def png_bytes(array: np.ndarray) -> bytes:
    return iio.imwrite("<bytes>", array, extension=".png")


def float_image(value: float) -> np.ndarray:
    img = blobs()[0].astype(np.float32)
    img[10, 10] = value
    return img


def symlink(link: str, target: str) -> Setup:
    return lambda d: os.symlink(target, d / link)


def chmod(name: str, mode: int) -> Setup:
    return lambda d: (d / name).chmod(mode)


def rng_bytes(n: int = 4096) -> bytes:
    return np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()


def image_cases() -> list[Case]:
    g = "images"
    rgba = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    huge = np.random.default_rng(0).integers(0, 2**62, (64, 64), dtype=np.int64)
    wide = np.where(blobs()[1] > 0, np.iinfo(np.uint64).max, 0).astype(np.uint64)
    stack5 = np.stack([blobs(seed=i)[0] for i in range(8)]).reshape(2, 2, 2, 64, 64)
    nuclei = ["predict", "--model", "nuclei", "--no-progress", "-o", "out"]
    # fmt: off
    return [
        Case("img-empty-tif", g, "0-byte .tif", predict("empty.tif"), with_model(files(**{"empty.tif": b""})),
             "error", ("empty.tif",)),
        Case("img-random-tif", g, "random bytes named .tif", predict("r.tif"),
             with_model(files(**{"r.tif": rng_bytes()})), "error", ("r.tif",)),
        Case("img-random-png", g, "random bytes named .png", predict("r.png"),
             with_model(files(**{"r.png": rng_bytes()})), "error", ("r.png",)),
        Case("img-random-jpg", g, "random bytes named .jpg", predict("r.jpg"),
             with_model(files(**{"r.jpg": rng_bytes()})), "error", ("r.jpg",)),
        Case("img-truncated-tif", g, "TIFF cut in half (uncompressed strips)", predict("t.tif"),
             with_model(files(**{"t.tif": truncated(tif_bytes(blobs((128, 128))[0]))})), "error", ("t.tif",)),
        Case("img-truncated-tif-zlib", g, "zlib TIFF cut in half", predict("t.tif"),
             with_model(files(**{"t.tif": truncated(tif_bytes(blobs((128, 128))[0], compression="zlib"))})),
             "error", ("t.tif",)),
        Case("img-truncated-png", g, "PNG cut in half", predict("t.png"),
             with_model(files(**{"t.png": truncated(png_bytes(blobs((128, 128))[0]))})), "error", ("t.png",)),
        Case("img-png-named-tif", g, "a PNG file named .tif", predict("p.tif"),
             with_model(files(**{"p.tif": png_bytes(blobs()[0])})), "error", ("p.tif",)),
        Case("img-nan-tif", g, "float32 TIFF with a NaN pixel", predict("n.tif"),
             with_model(files(**{"n.tif": float_image(np.nan)})), "error", ("n.tif", "NaN|nan|finite")),
        Case("img-inf-tif", g, "float32 TIFF with an inf pixel", predict("i.tif"),
             with_model(files(**{"i.tif": float_image(np.inf)})), "error", ("i.tif", "inf|finite")),
        Case("img-1x1", g, "a 1x1 image (should segment to 1x1)", predict("one.tif"),
             with_model(files(**{"one.tif": np.full((1, 1), 7, np.uint8)})), "ok", (), check=outputs("one", (1, 1))),
        Case("img-constant-float", g, "a constant float image", predict("c.tif"),
             with_model(files(**{"c.tif": np.full((64, 64), 3.5, np.float32)})), "ok", (),
             check=outputs("c", (64, 64))),
        Case("img-zero-npy", g, "a 0x0 array .npy", predict("z.npy"),
             with_model(files(**{"z.npy": np.zeros((0, 0), np.float32)})), "error", ("z.npy",)),
        Case("img-zero-rows-npy", g, "a 0x64 array .npy", predict("z.npy"),
             with_model(files(**{"z.npy": np.zeros((0, 64), np.uint8)})), "error", ("z.npy",)),
        Case("img-1d-npy", g, "a 1-D array .npy", predict("v.npy"),
             with_model(files(**{"v.npy": np.arange(64, dtype=np.uint8)})), "error", ("v.npy",)),
        Case("img-scalar-npy", g, "a 0-D array .npy", predict("s.npy"),
             with_model(files(**{"s.npy": np.array(3.0)})), "error", ("s.npy",)),
        Case("img-bool-npy", g, "a bool image .npy", predict("b.npy"),
             with_model(files(**{"b.npy": blobs()[1] > 0})), "ok", (), check=outputs("b", (64, 64))),
        Case("img-bool-tif", g, "a bool (bilevel) TIFF", predict("b.tif"),
             with_model(files(**{"b.tif": blobs()[1] > 0})), "ok", (), check=outputs("b", (64, 64))),
        Case("img-complex-npy", g, "a complex-valued .npy", predict("c.npy"),
             with_model(files(**{"c.npy": blobs()[0].astype(np.complex64)})), "error", ("c.npy",)),
        Case("img-object-npy", g, "a pickled object array .npy", predict("o.npy"),
             with_model(files(**{"o.npy": np.array([{"a": 1}, None], dtype=object)})), "error", ("o.npy",)),
        Case("img-int64-huge", g, "int64 pixels up to 2**62 (should segment)", predict("h.npy"),
             with_model(files(**{"h.npy": huge})), "ok", (), check=outputs("h", (64, 64))),
        Case("img-uint64-max", g, "uint64 pixels 0 or 2**64-1 (should segment)", predict("w.npy"),
             with_model(files(**{"w.npy": wide})), "ok", (), check=outputs("w", (64, 64))),
        Case("img-5d-tif", g, "5-D TIFF (2x2x2 stack of 64x64, no channels)", predict("s5.tif"),
             with_model(files(**{"s5.tif": stack5})), "ok", (), check=outputs("s5", (2, 2, 2, 64, 64))),
        Case("img-5d-imagej-2ch", g, "ImageJ TZCYX TIFF with 2 channels, 1-channel model", predict("h.tif"),
             with_model(lambda d: tifffile.imwrite(d / "h.tif", stack5, imagej=True, metadata={"axes": "TZCYX"})),
             "error", ("h.tif", "channel")),
        Case("img-rgba-png", g, "colour RGBA PNG, gray model", predict("c.png"),
             with_model(files(**{"c.png": rgba})), "error", ("c.png", "channel")),
        Case("img-rgba-png-nuclei", g, "colour RGBA PNG, shipped luminance model nuclei (should segment)",
             [*nuclei, "c.png"], files(**{"c.png": rgba}), "ok", (), check=outputs("c", (64, 64))),
        Case("img-16bit-png", g, "16-bit gray PNG (should segment)", predict("s.png"),
             with_model(files(**{"s.png": (blobs()[0].astype(np.uint16) * 250)})), "ok", (),
             check=outputs("s", (64, 64))),
        Case("img-empty-folder", g, "a folder with no images as input", predict("emptydir"),
             with_model(folders("emptydir")), "error", ("emptydir", "folder|directory|no image")),
        Case("img-missing", g, "a missing file", predict("missing.tif"), with_model(), "error", ("missing.tif",)),
        Case("img-dir-as-file", g, "a folder named stack.tif (with an image in it)", predict("stack.tif"),
             with_model(at("stack.tif/a.tif")), "error",
             ("stack.tif", "folder|directory|not a file")),
        Case("img-symlink-loop", g, "a symlink loop loop.tif -> loop2.tif -> loop.tif", predict("loop.tif"),
             with_model(symlink("loop.tif", "loop2.tif"), symlink("loop2.tif", "loop.tif")), "error",
             ("loop.tif",)),
        Case("img-dangling-symlink", g, "a symlink to a missing file", predict("dang.tif"),
             with_model(symlink("dang.tif", "gone.tif")), "error", ("dang.tif",)),
        Case("img-unreadable", g, "chmod 000 image", predict("x.tif"), with_model(image, chmod("x.tif", 0)),
             "error", ("x.tif",), needs_non_root=True),
        Case("img-unicode-name", g, "spaces and unicode in the name (should segment)",
             predict("my cells ü 細胞.tif"), with_model(at("my cells ü 細胞.tif")), "ok",
             (), must_keep=("my cells ü 細胞.tif",), check=outputs("my cells ü 細胞", (64, 64))),
        Case("img-uppercase-suffix", g, "X.TIF upper-case suffix (should segment)", predict("X.TIF"),
             with_model(at("X.TIF")), "ok", (), check=outputs("X", (64, 64))),
        Case("img-unsupported-suffix", g, "a .bmp file", predict("x.bmp"),
             with_model(files(**{"x.bmp": rng_bytes(100)})), "error", ("x.bmp",)),
        Case("img-named-like-output", g, "x_labels.tif as the input, -o its own folder (should segment)",
             predict("x_labels.tif", out="."), with_model(at("x_labels.tif")), "ok", (),
             must_keep=("x_labels.tif",), check=outputs("x_labels", (64, 64), folder=".")),
        Case("img-output-is-input", g, "inputs x.tif and x_labels.tif, -o their folder",
             predict("x.tif", "x_labels.tif", out="."),
             with_model(image, at("x_labels.tif", 1)), "error", ("x.tif", "x_labels.tif"),
             must_keep=("x.tif", "x_labels.tif")),
        Case("img-output-is-input-overwrite", g, "as img-output-is-input, with --overwrite",
             predict("x.tif", "x_labels.tif", out=".", extra=["--overwrite"]),
             with_model(image, at("x_labels.tif", 1)), "error", ("x.tif", "x_labels.tif"),
             must_keep=("x.tif", "x_labels.tif")),
        Case("img-one-bad-of-two", g, "a good and an empty file: the good one is still segmented",
             predict("x.tif", "empty.tif"), with_model(image, files(**{"empty.tif": b""})), "error",
             ("empty.tif",), check=outputs("x", (64, 64))),
    ]
    # fmt: on


def _arch(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["architecture"].__setitem__(key, value)


def _top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.__setitem__(key, value)


def _nan_token(folder: Path) -> None:
    text = (folder / "config.json").read_text()
    document = json.loads(text)
    document["normalization"] = [1.0, float("nan")]
    (folder / "config.json").write_text(json.dumps(document))  # json writes the bare token NaN


def _other_shape(folder: Path) -> None:
    from safetensors.torch import load_file

    write_weights(folder, load_file(str(cached_model("wide", base_channels=4) / "weights.safetensors")))


def _swapped(folder: Path) -> None:
    shutil.copy(cached_model("wide", base_channels=4) / "weights.safetensors", folder / "weights.safetensors")


def _int_weights(folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "weights.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].to(dtype=__import__("torch").int32)
    write_weights(folder, state)


def _missing_tensor(folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(folder / "weights.safetensors"))
    state.pop(next(iter(state)))
    write_weights(folder, state)


def _nan_weights(folder: Path) -> None:
    shutil.rmtree(folder)
    shutil.copytree(cached_model("nan", nan=True), folder)


def model_cases() -> list[Case]:
    g = "model"
    x = predict("x.tif")

    def cfg(id_: str, what: str, change: Callable[[dict[str, Any]], None], names: tuple[str, ...]) -> Case:
        return Case(id_, g, what, x, model_with(change), "error", names)

    def weights(id_: str, what: str, make: Callable[[Path], object]) -> Case:
        return Case(id_, g, what, x, weights_setup(make), "error", ("weights.safetensors",))

    # fmt: off
    return [
        Case("model-missing", g, "--model folder that does not exist", predict("x.tif", model_arg="nomodel"),
             image, "error", ("nomodel",)),
        Case("model-empty-folder", g, "--model an empty folder", predict("x.tif", model_arg="empty"),
             setups(folders("empty"), image), "error", ("empty",)),
        Case("model-config-not-json", g, "config.json is not JSON", x, model_config_text("{not json"), "error",
             ("config.json",)),
        Case("model-config-list", g, "config.json is a JSON list", x, model_config_text("[1, 2]"), "error",
             ("config.json",)),
        Case("model-config-latin1", g, "config.json in Latin-1 (not UTF-8)", x,
             model_config_text('{"format_version": 1, "name": "caf\xe9"}'.encode("latin-1")), "error",
             ("config.json",)),
        Case("model-config-is-folder", g, "config.json is a folder", x,
             setups(lambda d: (model(d) / "config.json").unlink(), folders("model/config.json"), image), "error",
             ("model",)),
        cfg("model-format-99", "format_version 99", _top("format_version", 99), ("config.json", "format_version")),
        cfg("model-format-string", 'format_version "1"', _top("format_version", "1"),
            ("config.json", "format_version")),
        cfg("model-arch-null", "architecture null", _top("architecture", None), ("config.json", "architecture")),
        cfg("model-arch-unknown", "unknown architecture field bogus", _arch("bogus", 1), ("config.json", "bogus")),
        cfg("model-base-channels-huge", "base_channels 1000000", _arch("base_channels", 1000000),
            ("config.json", "base_channels")),
        cfg("model-depth-string", 'depth "4"', _arch("depth", "4"), ("config.json", "depth")),
        cfg("model-depth-float", "depth 1.0", _arch("depth", 1.0), ("config.json", "depth")),
        cfg("model-padding-bogus", 'padding "full"', _arch("padding", "full"), ("config.json", "padding")),
        cfg("model-postprocess-bogus", 'postprocess {"bogus": 1}', _top("postprocess", {"bogus": 1}),
            ("config.json", "bogus")),
        cfg("model-postprocess-threshold", 'postprocess {"threshold": "high"}',
            _top("postprocess", {"threshold": "high"}), ("config.json", "threshold")),
        cfg("model-postprocess-list", "postprocess [1]", _top("postprocess", [1]), ("config.json", "postprocess")),
        cfg("model-norm-one", "normalization [5]", _top("normalization", [5]), ("config.json", "normalization")),
        cfg("model-norm-reversed", "normalization [99, 1]", _top("normalization", [99, 1]),
            ("config.json", "normalization")),
        Case("model-norm-nan-token", g, "normalization [1, NaN] (bare NaN token)", x, weights_setup(_nan_token),
             "error", ("config.json", "normalization")),
        cfg("model-norm-nan-string", 'normalization [1, "NaN"]', _top("normalization", [1, "NaN"]),
            ("config.json", "normalization")),
        cfg("model-class-names", "class_names of length 1 for 2 classes", _top("class_names", ["cell"]),
            ("config.json", "class_names")),
        cfg("model-color-bogus", 'color "purple"', _top("color", "purple"), ("config.json", "color")),
        Case("model-in-channels-3", g, "3-channel model, gray image", x,
             setups(lambda d: model(d, key="rgb", in_channels=3), image), "error", ("x.tif", "channel")),
        weights("model-weights-missing", "weights.safetensors missing",
                lambda f: (f / "weights.safetensors").unlink()),
        weights("model-weights-empty", "weights.safetensors empty", lambda f: write(f / "weights.safetensors", b"")),
        weights("model-weights-truncated", "weights.safetensors cut in half",
                lambda f: write(f / "weights.safetensors", truncated((f / "weights.safetensors").read_bytes()))),
        weights("model-weights-pickle", "weights.safetensors is a Python pickle",
                lambda f: write(f / "weights.safetensors", pickle.dumps({"weight": [1.0, 2.0]}))),
        weights("model-weights-swapped", "weights of another model (SHA-256 not updated)", _swapped),
        weights("model-weights-other-shape", "weights of a wider model (SHA-256 updated)", _other_shape),
        weights("model-weights-int", "one tensor stored as int32 (SHA-256 updated)", _int_weights),
        weights("model-weights-missing-tensor", "one tensor left out (SHA-256 updated)", _missing_tensor),
        weights("model-weights-nan", "a NaN weight (saved so by UNet.save)", _nan_weights),
        Case("model-path-escape", g, "--model ../../etc", predict("x.tif", model_arg="../../etc"), image, "error",
             ("../../etc",)),
        Case("model-unknown-name", g, "--model nucleii (misspelt shipped name)", predict("x.tif", model_arg="nucleii"),
             image, "error", ("nucleii",)),
        Case("model-cwd-nuclei-folder", g, "a data folder named nuclei in cwd (shipped model used)",
             predict("x.tif", model_arg="nuclei"), setups(image, files(**{"nuclei__notes.txt": "my data"})), "ok",
             (), check=outputs("x", (64, 64))),
    ]
    # fmt: on


def option_cases() -> list[Case]:
    g = "predict options"

    def opt(id_: str, what: str, extra: list[str], names: tuple[str, ...]) -> Case:
        return Case(id_, g, what, predict("x.tif", extra=extra), with_model(image), "error", names)

    gt_setup = with_model(at("g/x.tif"), files(**{"g__x_labels.tif": blobs()[1]}))
    # fmt: off
    return [
        opt("opt-tile-0", "--tile 0", ["--tile", "0"], ("tile",)),
        opt("opt-tile-neg", "--tile -5", ["--tile", "-5"], ("tile",)),
        Case("opt-tile-3", g, "--tile 3: the model's smallest tile is used, with a warning (should segment)",
             predict("x.tif", extra=["--tile", "3"]), with_model(image), "ok", ()),
        opt("opt-batch-0", "--batch-size 0", ["--batch-size", "0"], ("batch",)),
        opt("opt-batch-neg", "--batch-size -2", ["--batch-size", "-2"], ("batch",)),
        opt("opt-device-bogus", "--device bogus", ["--device", "bogus"], ("bogus",)),
        opt("opt-device-cuda", "--device cuda (CPU-only torch)", ["--device", "cuda"], ("cuda",)),
        opt("opt-device-cuda7", "--device cuda:7", ["--device", "cuda:7"], ("cuda:7",)),
        opt("opt-precision-bogus", "--precision bogus", ["--precision", "bogus"], ("precision", "bogus")),
        opt("opt-compile-bogus", "--compile bogus", ["--compile", "bogus"], ("compile",)),
        opt("opt-save-bogus", "--save labels,bogus", ["--save", "labels,bogus"], ("bogus",)),
        opt("opt-save-empty", "--save ,", ["--save", ","], ("save",)),
        opt("opt-chunk-0", "--chunk 0", ["--chunk", "0"], ("chunk",)),
        opt("opt-chunk-tta", "--chunk 32 --tta", ["--chunk", "32", "--tta"], ("tta",)),
        opt("opt-channel-axis-9", "--channel-axis 9 on a 2-D image", ["--channel-axis", "9"], ("x.tif", "axis")),
        opt("opt-scheduler-unreachable", "--scheduler tcp://127.0.0.1:9 (nothing listens)",
            ["--scheduler", "tcp://127.0.0.1:9"], ("127.0.0.1:9",)),
        Case("opt-no-input", g, "a model and no input image", ["predict", "model", "-o", "out"], with_model(),
             "error", ("input",)),
        Case("opt-no-output", g, "no -o", ["predict", "--model", "model", "x.tif"], with_model(image), "error",
             ("-o|--output",)),
        Case("opt-tta-ok", g, "--tta (should segment)", predict("x.tif", extra=["--tta"]), with_model(image), "ok",
             (), check=outputs("x", (64, 64))),
        Case("opt-chunk-ok", g, "--chunk 32 streams a TIFF into tiled TIFFs (should segment)",
             predict("x.tif", extra=["--chunk", "32"]), with_model(image), "ok", (),
             check=exists("out/x_probabilities.tif", "out/x_labels.tif")),
        Case("opt-chunk-ome-zarr-ok", g, "--chunk 32 --format ome-zarr --pyramid 2 (should segment)",
             predict("x.tif", extra=["--chunk", "32", "--format", "ome-zarr", "--pyramid", "2"]), with_model(image),
             "ok", (), check=exists("out/x_probabilities.ome.zarr/1", "out/x_probabilities.ome.zarr/labels/cell/1")),
        Case("opt-out-is-file", g, "-o names an existing file", predict("x.tif", out="out.txt"),
             with_model(image, files(**{"out.txt": "keep me"})), "error", ("out.txt",), must_keep=("out.txt",)),
        Case("opt-out-readonly", g, "-o inside a chmod 555 folder", predict("x.tif", out="ro/out"),
             with_model(image, folders("ro"), chmod("ro", 0o555)), "error", ("ro/out",), needs_non_root=True),
        Case("opt-outputs-collide", g, "a/x.tif and b/x.tif into one -o", predict("a/x.tif", "b/x.tif"),
             with_model(at("a/x.tif"), at("b/x.tif", 1)), "error",
             ("a/x.tif", "b/x.tif")),
        Case("opt-gt-overwrite", g, "-o g where g/x_labels.tif (ground truth) exists", predict("g/x.tif", out="g"),
             gt_setup, "error", ("g/x_labels.tif",), must_keep=("g/x_labels.tif", "g/x.tif")),
        Case("opt-gt-overwrite-allowed", g, "as opt-gt-overwrite with --overwrite (should replace it)",
             predict("g/x.tif", out="g", extra=["--overwrite"]), gt_setup, "ok", (), must_keep=("g/x.tif",),
             check=outputs("x", (64, 64), folder="g")),
    ]
    # fmt: on


def evaluation_cases() -> list[Case]:
    g = "evaluate"
    img, lab = blobs()
    prob = np.stack([1.0 - (lab > 0), (lab > 0) * 1.0]).astype(np.float32)
    pair = files(**{"pred__a_labels.tif": lab, "pred__a_probabilities.tif": prob, "gt__a.tif": lab})

    def ev(
        id_: str,
        what: str,
        args: list[str],
        names: tuple[str, ...],
        setup: Setup = pair,
        must_keep: tuple[str, ...] = ("gt/a.tif",),
    ) -> Case:
        return Case(id_, g, what, evaluate(*args), setup, "error", names, must_keep=must_keep)

    # fmt: off
    return [
        ev("ev-missing-gt", "--gt a missing file", ["pred", "--gt", "nogt.tif"], ("nogt.tif",)),
        ev("ev-missing-pred", "a missing prediction file", ["nopred.tif", "--gt", "gt"], ("nopred.tif",)),
        ev("ev-shape-mismatch", "prediction 64x64, ground truth 32x32", ["pred/a_labels.tif", "--gt", "g/a.tif"],
           ("a_labels.tif", "g/a.tif"), files(**{"pred__a_labels.tif": lab, "g__a.tif": lab[:32, :32]}), ()),
        ev("ev-threshold-2", "--metrics cells --threshold 2", ["pred", "--gt", "gt", "--metrics", "cells",
                                                                "--threshold", "2"], ("threshold",)),
        ev("ev-threshold-nan", "--threshold nan", ["pred", "--gt", "gt", "--threshold", "nan"], ("threshold",)),
        ev("ev-split-bogus", "--split bogus", ["pred", "--gt", "gt", "--split", "bogus"], ("split",)),
        ev("ev-min-size-neg", "--min-size -1", ["pred", "--gt", "gt", "--min-size", "-1"], ("min_size|min-size",)),
        ev("ev-report-txt", "-o report.txt", ["pred", "--gt", "gt", "-o", "report.txt"], ("report.txt",)),
        ev("ev-report-missing-folder", "-o nofolder/r.csv", ["pred", "--gt", "gt", "-o", "nofolder/r.csv"],
           ("nofolder",)),
        ev("ev-report-is-folder", "-o rep.json, an existing folder", ["pred", "--gt", "gt", "-o", "rep.json"],
           ("rep.json",), setups(pair, folders("rep.json"))),
        ev("ev-no-matching-names", "prediction a, ground truth b", ["pred", "--gt", "gt"], ("a_labels.tif|pred/a",),
           files(**{"pred__a_labels.tif": lab, "gt__b.tif": lab}), ()),
        ev("ev-empty-pred-folder", "an empty prediction folder", ["pred", "--gt", "gt"], ("pred",),
           setups(files(**{"gt__a.tif": lab}), folders("pred"))),
        ev("ev-gt-duplicate-keys", "ground truth a.tif and a.png", ["pred", "--gt", "gt"], ("a.tif", "a.png"),
           files(**{"pred__a_labels.tif": lab, "gt__a.tif": lab, "gt__a.png": lab.astype(np.uint8)}), ()),
        ev("ev-gt-is-probabilities", "probabilities given as ground truth (swapped)",
           ["a_labels.tif", "--gt", "a_probabilities.tif"], ("a_probabilities.tif",),
           files(**{"a_labels.tif": lab, "a_probabilities.tif": prob}), ()),
        ev("ev-pred-raw-intensity", "float prediction in 0..255 (an image, not probabilities)",
           ["a_pred.tif", "--gt", "a.tif"], ("a_pred.tif",),
           files(**{"a_pred.tif": img.astype(np.float32), "a.tif": lab}), ()),
        ev("ev-pred-nan", "probabilities with a NaN", ["a_prob.tif", "--gt", "a.tif"], ("a_prob.tif",),
           files(**{"a_prob.tif": np.where(lab > 0, np.nan, 0.2).astype(np.float32), "a.tif": lab}), ()),
        ev("ev-labels-with-threshold", "label prediction with --threshold 0.3 (applies to probabilities)",
           ["a_labels.tif", "--gt", "a.tif", "--metrics", "cells", "--threshold", "0.3"], ("a_labels.tif",),
           files(**{"a_labels.tif": lab, "a.tif": lab}), ()),
        ev("ev-isbi-3d", "3-D label images with --metrics isbi", ["a_labels.tif", "--gt", "a.tif", "--metrics", "isbi"],
           ("a_labels.tif", "2D|2-D"), files(**{"a_labels.tif": np.stack([lab] * 3), "a.tif": np.stack([lab] * 3)}),
           ()),
        ev("ev-gt-float", "float ground truth", ["a_labels.tif", "--gt", "a.tif"], ("a.tif",),
           files(**{"a_labels.tif": lab, "a.tif": lab.astype(np.float32)}), ()),
        Case("ev-ok", g, "a predict folder against ground truth, -o r.json (should score)",
             evaluate("pred", "--gt", "gt", "--no-warping", "-o", "r.json"), pair, "ok", (),
             must_keep=("gt/a.tif", "pred/a_labels.tif"), check=exists("r.json")),
    ]
    # fmt: on


def training_cases() -> list[Case]:
    g = "train"
    data = dataset

    def tr(
        id_: str,
        what: str,
        args: list[str],
        names: tuple[str, ...],
        setup: Setup = data,
        tiny: bool = True,
        must_keep: tuple[str, ...] = (),
    ) -> Case:
        return Case(id_, g, what, train(*args, tiny=tiny), setup, "error", names, must_keep=must_keep)

    def bad_labels(d: Path) -> None:
        dataset(d)
        write(d / "data" / "labels" / "s1.tif", blobs((48, 64))[1])

    def no_labels(d: Path) -> None:
        dataset(d)
        shutil.rmtree(d / "data" / "labels")

    def float_labels(d: Path) -> None:
        dataset(d)
        write(d / "data" / "labels" / "s1.tif", blobs(seed=1)[1].astype(np.float32) + 0.5)

    def nan_image(d: Path) -> None:
        dataset(d)
        write(d / "data" / "images" / "s2.tif", float_image(np.nan))

    def garbage_checkpoint(d: Path) -> None:
        trained_run()(d)
        write(d / "R" / "checkpoint.pt", rng_bytes(1000))

    def foreign_checkpoint(d: Path) -> None:
        import torch

        trained_run()(d)
        torch.save({"x": 1}, d / "R" / "checkpoint.pt")

    def garbage_run_config(d: Path) -> None:
        trained_run()(d)
        write(d / "R" / "train_config.json", "{not json")

    run_files = ("R/checkpoint.pt", "R/train_config.json", "R/last/weights.safetensors")
    # fmt: off
    return [
        tr("tr-missing-data", "a missing data folder", ["nodata", "-o", "R"], ("nodata",), lambda d: None),
        tr("tr-data-is-file", "the data folder is a file", ["data.tif", "-o", "R"],
           ("data.tif", "not a folder|not a directory|is a file|a file, not a"), lambda d: image(d, "data.tif")),
        tr("tr-no-labels", "images/ without labels/", ["data", "-o", "R"], ("data|labels",), no_labels),
        tr("tr-label-shape", "a label image 48x64 for a 64x64 image", ["data", "-o", "R"], ("s1",), bad_labels),
        tr("tr-label-float", "a float label image with fractions", ["data", "-o", "R"], ("s1",), float_labels),
        tr("tr-nan-image", "an image with a NaN pixel", ["data", "-o", "R"], ("s2",), nan_image),
        tr("tr-steps-0", "--steps 0", ["data", "-o", "R", "--steps", "0"], ("steps",), tiny=False),
        tr("tr-steps-neg", "--steps -1", ["data", "-o", "R", "--steps", "-1"], ("steps",), tiny=False),
        tr("tr-set-w0-abc", "--set w0=abc", ["data", "-o", "R", "--set", "w0=abc"], ("w0",)),
        tr("tr-set-bogus", "--set bogus=1", ["data", "-o", "R", "--set", "bogus=1"], ("bogus",)),
        tr("tr-set-no-equals", "--set depth (no value)", ["data", "-o", "R", "--set", "depth"], ("depth",)),
        tr("tr-set-lr-neg", "--set lr=-1", ["data", "-o", "R", "--set", "lr=-1"], ("lr",)),
        tr("tr-set-norm-reversed", "--set normalization=[99,1]", ["data", "-o", "R", "--set",
                                                                 "normalization=[99,1]"], ("normalization",)),
        tr("tr-set-dropout-1", "--set dropout=1.0", ["data", "-o", "R", "--set", "dropout=1.0"], ("dropout",)),
        tr("tr-minutes-0", "--minutes 0", ["data", "-o", "R", "--minutes", "0"], ("minutes",)),
        tr("tr-minutes-neg", "--minutes -3", ["data", "-o", "R", "--minutes", "-3"], ("minutes",)),
        tr("tr-minutes-nan", "--minutes nan", ["data", "-o", "R", "--minutes", "nan"], ("minutes",)),
        tr("tr-val-fraction-big", "--val-fraction 1.5", ["data", "-o", "R", "--val-fraction", "1.5"], ("fraction",)),
        tr("tr-val-fraction-all", "--val-fraction 0.99 of 3 images", ["data", "-o", "R", "--val-fraction", "0.99"],
           ("hold out|fraction",)),
        tr("tr-val-missing", "--val a missing folder", ["data", "-o", "R", "--val", "noval"], ("noval",)),
        tr("tr-device-bogus", "--device bogus", ["data", "-o", "R", "--device", "bogus"], ("bogus",)),
        tr("tr-layout-ctc", "--layout ctc on an images/+labels/ folder", ["data", "-o", "R", "--layout", "ctc"],
           ("data",)),
        tr("tr-out-is-file", "-o names an existing file", ["data", "-o", "run.txt"], ("run.txt",),
           setups(data, files(**{"run.txt": "keep me"})), must_keep=("run.txt",)),
        tr("tr-config-invalid", "--config with invalid TOML", ["data", "-o", "R", "--config", "bad.toml"],
           ("bad.toml",), setups(data, files(**{"bad.toml": "lr = = 3\n[["}))),
        tr("tr-config-missing", "--config a missing file", ["data", "-o", "R", "--config", "nope.toml"],
           ("nope.toml",)),
        tr("tr-config-unknown", "--config with an unknown key", ["data", "-o", "R", "--config", "c.toml"],
           ("c.toml", "bogus"), setups(data, files(**{"c.toml": "bogus = 1\n"}))),
        tr("tr-config-bad-type", '--config with steps = "ten"', ["data", "-o", "R", "--config", "c.toml"],
           ("c.toml", "steps"), setups(data, files(**{"c.toml": 'steps = "ten"\n'})), tiny=False),
        tr("tr-existing-run", "train into a folder holding a run, no --resume", ["data", "-o", "R"], ("R",),
           trained_run(), must_keep=run_files),
        Case("tr-resume-changed-optimizer", g, "--resume --set optimizer=\"sgd\" on an adamw run; then plain --resume",
             ["train", "data", "-o", "R", "--resume", "--set", 'optimizer="sgd"', "--no-progress"], trained_run("fast"),
             "error", ("optimizer",), must_keep=run_files, check=resume_still_works),
        # a scheduler resubmits the same command with --resume: with no checkpoint yet it starts anew (with a warning)
        Case("tr-resume-empty", g, "--resume on an empty folder (should train, with a warning)",
             train("data", "-o", "R", "--resume"), setups(data, folders("R")), "ok", ()),
        Case("tr-resume-missing", g, "--resume on a missing folder (should train, with a warning)",
             train("data", "-o", "R", "--resume"), data, "ok", ()),
        tr("tr-resume-garbage-checkpoint", "--resume with random bytes as checkpoint.pt",
           ["data", "-o", "R", "--resume"], ("checkpoint.pt",), garbage_checkpoint, tiny=False, must_keep=run_files),
        tr("tr-resume-foreign-checkpoint", "--resume with torch.save({'x': 1}) as checkpoint.pt",
           ["data", "-o", "R", "--resume"], ("checkpoint.pt",), foreign_checkpoint, tiny=False, must_keep=run_files),
        tr("tr-resume-garbage-config", "--resume with train_config.json not JSON", ["data", "-o", "R", "--resume"],
           ("train_config.json",), garbage_run_config, tiny=False, must_keep=("R/checkpoint.pt",)),
        Case("tr-ok", g, "2 tiny steps (should train)", train("data", "-o", "R"), data, "ok", (),
             must_keep=("data/images/s0.tif", "data/labels/s0.tif"), check=exists("R/last/config.json")),
    ]
    # fmt: on


def nothing(d: Path) -> None:
    """Setup: an empty folder."""


def misc_cases() -> list[Case]:
    g = "misc"
    lab = blobs()[1]
    # fmt: off
    return [
        Case("misc-unknown-command", g, "biounet frobnicate", ["frobnicate"], nothing, "error", ("frobnicate",)),
        Case("misc-no-args", g, "biounet (no arguments)", [], nothing, "error", ("COMMAND|usage",)),
        Case("misc-unknown-option", g, "predict --bogus", ["predict", "--bogus", "model", "x.tif", "-o", "out"],
             nothing, "error", ("--bogus",)),
        Case("misc-version", g, "--version", ["--version"], nothing, "ok", (), check=stdout_has("biounet ")),
        Case("misc-show-weights-jpg", g, "show-weights -o w.jpg", ["show-weights", "l.tif", "-o", "w.jpg"],
             files(**{"l.tif": lab}), "error", ("w.jpg",)),
        Case("misc-show-weights-float", g, "show-weights on float labels", ["show-weights", "l.tif", "-o", "w.png"],
             files(**{"l.tif": lab.astype(np.float32)}), "error", ("l.tif",)),
        Case("misc-show-weights-out-is-label", g, "show-weights -o the input PNG", ["show-weights", "l.png", "-o",
                                                                                     "l.png"],
             files(**{"l.png": lab.astype(np.uint8)}), "error", ("l.png",), must_keep=("l.png",)),
        Case("misc-synth-n0", g, "synth -n 0", ["synth", "-o", "s", "-n", "0"], nothing, "error", ("-n",)),
        Case("misc-synth-nonempty", g, "synth into a folder holding images", ["synth", "-o", "s", "-n", "2",
                                                                               "--shape", "64", "64"],
             files(**{"s__images__mine.tif": lab}), "error", ("s/images",), must_keep=("s/images/mine.tif",)),
        Case("misc-synth-shape-0", g, "synth --shape 0 0", ["synth", "-o", "s", "-n", "1", "--shape", "0", "0"],
             nothing, "error", ("shape",)),
    ]
    # fmt: on


def all_cases() -> list[Case]:
    return [*image_cases(), *model_cases(), *option_cases(), *evaluation_cases(), *training_cases(), *misc_cases()]


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def cell(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def table(results: Sequence[Result]) -> str:
    rows = ["| case | group | what | outcome | first error line |", "|---|---|---|---|---|"]
    rows += [f"| {r.id} | {r.group} | {cell(r.what, 80)} | {r.outcome} | {cell(r.error_line)} |" for r in results]
    return "\n".join(rows)


def summary(results: Sequence[Result]) -> str:
    counts = Counter(r.outcome for r in results)
    parts = [f"{name} {counts[name]}" for name in OUTCOMES if counts[name]]
    return f"{len(results)} cases: " + ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="SUBSTRING", help="run only the cases whose id contains SUBSTRING")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument("--keep", action="store_true", help="keep each case's temporary folder (printed)")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if args.only is None or args.only in c.id]
    ids = Counter(c.id for c in cases)
    if any(n > 1 for n in ids.values()):
        raise SystemExit(f"duplicate case ids: {[k for k, n in ids.items() if n > 1]}")
    base = Path(tempfile.mkdtemp(prefix="biounet-torture-"))
    results = []
    for i, case in enumerate(cases, 1):
        result = run_case(case, base, args.keep)
        results.append(result)
        sys.stderr.write(f"[{i}/{len(cases)}] {case.id}: {result.outcome} ({result.seconds:.1f} s)\n")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    for folder in _CACHE.values():
        shutil.rmtree(folder.parent, ignore_errors=True)
    sys.stdout.write(table(results) + "\n\n" + summary(results) + "\n")
    if args.keep:
        sys.stdout.write(f"case folders kept in {base}\n")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
