"""Export of SD3-family checkpoints: ``controlnet/`` (``SD3ControlNetModel``),
``transformer/`` for full CoDi, the two flow samplers as stock schedulers and a model card
for ``StableDiffusion3ControlNetPipeline``.

- ``scheduler/``: ``FlowMatchLCMScheduler`` (the stochastic consistency multistep sampler,
  ``model.eval_stochastic: true``): ``x_hat = z - sigma v``, then fresh noise at the next
  sigma.
- ``scheduler_deterministic/``: ``FlowMatchEulerDiscreteScheduler`` (the default
  deterministic sampler: on a flow schedule the DDIM step with the model's own noise
  estimate is the Euler step, and the last step lands on ``x_hat``).

Both take the training grid's timesteps as ``sigmas=`` (the unshifted ``(t + 1) / T``:
the schedulers shift them by the base model's ``shift``); their default spacing does not
lie on the grid. ``tests/export/test_export_sd3.py`` checks that the stock pipeline with
either scheduler reproduces the module's samplers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..diffusion import FlowSchedule, sampling_timesteps
from ..models.teachers import sd3
from .exporter import _sub_state, card_budgets


def export_sd3(
    hp: dict[str, Any], state: dict, base: str, out: Path, weights: str, step: int, kw: dict
) -> str:
    """Write the SD3 export into ``out``; returns what was written (for the summary)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FlowMatchLCMScheduler,
        SD3ControlNetModel,
        SD3Transformer2DModel,
    )

    config = SD3Transformer2DModel.load_config(base, subfolder="transformer", **kw)
    layers = sd3.adapter_layers(config, hp.get("adapter_layers"))
    controlnet = SD3ControlNetModel.from_config(sd3.adapter_config(config, layers))
    prefix = {"target": "target.controlnet.", "online": "controlnet."}[weights]
    controlnet.load_state_dict(_sub_state(state, prefix), strict=True)
    controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    codi = hp.get("method") == "codi"
    if codi:
        transformer = SD3Transformer2DModel.from_config(config)
        prefix = {"target": "target.unet.", "online": "student_unet."}[weights]
        transformer.load_state_dict(_sub_state(state, prefix), strict=True)
        transformer.save_pretrained(out / "transformer", safe_serialization=True)
    scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
        base, subfolder="scheduler", **kw
    )
    FlowMatchLCMScheduler.from_config(scheduler_config).save_pretrained(out / "scheduler")
    FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).save_pretrained(
        out / "scheduler_deterministic"
    )
    schedule = FlowSchedule.from_config(scheduler_config)
    (out / "README.md").write_text(_card(hp, base, weights, step, schedule, codi))
    return "transformer/ + controlnet/" if codi else "controlnet/"


def _card(
    hp: dict[str, Any], base: str, weights: str, step: int, schedule: FlowSchedule, codi: bool
) -> str:
    method = "CoDi (adapter + transformer)" if codi else "PE-CoDi (adapter only)"
    num_grid, num_train = int(hp.get("num_grid", 50)), schedule.num_train_timesteps
    budgets = card_budgets(hp, num_grid)
    rows, sigmas = [], {}
    for s in budgets:
        ts = sampling_timesteps(s, num_train, num_grid)
        sigmas[s] = schedule.unshifted(ts)
        rows.append(f"| {s} | `{ts}` | `{sigmas[s]}` |")
    steps = 4 if 4 in sigmas else budgets[-1]
    revision = "" if hp.get("revision") is None else f", revision={json.dumps(hp['revision'])}"
    transformer = (
        '\n    transformer=SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"),'
        if codi
        else ""
    )
    config = json.dumps(hp, indent=2, default=str)
    return f"""---
library_name: diffusers
base_model: {base}
tags: [controlnet, sd3, rectified-flow, consistency-distillation, codi]
---
# CoDi distilled model (SD3 family)

Conditional diffusion distillation (CoDi, Mei et al., CVPR 2024) of the rectified-flow
transformer `{base}`: {method}, {weights} weights, after {step} optimizer steps, training
grid N = {num_grid}, sigma shift {schedule.shift}.

## Samplers

| folder | scheduler | sampler | `codi-lightning test` setting |
|---|---|---|---|
| `scheduler_deterministic/` | `FlowMatchEulerDiscreteScheduler` | deterministic (Euler) | `--model.eval_stochastic false` (the default) |
| `scheduler/` | `FlowMatchLCMScheduler` | stochastic consistency multistep | `--model.eval_stochastic true` |

Both must be given the training grid's steps as `sigmas=` (unshifted; the scheduler
shifts them): their own spacing does not lie on the grid.

| steps | timesteps | `sigmas=` |
|---|---|---|
{chr(10).join(rows)}

Two differences from `codi-lightning`'s own sampling: the stock pipeline encodes the
control image with a sample of the VAE posterior where `codi-lightning` uses its mean,
and `FlowMatchLCMScheduler` draws its per-step noise from torch's global generator (the
pipeline does not pass `generator` to it): seed it with `torch.manual_seed`.

## Usage

```python
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, SD3ControlNetModel,
    SD3Transformer2DModel, StableDiffusion3ControlNetPipeline,
)

folder = "THIS_FOLDER"  # this export
controlnet = SD3ControlNetModel.from_pretrained(folder, subfolder="controlnet")
pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
    {json.dumps(base)}, controlnet=controlnet,{transformer}
    {revision.lstrip(", ")}
)
# condition: the control image, a PIL image or a [1, 3, H, W] tensor in [-1, 1]
prompt = ""
sigmas = {sigmas[steps]}  # {steps} steps on the training grid

# deterministic sampler (codi-lightning test --model.eval_stochastic false)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
    folder, subfolder="scheduler_deterministic"
)
image = pipe(prompt, control_image=condition, sigmas=sigmas, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0)).images[0]

# stochastic sampler (codi-lightning test --model.eval_stochastic true)
pipe.scheduler = FlowMatchLCMScheduler.from_pretrained(folder, subfolder="scheduler")
torch.manual_seed(0)  # the per-step noise
image = pipe(prompt, control_image=condition, sigmas=sigmas, guidance_scale=1.0,
             generator=torch.Generator().manual_seed(0)).images[0]
```

## Training configuration

```json
{config}
```
"""
