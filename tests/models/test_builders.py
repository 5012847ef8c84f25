import json

import pytest
import torch
from helpers import stored_in_bf16

from codi_lightning.models import (
    adapter_cond_channels,
    build_adapter,
    check_condition_downsampling,
    check_resolution,
    load_teacher,
)
from codi_lightning.testing.tiny import build_tiny_tokenizer


def test_tiny_folder_is_a_diffusers_folder(tiny_teacher):
    index = json.loads((tiny_teacher / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_teacher / sub).is_dir(), sub
    parts = load_teacher(str(tiny_teacher))
    assert parts.vae is not None and parts.vae_scale == 4
    assert parts.scheduler_config["prediction_type"] == "epsilon"
    assert all(not p.requires_grad for p in parts.network.parameters())
    assert not parts.network.training


def test_pixel_space_teacher_has_no_vae(tiny_pixel_teacher):
    parts = load_teacher(str(tiny_pixel_teacher), pixel_space=True)
    assert parts.vae is None and parts.vae_scale == 1 and parts.scaling_factor == 1.0
    assert parts.network.config.in_channels == 3
    assert parts.scheduler_config["prediction_type"] == "v_prediction"


def test_tokenizer_round_trips_offline(tiny_teacher):
    fresh = build_tiny_tokenizer()
    loaded = load_teacher(str(tiny_teacher)).tokenizer
    text = "a red circle"
    ids = loaded(text).input_ids
    assert ids == fresh(text).input_ids
    eos = loaded.eos_token_id
    assert len(set(ids[1:-1])) > 3 and eos not in ids[1:-1]  # a real vocabulary, not all EOS
    assert loaded.decode(ids, skip_special_tokens=True) == text


def test_missing_teacher_names_the_fix(tmp_path):
    with pytest.raises(OSError, match="local diffusers folder"):
        load_teacher(str(tmp_path / "nope"))


@pytest.mark.parametrize("condition_init", ["zero", "random"])
def test_adapter_starts_as_the_teacher(tiny_teacher, condition_init):
    """Zero output convolutions: at step 0 the adapted UNet equals the pretrained one,
    whichever way the condition embedder starts."""
    parts = load_teacher(str(tiny_teacher))
    adapter = build_adapter(parts.network, parts.vae_scale, condition_init=condition_init)
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    text = torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 32, 32)
    down, mid = adapter(z, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    with torch.no_grad():
        plain = parts.network(z, t, encoder_hidden_states=text).sample
        adapted = parts.network(
            z, t, encoder_hidden_states=text,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample  # fmt: skip
    torch.testing.assert_close(adapted, plain)


def _zero_conv_grad(adapter, unet, cond):
    """Gradient of the first output zero convolution for a fixed z_t and this condition."""
    adapter.zero_grad()
    gen = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([500, 500])
    down, mid = adapter(z, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    out = unet(
        z, t, encoder_hidden_states=text,
        down_block_additional_residuals=down, mid_block_additional_residual=mid,
    ).sample  # fmt: skip
    out.square().mean().backward()
    return adapter.controlnet_down_blocks[0].weight.grad.clone()


def test_random_condition_init_lets_the_condition_reach_the_first_gradient(tiny_teacher):
    """With the reference zero init, the condition cannot influence the first update
    (two zero factors in a row); with ``random`` it does, and only its embedder differs."""
    parts = load_teacher(str(tiny_teacher))
    c1, c2 = torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)
    for init, differs in (("zero", False), ("random", True)):
        torch.manual_seed(0)
        adapter = build_adapter(parts.network, parts.vae_scale, condition_init=init)
        g1, g2 = (
            _zero_conv_grad(adapter, parts.network, c1),
            _zero_conv_grad(adapter, parts.network, c2),
        )
        assert g1.abs().sum() > 0
        assert (not torch.allclose(g1, g2)) is differs, init
        conv_out = adapter.controlnet_cond_embedding.conv_out.weight
        assert bool(conv_out.abs().sum() > 0) is differs, init


def test_unknown_condition_init_names_the_choices(tiny_teacher):
    parts = load_teacher(str(tiny_teacher))
    with pytest.raises(ValueError, match="'zero'.*'random'"):
        build_adapter(parts.network, parts.vae_scale, condition_init="gaussian")


@pytest.mark.parametrize(("scale", "levels"), [(1, 1), (2, 2), (4, 3), (8, 4), (16, 5)])
def test_adapter_channels_match_vae_factor(scale, levels):
    channels = adapter_cond_channels(scale)
    assert len(channels) == levels
    check_condition_downsampling(channels, scale)


def test_condition_downsampling_mismatch_says_what_to_change():
    with pytest.raises(ValueError, match=r"Give 3 entries"):
        check_condition_downsampling((16, 32, 96, 256), 4)


@pytest.mark.parametrize("teacher", ["tiny_teacher", "tiny_flux_teacher"])
def test_a_teacher_stored_in_bf16_loads_in_one_dtype(request, teacher, tmp_path):
    """transformers loads a text encoder in the dtype it was stored in, diffusers loads
    fp32: every part comes in the one dtype asked for (fp32 by default)."""
    folder = stored_in_bf16(request.getfixturevalue(teacher), tmp_path / "bf16")
    for dtype in (None, torch.bfloat16):
        parts = load_teacher(str(folder), torch_dtype=dtype)
        found = {p.dtype for m in (parts.network, parts.vae, parts.prompt_encoder)
                 for p in m.parameters()}  # fmt: skip
        assert found == {dtype or torch.float32}, (dtype, found)


def test_resolution_check(tiny_teacher):
    unet = load_teacher(str(tiny_teacher)).network
    check_resolution(32, 4, unet)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        check_resolution(36, 4, unet)


@pytest.mark.parametrize("teacher", ["tiny_teacher", "tiny_sdxl_teacher", "tiny_sd3_teacher",
                                     "tiny_flux_teacher", "tiny_sana_teacher"])  # fmt: skip
def test_encoding_each_distinct_prompt_once_gives_every_rows_encoding(teacher, request):
    """``encode_distinct`` repeats the rows of repeated prompts: equal to encoding the
    whole batch, for every family's prompt encoder."""
    encoder = load_teacher(str(request.getfixturevalue(teacher))).prompt_encoder
    prompts = ["a red 7", "", "a red 7", "two", ""]
    full, distinct = encoder.encode(prompts, "cpu"), encoder.encode_distinct(prompts, "cpu")
    torch.testing.assert_close(distinct.hidden_states, full.hidden_states)
    assert distinct.added.keys() == full.added.keys()
    for key, value in full.added.items():
        torch.testing.assert_close(distinct.added[key], value)
