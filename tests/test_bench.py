"""The GPU check script runs end to end on tiny models on the CPU (plumbing only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_gpu_check_plumbing_on_cpu(tmp_path):
    script = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, str(script), "--tiny", "--device", "cpu", "--steps", "1", "--batch", "2",
         "--models", "sd15,sdxl,sd35m,flux1d,sana1600m", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    # 5 models (SD 1.5, SDXL, SD3, Flux and SANA layouts, tiny) x 2 methods x FSDP2 x
    # checkpointing
    assert len(data["train"]) == 40
    assert all(row["tflops_per_step"] > 0 and row["samples_per_s"] > 0 for row in data["train"])
    for model in ("sd15", "sdxl", "sd35m", "flux1d", "sana1600m"):
        rows = [r for r in data["train"] if r["model"] == model]
        assert len(rows) == 8
        fsdp = {(r["method"], r["checkpointing"]): r for r in rows if r["fsdp2"]}
        plain = {(r["method"], r["checkpointing"]): r for r in rows if not r["fsdp2"]}
        assert len(fsdp) == len(plain) == 4
        for key, row in plain.items():  # the same model and step, so the same counted FLOPs
            if model == "sana1600m" and key[0] == "codi":
                # FSDP2 on SANA's full CoDi counts 27% more (backward convolutions and
                # matmuls a plain run skips; the gradients equal the plain run's to 1.5e-8,
                # docs/performance.md): at least as many, then
                assert fsdp[key]["tflops_per_step"] >= row["tflops_per_step"]
                continue
            assert (
                abs(row["tflops_per_step"] - fsdp[key]["tflops_per_step"]) / row["tflops_per_step"]
                < 0.05
            )
        # full CoDi trains a UNet copy besides the adapter
        assert (
            plain[("codi", False)]["trainable_params_m"]
            > plain[("pe-codi", False)]["trainable_params_m"]
        )
        sampling = data["sampling"][model]
        assert sampling["codi_4_steps_s"] > 0 and sampling["teacher_50_steps_s"] > 0
    # the SDXL rows run the SDXL UNet (added conditions): not the SD rows' model
    sd, xl, dit, fl, sa = ({r["trainable_params_m"] for r in data["train"] if r["model"] == m}
                           for m in ("sd15", "sdxl", "sd35m", "flux1d", "sana1600m"))  # fmt: skip
    # five different networks
    assert sd.isdisjoint(xl) and dit.isdisjoint(sd | xl) and fl.isdisjoint(sd | xl | dit)
    assert sa.isdisjoint(sd | xl | dit | fl)


def _quality_module():
    import importlib.util

    path = Path(__file__).parents[1] / "bench" / "quality_photos.py"
    spec = importlib.util.spec_from_file_location("bench_quality_photos", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(psnr, fid):
    return {"psnr": psnr, "ssim": 0.5, "input_psnr": 30.0, "fid": fid, "kid": 0.01, "swd": fid * 10}


def test_cache_savings_plumbing_on_cpu(tmp_path):
    script = Path(__file__).parents[1] / "bench" / "cache_savings.py"
    out = tmp_path / "cache.json"
    result = subprocess.run(
        [sys.executable, str(script), "--tiny", "--size", "32", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["uncached_step_s"] == data["vae_encode_s"] + data["text_encode_s"] + data["step_s"]
    assert data["step_s"] > 0 and data["cache_speedup"] > 1
    for where in ("edge", "interior"):
        assert data["crop_error_random_vae"][where]["mean"] > 0  # a window is not the crop


def test_quality_report_checks_the_claim_from_the_numbers():
    """The report's claim table is computed from the results, not written by hand: the
    same template says yes for one set of numbers and no for the reverse."""
    q = _quality_module()
    good = {
        "codi": {"results": {"4": _row(25.0, 1.0)}},
        "pe-codi": {"results": {"4": _row(22.0, 2.0)}},
        "baseline": {"results": {"4": _row(18.0, 5.0), "50": _row(24.0, 1.5)}},
    }
    lines = q.claim_check(good).splitlines()[2:]
    assert [line.split("|")[6].strip() for line in lines] == ["yes"] * 3  # beats baseline 4
    assert lines[0].split("|")[7].strip() == "yes (+1.00)"  # PSNR vs baseline 50
    assert all(line.split("|")[8].strip() == "yes" for line in lines)  # PE-CoDi between
    bad = {
        "codi": {"results": {"4": _row(17.0, 6.0)}},
        "pe-codi": {"results": {"4": _row(30.0, 0.5)}},
        "baseline": {"results": {"4": _row(18.0, 5.0), "50": _row(24.0, 1.5)}},
    }
    lines = q.claim_check(bad).splitlines()[2:]
    assert [line.split("|")[6].strip() for line in lines] == ["no"] * 3
    assert lines[0].split("|")[7].strip() == "no (-7.00)"
    assert all(line.split("|")[8].strip() == "no" for line in lines)


def test_quality_report_reads_its_settings_from_the_configs():
    q = _quality_module()
    settings = q.config_settings()
    assert settings["teacher"]["prediction_type"] == "v prediction"
    assert settings["distill"]["adapter_condition_init"] in ("zero", "random")
    assert settings["distill"]["lr"] > 0 and settings["baseline"]["lr"] > 0


def test_quality_notes_quote_this_runs_numbers():
    """The notes' numbers about this run come from the results (a rerun cannot leave
    stale values behind)."""
    q = _quality_module()
    results = {
        name: {"results": {"4": _row(10.0 + i, 1.0 + i), "50": _row(30.5, 0.25)},
               "meta": {"step": 100, "weights": "target"}, "fit_seconds": 60.0}
        for i, name in enumerate(q.RUNS)
    }  # fmt: skip
    results["codi"]["fit_seconds"] = 150.0
    text = q.notes(results)
    base = results["baseline"]["results"]["4"]
    assert f"PSNR {base['psnr']:.2f} vs 30.50" in text
    assert "costs 2.5x a baseline step" in text
    pst = results["abl-per-sample-t"]["results"]["4"]
    assert f"gives {pst['psnr']:.2f} dB" in text
    assert "| CoDi (this run) | 100 | EMA | 10.00 | 1.00 | 10.0 |" in text


def test_step_overhead_bench_runs_every_mode(tmp_path):
    """bench/step_overhead.py on a few steps: the fit and bare-loop runs, from memory,
    shards and cached shards, and the paired ratios (code paths only, no timing claim)."""
    script = Path(__file__).parents[1] / "bench" / "step_overhead.py"
    result = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--steps", "3", "--warmup", "1",
         "--methods", "pe-codi", "--cached", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "overhead.json").read_text())
    row = report["methods"]["pe-codi"]
    for mode in ("memory", "shards", "bare", "cached"):
        assert len(row[mode]) == 1 and row[mode][0] > 0
    assert row["framework_ratio"][0] == row["memory"][0] / row["bare"][0]
    assert "| pe-codi |" in report["table"]


@pytest.mark.slow  # 2 minutes on 2 cores and 11 GB of disk (teacher, checkpoint, export)
def test_real_size_sd15_through_the_cli(tmp_path):
    """bench/real_size_cpu.py's SD 1.5-sized case: fit with validation and a checkpoint,
    then export and the stock pipeline's load of it (1 step at 64 px)."""
    script = Path(__file__).parents[1] / "bench" / "real_size_cpu.py"
    done = subprocess.run([sys.executable, str(script), "--only", "fit", "export", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["params_m"]["unet"] == pytest.approx(859.52, abs=0.01)  # SD 1.5's UNet
    assert results["fit"]["checkpoint_gb"] > 5  # adapter, EMA target and AdamW moments
    assert results["export"]["stock_pipeline"]["image"] == [64, 64]
