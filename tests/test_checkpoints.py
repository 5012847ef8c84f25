"""Checkpoint files: up-front checks with one-line errors, safe unpickling, and
`--ckpt_path auto` (resume from the newest complete checkpoint after a kill)."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import ParseOnlyCLI, _Parsed, _tiny_config

from codi_lightning.checkpoints import (
    CheckpointError,
    checkpoint_step,
    newest_checkpoint,
    read_checkpoint,
)
from codi_lightning.cli import CoDiCLI, main
from codi_lightning.training import CoDiDistillation

TESTS = Path(__file__).parent
TINY = str(TESTS.parent / "configs" / "tiny_cpu.yaml")
CLI = [str(Path(sys.executable).parent / "codi-lightning")]
if not Path(CLI[0]).is_file():
    CLI = [sys.executable, "-m", "codi_lightning"]


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Bad checkpoints and the words their error must contain: cut short, not a zip, a
    pickled payload, a flipped bit in the tensor data (the zip record's CRC-32 no longer
    matches; torch itself loads it), a zip that is not a torch file, a torch file that is
    not a Lightning checkpoint."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.arange(4096.0)}}, good)
    data = good.read_bytes()
    flipped = bytearray(data)
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    flipped[start + 1000] ^= 0x10  # one bit of one float
    poisoned, foreign, plain = (io.BytesIO() for _ in range(3))
    torch.save({"global_step": 1, "state_dict": {}, "x": _Payload(folder / "ran")}, poisoned)
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("notes.txt", "hello")
    torch.save({"weights": torch.zeros(3)}, plain)
    files = {
        "empty": (folder / "empty.ckpt", b"", "empty file (0 bytes)"),
        "truncated": (folder / "truncated.ckpt", data[: len(data) // 2], "truncated checkpoint"),
        "garbage": (folder / "garbage.ckpt", b"W" + os.urandom(999), "not a checkpoint"),
        "poisoned": (folder / "poisoned.ckpt", poisoned.getvalue(),
                     "refused: it holds pickled objects other than tensors"),
        "flipped": (folder / "flipped.ckpt", bytes(flipped), "damaged: the record"),
        "foreign": (folder / "foreign.ckpt", foreign.getvalue(),
                    "not a readable torch checkpoint"),
        "plain": (folder / "plain.ckpt", plain.getvalue(),
                  "a torch file but not a Lightning checkpoint (no state_dict)"),
    }  # fmt: skip
    for path, content, _ in files.values():
        path.write_bytes(content)
    return {name: (path, words) for name, (path, _, words) in files.items()}


BAD_KINDS = ["empty", "truncated", "garbage", "poisoned", "flipped", "foreign", "plain"]


@pytest.mark.parametrize("kind", [*BAD_KINDS, "sharded folder"])
def test_bad_file_fails_in_one_line_on_the_cli(kind, tmp_path):
    """Through the real command: one ``error:`` line naming the file and what it is,
    exit code 2, no traceback, and the payload never runs."""
    if kind == "sharded folder":  # a good folder, but for one device
        path = _write_sharded(tmp_path / "step=2.ckpt", 2)
        words = "a sharded (FSDP2) checkpoint folder, which loads only with the FSDP2 preset"
    else:
        path, words = _bad_files(tmp_path)[kind]
    result = subprocess.run(
        [*CLI, "test", "--config", TINY, "--ckpt_path", str(path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines[-1].startswith(f"error: {path}: {words}"), lines[-1]
    assert len(lines) <= 5, result.stderr
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    assert not (tmp_path / "ran").exists()


def test_bad_files_fail_with_the_file_name_in_python(tmp_path):
    for path, words in _bad_files(tmp_path).values():
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{path}: {words}")):
            CoDiDistillation.load_from_checkpoint(path)
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{path}: {words}")):
            read_checkpoint(path)
    (tmp_path / "folder.ckpt").mkdir()
    with pytest.raises(CheckpointError, match="folder.ckpt: a folder but not a distributed"):
        CoDiDistillation.load_from_checkpoint(tmp_path / "folder.ckpt")


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_poisoned_checkpoint_is_refused_even_with_the_old_default(tmp_path, monkeypatch):
    marker = tmp_path / "payload_ran"
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save({"global_step": 1, "hyper_parameters": {}, "x": _Payload(marker)}, poisoned)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(poisoned)  # the variable restores the old default: the payload runs
    assert marker.is_dir()
    marker.rmdir()
    loads = {
        "load_from_checkpoint": lambda: CoDiDistillation.load_from_checkpoint(poisoned),
        "read_checkpoint": lambda: read_checkpoint(poisoned),
        "checkpoint_step": lambda: checkpoint_step(poisoned),
    }
    for name, load in loads.items():
        with pytest.raises(CheckpointError) as err:
            load()
        message = str(err.value)
        assert message.startswith(f"{poisoned}: refused: it holds pickled objects"), message
        assert "posix.mkdir" in message and "weights_only=False" not in message
        assert not marker.exists(), name


def _write_sharded(path: Path, step: int, **extra) -> Path:
    """A distributed-checkpoint folder as ModelParallelStrategy writes one (state_dict
    and optimizer through torch.distributed.checkpoint, the rest in meta.pt)."""
    import torch.distributed.checkpoint as dcp

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(1, 3)).sum().backward()
    opt.step()
    dcp.save({"state_dict": net.state_dict(), "optimizer_0": opt.state_dict(), **extra},
             checkpoint_id=str(path), no_dist=True)  # fmt: skip
    torch.save({"global_step": step, "hyper_parameters": {}}, path / "meta.pt")
    return path


def test_sharded_folders_never_run_code(tmp_path):
    """A payload in the folder's .metadata, in a non-tensor item or in meta.pt is refused
    by every reader (the check, read_checkpoint, consolidate, load_from_checkpoint), named,
    and never runs; a real folder reads."""
    import pickle

    from codi_lightning.checkpoints import check_checkpoint, consolidate_checkpoint

    good = _write_sharded(tmp_path / "good.ckpt", 7)
    assert read_checkpoint(good)["global_step"] == 7 and checkpoint_step(good) == 7
    marker = tmp_path / "payload_ran"
    meta = _write_sharded(tmp_path / "meta.ckpt", 1000)
    (meta / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    item = _write_sharded(tmp_path / "item.ckpt", 1000, extra={"x": _Payload(marker)})
    loose = _write_sharded(tmp_path / "loose.ckpt", 1000)
    torch.save({"global_step": 1000, "x": _Payload(marker)}, loose / "meta.pt")
    readers = {
        "check": check_checkpoint, "read": read_checkpoint, "step": checkpoint_step,
        "consolidate": lambda p: consolidate_checkpoint(str(p), str(tmp_path / "one.ckpt")),
        "load_from_checkpoint": CoDiDistillation.load_from_checkpoint,
    }  # fmt: skip
    for folder in (meta, item, loose):
        for name, read in readers.items():
            with pytest.raises(CheckpointError, match=re.escape(f"{folder}: ")) as err:
                read(folder)
            assert "refused" in str(err.value) or "unreadable" in str(err.value), (name, err)
            assert not marker.exists(), (folder.name, name)
    assert "posix.mkdir" in str(pytest.raises(CheckpointError, check_checkpoint, meta).value)


def test_auto_passes_over_a_planted_folder_to_the_next_good_checkpoint(tmp_path):
    """A poisoned sharded folder claiming step 1000 among good checkpoints: --ckpt_path
    auto names it as refused and resumes from the newest good one; nothing runs."""
    import pickle

    marker = tmp_path / "payload_ran"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _write_ckpt(folder / "step=4.ckpt", 4, time.time())
    _write_sharded(folder / "step=6.ckpt", 6)
    planted = _write_sharded(folder / "step=1000.ckpt", 1000)
    (planted / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    found, skipped = newest_checkpoint([folder])
    assert found == (folder / "step=6.ckpt", 6)
    assert len(skipped) == 1 and skipped[0].startswith(f"{planted}: refused")
    assert not marker.exists()


def test_torch_loads_a_flipped_bit_silently(tmp_path):
    """Why the CRC check: torch.load of the damaged file returns other weights."""
    path, _ = _bad_files(tmp_path)["flipped"]
    weights = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert not torch.equal(weights, torch.arange(4096.0))
    assert read_checkpoint(tmp_path / "good.ckpt")["global_step"] == 3


class _KwargsCLI(CoDiCLI):
    """Builds everything, then records the arguments of trainer.fit/test instead of running."""

    def _run_subcommand(self, subcommand: str) -> None:
        self.calls = self._prepare_subcommand_kwargs(subcommand)


def test_cli_passes_weights_only_to_the_trainer(tmp_path, tiny_teacher, tiny_shards):
    """Lightning's own default is None (torch's default, False before torch 2.6)."""
    config, _ = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    for command in ("fit", "test"):
        assert _KwargsCLI(args=[command, "--config", str(config)]).calls["weights_only"] is True


def _write_ckpt(path: Path, step: int, mtime: float) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(3)}}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_newest_checkpoint_by_step_then_time(tmp_path):
    now = time.time()
    a, b = tmp_path / "a", tmp_path / "b" / "deep"
    b.mkdir(parents=True)
    a.mkdir()
    _write_ckpt(a / "step=2.ckpt", 2, now - 50)
    _write_ckpt(a / "last.ckpt", 2, now)  # newest file, older step
    _write_ckpt(a / "step=4.ckpt", 4, now - 40)
    _write_ckpt(b / "step=4.ckpt", 4, now - 30)  # same step, newer: wins the tie
    (a / "empty.ckpt").write_bytes(b"")
    (a / "cut.ckpt").write_bytes((a / "step=4.ckpt").read_bytes()[:100])
    sharded = _write_sharded(a / "step=3.ckpt", 3)  # a distributed-checkpoint folder too
    os.utime(sharded / "meta.pt", (now - 60, now - 60))
    unfinished = a / "step=9.ckpt"  # DCP writes .metadata last: a kill leaves none
    unfinished.mkdir()
    assert newest_checkpoint([a])[0] == (a / "step=4.ckpt", 4)
    found, skipped = newest_checkpoint([a], [tmp_path / "b"])
    assert found == (b / "step=4.ckpt", 4)
    assert sorted(line.split(":")[0] for line in skipped) == sorted(
        str(p) for p in (a / "cut.ckpt", a / "empty.ckpt", unfinished)
    )
    (a / "step=4.ckpt").unlink()
    (b / "step=4.ckpt").unlink()
    assert newest_checkpoint([a])[0] == (sharded, 3)
    assert newest_checkpoint([tmp_path / "nothing"]) == (None, [])


def test_auto_without_checkpoints_starts_from_scratch(tmp_path, tiny_teacher, tiny_shards, capsys):
    config, out = _tiny_config(tmp_path, tiny_teacher, tiny_shards)
    with pytest.raises(_Parsed) as info:
        ParseOnlyCLI(args=["fit", "--config", str(config), "--ckpt_path", "auto"])
    assert info.value.args[0]["fit"]["ckpt_path"] is None
    err = capsys.readouterr().err
    assert f"--ckpt_path auto: no checkpoint in {out / 'ckpt'}: starting from scratch" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(config), "--ckpt_path", "auto"])
    assert exit_info.value.code == 2


def _kill_config(tmp_path, teacher, shards, name, max_steps, kill_at_step):
    config, out = _tiny_config(tmp_path, teacher, shards, max_steps=max_steps, limit_val_batches=0)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "kill_checkpoint.KillBeforeLastCheckpoint",
            "init_args": {
                "dirpath": str(out / "ckpt"),
                "every_n_train_steps": 2,
                "kill_at_step": kill_at_step,
                "record_start": str(tmp_path / f"{name}.start"),
            },
        }
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out / "ckpt"


def test_killed_between_the_two_writes_resumes_from_the_step_file(
    tmp_path, tiny_teacher, tiny_shards
):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS / "helpers"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    first, ckpts = _kill_config(tmp_path, tiny_teacher, tiny_shards, "first", 6, kill_at_step=4)
    run = subprocess.run(
        [*CLI, "fit", "--config", str(first)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == -9, run.stderr[-3000:]  # SIGKILL, between the two writes
    step_file = ckpts / "epoch=0-step=4.ckpt"
    assert torch.load(step_file, weights_only=True, mmap=True)["global_step"] == 4
    last = ckpts / "last.ckpt"
    assert torch.load(last, weights_only=True, mmap=True)["global_step"] == 2
    future = time.time() + 60
    os.utime(last, (future, future))  # the newest file by time is not the newest state
    (ckpts / "partial.ckpt").write_bytes(step_file.read_bytes()[:4096])

    second, _ = _kill_config(tmp_path, tiny_teacher, tiny_shards, "second", 6, kill_at_step=None)
    run = subprocess.run(
        [*CLI, "fit", "--config", str(second), "--ckpt_path", "auto"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"--ckpt_path auto: resuming from {step_file} (global_step 4)" in run.stderr
    assert f"--ckpt_path auto: skipped 1: {ckpts / 'partial.ckpt'}: truncated" in run.stderr
    assert (tmp_path / "second.start").read_text() == "4"
    assert torch.load(last, weights_only=True, mmap=True)["global_step"] == 6


def test_lines_the_cli_relays_carry_no_terminal_colour_codes(capsys):
    """The ``--ckpt_path auto`` skip line relays library messages (torch's unpickler
    colours its advice): what the CLI prints is plain text."""
    from codi_lightning.cli import _say

    _say(
        "--ckpt_path auto: skipped 1: x.ckpt: refused (\x1b[1m\x1b[31mWeightsUnpickler error\x1b[0m)"
    )
    err = capsys.readouterr().err
    assert err == "--ckpt_path auto: skipped 1: x.ckpt: refused (WeightsUnpickler error)\n"


def test_a_damaged_shard_of_a_checksummed_folder_is_named(tmp_path):
    """Sharded folders of the FSDP2 preset record each file's size and CRC-32 at save
    (checksums.json): one flipped bit in a shard, a shard cut short or a missing one is
    named by the check (and by --ckpt_path auto, which falls back); a folder without
    the record (Lightning's own strategy) is read as before."""
    import zlib

    from codi_lightning.checkpoints import CHECKSUMS, check_checkpoint, write_checksums

    plain = _write_sharded(tmp_path / "plain.ckpt", 2)
    assert check_checkpoint(plain) == plain  # no record: not checked
    good = _write_sharded(tmp_path / "good.ckpt", 3)
    record = write_checksums(good)
    saved = yaml.safe_load(record.read_text())
    shards = sorted(p for p in good.iterdir() if p.suffix == ".distcp")
    assert shards and set(saved) == {p.name for p in good.iterdir()} - {CHECKSUMS}
    for p in good.iterdir():  # the record against zlib over the whole file
        if p.name != CHECKSUMS:
            assert saved[p.name] == {"size": p.stat().st_size,
                                     "crc32": zlib.crc32(p.read_bytes())}  # fmt: skip
    assert check_checkpoint(good) == good
    weight = read_checkpoint(good)["state_dict"]["weight"]
    raw = weight.numpy().tobytes()

    def flip(p):  # one bit inside the stored weight tensor
        data = bytearray(p.read_bytes())
        at = data.find(raw)
        assert at >= 0
        data[at + 5] ^= 1
        p.write_bytes(bytes(data))

    newer = tmp_path / "newer.ckpt"
    damage = {"flipped": flip, "cut": lambda p: p.write_bytes(p.read_bytes()[:-1]),
              "missing": lambda p: p.unlink()}  # fmt: skip
    for name, spoil in damage.items():
        import shutil

        shutil.rmtree(newer, ignore_errors=True)
        shutil.copytree(good, newer)
        shard = next(p for p in shards if raw in p.read_bytes())
        spoil(newer / shard.name)
        os.utime(newer / "meta.pt", (time.time() + 10, time.time() + 10))  # newer: tried first
        if name == "flipped":  # without the record: other weights, no error
            bare = tmp_path / "bare"
            shutil.copytree(newer, bare)
            (bare / CHECKSUMS).unlink()
            assert not torch.equal(read_checkpoint(bare)["state_dict"]["weight"], weight)
            shutil.rmtree(bare)
        with pytest.raises(CheckpointError) as info:
            check_checkpoint(newer)
        assert shard.name in str(info.value), name
        found, skipped = newest_checkpoint([tmp_path])
        assert found == (good, 3) and any(line.startswith(str(newer)) for line in skipped), name
