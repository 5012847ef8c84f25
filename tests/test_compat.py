"""The private APIs of other libraries this project uses (``codi_lightning.compat``): all
present with the parameters the project passes, and each accessor working."""

from __future__ import annotations

import argparse

import pytest

from codi_lightning import compat


def test_every_private_api_is_there_with_the_parameters_used():
    assert compat.changed_private_apis() == []


def test_a_renamed_private_api_is_named(monkeypatch):
    gone = compat.PrivateAPI("argparse", "ArgumentParser._no_such_thing", None, "nothing",
                             "argparse:ArgumentParser")  # fmt: skip
    resigned = compat.PrivateAPI("lightning.pytorch.cli", "LightningCLI._run_subcommand",
                                 ("self", "command"), "nothing")  # fmt: skip
    monkeypatch.setattr(compat, "PRIVATE_APIS", (gone, resigned))
    problems = compat.changed_private_apis()
    assert len(problems) == 2
    assert "ArgumentParser._no_such_thing" in problems[0] and "missing" in problems[0]
    assert "expected ('self', 'command') first" in problems[1]


def test_the_accessors_read_what_they_name():
    from torchmetrics.aggregation import SumMetric

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps")
    assert compat.parser_options(parser) == ["--help", "--steps"]
    assert set(compat.metric_defaults(SumMetric())) == {"sum_value"}
    assert [c.__name__ for c in compat.flux_block_classes()] == [
        "FluxTransformerBlock", "FluxSingleTransformerBlock"
    ]  # fmt: skip
    assert compat.sana_block_class().__name__ == "SanaTransformerBlock"
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    assert hasattr(compat.logger_connector(trainer), "should_update_logs")
    assert compat.logger_connector(object()) is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_load_dcp_state_reads_a_distributed_checkpoint(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(tmp_path), no_dist=True)
    state: dict = {}
    compat.load_dcp_state(state, dcp.FileSystemReader(str(tmp_path)), lambda planner: planner)
    assert torch.equal(state["w"], torch.arange(4.0))
