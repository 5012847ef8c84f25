"""Teacher families: the one place that branches on the kind of pretrained model.

A family is chosen from the folder's ``model_index.json`` (``_class_name``) and says
where its denoising network lives and of which class (a UNet, or the SD3 transformer),
how to build the :class:`~codi_lightning.models.conditioning.PromptEncoder`, how the
network and its adapter are called, whether the adapter takes the condition as VAE
latents, and whether its VAE must not run in fp16. The VAE and the scheduler config are
loaded the same way for every family in ``models.builders.load_teacher``; the schedule
(VP or rectified flow) follows from the scheduler config (``diffusion.schedule``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conditioning import PromptEncoder
from ..lora import TRANSFORMER_LORA_TARGETS, UNET_LORA_TARGETS
from . import flux, sd, sd3, sdxl


@dataclass(frozen=True)
class TeacherFamily:
    """Attributes:
    name: ``sd`` (SD 1.x/2.x), ``sdxl``, ``sd3`` (SD3 / SD3.5) or ``flux`` (Flux.1).
    load_prompt_encoder: ``(pretrained, model_index, kw, weights) -> PromptEncoder``.
    forward: ``(network, adapter | None, z, timestep, text, cond) -> output``: the
        network with the adapter's residuals; ``timestep`` is what the network is fed
        (``schedule.model_timesteps``).
    network: ``(subfolder, diffusers class name)`` of the denoising network.
    latent_condition: the adapter takes the condition as VAE latents (SD3's
        ``SD3ControlNetModel``, Flux's ``FluxControlNetModel``), not as pixels
        (``ControlNetModel``).
    vae_overflows_in_fp16: the stock VAE overflows in fp16 (SDXL): it runs in fp32 or
        bf16 unless the VAE's config says ``force_upcast: false`` (fp16-fix VAEs).
    lora_targets: module-name suffixes of the network that take a LoRA by default."""

    name: str
    load_prompt_encoder: Callable[..., PromptEncoder]
    forward: Callable[..., Any] = sd.forward
    network: tuple[str, str] = ("unet", "UNet2DConditionModel")
    latent_condition: bool = False
    vae_overflows_in_fp16: bool = False
    lora_targets: tuple[str, ...] = UNET_LORA_TARGETS


FAMILIES = {
    "sd": TeacherFamily("sd", sd.load_prompt_encoder),
    "sdxl": TeacherFamily("sdxl", sdxl.load_prompt_encoder, vae_overflows_in_fp16=True),
    "sd3": TeacherFamily(
        "sd3",
        sd3.load_prompt_encoder,
        sd3.forward,
        ("transformer", "SD3Transformer2DModel"),
        latent_condition=True,
        lora_targets=TRANSFORMER_LORA_TARGETS,
    ),  # fmt: skip
    "flux": TeacherFamily(
        "flux",
        flux.load_prompt_encoder,
        flux.forward,
        ("transformer", "FluxTransformer2DModel"),
        latent_condition=True,
        lora_targets=TRANSFORMER_LORA_TARGETS,
    ),  # fmt: skip
}


def read_model_index(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """The folder's ``model_index.json`` ({} when there is none: an SD-layout folder)."""
    local = Path(pretrained).expanduser()
    if local.is_dir():
        path = local / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(pretrained, revision=revision))
    except (OSError, ValueError):  # offline, unknown id: the UNet load reports it
        return {}


def family_of(index: Mapping[str, Any]) -> TeacherFamily:
    """``StableDiffusionXL*Pipeline`` -> sdxl, ``StableDiffusion3*Pipeline`` -> sd3,
    ``Flux*Pipeline`` -> flux; anything else in the SD layout -> sd."""
    name = str(index.get("_class_name") or "")
    if name.startswith("Flux"):
        return FAMILIES["flux"]
    if name.startswith("StableDiffusion3"):
        return FAMILIES["sd3"]
    return FAMILIES["sdxl" if name.startswith("StableDiffusionXL") else "sd"]


__all__ = ["FAMILIES", "TeacherFamily", "family_of", "read_model_index"]
