"""Checkpoints record local teacher paths absolute: they load from any working directory,
and a teacher that has moved fails with the override to use."""

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from codi_lightning.checkpoints import (
    TeacherNotFoundError,
    is_missing_local_path,
    resolve_local_path,
)
from codi_lightning.export import export_checkpoint
from codi_lightning.training import CoDiDistillation, DiffusionTraining


def _save(module, path):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def relative_teacher_ckpt(tiny_teacher, tmp_path, monkeypatch):
    """A checkpoint of a model built with the RELATIVE teacher path ``teachers/tiny``."""
    shutil.copytree(tiny_teacher, tmp_path / "run" / "teachers" / "tiny")
    monkeypatch.chdir(tmp_path / "run")
    torch.manual_seed(0)
    module = CoDiDistillation("teachers/tiny", num_grid=10)
    ckpt = _save(module, tmp_path / "model.ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return ckpt, tmp_path / "run" / "teachers" / "tiny", module


def test_checkpoint_loads_from_another_directory(relative_teacher_ckpt):
    ckpt, teacher, module = relative_teacher_ckpt
    recorded = torch.load(ckpt, weights_only=True)["hyper_parameters"]["pretrained"]
    assert recorded == str(teacher.resolve())
    loaded = CoDiDistillation.load_from_checkpoint(ckpt)
    for a, b in zip(module.controlnet.parameters(), loaded.controlnet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_moved_teacher_names_the_override(relative_teacher_ckpt, tmp_path):
    ckpt, teacher, module = relative_teacher_ckpt
    moved = tmp_path / "moved"
    teacher.rename(moved)
    with pytest.raises(TeacherNotFoundError) as info:
        CoDiDistillation.load_from_checkpoint(ckpt)
    message = str(info.value)
    assert str(teacher.resolve()) in message and "\n" not in message
    assert "CoDiDistillation.load_from_checkpoint(ckpt, pretrained=" in message
    assert "--model.pretrained" in message
    loaded = CoDiDistillation.load_from_checkpoint(ckpt, pretrained=str(moved))
    assert loaded.hparams.pretrained == str(moved.resolve())
    assert torch.equal(module.controlnet.conv_in.weight, loaded.controlnet.conv_in.weight)

    with pytest.raises(TeacherNotFoundError, match="--pretrained PATH"):
        export_checkpoint(str(ckpt), str(tmp_path / "export"))
    out = export_checkpoint(str(ckpt), str(tmp_path / "export"), pretrained=str(moved))
    assert (out / "controlnet" / "config.json").is_file()


def test_hub_ids_stay_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert resolve_local_path("local") == str(tmp_path.resolve() / "local")
    assert resolve_local_path("org/model") == "org/model"
    assert resolve_local_path("model") == "model"
    assert not is_missing_local_path("org/model")  # may be on the hub: not ours to judge
    for path in ("gone/a/b", "/gone/abs", "./gone", "../gone", "~/gone-codi-test"):
        assert is_missing_local_path(path), path
    assert resolve_local_path("out/later", always_local=True) == str(
        tmp_path.resolve() / "out/later"
    )


def test_teacher_training_records_absolute_paths(tiny_teacher, tmp_path, monkeypatch):
    shutil.copytree(tiny_teacher, tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    module = DiffusionTraining(output_dir="out/teacher", init_from="teacher", pixel_space=False)
    assert module.hparams.init_from == str(tmp_path.resolve() / "teacher")
    assert module.hparams.output_dir == str(tmp_path.resolve() / "out" / "teacher")
    with pytest.raises(TeacherNotFoundError, match="--model.init_from PATH"):
        DiffusionTraining(output_dir="out", init_from="gone/away/teacher")


def test_cli_takes_the_commands_teacher_when_the_recorded_one_is_missing(
    relative_teacher_ckpt, tmp_path, capsys
):
    from test_cli import ParseOnlyCLI, _Parsed

    from codi_lightning.cli import main

    ckpt, teacher, _ = relative_teacher_ckpt
    tiny = str(Path(__file__).parents[2] / "configs" / "tiny_cpu.yaml")
    moved = tmp_path / "moved"
    teacher.rename(moved)
    args = ["test", "--config", tiny, "--ckpt_path", str(ckpt)]
    with pytest.raises(_Parsed) as info:
        ParseOnlyCLI(args=[*args, "--model.pretrained", str(moved)])
    assert info.value.args[0]["test"].model.init_args.pretrained == str(moved)
    err = capsys.readouterr().err
    assert f"{str(teacher.resolve())!r} recorded in the checkpoint is not found here" in err
    # the config's teacher (bench/assets/toy_teacher, relative) does not exist here either
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {ckpt}: teacher ") and last.endswith("--model.pretrained PATH")
