"""The distillation LightningModule: what trains, what stays frozen, what is saved."""

import lightning as L
import pytest
import torch
from helpers import make_batch

from codi_lightning.diffusion import CoDiLossConfig
from codi_lightning.training import CoDiDistillation


def _module(teacher, **kw):
    return CoDiDistillation(str(teacher), num_grid=10, **kw)


def _param_ids(module):
    return {id(p) for p in module.parameters()}


def test_pe_codi_shares_the_frozen_unet(tiny_teacher):
    m = _module(tiny_teacher)
    assert m.student_network is None
    assert set(m.trainable_modules()) == {"controlnet"}
    assert set(m.target.keys()) == {"controlnet"}
    assert all(not p.requires_grad for p in m.network.parameters())
    assert all(not p.requires_grad for p in m.target.parameters())
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == _param_ids(m.controlnet)
    assert trainable.isdisjoint(_param_ids(m.network) | _param_ids(m.target))


def test_full_codi_trains_a_copy_of_the_unet(tiny_teacher):
    m = _module(tiny_teacher, method="codi")
    assert m.student_network is not None and m.student_network is not m.network
    assert set(m.target.keys()) == {"controlnet", "network"}
    trainable = {id(p) for p in m.trainable_parameters()}
    assert trainable == _param_ids(m.controlnet) | _param_ids(m.student_network)
    assert trainable.isdisjoint(_param_ids(m.network))


@pytest.mark.parametrize("method", ["pe-codi", "codi"])
def test_one_optimizer_step_moves_only_theta_and_the_ema(tiny_teacher, method):
    m = _module(tiny_teacher, method=method, ema_decay=0.5)
    # the frozen networks' own state dicts: the module's state_dict leaves them out
    # (SkipFrozenState), so filtering it by their prefixes would compare nothing
    frozen = {name: getattr(m, name) for name in ("network", "vae", "prompt_encoder")}
    frozen_before = {
        f"{name}.{k}": v.clone()
        for name, net in frozen.items()
        for k, v in net.state_dict().items()
    }
    assert len(frozen_before) > 50
    target_before = [p.clone() for p in m.target.parameters()]
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    m.train()
    loss, _ = m.compute_loss(make_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in m.network.parameters())
    assert all(p.grad is None for p in m.target.parameters())
    opt.step()
    m.update_target()
    frozen_after = {
        f"{name}.{k}": v for name, net in frozen.items() for k, v in net.state_dict().items()
    }
    assert frozen_after.keys() == frozen_before.keys()
    for k, v in frozen_after.items():
        assert torch.equal(v, frozen_before[k]), k
    # theta^- = 0.5 theta^-_old + 0.5 theta for every trained parameter
    online = [p for mod in m.trainable_modules().values() for p in mod.parameters()]
    target = [p for key in m.trainable_modules() for p in m.target[key].parameters()]
    old = {id(p): b for p, b in zip(m.target.parameters(), target_before, strict=True)}
    moved = 0
    for tp, op in zip(target, online, strict=True):
        torch.testing.assert_close(tp, 0.5 * old[id(tp)] + 0.5 * op.detach())
        moved += int(not torch.equal(tp, old[id(tp)]))
    assert moved > 0
    assert all(p.dtype == torch.float32 for p in m.target.parameters())


@pytest.mark.parametrize(
    "loss",
    [
        CoDiLossConfig(solver="target"),
        CoDiLossConfig(solver="teacher", ode_noise="predicted"),
        CoDiLossConfig(consistency_space="x", distance="huber"),
    ],
    ids=["target", "teacher", "x-huber"],
)
def test_solver_and_loss_variants_train(tiny_teacher, loss):
    m = _module(tiny_teacher, loss=loss, per_sample_timesteps=True)
    out, terms = m.compute_loss(make_batch(), torch.Generator().manual_seed(0))
    out.backward()
    assert torch.isfinite(out) and set(terms) == {"consistency", "guidance", "loss"}
    assert any(p.grad is not None for p in m.controlnet.parameters())


def test_cfg_aware_guides_online_and_target(tiny_teacher, monkeypatch):
    m = _module(tiny_teacher, cfg_aware=True, guidance_range=(3, 4))
    calls = []
    original = m.denoiser

    def spy(which, text, cond, guidance=None):
        calls.append((which, guidance))
        return original(which, text, cond, guidance)

    monkeypatch.setattr(m, "denoiser", spy)
    loss, _ = m.compute_loss(make_batch(), torch.Generator().manual_seed(0))
    assert ("online", 3.0) in calls and ("target", 3.0) in calls
    assert ("online", None) in calls  # the ODE solver is never guided
    loss.backward()


def test_pixel_space_v_prediction(tiny_pixel_teacher):
    m = CoDiDistillation(str(tiny_pixel_teacher), pixel_space=True, num_grid=10)
    assert m.schedule.prediction_type == "v_prediction"
    assert m.controlnet.config.conditioning_embedding_out_channels == (16,)
    batch = make_batch(resolution=16)
    loss, _ = m.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    images = m.sample_images(batch["cond"], batch["caption"], num_steps=2)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_sampling_is_seeded_and_uses_the_target(tiny_teacher):
    m = _module(tiny_teacher)
    batch = make_batch()
    a = m.sample_images(
        batch["cond"], batch["caption"], 2, generator=torch.Generator().manual_seed(1)
    )
    b = m.sample_images(
        batch["cond"], batch["caption"], 2, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 3, 32, 32)
    with torch.no_grad():  # perturb the online adapter only: target sampling must not change
        for p in m.controlnet.parameters():
            p.add_(0.1)
    c = m.sample_images(
        batch["cond"], batch["caption"], 2, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(a, c)
    d = m.sample_images(
        batch["cond"],
        batch["caption"],
        2,
        use_target=False,
        generator=torch.Generator().manual_seed(1),
    )
    assert not torch.allclose(a, d)


def test_checkpoint_leaves_out_frozen_parts_and_reloads(tiny_teacher, tmp_path):
    m = _module(tiny_teacher, method="codi")
    with torch.no_grad():
        for p in m.target.parameters():
            p.add_(1.0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(m)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False, map_location="cpu")["state_dict"]
    assert not any(k.startswith(("network.", "vae.", "prompt_encoder.", "unet.")) for k in state)
    assert any(k.startswith("target.controlnet.") for k in state)
    assert any(k.startswith("target.network.") for k in state)
    assert any(k.startswith("student_network.") for k in state)
    fresh = CoDiDistillation.load_from_checkpoint(path)
    for (k, a), b in zip(
        m.target.state_dict().items(), fresh.target.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    # a checkpoint missing a trained key is still refused
    del state[next(k for k in state if k.startswith("controlnet."))]
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(state)


def test_bad_arguments_name_the_fix(tiny_teacher):
    with pytest.raises(ValueError, match="pe-codi"):
        _module(tiny_teacher, method="full")
    with pytest.raises(ValueError, match="ema_decay"):
        _module(tiny_teacher, ema_decay=2.0)


def test_skip_counts_from_the_data_are_logged(tiny_teacher):
    from torch.utils.data import DataLoader

    batch = make_batch()
    batch["skipped"] = {"corrupt_image": 3, "too_large": 1}
    m = _module(tiny_teacher)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, train_dataloaders=DataLoader([batch], batch_size=None))
    assert trainer.callback_metrics["data/skipped_corrupt_image"] == 3
    assert trainer.callback_metrics["data/skipped_too_large"] == 1


def test_ema_follows_the_optimizer_step_in_fit(tiny_teacher):
    """In a real fit, theta^- is updated after the optimizer step:
    theta^- = gamma theta^-_before + (1 - gamma) theta_after, not theta_before."""
    from torch.utils.data import DataLoader

    decay = 0.75
    m = _module(tiny_teacher, ema_decay=decay, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    with torch.no_grad():  # start the target away from theta, so every term is visible
        g = torch.Generator().manual_seed(0)
        for p in m.target.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    online_before = [p.detach().clone() for p in m.controlnet.parameters()]
    target_before = [p.detach().clone() for p in m.target["controlnet"].parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(m, train_dataloaders=DataLoader([make_batch()], batch_size=None))
    assert trainer.global_step == 1

    online_after = [p.detach() for p in m.controlnet.parameters()]
    target_after = [p.detach() for p in m.target["controlnet"].parameters()]
    moved = [not torch.equal(a, b) for a, b in zip(online_after, online_before, strict=True)]
    assert any(moved), "the optimizer step did not change theta"
    for i, (tb, ta, on_b, on_a) in enumerate(
        zip(target_before, target_after, online_before, online_after, strict=True)
    ):
        expected = decay * tb + (1 - decay) * on_a
        torch.testing.assert_close(ta, expected, rtol=1e-6, atol=1e-7, msg=f"param {i}")
        if moved[i]:
            stale = decay * tb + (1 - decay) * on_b
            assert not torch.allclose(ta, stale, rtol=1e-6, atol=1e-7), f"param {i}"


def test_the_declared_state_prefixes_are_where_the_module_keeps_its_weights(tiny_teacher):
    """checkpoints.STATE_PREFIXES, which export reads checkpoints by: every trained and
    EMA module's weights lie under its prefix (CoDi: adapter and network; PE-CoDi with a
    LoRA: adapter and LoRA)."""
    from codi_lightning.checkpoints import STATE_PREFIXES

    for kw, parts in (({"method": "codi"}, ("adapter", "network")),
                      ({"lora_rank": 2}, ("adapter", "lora"))):  # fmt: skip
        m = CoDiDistillation(str(tiny_teacher), num_grid=10, **kw)
        keys = list(m.state_dict())
        modules = {"adapter": m.controlnet, "network": m.student_network,
                   "lora": m.lora.weights if m.lora is not None else None}  # fmt: skip
        for part in parts:
            for weights, prefix in STATE_PREFIXES[part].items():
                under = [k for k in keys if k.startswith(prefix)]
                assert under, (part, weights, prefix)
                assert len(under) == len(modules[part].state_dict()), (part, weights)
