"""Per-patch cost of an evaluation forward (toy ControlNet + UNet) against batch size.

    OMP_NUM_THREADS=1 python bench/eval_batch.py [--config configs/toy/baseline.yaml]

Sampling dominates the toy test (the baseline's 62 DDIM steps on 512 patches); on one
thread small batches stay in cache, which is why the toy configs test in batches of 32
(docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from codi_lightning.cli import CoDiCLI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/toy/baseline.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; median")
    args = parser.parse_args()
    cli = CoDiCLI(args=["--config", args.config, "--trainer.logger", "false"], run=False)
    model = cli.model.eval()
    size = cli.datamodule.hparams.resolution
    channels = model.network.config.in_channels
    print(f"torch threads: {torch.get_num_threads()}")
    times: dict[int, list[float]] = {b: [] for b in args.batches}
    with torch.no_grad():
        for _ in range(args.rounds):  # interleaved, so drifts of a shared machine hit all
            for b in args.batches:
                z, cond = torch.randn(b, channels, size, size), torch.rand(b, 3, size, size)
                cond = model.adapter_condition(cond)
                forward = model.denoiser("target", model.empty_text(b), cond)
                t = torch.full((b,), 500)
                forward(z, t)  # warm-up
                start = time.perf_counter()
                forward(z, t)
                times[b].append((time.perf_counter() - start) / b * 1000)
    for b, ms in times.items():
        print(f"batch {b:4d}: {statistics.median(ms):.1f} ms a patch "
              f"(range {min(ms):.1f}-{max(ms):.1f} over {args.rounds} rounds)")  # fmt: skip


if __name__ == "__main__":
    main()
