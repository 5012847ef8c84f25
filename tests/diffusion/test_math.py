"""Diffusion math against independent references (diffusers' DDPM/DDIM/LCM schedulers)."""

import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from codi_lightning.diffusion import (
    NoiseSchedule,
    boundary_scalings,
    ema_update,
    grid,
    ode_step,
    sample,
    sample_pairs,
    sampling_timesteps,
    to_output,
    to_x_eps,
)

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
PRED_TYPES = ["epsilon", "v_prediction", "sample"]


def test_diffusion_package_imports_torch_only():
    code = (
        "import sys, codi_lightning.diffusion;"
        "bad=[m for m in ('lightning','webdataset','diffusers','transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_ddpm(kind):
    cfg = {**SD_CONFIG, "beta_schedule": kind}
    ours = NoiseSchedule.from_config(cfg).alphas_cumprod
    ref = DDPMScheduler.from_config(cfg).alphas_cumprod
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-7)


def test_bad_prediction_type_names_the_fix():
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": "v"})


@pytest.mark.parametrize("pt", PRED_TYPES)
def test_conversions_round_trip(pt):
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule.from_config(SD_CONFIG)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 500, 990])
    alpha, sigma = sched.alpha_sigma(t, x)
    z = alpha * x + sigma * eps
    out = to_output(x, eps, alpha, sigma, pt)
    x_hat, eps_hat = to_x_eps(out, z, alpha, sigma, pt)
    torch.testing.assert_close(x_hat, x)
    torch.testing.assert_close(eps_hat, eps)


def test_boundary_scalings_equal_lcm():
    lcm = LCMScheduler.from_config(SD_CONFIG)
    for t in [0, 1, 19, 259, 999]:
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        c_skip, c_out = boundary_scalings(torch.tensor(t))
        assert c_skip.item() == pytest.approx(float(ref_skip), rel=1e-12, abs=1e-15)
        assert c_out.item() == pytest.approx(float(ref_out), rel=1e-12, abs=1e-15)
    c_skip, c_out = boundary_scalings(torch.tensor(0))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [50, 20])
def test_sampling_timesteps_equal_lcm(steps, n):
    lcm = LCMScheduler.from_config(SD_CONFIG)
    lcm.set_timesteps(steps, original_inference_steps=n)
    assert sampling_timesteps(steps, 1000, n) == lcm.timesteps.tolist()
    if n == 50 and steps == 4:
        assert sampling_timesteps(4) == [999, 759, 499, 259]


def test_grid_and_pairs():
    g = grid(1000, 50)
    assert g[0] == 19 and g[-1] == 999 and len(g) == 50
    gen = torch.Generator().manual_seed(0)
    t, s = sample_pairs(64, 1000, 50, per_sample=True, generator=gen)
    assert set(t.tolist()) <= set(g.tolist())
    assert torch.equal(s, (t - 20).clamp(min=0))
    assert len(set(t.tolist())) > 1
    t, s = sample_pairs(64, 1000, 50, per_sample=False, generator=gen)
    assert len(set(t.tolist())) == 1
    # the lowest grid point pairs with s = 0
    t0 = torch.full((1,), 19)
    assert (t0 - 20).clamp(min=0).item() == 0


@pytest.mark.parametrize("pt", PRED_TYPES)
def test_deterministic_ode_step_equals_ddim(pt):
    cfg = {**SD_CONFIG, "prediction_type": pt}
    ddim = DDIMScheduler.from_config(cfg, clip_sample=False, set_alpha_to_one=False)
    n = 50
    ddim.set_timesteps(n)  # prev = t - T // n
    sched = NoiseSchedule.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    for t_int in [19, 499, 999]:
        ddim.set_timesteps(n)
        ddim.timesteps = grid(1000, n).flip(0)  # the LCM grid; DDIM only needs prev = t - k
        z = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = ddim.step(out, t_int, z, eta=0.0).prev_sample
        t = torch.full((2,), t_int)
        s = (t - 20).clamp(min=0)
        alpha_t, sigma_t = sched.alpha_sigma(t, z)
        alpha_s, sigma_s = sched.alpha_sigma(s, z)
        x_hat, eps_hat = to_x_eps(out, z, alpha_t, sigma_t, pt)
        ours = ode_step(x_hat, eps_hat, alpha_s, sigma_s)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_ema_update():
    target = [torch.zeros(3), torch.ones(2)]
    online = [torch.ones(3), torch.zeros(2)]
    ema_update(target, online, decay=0.9)
    torch.testing.assert_close(target[0], torch.full((3,), 0.1))
    torch.testing.assert_close(target[1], torch.full((2,), 0.9))
    with pytest.raises(ValueError):
        ema_update(target, online, decay=1.5)


@pytest.mark.parametrize("pt", PRED_TYPES)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("stochastic", [False, True])
def test_sampler_with_oracle_returns_x(pt, steps, stochastic):
    sched = NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": pt})
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).float()

    def oracle(z, t):
        alpha, sigma = sched.alpha_sigma(t, z)
        eps = (z - alpha * x) / sigma
        return to_output(x, eps, alpha, sigma, pt)

    noise = torch.randn(x.shape, generator=g)
    out = sample(
        oracle, noise, sched, sampling_timesteps(steps), stochastic=stochastic, generator=g
    )
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


def test_sampler_guidance_mixes_outputs():
    sched = NoiseSchedule.from_config(SD_CONFIG)
    noise = torch.randn(1, 4, 4, 4)
    cond = lambda z, t: torch.ones_like(z)  # noqa: E731
    uncond = lambda z, t: torch.zeros_like(z)  # noqa: E731
    one = sample(cond, noise, sched, [999])
    guided = sample(cond, noise, sched, [999], uncond_model=uncond, guidance_scale=3.0)
    scaled = sample(lambda z, t: 3 * torch.ones_like(z), noise, sched, [999])
    torch.testing.assert_close(guided, scaled)
    assert not torch.allclose(one, guided)
