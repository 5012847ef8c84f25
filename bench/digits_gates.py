"""The digits testbed's validity gates, from a baseline run's metrics and bicubic's.

    OMP_NUM_THREADS=1 python bench/digits_gates.py --run bench_out/logs/digits_baseline/version_0 \
        [--sr_factor 4] [--label "4x SR"]

G1 (the teacher adds realism): the two-stage baseline at 50 DDIM steps beats bicubic
interpolation of the input on classifier FID by a clear margin (here: at least 30% lower).
G2 (a real few-step gap): the baseline at 4 steps is at least 30% worse (higher) than at
50 steps on classifier FID (the paper's SR numbers: 29.27 against 19.23, 52%).
Bicubic is scored on the same 512 test digits (test-000000.tar) with the same metrics
config as the run (read from its hparams.yaml). Writes ``gates.json`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.30


def bicubic_metrics(
    metrics: dict,
    shards: str,
    sr_factor: int,
    limit: int | None = None,
    condition: str = "sr",
    inpaint_mask: str = "half",
) -> dict:
    """The bicubic-upscaled input itself, scored like the models (the first ``limit``
    digits of the shards, default all); ``condition="inpaint"``: the masked digits
    (masks ``inpaint_mask``) instead."""
    from codi_lightning.data import ShardDataModule, float_pixels
    from codi_lightning.metrics import EvalSuite, MetricsConfig

    dm = ShardDataModule(None, shards, resolution=32, batch_size=limit or 128, num_workers=0,
                         condition=condition, sr_factor=sr_factor, inpaint_mask=inpaint_mask,
                         resize_shorter=False)  # fmt: skip
    suite = EvalSuite(MetricsConfig(**metrics), [0])
    for batch in map(float_pixels, dm.test_dataloader()):
        suite.update(0, batch["cond"], (batch["image"] + 1) / 2)
        if limit:
            break
    return suite.compute()[0]


def gates(bicubic: dict, b4: dict, b50: dict) -> dict:
    return {
        "G1": {
            "bicubic_fid": bicubic["fid"],
            "baseline50_fid": b50["fid"],
            "reduction": 1 - b50["fid"] / bicubic["fid"],
            "pass": b50["fid"] <= (1 - MARGIN) * bicubic["fid"],
        },
        "G2": {
            "baseline4_fid": b4["fid"],
            "baseline50_fid": b50["fid"],
            "increase": b4["fid"] / b50["fid"] - 1,
            "pass": b4["fid"] >= (1 + MARGIN) * b50["fid"],
        },
    }


COLUMNS = (("fid", "FID (clf) ↓", 2), ("kid", "KID (clf) ↓", 4),
           ("class_consistency", "class consistency ↑", 3), ("fid_rc", "FID (rc) ↓", 2),
           ("psnr", "PSNR ↑", 2), ("ssim", "SSIM ↑", 3), ("input_psnr", "input PSNR ↑", 2))  # fmt: skip


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| method | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]  # fmt: skip
    for label, row in rows:
        lines.append(f"| {label} | " + " | ".join(f"{row[k]:.{d}f}" for k, _, d in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the baseline's log folder (metrics.json)")
    parser.add_argument("--shards", default="bench_out/digits/test-000000.tar")
    parser.add_argument("--sr_factor", type=int, default=None, help="default: the run's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    factor = args.sr_factor or config["data"]["sr_factor"]
    results = json.loads((run / "metrics.json").read_text())["results"]
    bicubic = bicubic_metrics(hparams["metrics"], args.shards, factor)
    out = {"sr_factor": factor, "bicubic": bicubic, "baseline": results,
           **gates(bicubic, results["4"], results["50"])}  # fmt: skip
    (run / "gates.json").write_text(json.dumps(out, indent=2))
    rows = [("bicubic", bicubic)] + [
        (f"baseline DDIM {s}", results[s]) for s in sorted(results, key=int)
    ]
    print(table(rows))
    for g in ("G1", "G2"):
        print(g, json.dumps(out[g]))


if __name__ == "__main__":
    main()
