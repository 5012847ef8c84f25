"""GPU check: CoDi training-step throughput, memory and MFU at SD 1.5, SDXL,
SD3.5-medium and SANA 1600M size (FLUX.1-dev size on request), and sampling latency.

    python bench/gpu_check.py --out bench/gpu_check.json        # on one GPU, all models
    python bench/gpu_check.py --models sd15                     # SD 1.5 only, ~3-5 min
    python bench/gpu_check.py --tiny --device cpu --steps 1     # syntax/plumbing check on CPU

Five models, each a network and its adapter built from config with random weights
(timings do not depend on weight values; nothing is downloaded):

- ``sd15``: SD 1.5-sized UNet (859.5M); latents 64x64x4 (512 px), text 77x768; batch
  ``--batch``.
- ``sdxl``: the UNet of stabilityai/stable-diffusion-xl-base-1.0 (2567.5M; its
  unet/config.json written out below), its ControlNet (1251.0M); latents 128x128x4
  (1024 px), text 77x2048 plus SDXL's added conditions (pooled text [B, 1280],
  time_ids [B, 6]) to UNet and adapter; batch ``--sdxl_batch``.
- ``sd35m``: an SD3.5-medium-sized rectified-flow transformer (24 joint blocks of width
  1536, dual attention in blocks 0-12, RMS QK norm, 2x2 patches: 2243.2M parameters as
  configured below, from the published architecture description, not checked against
  the hub's config file) and its ``SD3ControlNetModel`` of 12 blocks (1261.2M); latents
  128x128x16 (1024 px), text 333x4096 (77 CLIP + 256 T5 tokens), pooled 2048, condition
  latents 128x128x16; the flow schedule with shift 3; batch ``--sdxl_batch``.
- ``flux1d`` (only when asked for: ``--models flux1d``): the FLUX.1-dev transformer as
  configured below from the published config (19 double- and 38 single-stream blocks of
  24 heads of 128, guidance embedding: 11901.4M parameters) and its
  ``FluxControlNetModel`` of 5 double-stream blocks (1791.6M, as configs/flux_sr.yaml);
  latents 128x128x16 (1024 px) packed into 4096 tokens, text 512x4096 (T5), pooled 768,
  guidance 3.5; the schedule shifted for 4096 tokens; batch ``--sdxl_batch``. Full CoDi
  trains a 12B copy: expect ``oom`` on one card.
- ``sana1600m``: the SANA 1600M transformer as configured below (20 blocks of width 2240,
  linear self-attention, cross-attention to Gemma 2 2B states: 1604.5M parameters) and
  its ``SanaControlNetModel`` of 7 blocks (631.6M, as configs/sana_sr.yaml); latents
  32x32x32 (1024 px through the 32x DC-AE), text 300x2304 with an attention mask (60
  prompt tokens); the flow schedule with shift 3; batch ``--sdxl_batch``.

Latents and text embeddings are random, so VAE and text-encoder time is excluded. Each
configuration runs the project's CoDi loss (online + solver reuse + EMA target), AdamW
and the EMA update under bf16 autocast, for PE-CoDi and full CoDi, with and without
FSDP2 (one-rank mesh: the wrapping overhead, not multi-GPU scaling) and activation
checkpointing; a configuration that does not fit is recorded as ``oom`` (SDXL full CoDi
holds ~76 GB of fp32 states alone on one card). FLOPs of one step are counted with
torch.utils.flop_counter; MFU divides achieved FLOP/s by the card's dense bf16 peak.
``--tiny`` runs the same code on the tiny SD, SDXL, SD3, Flux and SANA networks
(``codi_lightning.testing.tiny``). The networks and adapters are built and called as the
training module does, through the family records (``models.teachers``).
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
    codi_loss,
    ema_update,
    sample,
    sampling_timesteps,
    schedule_from_config,
)
from codi_lightning.models import Conditioning
from codi_lightning.models.teachers import FAMILIES, flux
from codi_lightning.testing.tiny import (
    FLUX_SCHEDULER,
    SANA_SCHEDULER,
    SD3_SCHEDULER,
    SD_SCHEDULER,
    TINY_SANA_TEXT_DIM,
    TINY_SD3_JOINT_DIM,
    TINY_SD3_T5_LENGTH,
    TINY_SDXL_POOLED,
    TINY_SDXL_TEXT_WIDTHS,
    tiny_flux_transformer_config,
    tiny_sana_transformer_config,
    tiny_sd3_transformer_config,
    tiny_sdxl_unet_config,
    tiny_unet_config,
)
from codi_lightning.training.parallel import shard_blocks

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def sd15_unet_config() -> dict:
    return {"sample_size": 64, "cross_attention_dim": 768}  # diffusers defaults = SD 1.5 otherwise


def sdxl_unet_config() -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the entries that differ
    from diffusers' defaults): 2,567,463,684 parameters."""
    return {
        "sample_size": 128,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # pooled 1280 + 6 time_ids x 256
    }


def sd35m_transformer_config() -> dict:
    """An SD3.5-medium-sized SD3Transformer2DModel (MMDiT-X): 24 joint blocks of 24 heads
    of 64, dual attention in blocks 0-12, RMS QK norm, 2x2 patches of 16-channel latents,
    joint attention over the 4096-wide T5 / padded CLIP sequence, pooled text 2048."""
    return {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
        "joint_attention_dim": 4096, "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
    }  # fmt: skip


def flux1_dev_transformer_config() -> dict:
    """The FLUX.1-dev FluxTransformer2DModel: 19 double- and 38 single-stream blocks of 24
    heads of 128 (rotary axes 16 + 56 + 56) on 2x2-packed 16-channel latents, T5 width
    4096, CLIP-L pooled 768, a guidance embedding."""
    return {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
    }  # fmt: skip


def sana1600m_transformer_config() -> dict:
    """The SANA 1600M (1024 px) SanaTransformer2DModel: 20 blocks of 70 heads of 32
    (linear self-attention), cross-attention of 20 heads of 112 to Gemma 2 2B's 2304-wide
    states, a GLU MBConv feed-forward of ratio 2.5, 1x1 patches of 32-channel DC-AE
    latents: 1604.5M parameters."""
    return {
        "in_channels": 32, "out_channels": 32, "num_attention_heads": 70,
        "attention_head_dim": 32, "num_layers": 20, "num_cross_attention_heads": 20,
        "cross_attention_head_dim": 112, "cross_attention_dim": 2240,
        "caption_channels": 2304, "mlp_ratio": 2.5, "sample_size": 32, "patch_size": 1,
    }  # fmt: skip


# per model: family, network config, latent size, latent channels, VAE factor, adapter
# embedder widths (UNets), text length and width, pooled-text width (None: none)
MODELS = {
    "sd15": ("sd", sd15_unet_config, 64, 4, 8, (16, 32, 96, 256), 77, 768, None),
    "sdxl": ("sdxl", sdxl_unet_config, 128, 4, 8, (16, 32, 96, 256), 77, 2048, 1280),
    "sd35m": ("sd3", sd35m_transformer_config, 128, 16, 8, None, 77 + 256, 4096, 2048),
    "flux1d": ("flux", flux1_dev_transformer_config, 128, 16, 8, None, 512, 4096, 768),
    "sana1600m": ("sana", sana1600m_transformer_config, 32, 32, 32, None, 300, 2304, None),
}
TINY_MODELS = {
    "sd15": ("sd", tiny_unet_config, 8, 4, 4, (16, 32, 96), 77, 32, None),
    "sdxl": ("sdxl", tiny_sdxl_unet_config, 8, 4, 4, (16, 32, 96), 77,
             sum(TINY_SDXL_TEXT_WIDTHS), TINY_SDXL_POOLED),
    "sd35m": ("sd3", tiny_sd3_transformer_config, 8, 16, 4, None, 77 + TINY_SD3_T5_LENGTH,
              TINY_SD3_JOINT_DIM, 32 + TINY_SDXL_POOLED),
    "flux1d": ("flux", tiny_flux_transformer_config, 8, 16, 4, None, TINY_SD3_T5_LENGTH,
               TINY_SD3_JOINT_DIM, 32),
    "sana1600m": ("sana", tiny_sana_transformer_config, 4, 8, 8, None, 16,
                  TINY_SANA_TEXT_DIM, None),
}  # fmt: skip
ADAPTER_LAYERS = {"flux": 5, "sana": 7}  # configs/flux_sr.yaml, configs/sana_sr.yaml


def spec(args, model: str) -> dict:
    family, config, latent, ch, vae_scale, widths, length, text_dim, pooled = (
        TINY_MODELS if args.tiny else MODELS
    )[model]
    return {"family": family, "config": config(), "latent": latent, "latent_channels": ch,
            "pixels": latent * vae_scale, "channels": widths, "text_len": length,
            "text_dim": text_dim, "pooled": pooled}  # fmt: skip


def build(spec: dict, method: str, device: torch.device):
    """Built on ``device`` (random init there: seconds, not minutes, at SDXL size)."""

    import diffusers

    family = FAMILIES[spec["family"]]
    torch.manual_seed(0)
    with device:
        network = getattr(diffusers, family.network[1])
        unet = network(**spec["config"]).requires_grad_(False).eval()
        if family.build_adapter is not None:  # the family's adapter, as the module builds it
            layers = ADAPTER_LAYERS.get(family.name)
            depth = unet.config.num_layers
            controlnet = family.build_adapter(unet, min(layers, depth) if layers else None)
        else:
            controlnet = diffusers.ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=spec["channels"]
            )
    student = copy.deepcopy(unet).requires_grad_(True).train() if method == "codi" else None
    return unet, controlnet, student


def schedule_of(spec: dict):
    if spec["family"] == "flux":  # shifted for this many packed tokens
        return schedule_from_config(FLUX_SCHEDULER, (spec["latent"] // 2) ** 2)
    configs = {"sd3": SD3_SCHEDULER, "sana": SANA_SCHEDULER}
    return schedule_from_config(configs.get(spec["family"], SD_SCHEDULER))


def conditioning(spec: dict, batch: int, device: torch.device, dtype=None) -> Conditioning:
    """Random text [B, L, D]; SDXL: pooled text and time_ids (original = target size,
    crop (0, 0)) as added conditions; SD3: the pooled projections; Flux: those and the
    guidance scale."""
    text = torch.randn(batch, spec["text_len"], spec["text_dim"], device=device, dtype=dtype)
    if spec["family"] == "sana":  # Gemma's states and their mask (a prompt of 60 tokens)
        mask = torch.zeros(batch, spec["text_len"], device=device, dtype=torch.long)
        mask[:, :60] = 1
        return Conditioning(text, {"encoder_attention_mask": mask})
    if spec["pooled"] is None:
        return Conditioning(text)
    pooled = torch.randn(batch, spec["pooled"], device=device, dtype=dtype)
    if spec["family"] == "sd3":
        return Conditioning(text, {"pooled_projections": pooled})
    if spec["family"] == "flux":
        guidance = torch.full((batch,), flux.GUIDANCE, device=device)
        return Conditioning(text, {"pooled_projections": pooled, "guidance": guidance})
    size = spec["pixels"]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device)
    return Conditioning(text, {"text_embeds": pooled, "time_ids": time_ids.float()})


def condition(spec: dict, batch: int, device: torch.device, dtype=None) -> torch.Tensor:
    """The adapter's input: pixels in [0, 1] (ControlNet) or latents (SD3's and Flux's
    adapters)."""
    if FAMILIES[spec["family"]].latent_condition:
        shape = (batch, spec["latent_channels"], spec["latent"], spec["latent"])
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.rand(batch, 3, spec["pixels"], spec["pixels"], device=device, dtype=dtype)


def controlled(spec: dict, schedule, unet, controlnet, z, t, y: Conditioning, cond):
    """The network with the adapter (None: the teacher alone), called the module's way."""
    return FAMILIES[spec["family"]].forward(
        unet, controlnet, z, schedule.model_timesteps(t), y, cond
    )


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_config(args, model: str, method: str, fsdp: bool, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    s = spec(args, model)
    unet, controlnet, student = build(s, method, device)
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
    schedule = schedule_of(s)
    b = args.batch if model == "sd15" else args.sdxl_batch
    x = torch.randn(b, s["latent_channels"], s["latent"], s["latent"], device=device)
    text = conditioning(s, b, device)
    cond = condition(s, b, device)
    online_unet = student if student is not None else unet
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        noise = torch.randn_like(x)
        t = torch.full((b,), 499, device=device)
        t_s = t - 20
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss, _ = codi_loss(
                lambda z, tt: controlled(s, schedule, online_unet, controlnet, z, tt, text, cond),
                lambda z, tt: controlled(s, schedule, target.get("unet", unet),
                                         target["controlnet"], z, tt, text, cond),
                None, x, noise, t, t_s, schedule, CoDiLossConfig(),
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
        "model": model, "resolution": s["pixels"], "method": method, "fsdp2": fsdp,
        "checkpointing": checkpointing, "batch": b,
        "step_s": dt, "samples_per_s": b / dt, "tflops_per_step": flops / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
    }  # fmt: skip
    peak = peak_tflops(device)
    row["mfu"] = flops / dt / (peak * 1e12) if peak else None
    return row


@torch.no_grad()
def sampling_latency(args, model: str) -> dict:
    device = torch.device(args.device)
    s = spec(args, model)
    unet, controlnet, _ = build(s, "pe-codi", device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    unet.to(dtype)
    controlnet.to(dtype)
    schedule = schedule_of(s)
    text = conditioning(s, 1, device, dtype)
    cond = condition(s, 1, device, dtype)
    noise = torch.randn(1, s["latent_channels"], s["latent"], s["latent"], device=device)

    def student(z, t):
        return controlled(s, schedule, unet, controlnet, z.to(dtype), t, text, cond)

    def teacher(z, t):
        return controlled(s, schedule, unet, None, z.to(dtype), t, text, cond)

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
    return {"resolution": s["pixels"], "codi_4_steps_s": four, "teacher_50_steps_s": fifty,
            "speedup": fifty / four}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU plumbing check)")
    parser.add_argument("--models", default="sd15,sdxl,sd35m,sana1600m",
                        help="comma-separated: sd15, sdxl, sd35m, flux1d, sana1600m")  # fmt: skip
    parser.add_argument("--batch", type=int, default=4, help="batch of the sd15 rows")
    parser.add_argument("--sdxl_batch", type=int, default=2,
                        help="batch of the sdxl, sd35m, flux1d and sana1600m rows (1024 px)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--out", default="bench/gpu_check.json")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        parser.error(f"--models {args.models!r}: choose from {sorted(MODELS)}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    rows, latency = [], {}
    for model in models:
        for method in ("pe-codi", "codi"):
            for fsdp in (False, True):
                for checkpointing in (False, True):
                    try:
                        rows.append(train_config(args, model, method, fsdp, checkpointing))
                    except torch.cuda.OutOfMemoryError:
                        rows.append({"model": model, "method": method, "fsdp2": fsdp,
                                     "checkpointing": checkpointing, "oom": True})  # fmt: skip
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # free the last configuration
                    print(json.dumps(rows[-1]), flush=True)
        try:
            latency[model] = sampling_latency(args, model)
        except torch.cuda.OutOfMemoryError:
            latency[model] = {"oom": True}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({model: latency[model]}), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "train": rows,
                                          "sampling": latency, "tiny": args.tiny}, indent=2))  # fmt: skip
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
