"""Flux teachers (rectified-flow diffusion transformers on 2x2-packed latents with a
guidance embedding): loading by model type, packing and the text side against the stock
pipeline, the FluxControlNetModel adapter fed the condition as packed VAE latents, the
size-dependent schedule, training and sampling through the same module, and the CLI."""

import math

import pytest
import torch
from helpers import check_adapter_reads_the_condition, check_step_and_sampling, make_batch

from codi_lightning.diffusion import FlowSchedule
from codi_lightning.models import load_teacher
from codi_lightning.models.teachers import flux
from codi_lightning.testing.tiny import TINY_SD3_JOINT_DIM, TINY_SD3_T5_LENGTH
from codi_lightning.training import CoDiDistillation


@pytest.fixture(scope="module")
def flux_module(tiny_flux_teacher):
    return CoDiDistillation(str(tiny_flux_teacher), num_grid=10, shift_resolution=32)


def test_the_folder_loads_as_flux_here_and_in_stock_diffusers(tiny_flux_teacher, flux_module):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    parts = load_teacher(str(tiny_flux_teacher))
    assert parts.family == "flux" and type(parts.network).__name__ == "FluxTransformer2DModel"
    assert parts.shift_factor == pytest.approx(0.1159)
    assert parts.scaling_factor == pytest.approx(0.3611)
    FluxPipeline.from_pretrained(str(tiny_flux_teacher))
    # 32 px, VAE factor 4, 2x2 packing: 16 image tokens, the shift the pipeline uses there
    schedule = flux_module.schedule
    assert isinstance(schedule, FlowSchedule)
    assert schedule.shift == pytest.approx(math.exp(calculate_shift(16)))


def test_packing_and_positions_are_the_stock_pipelines():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 6, 10)
    tokens = flux.pack(z)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(z, 2, 16, 6, 10), rtol=0, atol=0)
    assert torch.equal(flux.unpack(tokens, 6, 10), z)
    stock_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(flux.image_ids(6, 10), stock_ids)
    with pytest.raises(ValueError, match="must be even"):
        flux.pack(torch.zeros(1, 16, 5, 4))


def test_the_text_side_matches_the_stock_pipeline(tiny_flux_teacher):
    """T5's sequence, CLIP-L's pooled output, and the embedded guidance scale."""
    from diffusers import FluxPipeline

    parts = load_teacher(str(tiny_flux_teacher))
    y = parts.prompt_encoder.encode(["a red circle", ""], "cpu")
    assert y.hidden_states.shape == (2, TINY_SD3_T5_LENGTH, TINY_SD3_JOINT_DIM)
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_teacher))
    for row, prompt in enumerate(["a red circle", ""]):
        seq, pooled, _ = pipe.encode_prompt(prompt, None, device="cpu",
                                            max_sequence_length=TINY_SD3_T5_LENGTH)  # fmt: skip
        torch.testing.assert_close(y.hidden_states[row : row + 1], seq)
        torch.testing.assert_close(y.added["pooled_projections"][row : row + 1], pooled)
    assert y.added["guidance"].tolist() == [3.5, 3.5]  # FluxPipeline's default scale


def test_the_adapter_is_from_transformer_with_the_teachers_widths(tiny_flux_teacher, flux_module):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    stock = FluxTransformer2DModel.from_pretrained(str(tiny_flux_teacher), subfolder="transformer")
    reference = FluxControlNetModel.from_transformer(
        stock, num_layers=1, num_single_layers=0, attention_head_dim=8, num_attention_heads=2
    )
    ours = flux_module.controlnet.state_dict()
    assert set(ours) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_adapted_model_starts_as_the_teacher_and_reads_the_condition(flux_module):
    m = flux_module
    batch = make_batch()
    text = m.batch_conditioning(batch)
    cond = m.adapter_condition(batch["cond"])
    with torch.no_grad():
        dist = m.vae.encode(batch["cond"] * 2 - 1).latent_dist
    torch.testing.assert_close(cond, (dist.mean - 0.1159) * 0.3611)
    z, t = torch.randn(2, 16, 8, 8), torch.tensor([999, 499])
    teacher = m.denoiser("teacher", text, cond)(z, t)
    assert teacher.shape == z.shape
    torch.testing.assert_close(m.denoiser("online", text, cond)(z, t), teacher)
    # the network is fed sigma_t (Flux's transformers scale it by 1000 themselves) and
    # the guidance scale
    seen = []
    hook = m.network.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw),
                                            with_kwargs=True)  # fmt: skip
    m.denoiser("teacher", text, cond)(z, t)
    hook.remove()
    torch.testing.assert_close(seen[0]["timestep"], m.schedule.sigmas[t].float())
    assert seen[0]["guidance"].tolist() == [3.5, 3.5]
    check_adapter_reads_the_condition(m, batch, text, cond, z, t, teacher)


@pytest.mark.parametrize("method", ["pe-codi", "codi"])
def test_one_training_step_and_sampling_on_flux(tiny_flux_teacher, method):
    m = CoDiDistillation(str(tiny_flux_teacher), method=method, num_grid=10, shift_resolution=32)
    check_step_and_sampling(m)


def test_flux_config_fit_validate_test_predict(tmp_path, tiny_flux_teacher, tiny_shards):
    """configs/tiny_flux_cpu.yaml through the CLI: the resolution comes from the data
    (the schedule's shift depends on it) and is recorded in the checkpoint; fit (with
    validation), test, predict and export run."""
    from helpers import predict_and_export, write_cli_config

    from codi_lightning.checkpoints import read_checkpoint
    from codi_lightning.cli import main

    config, out = write_cli_config(tmp_path, "tiny_flux_cpu.yaml", tiny_flux_teacher, tiny_shards)
    main(["fit", "--config", str(config)])
    assert list(out.rglob("samples/*.png"))  # the validation grid
    last = str(out / "ckpt" / "last.ckpt")
    assert read_checkpoint(last)["hyper_parameters"]["shift_resolution"] == 32
    restored = CoDiDistillation.load_from_checkpoint(last)
    assert restored.schedule.shift == pytest.approx(math.exp(0.5 + 0.65 * (16 - 256) / 3840))
    main(["test", "--config", str(config), "--ckpt_path", last, "--model.test_steps", "[1, 2]"])
    # a module built for another resolution takes the shift the checkpoint was trained
    # at when it loads it (the CLI merges a checkpoint file's hparams itself; a sharded
    # checkpoint folder's are not merged)
    other = CoDiDistillation(str(tiny_flux_teacher), num_grid=10, shift_resolution=64)
    assert other.schedule.shift != pytest.approx(restored.schedule.shift)
    other.on_load_checkpoint(read_checkpoint(last))
    assert other.schedule.shift == pytest.approx(restored.schedule.shift)
    assert other.hparams["shift_resolution"] == 32
    # predict, export, and the model card's snippet runs as written on the exported folder
    card = predict_and_export(config, last, tmp_path)
    assert "FluxControlNetPipeline" in card and "height=32, width=32" in card


def _guidance_inputs(m, run):
    """(batch size, guidance input) of every transformer call made by ``run()``."""
    seen = []
    hooks = [
        net.register_forward_pre_hook(
            lambda mod, args, kw: seen.append((len(kw["hidden_states"]), kw["guidance"].tolist())),
            with_kwargs=True,
        )
        for net in (m.network, m.student_network, m.target["network"]) if net is not None
    ]  # fmt: skip
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_guidance_is_fed_to_the_guidance_input_in_one_pass(tiny_flux_teacher):
    """FLUX.1-dev is guidance-distilled: guidance-aware distillation feeds w to its
    guidance input (online and target; the ODE step keeps the default 3.5), and sampling
    with a guidance scale does too, in one pass (no doubled batch, no empty prompt)."""
    m = CoDiDistillation(str(tiny_flux_teacher), method="codi", num_grid=10, cfg_aware=True,
                         guidance_range=(2, 3), shift_resolution=32)  # fmt: skip
    batch = make_batch()
    calls = _guidance_inputs(m, lambda: m.compute_loss(batch, torch.Generator().manual_seed(0)))
    assert calls and all(b == 2 for b, _ in calls)  # one pass each
    assert sorted({g[0] for _, g in calls}) == [2.0, 3.5]  # w = 2; the ODE step 3.5
    with torch.no_grad():
        calls = _guidance_inputs(
            m, lambda: m.sample_images(batch["cond"], ["a", ""], 1, guidance_scale=4.5)
        )
    assert calls == [(2, [4.5, 4.5])]
