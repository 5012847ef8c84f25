"""The GPU check script runs end to end on tiny models on the CPU (plumbing only)."""

import json
import subprocess
import sys
from pathlib import Path


def test_gpu_check_plumbing_on_cpu(tmp_path):
    script = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, str(script), "--tiny", "--device", "cpu", "--steps", "1", "--batch", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    assert len(data["train"]) == 8
    assert all(row["tflops_per_step"] > 0 and row["samples_per_s"] > 0 for row in data["train"])
    fsdp = {(r["method"], r["checkpointing"]): r for r in data["train"] if r["fsdp2"]}
    plain = {(r["method"], r["checkpointing"]): r for r in data["train"] if not r["fsdp2"]}
    for key, row in plain.items():  # the same model and step, so the same counted FLOPs
        assert (
            abs(row["tflops_per_step"] - fsdp[key]["tflops_per_step"]) / row["tflops_per_step"]
            < 0.05
        )
    assert data["sampling"]["codi_4_steps_s"] > 0 and data["sampling"]["teacher_50_steps_s"] > 0
