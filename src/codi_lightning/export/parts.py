"""What the UNet and flow exporters share: the checkpoint's sub-states, its LoRA in
diffusers' format, the LoRA merged into a network, and the model cards' common sections.
Both exporters import this module; neither imports the other's internals."""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoints import STATE_PREFIXES, CheckpointError
from ..models.lora import ADAPTER_NAME, UNET_LORA_TARGETS


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"the checkpoint holds no weights under {prefix!r}")
    return out


def lora_state(
    state: dict[str, torch.Tensor], hp: dict[str, Any], weights: str, ckpt: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """The checkpoint's LoRA (online or EMA target) in diffusers' LoRA format: keys
    ``unet.<module>.lora_A.weight`` / ``lora_B``; empty without a LoRA."""
    prefix = STATE_PREFIXES["lora"][weights]
    tag = f".{ADAPTER_NAME}."
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix) :].replace("__", ".")
            out["unet." + name.replace(tag, ".")] = value
    if hp.get("lora_rank") and not out:
        raise CheckpointError(
            f"{ckpt}: trained with a LoRA (model.lora_rank={hp['lora_rank']}) but holds no "
            f"{prefix}* weights: a damaged or edited checkpoint"
        )
    return out


def lora_metadata(hp: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The LoRA's peft config (rank, alpha, target layers), saved with it so that
    ``load_lora_weights`` rebuilds the same scale ``alpha / r``; ``prefix``: keyed as the
    weights are (``unet.``) for ``load_lora_adapter``."""
    rank = int(hp["lora_rank"])
    alpha = hp.get("lora_alpha")
    meta = {
        "r": rank,
        "lora_alpha": float(alpha if alpha is not None else rank),
        "target_modules": list(hp.get("lora_targets") or UNET_LORA_TARGETS),
    }
    return {f"{prefix}{k}": v for k, v in meta.items()}


def fused_network(network_cls: Any, base: str, subfolder: str, lora: dict, hp: dict, kw: dict):
    """The base model's ``subfolder`` network with the LoRA ``lora`` (keys prefixed
    ``<subfolder>.``) merged into its weights: ``W + (alpha / r) B A`` in each layer."""
    network = network_cls.from_pretrained(base, subfolder=subfolder, **kw)
    network.load_lora_adapter(lora, prefix=subfolder, metadata=lora_metadata(hp, f"{subfolder}."))
    network.fuse_lora()
    network.unload_lora()  # the fused base layers stay
    return network


def card_budgets(hp: dict[str, Any], num_grid: int) -> list[int]:
    """The step counts a model card lists: 1, 2, 4, 8 and the run's test and predict
    steps, within the grid."""
    budgets = {1, 2, 4, 8, *hp.get("test_steps", ()), hp.get("predict_steps", 1)}
    return sorted(int(s) for s in budgets if 1 <= int(s) <= num_grid)


def any_size_section(multiple: int, call: str, value_range: str = "[0, 1]") -> str:
    """The card's note on output sizes: sides that are multiples of ``multiple``, and the
    padding rule ``codi-lightning predict`` follows for other sizes; ``call`` samples
    ``padded`` (a [1, 3, H, W] tensor) at ``H`` x ``W`` and returns a [1, 3, H, W] tensor."""
    return f"""## Any output size

The model samples images whose sides are multiples of {multiple} (the VAE factor times the
network's own multiple). For any other size `codi-lightning predict` (and
`CoDiPipeline`) pads the condition by reflection to the next multiples, samples, and crops
the result back to the condition's size; do the same here:

```python
import torch.nn.functional as F

# condition: a [1, 3, h, w] tensor in {value_range}, any h and w
h, w = condition.shape[-2:]
H, W = -(-h // {multiple}) * {multiple}, -(-w // {multiple}) * {multiple}
mode = "reflect" if H - h < h and W - w < w else "replicate"  # reflect needs room
padded = F.pad(condition, (0, W - w, 0, H - h), mode=mode)
image = {call}[..., :h, :w]
```

Large outputs: `codi-lightning predict` samples them in overlapping tiles blended at every
step (`--model.tiling.*`; `CoDiPipeline(..., tiling=TilingConfig(...))`).
"""
