"""Image reading and atomic writing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from biounet import io
from biounet.io import _files
from biounet.io import atomic_folder, atomic_write, label_overlay, normalize_percentile, read_image, read_image_axes, write_png, write_tiff


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind
    with atomic_write(target) as tmp:
        assert tmp.suffix == ".txt" and tmp.parent == tmp_path
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_folder_replaces_only_on_success(tmp_path):
    import os

    target = tmp_path / "out.zarr"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "half").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert list(tmp_path.iterdir()) == [target]  # no temporary folder left behind
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"] and list(tmp_path.iterdir()) == [target]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask
    with pytest.raises(ValueError, match="cannot write to folder"):
        with atomic_folder(tmp_path / "missing" / "x.zarr"):
            pass


def test_temporaries_of_killed_runs_are_swept_and_live_ones_kept(tmp_path):
    """A SIGKILL leaves a hidden temporary file; the next write into the folder removes it."""
    code = ("import os, sys, time\nfrom biounet.io import atomic_write\n"
            "with atomic_write(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n    print(tmp.name, flush=True)\n"
            "    time.sleep(60)\n")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out.tif")], stdout=subprocess.PIPE, text=True)
    left = tmp_path / child.stdout.readline().strip()
    assert left.is_file() and left.name.startswith(".out.") and ".tmp" in left.name
    old = time.time() - io.STALE_AFTER_SECONDS - 1
    os.utime(left, (old, old))
    assert io.sweep_stale_temporaries(tmp_path) == []  # the writer still runs: kept
    assert left.is_file()
    _files._swept.clear()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert left.is_file() and not (tmp_path / "out.tif").exists()  # nothing under the final name
    foreign = tmp_path / f".x.biounet@another-host@{child.pid}@abc.tmp.tif"
    recent = tmp_path / f".y.biounet@{socket.gethostname()}@{child.pid}@abc.tmp.tif"  # may be another container's
    for path in (foreign, recent, tmp_path / "keep.tmp.tif"):  # the last is not one of ours
        path.write_bytes(b"")
    os.utime(foreign, (old, old))
    with atomic_write(tmp_path / "next.tif") as tmp:
        tmp.write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([foreign.name, recent.name, "keep.tmp.tif",
                                                                 "next.tif"])  # fmt: skip


def test_a_folder_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    """atomic_folder killed between its two renames: the old folder is aside and nothing took its place."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".model.biounet@{socket.gethostname()}@{dead.pid}@0123abcd.old"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    old = time.time() - io.STALE_AFTER_SECONDS - 1
    os.utime(aside, (old, old))
    assert io.sweep_stale_temporaries(tmp_path) == [aside]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (tmp_path / "model" / "config.json").is_file()


def test_atomic_folder_puts_the_old_folder_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.zarr"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = Path.rename

    def fail_second(self, destination):
        if ".tmp" in self.name and Path(destination) == target:
            raise OSError("no space left")
        return real_rename(self, destination)

    monkeypatch.setattr(Path, "rename", fail_second)
    with pytest.raises(OSError, match="no space left"):
        with atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_atomic_write_missing_folder_is_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        with atomic_write(tmp_path / "nope" / "a.tif"):
            pass


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32])
def test_tiff_round_trip_dtypes(tmp_path, dtype):
    a = (np.arange(60).reshape(6, 10) * 7).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", a)
    b = read_image(tmp_path / "a.tif")
    assert b.dtype == dtype and np.array_equal(a, b)


def test_imagej_hyperstack_axes(tmp_path):
    a = np.zeros((3, 2, 8, 9), np.uint16)  # Z, C, Y, X
    tifffile.imwrite(tmp_path / "h.tif", a, imagej=True, metadata={"axes": "ZCYX"})
    image, axes = read_image_axes(tmp_path / "h.tif")
    assert image.shape == (3, 2, 8, 9) and axes == "ZCYX"


def test_ome_tiff_axes(tmp_path):
    a = np.zeros((2, 3, 8, 9), np.uint8)
    tifffile.imwrite(tmp_path / "o.ome.tif", a, metadata={"axes": "TCYX"})
    image, axes = read_image_axes(tmp_path / "o.ome.tif")
    assert image.shape == (2, 3, 8, 9) and axes == "TCYX"


def test_png_rgba_drops_alpha_and_gray_rgb_becomes_2d(tmp_path):
    import imageio.v3 as iio

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., :3] = np.arange(30).reshape(5, 6, 1)
    rgba[..., 3] = 255
    iio.imwrite(tmp_path / "g.png", rgba)
    image, axes = read_image_axes(tmp_path / "g.png")
    assert image.shape == (5, 6) and axes == "YX"
    rgba[..., 1] = 0
    iio.imwrite(tmp_path / "c.png", rgba)
    image, axes = read_image_axes(tmp_path / "c.png")
    assert image.shape == (5, 6, 3) and axes == "YXC"


def test_npy_never_unpickles(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="o.npy"):
        read_image(tmp_path / "o.npy")


@pytest.mark.parametrize(
    "name,content,match",
    [("x.tif", b"II*\x00garbage", "cannot read"), ("x.png", b"\x89PNG broken", "cannot read"),
     ("x.bmp", b"BM", "unsupported file type")],
)
def test_bad_files_name_the_file(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        read_image(tmp_path / name)
    assert name in str(info.value)


def test_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_image(tmp_path / "none.tif")
    np.save(tmp_path / "e.npy", np.zeros((0, 4)))
    with pytest.raises(ValueError, match="empty"):
        read_image(tmp_path / "e.npy")
    np.save(tmp_path / "c.npy", np.zeros((3, 3), complex))
    with pytest.raises(ValueError, match="pixel type complex"):
        read_image(tmp_path / "c.npy")


def test_write_tiff_label_and_float_types(tmp_path):
    write_tiff(tmp_path / "l.tif", np.array([[0, 70000]], np.int64))
    assert read_image(tmp_path / "l.tif").dtype == np.uint32
    write_tiff(tmp_path / "l.tif", np.array([[0, 7]], np.int64))
    assert read_image(tmp_path / "l.tif").dtype == np.uint16
    write_tiff(tmp_path / "p.tif", np.ones((2, 3, 4)), axes="CYX")
    image, axes = read_image_axes(tmp_path / "p.tif")
    assert image.dtype == np.float32 and axes == "CYX"
    with pytest.raises(ValueError, match="outside"):
        write_tiff(tmp_path / "n.tif", np.array([[-1]]))


def test_normalize_percentile_formula():
    x = np.arange(1001, dtype=np.float64)
    y = normalize_percentile(x, 10, 90)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (x - 100) / 800, atol=1e-6)
    assert np.all(normalize_percentile(np.full((4, 4), 3.0)) == 0)
    with pytest.raises(ValueError, match="low < high"):
        normalize_percentile(x, 50, 10)


def test_dark_background_inverts_bright_background_images_only():
    from biounet.io import has_bright_background, rescale_intensity

    rng = np.random.default_rng(0)
    dark = rng.random((40, 50)) * 0.2  # a dark background (80 % of the pixels) with bright objects
    dark[5:15, 5:25] = 0.8 + rng.random((10, 20)) * 0.2
    bright = 1.0 - dark  # the same scene with dark objects on a bright background
    for image in (dark, bright):
        lo, med, hi = np.percentile(image.astype(np.float32), [1, 50, 99.8])
        assert bool(has_bright_background(lo, med, hi)) == ((med - lo) / (hi - lo) > 0.25)
    assert not has_bright_background(0.0, 0.25, 1.0) and has_bright_background(0.0, 0.2501, 1.0)  # the boundary
    np.testing.assert_array_equal(normalize_percentile(dark, background="dark"), normalize_percentile(dark))
    inverted = normalize_percentile(bright, background="dark")
    np.testing.assert_allclose(inverted, 1.0 - normalize_percentile(bright), atol=1e-6)  # (p_high - x) / range
    # per channel (axis): each channel decides on its own
    both = np.stack([dark, bright])
    out = normalize_percentile(both, axis=(1, 2), background="dark")
    np.testing.assert_array_equal(out[0], normalize_percentile(dark))
    np.testing.assert_allclose(out[1], inverted, atol=1e-6)
    # a (low, high) pair with low > high inverts; a constant image still becomes 0
    np.testing.assert_allclose(rescale_intensity(np.array([0.0, 2.0, 4.0]), 4.0, 0.0), [1.0, 0.5, 0.0])
    assert np.all(normalize_percentile(np.full((4, 4), 3.0), background="dark") == 0)
    # "inverted": every image and channel, whatever its background
    np.testing.assert_allclose(normalize_percentile(both, axis=(1, 2), background="inverted"),
                               1.0 - normalize_percentile(both, axis=(1, 2)), atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="background must be one of as-is, dark, inverted, got 'light'"):
        normalize_percentile(dark, background="light")


def test_overlay_and_png(tmp_path):
    image = np.random.default_rng(0).random((20, 30))
    labels = np.zeros((20, 30), np.uint16)
    labels[2:8, 3:9] = 1
    labels[10:18, 10:25] = 2
    rgb = label_overlay(image, labels)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[labels == 1][0], rgb[labels == 2][0])
    write_png(tmp_path / "o.png", rgb)
    assert read_image(tmp_path / "o.png").shape == (20, 30, 3)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "bad.png", image)


def test_overlay_colours_are_tab20_dark_shades_then_light_ones_cycled():
    import matplotlib

    tab20 = np.round(np.asarray(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)
    order = [*range(0, 20, 2), *range(1, 20, 2)]  # blue, orange, green, ..., then light blue, light orange, ...
    labels = np.zeros((3, 4 * 21), np.uint16)
    for k in range(1, 22):
        labels[:, 4 * k - 4 : 4 * k - 1] = k  # 3x3 blocks: 8 outline pixels around one inside pixel
    rgb = label_overlay(np.zeros(labels.shape), labels, alpha=1.0)  # alpha 1: the inside is the colour too
    for k in range(1, 22):
        np.testing.assert_array_equal(rgb[labels == k], np.tile(tab20[order[(k - 1) % 20]], (9, 1)), err_msg=str(k))
    assert (rgb[labels == 0] == 0).all()  # background: the gray image, untinted
    tinted = label_overlay(np.zeros(labels.shape), labels)  # alpha 0.35 over black: 0.35 * (31, 119, 180)
    assert tinted[1, 1].tolist() == [11, 42, 63] and tinted[1, 2].tolist() == [31, 119, 180]  # inside, outline


def test_atomic_write_gives_usual_permissions(tmp_path):
    import os

    with atomic_write(tmp_path / "p.txt") as tmp:
        tmp.write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "p.txt").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_to_luminance_is_bt709_as_scikit_image_and_lazy_for_dask(dtype):
    import dask.array as da

    from biounet.io import to_luminance

    rng = np.random.default_rng(1)
    top = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
    rgb = (rng.random((2, 3, 9, 7)) * top).astype(dtype)  # (T, C, Y, X): channels on axis 1
    scale = 1.0 if dtype == np.float32 else float(top)
    expected = (0.2125 * rgb[:, 0] + 0.7154 * rgb[:, 1] + 0.0721 * rgb[:, 2]) / scale  # BT.709, by hand
    got = to_luminance(rgb, "x.tif", axis=1)
    assert got.dtype == np.float32 and got.shape == (2, 9, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    lazy = to_luminance(da.from_array(rgb, chunks=(1, 1, 5, 7)), "x.tif", axis=1)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), got)
    with pytest.raises(ValueError, match=r"x.tif: luminance needs 3 \(RGB\) channels on axis 1, got shape \(2, 2, 9, 7\)"):
        to_luminance(rgb[:, :2], "x.tif", axis=1)


@pytest.mark.parametrize(("shape", "axes", "read_axes"), [
    ((3, 20, 30), "ZYX", "ZYX"), ((4, 20, 30), "TYX", "TYX"), ((20, 30, 3), "YXS", "YXS"), ((20, 30, 3), None, "YXS"),
    ((3, 20, 30), None, "IYX"),
])  # fmt: skip
def test_write_tiff_writes_rgb_only_where_asked(tmp_path, shape, axes, read_axes):
    array = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    write_tiff(tmp_path / "x.tif", array, axes=axes)
    back, got = read_image_axes(tmp_path / "x.tif")
    assert got == read_axes and np.array_equal(back, array.astype(np.uint16))


def test_tiled_tiff_of_a_lazy_array_reads_back_exactly_with_its_pixel_size(tmp_path):
    import dask.array as da

    from biounet.io import open_image, write_tiff_tiled

    prob = np.random.default_rng(0).random((2, 3, 300, 530)).astype(np.float32)  # tiles overhang both edges
    write_tiff_tiled(tmp_path / "p.tif", da.from_array(prob, chunks=(1, 1, 128, 128)), axes="ZCYX",
                     scale={"X": 0.5, "Y": 0.25}, units={"X": "micrometer", "Y": "micrometer"})  # fmt: skip
    back, axes = read_image_axes(tmp_path / "p.tif")
    assert axes == "ZCYX" and back.dtype == np.float32 and np.array_equal(back, prob)
    lazy = open_image(tmp_path / "p.tif")  # an OME-TIFF: the pixel size travels
    assert lazy.scale == {"X": 0.5, "Y": 0.25} and lazy.units == {"X": "micrometer", "Y": "micrometer"}
    many = np.random.default_rng(1).integers(0, 70_000, (260, 300)).astype(np.uint32)
    for labels, dtype in ((many, np.uint32), (many % 100, np.uint16)):  # uint16 where the labels fit
        write_tiff_tiled(tmp_path / "l.tif", labels, axes="YX")
        back = tifffile.imread(tmp_path / "l.tif")
        assert back.dtype == dtype and np.array_equal(back, labels)
