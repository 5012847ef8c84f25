"""The CLI: every shipped YAML parses through the real parser; fit/validate run end to end."""

from pathlib import Path

import pytest
import torch
import yaml

from codi_lightning.cli import CoDiCLI, main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


class _Parsed(Exception):
    pass


class ParseOnlyCLI(CoDiCLI):
    """Parses with the real parser, then stops before building models (no hub access)."""

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()  # the CLI's own checks still run
        raise _Parsed(self.config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_parses(path):
    """Task configs alone; trainer presets on top of the tiny task config."""
    args = ["fit", "--config", str(path)]
    if path.parent.name == "trainer":
        args = ["fit", "--config", str(path.parents[1] / "tiny_cpu.yaml"), "--config", str(path)]
    with pytest.raises(_Parsed) as info:
        ParseOnlyCLI(args=args)
    config = info.value.args[0]["fit"]
    model = config.model.init_args
    if config.model.class_path.endswith("DiffusionTraining"):
        assert model.output_dir
    else:
        assert config.model.class_path.endswith(("CoDiDistillation", "ControlNetBaseline"))
        assert model.pretrained and model.loss.solver in ("self", "target", "teacher")
    assert config.trainer.max_steps > 0
    if path.parent.name == "trainer":
        assert config.trainer.strategy.class_path.startswith("lightning.pytorch.strategies.")


def test_model_seed_without_data_seed_fails_early_with_the_fix():
    """Lightning would fail at fit start on the hparams merge; the CLI says what to pass."""
    tiny = str(Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml")
    with pytest.raises(ValueError, match="pass --data.seed 3 as well"):
        CoDiCLI(args=["fit", "--config", tiny, "--model.seed", "3"])
    with pytest.raises(_Parsed):  # equal seeds pass the check
        ParseOnlyCLI(args=["fit", "--config", tiny, "--model.seed", "3", "--data.seed", "3"])


def test_fsdp1_wrap_policy_covers_the_blocks():
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn

    from codi_lightning.training.parallel import DiffusersBlockWrapPolicy, diffusers_block_classes

    classes = diffusers_block_classes()
    assert {
        CrossAttnDownBlock2D,
        UNetMidBlock2DCrossAttn,
        ControlNetModel,
        UNet2DConditionModel,
    } <= classes
    DiffusersBlockWrapPolicy()


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "sr.yaml", "edit.yaml", "depth.yaml", "ddp.yaml", "fsdp.yaml"} <= names


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "shards" in out
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "CoDiDistillation"])
    assert "--model.loss.consistency_space" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "DiffusionTraining"])
    assert "--model.init_from" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIGS[0]), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "model" in printed and "data" in printed


def _tiny_config(tmp_path, teacher, shards, **trainer):
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml").read_text())
    out = tmp_path / "run"
    cfg["trainer"].update(
        default_root_dir=str(out), max_steps=4, val_check_interval=2, limit_val_batches=1,
        enable_progress_bar=False, log_every_n_steps=1,
    )  # fmt: skip
    cfg["trainer"].update(trainer)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"].update(
        dirpath=str(out / "ckpt"), every_n_train_steps=2
    )
    cfg["model"].update(pretrained=str(teacher), pixel_space=False, val_images=2, num_grid=10)
    cfg["data"].update(
        train_shards=shards["train"], val_shards=shards["val"], num_workers=0, batch_size=2
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out


def test_fit_then_validate_end_to_end(tmp_path, tiny_teacher, tiny_shards):
    config, out = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    main(["fit", "--config", str(config)])
    last = out / "ckpt" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    assert any(k.startswith("target.controlnet.") for k in ckpt["state_dict"])
    grids = sorted(out.rglob("samples/*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"]
    main(["validate", "--config", str(config), "--ckpt_path", str(last)])
    grids = sorted(out.rglob("samples/*.png"))
    assert len(grids) == 3 and grids[-1].name == "step_0000004.png"  # named by the checkpoint step
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))  # version_0: the fit run
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/consistency",
        "train/guidance",
        "train/lr",
        "train/grad_norm",
        "val/loss",
    } <= scalars
    assert "val/samples" in acc.Tags()["images"]


def test_test_predict_export_end_to_end(tmp_path, tiny_teacher, tiny_shards):
    import json

    from PIL import Image

    config, out = _tiny_config(tmp_path, tiny_teacher, tiny_shards, max_steps=2)
    main(["fit", "--config", str(config)])
    last = str(out / "ckpt" / "last.ckpt")

    main(["test", "--config", str(config), "--ckpt_path", last])
    metrics = sorted(out.rglob("metrics.json"))
    assert len(metrics) == 1
    payload = json.loads(metrics[0].read_text())
    assert payload["meta"]["weights"] == "target" and payload["meta"]["step"] == 2
    for steps in ("1", "2", "4"):
        row = payload["results"][steps]
        assert row["images"] == 10  # every val image once
        assert {"fid", "kid", "psnr", "ssim", "input_psnr"} <= set(row)
    assert "| steps |" in (metrics[0].parent / "metrics.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(metrics[0].parent))
    acc.Reload()
    assert {"test/psnr@1", "test/fid@4", "test/images@2"} <= set(acc.Tags()["scalars"])

    # evaluation options of this command win over the ones saved in the checkpoint
    main(["test", "--config", str(config), "--ckpt_path", last, "--model.test_steps", "[2]",
          "--model.eval_weights", "online", "--trainer.logger.init_args.save_dir", str(tmp_path / "t2")])  # fmt: skip
    again = json.loads(next((tmp_path / "t2").rglob("metrics.json")).read_text())
    assert sorted(again["results"]) == ["2"] and again["meta"]["weights"] == "online"

    inputs = tmp_path / "lowres"
    inputs.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(inputs / f"in{i}.png")
    (inputs / "in0.txt").write_text("a red circle")
    preds = tmp_path / "preds"
    main(["predict", "--config", str(config), "--ckpt_path", last,
          "--data.predict_images", str(inputs), "--data.predict_output", str(preds)])  # fmt: skip
    written = sorted(p.name for p in preds.iterdir())
    assert written == ["in0.png", "in1.png", "in2.png"]
    assert Image.open(preds / "in0.png").size == (32, 32)  # 8 px input, 4x

    main(["export", "--ckpt", last, "--output", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


def test_predict_skips_unreadable_inputs_and_names_them(tmp_path, tiny_teacher, tiny_shards,
                                                         capsys):  # fmt: skip
    """A truncated PNG, a text file named .png and an image above the pixel limit are
    named with their reasons; the good images around them are still written."""
    from PIL import Image

    config, _ = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    inputs = tmp_path / "inputs"
    (inputs / "photos").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 40, 40)).save(inputs / "a_good.png")
    whole = inputs / "photos" / "bad.png"
    Image.effect_noise((8, 8), 60).convert("RGB").save(whole)
    whole.write_bytes(whole.read_bytes()[:60])  # truncated in the pixel data
    (inputs / "photos" / "notes.png").write_text("not a picture")
    Image.new("RGB", (16, 16)).save(inputs / "photos" / "huge.png")  # 256 px > the limit
    Image.new("RGB", (8, 8), (40, 40, 200)).save(inputs / "z_good.png")
    preds = tmp_path / "preds"
    main(["predict", "--config", str(config), "--data.predict_images", str(inputs),
          "--data.predict_output", str(preds), "--data.predict_batch_size", "2",
          "--data.max_pixels", "100"])  # fmt: skip
    assert sorted(p.name for p in preds.rglob("*.png")) == ["a_good.png", "z_good.png"]
    out = capsys.readouterr().out
    assert "skipped photos/bad: not a readable image (truncated image)" in out
    assert "skipped photos/notes: not a readable image (cannot identify image file)" in out
    assert "skipped photos/huge: too large (16x16 pixels, above max_pixels=100)" in out
    assert f"wrote 2 images to {preds}; skipped 3 unreadable inputs (see above)" in out
