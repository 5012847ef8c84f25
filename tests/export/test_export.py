"""Export to diffusers folders, stock-diffusers equivalence, and downstream loading."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from codi_lightning.export import CoDiPipeline, export_checkpoint
from codi_lightning.training import CoDiDistillation


def _checkpoint(teacher, path, **kw):
    """A checkpoint whose EMA target differs from the online weights."""
    torch.manual_seed(0)
    m = CoDiDistillation(str(teacher), num_grid=20, **kw)
    with torch.no_grad():
        for p in m.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", max_steps=0)
    trainer.strategy.connect(m)
    trainer.save_checkpoint(path)
    return m


def _same(module, folder):
    file = next(folder.glob("*.safetensors"))
    saved = load_file(file)
    own = module.state_dict()
    assert set(saved) == set(own)
    return all(torch.equal(saved[k], own[k]) for k in own)


@pytest.fixture(scope="module")
def pe_export(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("pe")
    m = _checkpoint(tiny_teacher, root / "pe.ckpt")
    out = export_checkpoint(str(root / "pe.ckpt"), str(root / "export"))
    return m, out, root


def test_pe_codi_export_layout(pe_export):
    m, out, root = pe_export
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "controlnet", "scheduler"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*"))
    assert _same(m.target["controlnet"], out / "controlnet")
    assert not _same(m.controlnet, out / "controlnet")
    online = export_checkpoint(str(root / "pe.ckpt"), str(root / "online"), weights="online")
    assert _same(m.controlnet, online / "controlnet")
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    assert sched.config.original_inference_steps == 20
    assert "base_model:" in (out / "README.md").read_text()


def test_full_codi_exports_the_unet(tiny_teacher, tmp_path):
    m = _checkpoint(tiny_teacher, tmp_path / "codi.ckpt", method="codi")
    out = export_checkpoint(str(tmp_path / "codi.ckpt"), str(tmp_path / "export"))
    assert _same(m.target["unet"], out / "unet")
    assert _same(m.target["controlnet"], out / "controlnet")


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        export_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path / "o"))


def test_stock_diffusers_pipeline_matches_our_sampler(pe_export, tiny_teacher):
    """StableDiffusionControlNetPipeline + LCMScheduler, loaded the stock way, gives the
    images of our stochastic (consistency multistep) sampler for the same generator:
    LCMScheduler draws the initial latents and one fresh noise per step in the same
    order. Tolerance 1e-5 (fp32, same operations)."""
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    m, out, _ = pe_export
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", ""]
    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(tiny_teacher), controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    pipe.set_progress_bar_config(disable=True)
    ours = CoDiPipeline.from_exported(str(out), str(tiny_teacher))
    for steps in (1, 2, 4):
        stock = pipe(
            prompts, image=cond, num_inference_steps=steps, guidance_scale=1.0, height=32, width=32,
            output_type="pt", generator=torch.Generator().manual_seed(steps),
        ).images  # fmt: skip
        mine = ours(
            cond, prompts, steps, stochastic=True, generator=torch.Generator().manual_seed(steps)
        )
        module = m.sample_images(
            cond, prompts, steps, stochastic=True, generator=torch.Generator().manual_seed(steps)
        )
        torch.testing.assert_close(stock, mine, rtol=0, atol=1e-5)
        torch.testing.assert_close(module, mine, rtol=0, atol=1e-5)
    # the deterministic sampler (eps_hat instead of fresh noise) is not LCMScheduler's,
    # but the exported pipeline and the module agree on it
    det = ours(cond, prompts, 4, generator=torch.Generator().manual_seed(0))
    det_module = m.sample_images(cond, prompts, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(det, det_module, rtol=0, atol=1e-5)


def test_load_from_checkpoint_in_a_fresh_process(pe_export):
    _, _, root = pe_export
    code = (
        "import torch\n"
        "from codi_lightning.training import CoDiDistillation\n"
        f"m = CoDiDistillation.load_from_checkpoint({str(root / 'pe.ckpt')!r})\n"
        "x = m.sample_images(torch.rand(1, 3, 32, 32), [''], 2)\n"
        "assert x.shape == (1, 3, 32, 32), x.shape\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
