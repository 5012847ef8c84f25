"""What cached latents and text embeddings save, and what their latent-space crops cost.

    python bench/cache_savings.py                      # SD 1.5-sized, 256 px, CPU, ~5 min
    python bench/cache_savings.py --size 512 --device cuda --dtype bf16
    python bench/cache_savings.py --pretrained <SD folder>   # the real VAE's crop error

1. **Time.** SD 1.5-sized networks built from config with random weights (timings do not
   depend on weight values; nothing is downloaded): the VAE (83.7M), the CLIP ViT-L text
   encoder (123.1M), the UNet (859.5M) and its ControlNet. Medians of ``--repeats`` calls
   of VAE encode, text encode, and one PE-CoDi training step on ready latents (online
   ControlNet + UNet forward and backward, EMA target forward, the project's
   ``codi_loss``; no optimizer). A step without the cache costs encode + step; with it,
   the step alone.
2. **Crops in latent space.** The cache stores the latents of the whole image; a crop
   takes the matching window. Against encoding the crop itself, the window differs
   where the encoder sees past the crop's border. Measured on a smooth 1.5x-wide image
   (``--crop_image``) for a crop at the image's left edge and one in its interior: the
   mean absolute difference of the posterior means, relative to their mean absolute
   value, over the whole window and over its outer latent ring. With random weights the
   number says how far the encoder's receptive field reaches, not what a trained VAE
   gives; ``--pretrained`` measures the real VAE.

Numbers: docs/performance.md ("Cached latents and text embeddings").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codi_lightning.diffusion import CoDiLossConfig, NoiseSchedule, codi_loss
from codi_lightning.testing.tiny import SD_SCHEDULER

# CLIP ViT-L/14's text tower (SD 1.x's text encoder)
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
          "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
          "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 512}  # fmt: skip


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def smooth_image(w: int, h: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8))
    arr = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


@torch.no_grad()
def crop_error(vae, size: int, device: torch.device) -> dict:
    """Window of the whole image's latents against the encoding of the crop."""
    g = 2 ** (len(vae.config.block_out_channels) - 1)
    width = 3 * size // 2 // g * g
    image = smooth_image(width, size).to(device, vae.dtype)
    whole = vae.encode(image).latent_dist.mean.float()
    out = {}
    for name, left in (("edge", 0), ("interior", (width - size) // 2 // g * g)):
        crop = vae.encode(image[..., left : left + size]).latent_dist.mean.float()
        window = whole[..., left // g : (left + size) // g]
        diff = (window - crop).abs()
        ring = torch.ones_like(diff[0, 0], dtype=torch.bool)
        ring[1:-1, 1:-1] = False
        scale = crop.abs().mean()
        out[name] = {"mean": (diff.mean() / scale).item(),
                     "outer_ring": (diff[..., ring].mean() / scale).item(),
                     "inside_ring": (diff[..., ~ring].mean() / scale).item()}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--pretrained", help="an SD folder: the crop error of its real VAE")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (plumbing check)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from codi_lightning.testing.tiny import tiny_text_config, tiny_unet_config, tiny_vae_config

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    with device:
        vae = AutoencoderKL(**(tiny_vae_config() if args.tiny else SD_VAE)).eval()
        text = CLIPTextModel(CLIPTextConfig(**(tiny_text_config(1000) if args.tiny else CLIP_L)))
        unet_cfg = tiny_unet_config() if args.tiny else {"cross_attention_dim": 768}
        unet = UNet2DConditionModel(**unet_cfg).requires_grad_(False).eval()
        channels = (16, 32, 96) if args.tiny else (16, 32, 96, 256)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
        target = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    if dtype != torch.float32:
        for m in (vae, text, unet, controlnet, target):
            m.to(dtype)
    target.requires_grad_(False).eval()
    g = 2 ** (len(vae.config.block_out_channels) - 1)
    b, s = args.batch, args.size
    pixels = torch.rand(b, 3, s, s, device=device, dtype=dtype) * 2 - 1
    ids = torch.randint(0, text.config.vocab_size, (b, text.config.max_position_embeddings),
                        device=device)  # fmt: skip
    with torch.no_grad():
        y = text(ids)[0]
        x = vae.encode(pixels).latent_dist.sample()
    cond = torch.rand(b, 3, s, s, device=device, dtype=dtype)
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)

    def net(adapter):
        def f(z, t):
            down, mid = adapter(z.to(dtype), t, encoder_hidden_states=y, controlnet_cond=cond,
                                return_dict=False)  # fmt: skip
            return unet(z.to(dtype), t, encoder_hidden_states=y,
                        down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample  # fmt: skip

        return f

    def step():
        t = torch.full((b,), 499, device=device)
        loss, _ = codi_loss(net(controlnet), net(target), None, x.float(), torch.randn_like(x.float()),
                            t, t - 20, schedule, CoDiLossConfig())  # fmt: skip
        loss.backward()
        controlnet.zero_grad(set_to_none=True)

    with torch.no_grad():
        vae_s = timed(lambda: vae.encode(pixels).latent_dist.mean, args.repeats, device)
        text_s = timed(lambda: text(ids)[0], args.repeats, device)
    step_s = timed(step, args.repeats, device)
    record = {
        "device": str(device), "dtype": args.dtype, "size": s, "batch": b, "latent": s // g,
        "vae_encode_s": vae_s, "text_encode_s": text_s, "step_s": step_s,
        "uncached_step_s": vae_s + text_s + step_s,
        "cache_speedup": (vae_s + text_s + step_s) / step_s,
        "crop_error_random_vae": crop_error(vae.float(), s, device),
    }  # fmt: skip
    if args.pretrained:
        real = AutoencoderKL.from_pretrained(args.pretrained, subfolder="vae").to(device).eval()
        record["crop_error_pretrained_vae"] = crop_error(real, s, device)
    print(json.dumps(record, indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
