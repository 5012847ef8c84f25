"""What the UNet and flow exporters share: the run's hyperparameters as one typed record,
the checkpoint's sub-states, its LoRA in diffusers' format, the LoRA merged into a
network, and the model cards' common sections. Both exporters import this module;
neither imports the other's internals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from string import Template
from typing import Any

import torch

from ..checkpoints import STATE_PREFIXES, CheckpointError
from ..models.lora import ADAPTER_NAME, UNET_LORA_TARGETS


@dataclass(frozen=True)
class RunRecord:
    """The hyperparameters export reads from a checkpoint (``hyper_parameters``), typed,
    with ``CoDiDistillation``'s defaults for what an older checkpoint lacks (but missing
    test and predict steps add no rows to the card's step table); ``raw``: all of them,
    as recorded (the model card's training configuration)."""

    pretrained: str
    method: str = "pe-codi"
    revision: str | None = None
    pixel_space: bool = False
    vae_path: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    adapter_cond_channels: tuple[int, ...] | None = None
    adapter_layers: int | None = None
    num_grid: int = 50
    cfg_aware: bool = False
    guidance_range: tuple[int, ...] = ()
    shift_resolution: int | None = None
    test_steps: tuple[int, ...] = ()
    predict_steps: int = 1
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, hp: Mapping[str, Any]) -> RunRecord:
        def get(name: str, default: Any = None) -> Any:
            value = hp.get(name)
            return default if value is None else value

        def ints(name: str) -> tuple[int, ...] | None:
            value = hp.get(name)
            return None if value is None else tuple(int(v) for v in value)

        targets = hp.get("lora_targets")
        return cls(
            pretrained=str(hp.get("pretrained") or ""), method=str(get("method", "pe-codi")),
            revision=hp.get("revision"), pixel_space=bool(get("pixel_space", False)),
            vae_path=hp.get("vae_path"), lora_rank=int(get("lora_rank", 0)),
            lora_alpha=None if hp.get("lora_alpha") is None else float(hp["lora_alpha"]),
            lora_targets=None if targets is None else tuple(targets),
            adapter_cond_channels=ints("adapter_cond_channels") or None,
            adapter_layers=hp.get("adapter_layers"), num_grid=int(get("num_grid", 50)),
            cfg_aware=bool(get("cfg_aware", False)),
            guidance_range=ints("guidance_range") or (),
            shift_resolution=hp.get("shift_resolution"),
            test_steps=ints("test_steps") or (), predict_steps=int(get("predict_steps", 1)),
            raw=dict(hp),
        )  # fmt: skip


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"the checkpoint holds no weights under {prefix!r}")
    return out


def lora_state(
    state: dict[str, torch.Tensor], run: RunRecord, weights: str, ckpt: str = "checkpoint"
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
    if run.lora_rank and not out:
        raise CheckpointError(
            f"{ckpt}: trained with a LoRA (model.lora_rank={run.lora_rank}) but holds no "
            f"{prefix}* weights: a damaged or edited checkpoint"
        )
    return out


def lora_metadata(run: RunRecord, prefix: str = "") -> dict[str, Any]:
    """The LoRA's peft config (rank, alpha, target layers), saved with it so that
    ``load_lora_weights`` rebuilds the same scale ``alpha / r``; ``prefix``: keyed as the
    weights are (``unet.``) for ``load_lora_adapter``."""
    rank, alpha = run.lora_rank, run.lora_alpha
    meta = {
        "r": rank,
        "lora_alpha": float(alpha if alpha is not None else rank),
        "target_modules": list(run.lora_targets or UNET_LORA_TARGETS),
    }
    return {f"{prefix}{k}": v for k, v in meta.items()}


def unweighted(build: Any, *args: Any, **kwargs: Any) -> Any:
    """``build(*args, **kwargs)`` with its parameters on the meta device (no memory), to be
    filled by ``load_state_dict(..., assign=True)``; buffers are built for real, so those
    no state dict holds (non-persistent position tables) are there too."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build(*args, **kwargs)


def fused_network(network_cls: Any, base: str, subfolder: str, lora: dict, run: RunRecord,
                  kw: dict):  # fmt: skip
    """The base model's ``subfolder`` network with the LoRA ``lora`` (keys prefixed
    ``<subfolder>.``) merged into its weights: ``W + (alpha / r) B A`` in each layer."""
    network = network_cls.from_pretrained(base, subfolder=subfolder, **kw)
    network.load_lora_adapter(lora, prefix=subfolder, metadata=lora_metadata(run, f"{subfolder}."))
    network.fuse_lora()
    network.unload_lora()  # the fused base layers stay
    return network


def card_budgets(run: RunRecord, num_grid: int) -> list[int]:
    """The step counts a model card lists: 1, 2, 4, 8 and the run's test and predict
    steps, within the grid."""
    budgets = {1, 2, 4, 8, *run.test_steps, run.predict_steps}
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


def render_card(name: str, **values: Any) -> str:
    """The model card template ``export/cards/<name>.md`` (``string.Template``: ``${field}``
    placeholders, every one required) with ``values`` filled in."""
    text = resources.files(__package__).joinpath("cards", f"{name}.md").read_text("utf-8")
    return Template(text).substitute({k: str(v) for k, v in values.items()})
