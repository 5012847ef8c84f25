"""SDXL and SD3.5 medium at real size on the CPU, as far as 24 GB allows: sampling and
export, no training step (docs/performance.md has the arithmetic: a PE-CoDi step of
either needs about 32-41 GB).

    python bench/real_size_large.py sdxl        # ~10-20 min on 2 cores, ~20 GB of disk
    python bench/real_size_large.py sd35m       # SD3.5-medium size, T5 cut to 1 layer
    python bench/real_size_large.py sdxl --docs # and write docs/performance.md's block

For each teacher: a diffusers folder of the published network config (random weights,
saved in bf16), its real CLIP-L / CLIP-bigG text towers (the tiny byte-level tokenizer's
vocabulary) and its VAE; SD3.5 medium's T5-XXL cut to 1 of its 24 layers (its width,
heads and gated feed-forward; the whole of it is 4.8B parameters, 9.5 GB in bf16), so the
stock pipeline loads the folder as it loads SD3.5's. Then, each step timed with its peak
memory:

- ``sample``: its config (``configs/<family>_sr.yaml``, as PE-CoDi: SD3's config trains
  full CoDi, which needs 28 GB here; frozen parts in bf16)
  built by the CLI's own parser (``CoDiCLI(run=False)``), a validation pass (the loss and
  a 1-step sample at 64 px) and ``trainer.save_checkpoint`` of the untrained adapter (the
  checkpoint a first training step would write, without the step);
- ``export``: ``codi-lightning export`` of that checkpoint;
- ``stock``: the export's model card snippet run as written (the stock ControlNet
  pipeline loads the teacher and the exported adapter and samples with each of the
  card's two samplers, 4 steps, at 64 px).

Numbers go to ``<out>/<family>/results.json`` (default ``bench_out/real_size_large``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import sd35m_transformer_config, sdxl_unet_config  # noqa: E402
from real_size_cpu import clip_l_config, sd_vae_config, size_gb, write_data  # noqa: E402

MARKERS = ("<!-- real-size-large:begin -->", "<!-- real-size-large:end -->")
CLI = str(Path(sys.executable).with_name("codi-lightning"))
CONFIGS = {"sdxl": "configs/sdxl_sr.yaml", "sd35m": "configs/sd3_sr.yaml"}


def clip_g_config(vocab: int) -> dict:
    """OpenCLIP ViT-bigG/14's text tower (SDXL's and SD3's second encoder): 32 layers of
    width 1280, projection 1280."""
    return {"vocab_size": vocab, "hidden_size": 1280, "intermediate_size": 5120,
            "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
            "projection_dim": 1280, "hidden_act": "gelu",
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # the tiny tokenizer's  # fmt: skip


def write_teacher(family: str, folder: Path) -> dict:
    """The folder (bf16 weights) and its parameter counts (millions)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from codi_lightning.testing.tiny import (
        SD3_SCHEDULER,
        SDXL_INDEX,
        SDXL_SCHEDULER,
        build_tiny_t5_tokenizer,
        build_tiny_tokenizer,
        save_sd3_folder,
        write_pipeline_folder,
    )

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip_g_config(len(tokenizer_2))))
    if family == "sdxl":
        network = UNet2DConditionModel(**sdxl_unet_config())
        clip_l = CLIPTextModel(CLIPTextConfig(**clip_l_config(len(tokenizer))))
        vae = AutoencoderKL(**sd_vae_config() | {"scaling_factor": 0.13025, "force_upcast": True})
    else:
        network = SD3Transformer2DModel(**sd35m_transformer_config())
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip_l_config(len(tokenizer))))
        vae = AutoencoderKL(**sd_vae_config() | {
            "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False})  # fmt: skip
        tokenizer_3 = build_tiny_t5_tokenizer()
        tokenizer_3.model_max_length = 256  # the SD3 pipelines' T5 length
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
            num_heads=64, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1))  # T5-XXL's layer, once  # fmt: skip
    parts = {"network": network, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g}
    if family == "sd35m":
        parts["text_encoder_3"] = t5
    counts = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in parts.items()}
    for module in parts.values():
        module.to(torch.bfloat16)
    if family == "sdxl":
        saved = {"unet": network, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g,
                 "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}  # fmt: skip
        write_pipeline_folder(folder, saved, SDXL_SCHEDULER, SDXL_INDEX)
    else:
        save_sd3_folder(folder, network, (clip_l, clip_g, t5), (tokenizer, tokenizer_2, tokenizer_3),
                        SD3_SCHEDULER, vae)  # fmt: skip
    return counts


def run_config(family: str, teacher: Path, data: dict[str, str], run: Path) -> Path:
    """The family's GPU config with CPU settings, 64 px, batch 1, one validation image."""
    cfg = yaml.safe_load((ROOT / CONFIGS[family]).read_text())
    cfg["trainer"].update(accelerator="cpu", devices=1, precision="bf16-mixed",
                          default_root_dir=str(run), limit_val_batches=1,
                          enable_progress_bar=False)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run / "logs")
    cfg["trainer"].pop("callbacks", None)
    cfg["model"].update(pretrained=str(teacher), val_images=1, val_steps=[1], test_steps=[1],
                        predict_steps=1)  # fmt: skip
    # configs/sd3_sr.yaml trains full CoDi: the transformer's fp32 copy and its EMA copy
    # (2 x 9.0 GB) beside the adapter and its EMA copy (2 x 5.0 GB) are 28 GB, more than
    # this machine has (killed at 23.6 GB); PE-CoDi is the run that fits (the adapter only)
    cfg["model"]["method"] = "pe-codi"
    cfg["data"].update(train_shards=data["train"], val_shards=data["val"], resolution=64,
                       batch_size=1, val_batch_size=1, num_workers=0)  # fmt: skip
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def anon_kb(pid: int) -> int:
    """Anonymous resident memory (kB) of ``pid`` and its descendants: what cannot be
    dropped like the pages of memory-mapped weight files, which the resident set counts."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found = re.search(r"RssAnon:\s+(\d+)", status)
        total += int(found.group(1)) if found else 0
        todo += [int(c) for c in children]
    return total


def timed(cmd: list[str], log: Path, threads: int) -> dict:
    """``cmd`` under /usr/bin/time: wall seconds, peak resident set (GB; file pages of
    memory-mapped weights included) and peak anonymous memory (GB, sampled every 0.2 s)."""
    start, peak_anon = time.monotonic(), 0
    with open(log, "w") as fh:
        child = subprocess.Popen(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], stdout=fh,
                                 stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})  # fmt: skip
        while child.poll() is None:
            peak_anon = max(peak_anon, anon_kb(child.pid))
            time.sleep(0.2)
    text = log.read_text()
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed; see {log}:\n" + text[-3000:])
    peak = int(re.findall(r"PEAK_KB (\d+)", text)[-1]) / 1e6
    return {"seconds": round(time.monotonic() - start, 1), "peak_rss_gb": round(peak, 2),
            "peak_anon_gb": round(peak_anon / 1e6, 2)}  # fmt: skip


def sample_step(config: str, ckpt: str) -> None:
    """Build the run from its config with the CLI's parser, validate (loss and a 1-step
    sample), write the checkpoint."""
    from codi_lightning.cli import CoDiCLI

    cli = CoDiCLI(args=["--config", config], run=False)
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(ckpt)
    grids = sorted(Path(cli.trainer.default_root_dir).rglob("*.png"))
    print(json.dumps({"val": metrics, "grids": [str(g) for g in grids]}))


def stock_step(exported: str) -> None:
    """The export's model card snippet, run as written, on a 64 px condition."""
    from PIL import Image

    card = (Path(exported) / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"condition": Image.new("RGB", (64, 64), (120, 60, 30))}
    exec(compile(code.replace("THIS_FOLDER", exported), "README.md", "exec"), namespace)
    print(json.dumps({"image": list(namespace["image"].size)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "real_size_large")
    parser.add_argument("--docs", action="store_true", help="write docs/performance.md's block")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each step")
    parser.add_argument("--step", choices=["sample", "stock"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "sample":  # the child processes the steps run in
        return sample_step(args.config, args.ckpt)
    if args.step == "stock":
        return stock_step(args.ckpt)
    out = (args.out / args.family).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    teacher = out / "teacher"
    if not (teacher / "model_index.json").is_file():
        start = time.monotonic()
        results["params_m"] = write_teacher(args.family, teacher)
        results["write_teacher_seconds"] = round(time.monotonic() - start, 1)
        results["teacher_gb"] = size_gb(teacher)
        results_file.write_text(json.dumps(results, indent=2))
    data = write_data(ROOT / "bench_out" / "real_size" / "data")
    run = out / "run"
    config = run_config(args.family, teacher, data, run)
    ckpt, exported = out / "untrained.ckpt", out / "exported"
    me = [sys.executable, str(Path(__file__).resolve()), args.family]
    steps = {
        "sample": [*me, "--step", "sample", "--config", str(config), "--ckpt", str(ckpt)],
        "export": [CLI, "export", "--ckpt", str(ckpt), "--output", str(exported)],
        "stock": [*me, "--step", "stock", "--ckpt", str(exported)],
    }
    for step, cmd in steps.items():
        print(f"{args.family} {step} ...", flush=True)
        row = timed(cmd, out / f"{step}.log", args.threads)
        if step == "sample":
            row["checkpoint_gb"] = size_gb(ckpt)
        if step == "export":
            row["export_gb"] = size_gb(exported)
        results[step] = row
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{step}: {row}", flush=True)
    results["machine"] = (f"{os.cpu_count()} CPU cores, {args.threads} thread(s) a step, "
                          f"torch {torch.__version__}")  # fmt: skip
    results["date"] = time.strftime("%Y-%m-%d")
    results_file.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    if args.docs:
        write_docs(args.family, results, ROOT / "docs" / "performance.md")


def write_docs(family: str, results: dict, path: Path) -> None:
    """This family's row in the table between ``path``'s markers (rows of other families
    kept)."""
    names = {"sdxl": "SDXL base", "sd35m": "SD3.5 medium (T5: 1 of 24 layers)"}
    p, s, e, k = results["params_m"], results["sample"], results["export"], results["stock"]

    def peaks(step: dict) -> str:
        return f"{step['seconds']:.0f} s, {step['peak_rss_gb']:.1f} / {step['peak_anon_gb']:.1f} GB"

    row = (f"| {names[family]} | {p['network']:.1f}M + VAE {p['vae']:.1f}M + text "
           f"{sum(v for k, v in p.items() if k.startswith('text')):.1f}M "
           f"({results['teacher_gb']:.1f} GB) | "
           f"{peaks(s)}, checkpoint {s['checkpoint_gb']:.1f} GB | "
           f"{peaks(e)}, {e['export_gb']:.1f} GB | {peaks(k)} |")  # fmt: skip
    text = path.read_text()
    rows = {}
    if MARKERS[0] in text:
        block = text.split(MARKERS[0], 1)[1].split(MARKERS[1], 1)[0]
        rows = {line.split(" | ")[0]: line for line in block.splitlines() if line.startswith("| S")}
    rows[row.split(" | ")[0]] = row
    block = f"""{MARKERS[0]}
Written by `python bench/real_size_large.py <family> --docs` ({results["machine"]},
{results["date"]}): random weights from the published configs, saved in bf16; its
`configs/<family>_sr.yaml` as PE-CoDi on the CPU at 64 px (frozen parts in bf16, the
adapter, its LoRA if any and their EMA copies in fp32). Each step is its own process; seconds include start-up and loading;
"GB" is the peak resident set / the peak anonymous memory (the resident set also counts
the pages of the memory-mapped weight files, which the kernel can drop).

| teacher | parameters (folder) | sample: validation (1 step) + checkpoint | `codi-lightning export` | stock pipeline: the card's snippet (4 steps with each of its 2 samplers, fp32) |
|---|---|---|---|---|
{chr(10).join(rows[key] for key in sorted(rows))}
{MARKERS[1]}"""
    if MARKERS[0] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + block + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip() + "\n\n## SDXL and SD3.5 medium at real size on the CPU\n\n"
        text += block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
