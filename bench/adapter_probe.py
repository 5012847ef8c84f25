"""Does a trained adapter use the condition? One-step x-predictions on held-out patches.

    python bench/adapter_probe.py --ckpt bench_out/logs/codi/version_0/checkpoints/last.ckpt

For each timestep t, noises the test patches to z_t (fixed seed) and reports the PSNR
of the consistency function f(z_t, t) (VP: c_skip z_t + c_out x_hat; flow: x_hat)
against the clean patch for the teacher (no adapter), the online and the EMA-target
adapted models, next to the PSNR of the bicubic condition itself. An adapter that uses the low-resolution input beats the teacher
clearly at large t, where z_t carries almost no signal.
"""

from __future__ import annotations

import argparse

import torch

from codi_lightning.data import ShardDataModule, float_pixels
from codi_lightning.diffusion import to_x_eps
from codi_lightning.training import CoDiDistillation


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


@torch.no_grad()
def probe(ckpt: str, shards: str, n: int = 64, timesteps=(999, 759, 499, 259, 19)) -> dict:
    m = CoDiDistillation.load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = ShardDataModule(None, shards, resolution=32, batch_size=n, num_workers=0,
                         condition="sr", resize_shorter=False)  # fmt: skip
    batch = float_pixels(next(iter(dm.test_dataloader())))
    x, cond = batch["image"], batch["cond"]
    text = m.encode_text([""] * len(x))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out = {"bicubic": round(psnr(cond * 2 - 1, x), 2)}
    for t_int in timesteps:
        t = torch.full((len(x),), t_int)
        a, s = m.schedule.alpha_sigma(t, x)
        z = a * x + s * noise
        row = {}
        for which in ("teacher", "online", "target"):
            o = m.denoiser(which, text, m.adapter_condition(cond))(z, t)
            x_hat, _ = to_x_eps(o, z, a, s, m.schedule.prediction_type)
            row[which] = round(psnr(m.schedule.boundary(z, x_hat, t).clamp(-1, 1), x), 2)
        out[t_int] = row
    cn = m.controlnet
    # the zero-initialised output layers (ControlNet: controlnet_down_blocks; SD3's:
    # controlnet_blocks)
    blocks = getattr(cn, "controlnet_down_blocks", None) or cn.controlnet_blocks
    zero = [blk.weight.abs().mean().item() for blk in blocks]
    out["zero_conv_mean_abs"] = round(sum(zero) / len(zero), 4)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--shards", default="bench_out/data/test-000000.tar")
    args = parser.parse_args()
    for key, value in probe(args.ckpt, args.shards).items():
        print(key, value)
