"""Padding to the network's multiple and tiled sampling (diffusion/tiling.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codi_lightning.diffusion import (
    NoiseSchedule,
    TileGrid,
    TilingConfig,
    pad_to_multiple,
    sample,
    tiled_denoiser,
)
from codi_lightning.diffusion.tiling import tile_starts


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "unit"),
    [(64, 64, 16, 2), (100, 32, 8, 2), (96, 32, 8, 4), (34, 16, 4, 2), (10, 16, 4, 2)],
)
def test_tiles_cover_the_axis_with_the_overlap(length, tile, overlap, unit):
    starts = tile_starts(length, tile, overlap, unit)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(s % unit == 0 for s in starts)
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + size - b >= overlap - unit  # even spacing rounds starts to the unit


def test_pad_reflects_then_crops_back():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    p = pad_to_multiple(x, 4)
    assert p.shape[-2:] == (8, 8)
    torch.testing.assert_close(p, F.pad(x, (0, 1, 0, 3), mode="reflect"), rtol=0, atol=0)
    assert torch.equal(p[..., :5, :7], x)
    tiny = torch.rand(1, 3, 1, 1)  # too small to reflect: the edge repeated
    assert torch.equal(pad_to_multiple(tiny, 8), tiny.expand(1, 3, 8, 8))
    assert pad_to_multiple(p, 4) is p  # already a multiple: not copied


def conv_model(seed: int = 0):
    """A small random conv net (not pointwise: each output sees a 5x5 neighbourhood)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1)
    )
    return lambda z, t: net(z) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def test_one_tile_covering_the_latent_is_the_untiled_output_exactly():
    model = conv_model()
    z, t = torch.randn(2, 4, 12, 20), torch.tensor([500, 500])
    grid = TileGrid(12, 20, tile=32, overlap=8, unit=2)
    assert len(grid) == 1
    out = tiled_denoiser(lambda ys, xs: model, grid)(z, t)
    assert torch.equal(out, model(z, t))


def test_overlapping_tiles_blend_to_the_weighted_mean_of_their_outputs():
    """Two tiles along the width (16 wide, 8 shared): longhand, the output is tile A's in
    its own columns, tile B's in its own, and in the 8 shared columns the mean weighted by
    ramps i/9 (B) and 1 - i/9 (A), i = 1..8."""
    z, t = torch.randn(1, 4, 8, 24), torch.tensor([10])

    def model_for(ys, xs):  # each tile returns its own constant: 1 for A, 3 for B
        return lambda zt, tt: torch.full_like(zt, 1.0 if xs.start == 0 else 3.0)

    grid = TileGrid(8, 24, tile=16, overlap=8, unit=2)
    assert [(r[1].start, r[1].stop) for r in grid.regions] == [(0, 16), (8, 24)]
    out = tiled_denoiser(model_for, grid)(z, t)
    ramp = torch.arange(1, 9) / 9
    expected = torch.cat([torch.ones(8), 1 * (1 - ramp) + 3 * ramp, torch.full((8,), 3.0)])
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out, expected.expand_as(out))


def test_a_pointwise_model_is_unchanged_by_tiling():
    """A network that acts on each latent pixel alone gives the same output in tiles."""
    z, t = torch.randn(2, 4, 30, 46), torch.tensor([300, 300])
    model = lambda zz, tt: torch.tanh(zz) * 2 - zz  # noqa: E731
    grid = TileGrid(30, 46, tile=12, overlap=4, unit=2)
    assert len(grid) > 4
    torch.testing.assert_close(tiled_denoiser(lambda ys, xs: model, grid)(z, t), model(z, t))


def test_tiles_are_blended_at_every_sampler_step():
    """Each of the 4 steps runs every tile once on its crop of ONE shared latent (not
    each tile's own sampler, stitched at the end): at every step the tiles see the same
    values where they overlap, and together they see the whole latent."""
    seen = []
    base = conv_model()

    def model_for(ys, xs):
        def f(z, t):
            seen.append((int(t[0]), ys, xs, z.clone()))
            return base(z, t)

        return f

    grid = TileGrid(16, 24, tile=8, overlap=4, unit=2)
    schedule = NoiseSchedule.from_config(
        {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "prediction_type": "epsilon"}
    )  # fmt: skip
    steps = [999, 759, 499, 259]
    sample(tiled_denoiser(model_for, grid), torch.randn(1, 4, 16, 24), schedule, steps)
    assert len(seen) == 4 * len(grid)
    for k, step in enumerate(steps):
        calls = seen[k * len(grid) : (k + 1) * len(grid)]
        assert {c[0] for c in calls} == {step}
        whole = torch.full((1, 4, 16, 24), float("nan"))
        for _, ys, xs, z in calls:
            known = whole[..., ys, xs]
            agree = torch.isnan(known) | torch.isclose(known, z, rtol=0, atol=0)
            assert bool(agree.all()), f"step {step}: tiles disagree on their overlap"
            whole[..., ys, xs] = z
        assert not torch.isnan(whole).any()


def test_tiling_config_decides_and_checks():
    assert not TilingConfig().wants_tiles(1024, 1024)
    assert TilingConfig().wants_tiles(1024, 1025)
    assert TilingConfig(mode="on").wants_tiles(8, 8)
    assert not TilingConfig(mode="off").wants_tiles(10_000, 10_000)
    for bad in ({"mode": "sometimes"}, {"tile_size": 0}, {"overlap": -1},
                {"untiled_max_pixels": 0}):  # fmt: skip
        with pytest.raises(ValueError, match="tiling."):
            TilingConfig(**bad)
