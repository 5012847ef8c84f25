"""Teacher pretraining (DiffusionTraining), DDIM sampling and the two-stage baseline."""

import lightning as L
import pytest
import torch
from conftest import make_batch
from torch.utils.data import DataLoader

from codi_lightning.diffusion import NoiseSchedule
from codi_lightning.models import load_teacher
from codi_lightning.models.tiny import SD_SCHEDULER, tiny_unet_config
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
    before = [p.clone() for p in m.unet.parameters()]
    batch = make_batch(batch=2, resolution=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, train_dataloaders=DataLoader([batch], batch_size=None))
    assert m.ema_decay_now() == pytest.approx(4 / 13)  # warm-up after 3 updates
    assert any(not torch.equal(a, b) for a, b in zip(before, m.unet.parameters(), strict=True))
    parts = load_teacher(str(out), pixel_space=True)
    for a, b in zip(parts.unet.parameters(), m.ema_unet.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the EMA weights are exported
    student = CoDiDistillation(str(out), pixel_space=True, num_grid=10)
    loss, _ = student.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_fresh_teacher_needs_pixel_space(tmp_path):
    with pytest.raises(ValueError, match="pixel_space"):
        DiffusionTraining(str(tmp_path), pixel_space=False, unet=tiny_unet_config())


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
