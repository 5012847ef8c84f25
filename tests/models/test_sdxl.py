"""SDXL as a teacher: loading by model type, the conditioning y (two encoders, pooled text,
time_ids) reaching the UNet and the adapter, training and sampling through the same module,
the VAE kept out of fp16."""

import pytest
import torch
from helpers import make_batch

from codi_lightning.models import Conditioning, ImageSizes, load_teacher
from codi_lightning.testing.tiny import (
    TINY_SDXL_POOLED,
    TINY_SDXL_TEXT_WIDTHS,
    tiny_vae_config,
    write_tiny_sdxl_teacher,
)
from codi_lightning.training import CoDiDistillation, ControlNetBaseline


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return write_tiny_sdxl_teacher(tmp_path_factory.mktemp("teacher") / "tiny_sdxl")


@pytest.fixture(scope="module")
def sdxl_module(tiny_sdxl):
    return CoDiDistillation(str(tiny_sdxl), num_grid=10)


def _sized_batch():
    batch = make_batch()
    batch["original_size"] = torch.tensor([[64, 48], [40, 33]])
    batch["crop_top_left"] = torch.tensor([[3, 0], [0, 4]])
    return batch


def _record_kwargs(module, calls):
    return module.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True
    )


def test_the_folder_loads_as_sdxl_here_and_in_stock_diffusers(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    parts = load_teacher(str(tiny_sdxl))
    assert parts.family == "sdxl" and parts.vae_upcast
    assert parts.scaling_factor == pytest.approx(0.13025)
    assert type(parts.prompt_encoder).__name__ == "SDXLPromptEncoder"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    assert pipe.text_encoder_2.config.projection_dim == TINY_SDXL_POOLED


def test_the_text_side_matches_the_stock_pipeline(tiny_sdxl):
    """Penultimate hidden states of both encoders side by side, the second's projected
    pooled output; the empty prompt is zeros (force_zeros_for_empty_prompt)."""
    from diffusers import StableDiffusionXLPipeline

    parts = load_teacher(str(tiny_sdxl))
    y = parts.prompt_encoder.encode(["a red circle", ""], "cpu")
    assert y.hidden_states.shape == (2, 77, sum(TINY_SDXL_TEXT_WIDTHS))
    assert set(y.added) == {"text_embeds"} and y.added["text_embeds"].shape == (2, TINY_SDXL_POOLED)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    seq, neg, pooled, neg_pooled = pipe.encode_prompt("a red circle", device="cpu")
    torch.testing.assert_close(y.hidden_states[:1], seq)
    torch.testing.assert_close(y.added["text_embeds"][:1], pooled)
    assert not y.hidden_states[1].any() and not y.added["text_embeds"][1].any()
    torch.testing.assert_close(y.hidden_states[1:], neg)  # the pipeline's unconditional
    torch.testing.assert_close(y.added["text_embeds"][1:], neg_pooled)


def test_time_ids_come_from_the_batch_and_default_without_sizes(sdxl_module):
    y = sdxl_module.batch_conditioning(_sized_batch())
    expected = torch.tensor([[64, 48, 3, 0, 32, 32], [40, 33, 0, 4, 32, 32]], dtype=torch.float32)
    torch.testing.assert_close(y.added["time_ids"], expected)
    assert y.added["text_embeds"].shape == (2, TINY_SDXL_POOLED)
    plain = sdxl_module.batch_conditioning(make_batch())  # predict on a folder, old shards
    torch.testing.assert_close(
        plain.added["time_ids"], torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    )


def test_added_conditions_reach_the_unet_and_the_adapter(sdxl_module):
    """Every network call of a training step (online, solver, target) gets the batch's
    pooled text and time_ids, in the UNet and in the adapter."""
    m = sdxl_module
    batch = _sized_batch()
    want = m.batch_conditioning(batch)
    calls = {"unet": [], "controlnet": [], "target": []}
    hooks = [
        _record_kwargs(m.network, calls["unet"]),
        _record_kwargs(m.controlnet, calls["controlnet"]),
        _record_kwargs(m.target["controlnet"], calls["target"]),
    ]
    try:
        m.compute_loss(batch, torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert calls["unet"] and calls["controlnet"] and calls["target"]
    for kwargs in [c for group in calls.values() for c in group]:
        added = kwargs["added_cond_kwargs"]
        torch.testing.assert_close(added["time_ids"], want.added["time_ids"])
        torch.testing.assert_close(added["text_embeds"], want.added["text_embeds"])
        torch.testing.assert_close(kwargs["encoder_hidden_states"], want.hidden_states)


def test_time_ids_change_the_unet_and_the_adapter_outputs(sdxl_module):
    """The network call passes time_ids on to each network, and each uses them: the
    teacher's output and the adapter's residuals (its zero output convolutions randomised
    on a copy) change with them."""
    import copy

    m = sdxl_module
    adapter = copy.deepcopy(m.controlnet)
    for conv in [*adapter.controlnet_down_blocks, adapter.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.1)
    residuals = []
    hook = adapter.register_forward_hook(lambda mod, args, out: residuals.append(out[1]))
    batch = _sized_batch()
    y = m.batch_conditioning(batch)
    y2 = Conditioning(y.hidden_states, {**y.added, "time_ids": y.added["time_ids"] * 2})
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    try:
        with torch.no_grad():
            teacher = [m._controlled(m.network, None, z, t, v, batch["cond"]) for v in (y, y2)]
            for v in (y, y2):
                m._controlled(m.network, adapter, z, t, v, batch["cond"])
    finally:
        hook.remove()
    assert not torch.allclose(*teacher)
    assert len(residuals) == 2 and not torch.allclose(*residuals)


@pytest.mark.parametrize("method", ["pe-codi", "codi"])
def test_one_training_step_on_sdxl(tiny_sdxl, method):
    m = CoDiDistillation(str(tiny_sdxl), num_grid=10, method=method)
    m.train()
    loss, terms = m.compute_loss(_sized_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"consistency", "guidance", "loss"}
    trainable = {id(p) for p in m.trainable_parameters()}
    with_grad = {id(p) for p in m.parameters() if p.grad is not None}
    assert with_grad and with_grad <= trainable
    assert all(torch.isfinite(p.grad).all() for p in m.trainable_parameters() if p.grad is not None)
    if method == "codi":
        assert any(p.grad is not None for p in m.student_network.parameters())


def test_guidance_aware_distillation_and_guided_sampling_on_sdxl(sdxl_module):
    """The unconditional branch: the empty prompt's (zero) text, the batch's time_ids."""
    m = CoDiDistillation(
        sdxl_module.hparams["pretrained"], num_grid=10, cfg_aware=True, guidance_range=(3, 4)
    )
    batch = _sized_batch()
    calls = []
    hook = _record_kwargs(m.controlnet, calls)
    try:
        loss, _ = m.compute_loss(batch, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    loss.backward()
    assert torch.isfinite(loss)
    guided = [c for c in calls if c["encoder_hidden_states"].shape[0] == 4]
    assert guided, "no two-branch pass"
    added = guided[0]["added_cond_kwargs"]
    time_ids = m.batch_conditioning(batch).added["time_ids"]
    torch.testing.assert_close(added["time_ids"], torch.cat([time_ids, time_ids]))
    assert not added["text_embeds"][2:].any()  # empty prompt: zeros
    sizes = ImageSizes.from_batch(batch)
    images = m.sample_images(batch["cond"], batch["caption"], 2, guidance_scale=3.0, sizes=sizes)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_test_and_predict_sample_with_the_batch_sizes(sdxl_module, monkeypatch):
    m = sdxl_module
    seen = []
    encode_text = m.encode_text

    def spy(captions, sizes=None):
        seen.append(sizes)
        return encode_text(captions, sizes)

    monkeypatch.setattr(m, "encode_text", spy)
    batch = _sized_batch()
    images = m._eval_samples(batch, 1, ["a", "b"])  # test_step and predict_step
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(seen[0].original_size, batch["original_size"])
    assert torch.equal(seen[0].crop_top_left, batch["crop_top_left"])


def test_baseline_trains_and_samples_on_sdxl(tiny_sdxl):
    m = ControlNetBaseline(str(tiny_sdxl), num_grid=10)
    batch = _sized_batch()
    loss, _ = m.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert {id(p) for p in m.parameters() if p.grad is not None} <= {
        id(p) for p in m.trainable_parameters()
    }
    images = m.sample_images(batch["cond"], batch["caption"], 2, sizes=ImageSizes.from_batch(batch))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_the_sdxl_vae_never_runs_in_fp16(sdxl_module):
    m = sdxl_module
    seen = []
    hook = m.vae.encoder.conv_in.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            m.encode_images(make_batch()["image"], torch.Generator().manual_seed(0))
        m.vae.half()  # precision=16-true converts every submodule
        m.encode_images(make_batch()["image"], torch.Generator().manual_seed(0))
    finally:
        hook.remove()
        m.vae.float()
    assert seen == [torch.float32, torch.float32]


def test_vae_path_replaces_the_vae_and_its_scaling_factor(tmp_path, tiny_teacher, tiny_sdxl):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    AutoencoderKL(**tiny_vae_config(), scaling_factor=0.5).save_pretrained(tmp_path / "sd_vae")
    m = CoDiDistillation(str(tiny_teacher), num_grid=10, vae_path=str(tmp_path / "sd_vae"))
    assert m.scaling_factor == 0.5 and not m.vae_upcast
    saved = AutoencoderKL.from_pretrained(tmp_path / "sd_vae")
    torch.testing.assert_close(m.vae.state_dict(), saved.state_dict())
    assert m.hparams["vae_path"] == str(tmp_path / "sd_vae")
    fixed = AutoencoderKL(**tiny_vae_config(), scaling_factor=0.13025, force_upcast=False)
    fixed.save_pretrained(tmp_path / "fp16_fix")  # as madebyollin/sdxl-vae-fp16-fix
    parts = load_teacher(str(tiny_sdxl), vae_path=str(tmp_path / "fp16_fix"))
    assert parts.family == "sdxl" and not parts.vae_upcast


def test_sd_teachers_get_no_added_conditions(tiny_teacher):
    """SD 1.x/2.x: y is the CLIP sequence alone and the networks get added_cond_kwargs=None."""
    m = CoDiDistillation(str(tiny_teacher), num_grid=10)
    assert load_teacher(str(tiny_teacher)).family == "sd"
    y = m.batch_conditioning(_sized_batch())
    assert not y.added and y.hidden_states.shape == (2, 77, 32)
    calls = []
    hook = _record_kwargs(m.network, calls)
    try:
        m.compute_loss(_sized_batch(), torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert calls and all(c["added_cond_kwargs"] is None for c in calls)


def test_conditioning_rows_concatenation_and_guidance_branch():
    a = Conditioning(torch.ones(2, 3, 4), {"time_ids": torch.arange(12.0).view(2, 6)})
    empty = Conditioning(torch.zeros(1, 3, 4), {"text_embeds": torch.zeros(1, 5)})
    both = Conditioning.cat([a, a])
    assert len(both) == 4 and both.added["time_ids"].shape == (4, 6)
    assert torch.equal(a[1].added["time_ids"], a.added["time_ids"][1:])
    unc = a.with_text(empty.expand(2))
    assert unc.hidden_states.shape == (2, 3, 4) and not unc.hidden_states.any()
    assert set(unc.added) == {"time_ids", "text_embeds"}
    with pytest.raises(ValueError):
        Conditioning.cat([a, empty])
    assert Conditioning.of(torch.ones(1, 2, 3)).network_kwargs()["added_cond_kwargs"] is None


def test_fit_with_validation_on_sdxl_shards(tmp_path, tiny_sdxl, tiny_shards):
    """Shards -> recorded sizes -> time_ids -> one training step and the validation grid."""
    import lightning as L

    from codi_lightning.data import ShardDataModule

    m = CoDiDistillation(str(tiny_sdxl), num_grid=10, val_images=2, val_steps=(1,))
    dm = ShardDataModule(tiny_shards["train"], tiny_shards["val"], resolution=32, batch_size=2,
                         num_workers=0, condition="sr")  # fmt: skip
    seen = []
    original = m.batch_conditioning

    def spy(batch):
        y = original(batch)
        seen.append((batch["original_size"], y.added["time_ids"]))
        return y

    m.batch_conditioning = spy
    sampled = []
    sample_images = m.sample_images

    def spy_sampler(*args, **kwargs):
        sampled.append(kwargs.get("sizes"))
        return sample_images(*args, **kwargs)

    m.sample_images = spy_sampler
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=1, val_check_interval=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(m, datamodule=dm)
    assert len(seen) == 2  # the training step and the validation loss
    for sizes, time_ids in seen:
        assert torch.equal(time_ids[:, :2].long(), sizes)
    assert sampled and all(s is not None for s in sampled)  # the grid uses the batch's sizes
    assert (sampled[0].original_size == 64).all()  # the 64 px shard images, cropped to 32
    assert list(tmp_path.rglob("samples/*.png"))
