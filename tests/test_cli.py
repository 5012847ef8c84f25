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
    if path.parent.name == "trainer":  # a Lightning strategy (the FSDP2 preset: a subclass)
        import importlib

        from lightning.pytorch.strategies import Strategy

        module, _, name = config.trainer.strategy.class_path.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), Strategy)


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


def test_training_scalars_are_logged_only_on_the_steps_the_logger_writes(
    tmp_path, tiny_teacher, tiny_shards, monkeypatch
):
    """Each ``self.log`` costs Lightning bookkeeping (and a sync for the progress bar on a
    GPU), so the module logs its per-step scalars only on the steps the logger writes: the
    written series must be the same as logging every step would give, the calls fewer."""
    import lightning as L

    from codi_lightning.training import CoDiDistillation

    calls = []
    real_log = L.LightningModule.log

    def spy(self, name, value, *args, **kwargs):
        if name.startswith("train/"):
            calls.append((self.global_step, name))
        return real_log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(CoDiDistillation, "log", spy)
    config, out = _tiny_config(
        tmp_path, tiny_teacher, tiny_shards, max_steps=7, log_every_n_steps=3,
        val_check_interval=7,
    )  # fmt: skip
    main(["fit", "--config", str(config)])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sorted((out / "logs").rglob("events.out.tfevents.*"))[0].parent))
    acc.Reload()
    for name in ("train/loss", "train/consistency", "train/grad_norm", "train/lr"):
        written = [e.step for e in acc.Scalars(name)]
        assert written == [2, 5], name  # Lightning writes every log_every_n_steps-th step
        # logged on those steps and on the run's last (for callback_metrics), no other
        assert sorted(step for step, n in calls if n == name) == [2, 5, 6], name


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


@pytest.mark.parametrize("model", ["CoDiDistillation", "ControlNetBaseline"])
def test_test_writes_the_sample_grid(model, tmp_path, tiny_teacher, tiny_shards):
    """`test` saves condition | samples at each test step count | ground truth of its first
    batch (val_images rows) as test_samples.png, embeds it in metrics.md and adds it to
    TensorBoard at the checkpoint's step."""
    import json

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, out = _tiny_config(tmp_path, tiny_teacher, tiny_shards, max_steps=2,
                               limit_val_batches=0)  # fmt: skip
    cfg = yaml.safe_load(config.read_text())
    cfg["model"] = {"class_path": f"codi_lightning.training.{model}", "init_args": cfg["model"]}
    config.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(config)])
    main(["test", "--config", str(config), "--ckpt_path", str(out / "ckpt" / "last.ckpt"),
          "--model.test_steps", "[1, 2]", "--model.val_images", "3",
          "--data.val_batch_size", "4"])  # fmt: skip
    (folder,) = {p.parent for p in out.rglob("metrics.json")}
    grid = folder / "test_samples.png"
    assert grid.is_file()
    # save_grid: 32 px tiles enlarged 3x (nearest) to 96 >= min_size, 2 px padding around
    # each tile; 3 rows (val_images, of a batch of 4), 1 + 2 + 1 columns
    tile, pad, rows, cols = 32 * 3, 2, 3, 1 + 2 + 1
    assert Image.open(grid).size == (cols * (tile + pad) + pad, rows * (tile + pad) + pad)
    md = (folder / "metrics.md").read_text()
    assert md.index("| steps |") < md.index("![test samples](test_samples.png)")
    assert "condition | 1 step | 2 steps | ground truth" in md
    step = json.loads((folder / "metrics.json").read_text())["meta"]["step"]
    assert step == 2
    acc = EventAccumulator(str(folder))
    acc.Reload()
    assert "test/samples" in acc.Tags()["images"]
    (event,) = acc.Images("test/samples")
    assert event.step == step and (event.width, event.height) == Image.open(grid).size


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
    assert "skipped photos/bad.png: not a readable image (truncated image)" in out
    assert "skipped photos/notes.png: not a readable image (cannot identify image file)" in out
    assert (
        "skipped photos/huge.png: too large (16x16 pixels, above max_pixels=100); "
        "raise data.max_pixels" in out
    )
    assert f"wrote 2 images to {preds}; skipped 3 inputs (2 unreadable, 1 too_large)" in out


# ---- a newcomer's first commands: short errors, no noise, help that names the model's -----

REPO = Path(__file__).parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _run_cli(*args, env=None):
    """The real command in a subprocess (``python -m codi_lightning``): rc, stdout, stderr."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "CODI_DEBUG": "0", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "codi_lightning", *args],
        capture_output=True, text=True, cwd=REPO, env=full_env, timeout=300,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]


def test_missing_config_file_is_a_short_error():
    rc, _, err = _run_cli("fit", "--config", "configs/no_such.yaml")
    assert rc == 2
    lines = _error_lines(err)
    assert len(lines) <= 5, err
    assert lines[0].startswith("error: config file not found:") and "no_such.yaml" in lines[0]
    assert "usage:" not in err and "Traceback" not in err


def test_typo_option_suggests_the_closest_and_exits_2():
    rc, _, err = _run_cli("fit", "--config", TINY, "--model.num_gird", "5")
    assert rc == 2
    lines = _error_lines(err)
    assert len(lines) <= 5, err
    assert "unknown option --model.num_gird; did you mean --model.num_grid?" in lines[0]
    assert "codi-lightning fit --model.help CoDiDistillation" in err
    assert "usage:" not in err and "Traceback" not in err


def test_typo_trainer_option_in_process(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", TINY, "--trainer.max_stepz", "5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option --trainer.max_stepz; did you mean --trainer.max_steps?" in err
    assert "usage:" not in err and len(_error_lines(err)) <= 5


def test_codi_debug_prints_the_traceback_of_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("CODI_DEBUG", "1")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", TINY, "--trainer.max_stepz", "5"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError" in err


def test_empty_predict_folder_fails_before_the_model_loads(tmp_path):
    """The teacher and the checkpoint do not exist: the folder error must come first."""
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = _run_cli(
        "predict", "--config", TINY, "--model.pretrained", str(tmp_path / "no_teacher"),
        "--ckpt_path", str(tmp_path / "no.ckpt"), "--data.predict_images", str(empty),
    )  # fmt: skip
    assert rc == 2
    lines = _error_lines(err)
    assert len(lines) <= 5, err
    assert lines[0] == (
        f"error: no images under {str(empty)!r} (predict reads jpg, jpeg, png, webp, gif, "
        "bmp, tif, tiff)"
    )
    assert "--data.predict_images" in lines[1]
    assert "no_teacher" not in err and "no.ckpt" not in err and "Traceback" not in err


def test_help_is_named_codi_lightning_and_names_the_model_help():
    """`python -m codi_lightning` prints `codi-lightning`, not `__main__.py`; `fit --help`
    says how to list model.* (as the README does)."""
    rc, out, _ = _run_cli("fit", "--help")
    assert rc == 0
    assert out.startswith("usage: codi-lightning ") and "__main__" not in out
    assert "codi-lightning fit --model.help\nCoDiDistillation" in out or (
        "codi-lightning fit --model.help CoDiDistillation" in out
    )
    readme = (REPO / "README.md").read_text()
    assert "codi-lightning fit --model.help CoDiDistillation" in readme
    assert "fit --help` shows every option" not in readme


def test_no_cloud_tip_and_no_accelerate_warning():
    """Lightning's litlogger/litmodels tips are filtered; accelerate is installed (else
    diffusers warns on every model load) and is a dependency."""
    import logging

    import lightning as L
    from diffusers.utils import is_accelerate_available

    import codi_lightning.cli  # noqa: F401  (installs the filter)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert messages and not any("Tip" in m for m in messages), messages
    assert is_accelerate_available()
    assert '"accelerate' in (REPO / "pyproject.toml").read_text()


def test_the_step_bar_counts_steps_without_redrawing_every_step():
    import io
    from types import SimpleNamespace

    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    from codi_lightning.training import StepProgressBar

    bar = StepProgressBar()
    out = io.StringIO()
    bar.train_progress_bar = Tqdm(total=100, file=out, mininterval=3600)
    bar.get_metrics = lambda trainer, module: {"train/loss": 0.5}
    drawn = out.getvalue().count("\r")
    for step in range(1, 51):
        bar.on_train_batch_end(SimpleNamespace(max_steps=100, global_step=step), None, None,
                               None, step - 1)  # fmt: skip
    assert bar.train_progress_bar.n == 50 and "train/loss" in str(bar.train_progress_bar.postfix)
    assert out.getvalue().count("\r") - drawn <= 1  # tqdm's interval, not every step
    bar.train_progress_bar.refresh()
    assert "50/100" in out.getvalue()


def test_the_cli_defaults_to_the_step_progress_bar():
    import lightning as L

    from codi_lightning.training import StepProgressBar

    cli = CoDiCLI.__new__(CoDiCLI)  # only _instantiate_trainer's attributes
    cli.trainer_class, cli.trainer_defaults, cli.save_config_callback = L.Trainer, {}, None
    cli.subcommand = "fit"
    base = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    trainer = cli._instantiate_trainer({**base, "callbacks": None}, [])
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    trainer = cli._instantiate_trainer(
        {**base, "callbacks": None, "enable_progress_bar": False}, []
    )
    assert trainer.progress_bar_callback is None
    from lightning.pytorch.callbacks import RichProgressBar

    own = RichProgressBar()
    trainer = cli._instantiate_trainer({**base, "callbacks": [own]}, [])
    assert trainer.progress_bar_callback is own


def test_make_demo_sends_every_path_to_demo_out(monkeypatch):
    """`make demo DEMO_OUT=dir`: the commands name no demo_out path, and the config they
    parse to writes and reads only under dir (configs/demo.yaml hard-codes demo_out)."""
    import shlex
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    lines = subprocess.run(
        ["make", "-n", "demo", "DEMO_OUT=elsewhere"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.splitlines()  # fmt: skip
    commands = [shlex.split(line) for line in lines if "codi-lightning " in line]
    assert [c[1] for c in commands] == ["fit", "validate", "test", "predict"]
    assert not any("demo_out" in line for line in lines)
    monkeypatch.chdir(REPO)
    with pytest.raises(_Parsed) as info:
        ParseOnlyCLI(args=commands[0][1:])
    config = info.value.args[0]["fit"]

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    paths = [s for s in strings(config.as_dict()) if "/" in s and not s.startswith("lightning.")]
    assert not any("demo_out" in p for p in paths), paths
    assert config.trainer.callbacks[-1].init_args.dirpath == "elsewhere/checkpoints"
    assert config.trainer.callbacks[-1].init_args.every_n_train_steps == 150  # kept
    assert config.trainer.logger.init_args.save_dir == "elsewhere/logs"


def test_predict_adds_no_log_folder(tmp_path):
    """fit/validate/test log to a new version_N each; predict logs nothing, so it gets no
    logger (no empty version_N per run) and no config copy."""
    import lightning as L
    from lightning.pytorch.cli import SaveConfigCallback
    from lightning.pytorch.loggers import TensorBoardLogger

    cli = CoDiCLI.__new__(CoDiCLI)
    cli.trainer_class, cli.trainer_defaults = L.Trainer, {}
    cli.save_config_callback, cli.save_config_kwargs = SaveConfigCallback, {}
    cli.parser, cli.config, cli._subcommand_parsers = None, {}, {"test": None, "predict": None}
    for command, logged in (("test", True), ("predict", False)):
        cli.subcommand = command
        logger = TensorBoardLogger(save_dir=tmp_path / "logs", name="run")
        trainer = cli._instantiate_trainer(
            {"accelerator": "cpu", "logger": logger, "callbacks": None}, []
        )
        assert bool(trainer.loggers) is logged
        assert any(isinstance(c, SaveConfigCallback) for c in trainer.callbacks) is logged


def test_missing_shards_fail_before_the_model_loads(tmp_path):
    """A typo'd shard path: one short error naming the option, before the teacher (which
    does not exist either) is looked at; and no log folder is left behind."""
    rc, _, err = _run_cli(
        "fit", "--config", TINY, "--model.pretrained", str(tmp_path / "no_teacher"),
        "--data.train_shards", str(tmp_path / "shards" / "train-{000000..000002}.tar"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "run" / "logs"),
    )  # fmt: skip
    assert rc == 2
    lines = [line for line in _error_lines(err) if not line.startswith("Seed set to")]
    assert len(lines) <= 5, err
    assert lines[0].startswith("error: data.train_shards: none of the 3 shard files exists")
    assert "train-000000.tar" in lines[0] and "codi-lightning shards" in lines[0]
    assert "no_teacher" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.parametrize("fail_at", [0, 2])
def test_a_failed_run_leaves_no_empty_log_folder(fail_at, tmp_path, tiny_teacher, tiny_shards,
                                                 monkeypatch):  # fmt: skip
    """A run that fails before its first step leaves no version_N folder (only its config
    copy was in it); one that trained keeps it (its scalars are worth keeping)."""
    from codi_lightning.training import CoDiDistillation

    config, out = _tiny_config(tmp_path, tiny_teacher, tiny_shards, val_check_interval=4)
    step = CoDiDistillation.training_step

    def failing_step(self, batch, batch_idx):
        if self.global_step == fail_at:
            raise RuntimeError("boom")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CoDiDistillation, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        main(["fit", "--config", str(config)])
    folders = sorted((out / "logs").rglob("version_*"))
    if fail_at == 0:
        assert folders == []
    else:
        assert len(folders) == 1 and (folders[0] / "config.yaml").is_file()


def test_sdxl_config_fit_test_predict_export(tmp_path, tiny_sdxl_teacher, tiny_shards):
    """configs/tiny_sdxl_cpu.yaml through the CLI: the teacher is told apart by its
    model_index.json alone, and every command runs on it."""
    import json

    from helpers import predict_and_export, write_cli_config

    config, out = write_cli_config(tmp_path, "tiny_sdxl_cpu.yaml", tiny_sdxl_teacher, tiny_shards)
    main(["fit", "--config", str(config)])
    last = str(out / "ckpt" / "last.ckpt")
    main(["test", "--config", str(config), "--ckpt_path", last, "--model.test_steps", "[1, 2]"])
    payload = json.loads(next(out.rglob("metrics.json")).read_text())
    assert payload["results"]["2"]["images"] == 10
    card = predict_and_export(config, last, tmp_path, run_card=False)
    assert "StableDiffusionXLControlNetPipeline" in card


@pytest.mark.parametrize("tiles", [False, True])
def test_predict_writes_every_photo_of_a_mixed_folder_at_its_size(
    tmp_path, tiny_teacher, tiny_shards, capsys, tiles
):
    """A folder as users have them (see ``write_photo_folder``), in the config's batches
    of 8: every good input written once at 4x its size (non-square, 1x1, clashing
    names kept apart), every bad one named with its reason, one summary line; with
    ``tiling.mode on`` and 16 px tiles the 12x7 input alone is 3 x 2 tiles."""
    from helpers import check_predictions, write_photo_folder

    config, _ = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    inputs = tmp_path / "photos"
    expected, skipped = write_photo_folder(inputs)
    preds = tmp_path / "preds"
    extra = ["--model.tiling.mode", "on", "--model.tiling.tile_size", "16"] if tiles else []
    main(["predict", "--config", str(config), "--data.predict_images", str(inputs),
          "--data.predict_output", str(preds), "--data.predict_max_pixels", "1000000",
          *extra])  # fmt: skip
    check_predictions(preds, expected)
    out = capsys.readouterr().out
    if tiles:  # a rerun after a kill: the partial image it left is removed, and said
        (preds / "sub dir" / ".left.png.partial").write_bytes(b"half an image")
        main(["predict", "--config", str(config), "--data.predict_images", str(inputs),
              "--data.predict_output", str(preds), "--data.predict_max_pixels", "1000000",
              *extra])  # fmt: skip
        check_predictions(preds, expected)
        assert "removed 1 partial images of an interrupted run" in capsys.readouterr().out
    for source, reason in skipped.items():
        assert f"skipped {source}: {reason}" in out
    for source in ("same.jpg", "same.png", "Same.bmp"):
        assert f"{source}: another input has the same name; written as {source}.png" in out
    assert (
        f"wrote {len(expected)} images to {preds}; skipped 3 inputs (1 not_an_image_file, "
        "1 unreadable, 1 too_large), named above" in out
    )


USER_MISTAKES = {  # extra arguments: what the one error line must say
    "missing teacher": (["--model.pretrained", "/no/such/teacher"],
                        "teacher '/no/such/teacher' not found"),
    "gpu without one": (["--trainer.accelerator", "gpu"], "this machine has no CUDA GPU"),
    "negative batch": (["--data.batch_size", "-3"], "data.batch_size=-3 must be a positive"),
    "zero devices": (["--trainer.devices", "0"], "--trainer.devices 0: give a positive"),
    "pixel flag, latent teacher": (["--model.pixel_space", "true"],
                                   "takes 4-channel latents (a latent model with a VAE)"),
    "bad tiling": (["--model.tiling.mode", "on", "--model.tiling.tile_size", "-8"],
                   "tiling.tile_size=-8 must be positive"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(USER_MISTAKES))
def test_user_mistakes_end_in_a_few_lines_naming_the_fix(case, tiny_teacher, tiny_shards):
    """Each a short ``error:`` (exit code 2, no traceback, never a hang), before training."""
    import torch

    if case == "gpu without one" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra, words = USER_MISTAKES[case]
    rc, out, err = _run_cli(
        "fit", "--config", TINY, "--model.pretrained", str(tiny_teacher),
        "--model.pixel_space", "false", "--data.train_shards", tiny_shards["train"],
        "--data.val_shards", tiny_shards["val"], "--trainer.max_steps", "1",
        "--trainer.logger", "false", "--data.num_workers", "1", *extra,
    )  # fmt: skip
    lines = _error_lines(err)
    assert rc == 2, err
    assert lines[-1].startswith("error: ") and words in lines[-1], err
    assert len([line for line in lines if not line.startswith(("Seed set", "Loading"))]) <= 5
    assert "Traceback" not in err


def test_model_step_counts_are_checked_before_the_teacher_loads(tmp_path, tiny_shards):
    """A sampler step count off the training grid, a reversed guidance range: one line
    naming the option, and the (missing) teacher is never reached."""
    for extra, words in (
        (["--model.test_steps", "[1, 80]"], "model.test_steps=[1, 80] must lie in [1, "
                                            "model.num_grid=50]"),
        (["--model.predict_steps", "0"], "model.predict_steps=0 must lie in [1"),
        (["--model.num_grid", "0"], "model.num_grid=0 must be a positive integer"),
        (["--model.guidance_range", "[9, 3]"], "model.guidance_range=[9, 3] must be [low,"),
    ):  # fmt: skip
        rc, _, err = _run_cli("fit", "--config", TINY, "--model.pretrained",
                              str(tmp_path / "no_teacher"), "--data.train_shards",
                              tiny_shards["train"], "--data.val_shards",
                              tiny_shards["val"], *extra)  # fmt: skip
        lines = _error_lines(err)
        assert rc == 2 and lines[-1].startswith("error: ") and words in lines[-1], err
        assert "no_teacher" not in err and "Traceback" not in err
