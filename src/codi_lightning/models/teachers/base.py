"""What a teacher family is: the record each family file fills in (``FAMILY``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..conditioning import PromptEncoder
from ..lora import UNET_LORA_TARGETS


def unet_multiple(config: Mapping[str, Any]) -> tuple[int, str]:
    """A UNet's latent-size multiple: its downsampling to the lowest level."""
    return 2 ** (len(config["block_out_channels"]) - 1), "UNet downsampling"


def patch_multiple(config: Mapping[str, Any]) -> tuple[int, str]:
    """A patch transformer's latent-size multiple: its patch size."""
    return int(config["patch_size"]), "transformer patch size"


def unet_block_classes() -> set[type[nn.Module]]:
    """Every diffusers UNet/ControlNet block class, and the two models themselves."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.unets import unet_2d_blocks

    blocks = {
        cls
        for name, cls in vars(unet_2d_blocks).items()
        if isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and name.endswith(("Block2D", "Block2DCrossAttn"))
    }
    return blocks | {ControlNetModel, UNet2DConditionModel}


def write_pipeline_folder(
    folder: str | Path, parts: dict[str, Any], scheduler_config: dict[str, Any],
    index: dict[str, Any],
) -> Path:  # fmt: skip
    """Write a diffusers pipeline folder: each part (a model or tokenizer; None: skipped)
    saved in its subfolder (safetensors), ``scheduler/scheduler_config.json`` and
    ``model_index.json`` (``index``: the pipeline's ``_class_name`` and components)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        if part is not None:
            part.save_pretrained(folder / name)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config, indent=2)
    )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@dataclass(frozen=True)
class FlowExport:
    """How a flow-transformer family exports (``export.flow``): the diffusers class
    names, the adapter's config for a given transformer config, and the model card's
    notes."""

    title: str
    adapter: str
    network: str
    pipeline: str
    adapter_config: Callable[..., dict]  # (transformer config, adapter_layers) -> config
    guidance: float  # the pipeline's guidance_scale that reproduces training
    # the subfolder of the tokenizer whose length is the pipeline's max_sequence_length
    # (T5's; SANA: Gemma's), and that length (with a tokenizer at least as long)
    text_tokenizer: str
    text_length: int
    lora_saver: str  # the diffusers pipeline whose save_lora_weights writes a LoRA
    call_args: str = ""  # more arguments of the stock pipeline's call (e.g. ``a=1,``)
    # the pipeline samples at a fixed default size, not the control image's (SANA: 1024)
    size_from_condition: bool = False
    # the model card's words on how the stock pipeline's sampling differs from ours
    sampling_notes: str = (
        "Two differences from `codi-lightning`'s own sampling: the stock pipeline encodes "
        "the\ncontrol image with a sample of the VAE posterior where `codi-lightning` uses "
        "its mean,\nand `FlowMatchLCMScheduler` draws its per-step noise from torch's global "
        "generator (the\npipeline does not pass `generator` to it): seed it with "
        "`torch.manual_seed`."
    )


@dataclass(frozen=True)
class UNetExport:
    """How a UNet family's latent model exports (``export.exporter``): its stock ControlNet
    pipeline class, that pipeline's extra ``from_pretrained`` arguments in the model
    card's snippet, its assembly from loaded parts (``CoDiPipeline.to_diffusers``), and
    the card's family-specific words.

    ``assemble(parts, controlnet, scheduler)`` builds the pipeline; ``card(unet_config,
    zero_empty)`` gives (words before the snippet, lines after ``prompt = ""`` in it, how
    the call passes the prompt), None: none, none, ``prompt``."""

    pipeline: str
    from_pretrained_args: str
    assemble: Callable[..., Any]
    card: Callable[[Mapping[str, Any], bool], tuple[str, str, str]] | None = None


@dataclass(frozen=True, eq=False)
class TeacherFamily:
    """A family equals its name (``parts.family == "sd3"``) and prints as it, so messages
    and configs keep naming families as before.

    Attributes:
    name: ``sd`` (SD 1.x/2.x), ``sdxl``, ``sd3`` (SD3 / SD3.5) or ``flux`` (Flux.1).
    pipelines: prefixes of ``model_index.json``'s ``_class_name`` that mean this family
        (the longest matching prefix wins; a folder matching none is ``sd``).
    load_prompt_encoder: ``(pretrained, model_index, kw, weights) -> PromptEncoder``.
    forward: ``(network, adapter | None, z, timestep, text, cond) -> output``: the
        network with the adapter's residuals; ``timestep`` is what the network is fed
        (``schedule.model_timesteps``).
    network: ``(subfolder, diffusers class name)`` of the denoising network.
    latent_condition: the adapter takes the condition as VAE latents (SD3's
        ``SD3ControlNetModel``, Flux's ``FluxControlNetModel``), not as pixels
        (``ControlNetModel``).
    vae: the diffusers class of ``vae/`` (``AutoencoderDC`` for SANA).
    vae_overflows_in_fp16: the stock VAE overflows in fp16 (SDXL): it runs in fp32 or
        bf16 unless the VAE's config says ``force_upcast: false`` (fp16-fix VAEs).
    lora_targets: module-name suffixes of the network that take a LoRA by default.
    packed_channels: latent channels per VAE channel the network takes (Flux packs
        2x2 patches: 4).
    build_adapter: ``(network, layers) -> adapter`` for a transformer family (its
        ControlNet of ``layers`` blocks); None: the UNet ControlNet of
        ``models.builders.build_adapter``.
    condition_embedding: ``adapter -> layer`` that embeds the condition (reset to
        PyTorch's default init by ``condition_init: random``); transformer families.
    network_multiple: ``config -> (multiple, what sets it)``: the multiple of the
        latent's sides the network takes.
    fsdp_block_lists / fsdp_blocks: attribute names of block lists / single blocks of
        the network and its adapter, each an FSDP2 unit.
    fsdp_block_classes: ``() -> classes`` that are FSDP1 auto-wrap units (blocks, the
        network and adapter models).
    lora_saver: the diffusers pipeline whose ``save_lora_weights`` writes the LoRA of a
        UNet export (``export.exporter``).
    flow_export: a flow-transformer family's export (``export.flow``); None: the UNet
        export of ``export.exporter`` (``unet_export``).
    write_folder: ``(folder, network, prompt_encoder, scheduler_config, vae) -> folder``:
        parts written back in the family's diffusers layout (``DiffusionTraining``'s
        teacher); None: not written by this project.
    fresh: ``(text_tokens, flow_shift, prediction_type) -> (prompt_encoder,
        scheduler_config)``: the small offline text side and the scheduler of a fresh
        pixel-space teacher of this family (``DiffusionTraining``; ``text_tokens``: each
        tokenizer's length, None for the family's default); None: this family's network
        is not trained from scratch here."""

    name: str
    load_prompt_encoder: Callable[..., PromptEncoder]
    forward: Callable[..., Any]
    pipelines: tuple[str, ...] = ()
    network: tuple[str, str] = ("unet", "UNet2DConditionModel")
    latent_condition: bool = False
    vae: str = "AutoencoderKL"
    vae_overflows_in_fp16: bool = False
    lora_targets: tuple[str, ...] = UNET_LORA_TARGETS
    packed_channels: int = 1
    build_adapter: Callable[[nn.Module, int | None], nn.Module] | None = None
    condition_embedding: Callable[[nn.Module], nn.Module] | None = None
    network_multiple: Callable[[Mapping[str, Any]], tuple[int, str]] = unet_multiple
    fsdp_block_lists: tuple[str, ...] = ("down_blocks", "up_blocks")
    fsdp_blocks: tuple[str, ...] = ("mid_block",)
    fsdp_block_classes: Callable[[], set[type[nn.Module]]] = unet_block_classes
    lora_saver: str = "StableDiffusionPipeline"
    flow_export: FlowExport | None = None
    unet_export: UNetExport | None = None
    write_folder: Callable[..., Path] | None = None
    fresh: Callable[[int | None, float, str], tuple[PromptEncoder, dict[str, Any]]] | None = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TeacherFamily):
            return self.name == other.name
        if isinstance(other, str):
            return self.name == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name
