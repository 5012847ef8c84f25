"""Precision and memory options on one CPU process (multi-process runs: tests/distributed)."""

import lightning as L
import pytest
import torch
from helpers import make_batch

from codi_lightning.training import CoDiDistillation


def _loss(m, seed=0):
    loss, _ = m.compute_loss(make_batch(), torch.Generator().manual_seed(seed))
    return loss


@pytest.mark.parametrize("option", ["gradient_checkpointing", "channels_last"])
def test_memory_savers_keep_the_loss(tiny_teacher, option):
    ref = CoDiDistillation(str(tiny_teacher), method="codi", num_grid=10)
    m = CoDiDistillation(str(tiny_teacher), method="codi", num_grid=10, **{option: True})
    m.configure_model()
    if option == "gradient_checkpointing":
        assert (
            m.controlnet.is_gradient_checkpointing and m.student_network.is_gradient_checkpointing
        )
    else:
        w = next(p for p in m.controlnet.parameters() if p.ndim == 4)
        assert w.is_contiguous(memory_format=torch.channels_last)
    a, b = _loss(ref), _loss(m)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    b.backward()
    assert all(p.grad is not None for p in m.controlnet.parameters() if p.requires_grad)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_frozen_parts_in_bf16_target_stays_fp32(tiny_teacher, lora_rank):
    """The frozen parts in bf16; every trained weight in fp32, the LoRA inside the bf16
    network included (its master weights and the optimizer's states)."""
    m = CoDiDistillation(str(tiny_teacher), num_grid=10, frozen_dtype="bf16", lora_rank=lora_rank)
    m.configure_model()
    base = [p for n, p in m.network.named_parameters() if ".lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert m.vae.dtype == m.prompt_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m.target.parameters())
    trained = m.trainable_parameters()
    assert all(p.dtype == torch.float32 for p in trained)
    if lora_rank:  # still the very tensors inside the network
        lora_ids = {id(p) for n, p in m.network.named_parameters() if ".lora_" in n}
        assert lora_ids == {id(p) for p in m.lora.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(m)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 for p in trained if p.grad is not None)
    assert all(p.grad is not None for p in trained if p.requires_grad)


@pytest.mark.parametrize(
    ("teacher", "method", "lora_rank"),
    [
        ("tiny_teacher", "pe-codi", 4),
        ("tiny_teacher", "codi", 0),
        ("tiny_sdxl_teacher", "pe-codi", 4),
        ("tiny_sd3_teacher", "pe-codi", 4),
        ("tiny_flux_teacher", "pe-codi", 4),
        ("tiny_sana_teacher", "pe-codi", 4),
    ],
)
def test_bf16_frozen_parts_load_in_bf16_and_sample_outside_a_trainer(
    request, teacher, method, lora_rank
):
    """frozen_dtype=bf16 loads the frozen parts in bf16 (no fp32 copy is ever held: the
    SDXL-size peak, docs/performance.md) while every trained weight and the EMA target
    start fp32; a module built so samples with no trainer and no autocast (the
    load_from_checkpoint / serve path), close to the fp32 module's samples."""
    tiny_teacher = request.getfixturevalue(teacher)
    # shift_resolution: Flux's schedule, set from the data in a trainer
    kw = dict(method=method, lora_rank=lora_rank, num_grid=10, shift_resolution=32)
    m = CoDiDistillation(str(tiny_teacher), frozen_dtype="bf16", **kw)
    base = [p for n, p in m.network.named_parameters() if ".lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)  # before configure_model
    assert m.vae.dtype == m.prompt_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m.trainable_parameters())
    assert all(p.dtype == torch.float32 for p in m.target.parameters())
    ref = CoDiDistillation(str(tiny_teacher), **kw)
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, module in (("bf16", m), ("fp32", ref)):
        out[name] = module.sample_images(
            cond, ["a", "b"], 2, generator=torch.Generator().manual_seed(1)
        )
    assert out["bf16"].dtype == torch.float32
    torch.testing.assert_close(out["bf16"], out["fp32"], atol=0.03, rtol=0)


def test_auto_frozen_dtype_stays_fp32_on_cpu(tiny_teacher):
    m = CoDiDistillation(str(tiny_teacher), num_grid=10)
    m.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    m.configure_model()
    assert m.network.dtype == torch.float32  # bf16 frozen parts only on CUDA under "auto"


def test_bf16_true_warns_about_the_ema(tiny_teacher):
    m = CoDiDistillation(str(tiny_teacher), num_grid=10)
    m.trainer = L.Trainer(accelerator="cpu", precision="bf16-true", logger=False)
    with pytest.warns(UserWarning, match="EMA target in bf16"):
        m.configure_model()


def test_grad_clip_norm_clips(tiny_teacher):
    m = CoDiDistillation(str(tiny_teacher), num_grid=10, grad_clip_norm=1e-3)
    m.trainer = L.Trainer(accelerator="cpu", logger=False)
    _loss(m).backward()
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    m.on_before_optimizer_step(None)
    after = torch.nn.utils.get_total_norm(
        [p.grad for p in m.trainable_parameters() if p.grad is not None]
    )
    assert logged["train/grad_norm"] > 1e-3 and after == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.slow
def test_compile_keeps_checkpoint_keys(tiny_teacher):
    m = CoDiDistillation(str(tiny_teacher), num_grid=10, compile=True)
    keys = set(m.state_dict())
    m.configure_model()
    assert set(m.state_dict()) == keys
    assert torch.isfinite(_loss(m))


def test_bf16_frozen_parts_without_a_bf16_precision_name_the_fix(tiny_teacher):
    """frozen_dtype=bf16 under 32-true (found running bench/real_size_cpu.py's 2-process
    step with it; a dtype error deep in a forward then, bf16 compute now): refused up
    front, naming both fixes."""
    m = CoDiDistillation(str(tiny_teacher), num_grid=10, frozen_dtype="bf16")
    m.trainer = L.Trainer(accelerator="cpu", precision="32-true", logger=False)
    with pytest.raises(ValueError, match="trainer.precision=bf16-mixed, or model.frozen_dtype"):
        m.configure_model()
    m = CoDiDistillation(str(tiny_teacher), num_grid=10, frozen_dtype="bf16")
    m.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    m.configure_model()
    assert m.network.dtype == torch.bfloat16
