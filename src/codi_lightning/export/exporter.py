"""Lightning checkpoint -> diffusers folders (``codi-lightning export``).

Writes ``controlnet/`` (EMA target weights by default), ``unet/`` when the UNet was
trained (full CoDi), ``scheduler/`` (an ``LCMScheduler`` carrying the training grid N as
``original_inference_steps``) and a ``README.md`` model card. Safetensors only. Needs
the checkpoint and access to the base model recorded in it (for configs, not weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoints import read_checkpoint
from ..models import adapter_cond_channels, check_condition_downsampling


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"the checkpoint holds no weights under {prefix!r}")
    return out


def export_checkpoint(
    ckpt: str,
    output: str,
    weights: Literal["target", "online"] = "target",
    pretrained: str | None = None,
) -> Path:
    """Export a CoDi Lightning checkpoint to diffusers folders.

    Args:
        ckpt: Lightning checkpoint written by ``codi-lightning fit``: a file, or a
            distributed-checkpoint folder (FSDP2).
        output: folder to write (``controlnet/``, ``unet/``, ``scheduler/``, ``README.md``).
        weights: ``target`` (EMA, what validation samples with) or ``online``.
        pretrained: base model to read configs from, if not the one recorded in the
            checkpoint (e.g. the same model at another path).
    """
    from diffusers import ControlNetModel, DDPMScheduler, LCMScheduler, UNet2DConditionModel

    if weights not in ("target", "online"):
        raise ValueError(f"--weights {weights!r}; choose 'target' or 'online'")
    checkpoint = read_checkpoint(ckpt)
    hp = dict(checkpoint["hyper_parameters"])
    base = pretrained or hp["pretrained"]
    state = checkpoint["state_dict"]
    kw = {"revision": hp.get("revision")}
    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet", **kw)
    unet = UNet2DConditionModel.from_config(unet_config)
    vae_scale = 1
    if not hp.get("pixel_space", False):
        from diffusers import AutoencoderKL

        vae_config = AutoencoderKL.load_config(base, subfolder="vae", **kw)
        vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = tuple(hp.get("adapter_cond_channels") or adapter_cond_channels(vae_scale))
    check_condition_downsampling(channels, vae_scale)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=channels, load_weights_from_unet=False
    )
    prefix = {"target": "target.controlnet.", "online": "controlnet."}[weights]
    controlnet.load_state_dict(_sub_state(state, prefix), strict=True)
    controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    if hp.get("method") == "codi":
        prefix = {"target": "target.unet.", "online": "student_unet."}[weights]
        unet.load_state_dict(_sub_state(state, prefix), strict=True)
        unet.save_pretrained(out / "unet", safe_serialization=True)

    scheduler_config = DDPMScheduler.load_config(base, subfolder="scheduler", **kw)
    lcm = LCMScheduler.from_config(
        scheduler_config,
        original_inference_steps=int(hp.get("num_grid", 50)),
        timestep_scaling=10.0,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    lcm.save_pretrained(out / "scheduler")
    (out / "README.md").write_text(_model_card(hp, base, weights, checkpoint.get("global_step", 0)))
    return out


def _model_card(hp: dict[str, Any], base: str, weights: str, step: int) -> str:
    method = {"pe-codi": "PE-CoDi (adapter only)", "codi": "CoDi (adapter + UNet)"}
    method = method.get(hp.get("method", "pe-codi"), hp.get("method"))
    config = json.dumps(hp, indent=2, default=str)
    return f"""---
library_name: diffusers
base_model: {base}
tags: [controlnet, consistency-distillation, codi, lcm]
---
# CoDi distilled model

Conditional diffusion distillation (CoDi, Mei et al., CVPR 2024) of `{base}`:
{method}, {weights} weights, after {step} optimizer steps. Samples in 1-4 steps with
`LCMScheduler` (grid N = {hp.get("num_grid", 50)}).

```python
from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

controlnet = ControlNetModel.from_pretrained("THIS_FOLDER/controlnet")
pipe = StableDiffusionControlNetPipeline.from_pretrained(
    "{base}", controlnet=controlnet, safety_checker=None
)  # for full CoDi also pass unet=UNet2DConditionModel.from_pretrained("THIS_FOLDER/unet")
pipe.scheduler = LCMScheduler.from_pretrained("THIS_FOLDER/scheduler")
image = pipe("", image=condition, num_inference_steps=4, guidance_scale=1.0).images[0]
```

## Training configuration

```json
{config}
```
"""
