"""Framework overhead of a training step: `fit` against a bare PyTorch loop of the same compute.

    python bench/step_overhead.py                  # 3 rounds x 300 steps, ~15 min on 2 cores
    python bench/step_overhead.py --rounds 1 --steps 20 --warmup 5   # the code paths only

On a tiny Stable-Diffusion folder built offline (latent UNet, VAE and CLIP text encoder
from config; 32 px images -> 8x8x4 latents, batch 4, fp32), three ways of running the
same training steps, each in a fresh process:

- ``memory``: ``codi-lightning fit``'s Trainer and module as the CLI builds them
  (configs/tiny_cpu.yaml with the tiny folder), fed one ready batch over and over from
  an in-memory source: what the framework costs per step;
- ``shards``: the same on real shards through the normal loader (one worker): end to
  end;
- ``bare``: a plain loop over the same ready batch doing the same compute (the module's
  ``compute_loss``: VAE and text encoding, the project's ``codi_loss``; backward, grad
  clipping, AdamW, the EMA update), with no logging, callbacks or progress bar;
- ``cached`` (with ``--cached``): ``shards`` on the same shards after ``codi-lightning
  cache`` (fp16 latents and text embeddings): no VAE or text encoder in the step.

A step's time is the wall time between the ends of two consecutive steps (data fetch,
logging and callbacks included), the median over the timed steps after ``--warmup``.
Rounds interleave the runs (the order rotates each round) so that drifts of a shared
machine hit all of them; the ratios are paired within a round, and the reported ratio is
the median over rounds. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("memory", "shards", "bare")
CACHED = "cached"
METHODS = ("codi", "pe-codi")


def prepare(folder: Path) -> dict[str, str]:
    """The tiny SD teacher folder and shards of generated pictures (once)."""
    from codi_lightning.data import write_cached_shards, write_shards
    from codi_lightning.demo import write_image_folder
    from codi_lightning.testing.tiny import write_tiny_teacher

    folder.mkdir(parents=True, exist_ok=True)
    teacher = write_tiny_teacher(folder / "teacher")
    shards = str(folder / "train-{000000..000003}.tar")
    if not (folder / "train-000000.tar").is_file():
        write_image_folder(folder / "images", 256, seed=0)
        write_shards(str(folder / "images"), str(folder / "train-%06d.tar"), maxcount=64,
                     progress=False)  # fmt: skip
    if not (folder / "cached-000000.tar").is_file():
        write_cached_shards(str(teacher), shards, str(folder / "cached-%06d.tar"),
                            resolution=32, maxcount=64, progress=False)  # fmt: skip
    return {"teacher": str(teacher), "shards": shards,
            "cached": str(folder / "cached-{000000..000003}.tar")}  # fmt: skip


def cli_args(setup: dict[str, str], method: str, steps: int, logs: Path) -> list[str]:
    """configs/tiny_cpu.yaml on the latent tiny folder, validation and mid-run checkpoints
    off (they are not per-step costs), everything else as a user runs it."""
    return [
        "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
        "--model.pretrained", setup["teacher"], "--model.pixel_space", "false",
        "--model.method", method, "--data.train_shards", setup["shards"],
        "--data.batch_size", "4",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.callbacks.every_n_train_steps", str(10 * steps),
        "--trainer.callbacks.dirpath", str(logs / "checkpoints"),
        "--trainer.default_root_dir", str(logs), "--trainer.logger.init_args.save_dir",
        str(logs / "tb"),
    ]  # fmt: skip


def worker(mode: str, method: str, setup: dict[str, str], steps: int, logs: Path) -> list[float]:
    """One run in this process; the wall time of each step (end to end of two steps)."""
    import lightning as L

    from codi_lightning.cli import CoDiCLI
    from codi_lightning.data import float_pixels

    if mode == CACHED:
        setup = {**setup, "shards": setup["cached"]}
    cli = CoDiCLI(args=cli_args(setup, method, steps, logs), run=False)
    model, trainer, data = cli.model, cli.trainer, cli.datamodule
    ends: list[float] = []
    if mode not in ("shards", CACHED):
        data.setup("fit")
        batch = float_pixels(next(iter(data.train_dataloader())))  # one ready batch, reused
        batch.pop("skipped", None)

    if mode == "bare":
        model.configure_model()
        model.train()
        opt = model.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        opt = opt[0] if isinstance(opt, list | tuple) else opt
        params = model.trainable_parameters()
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            loss, _ = model.compute_loss(batch, gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, model.hparams.grad_clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_target()
            ends.append(time.perf_counter())
    else:

        class Clock(L.Callback):
            def on_train_batch_end(self, *args, **kwargs) -> None:
                ends.append(time.perf_counter())

        trainer.callbacks.append(Clock())
        if mode == "memory":
            loader = torch.utils.data.DataLoader(
                _Repeat(batch, steps), batch_size=None, num_workers=0
            )
            trainer.fit(model, train_dataloaders=loader)
        else:  # shards, cached
            trainer.fit(model, datamodule=data)
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


class _Repeat(torch.utils.data.IterableDataset):
    """An iterable of the same ready batch, ``count`` times (the in-memory source)."""

    def __init__(self, batch: dict, count: int) -> None:
        super().__init__()
        self.batch, self.count = batch, count

    def __iter__(self):
        return (self.batch for _ in range(self.count))


def run_one(mode: str, method: str, args: argparse.Namespace, setup: dict, rnd: int) -> float:
    """Median step time (ms) of one run in a fresh process."""
    out = args.out / "runs" / f"{method}-{mode}-r{rnd}"
    cmd = [sys.executable, __file__, "--worker", mode, "--method", method,
           "--steps", str(args.steps + args.warmup), "--out", str(out),
           "--setup", json.dumps(setup)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method} {mode} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    times = json.loads((out / "steps.json").read_text())[args.warmup :]
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "step_overhead")
    parser.add_argument("--cached", action="store_true", help="also fit on cached shards")
    parser.add_argument("--worker", choices=(*MODES, CACHED), help=argparse.SUPPRESS)
    parser.add_argument("--method", default="codi", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.out.mkdir(parents=True, exist_ok=True)
        times = worker(args.worker, args.method, json.loads(args.setup), args.steps, args.out)
        (args.out / "steps.json").write_text(json.dumps(times))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup = prepare(args.out / "setup")
    modes = (*MODES, CACHED) if args.cached else MODES
    rows: dict[str, dict[str, list[float]]] = {m: {k: [] for k in modes} for m in args.methods}
    for rnd in range(args.rounds):
        k = rnd % len(modes)
        order = modes[k:] + modes[:k]  # rotate, so no run always goes first
        for method in args.methods:
            for mode in order:
                ms = run_one(mode, method, args, setup, rnd)
                rows[method][mode].append(ms)
                print(f"round {rnd + 1}/{args.rounds} {method:7s} {mode:6s} {ms:7.1f} ms/step",
                      flush=True)  # fmt: skip
    report = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
              "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "methods": {}}  # fmt: skip
    lines = ["| method | memory (i) | shards (ii) | bare (iii) | (i)/(iii) | (ii)/(iii) |"
             + (" cached (iv) | (iv)/(ii) |" if args.cached else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if args.cached else "")]  # fmt: skip
    for method, r in rows.items():
        framework = [a / b for a, b in zip(r["memory"], r["bare"], strict=True)]
        end_to_end = [a / b for a, b in zip(r["shards"], r["bare"], strict=True)]
        entry = {**r, "framework_ratio": framework, "end_to_end_ratio": end_to_end}
        report["methods"][method] = entry
        med = {k: statistics.median(v) for k, v in r.items()}
        line = (
            f"| {method} | {med['memory']:.1f} | {med['shards']:.1f} | {med['bare']:.1f} | "
            f"{statistics.median(framework):.3f} | {statistics.median(end_to_end):.3f} |"
        )
        if args.cached:
            cached = [a / b for a, b in zip(r[CACHED], r["shards"], strict=True)]
            entry["cached_ratio"] = cached
            line += f" {med[CACHED]:.1f} | {statistics.median(cached):.3f} |"
        lines.append(line)
    table = "\n".join(lines)
    report["table"] = table
    (args.out / "overhead.json").write_text(json.dumps(report, indent=1))
    print(f"ms per step, medians over {args.rounds} rounds; ratios paired within a round:")
    print(table)


if __name__ == "__main__":
    main()
