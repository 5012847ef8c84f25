"""Stop after k steps, resume from the checkpoint: the run continues exactly (SD, and
SDXL with each sample's recorded sizes in its time_ids).

Noise and timesteps are drawn from a generator seeded by (seed, global step, rank), and
the data here is one fixed batch, so an interrupted run and an uninterrupted one see the
same inputs at every step. On the CPU the arithmetic is then the same op for op; the
tolerance (rtol 1e-5, atol 1e-6) only absorbs reduction-order differences in threaded
kernels.
"""

import lightning as L
import pytest
import torch
from helpers import make_batch
from torch.utils.data import DataLoader

from codi_lightning.training import CoDiDistillation

# recorded (h, w) before resizing and crop (top, left), per sample: SDXL's time_ids
SIZES = {"original_size": [[64, 48], [40, 33]], "crop_top_left": [[3, 0], [0, 4]]}


class OneBatch(L.LightningDataModule):
    """The same batch of 2, ``repeats`` times per epoch (``sizes``: with each sample's
    recorded original size and crop, as the data module gives them)."""

    def __init__(self, repeats: int = 1, sizes: bool = False):
        super().__init__()
        batch = make_batch(batch=2)
        self.samples = [
            {"image": batch["image"][i], "cond": batch["cond"][i], "caption": batch["caption"][i]}
            for i in range(2)
        ]
        if sizes:
            for i, sample in enumerate(self.samples):
                sample.update({k: torch.tensor(v[i]) for k, v in SIZES.items()})
        self.samples = self.samples * repeats

    def train_dataloader(self):
        return DataLoader(self.samples, batch_size=2, shuffle=False)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = {}
        self.micro = {}  # batch_idx -> (global step before the batch, loss)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()
        self.micro[batch_idx] = (self._step, outputs["loss"].item())


class SeedRecorder(CoDiDistillation):
    """Records the seed of each training batch's generator (noise, t, VAE posterior)."""

    def training_step(self, batch, batch_idx):
        gen = self.step_generator(micro_batch=self.micro_batch_index(batch_idx))
        self.seeds = {**getattr(self, "seeds", {}), batch_idx: gen.initial_seed()}
        return super().training_step(batch, batch_idx)


def _fit(teacher, root, max_steps, ckpt_path=None, accumulate=1, cls=CoDiDistillation,
         sizes=False, lora_rank=0):  # fmt: skip
    torch.manual_seed(0)
    module = cls(
        str(teacher), method="pe-codi" if lora_rank else "codi", lora_rank=lora_rank,
        num_grid=10, ema_decay=0.9,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    )  # fmt: skip
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[recorder], num_sanity_val_steps=0, accumulate_grad_batches=accumulate,
    )  # fmt: skip
    data = OneBatch(repeats=1 if accumulate == 1 else 50, sizes=sizes)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if accumulate > 1:
        return trainer, module, recorder.micro
    return trainer, module, recorder.losses


class TimeIdsRecorder(CoDiDistillation):
    """Records the time_ids of each training batch's conditioning."""

    def batch_conditioning(self, batch):
        y = super().batch_conditioning(batch)
        self.time_ids = [*getattr(self, "time_ids", []), y.added["time_ids"].clone()]
        return y


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd-lora"])
def test_resume_continues_exactly(family, request, tmp_path):
    """(``sd-lora``: PE-CoDi with a LoRA of the shared UNet, whose weights live inside
    the frozen network and reach the checkpoint as ``lora.*``.)"""
    teacher = request.getfixturevalue(
        {"sd": "tiny_teacher", "sdxl": "tiny_sdxl_teacher", "sd-lora": "tiny_teacher"}[family]
    )
    sdxl = family == "sdxl"
    lora = 4 if family == "sd-lora" else 0
    cls = TimeIdsRecorder if sdxl else CoDiDistillation
    k, n = 3, 6
    _, full, full_losses = _fit(teacher, tmp_path / "a", n, sizes=sdxl, cls=cls, lora_rank=lora)
    trainer, _, first_losses = _fit(teacher, tmp_path / "b", k, sizes=sdxl, lora_rank=lora)
    ckpt = tmp_path / "k.ckpt"
    trainer.save_checkpoint(ckpt)
    trainer2, resumed, resumed_losses = _fit(
        teacher, tmp_path / "c", n, ckpt_path=str(ckpt), sizes=sdxl, cls=cls, lora_rank=lora
    )
    if sdxl:  # every step, before and after resume, conditions on the batch's sizes
        want = torch.tensor([[64, 48, 3, 0, 32, 32], [40, 33, 0, 4, 32, 32]], dtype=torch.float32)
        assert len(full.time_ids) == n and len(resumed.time_ids) == n - k
        for got in full.time_ids + resumed.time_ids:
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    assert trainer2.global_step == n
    assert sorted(first_losses) == list(range(1, k + 1))
    assert sorted(resumed_losses) == list(range(k + 1, n + 1))  # no step repeated or lost
    for step in range(1, n + 1):
        got = first_losses.get(step, resumed_losses.get(step))
        torch.testing.assert_close(got, full_losses[step], rtol=1e-5, atol=1e-6)
    for a, b in zip(full.target.parameters(), resumed.target.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if lora:  # the online LoRA inside the network, resumed and trained on
        for a, b in zip(full.lora.parameters(), resumed.lora.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert all(float(p.detach().abs().max()) > 0 for p in resumed.target["lora"].values())
    # the EMA really moved during fit (Lightning calls the optimizer_step override)
    torch.manual_seed(0)
    fresh = CoDiDistillation(str(teacher), method="pe-codi" if lora else "codi", lora_rank=lora,
                             num_grid=10)  # fmt: skip
    moved = [
        not torch.equal(a, b)
        for a, b in zip(fresh.target.parameters(), full.target.parameters(), strict=True)
    ]
    assert sum(moved) > len(moved) // 2
    opt_full = trainer2.optimizers[0].state_dict()
    sched = trainer2.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == n and trainer2.optimizers[0].param_groups[0]["lr"] == 1e-3 * 0.5**3
    assert all(s["step"].item() == n for s in opt_full["state"].values())


def test_gradient_accumulation_draws_fresh_noise_and_resumes_exactly(tiny_teacher, tmp_path):
    """With 2 micro-batches per optimizer step, each micro-batch gets its own noise,
    timesteps and posterior noise (global_step alone would repeat them), and a run resumed
    after 2 optimizer steps continues exactly."""
    _, full, micro = _fit(tiny_teacher, tmp_path / "a", 4, accumulate=2, cls=SeedRecorder)
    assert sorted(micro) == list(range(8))
    assert [micro[i][0] for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 batches a step
    assert len(set(full.seeds.values())) == 8  # a fresh generator for every micro-batch
    # the same batch twice in one step: different draws give different losses
    assert micro[0][1] != micro[1][1] and micro[2][1] != micro[3][1]

    trainer, _, first = _fit(tiny_teacher, tmp_path / "b", 2, accumulate=2)
    ckpt = tmp_path / "k.ckpt"
    trainer.save_checkpoint(ckpt)
    _, resumed, rest = _fit(tiny_teacher, tmp_path / "c", 4, ckpt_path=str(ckpt), accumulate=2)
    assert sorted(first) == [0, 1, 2, 3] and sorted(rest) == [4, 5, 6, 7]
    for i in range(8):
        got = first.get(i, rest.get(i))
        torch.testing.assert_close(got, micro[i], rtol=1e-5, atol=1e-6)
    for a, b in zip(full.target.parameters(), resumed.target.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
