"""Trained parameters of PE-CoDi with a LoRA of the UNet at real size, against full CoDi.

    python bench/lora_size.py            # SD 1.5 and SDXL UNets, ranks 4-128; a few seconds

Counts only (networks built on the meta device from the published configs in
bench/gpu_check.py, no weights, no download): the ControlNet adapter (``from_unet``:
the UNet's encoder and middle block), the LoRA on the default layers
(``models.lora.UNET_LORA_TARGETS``) at each rank, and full CoDi's trained part (adapter +
a copy of the UNet). docs/results_digits.md quotes the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_check import sd15_unet_config, sdxl_unet_config  # noqa: E402

from codi_lightning.models.lora import UNET_LORA_TARGETS, LowRankUpdate  # noqa: E402

RANKS = (4, 16, 64, 128)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    print(
        "| UNet | UNet params | adapter | full CoDi trains | "
        + " | ".join(f"adapter + LoRA r{r} (share of CoDi's)" for r in RANKS)
        + " |"
    )
    print("|---" * (4 + len(RANKS)) + "|")
    for name, config in (("SD 1.5", sd15_unet_config), ("SDXL", sdxl_unet_config)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config())
            adapter = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        base, side = count(unet), count(adapter)
        full = base + side
        cells = []
        for rank in RANKS:
            with torch.device("meta"):
                net = UNet2DConditionModel(**config())
                lora = count(LowRankUpdate(net, rank, UNET_LORA_TARGETS))
            cells.append(
                f"{(side + lora) / 1e6:.1f}M ({(side + lora) / full:.0%}; LoRA {lora / 1e6:.1f}M)"
            )
        print(
            f"| {name} | {base / 1e6:.1f}M | {side / 1e6:.1f}M | {full / 1e6:.1f}M | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
