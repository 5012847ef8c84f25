"""How well a flow teacher of the digits testbed predicts clean digits, by noise level.

    python bench/flow_teacher_probe.py bench/assets/digits_flow_teacher [more folders]

For 256 test digits x and noise eps, z = (1 - sigma) x + sigma eps at several sigma; the
teacher's velocity v gives x_hat = z - sigma v. Prints, per sigma, the mean squared error
of x_hat against x beside the error of the best constant (the mean training digit), and
how much x_hat varies across the batch. A teacher whose samples from noise are digits
must beat the mean digit at every sigma (at sigma = 1 the best it can do IS the mean):
an x_hat error above the mean digit's at high sigma is the noise leaking through.

A VP teacher folder (the UNet digits teacher) is probed on the same flow states, seen
through ``diffusion.vp_view_of_flow`` (the VP timestep of the same noise level, the state
scaled by ``a + b``); a sigma above its highest noise level is left out (``-``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0)


def probe(folder: str, shards: str, train: str) -> list[dict]:
    from codi_lightning.data import ShardDataModule, float_pixels
    from codi_lightning.diffusion import (
        FlowSchedule,
        schedule_from_config,
        to_x_eps,
        vp_view_of_flow,
    )
    from codi_lightning.models import load_teacher

    parts = load_teacher(folder, pixel_space=True)
    schedule = schedule_from_config(parts.scheduler_config)

    def clean_estimate(z, sigma, text):
        if isinstance(schedule, FlowSchedule):  # fed 1000 sigma, as model_timesteps
            v = parts.family.forward(parts.network, None, z, 1000 * sigma.view(-1), text, None)
            return z - sigma * v
        t, a, b = vp_view_of_flow(schedule.alphas_cumprod, sigma)  # a VP teacher
        out = parts.family.forward(parts.network, None, (a + b) * z, t.view(-1), text, None)
        return to_x_eps(out, (a + b) * z, a, b, schedule.prediction_type)[0]

    def digits(urls: str) -> torch.Tensor:
        dm = ShardDataModule(None, urls, resolution=32, batch_size=256, num_workers=0,
                             condition="sr", sr_factor=8, resize_shorter=False)  # fmt: skip
        return float_pixels(next(iter(dm.test_dataloader())))["image"].float()

    x, mean = digits(shards), digits(train).mean(0, keepdim=True)
    text = parts.prompt_encoder.encode([""] * len(x), "cpu")
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for level in SIGMAS:
            sigma = torch.full((len(x), 1, 1, 1), level)
            z = (1 - sigma) * x + sigma * torch.randn(x.shape, generator=g)
            row = {"sigma": round(float(sigma[0]), 3), "mse": None, "spread": None,
                   "mean_digit_mse": float((mean - x).square().mean())}  # fmt: skip
            try:
                x_hat = clean_estimate(z, sigma, text)
            except ValueError:  # beyond a VP teacher's highest noise level
                rows.append(row)
                continue
            row.update(mse=float((x_hat - x).square().mean()), spread=float(x_hat.std(0).mean()))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--shards", default=str(ROOT / "bench_out/digits/test-000000.tar"))
    parser.add_argument("--train", default=str(ROOT / "bench_out/digits/train-000000.tar"))
    args = parser.parse_args()
    for folder in args.folders:
        print(folder)
        print("| sigma | x_hat MSE | mean digit MSE | x_hat spread |\n|---|---|---|---|")
        for r in probe(folder, args.shards, args.train):
            mse, spread = (f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("mse", "spread"))
            print(f"| {r['sigma']:.3f} | {mse} | {r['mean_digit_mse']:.3f} | {spread} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
