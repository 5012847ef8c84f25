"""SANA: a linear-attention diffusion transformer trained by flow matching, with a
Gemma 2 text encoder and the DC-AE autoencoder (``AutoencoderDC``, 32x compression into
32 channels); ``SanaControlNetModel`` is the image-condition adapter, whose condition
enters as DC-AE latents times the scaling factor (as the stock ``SanaControlNetPipeline``
encodes it). The folders ship ``DPMSolverMultistepScheduler`` in flow mode
(``flow_shift``), which ``diffusion.schedule.flow_match_config`` reads as the flow
schedule it implies."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Conditioning, PromptEncoder
from .base import FlowExport, TeacherFamily, patch_multiple, write_pipeline_folder
from .sd3 import adapter_layers

TEXT_LENGTH = 300  # the Gemma sequence length of the stock SANA pipelines (max_sequence_length)
# the LoRA's layers: the self- (linear) and cross-attention projections and the 1x1
# convolutions of the GLU MBConv feed-forward (its depthwise convolution left out)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point")


# SANA's scheduler as its folders ship it: DPM-Solver++ in flow mode, sigma shift 3
SANA_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
                  "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                  "flow_shift": 3.0, "algorithm_type": "dpmsolver++", "solver_order": 2}  # fmt: skip
TINY_SANA_TEXT_DIM = 32  # the tiny Gemma 2's width = the transformer's caption_channels


def build_tiny_gemma_side():
    """An offline Gemma tokenizer (one token per printable ASCII character, byte fallback
    for the rest, ``<bos>`` first as Gemma's) and a 2-layer Gemma 2 encoder of width
    ``TINY_SANA_TEXT_DIM``."""
    import string

    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    chars = ["\u2581", *string.ascii_letters, *string.digits, *string.punctuation]
    tokens = specials + chars + [f"<0x{i:02X}>" for i in range(256)]
    tokenizer = GemmaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], add_bos_token=True,
        add_eos_token=False,
    )  # fmt: skip
    config = Gemma2Config(
        vocab_size=len(tokens), hidden_size=TINY_SANA_TEXT_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        attn_implementation="eager",
    )  # fmt: skip
    return tokenizer, Gemma2Model(config)


def default_instruction() -> list[str] | None:
    """The complex human instruction the stock ``SanaControlNetPipeline`` puts before
    every prompt by default (its ``complex_human_instruction``), read from diffusers."""
    from diffusers import SanaControlNetPipeline

    default = (
        inspect.signature(SanaControlNetPipeline.__call__)
        .parameters["complex_human_instruction"]
        .default
    )
    return list(default) if default else None


class SanaPromptEncoder(PromptEncoder):
    """y as the stock SANA pipelines build it for the prompt: the prompt lower-cased and
    stripped, the instruction lines (if any) joined before it, right-padded to the
    instruction's tokens plus ``length - 2``, Gemma's last hidden states, then the first
    token and the last ``length - 1`` kept [B, length, D];
    ``added["encoder_attention_mask"]``: the tokenizer's mask of those tokens [B, length].

    The stock pipelines encode the negative prompt without the instruction; here every
    prompt, the empty one included, is encoded the one way (the unconditional branch of
    the teacher's guidance in training)."""

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer: Any,
        length: int = TEXT_LENGTH,
        instruction: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.text_encoder, self.tokenizer, self.length = text_encoder, tokenizer, int(length)
        self.instruction = list(instruction) if instruction else None

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str) -> Conditioning:
        prompts = [p.lower().strip() for p in prompts]
        total = self.length
        if self.instruction:
            head = "\n".join(self.instruction)
            prompts = [head + p for p in prompts]
            total = len(self.tokenizer(head, verbose=False).input_ids) + self.length - 2
        self.tokenizer.padding_side = "right"
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=total, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        )  # fmt: skip
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        keep = [0, *range(total - self.length + 1, total)]  # the first and the last L - 1
        return Conditioning(hidden[:, keep], {"encoder_attention_mask": mask[:, keep]})


def load_prompt_encoder(
    pretrained: str, index: Mapping[str, Any], kw: dict[str, Any], weights: dict[str, Any]
) -> SanaPromptEncoder:
    """``text_encoder/`` (a Gemma 2 model) and ``tokenizer/`` of a diffusers SANA folder;
    the length is the pipelines' 300, or the tokenizer's maximum if shorter."""
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(pretrained, subfolder="text_encoder", **weights)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
    length = min(TEXT_LENGTH, int(tokenizer.model_max_length))
    return SanaPromptEncoder(encoder, tokenizer, length, default_instruction())


def forward(
    transformer: nn.Module,
    adapter: nn.Module | None,
    z: Tensor,
    timestep: Tensor,
    text: Conditioning,
    cond: Tensor,
) -> Tensor:
    """The velocity of the transformer with the adapter's per-block residuals, called as
    ``SanaControlNetPipeline`` calls them (``timestep`` is ``1000 sigma``; ``cond`` the
    condition's latents); a transformer that also predicts its variance (twice the
    channels) gives its first half."""
    kw = {
        "encoder_hidden_states": text.hidden_states,
        "encoder_attention_mask": text.added["encoder_attention_mask"],
        "timestep": timestep,
    }
    residuals = None
    if adapter is not None:
        residuals = tuple(adapter(z, controlnet_cond=cond, return_dict=False, **kw)[0])
    out = transformer(z, controlnet_block_samples=residuals, return_dict=False, **kw)[0]
    return out[:, : z.shape[1]] if out.shape[1] == 2 * z.shape[1] else out


def adapter_config(transformer_config: Mapping[str, Any], num_layers: int | None) -> dict[str, Any]:
    """The ``SanaControlNetModel`` config of the adapter for a transformer of
    ``transformer_config``: its widths (the keys the ControlNet takes) and
    :func:`~.sd3.adapter_layers` blocks."""
    from diffusers import SanaControlNetModel

    accepted = inspect.signature(SanaControlNetModel.__init__).parameters
    config = {k: v for k, v in transformer_config.items() if k in accepted}
    return {**config, "num_layers": adapter_layers(transformer_config, num_layers)}


def build_adapter(transformer: nn.Module, num_layers: int | None = None) -> nn.Module:
    """A ``SanaControlNetModel`` of the first ``num_layers`` blocks (default: half, at
    least one), its embeddings and blocks copied from the transformer; its condition
    projection (``input_block``) and output projections start at zero, so the adapted
    model equals the teacher at step 0."""
    from diffusers import SanaControlNetModel

    if transformer.config.get("qk_norm") or transformer.config.get("guidance_embeds"):
        raise ValueError(
            "this SANA transformer uses qk_norm or a guidance embedding (SANA 1.5 / "
            "SANA-Sprint), which SanaControlNetModel's blocks do not have: use a SANA 1.0 "
            "teacher, whose blocks the ControlNet copies"
        )
    adapter = SanaControlNetModel.from_config(adapter_config(transformer.config, num_layers))
    state = transformer.state_dict()
    missing, _ = adapter.load_state_dict(state, strict=False)
    left = {k.split(".")[0] for k in missing} - {"input_block", "controlnet_blocks"}
    if left:  # every shared part must have been copied
        raise ValueError(f"the SANA ControlNet's {sorted(left)} do not match the transformer's")
    return adapter


def block_classes() -> set[type[nn.Module]]:
    """FSDP1 units: the SANA block, the transformer and its ControlNet."""
    from diffusers import SanaControlNetModel, SanaTransformer2DModel

    from ...compat import sana_block_class

    return {sana_block_class(), SanaControlNetModel, SanaTransformer2DModel}


def save_sana_folder(
    folder: str | Path, transformer: nn.Module, text_encoder: nn.Module, tokenizer: Any,
    scheduler_config: dict[str, Any], vae: nn.Module | None = None,
) -> Path:  # fmt: skip
    """Write a diffusers SANA folder (``model_index.json`` naming ``SanaPipeline``,
    ``transformer/``, ``text_encoder/`` (Gemma 2), ``tokenizer/``, ``scheduler/`` and, when
    given, ``vae/`` (AutoencoderDC); no VAE: a pixel-space teacher), which stock diffusers
    loads."""
    index = {
        "_class_name": "SanaPipeline",
        "transformer": ["diffusers", type(transformer).__name__],
        "vae": ["diffusers", "AutoencoderDC"] if vae is not None else [None, None],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "scheduler": ["diffusers", scheduler_config["_class_name"]],
    }
    parts = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
             "tokenizer": tokenizer}  # fmt: skip
    return write_pipeline_folder(folder, parts, scheduler_config, index)


def write_folder(
    folder: str | Path, transformer: nn.Module, prompt_encoder: SanaPromptEncoder,
    scheduler_config: dict[str, Any], vae: nn.Module | None = None,
) -> Path:  # fmt: skip
    """:func:`save_sana_folder` of a transformer and its prompt encoder (the record's
    ``write_folder``)."""
    text = prompt_encoder
    return save_sana_folder(folder, transformer, text.text_encoder, text.tokenizer,
                            scheduler_config, vae)  # fmt: skip


def fresh(
    text_tokens: int | None, flow_shift: float, prediction_type: str
) -> tuple[SanaPromptEncoder, dict[str, Any]]:
    """A fresh pixel-space SANA teacher's text side (the tiny offline Gemma 2 of
    :func:`build_tiny_gemma_side`, encoded as :func:`load_prompt_encoder` will read the folder back:
    the stock instruction first; ``text_tokens``: the tokenizer's length, default the
    pipelines' 300) and SANA's scheduler (DPM-Solver++ in flow mode) with sigma shift
    ``flow_shift``; ``prediction_type`` is not used (the velocity)."""
    tokenizer, encoder = build_tiny_gemma_side()
    length = TEXT_LENGTH
    if text_tokens is not None:
        tokenizer.model_max_length = length = min(TEXT_LENGTH, int(text_tokens))
    prompt_encoder = SanaPromptEncoder(encoder, tokenizer, length, default_instruction())
    return prompt_encoder, {**SANA_SCHEDULER, "flow_shift": float(flow_shift)}


FAMILY = TeacherFamily(
    "sana",
    load_prompt_encoder,
    forward,
    pipelines=("Sana",),
    network=("transformer", "SanaTransformer2DModel"),
    latent_condition=True,
    lora_targets=LORA_TARGETS,
    build_adapter=build_adapter,
    condition_embedding=lambda adapter: adapter.input_block,
    network_multiple=patch_multiple,
    fsdp_block_lists=("transformer_blocks",),
    fsdp_blocks=(),
    fsdp_block_classes=block_classes,
    vae="AutoencoderDC",
    write_folder=write_folder,
    fresh=fresh,
    flow_export=FlowExport(
        "SANA",
        "SanaControlNetModel",
        "SanaTransformer2DModel",
        "SanaControlNetPipeline",
        adapter_config,
        1.0,
        "tokenizer",
        TEXT_LENGTH,
        "SanaPipeline",
        "use_resolution_binning=False,",  # else sizes snap to its bins of 1024 px models
        size_from_condition=True,
        sampling_notes=(
            "The stock pipeline samples as `codi-lightning` does: the DC-AE encodes the control\n"
            "image deterministically, and the pipeline passes its `generator` to\n"
            "`FlowMatchLCMScheduler`, which draws the per-step noise from it after the initial\n"
            "noise (the `torch.manual_seed` line below changes nothing here)."
        ),
    ),  # fmt: skip
)
