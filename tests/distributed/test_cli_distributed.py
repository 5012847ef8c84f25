"""The real CLI on 2 processes (CPU, gloo), DDP and FSDP2, as users run it.

fit with validation and periodic checkpoints, resume, validate, test (metrics equal to a
1-process run over the same samples), predict (every input written once) and export.
The validation/test shards split unevenly: 3 shards of 4, 4 and 2 samples over 2 ranks
x 2 workers (rank 1 gets one shard: one worker) and, for ``validate``, 1 shard over 2
ranks (rank 1 gets nothing at all). Every command runs under a watchdog: a hang is killed
with SIGABRT (Python's faulthandler prints every thread's stack) and fails the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from procwatch import free_port, run_watched

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).parents[2]
CLI = str(Path(sys.executable).with_name("codi-lightning"))
WATCHDOG_S = int(os.environ.get("CODI_TEST_WATCHDOG_S", "300"))  # per command

STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp": [
        "--config", str(ROOT / "configs" / "trainer" / "fsdp.yaml"),
        "--trainer.strategy.init_args.data_parallel_size", "2",
    ],
}  # fmt: skip


def run_cli(args: list[str], cwd: Path, procs: int = 2, timeout: int = WATCHDOG_S) -> str:
    """``codi-lightning ARGS`` on ``procs`` CPU processes (Lightning launches the others
    itself, as for users) under the watchdog."""
    if procs > 1:
        args = [*args, "--trainer.accelerator", "cpu", "--trainer.devices", str(procs)]
    return run_watched([CLI, *args], cwd, timeout)


@pytest.fixture(scope="module")
def uneven_val(tmp_path_factory) -> dict[str, str]:
    """3 validation shards of 4, 4 and 2 samples, and 1 shard of 3 samples."""
    from codi_lightning.data import write_shards
    from codi_lightning.demo import write_image_folder

    root = tmp_path_factory.mktemp("uneven")
    write_image_folder(root / "img", 10, seed=5)
    write_shards(str(root / "img"), str(root / "three-%06d.tar"), maxcount=4, progress=False)
    write_image_folder(root / "img1", 3, seed=6)
    write_shards(str(root / "img1"), str(root / "one-%06d.tar"), maxcount=16, progress=False)
    return {"three": str(root / "three-{000000..000002}.tar"), "one": str(root / "one-000000.tar")}


def _config(root: Path, teacher: Path, train: str, val: str) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    out = root / "run"
    cfg["trainer"].update(
        default_root_dir=str(out), max_steps=4, val_check_interval=2, limit_val_batches=None,
        enable_progress_bar=False, log_every_n_steps=1, enable_model_summary=False,
    )  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"].update(
        dirpath=str(out / "ckpt"), every_n_train_steps=2
    )
    cfg["model"].update(pretrained=str(teacher), pixel_space=False, val_images=2, num_grid=10)
    cfg["model"]["test_steps"] = [1, 2]
    cfg["model"]["metrics"].update(kid_subset_size=1000, swd=True)  # KID over all: deterministic
    cfg["data"].update(
        train_shards=train, val_shards=val, num_workers=2, batch_size=2, val_batch_size=2,
        predict_batch_size=2,
    )  # fmt: skip
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_same_metrics(got: dict, ref: dict) -> None:
    """Test metrics of a distributed run equal a 1-process run's, over every sample once."""
    assert sorted(got) == sorted(ref) == ["1", "2"]
    for steps, row in ref.items():
        assert got[steps]["images"] == row["images"] == 10  # every sample once
        for name, value in row.items():
            assert got[steps][name] == pytest.approx(value, rel=1e-3, abs=1e-5), (steps, name)


def _metrics(folder: Path) -> dict:
    files = sorted(folder.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    assert files, f"no metrics.json under {folder}"
    return json.loads(files[-1].read_text())["results"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_cli(strategy, tmp_path, tiny_teacher, tiny_shards, uneven_val):

    config = _config(tmp_path, tiny_teacher, tiny_shards["train"], uneven_val["three"])
    base = ["--config", str(config), *STRATEGIES[strategy]]
    out = tmp_path / "run"

    # fit: validation at steps 2 and 4 over the uneven shards, a checkpoint every 2 steps
    run_cli(["fit", *base], tmp_path)
    ckpts = out / "ckpt"
    assert {p.name for p in ckpts.iterdir()} >= {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt",
                                                  "last.ckpt"}  # fmt: skip
    grids = sorted(p.name for p in out.rglob("samples/*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]
    if strategy == "fsdp":  # the preset records every file's CRC-32, checked before loading
        from codi_lightning.checkpoints import CHECKSUMS, verify_checksums

        assert (ckpts / "last.ckpt" / CHECKSUMS).is_file()
        verify_checksums(ckpts / "last.ckpt")

    # resume from the last checkpoint and train 2 more steps
    run_cli(["fit", *base, "--trainer.max_steps", "6", "--ckpt_path", str(ckpts / "last.ckpt")],
            tmp_path)  # fmt: skip
    assert (ckpts / "epoch=0-step=6.ckpt").exists()
    grids = sorted(p.name for p in out.rglob("samples/*.png"))
    assert grids[-1] == "step_0000006.png"

    last = ckpts / "last.ckpt"
    # validate on 1 shard over 2 ranks: rank 1 has no sample at all
    run_cli(["validate", *base, "--ckpt_path", str(last), "--data.val_shards", uneven_val["one"]],
            tmp_path)  # fmt: skip

    # test: metrics over the uneven shards equal a 1-process run over the same samples
    two = tmp_path / "test2"
    run_cli(["test", *base, "--ckpt_path", str(last),
             "--trainer.logger.init_args.save_dir", str(two)], tmp_path)  # fmt: skip
    single_ckpt = last
    if strategy == "fsdp":  # a distributed-checkpoint folder: gather it for one process
        single_ckpt = tmp_path / "consolidated.ckpt"
        run_cli(["consolidate", "--ckpt", str(last), "--output", str(single_ckpt)], tmp_path, 1)
    one = tmp_path / "test1"
    run_cli(["test", "--config", str(config), "--ckpt_path", str(single_ckpt),
             "--trainer.logger.init_args.save_dir", str(one)], tmp_path, procs=1)  # fmt: skip
    check_same_metrics(_metrics(two), _metrics(one))

    # predict: a folder of mixed photos over 2 ranks, in size-grouped batches of 2, some in
    # tiles (the ranks run different numbers of forwards; FSDP2 gathers the adapter once)
    from helpers import check_predictions, write_photo_folder

    inputs = tmp_path / "photos"
    expected, skipped = write_photo_folder(inputs)
    preds = tmp_path / "preds"
    log = run_cli(["predict", *base, "--ckpt_path", str(last), "--data.predict_images",
                   str(inputs), "--data.predict_output", str(preds), "--data.predict_max_pixels",
                   "1000000", "--model.tiling.untiled_max_pixels", "1000",
                   "--model.tiling.tile_size", "16"], tmp_path)  # fmt: skip
    check_predictions(preds, expected)
    for source, reason in skipped.items():
        assert f"skipped {source}: {reason}" in log
    assert log.count(f"wrote {len(expected)} images to {preds}; skipped 3 inputs") == 1

    # export from the 2-process checkpoint (file or distributed folder)
    exported = tmp_path / "exported"
    run_cli(["export", "--ckpt", str(last), "--output", str(exported)], tmp_path, 1)
    weights = exported / "controlnet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    from safetensors.torch import load_file

    from codi_lightning.checkpoints import read_checkpoint

    state = read_checkpoint(last)["state_dict"]
    for name, value in load_file(weights).items():
        torch.testing.assert_close(value, state[f"target.controlnet.{name}"].float())


@pytest.mark.parametrize("family", ["sd3", "flux", "sana"])
def test_two_process_fsdp_on_flow_transformers(tmp_path, family, tiny_shards, uneven_val,
                                               request):  # fmt: skip
    """configs/tiny_{sd3,flux,sana}_cpu.yaml under FSDP2 on 2 processes, full CoDi (the
    transformer copy and the adapter sharded by block; Flux: double- and single-stream
    blocks, its sigma shift fixed by data.resolution on every rank; SANA: the DC-AE and
    the text's attention mask): fit with validation, test over uneven shards, predict and
    export."""
    from PIL import Image

    teacher = request.getfixturevalue(f"tiny_{family}_teacher")
    cfg = yaml.safe_load((ROOT / "configs" / f"tiny_{family}_cpu.yaml").read_text())
    out = tmp_path / "run"
    cfg["trainer"].update(default_root_dir=str(out), max_steps=2, val_check_interval=2,
                          limit_val_batches=None, enable_progress_bar=False)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(out / "ckpt"))
    cfg["model"].update(pretrained=str(teacher), method="codi", val_images=2,
                        test_steps=[1, 2])  # fmt: skip
    cfg["data"].update(train_shards=tiny_shards["train"], val_shards=uneven_val["three"],
                       num_workers=1, batch_size=2, val_batch_size=2, predict_batch_size=2)  # fmt: skip
    config = tmp_path / f"{family}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    base = ["--config", str(config), *STRATEGIES["fsdp"]]
    run_cli(["fit", *base], tmp_path)
    last = out / "ckpt" / "last.ckpt"
    assert last.exists() and [p.name for p in out.rglob("samples/*.png")] == ["step_0000002.png"]
    run_cli(["test", *base, "--ckpt_path", str(last)], tmp_path)
    results = _metrics(out)
    assert sorted(results) == ["1", "2"] and results["2"]["images"] == 10
    inputs = tmp_path / "lowres"
    inputs.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (60 * i, 100, 200)).save(inputs / f"in{i}.png")
    preds = tmp_path / "preds"
    run_cli(["predict", *base, "--ckpt_path", str(last), "--data.predict_images", str(inputs),
             "--data.predict_output", str(preds)], tmp_path)  # fmt: skip
    assert sorted(p.name for p in preds.iterdir()) == [f"in{i}.png" for i in range(3)]
    # export from the distributed-checkpoint folder
    exported = tmp_path / "exported"
    run_cli(["export", "--ckpt", str(last), "--output", str(exported)], tmp_path, 1)
    assert {p.name for p in exported.iterdir()} >= {"controlnet", "transformer", "scheduler"}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(strategy, tmp_path, tiny_teacher,
                                                               tiny_shards, uneven_val):  # fmt: skip
    """A NaN in rank 1's batch at step 1 only: both ranks skip that step (the decision is
    the global gradient norm, the same on every rank), the run goes on to step 4 without
    hanging, and the checkpoint's weights are finite."""
    from codi_lightning.checkpoints import read_checkpoint

    config = _config(tmp_path, tiny_teacher, tiny_shards["train"], uneven_val["three"])
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"].update(max_steps=4, val_check_interval=4, limit_val_batches=1)
    cfg["trainer"]["callbacks"].append(
        {"class_path": "poison_batch.PoisonBatch", "init_args": {"rank": 1, "step": 1}}
    )
    config.write_text(yaml.safe_dump(cfg))
    helpers = str(Path(__file__).parents[1] / "helpers")
    env = {"PYTHONPATH": os.pathsep.join([helpers, os.environ.get("PYTHONPATH", "")])}
    log = run_watched([CLI, "fit", "--config", str(config), *STRATEGIES[strategy],
                       "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
                      tmp_path, WATCHDOG_S, env)  # fmt: skip
    assert log.count("step 1: the gradient norm is nan") == 1  # rank 0 says it, once
    state = read_checkpoint(tmp_path / "run" / "ckpt" / "last.ckpt")
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values()
               if v.is_floating_point())  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_cli_trains_a_lora_of_the_shared_unet(strategy, tmp_path, tiny_teacher,
                                                         tiny_shards, uneven_val):  # fmt: skip
    """PE-CoDi with a LoRA of the frozen UNet (``model.lora_rank``) on 2 processes, DDP
    and FSDP2 (adapter sharded, LoRA whole on every rank): fit with validation, resume,
    predict (under DDP also two tasks on one backbone, ``model.predict_tasks``), and
    export of the EMA LoRA to ``lora/`` (diffusers' format) equal to the checkpoint's."""
    from safetensors.torch import load_file

    from codi_lightning.checkpoints import read_checkpoint
    from codi_lightning.models.lora import ADAPTER_NAME

    config = _config(tmp_path, tiny_teacher, tiny_shards["train"], uneven_val["three"])
    base = ["--config", str(config), "--model.lora_rank", "4", *STRATEGIES[strategy]]
    run_cli(["fit", *base], tmp_path)
    ckpts = tmp_path / "run" / "ckpt"
    run_cli(["fit", *base, "--trainer.max_steps", "6", "--ckpt_path", str(ckpts / "last.ckpt")],
            tmp_path)  # fmt: skip
    assert (ckpts / "epoch=0-step=6.ckpt").exists()
    last = ckpts / "last.ckpt"
    state = read_checkpoint(last)["state_dict"]
    online = {k: v for k, v in state.items() if k.startswith("lora.weights.")}
    target = {k: v for k, v in state.items() if k.startswith("target.lora.")}
    assert online and len(online) == len(target)
    # B started at zero: the steps moved it, online and EMA
    moved = [k for k, v in online.items() if "lora_B" in k and v.abs().max() > 0]
    assert moved and all(state["target.lora." + k[len("lora.weights.") :]].abs().max() > 0
                         for k in moved)  # fmt: skip

    preds = tmp_path / "preds"
    from helpers import check_predictions, write_photo_folder

    inputs = tmp_path / "photos"
    expected, _ = write_photo_folder(inputs)
    run_cli(["predict", *base, "--ckpt_path", str(last),
             "--data.predict_images", str(inputs), "--data.predict_output", str(preds),
             "--data.predict_max_pixels", "1000000"], tmp_path)  # fmt: skip
    check_predictions(preds, expected)
    if strategy == "ddp":  # two tasks on one backbone: each as its own predict, bit for bit
        import numpy as np
        from PIL import Image

        both = tmp_path / "both"
        early = ckpts / "epoch=0-step=4.ckpt"
        run_cli(["predict", *base, "--model.predict_tasks", f"{{late: {last}, early: {early}}}",
                 "--data.predict_images", str(inputs), "--data.predict_output", str(both),
                 "--data.predict_max_pixels", "1000000"], tmp_path)  # fmt: skip
        check_predictions(both / "late", expected)
        check_predictions(both / "early", expected)
        for name in expected:
            late = np.asarray(Image.open(both / "late" / f"{name}.png"))
            np.testing.assert_array_equal(late, np.asarray(Image.open(preds / f"{name}.png")))

    exported = tmp_path / "exported"
    run_cli(["export", "--ckpt", str(last), "--output", str(exported)], tmp_path, 1)
    saved = load_file(exported / "lora" / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(target)
    for key, value in target.items():
        name = key[len("target.lora.") :].replace("__", ".").replace(f".{ADAPTER_NAME}.", ".")
        torch.testing.assert_close(saved["unet." + name], value.float(), rtol=0, atol=0)


def run_two_nodes(args: list[str], cwd: Path, timeout: int = WATCHDOG_S) -> str:
    """``codi-lightning ARGS`` as docs/scaling.md launches it on 2 nodes of 1 process:
    two ``torchrun --nnodes 2 --node_rank 0/1`` invocations meeting on the loopback
    address (c10d rendezvous), each under the watchdog; both nodes' output."""
    import subprocess

    port = free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))

    def command(rank: int) -> list[str]:
        return [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                "-m", "codi_lightning", *args, "--trainer.num_nodes", "2",
                "--trainer.devices", "1", "--trainer.accelerator", "cpu"]  # fmt: skip

    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    other = subprocess.Popen(command(1), cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out = run_watched(command(0), cwd, timeout)
        rest, _ = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            os.killpg(other.pid, 9)
    assert other.returncode == 0, rest[-4000:]
    return out + rest


def test_two_nodes_by_torchrun(tmp_path, tiny_teacher, tiny_shards, uneven_val):
    """The documented multi-node launch, 2 nodes x 1 process on this machine (gloo): fit
    with validation and checkpoints, resume, and test, whose metrics count every test
    sample once and equal a 1-process run's (the shards split across nodes as across
    ranks)."""
    config = _config(tmp_path, tiny_teacher, tiny_shards["train"], uneven_val["three"])
    base = ["--config", str(config), "--trainer.strategy", "ddp"]
    out = tmp_path / "run"
    log = run_two_nodes(["fit", *base], tmp_path)
    # one process a node, two in all (Lightning's line as each rank joins)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    ckpts = out / "ckpt"
    assert {p.name for p in ckpts.iterdir()} >= {"epoch=0-step=4.ckpt", "last.ckpt"}
    assert sorted(p.name for p in out.rglob("samples/*.png")) == [
        "step_0000002.png", "step_0000004.png"]  # fmt: skip
    run_two_nodes(["fit", *base, "--trainer.max_steps", "6", "--ckpt_path",
                   str(ckpts / "last.ckpt")], tmp_path)  # fmt: skip
    assert (ckpts / "epoch=0-step=6.ckpt").exists()
    two = tmp_path / "test2"
    run_two_nodes(["test", *base, "--ckpt_path", str(ckpts / "last.ckpt"),
                   "--trainer.logger.init_args.save_dir", str(two)], tmp_path)  # fmt: skip
    one = tmp_path / "test1"
    run_cli(["test", "--config", str(config), "--ckpt_path", str(ckpts / "last.ckpt"),
             "--trainer.logger.init_args.save_dir", str(one)], tmp_path, procs=1)  # fmt: skip
    check_same_metrics(_metrics(two), _metrics(one))
