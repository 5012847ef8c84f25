"""Export of SD3-family checkpoints: the folder layout, and the stock
StableDiffusion3ControlNetPipeline with the exported schedulers reproducing the module's
deterministic and stochastic samplers on a tiny SD3 teacher."""

import numpy as np
import pytest
import torch
from conftest import write_checkpoint
from PIL import Image
from safetensors.torch import load_file

from codi_lightning.diffusion import randn
from codi_lightning.export import export_checkpoint
from codi_lightning.models.tiny import TINY_SD3_T5_LENGTH


def _checkpoint(teacher, path, **kw):
    """A checkpoint whose EMA target (adapter included) is far from its zero init."""
    return write_checkpoint(teacher, path, scale=0.05, **kw).eval()


@pytest.fixture(scope="module")
def codi_export(tiny_sd3_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    m = _checkpoint(tiny_sd3_teacher, root / "codi.ckpt", method="codi")
    out = export_checkpoint(str(root / "codi.ckpt"), str(root / "export"))
    return m, out


def test_layout_and_weights(codi_export, tiny_sd3_teacher, tmp_path):
    m, out = codi_export
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "controlnet", "scheduler", "scheduler_deterministic", "transformer",
    ]  # fmt: skip
    for name, module in (("controlnet", m.target["controlnet"]), ("transformer", m.target["unet"])):
        saved = load_file(next((out / name).glob("*.safetensors")))
        own = module.state_dict()
        assert set(saved) == set(own) and all(torch.equal(saved[k], own[k]) for k in own)
    card = (out / "README.md").read_text()
    assert (
        "StableDiffusion3ControlNetPipeline" in card and "sigmas = [1.0, 0.75, 0.5, 0.25]" in card
    )  # N = 20
    pe = tmp_path / "pe.ckpt"
    _checkpoint(tiny_sd3_teacher, pe)
    assert not (export_checkpoint(str(pe), str(tmp_path / "pe")) / "transformer").exists()


@pytest.fixture
def mean_posterior(monkeypatch):
    """The stock pipeline encodes the control image with a posterior sample; the module
    with the mean. Compare the rest of the path with the pipeline on the mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )


@pytest.mark.parametrize("stochastic", [False, True])
def test_stock_pipeline_reproduces_our_samplers(codi_export, tiny_sd3_teacher, mean_posterior,
                                                stochastic):  # fmt: skip
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FlowMatchLCMScheduler,
        SD3ControlNetModel,
        SD3Transformer2DModel,
        StableDiffusion3ControlNetPipeline,
    )

    m, out = codi_export
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
        str(tiny_sd3_teacher),
        controlnet=SD3ControlNetModel.from_pretrained(out, subfolder="controlnet"),
        transformer=SD3Transformer2DModel.from_pretrained(out, subfolder="transformer"),
    )
    folder, cls = (
        ("scheduler", FlowMatchLCMScheduler)
        if stochastic
        else ("scheduler_deterministic", FlowMatchEulerDiscreteScheduler)
    )
    pipe.scheduler = cls.from_pretrained(out, subfolder=folder)
    pipe.set_progress_bar_config(disable=True)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    control = Image.fromarray(rgb)
    cond = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    prompt = "a red circle"
    for steps in (1, 2, 4):
        ts = [
            int(t)
            for t in __import__("codi_lightning").diffusion.sampling_timesteps(steps, 1000, 20)
        ]
        torch.manual_seed(11)  # FlowMatchLCMScheduler's per-step noise
        stock = pipe(
            prompt, control_image=control, sigmas=m.schedule.unshifted(ts), guidance_scale=1.0,
            height=32, width=32, max_sequence_length=TINY_SD3_T5_LENGTH, output_type="pt",
            generator=torch.Generator().manual_seed(steps),
        ).images  # fmt: skip
        with torch.no_grad():
            text = m.encode_text([prompt])
            model = m.denoiser("target", text, m.adapter_condition(cond))
            noise = randn((1, 16, 8, 8), torch.Generator().manual_seed(steps))
            step_noise = torch.Generator().manual_seed(11)
            latents = m.run_sampler(model, noise, steps, stochastic=stochastic,
                                    generator=step_noise)  # fmt: skip
            ours = m.decode_latents(latents)
        torch.testing.assert_close(ours, stock, rtol=0, atol=2e-4)
        assert ours.std() > 0.01  # not a constant image


def test_our_uniform_pipeline_points_sd3_exports_to_the_stock_one(codi_export, tiny_sd3_teacher):
    from codi_lightning.export import CoDiPipeline

    _, out = codi_export
    with pytest.raises(NotImplementedError, match="StableDiffusion3ControlNetPipeline"):
        CoDiPipeline.from_exported(str(out), str(tiny_sd3_teacher))
