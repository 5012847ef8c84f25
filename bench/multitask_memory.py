"""Memory of a second task on one SD 1.5-sized backbone (``CoDiPipeline.load_task``).

    python bench/multitask_memory.py [--rank 64] [--work DIR]   # ~3 min, ~9 GB RAM, 4 GB disk

Two PE-CoDi task exports (each an SD 1.5-sized ControlNet and a LoRA of the UNet at
``--rank``; random weights, built from the published config in bench/gpu_check.py, no
download) are written to ``--work``. The script then measures the process's resident
memory (``VmRSS``, every weight read once, as sampling reads them) after loading the
UNet, after loading task 1 onto it and after
loading task 2 with ``load_task``, and, for comparison, what a second full copy of the
UNet costs. The text encoder and VAE are left out (the same for every task). fp32, CPU.
docs/performance.md quotes the output.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gpu_check import sd15_unet_config  # noqa: E402

from codi_lightning.models.lora import (  # noqa: E402
    ADAPTER_NAME,
    LORA_FILE,
    UNET_LORA_TARGETS,
    LowRankUpdate,
)


def rss_gb() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS in /proc/self/status")


def touch(*modules: torch.nn.Module) -> None:
    """Read every weight once, as sampling does: weights loaded from safetensors are
    memory-mapped, and count in the resident set only once read."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.sum()


def write_task(folder: Path, rank: int, seed: int) -> None:
    """An export folder as ``codi-lightning export`` writes it for PE-CoDi + LoRA."""
    from diffusers import (
        ControlNetModel,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd15_unet_config())
    ControlNetModel.from_unet(unet).save_pretrained(folder / "controlnet")
    lora = LowRankUpdate(unet, rank, UNET_LORA_TARGETS)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.01)
    weights = {
        n.replace(f".{ADAPTER_NAME}.", "."): t.detach() for n, t in lora.by_network_name().items()
    }
    StableDiffusionPipeline.save_lora_weights(
        folder / "lora", unet_lora_layers=weights, weight_name=LORA_FILE,
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": float(rank),
                                    "target_modules": list(UNET_LORA_TARGETS)},
    )  # fmt: skip
    LCMScheduler(original_inference_steps=50).save_pretrained(folder / "scheduler")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    from codi_lightning.export import CoDiPipeline
    from codi_lightning.export.pipeline import _task_parts
    from codi_lightning.models import TeacherParts

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for i, name in enumerate(("sr", "inpaint")):
            if not (work / name / "lora" / LORA_FILE).is_file():
                write_task(work / name, args.rank, seed=i)
        gc.collect()
        start = rss_gb()
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**sd15_unet_config()).eval()
        after_base = rss_gb()
        controlnet, grid, _ = _task_parts(unet, str(work / "sr"), "sr", {})
        touch(unet, controlnet)
        parts = TeacherParts(unet=unet, vae=None, prompt_encoder=None, scheduler_config={
            "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012})  # fmt: skip
        pipe = CoDiPipeline(parts, controlnet, grid, task="sr", lora=True)
        after_one = rss_gb()
        pipe.load_task("inpaint", str(work / "inpaint"))
        pipe.use_task("inpaint")
        touch(unet, pipe.controlnet)
        after_two = rss_gb()
        second_unet = UNet2DConditionModel(**sd15_unet_config()).eval()
        touch(second_unet)
        after_copy = rss_gb()
        count = {
            "unet": sum(p.numel() for n, p in unet.named_parameters() if "lora" not in n),
            "controlnet": sum(p.numel() for p in controlnet.parameters()),
            "lora_per_task": sum(
                p.numel() for n, p in unet.named_parameters() if ".lora_" in n and ".inpaint." in n
            ),  # fmt: skip
        }
        del second_unet
    result = {
        "rank": args.rank,
        "parameters": count,
        "rss_gb": {
            "base_unet": after_base - start,
            "first_task": after_one - after_base,
            "second_task": after_two - after_one,
            "second_unet_copy": after_copy - after_two,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
