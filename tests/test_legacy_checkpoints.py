"""Checkpoints written before the networks were named for what they hold
(``student_unet.``, ``target.unet.``, DiffusionTraining's ``unet.`` / ``ema_unet.``) still
load, resume and export under the current names; FSDP2, which loads by the module's own
key names, refuses them in one line."""

import lightning as L
import pytest
import torch
from helpers import write_checkpoint

from codi_lightning.checkpoints import CheckpointError, check_current_keys, read_checkpoint
from codi_lightning.export import export_checkpoint
from codi_lightning.testing.tiny import tiny_unet_config
from codi_lightning.training import CoDiDistillation, DiffusionTraining

OLD = {"student_network.": "student_unet.", "target.network.": "target.unet.",
       "ema_network.": "ema_unet.", "network.": "unet."}  # fmt: skip


def _as_old(path, out):
    """``path``'s checkpoint with its keys under the names it would have had before."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in checkpoint["state_dict"].items():
        new = next((p for p in OLD if key.startswith(p)), None)
        renamed[key if new is None else OLD[new] + key[len(new) :]] = value
    assert renamed.keys() != checkpoint["state_dict"].keys()
    checkpoint["state_dict"] = renamed
    torch.save(checkpoint, out)
    return out


@pytest.fixture(scope="module")
def old_codi(tiny_teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("legacy")
    m = write_checkpoint(tiny_teacher, tmp / "new.ckpt", method="codi")
    return m, _as_old(tmp / "new.ckpt", tmp / "old.ckpt")


def test_an_old_full_codi_checkpoint_loads_under_the_new_names(old_codi):
    m, old = old_codi
    assert any(
        k.startswith("student_unet.") for k in torch.load(old, weights_only=True)["state_dict"]
    )
    fresh = CoDiDistillation.load_from_checkpoint(old)
    for name in ("network", "controlnet"):
        for (k, a), b in zip(m.target[name].state_dict().items(),
                             fresh.target[name].state_dict().values(), strict=True):  # fmt: skip
            assert torch.equal(a, b), k
    online = dict(fresh.student_network.state_dict())
    assert all(torch.equal(v, online[k]) for k, v in m.student_network.state_dict().items())
    state = read_checkpoint(old)["state_dict"]
    assert not any(k.startswith(("student_unet.", "target.unet.")) for k in state)


def test_an_old_full_codi_checkpoint_exports_and_resumes(old_codi, tmp_path):
    m, old = old_codi
    out = export_checkpoint(str(old), str(tmp_path / "export"))
    from safetensors.torch import load_file

    saved = load_file(next((out / "unet").glob("*.safetensors")))
    own = m.target["network"].state_dict()
    assert set(saved) == set(own) and all(torch.equal(saved[k], own[k]) for k in own)
    # resumed by a trainer (one process; the connector's model restore, as fit's resume
    # runs it): the restored weights are the checkpoint's
    resumed = CoDiDistillation(m.hparams.pretrained, num_grid=20, method="codi")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(resumed)
    trainer._checkpoint_connector.resume_start(str(old))
    trainer._checkpoint_connector.restore_model()
    a, b = resumed.target["network"].state_dict(), m.target["network"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_an_old_teacher_training_checkpoint_loads(tmp_path):
    m = DiffusionTraining(str(tmp_path / "out"), unet=tiny_unet_config(in_channels=3))
    with torch.no_grad():
        for p in m.ema_network.parameters():
            p.add_(0.5)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    old = _as_old(tmp_path / "new.ckpt", tmp_path / "old.ckpt")
    keys = torch.load(old, weights_only=True)["state_dict"]
    assert any(k.startswith("ema_unet.") for k in keys) and any(k.startswith("unet.") for k in keys)
    fresh = DiffusionTraining.load_from_checkpoint(old)
    for name in ("network", "ema_network"):
        a, b = getattr(fresh, name).state_dict(), getattr(m, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name


def test_fsdp2_refuses_an_old_checkpoint_in_one_line(old_codi, tmp_path):
    """Files and sharded folders alike; current checkpoints pass."""
    import torch.distributed.checkpoint as dcp

    _, old = old_codi
    with pytest.raises(CheckpointError, match="resume it with DDP or one process, or export it"):
        check_current_keys(old)
    check_current_keys(old.with_name("new.ckpt"))
    for prefix, refused in (("student_unet.", True), ("student_network.", False)):
        folder = tmp_path / prefix.rstrip(".")
        state = {"state_dict": {prefix + "w": torch.zeros(2), "controlnet.w": torch.ones(2)}}
        dcp.save(state, checkpoint_id=folder, no_dist=True)
        if refused:
            with pytest.raises(CheckpointError, match="'student_unet.w'"):
                check_current_keys(folder)
        else:
            check_current_keys(folder)
