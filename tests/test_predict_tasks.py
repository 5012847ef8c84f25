"""``predict`` with several trained tasks on one loaded backbone (``model.predict_tasks``):
each task's images equal that task's own predict, bit for bit; tasks that cannot share
the backbone are refused in one line."""

import numpy as np
import pytest
from helpers import write_checkpoint
from PIL import Image
from test_cli import _tiny_config

from codi_lightning.cli import main


def _inputs(root):
    rng = np.random.default_rng(1)
    root.mkdir()
    for name, (w, h) in {"a.png": (8, 8), "b.png": (8, 8), "wide.png": (12, 6),
                         "c.png": (8, 8), "tall.png": (5, 9)}.items():  # fmt: skip
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


def _pixels(folder):
    return {
        p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in folder.rglob("*.png")
    }


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("tasks")
    # two tasks of one backbone: adapter + rank-4 LoRA each, different trained weights
    write_checkpoint(tiny_teacher, root / "sr.ckpt", scale=0.02, lora_rank=4)
    write_checkpoint(tiny_teacher, root / "inpaint.ckpt", scale=0.05, lora_rank=4)
    write_checkpoint(tiny_teacher, root / "rank8.ckpt", scale=0.02, lora_rank=8)
    write_checkpoint(tiny_teacher, root / "codi.ckpt", method="codi")
    return root


def test_each_task_equals_its_own_predict_bit_for_bit(tmp_path, tasks, tiny_teacher,
                                                      tiny_shards, capsys):  # fmt: skip
    """Five inputs of three sizes in batches of 2: the tasks take turns on every batch
    (sr, inpaint, sr, inpaint, ...), and each task's outputs equal its own predict run."""
    config, _ = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    inputs = _inputs(tmp_path / "photos")
    common = ["predict", "--config", str(config), "--data.predict_images", str(inputs),
              "--data.predict_batch_size", "2", "--data.predict_upscale", "2"]  # fmt: skip
    alone = {}
    for task in ("sr", "inpaint"):
        out = tmp_path / f"alone_{task}"
        main([*common, "--ckpt_path", str(tasks / f"{task}.ckpt"),
              "--data.predict_output", str(out)])  # fmt: skip
        alone[task] = _pixels(out)
    both = tmp_path / "both"
    capsys.readouterr()
    main([*common, "--model.predict_tasks",
          f"{{sr: {tasks / 'sr.ckpt'}, inpaint: {tasks / 'inpaint.ckpt'}}}",
          "--data.predict_output", str(both)])  # fmt: skip
    assert f"wrote 10 images to {both}" in capsys.readouterr().out
    got = _pixels(both)
    assert sorted(got) == sorted(f"{t}/{n}" for t in alone for n in alone[t])
    assert len(alone["sr"]) == 5 and alone["sr"]["wide.png"].shape == (12, 24, 3)
    for task, images in alone.items():
        for name, pixels in images.items():
            np.testing.assert_array_equal(got[f"{task}/{name}"], pixels, err_msg=f"{task}/{name}")
    # the two tasks do differ, so a missed switch could not pass
    assert any(not np.array_equal(alone["sr"][n], alone["inpaint"][n]) for n in alone["sr"])


@pytest.mark.parametrize(
    "other, words",
    [("rank8.ckpt", "has lora_rank=8, the loaded model lora_rank=4"),
     ("codi.ckpt", "is full CoDi, with a UNet of its own")],
)  # fmt: skip
def test_tasks_that_cannot_share_the_backbone_are_refused(tmp_path, tasks, tiny_teacher,
                                                          tiny_shards, capsys, other, words):  # fmt: skip
    config, _ = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    inputs = _inputs(tmp_path / "photos")
    with pytest.raises(SystemExit) as info:
        main(["predict", "--config", str(config), "--data.predict_images", str(inputs),
              "--model.predict_tasks", f"{{sr: {tasks / 'sr.ckpt'}, other: {tasks / other}}}",
              "--data.predict_output", str(tmp_path / "out")])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) <= 5
    assert not list(tmp_path.glob("out/**/*.png"))  # refused before sampling anything


def test_task_names_name_folders(tmp_path, tasks, tiny_teacher, tiny_shards, capsys):
    config, _ = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    inputs = _inputs(tmp_path / "photos")
    with pytest.raises(SystemExit) as info:
        main(["predict", "--config", str(config), "--data.predict_images", str(inputs),
              "--model.predict_tasks", f"{{../up: {tasks / 'sr.ckpt'}}}"])  # fmt: skip
    assert info.value.code == 2
    assert "task name '../up' must be letters" in capsys.readouterr().err
