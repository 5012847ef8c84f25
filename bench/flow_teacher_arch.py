"""Which transformer learns the digits flow teacher's target fastest: a fresh SD3-style
or SANA transformer fitted to the UNet digits teacher's velocity, probed as it trains.

    python bench/flow_teacher_arch.py sd3 750     # ~7 min on one thread
    python bench/flow_teacher_arch.py sana 500    # ~11 min on one thread

The layouts are those of ``configs/digits/flow_teacher.yaml``'s tries (6 blocks of width
128; SD3: 4x4 patches, SANA: 2x2). The target is ``DiffusionTraining``'s with
``velocity_teacher``: the UNet's ``(z - x_T) / sigma`` where its noise levels reach, the
data velocity elsewhere; sigma uniform, batch 32, AdamW at ``--lr``, EMA 0.999 with
warm-up. Every 250 steps it prints the clean-image error ``x_hat = z - sigma v`` of the
EMA weights on 256 test digits at sigma 0.5 / 0.7 / 0.9 (``bench/flow_teacher_probe.py``'s
measure; the UNet scores 0.013 / 0.042 / 0.165). Needs ``python bench/digits_data.py``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def build(arch: str):
    """The network and its call ``(net, z, sigma) -> v`` with constant (empty) text."""
    from diffusers import SanaTransformer2DModel, SD3Transformer2DModel

    if arch == "sd3":
        net = SD3Transformer2DModel(
            sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=6,
            attention_head_dim=32, num_attention_heads=4, joint_attention_dim=96,
            caption_projection_dim=128, pooled_projection_dim=72, pos_embed_max_size=16,
        )  # fmt: skip

        def call(m, z, sigma):
            n = len(z)
            return m(hidden_states=z, timestep=1000 * sigma.view(-1),
                     encoder_hidden_states=torch.zeros(n, 16, 96),
                     pooled_projections=torch.zeros(n, 72), return_dict=False)[0]  # fmt: skip

        return net, call
    net = SanaTransformer2DModel(
        in_channels=3, out_channels=3, num_attention_heads=4, attention_head_dim=32,
        num_layers=6, num_cross_attention_heads=4, cross_attention_head_dim=32,
        cross_attention_dim=128, caption_channels=32, sample_size=32, patch_size=2,
    )  # fmt: skip

    def call(m, z, sigma):
        n = len(z)
        return m(z, encoder_hidden_states=torch.zeros(n, 4, 32),
                 encoder_attention_mask=torch.ones(n, 4), timestep=1000 * sigma.view(-1),
                 return_dict=False)[0]  # fmt: skip

    return net, call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arch", choices=["sd3", "sana"])
    parser.add_argument("steps", type=int)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data", default=str(ROOT / "bench_out" / "digits"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from codi_lightning.data import ShardDataModule, float_pixels
    from codi_lightning.diffusion import schedule_from_config, to_x_eps, vp_view_of_flow
    from codi_lightning.models import load_teacher

    teacher = load_teacher(str(ROOT / "bench" / "assets" / "digits_teacher"), pixel_space=True)
    schedule = schedule_from_config(teacher.scheduler_config)
    abar = schedule.alphas_cumprod[[0, -1]]
    low, high = ((1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt())).tolist()
    text = teacher.prompt_encoder.encode([""], "cpu").expand(BATCH)

    def digits(urls: str, n: int) -> torch.Tensor:
        dm = ShardDataModule(None, urls, resolution=32, batch_size=n, num_workers=0,
                             condition="sr", sr_factor=8, resize_shorter=False)  # fmt: skip
        return float_pixels(next(iter(dm.test_dataloader())))["image"].float()

    train = digits(f"{args.data}/train-{{000000..000003}}.tar", 4000)
    test = digits(f"{args.data}/test-000000.tar", 256)

    @torch.no_grad()
    def teacher_velocity(z, sigma):
        t, a, b = vp_view_of_flow(schedule.alphas_cumprod, sigma)
        out = teacher.family.forward(teacher.network, None, (a + b) * z, t.view(-1), text, None)
        x_t = to_x_eps(out.float(), (a + b) * z, a, b, schedule.prediction_type)[0]
        return (z - x_t) / sigma

    net, call = build(args.arch)
    print(f"{args.arch}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    probe_noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def probe() -> list[float]:
        errors = []
        for level in (0.5, 0.7, 0.9):
            sigma = torch.full((len(test), 1, 1, 1), level)
            z = (1 - sigma) * test + sigma * probe_noise
            errors.append(round(float((z - sigma * call(ema, z, sigma) - test).square().mean()), 4))
        return errors

    start = time.time()
    for step in range(1, args.steps + 1):
        x = train[torch.randint(0, len(train), (BATCH,))]
        noise = torch.randn_like(x)
        sigma = torch.rand(BATCH, 1, 1, 1) * 0.999 + 0.001
        z = (1 - sigma) * x + sigma * noise
        reach = (sigma >= low) & (sigma <= high)
        target = torch.where(reach, teacher_velocity(z, sigma.clamp(low, high)), noise - x)
        loss = F.mse_loss(call(net, z, sigma), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}: {(time.time() - start) / step:.2f} s a step, loss "
                  f"{loss.item():.4f}, x_hat MSE at sigma 0.5/0.7/0.9: {probe()}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
