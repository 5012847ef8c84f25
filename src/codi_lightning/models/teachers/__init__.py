"""Teacher families: the one place that branches on the kind of pretrained model.

A family is chosen from the folder's ``model_index.json`` (``_class_name``) and says how
to build the :class:`~codi_lightning.models.conditioning.PromptEncoder` and whether its
VAE must not run in fp16. Everything else (UNet, VAE, scheduler, adapter) is loaded the
same way for every family in ``models.builders.load_teacher``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conditioning import PromptEncoder
from . import sd, sdxl


@dataclass(frozen=True)
class TeacherFamily:
    """Attributes:
    name: ``sd`` (SD 1.x/2.x) or ``sdxl``.
    load_prompt_encoder: ``(pretrained, model_index, kw, weights) -> PromptEncoder``.
    vae_overflows_in_fp16: the stock VAE overflows in fp16 (SDXL): it runs in fp32 or
        bf16 unless the VAE's config says ``force_upcast: false`` (fp16-fix VAEs)."""

    name: str
    load_prompt_encoder: Callable[..., PromptEncoder]
    vae_overflows_in_fp16: bool = False


FAMILIES = {
    "sd": TeacherFamily("sd", sd.load_prompt_encoder),
    "sdxl": TeacherFamily("sdxl", sdxl.load_prompt_encoder, vae_overflows_in_fp16=True),
}
UNSUPPORTED = ("StableDiffusion3", "Flux")


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
    """``StableDiffusionXL*Pipeline`` -> sdxl; anything else in the SD layout -> sd."""
    name = str(index.get("_class_name") or "")
    if name.startswith(UNSUPPORTED):
        raise ValueError(
            f"teacher pipeline {name}: flow-matching DiT teachers (SD3, Flux) are not "
            "supported yet; give an SD 1.x/2.x or SDXL folder"
        )
    return FAMILIES["sdxl" if name.startswith("StableDiffusionXL") else "sd"]


__all__ = ["FAMILIES", "TeacherFamily", "family_of", "read_model_index"]
