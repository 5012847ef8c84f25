"""`make demo`'s data and config: digits held out where they must be, and the config runs."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

REPO = Path(__file__).parents[1]


def _keys(pattern):
    return [s["__key__"] for s in wds.WebDataset(pattern, shardshuffle=False)]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    pytest.importorskip("mlxtend")
    from codi_lightning import demo

    out = tmp_path_factory.mktemp("demo")
    cwd = Path.cwd()
    os.chdir(REPO)  # the committed teacher and classifier are found from the repository root
    try:
        demo.prepare(out)
    finally:
        os.chdir(cwd)
    return out


def test_demo_data_keeps_val_and_predict_inputs_out_of_training(demo_out):
    train = _keys(str(demo_out / "shards" / "train-{000000..000003}.tar"))
    val = _keys(str(demo_out / "shards" / "val-000000.tar"))
    inputs = sorted(p.stem for p in (demo_out / "lowres").glob("*.png"))
    assert len(train) == 4000 and len(val) == 128 and len(inputs) == 8
    assert not set(train) & set(val) and not set(train) & set(inputs)
    assert not set(val) & set(inputs)
    for path in (demo_out / "lowres").glob("*.png"):
        assert Image.open(path).size == (8, 8)  # 4x below the 32 px the model makes
    sample = next(iter(wds.WebDataset(str(demo_out / "shards" / "val-000000.tar"))))
    image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert image.shape == (32, 32, 3) and image.max() > 200  # a white digit on black


def test_demo_config_fits_tests_and_predicts(demo_out, tmp_path):
    """configs/demo.yaml through the real CLI, cut to 2 steps (the demo runs 300)."""
    paths = [
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"), "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
        "--data.train_shards", str(demo_out / "shards" / "train-{000000..000003}.tar"),
        "--data.val_shards", str(demo_out / "shards" / "val-000000.tar"),
        "--data.predict_output", str(tmp_path / "pred"),
    ]  # fmt: skip
    short = ["--trainer.max_steps", "2", "--trainer.limit_test_batches", "1",
             "--model.metrics.kid_subset_size", "8"]  # fmt: skip

    def cli(*args):
        done = subprocess.run(
            [sys.executable, "-m", "codi_lightning", *args], cwd=REPO, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    cli("fit", "--config", "configs/demo.yaml", *paths, *short, "--trainer.limit_val_batches", "0")
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    cli("test", "--config", "configs/demo.yaml", *paths, *short, "--ckpt_path", ckpt)
    metrics = sorted((tmp_path / "logs").rglob("metrics.md"))
    assert metrics and "class_consistency" in metrics[0].read_text()
    cli("predict", "--config", "configs/demo.yaml", *paths, "--ckpt_path", ckpt,
        "--data.predict_images", str(demo_out / "lowres"))  # fmt: skip
    outputs = sorted((tmp_path / "pred").glob("*.png"))
    assert len(outputs) == 8 and all(Image.open(p).size == (32, 32) for p in outputs)


def test_the_demo_report_ends_with_a_serve_command_that_parses(tmp_path, capsys):
    """`make demo`'s last lines: the command that opens the page on its checkpoint; the
    command line is one `codi-lightning serve` accepts as written."""

    from codi_lightning.cli import main
    from codi_lightning.demo import report

    grid = tmp_path / "logs" / "demo" / "version_0" / "samples" / "step_0000300.png"
    grid.parent.mkdir(parents=True)
    grid.write_bytes(b"")
    last = report(tmp_path, cli="codi-lightning").splitlines()[-1].split()
    assert last[:2] == ["codi-lightning", "serve"]
    assert "--ckpt_path" in last and str(tmp_path / "checkpoints" / "last.ckpt") in last
    with pytest.raises(SystemExit) as done:
        main([*last[1:], "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert f"examples: {tmp_path / 'lowres'}" in printed
