"""StepProgressBar: steps of max_steps, not "Epoch 0/-2", and no v_num."""

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from codi_lightning.training import StepProgressBar


class _Stream(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.randn(4)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_bar_counts_steps_of_max_steps_without_v_num(tmp_path, capsys):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, default_root_dir=tmp_path, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[StepProgressBar()], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(_Tiny(), DataLoader(_Stream(), batch_size=2))
    captured = capsys.readouterr()
    err = captured.out + captured.err  # Lightning's tqdm bars write to stdout
    assert "Step: 100%" in err and "3/3" in err, err
    assert "Epoch" not in err and "v_num" not in err and "loss=" in err
