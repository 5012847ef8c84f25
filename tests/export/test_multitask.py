"""One base network, several tasks: ``CoDiPipeline.load_task`` / ``use_task`` switch
between PE-CoDi exports (each a ControlNet, with or without a LoRA of the UNet) on one
loaded base model; each task's images equal that task's images alone, bit for bit."""

import pytest
import torch
from helpers import write_checkpoint

from codi_lightning.export import CoDiPipeline, export_checkpoint


@pytest.fixture(scope="module")
def task_exports(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    specs = {  # two LoRA tasks of different ranks, one adapter-only task
        "sr": {"lora_rank": 4, "scale": 0.05},
        "inpaint": {"lora_rank": 2, "scale": 0.08},
        "plain": {"scale": 0.03},
    }
    folders = {}
    for name, kw in specs.items():
        write_checkpoint(tiny_teacher, root / f"{name}.ckpt", **kw)
        folders[name] = export_checkpoint(str(root / f"{name}.ckpt"), str(root / name))
    return folders


def test_switching_tasks_on_one_base_gives_each_tasks_own_images(task_exports, tiny_teacher):
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    prompts = ["a red circle", ""]

    def images(pipe):
        return pipe(cond, prompts, 2, generator=torch.Generator().manual_seed(1))

    alone = {
        name: images(CoDiPipeline.from_exported(str(folder), str(tiny_teacher)))
        for name, folder in task_exports.items()
    }
    assert not torch.equal(alone["sr"], alone["inpaint"])
    assert not torch.equal(alone["sr"], alone["plain"])

    pipe = CoDiPipeline.from_exported(str(task_exports["sr"]), str(tiny_teacher), task="sr")
    unet = pipe.parts.network
    base_weights = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" not in n}
    pipe.load_task("inpaint", str(task_exports["inpaint"]))
    pipe.load_task("plain", str(task_exports["plain"]))
    assert pipe.task == "sr" and pipe.parts.network is unet  # loaded, not switched, not reloaded
    for name in ["sr", "inpaint", "plain", "sr", "plain", "inpaint", "sr"]:
        pipe.use_task(name)
        assert torch.equal(images(pipe), alone[name]), name
    for n, p in unet.named_parameters():  # the shared base weights never changed
        if "lora" not in n:
            assert torch.equal(p, base_weights[n])


def test_task_errors_name_the_fix(task_exports, tiny_teacher, tmp_path):
    pipe = CoDiPipeline.from_exported(str(task_exports["sr"]), str(tiny_teacher), task="sr")
    with pytest.raises(KeyError, match="no task named 'edit'; loaded: \\['sr'\\]"):
        pipe.use_task("edit")
    with pytest.raises(ValueError, match="is loaded already"):
        pipe.load_task("sr", str(task_exports["inpaint"]))
    merged = export_checkpoint(
        str(task_exports["sr"].parent / "sr.ckpt"), str(tmp_path / "merged"), lora="merge"
    )
    with pytest.raises(ValueError, match="cannot share the base network"):
        pipe.load_task("merged", str(merged))
    # built from parts directly (not from_exported), a pipeline takes tasks as well
    direct = CoDiPipeline(pipe.parts, pipe.controlnet, pipe.num_grid, task="sr")
    direct.load_task("plain", str(task_exports["plain"]))
    assert sorted(direct.tasks) == ["plain", "sr"]
