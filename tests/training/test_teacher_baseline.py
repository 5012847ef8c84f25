"""Teacher pretraining (DiffusionTraining), DDIM sampling and the two-stage baseline."""

import math

import lightning as L
import pytest
import torch
from helpers import make_batch
from torch.utils.data import DataLoader

from codi_lightning.diffusion import NoiseSchedule
from codi_lightning.models import load_teacher
from codi_lightning.testing.tiny import SD_SCHEDULER, tiny_unet_config
from codi_lightning.training import CoDiDistillation, ControlNetBaseline, DiffusionTraining
from codi_lightning.training.ddim import ddim_sample


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_ddim_with_an_oracle_returns_x(steps):
    sched = NoiseSchedule.from_config(SD_SCHEDULER)
    x = torch.rand(2, 3, 8, 8) * 2 - 1

    def oracle(z, t):
        a, s = sched.alpha_sigma(t, z)
        return (z - a * x) / s

    out = ddim_sample(oracle, torch.randn(2, 3, 8, 8), SD_SCHEDULER, steps)
    torch.testing.assert_close(out, x, rtol=1e-3, atol=1e-3)


def test_teacher_trains_and_exports_a_loadable_folder(tmp_path):
    out = tmp_path / "teacher"
    m = DiffusionTraining(str(out), unet=tiny_unet_config(in_channels=3), ema_decay=0.999,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    before = [p.clone() for p in m.network.parameters()]
    batch = make_batch(batch=2, resolution=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, train_dataloaders=DataLoader([batch], batch_size=None))
    assert m.ema_decay_now() == pytest.approx(4 / 13)  # warm-up after 3 updates
    assert any(not torch.equal(a, b) for a, b in zip(before, m.network.parameters(), strict=True))
    parts = load_teacher(str(out), pixel_space=True)
    for a, b in zip(parts.network.parameters(), m.ema_network.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the EMA weights are exported
    student = CoDiDistillation(str(out), pixel_space=True, num_grid=10)
    loss, _ = student.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_adapting_a_latent_teacher_trains_validates_and_writes_its_vae_back(tmp_path, tiny_teacher):
    """``init_from`` a teacher with a VAE: the loss runs on VAE latents (the teacher I/O
    the distillation uses), the validation grid decodes its samples, and the folder
    written back holds the frozen VAE unchanged and the trained network."""
    out = tmp_path / "adapted"
    m = DiffusionTraining(str(out), init_from=str(tiny_teacher), pixel_space=False,
                          val_steps=2, val_images=2)  # fmt: skip
    batch = make_batch(batch=2, resolution=32)
    assert m.batch_latents(batch, None).shape == (2, 4, 8, 8)  # the tiny VAE's 4x
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=1)  # fmt: skip
    loader = DataLoader([batch], batch_size=None)
    trainer.fit(m, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.callback_metrics["val/loss"].isfinite()
    assert (tmp_path / "samples" / "step_0000001.png").is_file()
    parts, original = load_teacher(str(out)), load_teacher(str(tiny_teacher))
    for a, b in zip(parts.vae.parameters(), original.vae.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(parts.network.parameters(), m.ema_network.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_fresh_teacher_needs_pixel_space(tmp_path):
    with pytest.raises(ValueError, match="pixel_space"):
        DiffusionTraining(str(tmp_path), pixel_space=False, unet=tiny_unet_config())


def test_teachers_it_cannot_write_back_are_refused_before_training(
    tmp_path, tiny_sdxl_teacher, tiny_flux_teacher
):
    """SDXL and Flux folders cannot be adapted: refused when the module is built, not
    when the finished run writes its folder."""
    for teacher, family in ((tiny_sdxl_teacher, "sdxl"), (tiny_flux_teacher, "flux")):
        with pytest.raises(ValueError, match=f"is a {family} teacher"):
            DiffusionTraining(str(tmp_path), init_from=str(teacher))


def test_the_flux_baseline_trains_and_samples_at_the_runs_shift(tiny_flux_teacher):
    """The two-stage baseline on a Flux teacher: the diffusion loss and Euler sampling on
    the schedule of the run's resolution (16 tokens at 32 px: mu = 0.5 + 0.65 (16 - 256)
    / 3840)."""
    m = ControlNetBaseline(str(tiny_flux_teacher), shift_resolution=32)
    assert m.schedule.shift == pytest.approx(math.exp(0.5 + 0.65 * (16 - 256) / 3840))
    loss, terms = m.compute_loss(make_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(terms) == {"diffusion", "loss"}
    images = m.sample_images(make_batch()["cond"], ["a", ""], 2)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_baseline_uses_the_diffusion_loss_and_ddim(tiny_pixel_teacher):
    m = ControlNetBaseline(str(tiny_pixel_teacher), pixel_space=True)
    batch = make_batch(batch=2, resolution=16)
    loss, terms = m.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert set(terms) == {"loss", "diffusion"}
    assert any(p.grad is not None for p in m.controlnet.parameters())
    out = m.sample_images(
        batch["cond"], batch["caption"], 2, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1


def test_flow_transformer_teacher_trains_exports_and_distils(tmp_path):
    """A fresh SD3-style flow teacher in pixel space: velocity loss, an SD3-layout folder
    the distillation loads as the SD3 family with the teacher's shift, and its samples by
    the Euler method equal to FlowMatchEulerDiscreteScheduler's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from codi_lightning.diffusion import FlowSchedule
    from codi_lightning.testing.tiny import tiny_sd3_transformer_config

    out = tmp_path / "flow_teacher"
    config = {**tiny_sd3_transformer_config(), "in_channels": 3, "out_channels": 3}
    m = DiffusionTraining(str(out), transformer=config, flow_shift=1.5,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    assert isinstance(m.schedule, FlowSchedule) and m.schedule.shift == 1.5
    batch = make_batch(batch=2, resolution=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, train_dataloaders=DataLoader([batch], batch_size=None))
    parts = load_teacher(str(out), pixel_space=True)
    assert parts.family == "sd3" and parts.vae is None
    for a, b in zip(parts.network.parameters(), m.ema_network.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert (
        StableDiffusion3Pipeline.load_config(str(out))["_class_name"] == "StableDiffusion3Pipeline"
    )
    # the loss regresses the velocity eps - x at sigma_t
    text = m.encode_text(batch["caption"])
    x, noise, t = batch["image"], torch.randn(2, 3, 16, 16), torch.tensor([100, 900])
    sigma = m.schedule.sigmas[t].float().view(2, 1, 1, 1)
    with torch.no_grad():
        v = m.denoiser(m.network, text)((1 - sigma) * x + sigma * noise, t)
        from codi_lightning.diffusion import diffusion_loss

        loss = diffusion_loss(m.denoiser(m.network, text), x, noise, t, m.schedule)
    torch.testing.assert_close(loss, (v - (noise - x)).square().mean())
    # validation samples: the stock Euler scheduler at the trailing steps
    stock = FlowMatchEulerDiscreteScheduler(shift=1.5)
    ts = [999, 749, 499, 249]
    stock.set_timesteps(sigmas=m.schedule.unshifted(ts))
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = m.sample(text, z.clone(), 4)
    model = m.denoiser(m.ema_network, text)
    with torch.no_grad():
        for step, tt in zip(stock.timesteps, ts, strict=True):
            z = stock.step(model(z, torch.full((2,), tt)), step, z).prev_sample
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)
    # distillation on it, in pixel space (the adapter takes the condition in [-1, 1])
    student = CoDiDistillation(str(out), pixel_space=True, num_grid=10)
    assert isinstance(student.schedule, FlowSchedule) and student.schedule.shift == 1.5
    torch.testing.assert_close(student.adapter_condition(batch["cond"]), batch["cond"] * 2 - 1)
    loss, _ = student.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in student.controlnet.parameters())
    images = student.sample_images(batch["cond"], batch["caption"], 2)
    assert images.shape == (2, 3, 16, 16)


def test_a_fresh_flow_teachers_short_text_side_is_written_and_read_back(tmp_path):
    """``text_tokens``: every tokenizer of a fresh flow teacher is that long; the folder
    it writes gives the distillation's loader and the stock SD3 pipeline the same
    2 x text_tokens text tokens (CLIP's, then T5's)."""
    from diffusers import StableDiffusion3Pipeline

    from codi_lightning.testing.tiny import tiny_sd3_transformer_config

    config = {**tiny_sd3_transformer_config(), "in_channels": 3, "out_channels": 3}
    m = DiffusionTraining(str(tmp_path / "unused"), transformer=config, text_tokens=6)
    assert m.encode_text([""]).hidden_states.shape[1] == 12
    folder = m.export(str(tmp_path / "teacher"))
    ours = load_teacher(str(folder), pixel_space=True).prompt_encoder.encode(["a 7"], "cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), transformer=None, vae=None)
    embeds, _, pooled, _ = pipe.encode_prompt("a 7", "a 7", "a 7", max_sequence_length=6,
                                              do_classifier_free_guidance=False)  # fmt: skip
    assert embeds.shape[1] == 12
    torch.testing.assert_close(ours.hidden_states, embeds)
    torch.testing.assert_close(ours.added["pooled_projections"], pooled)


def test_a_fresh_sana_teacher_trains_exports_and_distils(tmp_path):
    """``_class_name: SanaTransformer2DModel``: a fresh pixel-space SANA teacher (its
    family's tiny Gemma text side, ``text_tokens`` long) trains with the velocity loss and
    writes a SANA folder without a VAE, which the distillation loads as the SANA family
    (the exported EMA weights, the same text conditioning) and the stock SanaPipeline
    encodes prompts for the same way."""
    from diffusers import SanaPipeline

    from codi_lightning.diffusion import FlowSchedule
    from codi_lightning.models.teachers.sana import default_instruction
    from codi_lightning.testing.tiny import tiny_sana_transformer_config

    config = {**tiny_sana_transformer_config(), "in_channels": 3, "out_channels": 3,
              "sample_size": 16, "_class_name": "SanaTransformer2DModel"}  # fmt: skip
    out = tmp_path / "sana_teacher"
    m = DiffusionTraining(str(out), transformer=config, flow_shift=1.5, text_tokens=8,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    assert m.family == "sana" and isinstance(m.schedule, FlowSchedule)
    assert m.schedule.shift == 1.5
    batch = make_batch(batch=2, resolution=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, train_dataloaders=DataLoader([batch], batch_size=None))
    parts = load_teacher(str(out), pixel_space=True)
    assert parts.family == "sana" and parts.vae is None
    for a, b in zip(parts.network.parameters(), m.ema_network.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    ours = m.encode_text(["a 7", ""])
    assert ours.hidden_states.shape[1] == 8
    loaded = parts.prompt_encoder.encode(["a 7", ""], "cpu")
    torch.testing.assert_close(loaded.hidden_states, ours.hidden_states)
    pipe = SanaPipeline.from_pretrained(str(out), transformer=None, vae=None)
    embeds, mask, _, _ = pipe.encode_prompt(
        "a 7", do_classifier_free_guidance=False, device="cpu", max_sequence_length=8,
        complex_human_instruction=default_instruction(),
    )  # fmt: skip
    torch.testing.assert_close(ours.hidden_states[:1], embeds)
    assert torch.equal(ours.added["encoder_attention_mask"][:1], mask)
    student = CoDiDistillation(str(out), pixel_space=True, num_grid=10)
    assert student.family == "sana" and student.schedule.shift == 1.5
    loss, _ = student.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in student.controlnet.parameters())
    assert student.sample_images(batch["cond"], batch["caption"], 2).shape == (2, 3, 16, 16)


def test_a_fresh_network_of_a_class_it_cannot_train_is_refused_naming_the_classes(tmp_path):
    with pytest.raises(ValueError, match="_class_name to one of: SD3Transformer2DModel, Sana"):
        DiffusionTraining(str(tmp_path), transformer={"_class_name": "FluxTransformer2DModel"})


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_a_velocity_teacher_sets_the_flow_target_where_it_reaches(
    tmp_path, monkeypatch, prediction_type
):
    """``velocity_teacher``: at a flow state that is a VP state of integer timestep t scaled
    by 1 / (a + b), the target is (z - x_T) / sigma with x_T the VP teacher's clean
    estimate at t, as diffusers' DDPMScheduler forms the state and converts the output;
    outside the VP noise levels it is the data target eps - x."""
    from diffusers import DDPMScheduler

    from codi_lightning.testing.tiny import tiny_sd3_transformer_config, write_tiny_teacher

    vp = write_tiny_teacher(tmp_path / "vp", pixel_space=True, prediction_type=prediction_type)
    config = {**tiny_sd3_transformer_config(), "in_channels": 3, "out_channels": 3}
    m = DiffusionTraining(str(tmp_path / "unused"), transformer=config, velocity_teacher=str(vp))
    parts = load_teacher(str(vp), pixel_space=True)
    stock = DDPMScheduler.from_pretrained(str(vp), subfolder="scheduler")
    x, eps = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16)
    t = torch.tensor([37, 812])
    z_vp = stock.add_noise(x, eps, t)
    abar = stock.alphas_cumprod[t].view(-1, 1, 1, 1)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    z, sigma = z_vp / (a + b), b / (a + b)
    text = parts.prompt_encoder.encode(["", ""], "cpu")
    stock.set_timesteps(1000)
    with torch.no_grad():
        out = parts.family.forward(parts.network, None, z_vp, t, text, None)
    x_t = [stock.step(out[i : i + 1], int(t[i]), z_vp[i : i + 1]).pred_original_sample
           for i in range(2)]  # fmt: skip
    expected = (z - torch.cat(x_t)) / sigma
    torch.testing.assert_close(m.teacher_velocity(z, sigma, ["", ""]), expected,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    # outside the VP noise levels (flow sigma 0.001 and 0.999) the loss is the data loss
    low, high = m.velocity_reach
    assert m.schedule.sigmas[0] < low < 0.05 and 0.9 < high < m.schedule.sigmas[-1]
    batch = make_batch(batch=2, resolution=16)

    def losses(timesteps):
        monkeypatch.setattr(torch, "randint", lambda *args, **kw: torch.tensor(timesteps))
        with torch.no_grad():
            torch.manual_seed(0)
            taught = m.diffusion_loss(batch)
            torch.manual_seed(0)
            return taught, m.diffusion_loss(batch, data_target=True)

    taught, data = losses([0, 999])
    torch.testing.assert_close(taught, data)
    taught, data = losses([300, 700])
    assert not torch.allclose(taught, data)
    with pytest.raises(ValueError, match="for a flow model"):
        DiffusionTraining(str(tmp_path / "unused"), unet=tiny_unet_config(in_channels=3),
                          velocity_teacher=str(vp))  # fmt: skip
