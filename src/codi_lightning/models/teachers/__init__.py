"""Teacher families: the one place that branches on the kind of pretrained model.

Each family is one file (``sd``, ``sdxl``, ``sd3``, ``flux``, ``sana``) that defines ``FAMILY``, a
:class:`~.base.TeacherFamily`; the registry below lists them.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from . import flux, sana, sd, sd3, sdxl
from .base import TeacherFamily

# the registry: one line per family, each defined in its own file (``FAMILY``)
FAMILIES: dict[str, TeacherFamily] = {
    family.name: family for family in (sd.FAMILY, sdxl.FAMILY, sd3.FAMILY, flux.FAMILY, sana.FAMILY)
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
    """The family whose ``pipelines`` prefix of ``model_index.json``'s ``_class_name`` is
    the longest match (``StableDiffusionXL*Pipeline`` -> sdxl, ``StableDiffusion3*`` ->
    sd3, ``Flux*`` -> flux); anything else in the SD layout -> sd."""
    name = str(index.get("_class_name") or "")
    matches = [(len(p), f) for f in FAMILIES.values() for p in f.pipelines if name.startswith(p)]
    return max(matches, key=lambda m: m[0])[1] if matches else FAMILIES["sd"]


def family_of_network(network: Any) -> TeacherFamily:
    """The family whose denoising network is ``network`` (a module, or its diffusers class
    name): a UNet's family, ``sd``, for any class no family names."""
    name = network if isinstance(network, str) else type(network).__name__
    for family in FAMILIES.values():
        if family.network[1] == name:
            return family
    return FAMILIES["sd"]


# the class of a fresh teacher's network by the DiffusionTraining option that configures
# it, when its config names none (``_class_name``)
FRESH_DEFAULTS = {"unet": "UNet2DConditionModel", "transformer": "SD3Transformer2DModel"}


def fresh_network(config: Mapping[str, Any], kind: str) -> nn.Module:
    """A freshly initialised denoising network from its diffusers ``config``; its class is
    the config's ``_class_name`` (as in a folder's ``config.json``), else the default of
    ``kind`` (``unet`` or ``transformer``). Only the networks of families that build a
    fresh teacher's other parts (``TeacherFamily.fresh``) are accepted."""
    import diffusers

    config = dict(config)
    name = config.pop("_class_name", None) or FRESH_DEFAULTS[kind]
    trainable = sorted({f.network[1] for f in FAMILIES.values() if f.fresh is not None})
    if name not in trainable:
        raise ValueError(
            f"model.{kind}: a fresh teacher's network class {name!r} is not one this project "
            f"trains from scratch; set its _class_name to one of: {', '.join(trainable)}"
        )
    return getattr(diffusers, name)(**config)


__all__ = [
    "FAMILIES",
    "TeacherFamily",
    "family_of",
    "family_of_network",
    "fresh_network",
    "read_model_index",
]
