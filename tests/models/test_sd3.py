"""SD3-family teachers (rectified-flow diffusion transformers): loading by model type, the
text side against the stock pipeline, the SD3ControlNetModel adapter fed the condition as
VAE latents, training and sampling through the same module, and the CLI."""

import json

import pytest
import torch
from helpers import check_adapter_reads_the_condition, check_step_and_sampling, make_batch

from codi_lightning.diffusion import FlowSchedule
from codi_lightning.models import load_teacher
from codi_lightning.testing.tiny import TINY_SD3_JOINT_DIM, TINY_SD3_T5_LENGTH
from codi_lightning.training import CoDiDistillation


@pytest.fixture(scope="module")
def tiny_sd3(tiny_sd3_teacher):
    return tiny_sd3_teacher


@pytest.fixture(scope="module")
def sd3_module(tiny_sd3):
    return CoDiDistillation(str(tiny_sd3), num_grid=10)


def test_the_folder_loads_as_sd3_here_and_in_stock_diffusers(tiny_sd3, sd3_module):
    from diffusers import StableDiffusion3Pipeline

    parts = load_teacher(str(tiny_sd3))
    assert parts.family == "sd3" and type(parts.network).__name__ == "SD3Transformer2DModel"
    assert parts.shift_factor == pytest.approx(0.0609)
    assert parts.scaling_factor == pytest.approx(1.5305)
    assert isinstance(sd3_module.schedule, FlowSchedule) and sd3_module.schedule.shift == 3.0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    assert pipe.text_encoder_3 is not None


def test_the_text_side_matches_the_stock_pipeline(tiny_sd3):
    """CLIP-L | CLIP-G penultimate states padded to the T5 width, then T5's states on the
    sequence axis; pooled = both projections; the empty prompt encoded as text."""
    from diffusers import StableDiffusion3Pipeline

    parts = load_teacher(str(tiny_sd3))
    y = parts.prompt_encoder.encode(["a red circle", ""], "cpu")
    assert y.hidden_states.shape == (2, 77 + TINY_SD3_T5_LENGTH, TINY_SD3_JOINT_DIM)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    seq, neg, pooled, neg_pooled = pipe.encode_prompt(
        "a red circle", None, None, device="cpu", max_sequence_length=TINY_SD3_T5_LENGTH
    )
    torch.testing.assert_close(y.hidden_states[:1], seq)
    torch.testing.assert_close(y.added["pooled_projections"][:1], pooled)
    torch.testing.assert_close(y.hidden_states[1:], neg)  # the pipeline's negative ""
    torch.testing.assert_close(y.added["pooled_projections"][1:], neg_pooled)


def test_a_folder_written_without_t5_loads_without_it_here_and_in_stock_diffusers(tmp_path):
    """``save_sd3_folder`` with no T5 (SD3 allows it): the index names none, and our
    loader encodes as the stock pipeline loaded without T5 does (zeros in its place)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from codi_lightning.testing.tiny import (
        SD3_SCHEDULER,
        build_tiny_sd3_text_side,
        save_sd3_folder,
        tiny_sd3_transformer_config,
    )

    tokenizers, encoders = build_tiny_sd3_text_side()
    pixels = {**tiny_sd3_transformer_config(), "in_channels": 3, "out_channels": 3}
    transformer = SD3Transformer2DModel(**pixels)
    folder = save_sd3_folder(tmp_path / "no_t5", transformer, (*encoders[:2], None),
                             (*tokenizers[:2], None), SD3_SCHEDULER)  # fmt: skip
    index = StableDiffusion3Pipeline.load_config(str(folder))
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    y = load_teacher(str(folder), pixel_space=True).prompt_encoder.encode(["a 7"], "cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(  # as users load SD3 without T5
        str(folder), vae=None, text_encoder_3=None, tokenizer_3=None
    )
    seq, _, pooled, _ = pipe.encode_prompt("a 7", None, None, device="cpu",
                                           do_classifier_free_guidance=False)  # fmt: skip
    assert seq.shape[1] == 77 + 256  # the pipeline's default T5 length, zeros
    torch.testing.assert_close(y.hidden_states, seq)
    torch.testing.assert_close(y.added["pooled_projections"], pooled)


def test_the_adapter_is_from_transformer_without_touching_the_teacher(tiny_sd3, sd3_module):
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    stock = SD3Transformer2DModel.from_pretrained(str(tiny_sd3), subfolder="transformer")
    reference = SD3ControlNetModel.from_transformer(stock, num_layers=1,
                                                    num_extra_conditioning_channels=0)  # fmt: skip
    ours = sd3_module.controlnet.state_dict()
    assert set(ours) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert sd3_module.controlnet.config.force_zeros_for_pooled_projection is False
    # the teacher's own config keeps its depth (from_transformer writes into it)
    assert sd3_module.network.config["num_layers"] == 2
    assert "extra_conditioning_channels" not in sd3_module.network.config


def test_adapted_model_starts_as_the_teacher_and_reads_the_condition(sd3_module):
    m = sd3_module
    batch = make_batch()
    text = m.batch_conditioning(batch)
    cond = m.adapter_condition(batch["cond"])
    with torch.no_grad():
        dist = m.vae.encode(batch["cond"] * 2 - 1).latent_dist
    torch.testing.assert_close(cond, (dist.mean - 0.0609) * 1.5305)
    z, t = torch.randn(2, 16, 8, 8), torch.tensor([999, 499])
    teacher = m.denoiser("teacher", text, cond)(z, t)
    online = m.denoiser("online", text, cond)(z, t)
    torch.testing.assert_close(online, teacher)  # zero-initialised adapter outputs
    # the network is fed 1000 sigma_t, not t
    seen = []
    hook = m.network.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["timestep"]), with_kwargs=True
    )
    m.denoiser("teacher", text, cond)(z, t)
    hook.remove()
    torch.testing.assert_close(seen[0], (m.schedule.sigmas[t] * 1000).float())
    check_adapter_reads_the_condition(m, batch, text, cond, z, t, teacher)


@pytest.mark.parametrize("method", ["pe-codi", "codi"])
def test_one_training_step_and_sampling_on_sd3(tiny_sd3, method):
    m = CoDiDistillation(str(tiny_sd3), method=method, num_grid=10)
    check_step_and_sampling(m, guidance_scale=2.0)


def test_options_of_the_other_family_are_refused(tiny_sd3, tiny_teacher):
    with pytest.raises(ValueError, match="adapter_cond_channels applies to UNet"):
        CoDiDistillation(str(tiny_sd3), adapter_cond_channels=(16, 32, 64))
    with pytest.raises(ValueError, match="adapter_layers applies to transformer"):
        CoDiDistillation(str(tiny_teacher), adapter_layers=1)
    with pytest.raises(ValueError, match="has 2 blocks"):
        CoDiDistillation(str(tiny_sd3), adapter_layers=3)


def test_sd3_config_fit_validate_test_predict(tmp_path, tiny_sd3, tiny_shards):
    """configs/tiny_sd3_cpu.yaml through the CLI: the teacher is told apart by its
    model_index.json alone; fit (with validation), validate, test, predict and export run
    on it."""
    from helpers import predict_and_export, write_cli_config

    from codi_lightning.cli import main

    config, out = write_cli_config(tmp_path, "tiny_sd3_cpu.yaml", tiny_sd3, tiny_shards)
    main(["fit", "--config", str(config)])
    assert list(out.rglob("samples/*.png"))  # the validation grid
    last = str(out / "ckpt" / "last.ckpt")
    main(["validate", "--config", str(config), "--ckpt_path", last])
    main(["test", "--config", str(config), "--ckpt_path", last, "--model.test_steps", "[1, 2]"])
    payload = json.loads(next(out.rglob("metrics.json")).read_text())
    assert payload["results"]["2"]["images"] == 10
    # predict, export, and the model card's snippet runs as written on the exported folder
    predict_and_export(config, last, tmp_path)


def test_the_two_stage_baseline_on_sd3_regresses_velocity_and_samples_with_euler(tiny_sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from codi_lightning.training import ControlNetBaseline

    m = ControlNetBaseline(str(tiny_sd3))
    loss, _ = m.compute_loss(make_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert any(p.grad is not None for p in m.controlnet.parameters())

    def velocity(z, t):  # a stand-in network of the integer timestep
        return 0.9 * z - 0.1 + t.view(-1, 1, 1, 1) / 4000

    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = m.run_sampler(velocity, noise, 4)
    # reference: the stock Euler scheduler at the "trailing" steps 999, 749, 499, 249
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(sigmas=[(t + 1) / 1000 for t in (999, 749, 499, 249)])
    z = noise.clone()
    for step, t in zip(stock.timesteps, (999, 749, 499, 249), strict=True):
        z = stock.step(velocity(z, torch.full((2,), t)), step, z).prev_sample
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def test_guidance_on_sd3_is_two_branches_in_one_pass(sd3_module):
    """The guided denoiser (guidance-aware distillation and guided sampling) equals
    uncond + w (cond - uncond) from two separate calls; the unconditional branch is the
    empty prompt's text and pooled projection with the same condition latents."""
    m = sd3_module
    batch = make_batch()
    text = m.batch_conditioning(batch)
    cond = m.adapter_condition(batch["cond"])
    z, t = torch.randn(2, 16, 8, 8), torch.tensor([899, 299])
    with torch.no_grad():
        guided = m.denoiser("teacher", text, cond, guidance=3.0)(z, t)
        c = m.denoiser("teacher", text, cond)(z, t)
        u = m.denoiser("teacher", m.empty_text(2), cond)(z, t)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c, u)  # the text reaches the transformer


def test_cfg_aware_step_and_activation_checkpointing_on_sd3(tiny_sd3):
    """A guidance-aware CoDi step; with activation checkpointing on the transformer copy and
    the adapter the loss and the gradients are those without it."""
    grads = []
    for checkpointing in (False, True):
        m = CoDiDistillation(str(tiny_sd3), method="codi", num_grid=10, cfg_aware=True,
                             gradient_checkpointing=checkpointing)  # fmt: skip
        m.configure_model()
        assert m.student_network.gradient_checkpointing == checkpointing
        assert m.controlnet.gradient_checkpointing == checkpointing
        loss, _ = m.compute_loss(make_batch(), torch.Generator().manual_seed(0))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.controlnet.parameters()
                                      if p.grad is not None]))  # fmt: skip
    (loss_a, grad_a), (loss_b, grad_b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    assert len(grad_a) == len(grad_b) > 0
    for a, b in zip(grad_a, grad_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_random_condition_init_keeps_the_teacher_at_step_zero(tiny_sd3):
    m = CoDiDistillation(str(tiny_sd3), adapter_condition_init="random", num_grid=10)
    assert m.controlnet.pos_embed_input.proj.weight.abs().sum() > 0
    batch = make_batch()
    text, cond = m.batch_conditioning(batch), m.adapter_condition(batch["cond"])
    z, t = torch.randn(2, 16, 8, 8), torch.tensor([999, 499])
    with torch.no_grad():
        torch.testing.assert_close(
            m.denoiser("online", text, cond)(z, t), m.denoiser("teacher", text, cond)(z, t)
        )
