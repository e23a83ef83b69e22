"""Overlap-tile prediction: mirror rule, tile layout, exactness, TTA, stacks and channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biounet import UNet, UNetConfig, plan_tiles, predict, predict_steps, tiling_efficiency
from biounet.prediction import tile_input_shapes
from biounet.io import normalize_percentile
from biounet.prediction import DIHEDRAL, dihedral, dihedral_inverse
from biounet.borders import mirror_indices, mirror_pad


def whole_image_reference(model: UNet, image: np.ndarray) -> np.ndarray:
    """One forward pass over the whole image, mirror-padded with numpy.pad, no tiling."""
    halo = model.halo
    x = normalize_percentile(image, *model.info.normalization) if model.info.normalization else image
    pads = []
    for size in image.shape[-2:]:
        total = model.config.valid_input_size(size + 2 * halo)
        pads.append((halo, total - size - halo))
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + pads, mode="reflect")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(padded.astype(np.float32)).reshape(1, -1, *padded.shape[-2:]))
    prob = torch.softmax(logits, 1)[0].numpy()
    if model.config.padding == "same":
        prob = prob[:, halo:, halo:]
    return prob[:, : image.shape[-2], : image.shape[-1]]


# -- mirror ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size,before,after", [(5, 3, 4), (3, 7, 7), (2, 5, 6), (10, 0, 9)])
def test_mirror_indices_equal_numpy_reflect(size, before, after):
    a = np.arange(size) * 10
    assert np.array_equal(a[mirror_indices(size, before, after)], np.pad(a, (before, after), mode="reflect"))


def test_mirror_does_not_repeat_edge_and_repeats_for_tiny_images():
    assert mirror_indices(4, 3, 3).tolist() == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert mirror_indices(1, 2, 2).tolist() == [0, 0, 0, 0, 0]
    assert mirror_indices(2, 3, 3).tolist() == [1, 0, 1, 0, 1, 0, 1, 0]


def test_mirror_value_does_not_depend_on_pad_width():
    small = mirror_pad(np.arange(12.0).reshape(3, 4), [(5, 2), (1, 9)])
    large = mirror_pad(np.arange(12.0).reshape(3, 4), [(5, 30), (1, 40)])
    assert np.array_equal(small, large[: small.shape[0], : small.shape[1]])


# -- layout ----------------------------------------------------------------------------------
def test_512_image_is_one_700_tile_for_paper_net():
    layout = plan_tiles(UNetConfig(), (512, 512))
    assert [(a.count, a.tile_in, a.tile_out) for a in layout] == [(1, 700, 516)] * 2
    assert tiling_efficiency(layout) == pytest.approx(512**2 / 516**2)


@given(size=st.integers(1, 3000), tile=st.integers(150, 900))
@settings(max_examples=200, deadline=None)
def test_layout_covers_axis_with_aligned_steps(size, tile):
    cfg = UNetConfig()
    (a,) = plan_tiles(cfg, (size,), tile)
    assert cfg.is_valid_input_size(a.tile_in) and cfg.is_valid_input_size(a.last_in)
    assert max(a.tile_in, a.last_in) <= max(tile, 204)  # 204: the smallest tile whose output spans 16 px
    assert a.step % 16 == 0
    assert a.count == 1 or a.tile_out >= a.step
    assert (a.count - 1) * a.step + a.last_out >= size
    cuts = a.cuts
    assert cuts[0] == 0 and cuts[-1] == size and all(x <= y for x, y in zip(cuts, cuts[1:]))
    for k in range(a.count):  # tile k owns pixels it has computed
        assert k * a.step <= cuts[k] and cuts[k + 1] <= k * a.step + a.output_size(k)


@given(size=st.integers(1, 3000), tile=st.integers(150, 900))
@settings(max_examples=100, deadline=None)
def test_layout_computes_least_among_all_aligned_layouts(size, tile):
    """Brute force: no layout with as few tiles, aligned steps and a smaller last tile computes less."""
    cfg = UNetConfig()
    (a,) = plan_tiles(cfg, (size,), tile)
    max_in = max(a.tile_in, a.last_in, cfg.valid_input_at_most(tile) or 0)
    outputs = [n - 2 * cfg.halo for n in range(1, max_in + 1) if cfg.is_valid_input_size(n)]
    best = min(
        (a.count - 1) * regular + last
        for step in (range(16, max_in, 16) if a.count > 1 else [0])
        for regular in outputs if a.count == 1 or regular >= step
        for last in outputs if last >= size - (a.count - 1) * step
    )  # fmt: skip
    assert a.computed == best


def test_large_axis_gets_a_small_last_tile():
    (a,) = plan_tiles(UNetConfig(), (20000,))
    assert (a.count, a.tile_in, a.step, a.last_in, a.last_out) == (40, 700, 512, 220, 36)
    assert a.computed == 39 * 516 + 36
    assert tiling_efficiency(plan_tiles(UNetConfig(), (20000, 20000))) == pytest.approx((20000 / 20160) ** 2)
    assert tile_input_shapes(plan_tiles(UNetConfig(), (20000, 1000))) == {
        (700, 700): 39, (700, 684): 39, (220, 700): 1, (220, 684): 1,
    }


# -- exactness -------------------------------------------------------------------------------
@given(
    h=st.integers(1, 90), w=st.integers(1, 90), tile=st.integers(20, 70), seed=st.integers(0, 2**16)
)
@settings(max_examples=25, deadline=None)
def test_tiled_equals_whole_image_valid_padding(tiny_model, h, w, tile, seed):
    image = np.random.default_rng(seed).random((h, w)).astype(np.float32) * 1000
    tiled = predict(tiny_model, image, tile=tile, batch_size=3, progress=False)
    whole = whole_image_reference(tiny_model, image)
    assert tiled.shape == (2, h, w)
    np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=0)


def test_tiled_equals_whole_image_paper_net_two_tiles():
    torch.manual_seed(0)
    model = UNet(base_channels=8).eval()
    image = np.random.default_rng(0).random((40, 300)).astype(np.float32)
    layout = plan_tiles(model.config, image.shape, 300)
    assert layout[1].count == 3
    tiled = predict(model, image, tile=300, progress=False)
    np.testing.assert_allclose(tiled, whole_image_reference(model, image), atol=1e-5, rtol=0)


def test_same_padding_seam_error_is_small_and_measured():
    """Same padding: tiles overlap by 2 x halo; zero padding inside the net still differs a little.

    Measured on this random depth-2 network (30 tiles of 64 px, 24 px kept per tile): the
    largest difference to whole-image inference is 0.0089 in probability, the mean 8.6e-5;
    23% of the pixels differ by more than 1e-5. Valid padding has none of this.
    """
    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4, padding="same", dropout=0.0).eval()
    image = np.random.default_rng(1).random((120, 130)).astype(np.float32)
    tiled = predict(model, image, tile=64, progress=False)
    whole = whole_image_reference(model, image)
    seam = np.abs(tiled - whole)
    assert 1e-4 < seam.max() < 0.02 and seam.mean() < 1e-3
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-6)


def test_paper_net_tiny_image_smaller_than_halo():
    torch.manual_seed(0)
    model = UNet(base_channels=4).eval()
    for shape in [(1, 1), (3, 2), (7, 50)]:
        image = np.random.default_rng(0).random(shape).astype(np.float32)
        prob = predict(model, image, progress=False)
        assert prob.shape == (2, *shape)
        np.testing.assert_allclose(prob, whole_image_reference(model, image), atol=1e-5)


def test_input_is_not_modified(tiny_model):
    image = np.random.default_rng(0).random((30, 30))
    copy = image.copy()
    predict(tiny_model, image, progress=False)
    assert np.array_equal(image, copy)


def test_uint16_input_equals_float_input(tiny_model):
    image = (np.random.default_rng(0).random((40, 33)) * 60000).astype(np.uint16)
    a = predict(tiny_model, image, progress=False)
    b = predict(tiny_model, image.astype(np.float64), progress=False)
    np.testing.assert_allclose(a, b, atol=1e-6)


# -- stacks, channels ------------------------------------------------------------------------
def test_stack_is_segmented_slice_by_slice(tiny_model):
    stack = np.random.default_rng(0).random((3, 25, 31)).astype(np.float32)
    prob = predict(tiny_model, stack, tile=40, progress=False)
    assert prob.shape == (3, 2, 25, 31)
    for z in range(3):
        # other tiles, so other float32 summation orders: 1.07e-6 apart on an AVX2 CPU; a wrong slice is ~0.1 off
        np.testing.assert_allclose(prob[z], predict(tiny_model, stack[z], progress=False), atol=1e-5)


def test_multichannel_axis_is_stated_not_guessed():
    torch.manual_seed(0)
    model = UNet(in_channels=3, depth=2, base_channels=4).eval()
    image = np.random.default_rng(0).random((20, 22, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="channel_axis"):
        predict(model, image, progress=False)
    last = predict(model, image, channel_axis=-1, progress=False)
    first = predict(model, np.moveaxis(image, -1, 0), channel_axis=0, progress=False)
    assert last.shape == (2, 20, 22)
    np.testing.assert_array_equal(last, first)
    with pytest.raises(ValueError, match="3 channels on axis -1, but the model takes 2"):
        predict(UNet(in_channels=2, depth=2, base_channels=4), image, channel_axis=-1, progress=False)


@pytest.mark.parametrize(
    "image,match",
    [(np.zeros((0, 5)), "empty"), (np.full((5, 5), np.nan), "NaN"), (np.zeros((2, 2, 2, 2)), "shape"),
     (np.array([["a"]]), "pixel type")],
)
def test_bad_images_are_clear_errors(tiny_model, image, match):
    with pytest.raises(ValueError, match=match):
        predict(tiny_model, image, progress=False)


# -- TTA -------------------------------------------------------------------------------------
def test_dihedral_inverse_is_exact():
    a = np.arange(2 * 5 * 7).reshape(2, 5, 7)
    seen = set()
    for k, flip in DIHEDRAL:
        t = dihedral(a, k, flip)
        assert np.array_equal(dihedral_inverse(t, k, flip), a)
        seen.add(t.tobytes() + bytes(t.shape))
    assert len(seen) == 8  # the eight transforms are distinct


def test_tta_averages_the_eight_transforms(tiny_model):
    image = np.random.default_rng(2).random((30, 26)).astype(np.float32)
    tta = predict(tiny_model, image, tta=True, progress=False)
    manual = np.zeros_like(tta)
    for k, flip in DIHEDRAL:  # independent reference with numpy's own flips/rotations
        x = np.rot90(np.fliplr(image) if flip else image, k)
        p = predict(tiny_model, np.ascontiguousarray(x), progress=False)
        p = np.rot90(p, -k, axes=(1, 2))
        manual += p[:, :, ::-1] if flip else p
    np.testing.assert_allclose(tta, manual / 8, atol=1e-6)
    assert not np.allclose(tta, predict(tiny_model, image, progress=False), atol=1e-4)


# -- generator, precision --------------------------------------------------------------------
def test_predict_steps_reports_progress_then_result(tiny_model):
    image = np.random.default_rng(0).random((50, 50)).astype(np.float32)
    steps = list(predict_steps(tiny_model, image, tile=60, batch_size=2))
    total = steps[0].total
    assert total == 9 and [s.done for s in steps] == [0, 2, 4, 6, 8, 9, 9]
    assert all(s.result is None for s in steps[:-1])
    np.testing.assert_array_equal(steps[-1].result, predict(tiny_model, image, tile=60, progress=False))


def test_bfloat16_stays_close_to_float32(tiny_model):
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    a = predict(tiny_model, image, progress=False)
    b = predict(tiny_model, image, precision="bfloat16", progress=False)
    assert np.abs(a - b).max() < 0.05


def test_a_tile_below_the_smallest_is_raised_with_a_warning(caplog):
    config = UNetConfig(depth=2, base_channels=4)
    with caplog.at_level("WARNING", logger="biounet.prediction"):
        layout = plan_tiles(config, (100, 100), tile=3)
    smallest = [axis.tile_in for axis in layout]
    assert min(smallest) > 3 and f"using {smallest} px" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="biounet.prediction"):
        plan_tiles(config, (100, 100))
    assert caplog.text == ""


# --------------------------------------------------------------------------------------------
# The pure stitcher, the options, and the caller's model left alone
# --------------------------------------------------------------------------------------------
def crop_forward(geometry: UNetConfig):
    """A "network" that is no UNet: logits (x, -x) of the centre of each input tile."""
    calls = []

    def forward(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        halo = (batch.shape[-1] - geometry.output_size(batch.shape[-1])) // 2
        centre = batch[:, :1, halo : batch.shape[-2] - halo, halo : batch.shape[-1] - halo]
        return torch.cat([centre, -centre], dim=1)

    return forward, calls


@pytest.mark.parametrize("tile", [None, 124, 156])
def test_stitcher_runs_any_callable_and_tiles_it_exactly(tile):
    from biounet.prediction import stitch_steps

    geometry = UNetConfig(depth=2, base_channels=2)
    image = np.random.default_rng(0).random((1, 1, 90, 130)).astype(np.float32)
    forward, calls = crop_forward(geometry)
    steps = list(stitch_steps(forward, image, geometry, tile=tile, batch_size=3))
    prob = steps[-1].result
    # softmax of (x, -x) is sigmoid(2x): the stitched tiles must give it at every pixel of the image
    expected = 1 / (1 + np.exp(-2 * image[0, 0].astype(np.float64)))
    assert prob.shape == (1, 2, 90, 130)
    np.testing.assert_allclose(prob[0, 0], expected, atol=1e-6)
    assert all(shape[1:2] == (1,) and geometry.valid_input_size(shape[-1]) == shape[-1] for shape in calls)
    assert steps[-1].done == steps[-1].total == len(calls) if tile is None else steps[-1].total > 1


def test_predict_leaves_the_callers_model_as_it_was(tiny_model):
    model = tiny_model.train()
    before = {k: (v.clone(), v.data_ptr(), v.is_contiguous()) for k, v in model.state_dict().items()}
    image = np.random.default_rng(1).random((70, 60)).astype(np.float32)
    first = predict(model, image, progress=False)
    assert model.training  # not switched to eval
    for k, v in model.state_dict().items():
        value, pointer, contiguous = before[k]
        assert torch.equal(v, value) and v.data_ptr() == pointer and v.is_contiguous() == contiguous, k
    np.testing.assert_array_equal(predict(model.eval(), image, progress=False), first)  # eval mode: the same


def test_the_prepared_copy_is_reused_until_the_weights_change(monkeypatch):
    import copy

    from biounet.prediction import _device

    torch.manual_seed(0)
    model = UNet(depth=2, base_channels=4, dropout=0.0)
    copies = []
    real = copy.deepcopy
    monkeypatch.setattr(_device.copy, "deepcopy", lambda obj: copies.append(1) or real(obj))
    image = np.random.default_rng(2).random((64, 64)).astype(np.float32)
    first = predict(model, image, progress=False)
    again = predict(model, image, progress=False)
    assert len(copies) == 1 and np.array_equal(first, again)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # an optimiser-like in-place update
    changed = predict(model, image, progress=False)
    assert len(copies) == 2 and not np.array_equal(changed, first)


def test_options_are_checked_when_made_and_one_object_serves_every_call(tiny_model):
    from biounet import PredictOptions

    image = np.random.default_rng(3).random((40, 40)).astype(np.float32)
    options = PredictOptions(tile=124, batch_size=2, progress=False)
    np.testing.assert_array_equal(predict(tiny_model, image, options=options),
                                  predict(tiny_model, image, tile=124, batch_size=2, progress=False))  # fmt: skip
    assert options.replace(tta=True).tta and not options.tta
    for bad, match in [(dict(batch_size=0), "batch_size must be an integer >= 1"),
                       (dict(precision="half"), "precision must be one of"), (dict(tile=-3), "tile must be"),
                       (dict(tta="yes"), "tta must be True or False"), (dict(compile="fast"), "compile must be")]:
        with pytest.raises(ValueError, match=match):
            PredictOptions(**bad)
    with pytest.raises(ValueError, match="unknown prediction option.*tiles"):
        predict(tiny_model, image, tiles=3)
