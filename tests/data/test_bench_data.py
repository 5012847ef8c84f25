"""The data-throughput script runs end to end on a few small images."""

import importlib.util
import json
from pathlib import Path


def test_data_throughput_smoke(tmp_path, capsys):
    path = Path(__file__).parents[2] / "bench" / "data_throughput.py"
    spec = importlib.util.spec_from_file_location("data_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "data.json"
    rows = module.main(["--size", "64", "--samples", "2", "--out", str(out)])
    assert [(r["source"], r["recipe"]) for r in rows] == [
        (s, r) for s in (80, 128) for r in module.RECIPES
    ]  # 1.25x and 2x the crop
    assert all(r["samples"] == 2 and r["samples_per_s"] > 0 for r in rows)
    assert "sr_realesrgan" in capsys.readouterr().out
    assert json.loads(out.read_text())["size"] == 64
