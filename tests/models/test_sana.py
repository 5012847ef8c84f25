"""SANA teachers (linear-attention flow transformers with a Gemma 2 text encoder and the
DC-AE autoencoder): loading by model type, the text side against the stock pipeline, the
SanaControlNetModel adapter fed the condition as DC-AE latents, training and sampling
through the same module, and the CLI."""

import json

import pytest
import torch
from helpers import check_adapter_reads_the_condition, check_step_and_sampling, make_batch

from codi_lightning.diffusion import FlowSchedule
from codi_lightning.models import load_teacher
from codi_lightning.testing.tiny import TINY_SANA_TEXT_DIM
from codi_lightning.training import CoDiDistillation


@pytest.fixture(scope="module")
def sana_module(tiny_sana_teacher):
    return CoDiDistillation(str(tiny_sana_teacher), num_grid=10)


def test_the_folder_loads_as_sana_here_and_in_stock_diffusers(tiny_sana_teacher, sana_module):
    """model_index.json (SanaPipeline) alone picks the family; the DC-AE VAE and its 8x
    downsampling; the shipped DPM-Solver flow scheduler is read as the flow schedule of
    its flow_shift."""
    from diffusers import AutoencoderDC, SanaPipeline

    parts = load_teacher(str(tiny_sana_teacher))
    assert parts.family == "sana" and type(parts.network).__name__ == "SanaTransformer2DModel"
    assert isinstance(parts.vae, AutoencoderDC) and parts.vae_scale == 8
    assert parts.scaling_factor == pytest.approx(0.41407) and parts.shift_factor == 0.0
    assert isinstance(sana_module.schedule, FlowSchedule) and sana_module.schedule.shift == 3.0
    pipe = SanaPipeline.from_pretrained(str(tiny_sana_teacher))
    assert pipe.vae_scale_factor == parts.vae_scale


def test_the_text_side_matches_the_stock_pipeline(tiny_sana_teacher):
    """Gemma's states of the instruction and the prompt, the first token and the last
    L - 1 kept, with their attention mask: the stock pipeline's encode_prompt given its
    own default instruction (what its __call__ passes)."""
    from diffusers import SanaPipeline

    from codi_lightning.models.teachers.sana import default_instruction

    parts = load_teacher(str(tiny_sana_teacher))
    encoder = parts.prompt_encoder
    assert encoder.length == 300 and encoder.instruction  # the pipelines' defaults
    y = encoder.encode(["A Red Circle ", ""], "cpu")
    assert y.hidden_states.shape == (2, 300, TINY_SANA_TEXT_DIM)
    pipe = SanaPipeline.from_pretrained(str(tiny_sana_teacher))
    for row, prompt in enumerate(["A Red Circle ", ""]):
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device="cpu",
            complex_human_instruction=default_instruction(),
        )  # fmt: skip
        torch.testing.assert_close(y.hidden_states[row : row + 1], embeds)
        assert torch.equal(y.added["encoder_attention_mask"][row : row + 1], mask)
    assert y.added["encoder_attention_mask"][1].sum() < y.added["encoder_attention_mask"][0].sum()


def test_the_adapter_copies_the_transformer(tiny_sana_teacher, sana_module):
    """The adapter's embeddings and blocks are the transformer's (its first blocks); its
    condition projection and output projections start at zero."""
    from diffusers import SanaTransformer2DModel

    stock = SanaTransformer2DModel.from_pretrained(str(tiny_sana_teacher), subfolder="transformer")
    teacher = stock.state_dict()
    ours = sana_module.controlnet.state_dict()
    assert sana_module.controlnet.config.num_layers == 1  # half of 2 blocks
    copied = [k for k in ours if not k.startswith(("input_block", "controlnet_blocks"))]
    assert any(k.startswith("transformer_blocks.0.") for k in copied)
    for key in copied:
        assert torch.equal(ours[key], teacher[key]), key
    for key in set(ours) - set(copied):
        assert not ours[key].any(), key


def test_adapted_model_starts_as_the_teacher_and_reads_the_condition(sana_module):
    m = sana_module
    batch = make_batch()
    text = m.batch_conditioning(batch)
    cond = m.adapter_condition(batch["cond"])
    with torch.no_grad():  # DC-AE latents times the scaling factor, as the stock pipeline
        latent = m.vae.encode(batch["cond"] * 2 - 1).latent
    torch.testing.assert_close(cond, latent * 0.41407)
    z, t = torch.randn(2, 8, 4, 4), torch.tensor([999, 499])
    teacher = m.denoiser("teacher", text, cond)(z, t)
    torch.testing.assert_close(m.denoiser("online", text, cond)(z, t), teacher)
    seen = []  # the transformer is fed 1000 sigma_t and the text's attention mask
    hook = m.network.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw), with_kwargs=True
    )
    m.denoiser("teacher", text, cond)(z, t)
    hook.remove()
    torch.testing.assert_close(seen[0]["timestep"], (m.schedule.sigmas[t] * 1000).float())
    assert torch.equal(seen[0]["encoder_attention_mask"], text.added["encoder_attention_mask"])
    check_adapter_reads_the_condition(m, batch, text, cond, z, t, teacher)


def test_the_mask_keeps_padding_out_of_the_text(sana_module):
    """The padding tokens the mask drops do not reach the output: other values there
    change nothing; without the mask they would."""
    m = sana_module
    batch = make_batch()
    text = m.batch_conditioning(batch)
    cond = m.adapter_condition(batch["cond"])
    z, t = torch.randn(2, 8, 4, 4), torch.tensor([700, 300])
    mask = text.added["encoder_attention_mask"]
    noisy = text.hidden_states + 5.0 * (1 - mask.unsqueeze(-1).to(text.hidden_states.dtype))
    moved = type(text)(noisy, dict(text.added))
    with torch.no_grad():
        a = m.denoiser("teacher", text, cond)(z, t)
        b = m.denoiser("teacher", moved, cond)(z, t)
        full = dict(text.added, encoder_attention_mask=torch.ones_like(mask))
        c = m.denoiser("teacher", type(text)(noisy, full), cond)(z, t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("method", ["pe-codi", "codi"])
def test_one_training_step_and_sampling_on_sana(tiny_sana_teacher, method):
    m = CoDiDistillation(str(tiny_sana_teacher), method=method, num_grid=10)
    check_step_and_sampling(m, guidance_scale=2.0)


def test_a_lora_covers_attention_and_the_feed_forward(tiny_sana_teacher):
    m = CoDiDistillation(str(tiny_sana_teacher), lora_rank=2, num_grid=10)
    names = {n.rsplit(".", 1)[0] for n, _ in m.network.named_parameters() if "lora" in n}
    for kind in ("attn1.to_q", "attn2.to_k", "ff.conv_inverted", "ff.conv_point"):
        assert any(kind in n for n in names), kind
    assert not any("conv_depth" in n for n in names)


def test_sana_config_fit_validate_test_predict(tmp_path, tiny_sana_teacher, tiny_shards):
    """configs/tiny_sana_cpu.yaml through the CLI: fit (with validation), validate, test,
    predict and export, and the model card's snippet run as written."""
    from helpers import predict_and_export, write_cli_config

    from codi_lightning.cli import main

    config, out = write_cli_config(tmp_path, "tiny_sana_cpu.yaml", tiny_sana_teacher, tiny_shards)
    main(["fit", "--config", str(config)])
    assert list(out.rglob("samples/*.png"))  # the validation grid
    last = str(out / "ckpt" / "last.ckpt")
    main(["validate", "--config", str(config), "--ckpt_path", last])
    main(["test", "--config", str(config), "--ckpt_path", last, "--model.test_steps", "[1, 2]"])
    payload = json.loads(next(out.rglob("metrics.json")).read_text())
    assert payload["results"]["2"]["images"] == 10
    card = predict_and_export(config, last, tmp_path)
    assert "SanaControlNetPipeline" in card and "use_resolution_binning=False" in card


def test_random_condition_init_keeps_the_teacher_at_step_zero(tiny_sana_teacher):
    m = CoDiDistillation(str(tiny_sana_teacher), adapter_condition_init="random", num_grid=10)
    assert m.controlnet.input_block.weight.abs().sum() > 0
    batch = make_batch()
    text, cond = m.batch_conditioning(batch), m.adapter_condition(batch["cond"])
    z, t = torch.randn(2, 8, 4, 4), torch.tensor([999, 499])
    with torch.no_grad():
        torch.testing.assert_close(
            m.denoiser("online", text, cond)(z, t), m.denoiser("teacher", text, cond)(z, t)
        )


@pytest.mark.parametrize("tile", [2, 3, 4])
def test_dc_ae_tiles_keep_the_latent_and_image_sizes(sana_module, tile):
    """In DC-AE tiles (large outputs) the latent of a 24 x 48 image is still 3 x 6 and its
    decode 24 x 48 again: the tiles' strides are whole latents (values differ from the
    untiled pass near the tiles' borders, as in any tiled VAE)."""
    from codi_lightning.diffusion.tiling import TileGrid
    from codi_lightning.models import vae_tiles

    vae = sana_module.vae
    x = torch.rand(1, 3, 24, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).latent
        with vae_tiles(vae, TileGrid(3, 6, tile, 1), 8):
            tiled = vae.encode(x).latent
            image = vae.decode(tiled).sample
    assert tiled.shape == whole.shape == (1, 8, 3, 6) and image.shape == x.shape


def test_sana_1_5_and_sprint_transformers_are_refused_naming_why():
    """QK norm (SANA 1.5) or a guidance embedding (SANA-Sprint): SanaControlNetModel's
    blocks have neither, so the adapter could not copy the transformer's blocks."""
    from diffusers import SanaTransformer2DModel

    from codi_lightning.models.teachers import sana
    from codi_lightning.testing.tiny import tiny_sana_transformer_config

    for extra in ({"qk_norm": "rms_norm_across_heads"}, {"guidance_embeds": True}):
        network = SanaTransformer2DModel(**tiny_sana_transformer_config(), **extra)
        with pytest.raises(ValueError, match="SANA 1.0 teacher"):
            sana.build_adapter(network, 1)
    sana.build_adapter(SanaTransformer2DModel(**tiny_sana_transformer_config()), 1)
