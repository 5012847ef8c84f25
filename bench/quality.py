"""Small-scale reproduction of the paper's super-resolution comparison and ablation.

    make bench-quality        # = python bench/quality.py (data, teacher if missing, runs, report)

4x super-resolution of 32x32 patches (from 8x8) cut from photographs that ship with
scikit-image; held-out test patches come from two other photographs. Pixel space: the
toy teacher is a 1.4M-parameter UNet trained by `configs/toy/teacher.yaml` (committed in
bench/assets/toy_teacher, with that command). A complete run writes docs/results.md,
every number from its own runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DISTILL, BASELINE, TEACHER = (
    "configs/toy/distill.yaml",
    "configs/toy/baseline.yaml",
    "configs/toy/teacher.yaml",
)
TEACHER_DIR = ROOT / "bench" / "assets" / "toy_teacher"
OUT = ROOT / "bench_out"

# name -> (config, overrides, label); the ablations change one switch of the CoDi run
RUNS = {
    "codi": (DISTILL, [], "CoDi"),
    "pe-codi": (DISTILL, ["--model.method", "pe-codi"], "PE-CoDi"),
    "baseline": (BASELINE, [], "ControlNet + DDIM (two-stage)"),
    "abl-solver-teacher": (DISTILL, ["--model.loss.solver", "teacher"], "ODE solver: teacher"),
    "abl-ode-noise-predicted": (
        DISTILL,
        ["--model.loss.ode_noise", "predicted"],
        "ODE noise: predicted",
    ),
    "abl-x-space": (DISTILL, ["--model.loss.consistency_space", "x"], "consistency in x space"),
    "abl-no-guidance": (DISTILL, ["--model.loss.guidance_weight", "0"], "no guidance term"),
    "abl-per-sample-t": (DISTILL, ["--model.per_sample_timesteps", "true"], "one t per sample"),
}
MAIN = ("codi", "pe-codi", "baseline")
ABLATIONS = ("codi", *(k for k in RUNS if k.startswith("abl-")))


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "codi_lightning", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def newest(pattern: str) -> Path:
    paths = sorted(OUT.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"nothing matches {OUT / pattern}")
    return paths[-1]


def run(name: str, extra: list[str]) -> dict:
    config, overrides, _ = RUNS[name]
    common = ["--config", config, *overrides, "--trainer.logger.init_args.name", name,
              "--trainer.default_root_dir", f"bench_out/runs/{name}", *extra]  # fmt: skip
    start = time.monotonic()
    cli("fit", *common)
    fit_s = time.monotonic() - start
    ckpt = newest(f"logs/{name}/version_*/checkpoints/last.ckpt")
    cli("test", *common, "--ckpt_path", str(ckpt))
    metrics = json.loads(newest(f"logs/{name}/version_*/metrics.json").read_text())
    return {"fit_seconds": fit_s, "checkpoint": str(ckpt.relative_to(ROOT)), **metrics}


def bicubic_metrics() -> dict:
    """The bicubic-upscaled input itself, scored like the models."""
    from codi_lightning.data import ShardDataModule
    from codi_lightning.metrics import EvalSuite, MetricsConfig

    cfg = MetricsConfig(feature="random_conv", lpips=False, swd=True, input_consistency_factor=4)
    suite = EvalSuite(cfg, [0])
    dm = ShardDataModule(None, str(OUT / "data" / "test-000000.tar"), resolution=32, batch_size=128,
                         num_workers=0, condition="sr", sr_factor=4, resize_shorter=False)  # fmt: skip
    for batch in dm.test_dataloader():
        suite.update(0, batch["cond"], (batch["image"] + 1) / 2)
    return {"results": {"0": suite.compute()[0]}}


@torch.no_grad()
def image_grid(results: dict, path: Path, rows: int = 8) -> None:
    """input (8x8) | bicubic | baseline 4 | baseline 50 | PE-CoDi 4 | CoDi 1 | 2 | 4 | truth."""
    import torch.nn.functional as F

    from codi_lightning.data import ShardDataModule
    from codi_lightning.training import CoDiDistillation, ControlNetBaseline
    from codi_lightning.training.visualize import save_grid

    dm = ShardDataModule(None, str(OUT / "data" / "test-000000.tar"), resolution=32, batch_size=512,
                         num_workers=0, condition="sr", sr_factor=4, resize_shorter=False)  # fmt: skip
    batch = next(iter(dm.test_dataloader()))
    pick = torch.linspace(0, len(batch["cond"]) - 1, rows).long()
    cond, truth = batch["cond"][pick], (batch["image"][pick] + 1) / 2
    captions = [""] * rows
    low = F.interpolate(F.interpolate(cond, size=8, mode="area"), size=32, mode="nearest")

    def samples(name, cls, steps):
        model = cls.load_from_checkpoint(
            ROOT / results[name]["checkpoint"], map_location="cpu"
        ).eval()
        return [
            model.sample_images(cond, captions, s, generator=torch.Generator().manual_seed(0))
            for s in steps
        ]

    base = samples("baseline", ControlNetBaseline, [4, 50])
    pe = samples("pe-codi", CoDiDistillation, [4])
    codi = samples("codi", CoDiDistillation, [1, 2, 4])
    save_grid([low, cond, *base, *pe, *codi, truth], path, min_size=64)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("psnr", "PSNR ↑"), ("ssim", "SSIM ↑"), ("input_psnr", "input-consistency PSNR ↑"),
               ("fid", "FID (random conv) ↓"), ("swd", "SWD x1e3 ↓")]  # fmt: skip
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for name in MAIN:
            rows = results[name]["results"]
            steps = sorted(int(s) for s in rows)
            ax.plot(steps, [rows[str(s)][key] for s in steps], marker="o", label=RUNS[name][2])
        ax.axhline(results["bicubic"]["results"]["0"][key], color="gray", ls="--", label="bicubic")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt_row(label: str, steps: str, row: dict) -> str:
    cells = [f"{row[k]:.2f}" for k in ("psnr",)] + [f"{row['ssim']:.3f}"]
    cells += [
        f"{row['input_psnr']:.2f}",
        f"{row['fid']:.2f}",
        f"{row['kid']:.4f}",
        f"{row['swd']:.1f}",
    ]
    return f"| {label} | {steps} | " + " | ".join(cells) + " |"


HEADER = ("| method | steps | PSNR ↑ | SSIM ↑ | input PSNR ↑ | FID (rc) ↓ | KID (rc) ↓ | SWD ↓ |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip


def report(results: dict, meta: dict) -> str:
    lines = [HEADER, fmt_row("bicubic", "-", results["bicubic"]["results"]["0"])]
    for name in ("baseline", "pe-codi", "codi"):
        for steps, row in sorted(results[name]["results"].items(), key=lambda kv: int(kv[0])):
            lines.append(fmt_row(RUNS[name][2], steps, row))
    table = "\n".join(lines)
    abl = [HEADER.replace("| method |", "| variant |")]
    for name in ABLATIONS:
        default = "CoDi (default: self, true noise, epsilon, lambda 1, one t)"
        label = default if name == "codi" else RUNS[name][2]
        if name in results:
            abl.append(fmt_row(label, "4", results[name]["results"]["4"]))
        else:
            abl.append(f"| {label} | 4 | not run yet | | | | | |")
    times = "\n".join(
        f"| {RUNS[n][2]} | {results[n]['fit_seconds'] / 60:.1f} |" for n in RUNS if n in results
    )
    return f"""# Results: super-resolution at small scale (CPU)

Written by `bench/quality.py` (`make bench-quality`) on {meta["machine"]}, {meta["date"]};
the whole run took {meta["minutes"]:.0f} minutes. Nothing here is typed by hand.

**Task.** 4x super-resolution of 32x32 RGB patches from 8x8 inputs (bicubic down, then
bicubic up to 32x32 as the condition). Training patches: 15,000 from six photographs
shipped with scikit-image ({", ".join(meta["train_photos"])}); test: 512 patches from two
other photographs ({", ".join(meta["test_photos"])}).

**Why pixel space.** No pretrained VAE can be downloaded here, and training a VAE first
would add a second model whose errors would blur the comparison; at 32x32 a pixel-space
UNet is cheap enough on a CPU.

**Models.** Teacher: a 1.4M-parameter pixel-space UNet (`configs/toy/teacher.yaml`,
epsilon prediction, 1,200 steps of batch 32, committed in `bench/assets/toy_teacher`).
CoDi and its ablations: {meta["codi_steps"]} steps; PE-CoDi the same; the two-stage
baseline (ControlNet trained with the diffusion loss, teacher frozen, DDIM with trailing
timesteps): {meta["baseline_steps"]} steps, about the same CPU time (its step is one
forward/backward, CoDi's adds the target pass and, for full CoDi, the UNet's backward).
Batch 16, AdamW lr 5e-4, EMA 0.99, N = 50; samples use the EMA weights and the
deterministic sampler, one seed. These budgets are tiny (minutes on a CPU): the
comparison is between methods at equal budget, not of absolute quality.

**Metrics.** PSNR and SSIM against the ground truth; input-consistency PSNR (output and
ground truth both downscaled 4x: agreement with the input); FID and KID over a fixed,
randomly initialised conv net (`metrics.feature: random_conv`, 256 features; no weights
can be downloaded here, and random conv features still separate texture and colour
statistics; the values are not comparable with Inception FIDs, only with each other);
sliced Wasserstein distance over Laplacian-pyramid 7x7 patches (x 1e3).

## Main table (paper's Table 1 layout)

{table}

![metrics against steps](results/metrics_vs_steps.png)

Grid, one test patch per row: input (8x8, nearest) | bicubic | baseline DDIM 4 |
baseline DDIM 50 | PE-CoDi 4 | CoDi 1 | CoDi 2 | CoDi 4 | ground truth.

![samples](results/grid.png)

## Ablation (4 steps, one switch changed from the CoDi row)

{chr(10).join(abl)}

## Training time (minutes, 2 CPU cores)

| run | minutes |
|---|---|
{times}

{meta.get("notes", "")}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="run only these (default: all; none: report)")
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="CLI overrides for every run"
    )
    args = parser.parse_args()
    start = time.monotonic()
    if not (OUT / "data" / "summary.json").is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        from quality_data import prepare

        prepare(str(OUT / "data"))
    if not (TEACHER_DIR / "unet").is_dir():
        cli("fit", "--config", TEACHER)
    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for name in list(RUNS) if args.only is None else args.only:
        results[name] = run(name, args.extra)
        results_file.write_text(json.dumps(results, indent=2))
    results["bicubic"] = bicubic_metrics()
    results_file.write_text(json.dumps(results, indent=2))
    if not all(n in results for n in MAIN):
        print(f"partial results in {results_file}; docs not written (need {MAIN})")
        return
    docs = ROOT / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    plot(results, docs / "metrics_vs_steps.png")
    image_grid(results, docs / "grid.png")
    import platform

    summary = json.loads((OUT / "data" / "summary.json").read_text())
    meta = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.monotonic() - start) / 60,
        "train_photos": summary["train_photos"],
        "test_photos": summary["test_photos"],
        "codi_steps": results["codi"]["meta"]["step"],
        "baseline_steps": results["baseline"]["meta"]["step"],
    }
    (ROOT / "docs" / "results.md").write_text(report(results, meta))
    print(f"wrote {ROOT / 'docs' / 'results.md'}")


if __name__ == "__main__":
    main()
