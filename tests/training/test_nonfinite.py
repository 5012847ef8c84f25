"""Non-finite values never reach the weights: a step with a non-finite loss or gradient is
skipped (no optimizer or EMA update), counted, and after ``max_nonfinite_steps`` in a row
the run stops naming the step; a checkpoint of non-finite weights is never written."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import make_batch
from torch.utils.data import DataLoader

from codi_lightning.training import CoDiDistillation, NonFiniteTrainingError


def _module(teacher, **kw):
    torch.manual_seed(0)
    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-3))
    return CoDiDistillation(str(teacher), num_grid=10, **kw)


def _trainer(max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)  # fmt: skip


def _poisoned(value: float = float("nan")) -> dict:
    batch = make_batch()
    batch["image"][0, 0, 3, 5] = value  # one value of one sample
    return batch


class Snapshots(L.Callback):
    """theta and theta^- (the adapter's) after every optimizer step."""

    def __init__(self) -> None:
        self.online, self.target = [], []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.online.append([p.detach().clone() for p in module.controlnet.parameters()])
        self.target.append([p.detach().clone() for p in module.target["controlnet"].parameters()])


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_batch_is_skipped_and_training_goes_on(tiny_teacher, value):
    """Steps 1-3 with the middle batch poisoned by one value: step 2 leaves theta and
    theta^- as step 1 left them (AdamW's moments too), step 3 trains on, everything stays
    finite and the skip is counted."""
    m = _module(tiny_teacher)
    snaps = Snapshots()
    trainer = _trainer(3, callbacks=[snaps])
    batches = [make_batch(seed=1), _poisoned(value), make_batch(seed=2)]
    with pytest.warns(UserWarning, match="step 1: the gradient norm is"):
        trainer.fit(m, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3
    assert _same(snaps.online[1], snaps.online[0]) and _same(snaps.target[1], snaps.target[0])
    assert not _same(snaps.online[2], snaps.online[1])
    assert not _same(snaps.target[2], snaps.target[1])
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    for p in (*m.controlnet.parameters(), *m.target.parameters()):
        assert torch.isfinite(p).all()
    state = trainer.optimizers[0].state
    assert all(int(s["step"]) == 2 for s in state.values())  # two real updates


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tiny_teacher):
    m = _module(tiny_teacher, max_nonfinite_steps=2)
    trainer = _trainer(5)
    batches = [make_batch(seed=1), _poisoned(), _poisoned(), make_batch(seed=2)]
    before = None

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            nonlocal before
            if trainer.global_step == 1:
                before = [p.detach().clone() for p in module.controlnet.parameters()]

    trainer.callbacks.append(Keep())
    with pytest.warns(UserWarning), pytest.raises(NonFiniteTrainingError) as err:
        trainer.fit(m, train_dataloaders=DataLoader(batches, batch_size=None))
    message = str(err.value)
    assert "training stopped at step 2" in message and "2 steps in a row" in message
    assert "model.max_nonfinite_steps" in message and "step 0" in message
    assert _same(before, [p.detach() for p in m.controlnet.parameters()])


def test_a_checkpoint_of_nonfinite_weights_is_never_written(tiny_teacher, tmp_path):
    m = _module(tiny_teacher)
    trainer = _trainer(0)
    trainer.strategy.connect(m)
    good = tmp_path / "last.ckpt"
    trainer.save_checkpoint(good)
    before = good.read_bytes()
    with torch.no_grad():
        next(m.target["controlnet"].parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="no checkpoint written"):
        trainer.save_checkpoint(good)
    assert good.read_bytes() == before  # the good model is kept
    with pytest.raises(NonFiniteTrainingError):
        trainer.save_checkpoint(tmp_path / "other.ckpt")
    assert not (tmp_path / "other.ckpt").exists()


def test_options_are_checked(tiny_teacher):
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        _module(tiny_teacher, max_nonfinite_steps=0)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        _module(tiny_teacher, grad_clip_norm=0.0)
