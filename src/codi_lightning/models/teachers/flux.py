"""Flux.1: a rectified-flow diffusion transformer (METHOD.md, "Other teacher families")
that sees its latents as a sequence of 2x2 patches, with rotary positions for image and
text tokens, CLIP-L's pooled embedding and T5's sequence, and (Flux-dev) the guidance
scale as an input of its own instead of two passes of classifier-free guidance.
``FluxControlNetModel`` is its image-condition adapter; the condition enters as packed
VAE latents, as the stock ``FluxControlNetPipeline`` encodes it.

Its scheduler shifts the sigmas by the image size (``use_dynamic_shifting``): for a run
at one resolution the shift is fixed, ``exp(mu)`` with ``mu`` from the number of image
tokens (``diffusion.schedule.FlowSchedule.from_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Conditioning, PromptEncoder, tokenize
from ..lora import TRANSFORMER_LORA_TARGETS
from .base import FlowExport, TeacherFamily
from .sd3 import adapter_layers

T5_LENGTH = 512  # the T5 sequence length of the stock Flux pipelines (max_sequence_length)
GUIDANCE = 3.5  # the stock FluxPipeline's default guidance_scale (embedded, one pass)


class FluxPromptEncoder(PromptEncoder):
    """y as the stock Flux pipeline builds it: T5's last hidden states [B, L, D_T5];
    ``added["pooled_projections"]``: CLIP-L's pooled output [B, D]; and, for transformers
    with a guidance embedding (Flux-dev), ``added["guidance"]``: the embedded guidance
    scale [B] (``guidance``; None for Flux-schnell)."""

    def __init__(
        self,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        t5_length: int = T5_LENGTH,
        guidance: float | None = GUIDANCE,
    ) -> None:
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.t5_length, self.guidance = t5_length, guidance

    @torch.no_grad()
    def encode(self, prompts, device: torch.device | str) -> Conditioning:
        prompts = list(prompts)
        pooled = self.text_encoder(tokenize(self.tokenizer, prompts).to(device)).pooler_output
        ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=self.t5_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        hidden = self.text_encoder_2(ids.to(device))[0]
        added = {"pooled_projections": pooled.to(hidden.dtype)}
        if self.guidance is not None:
            added["guidance"] = torch.full((len(prompts),), float(self.guidance), device=device)
        return Conditioning(hidden, added)


def load_prompt_encoder(
    pretrained: str, index: Mapping[str, Any], kw: dict[str, Any], weights: dict[str, Any]
) -> FluxPromptEncoder:
    """``text_encoder/`` (CLIPTextModel), ``text_encoder_2/`` (T5EncoderModel) and their
    tokenizers of a diffusers Flux folder; the guidance input when the transformer's
    config has ``guidance_embeds``."""
    from diffusers import FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **weights)
    t5 = T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_2", **weights)
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
    tokenizer_2 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw)
    config = FluxTransformer2DModel.load_config(pretrained, subfolder="transformer", **kw)
    guidance = GUIDANCE if config.get("guidance_embeds") else None
    t5_length = min(T5_LENGTH, tokenizer_2.model_max_length)
    return FluxPromptEncoder(clip, t5, tokenizer, tokenizer_2, t5_length, guidance)


def pack(z: Tensor) -> Tensor:
    """Latents [B, C, H, W] -> tokens [B, (H/2)(W/2), 4C]: each 2x2 patch, row by row,
    its channels outermost (the stock pipelines' packing)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: latents {h}x{w} must be even")
    patches = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    patches = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None, dtype=None) -> Tensor:
    """Rotary positions of the packed tokens of ``height`` x ``width`` latents:
    ``(0, row, column)`` of each 2x2 patch, [(H/2)(W/2), 3]."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.to(dtype or torch.float32)


def forward(
    transformer: nn.Module,
    adapter: nn.Module | None,
    z: Tensor,
    timestep: Tensor,
    text: Conditioning,
    cond: Tensor,
) -> Tensor:
    """The velocity [B, C, H, W] of the transformer with the adapter's residuals for
    latents ``z`` [B, C, H, W]; ``cond`` is the condition's latents (same shape),
    ``timestep`` the schedule's ``1000 sigma`` (Flux's networks take ``sigma``)."""
    h, w = z.shape[-2:]
    kw = {
        "timestep": timestep / 1000,
        "encoder_hidden_states": text.hidden_states,
        "pooled_projections": text.added["pooled_projections"],
        "guidance": text.added.get("guidance"),
        "img_ids": image_ids(h, w, z.device, z.dtype),
        "txt_ids": z.new_zeros(text.hidden_states.shape[1], 3),
        "return_dict": False,
    }
    tokens = pack(z)
    blocks = single = None
    if adapter is not None:
        blocks, single = adapter(tokens, controlnet_cond=pack(cond), **kw)
    out = transformer(
        hidden_states=tokens, controlnet_block_samples=blocks,
        controlnet_single_block_samples=single, **kw,
    )[0]  # fmt: skip
    return unpack(out, h, w)


def adapter_config(transformer_config: Mapping[str, Any], num_layers: int | None) -> dict:
    """The ``FluxControlNetModel`` config of the adapter for a transformer of
    ``transformer_config``: its own widths, ``num_layers`` double-stream blocks (checked
    as SD3's, ``sd3.adapter_layers``: default half, at least one) and no single-stream
    blocks (the published Flux ControlNets use few or none)."""
    layers = adapter_layers(transformer_config, num_layers)
    return {**transformer_config, "num_layers": layers, "num_single_layers": 0}


def build_adapter(transformer: nn.Module, num_layers: int | None = None) -> nn.Module:
    """A ``FluxControlNetModel`` made as ``from_transformer`` makes it, with the
    transformer's own head count and width (``from_transformer``'s defaults are Flux.1's
    24 x 128, which a smaller transformer does not have): embeddings and the first
    ``num_layers`` double-stream blocks copied, a zero-initialised condition embedder and
    zero output projections, so the adapted model equals the teacher at step 0."""
    from diffusers import FluxControlNetModel

    adapter = FluxControlNetModel.from_config(adapter_config(transformer.config, num_layers))
    for name in ("pos_embed", "time_text_embed", "context_embedder", "x_embedder"):
        getattr(adapter, name).load_state_dict(getattr(transformer, name).state_dict())
    adapter.transformer_blocks.load_state_dict(
        transformer.transformer_blocks.state_dict(), strict=False
    )
    for p in adapter.controlnet_x_embedder.parameters():
        nn.init.zeros_(p)
    return adapter


def network_multiple(config: Mapping[str, Any]) -> tuple[int, str]:
    """1x1 patches of 2x2-packed latents: a multiple of 2 x the patch size."""
    return 2 * int(config["patch_size"]), "Flux's 2x2 latent packing"


def block_classes() -> set[type[nn.Module]]:
    """FSDP1 units: the double- and single-stream blocks, the transformer and its
    ControlNet."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    from ...compat import flux_block_classes

    return {*flux_block_classes(), FluxControlNetModel, FluxTransformer2DModel}


FAMILY = TeacherFamily(
    "flux",
    load_prompt_encoder,
    forward,
    pipelines=("Flux",),
    network=("transformer", "FluxTransformer2DModel"),
    latent_condition=True,
    lora_targets=TRANSFORMER_LORA_TARGETS,
    packed_channels=4,
    build_adapter=build_adapter,
    condition_embedding=lambda adapter: adapter.controlnet_x_embedder,
    network_multiple=network_multiple,
    fsdp_block_lists=("transformer_blocks", "single_transformer_blocks"),
    fsdp_blocks=(),
    fsdp_block_classes=block_classes,
    flow_export=FlowExport(
        "Flux",
        "FluxControlNetModel",
        "FluxTransformer2DModel",
        "FluxControlNetPipeline",
        adapter_config,
        GUIDANCE,
        "tokenizer_2",
        T5_LENGTH,
        "FluxPipeline",
    ),  # fmt: skip
)
