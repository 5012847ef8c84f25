"""Export of flow-transformer checkpoints (SD3 family, Flux, SANA): the folder layout, and
the stock StableDiffusion3ControlNetPipeline / FluxControlNetPipeline /
SanaControlNetPipeline with the exported schedulers reproducing the module's deterministic
and stochastic samplers on tiny teachers."""

import numpy as np
import pytest
import torch
from helpers import write_checkpoint
from PIL import Image
from safetensors.torch import load_file

from codi_lightning.diffusion import randn, sampling_timesteps
from codi_lightning.export import export_checkpoint

# per family: the stock classes, the pipeline's guidance_scale that reproduces training,
# the module's extra arguments (Flux: the resolution that fixes its sigma shift), the
# pipeline's extra call arguments, and whether the pipeline passes its generator to the
# scheduler's step (SANA) or the scheduler draws from torch's global one
FAMILIES = {
    "sd3": {"adapter": "SD3ControlNetModel", "network": "SD3Transformer2DModel",
            "pipeline": "StableDiffusion3ControlNetPipeline", "guidance": 1.0, "kw": {},
            "call": {}, "step_generator": False},
    "flux": {"adapter": "FluxControlNetModel", "network": "FluxTransformer2DModel",
             "pipeline": "FluxControlNetPipeline", "guidance": 3.5,
             "kw": {"shift_resolution": 32}, "call": {}, "step_generator": False},
    "sana": {"adapter": "SanaControlNetModel", "network": "SanaTransformer2DModel",
             "pipeline": "SanaControlNetPipeline", "guidance": 1.0, "kw": {},
             "call": {"use_resolution_binning": False}, "step_generator": True},
}  # fmt: skip


def _text_length(m) -> int:
    """The sequence length the module's prompt encoder reads (T5's; SANA: Gemma's)."""
    encoder = m.prompt_encoder
    return encoder.length if hasattr(encoder, "length") else encoder.t5_length


def _latent_shape(m, size: int = 32) -> tuple[int, ...]:
    return (1, m.vae.config.latent_channels, size // m.vae_scale, size // m.vae_scale)


def _checkpoint(teacher, path, **kw):
    """A checkpoint whose EMA target (adapter included) is far from its zero init."""
    return write_checkpoint(teacher, path, scale=0.05, **kw).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def codi_export(request, tmp_path_factory):
    family = request.param
    teacher = request.getfixturevalue(f"tiny_{family}_teacher")
    root = tmp_path_factory.mktemp(family)
    m = _checkpoint(teacher, root / "codi.ckpt", method="codi", **FAMILIES[family]["kw"])
    out = export_checkpoint(str(root / "codi.ckpt"), str(root / "export"))
    return family, teacher, m, out


def test_layout_and_weights(codi_export, tmp_path):
    family, teacher, m, out = codi_export
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "controlnet", "scheduler", "scheduler_deterministic", "transformer",
    ]  # fmt: skip
    for name, module in (
        ("controlnet", m.target["controlnet"]),
        ("transformer", m.target["network"]),
    ):
        saved = load_file(next((out / name).glob("*.safetensors")))
        own = module.state_dict()
        assert set(saved) == set(own) and all(torch.equal(saved[k], own[k]) for k in own)
    card = (out / "README.md").read_text()
    assert FAMILIES[family]["pipeline"] in card and "sigmas = [1.0, 0.75, 0.5, 0.25]" in card
    assert f"whose sides are multiples of {m.pixel_multiple} " in card  # the padding rule
    length = _text_length(m)  # what the module encoded with
    assert card.count(f"max_sequence_length={length},") == 3  # both samplers, any size
    pe = tmp_path / "pe.ckpt"
    _checkpoint(teacher, pe, **FAMILIES[family]["kw"])
    assert not (export_checkpoint(str(pe), str(tmp_path / "pe")) / "transformer").exists()


@pytest.fixture
def mean_posterior(monkeypatch):
    """The stock pipelines encode the control image with a posterior sample; the module
    with the mean. Compare the rest of the path with the pipeline on the mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )


@pytest.fixture
def packed_step_noise(monkeypatch):
    """FlowMatchLCMScheduler in the Flux pipeline draws its per-step noise for the packed
    [B, HW/4, 4C] tokens; the module draws it for [B, C, H, W] latents: the same normal
    noise in another order. Let the module draw it the pipeline's way."""
    from codi_lightning.diffusion import sampling
    from codi_lightning.models.teachers import flux

    def packed(shape, generator=None, device=None, dtype=None):
        b, c, h, w = shape
        tokens = torch.randn((b, h * w // 4, 4 * c), generator=generator, device=device,
                             dtype=dtype)  # fmt: skip
        return flux.unpack(tokens, h, w)

    monkeypatch.setattr(sampling, "randn", packed)


@pytest.mark.parametrize("stochastic", [False, True])
def test_stock_pipeline_reproduces_our_samplers(codi_export, mean_posterior, stochastic, request):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

    family, teacher, m, out = codi_export
    spec = FAMILIES[family]
    if family == "flux" and stochastic:
        request.getfixturevalue("packed_step_noise")
    pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(
        str(teacher),
        controlnet=getattr(diffusers, spec["adapter"]).from_pretrained(out, subfolder="controlnet"),
        transformer=getattr(diffusers, spec["network"]).from_pretrained(out, subfolder="transformer"),
    )  # fmt: skip
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
        ts = [int(t) for t in sampling_timesteps(steps, 1000, 20)]
        torch.manual_seed(11)  # FlowMatchLCMScheduler's per-step noise
        stock = pipe(
            prompt, control_image=control, sigmas=m.schedule.unshifted(ts),
            guidance_scale=spec["guidance"], height=32, width=32,
            max_sequence_length=_text_length(m), output_type="pt",
            generator=torch.Generator().manual_seed(steps), **spec["call"],
        ).images  # fmt: skip
        with torch.no_grad():
            text = m.encode_text([prompt])
            model = m.denoiser("target", text, m.adapter_condition(cond))
            gen = torch.Generator().manual_seed(steps)
            noise = randn(_latent_shape(m), gen)
            # the per-step noise: the pipeline's generator after the initial noise (SANA),
            # or torch's global generator, seeded above
            step_noise = gen if spec["step_generator"] else torch.Generator().manual_seed(11)
            latents = m.run_sampler(model, noise, steps, stochastic=stochastic,
                                    generator=step_noise)  # fmt: skip
            ours = m.decode_latents(latents)
        torch.testing.assert_close(ours, stock, rtol=0, atol=2e-4)
        assert ours.std() > 0.01  # not a constant image


def test_our_uniform_pipeline_points_flow_exports_to_the_stock_one(codi_export):
    from codi_lightning.export import CoDiPipeline

    family, teacher, _, out = codi_export
    with pytest.raises(NotImplementedError, match=FAMILIES[family]["pipeline"]):
        CoDiPipeline.from_exported(str(out), str(teacher))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", ["separate", "merge"])
def test_lora_of_the_transformer_loads_in_the_stock_pipeline(family, layout, mean_posterior,
                                                             request, tmp_path):  # fmt: skip
    """PE-CoDi with a LoRA of the frozen transformer: exported to ``lora/`` (loaded with
    the stock pipeline's ``load_lora_weights``, as the card's snippet does) or merged into
    ``transformer/``; either way the stock pipeline with the deterministic scheduler
    reproduces the module's sampler, and without the LoRA it does not."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = FAMILIES[family]
    teacher = request.getfixturevalue(f"tiny_{family}_teacher")
    m = _checkpoint(teacher, tmp_path / "lora.ckpt", lora_rank=2, **spec["kw"])
    out = export_checkpoint(str(tmp_path / "lora.ckpt"), str(tmp_path / "export"), lora=layout)
    names = sorted(p.name for p in out.iterdir())
    assert ("lora" in names) == (layout == "separate")
    assert ("transformer" in names) == (layout == "merge")
    card = (out / "README.md").read_text()
    assert ('pipe.load_lora_weights(f"{folder}/lora")' in card) == (layout == "separate")
    controlnet = getattr(diffusers, spec["adapter"]).from_pretrained(out, subfolder="controlnet")
    network = getattr(diffusers, spec["network"])
    transformer = {}
    if layout == "merge":
        transformer = {"transformer": network.from_pretrained(out, subfolder="transformer")}
    pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(
        str(teacher), controlnet=controlnet, **transformer
    )
    plain = getattr(diffusers, spec["pipeline"]).from_pretrained(
        str(teacher), controlnet=controlnet
    )
    if layout == "separate":
        pipe.load_lora_weights(f"{out}/lora")  # as the card's snippet
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cond = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    ts = [int(t) for t in sampling_timesteps(2, 1000, 20)]
    images = []
    for p in (pipe, plain):
        p.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            out, subfolder="scheduler_deterministic"
        )
        p.set_progress_bar_config(disable=True)
        images.append(p(
            "a red circle", control_image=Image.fromarray(rgb), sigmas=m.schedule.unshifted(ts),
            guidance_scale=spec["guidance"], height=32, width=32,
            max_sequence_length=_text_length(m), output_type="pt",
            generator=torch.Generator().manual_seed(2), **spec["call"],
        ).images)  # fmt: skip
    with torch.no_grad():
        model = m.denoiser("target", m.encode_text(["a red circle"]), m.adapter_condition(cond))
        noise = randn(_latent_shape(m), torch.Generator().manual_seed(2))
        ours = m.decode_latents(m.run_sampler(model, noise, 2))
    torch.testing.assert_close(ours, images[0], rtol=0, atol=2e-4)
    assert (ours - images[1]).abs().max() > 1e-3  # the LoRA is what matches
