"""The GPU user's whole path at real size, on the CPU: an SD 1.5-sized teacher (UNet
859.5M, its ControlNet ~361M, the SD VAE and a CLIP ViT-L/14 text encoder, random weights
built from the published configs offline) through the real CLI.

    python bench/real_size_cpu.py                 # all steps, ~15-25 min on 2 cores
    python bench/real_size_cpu.py --only fit test # some steps (the folder is kept)

Steps, each a `codi-lightning` command in its own process, timed, with its peak memory
(the process tree's largest resident set, from /usr/bin/time):

- ``fit``: PE-CoDi (adapter only) at 64 px, batch 1, 2 steps with a validation grid and a
  checkpoint; ``resume``: 1 more step from ``last.ckpt``; ``test`` (1 step, 2 images);
  ``predict`` (2 inputs); ``export`` and a stock ``StableDiffusionControlNetPipeline``
  load of the export, sampling 1 step at 64 px;
- ``fsdp``: the same ``fit`` as a 2-process FSDP2 run (gloo).

Numbers go to ``<out>/results.json`` (default ``bench_out/real_size``) and, with
``--docs``, into docs/performance.md between its ``real-size-cpu`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- real-size-cpu:begin -->", "<!-- real-size-cpu:end -->")
CLI = str(Path(sys.executable).with_name("codi-lightning"))
STEPS = ("fit", "resume", "test", "predict", "export", "fsdp")


def clip_l_config(vocab: int) -> dict:
    """CLIP ViT-L/14's text tower (SD 1.5's text encoder): 12 layers of width 768."""
    return {"vocab_size": vocab, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
            "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip


def sd_vae_config() -> dict:
    """The SD 1.x VAE (AutoencoderKL, 4 stages of 128-512 channels, 8x, 4 latents)."""
    return {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4,
            "sample_size": 512, "scaling_factor": 0.18215}  # fmt: skip


def write_teacher(folder: Path) -> dict:
    """The SD 1.5-sized folder (random weights; the tiny byte-level tokenizer, padded to
    77 tokens as CLIP's); its parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from codi_lightning.testing.tiny import SD_SCHEDULER, build_tiny_tokenizer, save_teacher_folder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's config
    vae = AutoencoderKL(**sd_vae_config())
    tokenizer = build_tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(**clip_l_config(len(tokenizer))))
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6
              for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}  # fmt: skip
    if not (folder / "unet").is_dir():
        save_teacher_folder(folder, unet, text, tokenizer, SD_SCHEDULER, vae)
    return counts


def write_data(root: Path) -> dict[str, str]:
    from codi_lightning.data import write_shards
    from codi_lightning.demo import write_image_folder

    if not (root / "train-000000.tar").is_file():
        write_image_folder(root / "img", 8, seed=0)
        write_shards(str(root / "img"), str(root / "train-%06d.tar"), maxcount=8, progress=False)
        write_image_folder(root / "val_img", 2, seed=1)
        write_shards(str(root / "val_img"), str(root / "val-%06d.tar"), maxcount=8,
                     progress=False)  # fmt: skip
        (root / "lowres").mkdir(exist_ok=True)
        from PIL import Image

        for i in range(2):
            Image.new("RGB", (16, 16), (60 * i, 120, 200)).save(root / "lowres" / f"in{i}.png")
    return {"train": str(root / "train-000000.tar"), "val": str(root / "val-000000.tar"),
            "lowres": str(root / "lowres")}  # fmt: skip


def write_config(teacher: Path, data: dict[str, str], run: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    cfg["trainer"].update(default_root_dir=str(run), max_steps=2, val_check_interval=2,
                          limit_val_batches=1, limit_test_batches=1, log_every_n_steps=1,
                          enable_progress_bar=False)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run / "logs")
    cfg["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(run / "ckpt"),
                                                       every_n_train_steps=2)  # fmt: skip
    cfg["model"].update(pretrained=str(teacher), pixel_space=False, val_images=1,
                        val_steps=[1], test_steps=[1], predict_steps=1, num_grid=10)  # fmt: skip
    cfg["model"]["metrics"].update(kid_subset_size=2)
    cfg["data"].update(train_shards=data["train"], val_shards=data["val"], resolution=64,
                       batch_size=1, val_batch_size=2, num_workers=0, predict_batch_size=1,
                       predict_output=str(run / "preds"))  # fmt: skip
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time: wall seconds and the peak resident set (GB) of
    the largest process (a 2-process run: rank 0's launcher holds the ranks)."""
    start = time.monotonic()
    with open(log, "w") as fh:
        done = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
    text = log.read_text()
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed; see {log}:\n" + text[-3000:])
    peak = int(re.findall(r"PEAK_KB (\d+)", text)[-1]) / 1e6
    return {"seconds": round(time.monotonic() - start, 1), "peak_rss_gb": round(peak, 2)}


def size_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e9, 3)


def stock_load(exported: Path, teacher: Path) -> dict:
    """Load the export with the stock pipeline as its card does; 1 step at 64 px."""
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    start = time.monotonic()
    controlnet = ControlNetModel.from_pretrained(exported, subfolder="controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(teacher), controlnet=controlnet, safety_checker=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.scheduler = LCMScheduler.from_pretrained(exported, subfolder="scheduler")
    loaded = time.monotonic() - start
    image = pipe("", image=Image.new("RGB", (64, 64), (120, 60, 30)), num_inference_steps=1,
                 guidance_scale=1.0, height=64, width=64).images[0]  # fmt: skip
    return {"load_seconds": round(loaded, 1), "image": list(image.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=STEPS, help="default: every step")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "real_size")
    parser.add_argument("--docs", action="store_true", help="write docs/performance.md's block")
    parser.add_argument("--fsdp_args", default="",
                        help='more options of the 2-process run, one string: '
                             '--fsdp_args="--model.frozen_dtype bf16"')  # fmt: skip
    args = parser.parse_args()
    out = args.out.resolve()
    steps = args.only or list(STEPS)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    teacher = out / "sd15"
    start = time.monotonic()
    results["params_m"] = write_teacher(teacher)
    results["teacher_gb"] = size_gb(teacher)
    results["write_teacher_seconds"] = round(time.monotonic() - start, 1)
    data = write_data(out / "data")
    run = out / "run"
    config = write_config(teacher, data, run)
    ckpt = run / "ckpt" / "last.ckpt"
    base = ["--config", str(config)]
    commands = {
        "fit": ["fit", *base],
        "resume": ["fit", *base, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)],
        "test": ["test", *base, "--ckpt_path", str(ckpt)],
        "predict": ["predict", *base, "--ckpt_path", str(ckpt), "--data.predict_images",
                    data["lowres"]],
        "export": ["export", "--ckpt", str(ckpt), "--output", str(out / "exported")],
        "fsdp": ["fit", *base, "--config", str(ROOT / "configs" / "trainer" / "fsdp.yaml"),
                 "--trainer.strategy.init_args.data_parallel_size", "2", "--trainer.accelerator",
                 "cpu", "--trainer.devices", "2", "--trainer.default_root_dir",
                 str(out / "run_fsdp"), "--trainer.callbacks.dirpath",
                 str(out / "run_fsdp" / "ckpt"), *shlex.split(args.fsdp_args)],
    }  # fmt: skip
    for step in steps:
        print(f"{step} ...", flush=True)
        row = timed([CLI, *commands[step]], out / f"{step}.log")
        if step in ("fit", "resume"):
            row["checkpoint_gb"] = size_gb(ckpt)
        if step == "fsdp":
            row["args"] = args.fsdp_args
            row["checkpoint_gb"] = size_gb(out / "run_fsdp" / "ckpt" / "last.ckpt")
        if step == "export":
            row["export_gb"] = size_gb(out / "exported")
            row["stock_pipeline"] = stock_load(out / "exported", teacher)
        results[step] = row
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{step}: {row}", flush=True)
    results["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    results["date"] = time.strftime("%Y-%m-%d")
    results_file.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    if args.docs:
        write_docs(results, ROOT / "docs" / "performance.md")


def write_docs(results: dict, path: Path) -> None:
    """The table of ``results`` between the markers of ``path`` (appended if absent)."""
    labels = {"fit": "fit, 2 steps + validation + checkpoint",
              "resume": "resume from last.ckpt, 1 step + checkpoint",
              "test": "test, 1 step, 2 images", "predict": "predict, 2 inputs",
              "export": "export (+ stock pipeline load)",
              "fsdp": "fit on 2 processes, FSDP2 (gloo)"}  # fmt: skip
    rows = []
    for step, label in labels.items():
        r = results.get(step)
        if not r:
            continue
        extra = [f"checkpoint {r['checkpoint_gb']:.2f} GB"] if "checkpoint_gb" in r else []
        if r.get("args"):
            label += f" (`{r['args']}`)"
        if "export_gb" in r:
            extra += [f"export {r['export_gb']:.2f} GB",
                      f"stock pipeline load {r['stock_pipeline']['load_seconds']:.1f} s"]  # fmt: skip
        rows.append(
            f"| {label} | {r['seconds']:.0f} | {r['peak_rss_gb']:.1f} | {', '.join(extra)} |"
        )
    p = results["params_m"]
    block = f"""{MARKERS[0]}
Written by `python bench/real_size_cpu.py --docs` ({results["machine"]}, {results["date"]}):
an SD 1.5-sized teacher (UNet {p["unet"]:.1f}M, VAE {p["vae"]:.1f}M, CLIP ViT-L/14 text
tower {p["text_encoder"]:.1f}M with the tiny tokenizer's vocabulary; random weights from
the published configs, a {results["teacher_gb"]:.2f} GB folder) through the real CLI,
PE-CoDi at 64 px, batch 1, fp32. Seconds include start-up (imports, loading the teacher,
building the adapter); peak memory is the largest process's resident set.

| command | seconds | peak memory (GB) | sizes |
|---|---|---|---|
{chr(10).join(rows)}
{MARKERS[1]}"""
    text = path.read_text()
    if MARKERS[0] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + block + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip() + "\n\n## Real size on the CPU (SD 1.5)\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
