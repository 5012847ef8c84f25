"""Checkpoint files written straight to disk (StreamedCheckpointIO): complete, atomic,
and what the CLI's trainers use."""

from pathlib import Path

import pytest
import torch

from codi_lightning.cli import CoDiCLI
from codi_lightning.training import StreamedCheckpointIO

TINY = str(Path(__file__).parents[2] / "configs" / "tiny_cpu.yaml")


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path):
    io = StreamedCheckpointIO()
    path = tmp_path / "runs" / "last.ckpt"
    first = {"state_dict": {"w": torch.arange(6.0)}, "global_step": 1}
    io.save_checkpoint(first, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(
        loaded["state_dict"]["w"], first["state_dict"]["w"]
    )
    second = {"state_dict": {"w": torch.ones(1_000_000)}, "global_step": 2}
    io.save_checkpoint(second, path)  # over an existing one
    assert torch.load(path, weights_only=True)["global_step"] == 2
    # a save that fails half-way (an object torch.save cannot pickle, after a large tensor)
    broken = {"state_dict": {"w": torch.zeros(1_000_000)}, "hook": lambda: None}
    with pytest.raises(Exception, match="pickle|lambda"):
        io.save_checkpoint(broken, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2  # the previous one, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no partial file


def test_the_cli_trainers_write_checkpoints_with_it():
    cli = CoDiCLI(args=["--config", TINY, "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, StreamedCheckpointIO)
