"""`make bench-quality QUICK=1 FLOW=1` (then `INPAINT=1`): the quality bench's code paths
on a few steps, so that the bench cannot rot (data, runs with learning curves, gates,
tables, plots, grid, the flow-teacher row, the inpainting block, report)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _quick_bench(out, *flags: str) -> dict:
    """``bench/quality.py --quick FLAGS --out OUT``; its results.json."""
    env = dict(os.environ, CODI_DEBUG="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", *flags, "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_quick_bench_writes_a_report_from_its_runs(tmp_path):
    pytest.importorskip("mlxtend")
    results = _quick_bench(tmp_path, "--flow")
    q = _quality()
    plan = q.Plan.quick()
    plan.flow = True
    assert set(results["runs"]) == {r.name for r in q.runs_of(plan)}
    assert {"flow-baseline-s0", "flow-codi-s0", "flow-pe-codi-lora-s0"} <= set(results["runs"])
    assert set(results["runs"]["flow-baseline-s0"]["results"]) == {"1", "2", "4", "50"}
    for metric in ("fid", "fid_res"):  # the flow block's shares get intervals too
        assert set(results["flow_spreads"][metric]) == {
            f"{m}@{s}" for m in ("codi", "pe-codi-lora") for s in (1, 2, 4)
        }
    assert set(results["runs"]["baseline-s0"]["results"]) == {"1", "2", "4", "50"}
    assert set(results["runs"]["codi-s0"]["results"]) == {"1", "2", "4"}
    for run in ("baseline-s0", "codi-s0", "pe-codi-s0", "pe-codi-lora-s0"):  # a curve point
        assert run in results["runs"]
        curve = results["runs"][run]["curve"]
        assert sorted(curve, key=int) == ["2", "4"]
        assert all(c["results"]["4"]["images"] == 16 for c in curve.values())
        assert curve["2"]["train_seconds"] < curve["4"]["train_seconds"]
    assert results["runs"]["abl-no-guidance"]["meta"]["step"] == plan.ablation_steps
    for row in (results["bicubic"], results["runs"]["codi-s0"]["results"]["4"]):
        assert row["swd"] > 0  # every metric column of the report is measured
    text = (tmp_path / "results.md").read_text()
    b50 = results["runs"]["baseline-s0"]["results"]["50"]["fid"]
    assert f"{b50:.2f}" in text  # the report quotes the run's numbers
    flow50 = results["runs"]["flow-baseline-s0"]["results"]["50"]["fid"]
    assert "## A rectified-flow teacher" in text and f"{flow50:.2f}" in text
    flow_text = (tmp_path / "results_flow.md").read_text()  # the flow block on its own
    assert "## A rectified-flow teacher" in flow_text and f"{flow50:.2f}" in flow_text
    flow4 = results["runs"]["flow-baseline-s0"]["results"]["4"]["fid"]
    assert f"{flow4 / flow50 - 1:+.0%}" in text  # the flow testbed's G2, computed from its runs
    assert "not run" not in text
    for metric in ("fid", "fid_res"):  # intervals under both feature networks
        for key in ("codi@4", "pe-codi-lora@1", "pe-codi@2"):
            interval = results["spreads"][metric][key]
            assert interval["lo"] <= interval["hi"]
    assert results["runs"]["codi-s0"]["results"]["4"]["fid_res"] > 0
    assert "FID (res)" in text and "gap closed, res [95% CI]" in text
    for metric in ("fid", "fid_res"):  # the interval, or why there is no share there
        gap = q.network_gap(results, metric)
        lo = results["spreads"][metric]["codi@4"]["lo"]
        assert (f"[{lo:.0%}, " if gap >= q.GATE else f"none: 4 -> 50 gap {gap:+.0%}") in text
    for png in ("metrics_vs_steps.png", "curves.png", "grid.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    assert "## Inpainting" in text and q.NO_INPAINT in text
    # the inpainting block on its own, merged into the same results and report
    results = _quick_bench(tmp_path, "--inpaint")
    inpaint = {f"inpaint-{m}-s0" for m in q.INPAINT_METHODS}
    assert inpaint <= set(results["runs"]) and "flow-codi-s0" in results["runs"]
    assert set(results["runs"]["inpaint-baseline-s0"]["results"]) == {"1", "2", "4", "50"}
    assert "input_psnr" not in results["runs"]["inpaint-codi-s0"]["results"]["4"]
    assert results["masked_input"]["fid"] > 0 and "inpaint_timing" in results
    text = (tmp_path / "results.md").read_text()
    i50 = results["runs"]["inpaint-baseline-s0"]["results"]["50"]["fid"]
    assert q.NO_INPAINT not in text and f"{i50:.2f}" in text
    assert f"{results['masked_input']['fid']:.2f}" in text
    assert set(results["inpaint_spreads"]) == {"fid", "fid_res"}


def _runs(fids: dict[str, dict[int, list[float]]]) -> dict:
    runs = {}
    for method, by_steps in fids.items():
        for seed in range(len(next(iter(by_steps.values())))):
            rows = {str(s): {"fid": v[seed]} for s, v in by_steps.items()}
            runs[f"{method}-s{seed}"] = {"results": rows}
    return {"runs": runs, "bicubic": {"fid": 1000.0}}


def test_gates_and_claim_are_computed_from_the_numbers():
    """Means over seeds, gates at 30%, the share of the gap closed: longhand values."""
    q = _quality()
    results = _runs({
        "baseline": {4: [130.0, 110.0], 50: [90.0, 110.0]},
        "codi": {1: [200.0, 180.0], 2: [120.0, 100.0], 4: [105.0, 95.0]},
        "pe-codi": {1: [300.0, 300.0], 2: [150.0, 130.0], 4: [115.0, 125.0]},
        "pe-codi-lora": {1: [250.0, 250.0], 2: [140.0, 120.0], 4: [100.0, 108.0]},
    })  # fmt: skip
    g = q.gates(results)
    assert g["b4"] == pytest.approx(120.0) and g["b50"] == pytest.approx(100.0)
    assert g["G2"] == pytest.approx(0.2) and not g["G2_pass"]  # +20% < +30%
    assert g["G1_pass"] and g["G1"] == pytest.approx(0.9)
    assert g["G2_per_seed"] == pytest.approx([130 / 90 - 1, 0.0])
    c = q.claim(results)
    assert c["codi@4"]["fid"] == pytest.approx(100.0)
    assert c["codi@4"]["gap_closed"] == pytest.approx(1.0)  # (120 - 100) / (120 - 100)
    assert c["pe-codi@4"]["gap_closed"] == pytest.approx(0.0)
    assert c["codi@1"]["gap_closed"] == pytest.approx(-3.5)  # worse than baseline 4
    assert c["codi@4"]["beats_b4"] and not c["pe-codi@4"]["beats_b4"]
    assert c["codi@2"]["within_10pct_of_b50"] and not c["pe-codi@2"]["within_10pct_of_b50"]
    assert c["pe-codi-lora@4"]["gap_closed"] == pytest.approx((120 - 104) / 20)
    # per seed, against the same seed's baseline: (130 - 100) / (130 - 90); seed 1's
    # baseline has no gap (110 -> 110), so no share is defined there
    per_seed = q.gap_per_seed(results, "pe-codi-lora", 4)
    assert per_seed[0] == pytest.approx(0.75) and math.isnan(per_seed[1])
    row = q.summary(results, "codi", 1, ("fid",))["fid"]
    assert row == pytest.approx((190.0, 14.142135), rel=1e-6)  # sample std of 200, 180


def test_inpainting_gates_and_shares_are_computed_from_the_numbers():
    """The inpainting block: gates against the masked input, the share of the gap from
    the means and per seed against the same seed's inpainting baseline (longhand), and
    a report section quoting them; the SR runs do not enter it."""
    q = _quality()
    fids = {
        "baseline": {1: [400.0] * 3, 2: [300.0] * 3, 4: [150.0, 160.0, 140.0],
                     8: [120.0] * 3, 50: [100.0, 110.0, 90.0]},
        "codi": {1: [300.0] * 3, 2: [130.0] * 3, 4: [100.0, 120.0, 110.0]},
        "pe-codi-lora": {1: [300.0] * 3, 2: [140.0] * 3, 4: [125.0, 135.0, 115.0]},
    }  # fmt: skip
    results = _runs({f"inpaint-{m}": v for m, v in fids.items()})
    results["runs"].update(_runs({"baseline": {4: [999.0], 50: [1.0]}})["runs"])  # SR: ignored
    for run in results["runs"].values():
        for row in run["results"].values():
            row.update({k: 1.0 for k, _, _ in q.INPAINT_KEYS if k != "fid"})
    results["masked_input"] = {"fid": 400.0, **{k: 1.0 for k, _, _ in q.INPAINT_KEYS if k != "fid"}}
    g = q.inpaint_gates(results)
    assert g["b4"] == pytest.approx(150.0) and g["b50"] == pytest.approx(100.0)
    assert g["G1"] == pytest.approx(0.75) and g["G1_pass"]
    assert g["G2"] == pytest.approx(0.5) and g["G2_pass"]
    assert g["G2_per_seed"] == pytest.approx([0.5, 160 / 110 - 1, 140 / 90 - 1])
    per_seed = q.gap_per_seed(results, "inpaint-codi", 4, "inpaint-baseline")
    assert per_seed == pytest.approx([1.0, 40 / 50, 30 / 50])
    text = q.inpaint_section(results, (0, 1, 2))
    assert "| 400.00 | 150.00 | 100.00 | -75% (pass) | +50% (pass) |" in text
    # (150 - 110) / (150 - 100); no features stored: no interval; fid_res has no gap here
    none = "- | -"  # fid_res equal everywhere: no gap at all, nothing to divide
    assert f"| CoDi | 110.00 | 80% | 100%, 80%, 60% | {none} |" in text
    assert f"| {q.METHODS['pe-codi-lora']} | 125.00 | 50% | 50%, 50%, 50% | {none} |" in text
    assert (
        "CoDi at 4 steps: on the main classifier it closes 60% to 100% of its seed's 4 -> 50 "
        "gap: at least 60% on every seed"
    ) in text
    assert "LoRA r16 at 4 steps: on the main classifier it closes 50% of its seed's" in text
    # fid_res is 1.0 everywhere here: no gap under that network, so no share, counts instead
    assert "where the baseline's 4 -> 50 gap is only +0% (under the 30% gate, so no share)" in text
    assert "below the baseline's 50-step FID on 0 of 3 seeds" in text
    assert "The distilled methods close most of the gap on this task too." in text  # 80%
    assert q.inpaint_section(results, (0, 1, 2, 3)) == q.NO_INPAINT  # a seed missing


def _gap_spread():
    sys.path.insert(0, str(ROOT / "bench"))
    import gap_spread

    return gap_spread


def test_bootstrap_fids_are_fids_of_the_same_resampled_rows():
    """Each bootstrap draw is the FID (codi_lightning.metrics.frechet_distance, itself
    checked against torchmetrics) of the same resampled rows of the real and the fake
    features; one generator seed gives the same draws."""
    import torch

    from codi_lightning.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 6, generator=g)
    fakes = {
        "a": real + 0.5 * torch.randn(60, 6, generator=g),
        "b": torch.randn(60, 6, generator=g) * 2,
    }
    draws = _gap_spread().fid_resamples(real, fakes, draws=3, seed=7)
    gen = torch.Generator().manual_seed(7)  # the rows the function draws, longhand
    for b in range(3):
        rows = torch.randint(60, (60,), generator=gen)
        for name, fake in fakes.items():
            assert float(draws[name][b]) == pytest.approx(
                frechet_distance(real[rows], fake[rows]), rel=1e-6
            )
    again = _gap_spread().fid_resamples(real, fakes, draws=3, seed=7)
    assert torch.equal(draws["a"], again["a"])


def test_share_interval_is_the_percentiles_of_the_per_draw_shares():
    import torch

    b4 = [torch.tensor([130.0, 120.0, 110.0]), torch.tensor([110.0, 120.0, 130.0])]
    b50 = [torch.tensor([90.0, 100.0, 110.0]), torch.tensor([110.0, 100.0, 90.0])]
    model = [torch.tensor([110.0, 110.0, 100.0]), torch.tensor([100.0, 100.0, 120.0])]
    # seed means per draw: b4 120, 120, 120; b50 100, 100, 100; model 105, 105, 110
    lo, hi = _gap_spread().share_interval(b4, b50, model, level=1.0)
    assert (lo, hi) == pytest.approx((0.5, 0.75))  # min and max of 0.75, 0.75, 0.5


def test_spreads_read_every_runs_features_and_refuse_other_test_images(tmp_path):
    """The report's intervals from stored features: a model whose features equal the
    baseline's 50-step ones closes the whole gap on every draw; a run tested on other
    digits is refused."""
    import torch

    q = _quality()
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 5, generator=g)
    far, near = real + 1.0, real + 0.1 * torch.randn(40, 5, generator=g)
    runs = {}
    for seed in (0, 1):
        for method, steps_fake in (("baseline", {4: far, 50: near}),
                                   ("codi", {1: far, 2: far, 4: near})):  # fmt: skip
            path = tmp_path / f"{method}-{seed}.pt"
            torch.save({s: {"fid": {"real": real, "fake": f}} for s, f in steps_fake.items()}, path)
            runs[f"{method}-s{seed}"] = {"features": str(path)}
    out = q.spreads({"runs": runs}, "", ("codi",), draws=20)
    assert out["fid"]["codi@4"] == pytest.approx({"lo": 1.0, "hi": 1.0})
    assert out["fid"]["codi@1"] == pytest.approx({"lo": 0.0, "hi": 0.0})
    assert "fid_res" not in out  # no run stored those features
    torch.save({s: {"fid": {"real": real.flip(0), "fake": near}} for s in (1, 2, 4)},
               tmp_path / "codi-1.pt")  # fmt: skip
    with pytest.raises(ValueError, match="codi-s1 was tested on other images"):
        q.spreads({"runs": runs}, "", ("codi",), draws=2)


def test_a_feature_network_without_a_gap_gets_counts_not_shares():
    """Under a network where the baseline's 4 -> 50 gap is under the 30% gate, the claim
    counts the seeds that beat the baseline's 50 steps instead of dividing by that gap."""
    q = _quality()
    results = _runs({
        "baseline": {4: [130.0, 110.0], 50: [90.0, 80.0]},
        "codi": {1: [200.0, 180.0], 2: [120.0, 100.0], 4: [100.0, 70.0]},
    })  # fmt: skip
    res = {("baseline", 4): [8.0, 8.2], ("baseline", 50): [7.5, 7.6], ("codi", 4): [5.0, 7.9]}
    for (method, steps), values in res.items():
        for seed, v in enumerate(values):
            results["runs"][f"{method}-s{seed}"]["results"][str(steps)]["fid_res"] = v
    words = q.claim_words(results, "codi", "CoDi")
    # main classifier: (130 - 100) / 40 = 75%, (110 - 70) / 30 = 133%
    assert "on the main classifier it closes 75% to 133% of its seed's 4 -> 50 gap" in words
    gap = (8.1 / 7.55) - 1  # +7%
    assert f"gap is only {gap:+.0%} (under the 30% gate, so no share)" in words
    assert "below the baseline's 50-step FID on 1 of 2 seeds and below its 4-step FID on 2" in words
    assert q.share_cells(results, {}, "codi", 4, "fid_res") == (
        f"none: 4 -> 50 gap {gap:+.0%}",
        "below baseline 50: 1/2",
    )
