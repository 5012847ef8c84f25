"""Sampling at any output size, in every teacher family: padding to the network's
multiple and back, SDXL's size conditions from the real size, tiles, and predict batches
of mixed sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codi_lightning.diffusion import TilingConfig, pad_to_multiple
from codi_lightning.models import ImageSizes
from codi_lightning.training import CoDiDistillation

FAMILIES = ["tiny_teacher", "tiny_sdxl_teacher", "tiny_sd3_teacher", "tiny_flux_teacher",
            "tiny_sana_teacher"]  # fmt: skip
H, W = 20, 44  # a multiple of no network here


@pytest.fixture(scope="module", params=FAMILIES)
def module(request) -> CoDiDistillation:
    teacher = request.getfixturevalue(request.param)
    kw = {"shift_resolution": 32} if "flux" in request.param else {}
    torch.manual_seed(0)
    m = CoDiDistillation(str(teacher), num_grid=10, **kw).eval()
    with torch.no_grad():  # an adapter that acts (its zero-initialised outputs moved)
        for p in m.target.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def gens(n: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


def cond(height: int = H, width: int = W) -> torch.Tensor:
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_samples_at_the_condition_size_from_the_reflect_padded_sample(module, monkeypatch):
    """Non-square, odd sizes: the output has the condition's size and is the top-left
    crop of sampling the reflect-padded condition (same noise)."""
    m = module
    m.tiling = TilingConfig(mode="off")
    assert H % m.pixel_multiple or W % m.pixel_multiple
    out = m.sample_images(cond(), ["", "a"], 2, generator=gens())
    assert out.shape == (2, 3, H, W) and torch.isfinite(out).all()
    padded = pad_to_multiple(cond(), m.pixel_multiple)
    ph, pw = padded.shape[-2:]
    assert (ph % m.pixel_multiple, pw % m.pixel_multiple) == (0, 0)
    torch.testing.assert_close(padded, F.pad(cond(), (0, pw - W, 0, ph - H), mode="reflect"))
    # the same geometry as the unpadded call (SDXL embeds it): original = target = real size
    sizes = ImageSizes.default(2, (H, W))
    full = m.sample_images(padded, ["", "a"], 2, generator=gens(), sizes=sizes)
    torch.testing.assert_close(out, full[..., :H, :W])


def test_sdxl_time_ids_are_the_real_size(tiny_sdxl_teacher):
    """The padded sample's ``time_ids`` carry the real (unpadded) output size."""
    m = CoDiDistillation(str(tiny_sdxl_teacher), num_grid=10).eval()
    m.tiling = TilingConfig(mode="off")
    seen = []
    encode = m.prompt_encoder.add_sizes

    def add_sizes(text, sizes):
        seen.append(sizes.target_size.tolist())
        return encode(text, sizes)

    m.prompt_encoder.add_sizes = add_sizes
    m.sample_images(cond(), ["", "a"], 1, generator=gens())
    assert seen == [[[H, W], [H, W]]]


def test_one_tile_equals_untiled_and_several_tiles_sample_the_whole_image(module):
    m = module
    m.tiling = TilingConfig(mode="off")
    ref = m.sample_images(cond(), ["", "a"], 2, generator=gens())
    m.tiling = TilingConfig(mode="on", tile_size=1024)  # one tile covers the output
    assert len(m.tile_grid(*pad_to_multiple(cond(), m.pixel_multiple).shape[-2:])) == 1
    assert torch.equal(m.sample_images(cond(), ["", "a"], 2, generator=gens()), ref)
    m.tiling = TilingConfig(mode="on", tile_size=16, overlap=8)
    grid = m.tile_grid(*pad_to_multiple(cond(), m.pixel_multiple).shape[-2:])
    assert len(grid) >= 3
    tiled = m.sample_images(cond(), ["", "a"], 2, generator=gens())
    assert tiled.shape == ref.shape and torch.isfinite(tiled).all()
    m.tiling = TilingConfig()


def test_auto_tiling_follows_the_pixel_budget(module, monkeypatch):
    m = module
    grids = []
    original = m.tile_grid
    monkeypatch.setattr(m, "tile_grid", lambda h, w: grids.append((h, w)) or original(h, w))
    m.tiling = TilingConfig(untiled_max_pixels=H * W, tile_size=16)
    m.sample_images(cond(), ["", ""], 1, generator=gens())
    assert grids == []  # at the budget: one pass
    m.tiling = TilingConfig(untiled_max_pixels=H * W - 1, tile_size=16)
    m.sample_images(cond(), ["", ""], 1, generator=gens())
    assert len(grids) == 1
    m.tiling = TilingConfig()


def test_predict_step_samples_a_batch_of_mixed_sizes_one_size_at_a_time(tiny_teacher):
    """A batch whose conditions differ in size (a list) gives each input the image it
    gets alone: noise seeded by its name, sampled at its size."""
    m = CoDiDistillation(str(tiny_teacher), num_grid=10).eval()
    conds = [torch.rand(3, 12, 20), torch.rand(3, 16, 16), torch.rand(3, 12, 20)]
    names = ["a", "b", "c"]
    out = m.predict_step({"cond": conds, "caption": ["", "", ""], "name": names,
                          "skipped": []}, 0)  # fmt: skip
    assert out["names"] == names and [tuple(i.shape) for i in out["images"]] == [
        (3, 12, 20), (3, 16, 16), (3, 12, 20)
    ]  # fmt: skip
    for c, name, image in zip(conds, names, out["images"], strict=True):
        alone = m.predict_step({"cond": c[None], "caption": [""], "name": [name]}, 5)
        torch.testing.assert_close(alone["images"][0], image)


def test_tiled_sampling_encodes_and_decodes_in_vae_tiles(module, monkeypatch):
    """With several tiles the VAE runs diffusers' tiled decode (and tiled encode, in the
    families that encode the condition), tiles of the sampling grid's size, its own
    settings restored afterwards; untiled it does neither."""
    m = module
    vae = m.vae
    # AutoencoderKL's tiled encode is private, AutoencoderDC's public; their settings differ
    tiled_encode = "_tiled_encode" if hasattr(vae, "_tiled_encode") else "tiled_encode"
    settings = [n for n in vars(vae) if n.startswith("tile_") or n == "use_tiling"]
    calls = []
    for name in ("encode", tiled_encode, "tiled_decode"):
        original = getattr(vae, name)
        spy = lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k)  # noqa: E731
        monkeypatch.setattr(vae, name, spy)
    before = {n: getattr(vae, n) for n in settings}
    m.tiling = TilingConfig(mode="off")
    m.sample_images(cond(), ["", "a"], 1, generator=gens())
    assert "tiled_decode" not in calls and tiled_encode not in calls
    encodes = "encode" in calls
    calls.clear()
    m.tiling = TilingConfig(mode="on", tile_size=16, overlap=8)
    m.sample_images(cond(), ["", "a"], 1, generator=gens())
    assert "tiled_decode" in calls and (tiled_encode in calls) == encodes
    assert {n: getattr(vae, n) for n in settings} == before
    m.tiling = TilingConfig()
