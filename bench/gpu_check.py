"""GPU check: CoDi training-step throughput, memory and MFU at SD 1.5 size, and sampling latency.

    python bench/gpu_check.py --out bench/gpu_check.json        # on one GPU, ~3-5 min
    python bench/gpu_check.py --tiny --device cpu --steps 1     # syntax/plumbing check on CPU

An SD 1.5-sized UNet (859.5M) and its ControlNet are built from config with random
weights (timings do not depend on weight values); latents (64x64x4, i.e. 512 px) and
text embeddings (77x768) are random, so VAE and text-encoder time is excluded. Each
configuration runs the project's CoDi loss (online + solver reuse + EMA target), AdamW
and the EMA update under bf16 autocast, for PE-CoDi and full CoDi, with and without
FSDP2 (one-rank mesh: the wrapping overhead, not multi-GPU scaling) and activation
checkpointing. FLOPs of one step are counted with torch.utils.flop_counter; MFU divides
achieved FLOP/s by the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from codi_lightning.diffusion import (
    CoDiLossConfig,
    NoiseSchedule,
    codi_loss,
    ema_update,
    sample,
    sampling_timesteps,
)
from codi_lightning.models.tiny import SD_SCHEDULER, tiny_unet_config
from codi_lightning.training.parallel import shard_blocks

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def sd15_unet_config() -> dict:
    return {"sample_size": 64, "cross_attention_dim": 768}  # diffusers defaults = SD 1.5 otherwise


def build(tiny: bool, method: str, device: torch.device):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    cfg = tiny_unet_config() if tiny else sd15_unet_config()
    unet = UNet2DConditionModel(**cfg).to(device).requires_grad_(False).eval()
    channels = (16, 32, 96) if tiny else (16, 32, 96, 256)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels).to(
        device
    )
    student = copy.deepcopy(unet).requires_grad_(True).train() if method == "codi" else None
    return unet, controlnet, student


def controlled(unet, controlnet, z, t, text, cond):
    down, mid = controlnet(
        z, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False
    )
    return unet(z, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample  # fmt: skip


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_config(args, method: str, fsdp: bool, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    unet, controlnet, student = build(args.tiny, method, device)
    trained = {"controlnet": controlnet} | ({"unet": student} if student is not None else {})
    if checkpointing:
        for m in [unet, *trained.values()]:
            m.enable_gradient_checkpointing()
    target = {k: copy.deepcopy(m).requires_grad_(False).eval() for k, m in trained.items()}
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (1,))
        for k in trained:
            shard_blocks(trained[k], mesh)
            shard_blocks(target[k], mesh)
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    latent = 8 if args.tiny else 64
    text_dim = 32 if args.tiny else 768
    b = args.batch
    x = torch.randn(b, 4, latent, latent, device=device)
    text = torch.randn(b, 77, text_dim, device=device)
    pixels = latent * (4 if args.tiny else 8)  # the tiny adapter downsamples by 4, SD's by 8
    cond = torch.rand(b, 3, pixels, pixels, device=device)
    online_unet = student if student is not None else unet
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        noise = torch.randn_like(x)
        t = torch.full((b,), 499, device=device)
        s = t - 20
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss, _ = codi_loss(
                lambda z, tt: controlled(online_unet, controlnet, z, tt, text, cond),
                lambda z, tt: controlled(target.get("unet", unet), target["controlnet"], z, tt, text, cond),
                None, x, noise, t, s, schedule, CoDiLossConfig(),
            )  # fmt: skip
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k in trained:
            for m in (trained[k], target[k]):
                if hasattr(m, "reshard"):
                    m.reshard()
            ema_update(target[k].parameters(), trained[k].parameters(), 0.999)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, cuDNN autotuning)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - start) / args.steps
    row = {
        "method": method, "fsdp2": fsdp, "checkpointing": checkpointing, "batch": b,
        "step_s": dt, "samples_per_s": b / dt, "tflops_per_step": flops / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
    }  # fmt: skip
    peak = peak_tflops(device)
    row["mfu"] = flops / dt / (peak * 1e12) if peak else None
    return row


@torch.no_grad()
def sampling_latency(args) -> dict:
    device = torch.device(args.device)
    unet, controlnet, _ = build(args.tiny, "pe-codi", device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet.to(dtype)
    controlnet.to(dtype)
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    latent = 8 if args.tiny else 64
    text = torch.randn(1, 77, 32 if args.tiny else 768, device=device, dtype=dtype)
    pixels = latent * (4 if args.tiny else 8)
    cond = torch.rand(1, 3, pixels, pixels, device=device, dtype=dtype)
    noise = torch.randn(1, 4, latent, latent, device=device)

    def student(z, t):
        return controlled(unet, controlnet, z.to(dtype), t, text, cond)

    def teacher(z, t):
        return unet(z.to(dtype), t, encoder_hidden_states=text).sample

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        reps = max(1, args.steps)
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    four = timed(lambda: sample(student, noise, schedule, sampling_timesteps(4)))
    fifty = timed(lambda: sample(teacher, noise, schedule, sampling_timesteps(50, 1000, 50)))
    return {"codi_4_steps_s": four, "teacher_50_steps_s": fifty, "speedup": fifty / four}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU plumbing check)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--out", default="bench/gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    rows = []
    for method in ("pe-codi", "codi"):
        for fsdp in (False, True):
            for checkpointing in (False, True):
                try:
                    rows.append(train_config(args, method, fsdp, checkpointing))
                except torch.cuda.OutOfMemoryError:
                    rows.append(
                        {
                            "method": method,
                            "fsdp2": fsdp,
                            "checkpointing": checkpointing,
                            "oom": True,
                        }
                    )
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # free the last configuration
                print(json.dumps(rows[-1]), flush=True)
    latency = sampling_latency(args)
    print(json.dumps(latency), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "train": rows,
                                          "sampling": latency, "tiny": args.tiny}, indent=2))  # fmt: skip
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
