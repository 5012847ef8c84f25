"""Cached latents and text embeddings (`codi-lightning cache`, data/cache.py): where the
cache holds exactly what the module would compute, the loss equals the loss on the raw
images for the same noise; the module then never runs the VAE or the text encoder."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from codi_lightning.cli import main
from codi_lightning.data import ShardDataModule, float_pixels, write_cached_shards, write_shards
from codi_lightning.training import CoDiDistillation
from codi_lightning.training.run import seeded_generator


def _folder(root, size, count=8):
    """``count`` smooth pictures of ``size`` (w, h), every other one with an empty caption."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        coarse = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8))
        coarse.resize(size, Image.BICUBIC).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a picture number {i}" if i % 2 else "")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("cache")
    write_shards(str(_folder(root / "img", (32, 32))), str(root / "raw-%06d.tar"), progress=False)
    out = {"raw": str(root / "raw-000000.tar")}
    for dtype in ("fp32", "fp16"):
        write_cached_shards(str(tiny_teacher), out["raw"], str(root / f"{dtype}-%06d.tar"),
                            resolution=32, dtype=dtype, progress=False)  # fmt: skip
        out[dtype] = str(root / f"{dtype}-000000.tar")
    return out


def _batch(path, hflip=True):
    dm = ShardDataModule(path, None, resolution=32, batch_size=8, num_workers=0,
                         condition="sr", hflip=hflip, caption_dropout=0.3, seed=3)  # fmt: skip
    return float_pixels(next(iter(dm.train_dataloader())))


def _loss(model, batch):
    return model.compute_loss(batch, seeded_generator("0:0:0"))[0]


def test_cached_batches_give_the_loss_of_the_raw_images(shards, tiny_teacher):
    raw, cached = _batch(shards["raw"]), _batch(shards["fp32"])
    assert raw["key"] == cached["key"] and raw["caption"] == cached["caption"]
    assert "" in raw["caption"] and any(raw["caption"])  # dropout and empty captions both seen
    torch.testing.assert_close(raw["image"], cached["image"])  # same crops, same flips
    assert cached["latent_mean"].shape == (8, 4, 8, 8)  # the tiny VAE: 4 pixels a latent
    assert cached["text"]["hidden_states"].ndim == 3
    torch.manual_seed(0)
    model = CoDiDistillation(str(tiny_teacher), num_grid=10)
    expected = _loss(model, raw)

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran on a cached batch")

    model.empty_text(1)  # the empty prompt is encoded once per run, cached or not
    model.vae.encode = refuse
    model.prompt_encoder.text_encoder.forward = refuse
    torch.testing.assert_close(_loss(model, cached), expected, rtol=1e-5, atol=1e-7)


def test_sdxl_cache_holds_both_encoders_and_the_pooled_embedding(
    tmp_path, shards, tiny_sdxl_teacher
):
    write_cached_shards(str(tiny_sdxl_teacher), shards["raw"], str(tmp_path / "x-%06d.tar"),
                        resolution=32, dtype="fp32", progress=False)  # fmt: skip
    raw, cached = _batch(shards["raw"]), _batch(str(tmp_path / "x-000000.tar"))
    assert set(cached["text"]) == {"hidden_states", "added.text_embeds"}
    torch.manual_seed(0)
    model = CoDiDistillation(str(tiny_sdxl_teacher), num_grid=10)
    expected = _loss(model, raw)  # time_ids still come from the batch's recorded sizes
    torch.testing.assert_close(_loss(model, cached), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "family, text_keys, kw",
    [("sd3", {"hidden_states", "added.pooled_projections"}, {}),
     ("flux", {"hidden_states", "added.pooled_projections", "added.guidance"},
      {"shift_resolution": 32}),
     ("sana", {"hidden_states", "added.encoder_attention_mask"}, {})],
)  # fmt: skip
def test_flow_transformer_cache_gives_the_loss_of_the_raw_images(
    tmp_path, shards, family, text_keys, kw, request
):
    """16-channel latents (the VAE's shift applied when they are read; SANA: the DC-AE's
    8-channel latents, deterministic: zero deviation), the family's text sequence and
    added conditions (SD3: the joint CLIP | T5 sequence and the pooled projections; Flux:
    T5, the pooled CLIP-L output and the guidance scale; SANA: Gemma's states and their
    attention mask); the
    condition's latents are still encoded on the fly (the SR condition is made from the
    crop)."""
    teacher = request.getfixturevalue(f"tiny_{family}_teacher")
    write_cached_shards(str(teacher), shards["raw"], str(tmp_path / "x-%06d.tar"),
                        resolution=32, dtype="fp32", progress=False)  # fmt: skip
    raw, cached = _batch(shards["raw"]), _batch(str(tmp_path / "x-000000.tar"))
    assert set(cached["text"]) == text_keys
    torch.manual_seed(0)
    model = CoDiDistillation(str(teacher), num_grid=10, **kw)
    latent = (model.vae.config.latent_channels, 32 // model.vae_scale, 32 // model.vae_scale)
    assert cached["latent_mean"].shape == (8, *latent)
    expected = _loss(model, raw)
    torch.testing.assert_close(_loss(model, cached), expected, rtol=1e-5, atol=1e-7)


def test_fp16_cache_is_close_to_the_raw_loss(shards, tiny_teacher):
    torch.manual_seed(0)
    model = CoDiDistillation(str(tiny_teacher), num_grid=10)
    raw, half = _loss(model, _batch(shards["raw"])), _loss(model, _batch(shards["fp16"]))
    assert half.item() == pytest.approx(raw.item(), rel=2e-2)


def test_cache_settings_must_match_the_run(shards):
    with pytest.raises(ValueError, match="resolution=32.*data.resolution=16"):
        ShardDataModule(shards["fp32"], None, resolution=16, batch_size=2, num_workers=0,
                        condition="sr").train_dataloader().__iter__().__next__()  # fmt: skip


def test_hflip_needs_the_mirror_latents(tmp_path, shards, tiny_teacher):
    write_cached_shards(str(tiny_teacher), shards["raw"], str(tmp_path / "c-%06d.tar"),
                        resolution=32, hflip=False, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="--hflip true, or set data.hflip=false"):
        _batch(str(tmp_path / "c-000000.tar"))
    assert _batch(str(tmp_path / "c-000000.tar"), hflip=False)["latent_mean"].shape[0] == 8


def test_cache_then_fit_through_the_cli(tmp_path, shards, tiny_teacher, monkeypatch):
    import yaml

    from codi_lightning.training.module import CoDiDistillation as Module

    out = tmp_path / "cached-%06d.tar"
    main(["cache", "--pretrained", str(tiny_teacher), "--shards", shards["raw"],
          "--output", str(out), "--resolution", "32", "--progress", "false"])  # fmt: skip
    cfg = yaml.safe_load(open("configs/tiny_cpu.yaml"))
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=2,
                          limit_val_batches=0, enable_progress_bar=False)  # fmt: skip
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(tmp_path / "ckpt"))
    cfg["model"].update(pretrained=str(tiny_teacher), pixel_space=False, num_grid=10)
    cfg["data"].update(train_shards=str(tmp_path / "cached-000000.tar"), val_shards=None,
                       num_workers=0, batch_size=4, resolution=32)  # fmt: skip
    config = tmp_path / "cached.yaml"
    config.write_text(yaml.safe_dump(cfg))
    seen = []
    real = Module.batch_latents

    def spy(self, batch, generator):
        seen.append("latent_mean" in batch and "text" in batch)
        return real(self, batch, generator)

    monkeypatch.setattr(Module, "batch_latents", spy)
    main(["fit", "--config", str(config)])
    assert seen == [True, True]  # both steps trained from the cache
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_unreadable_cache_members_are_skipped_with_their_reason():
    import io

    from codi_lightning.data import BadSample, decode_sample

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    raw = {"__key__": "k", "png": buf.getvalue(), "latents.safetensors": b"\x10\x00" * 8}
    with pytest.raises(BadSample) as info:
        decode_sample(raw)
    assert info.value.reason == "corrupt_cache" and "k.latents.safetensors" in str(info.value)


def _member_bytes(tensors: dict, meta: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta or {})


def _good_members() -> dict:
    latents = {"mean": torch.zeros(4, 8, 8), "std": torch.ones(4, 8, 8)}
    text = {"hidden_states": torch.zeros(77, 32)}
    return {"latents": latents, "text": text}


SPEC = {"latents": {"mean": (4,), "std": (4,)}, "text": {"hidden_states": (77, 32)}}
BAD_CACHES = {  # name: (member, tensors replacing the good ones, reason, words in the detail)
    "nan": ("latents", {"mean": torch.full((4, 8, 8), float("nan"))}, "non_finite", "NaN"),
    "inf text": ("text", {"hidden_states": torch.full((77, 32), float("inf"))}, "non_finite",
                 "hidden_states"),
    "shape": ("latents", {"std": torch.ones(4, 8, 7)}, "corrupt_cache", "differ in shape"),
    "channels": ("latents", {"mean": torch.zeros(16, 8, 8), "std": torch.ones(16, 8, 8)},
                 "corrupt_cache", "the run's teacher makes 4"),
    "1-d": ("latents", {"mean": torch.zeros(256)}, "corrupt_cache", "not 3-D"),
    "missing": ("latents", {"std": None}, "corrupt_cache", "has no std"),
    "text length": ("text", {"hidden_states": torch.zeros(76, 32)}, "corrupt_cache", "77x32"),
    "text width": ("text", {"hidden_states": torch.zeros(77, 16)}, "corrupt_cache", "77x32"),
    "int": ("latents", {"mean": torch.zeros(4, 8, 8, dtype=torch.int32)}, "corrupt_cache",
            "torch.int32"),
    "bool": ("latents", {"mean": torch.zeros(4, 8, 8, dtype=torch.bool)}, "corrupt_cache",
             "torch.bool"),
    "f64": ("latents", {"mean": torch.zeros(4, 8, 8, dtype=torch.float64)}, "corrupt_cache",
            "torch.float64"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CACHES))
def test_bad_cached_members_are_named_skips(case):
    """Every class of broken cached member is a skip with its reason, naming the member
    (the sample key) and what is wrong; the good members pass."""
    import io

    from codi_lightning.data import BadSample, decode_sample

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    members = _good_members()
    raw = {"__key__": "k", "png": buf.getvalue()}
    for name, tensors in members.items():
        raw[f"{name}.safetensors"] = _member_bytes(tensors)
    assert decode_sample(dict(raw), cache_spec=SPEC)["latents"][0]["mean"].shape == (4, 8, 8)
    member, change, reason, words = BAD_CACHES[case]
    tensors = {**members[member], **change}
    raw[f"{member}.safetensors"] = _member_bytes(
        {k: v for k, v in tensors.items() if v is not None}
    )
    with pytest.raises(BadSample) as info:
        decode_sample(raw, cache_spec=SPEC)
    assert info.value.reason == reason
    assert f"k.{member}.safetensors" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("record", [{"grid": "0"}, {"grid": "abc"}, {"grid": "12"},
                                    {"resolution": "-64"}, {"resolution": "36"},
                                    {"resize_shorter": "maybe"}])  # fmt: skip
def test_a_damaged_cache_record_is_a_named_skip(record):
    """The geometry recorded with the latents (grid, resolution, resize_shorter) is
    checked per sample: a damaged record is a ``corrupt_cache`` skip naming the member,
    never a division by zero or a stopped run; the cache's own record passes."""
    import io

    from codi_lightning.data import BadSample, decode_sample

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    good = {"grid": "8", "resolution": "32", "resize_shorter": "False"}
    raw = {"__key__": "k", "png": buf.getvalue()}
    raw["latents.safetensors"] = _member_bytes(_good_members()["latents"], good)
    assert decode_sample(dict(raw))["latents"][1] == good
    raw["latents.safetensors"] = _member_bytes(_good_members()["latents"], {**good, **record})
    with pytest.raises(BadSample) as info:
        decode_sample(raw)
    assert info.value.reason == "corrupt_cache" and "k.latents.safetensors" in str(info.value)
    assert "damaged cache record" in str(info.value)


def _rewrite_cached(src: str, dst, change: dict) -> None:
    """Copy a cached shard, replacing tensors of the samples in ``change``
    (``{key: {member: {name: tensor}}}``; name ``__metadata__``: a dict updating the
    member's recorded metadata)."""
    import tarfile

    from safetensors.torch import load

    from codi_lightning.data.decode import read_safetensors

    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            key, _, member = info.name.partition(".")
            if key in change and member.removesuffix(".safetensors") in change[key]:
                tensors, meta = read_safetensors(data)
                new = dict(change[key][member.removesuffix(".safetensors")])
                meta.update(new.pop("__metadata__", {}))
                data = _member_bytes({**load(data), **new}, meta)
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_a_nan_in_one_cached_sample_never_reaches_the_weights(tmp_path, shards, tiny_teacher):
    """The issue's case: one NaN in one cached sample (and samples cached with another
    VAE's 16 channels, on another grid, a damaged grid record): fit through the CLI skips
    them, counted, and writes finite weights."""
    import yaml

    from codi_lightning.checkpoints import read_checkpoint

    bad = tmp_path / "bad-000000.tar"
    nan = torch.zeros(4, 8, 8)
    nan[1, 2, 3] = float("nan")
    _rewrite_cached(shards["fp32"], bad, {"0": {"latents": {"mean": nan}},
                                          "3": {"latents": {"mean": torch.zeros(16, 8, 8),
                                                            "std": torch.ones(16, 8, 8)}},
                                          "4": {"latents": {"mean": torch.zeros(4, 8, 7),
                                                            "std": torch.ones(4, 8, 7)}},
                                          "5": {"latents": {"__metadata__": {"grid": "0"}}}})  # fmt: skip
    cfg = yaml.safe_load(open("configs/tiny_cpu.yaml"))
    cfg["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=4,
                          limit_val_batches=0, enable_progress_bar=False)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(tmp_path / "ckpt"))
    cfg["model"].update(pretrained=str(tiny_teacher), pixel_space=False, num_grid=10)
    cfg["data"].update(train_shards=str(bad), val_shards=None, num_workers=0, batch_size=4,
                       resolution=32, hflip=False)  # fmt: skip
    config = tmp_path / "cached.yaml"
    config.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(config), "--trainer.log_every_n_steps", "1"])
    state = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert acc.Scalars("data/skipped_non_finite")[-1].value >= 1
    assert acc.Scalars("data/skipped_corrupt_cache")[-1].value >= 1
