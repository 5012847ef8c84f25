"""Stable Diffusion 3 / 3.5: a flow-matching diffusion transformer (METHOD.md, "Other
teacher families"): three text encoders, a 16-channel VAE with shift and scale, and
``SD3ControlNetModel`` as the image-condition adapter, whose condition enters as VAE
latents (as the stock ``StableDiffusion3ControlNetPipeline`` encodes it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import Conditioning, PromptEncoder, tokenize
from ..lora import TRANSFORMER_LORA_TARGETS
from .base import FlowExport, TeacherFamily, patch_multiple, write_pipeline_folder
from .sd import build_tiny_tokenizer, tiny_text_config

T5_LENGTH = 256  # the T5 sequence length of the stock SD3 pipelines (max_sequence_length)


class SD3PromptEncoder(PromptEncoder):
    """y as the stock SD3 pipeline builds it: the two CLIP encoders' penultimate hidden
    states side by side [B, 77, D1 + D2], zero-padded on the feature axis to the T5 width
    and followed on the sequence axis by T5's last hidden states [B, L, D_T5] (zeros when
    the folder has no T5); ``added["pooled_projections"]``: both CLIP projections [B, P].

    Empty prompts are encoded as text (SD3 has no ``force_zeros_for_empty_prompt``)."""

    def __init__(
        self,
        text_encoders: Sequence[nn.Module | None],
        tokenizers: Sequence[Any],
        joint_dim: int,
        t5_length: int = T5_LENGTH,
    ) -> None:
        super().__init__()
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoders
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizers
        self.joint_dim, self.t5_length = joint_dim, t5_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str) -> Conditioning:
        prompts = list(prompts)
        sequences, pooled = [], []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            sequences.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(sequences, dim=-1)
        clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(len(prompts), self.t5_length, self.joint_dim)
        else:
            ids = self.tokenizer_3(
                prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids  # fmt: skip
            t5 = self.text_encoder_3(ids.to(device))[0].to(clip.dtype)
        hidden = torch.cat([clip, t5], dim=-2)
        return Conditioning(hidden, {"pooled_projections": torch.cat(pooled, dim=-1)})


# SD3's scheduler: rectified flow with sigmas shifted by 3 (FlowMatchEulerDiscreteScheduler)
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                 "shift": 3.0}  # fmt: skip
TINY_SD3_JOINT_DIM = 96  # T5 width = joint_attention_dim; the CLIP features (80) are padded to it
TINY_SD3_T5_LENGTH = 32  # T5 tokens (SD3 pipelines: 256)


TINY_CLIP_G_PROJECTION = 40  # the tiny CLIP-G stand-in's projection (pooled) width


def build_tiny_t5_tokenizer():
    """An offline T5 tokenizer: a unigram vocabulary of single characters (with and
    without the word-start mark), T5's pad / eos / unk ids 0 / 1 / 2."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in map(chr, range(ord("!"), ord("~") + 1)):  # printable ASCII
        vocab += [(ch, -3.0), ("\u2581" + ch, -3.5)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TINY_SD3_T5_LENGTH)


def build_tiny_sd3_text_encoders(tokenizer, tokenizer_2, tokenizer_3):
    """CLIP-L and CLIP-G stand-ins (CLIPTextModelWithProjection, widths 32 and 48,
    projections 32 and 40) and a one-layer T5 encoder of width ``TINY_SD3_JOINT_DIM``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    encoders = []
    for tok, width, proj in ((tokenizer, 32, 32), (tokenizer_2, 48, TINY_CLIP_G_PROJECTION)):
        config = {**tiny_text_config(len(tok)), "hidden_size": width,
                  "intermediate_size": 2 * width, "projection_dim": proj}  # fmt: skip
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**config)))
    t5 = T5Config(
        vocab_size=len(tokenizer_3), d_model=TINY_SD3_JOINT_DIM, d_kv=16, d_ff=128,
        num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return (*encoders, T5EncoderModel(t5))


def build_tiny_sd3_text_side(text_tokens: int | None = None):
    """The three tiny tokenizers and text encoders of :func:`write_tiny_sd3_teacher`;
    ``text_tokens``: every tokenizer's length (default: CLIP 77, T5
    ``TINY_SD3_T5_LENGTH``), which the loaders and stock pipelines read back."""
    tokenizers = build_tiny_tokenizer(), build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    if text_tokens is not None:
        for tokenizer in tokenizers:
            tokenizer.model_max_length = int(text_tokens)
    return tokenizers, build_tiny_sd3_text_encoders(*tokenizers)


def load_prompt_encoder(
    pretrained: str, index: Mapping[str, Any], kw: dict[str, Any], weights: dict[str, Any]
) -> SD3PromptEncoder:
    """``text_encoder/``, ``text_encoder_2/`` (CLIPTextModelWithProjection),
    ``text_encoder_3/`` (T5EncoderModel; may be absent, as SD3 allows) and the three
    tokenizers of a diffusers SD3 folder."""
    from diffusers import SD3Transformer2DModel
    from transformers import (
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
    )

    has_t5 = (index.get("text_encoder_3") or [None])[0] is not None
    encoders = [
        CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder=sub, **weights)
        for sub in ("text_encoder", "text_encoder_2")
    ]
    encoders.append(
        T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_3", **weights)
        if has_t5
        else None
    )
    tokenizers = [
        CLIPTokenizer.from_pretrained(pretrained, subfolder=sub, **kw)
        for sub in ("tokenizer", "tokenizer_2")
    ]
    tokenizers.append(
        AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_3", **kw) if has_t5 else None
    )
    joint = SD3Transformer2DModel.load_config(pretrained, subfolder="transformer", **kw)
    t5_length = min(T5_LENGTH, tokenizers[2].model_max_length) if has_t5 else T5_LENGTH
    return SD3PromptEncoder(encoders, tokenizers, int(joint["joint_attention_dim"]), t5_length)


def forward(
    transformer: nn.Module,
    adapter: nn.Module | None,
    z: Tensor,
    timestep: Tensor,
    text: Conditioning,
    cond: Tensor,
) -> Tensor:
    """The velocity of the transformer with the adapter's per-block residuals; ``cond``
    is the condition's latents, ``timestep`` the network's (``1000 sigma``)."""
    kw = {
        "encoder_hidden_states": text.hidden_states,
        "pooled_projections": text.added["pooled_projections"],
    }
    residuals = None
    if adapter is not None:
        residuals = adapter(z, controlnet_cond=cond, timestep=timestep, return_dict=False, **kw)[0]
    return transformer(
        hidden_states=z, timestep=timestep, block_controlnet_hidden_states=residuals,
        return_dict=False, **kw,
    )[0]  # fmt: skip


def adapter_config(transformer_config: Mapping[str, Any], num_layers: int | None) -> dict[str, Any]:
    """The ``SD3ControlNetModel`` config of the adapter for a transformer of
    ``transformer_config`` (:func:`adapter_layers` blocks): its own widths, no extra
    condition channels, and ``force_zeros_for_pooled_projection: false`` (see
    :func:`build_adapter`)."""
    layers = adapter_layers(transformer_config, num_layers)
    return {**transformer_config, "num_layers": layers, "extra_conditioning_channels": 0,
            "force_zeros_for_pooled_projection": False}  # fmt: skip


def adapter_layers(transformer_config: Mapping[str, Any], num_layers: int | None) -> int:
    """``num_layers`` (checked against the transformer's depth: its ``num_layers``
    blocks; Flux's double-stream blocks), or half its blocks, at least one."""
    depth = int(transformer_config["num_layers"])
    layers = num_layers or max(1, depth // 2)
    if not 1 <= layers <= depth:
        raise ValueError(
            f"model.adapter_layers={num_layers}: the transformer has {depth} blocks; "
            f"give 1..{depth}"
        )
    return layers


def build_adapter(transformer: nn.Module, num_layers: int | None = None) -> nn.Module:
    """An ``SD3ControlNetModel`` made as ``from_transformer`` makes it: the first
    ``num_layers`` joint blocks (default: half, at least one) copied from the transformer,
    a zero-initialised patch embedding of the condition latents and zero output
    projections, so the adapted model equals the teacher at step 0. Its config says ``force_zeros_for_pooled_projection:
    false``: the stock pipeline then feeds it the pooled text and shifts the condition
    latents by the VAE's ``shift_factor``, as training does."""
    from diffusers import SD3ControlNetModel

    # what SD3ControlNetModel.from_transformer does, without its side effect: it writes
    # num_layers into the transformer's own config dict (diffusers 0.42), which a save of
    # the teacher would then carry
    adapter = SD3ControlNetModel.from_config(adapter_config(transformer.config, num_layers))
    for name in ("pos_embed", "time_text_embed", "context_embedder"):
        getattr(adapter, name).load_state_dict(getattr(transformer, name).state_dict())
    # the first ``layers`` blocks (strict=False: the transformer has more)
    adapter.transformer_blocks.load_state_dict(
        transformer.transformer_blocks.state_dict(), strict=False
    )
    for p in adapter.pos_embed_input.parameters():
        nn.init.zeros_(p)
    return adapter


def block_classes() -> set[type[nn.Module]]:
    """FSDP1 units: the joint transformer block, the transformer and its ControlNet."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock

    return {JointTransformerBlock, SD3ControlNetModel, SD3Transformer2DModel}


def save_sd3_folder(
    folder: str | Path, transformer, text_encoders, tokenizers, scheduler_config, vae=None
) -> Path:
    """Write SD3-family parts in the diffusers SD3 layout (safetensors) with a
    ``model_index.json`` naming ``StableDiffusion3Pipeline``; no ``vae/`` for a
    pixel-space model (``load_teacher(..., pixel_space=True)`` reads it)."""
    parts = {"transformer": transformer, "vae": vae}
    for i, suffix in enumerate(("", "_2", "_3")):
        parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = (
            tokenizers[i], text_encoders[i],
        )  # fmt: skip
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **dict(scheduler_config)}
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"] if vae is not None else [None, None],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    for name, part in parts.items():  # e.g. no T5 (SD3 allows it)
        if part is None and name != "vae":
            index[name] = [None, None]
    return write_pipeline_folder(folder, parts, config, index)


def write_folder(
    folder: str | Path, transformer: nn.Module, prompt_encoder: SD3PromptEncoder,
    scheduler_config: dict[str, Any], vae: nn.Module | None = None,
) -> Path:  # fmt: skip
    """:func:`save_sd3_folder` of a transformer and its prompt encoder (the record's
    ``write_folder``)."""
    text = prompt_encoder
    encoders = (text.text_encoder, text.text_encoder_2, text.text_encoder_3)
    tokenizers = (text.tokenizer, text.tokenizer_2, text.tokenizer_3)
    return save_sd3_folder(folder, transformer, encoders, tokenizers, scheduler_config, vae)


def fresh(
    text_tokens: int | None, flow_shift: float, prediction_type: str
) -> tuple[SD3PromptEncoder, dict[str, Any]]:
    """A fresh pixel-space SD3-layout teacher's text side (the tiny offline CLIP-L /
    CLIP-G / T5 of :func:`build_tiny_sd3_text_side`; ``text_tokens``: every tokenizer's length, default
    CLIP 77 and T5 32) and its flow-matching scheduler with sigma shift ``flow_shift``
    (the velocity is its prediction; ``prediction_type`` is not used)."""
    tokenizers, encoders = build_tiny_sd3_text_side(text_tokens)
    length = text_tokens or TINY_SD3_T5_LENGTH
    encoder = SD3PromptEncoder(encoders, tokenizers, TINY_SD3_JOINT_DIM, length)
    return encoder, {**SD3_SCHEDULER, "shift": float(flow_shift)}


FAMILY = TeacherFamily(
    "sd3",
    load_prompt_encoder,
    forward,
    pipelines=("StableDiffusion3",),
    network=("transformer", "SD3Transformer2DModel"),
    latent_condition=True,
    lora_targets=TRANSFORMER_LORA_TARGETS,
    build_adapter=build_adapter,
    condition_embedding=lambda adapter: adapter.pos_embed_input.proj,
    network_multiple=patch_multiple,
    fsdp_block_lists=("transformer_blocks",),
    fsdp_blocks=(),
    fsdp_block_classes=block_classes,
    write_folder=write_folder,
    fresh=fresh,
    flow_export=FlowExport(
        "SD3 family",
        "SD3ControlNetModel",
        "SD3Transformer2DModel",
        "StableDiffusion3ControlNetPipeline",
        adapter_config,
        1.0,
        "tokenizer_3",
        T5_LENGTH,
        "StableDiffusion3Pipeline",
    ),  # fmt: skip
)
