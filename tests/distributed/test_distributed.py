"""DDP and FSDP2 on the CPU with 2 processes over gloo.

Every rank draws the noise, timesteps and VAE posterior noise of the GLOBAL batch from
the same per-step generator and keeps its slice, and rank r trains on rows
[r b, (r+1) b) of the global batch. A 2-process run therefore computes the same
per-sample losses as a 1-process run with the global batch; the only differences are
the order of float reductions (gradient all-reduce / reduce-scatter and the mean of the
rank losses), hence rtol 1e-4 on losses and atol 1e-5 on the EMA target.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from procwatch import free_port, run_watched

pytestmark = pytest.mark.distributed
WORKER = str(Path(__file__).with_name("worker.py"))


def _run(args: list[str], procs: int, tmp: Path) -> None:
    if procs == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               f"--master_port={free_port()}", WORKER, *args]  # fmt: skip
    run_watched(cmd, tmp, timeout=300)


def _load(out: Path) -> tuple[dict[int, float], dict]:
    losses = {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}
    return losses, torch.load(out / "state.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    common = ["train", "--teacher", str(tiny_teacher), "--max-steps", "4", "--global-batch", "4"]
    _run([*common, "--strategy", "single", "--out", str(root / "single")], 1, root)
    _run([*common, "--strategy", "ddp", "--out", str(root / "ddp")], 2, root)
    _run([*common, "--strategy", "fsdp", "--out", str(root / "fsdp")], 2, root)
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, strategy):
    ref_losses, ref = _load(runs / "single")
    losses, state = _load(runs / strategy)
    assert sorted(losses) == [1, 2, 3, 4] and state["global_step"] == 4
    for step, value in ref_losses.items():
        assert losses[step] == pytest.approx(value, rel=1e-4), step
    for name, value in ref["target"].items():
        torch.testing.assert_close(state["target"][name], value, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def lora_runs(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_lora")
    common = ["train", "--teacher", str(tiny_teacher), "--max-steps", "4", "--global-batch", "4",
              "--lora-rank", "4"]  # fmt: skip
    _run([*common, "--strategy", "single", "--out", str(root / "single")], 1, root)
    _run([*common, "--strategy", "fsdp", "--out", str(root / "fsdp")], 2, root)
    return root


def test_fsdp_with_a_lora_matches_one_process(lora_runs):
    """PE-CoDi with a LoRA of the frozen UNet under FSDP2: the adapter sharded, the LoRA
    whole on every rank with its gradients averaged over the ranks. 2 processes compute
    the losses and the EMA target (adapter and LoRA) of 1 process with the global batch;
    without the averaging each rank's LoRA would follow its own half of the batch."""
    ref_losses, ref = _load(lora_runs / "single")
    losses, state = _load(lora_runs / "fsdp")
    assert sorted(losses) == [1, 2, 3, 4] and state["global_step"] == 4
    for step, value in ref_losses.items():
        assert losses[step] == pytest.approx(value, rel=1e-4), step
    lora = [name for name in ref["target"] if name.startswith("lora.")]
    assert lora and any("lora_B" in n and ref["target"][n].abs().max() > 0 for n in lora)
    assert set(state["target"]) == set(ref["target"])
    for name, value in ref["target"].items():
        torch.testing.assert_close(state["target"][name], value, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_sdxl")
    common = ["train", "--teacher", str(tiny_sdxl_teacher), "--max-steps", "2",
              "--global-batch", "4"]  # fmt: skip
    _run([*common, "--strategy", "single", "--out", str(root / "single")], 1, root)
    _run([*common, "--strategy", "fsdp", "--out", str(root / "fsdp")], 2, root)
    return root


def test_fsdp_on_sdxl_matches_one_process(sdxl_runs):
    """SDXL under FSDP2: each rank's teacher UNet calls get the time_ids of its own rows
    of the global batch (the recorded sizes come through the batch), and 2 processes
    compute the losses and EMA target of 1 process with the global batch."""
    ref_losses, ref = _load(sdxl_runs / "single")
    losses, state = _load(sdxl_runs / "fsdp")
    # rows [original (h, w), crop (top, left), target (h, w)] of worker.global_batch(4)
    rows = [[64 + 8 * i, 48 - 4 * i, i, 2 * i, 32, 32] for i in range(4)]
    seen = {
        name: json.loads((sdxl_runs / run / f"time_ids_rank{rank}.json").read_text())
        for name, run, rank in (("single", "single", 0), ("r0", "fsdp", 0), ("r1", "fsdp", 1))
    }
    assert seen["single"] and len(seen["r0"]) == len(seen["r1"]) == len(seen["single"])
    # every teacher UNet call (solver, guidance branch) gets this rank's rows' time_ids
    for name, want in (("single", rows), ("r0", rows[:2]), ("r1", rows[2:])):
        assert all(call == want for call in seen[name]), name
    assert sorted(losses) == [1, 2] and state["global_step"] == 2
    for step, value in ref_losses.items():
        assert losses[step] == pytest.approx(value, rel=1e-4), step
    for name, value in ref["target"].items():
        torch.testing.assert_close(state["target"][name], value, rtol=0, atol=1e-5, msg=name)


def test_fsdp_save_resume_consolidate_export(runs, tiny_teacher):
    from codi_lightning.checkpoints import consolidate_checkpoint, is_sharded
    from codi_lightning.export import export_checkpoint
    from codi_lightning.training import CoDiDistillation

    root = runs
    common = ["train", "--teacher", str(tiny_teacher), "--global-batch", "4", "--strategy", "fsdp"]
    ckpt = root / "sharded.ckpt"
    _run([*common, "--max-steps", "2", "--out", str(root / "first"), "--save", str(ckpt)], 2, root)
    assert is_sharded(ckpt) and len(list(ckpt.glob("*.distcp"))) == 2
    _run(
        [*common, "--max-steps", "4", "--resume", str(ckpt), "--out", str(root / "resumed")],
        2,
        root,
    )
    full_losses, full = _load(root / "fsdp")
    first, _ = _load(root / "first")
    resumed_losses, resumed = _load(root / "resumed")
    assert sorted(first) == [1, 2] and sorted(resumed_losses) == [3, 4]
    for step in (1, 2, 3, 4):
        got = first.get(step, resumed_losses.get(step))
        assert got == pytest.approx(full_losses[step], rel=1e-5), step
    for name, value in full["target"].items():
        torch.testing.assert_close(resumed["target"][name], value, rtol=0, atol=1e-6)

    single = consolidate_checkpoint(str(ckpt), str(root / "consolidated.ckpt"))
    data = torch.load(single, weights_only=True)
    assert data["global_step"] == 2 and "optimizer_states" in data
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in data["state_dict"])
    a = export_checkpoint(str(ckpt), str(root / "export_dir"))
    b = export_checkpoint(str(single), str(root / "export_file"))
    name = "controlnet/diffusion_pytorch_model.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    m1 = CoDiDistillation.load_from_checkpoint(ckpt)
    m2 = CoDiDistillation.load_from_checkpoint(single)
    for p, q in zip(m1.target.parameters(), m2.target.parameters(), strict=True):
        assert torch.equal(p, q)


def test_each_rank_reads_different_shards(tiny_shards, tmp_path):
    out = tmp_path / "keys"
    args = ["data", "--out", str(out), "--train-shards", tiny_shards["train"],
            "--val-shards", tiny_shards["train"], "--workers", "2"]  # fmt: skip
    _run(args, 2, tmp_path)
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert len(r0["val"]) == len(r1["val"]) == 16  # one shard of 16 each
    assert set(r0["val"]).isdisjoint(r1["val"])
    assert len(set(r0["val"]) | set(r1["val"])) == 32  # every sample once
    assert r0["train"] != r1["train"]  # resampled streams seeded per rank


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """10 validation samples in 3 shards (4, 4, 2), in 2 shards (8, 2) and in 1 shard."""
    from codi_lightning.data import write_shards
    from codi_lightning.demo import write_image_folder

    root = tmp_path_factory.mktemp("uneven")
    write_image_folder(root / "img", 10, seed=3)
    for name, count in (("three", 4), ("two", 8), ("one", 10)):
        write_shards(str(root / "img"), str(root / f"{name}-%06d.tar"), maxcount=count,
                     progress=False)  # fmt: skip
    return root


@pytest.mark.parametrize(
    "pattern,workers",
    [("three-{000000..000002}.tar", 2), ("one-000000.tar", 1), ("two-{000000..000001}.tar", 2)],
    ids=["3-shards-2x2", "1-shard-2-ranks", "2-shards-2x2"],
)
def test_uneven_eval_shards_give_every_rank_as_many_batches(uneven_shards, pattern, workers,
                                                           tiny_shards, tmp_path):  # fmt: skip
    """Ranks run the same number of evaluation batches (padding where a rank ran out), and
    every sample is seen exactly once over the ranks."""
    out = tmp_path / "keys"
    args = ["data", "--out", str(out), "--train-shards", tiny_shards["train"],
            "--val-shards", str(uneven_shards / pattern), "--workers", str(workers)]  # fmt: skip
    _run(args, 2, tmp_path)
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["batches"] == r1["batches"]
    assert r0["pads"] + r1["pads"] > 0  # the split is uneven: someone was padded
    assert len(r0["val"]) + len(r1["val"]) == 10
    assert len(set(r0["val"]) | set(r1["val"])) == 10


@pytest.mark.parametrize("rows", ["0-6/6-10", "0-10/"], ids=["uneven", "one-rank-empty"])
def test_metrics_over_uneven_ranks_equal_one_process(rows, tmp_path):
    """FID, KID, SWD, PSNR... over ranks that saw different numbers of batches (or none)
    equal the one-process values over the same samples; so do the stored per-image
    features (rank by rank: the same rows in the same order)."""
    _run(["metrics", "--out", str(tmp_path / "one"), "--rows", "0-10"], 1, tmp_path)
    _run(["metrics", "--out", str(tmp_path / "two"), "--rows", rows], 2, tmp_path)
    ref = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        got = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        assert got["images"] == ref["images"] == 10
        for name, value in ref.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (rank, name)
    one = torch.load(tmp_path / "one" / "features0.pt", weights_only=True)
    for rank in (0, 1):
        two = torch.load(tmp_path / "two" / f"features{rank}.pt", weights_only=True)
        for side in ("real", "fake"):
            assert two[side].shape == one[side].shape == (10, 256)
            assert torch.allclose(two[side], one[side], atol=1e-6), (rank, side)


def test_fsdp_bf16_mixed_keeps_fp32_master_and_ema(tiny_teacher, tmp_path):
    """bf16-mixed under FSDP2 on the CPU (correctness only: CPU bf16 is slow)."""
    out = tmp_path / "bf16"
    args = ["train", "--teacher", str(tiny_teacher), "--strategy", "fsdp", "--max-steps", "2",
            "--precision", "bf16-mixed", "--method", "codi", "--out", str(out)]  # fmt: skip
    _run(args, 2, tmp_path)
    losses, state = _load(out)
    assert sorted(losses) == [1, 2] and all(
        v == v and abs(v) < float("inf") for v in losses.values()
    )
    assert all(v.dtype == torch.float32 for v in state["target"].values())
