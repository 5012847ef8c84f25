"""Diffusion math against independent references (diffusers' DDPM/DDIM/LCM schedulers)."""

import itertools
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


class _ToyDenoiser:
    """A fixed, non-linear function of (z, t) that records every call it gets."""

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.weight = 0.3 * torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
        self.calls = []

    def __call__(self, z, t):
        self.calls.append((z.detach().clone(), t.detach().clone()))
        tt = t.to(z.dtype).view(-1, 1, 1, 1) / 1000
        conv = torch.nn.functional.conv2d(z, self.weight.to(z.dtype), padding=1)
        return 0.5 * torch.tanh(conv) * (1 + tt) + z * (0.6 + 0.3 * torch.cos(3 * tt)) + 0.2 * tt


def _longhand_deterministic_sampler(net, noise, timesteps, pt):
    """The S-step deterministic consistency sampler written out from the equations, in
    fp64: at each t predict x_hat and eps_hat from the raw output o, take the boundary
    prediction f = c_skip z + c_out x_hat, and move to the next t with
    z <- alpha_next f + sigma_next eps_hat. Returns (the z fed at every step, final f)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, dim=0)
    lcm = LCMScheduler.from_config(SD_CONFIG)
    z = noise.double()
    fed = []
    for i, t in enumerate(timesteps):
        fed.append(z)
        alpha, sigma = abar[t].sqrt(), (1 - abar[t]).sqrt()
        o = net(z, torch.full((z.shape[0],), t))
        if pt == "epsilon":
            x_hat, eps_hat = (z - sigma * o) / alpha, o
        elif pt == "v_prediction":
            x_hat, eps_hat = alpha * z - sigma * o, alpha * o + sigma * z
        else:
            x_hat, eps_hat = o, (z - alpha * o) / sigma
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        f = float(c_skip) * z + float(c_out) * x_hat
        if i == len(timesteps) - 1:
            return fed, f
        t_next = timesteps[i + 1]
        z = abar[t_next].sqrt() * f + (1 - abar[t_next]).sqrt() * eps_hat
    raise AssertionError("unreachable")


def _check_trajectory(pt, timesteps, noise):
    net = _ToyDenoiser()
    sched = NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": pt})
    out = sample(net, noise, sched, list(timesteps))
    ref_z, ref_out = _longhand_deterministic_sampler(_ToyDenoiser(), noise, timesteps, pt)

    batch = noise.shape[0]
    assert [c[1].tolist() for c in net.calls] == [[t] * batch for t in timesteps]
    assert len(net.calls) == len(ref_z) == len(timesteps)
    for i, ((z, _), zr) in enumerate(zip(net.calls, ref_z, strict=True)):
        torch.testing.assert_close(z.double(), zr, rtol=1e-5, atol=1e-5, msg=f"z at step {i}")
    # the trajectory really moves: each step's input differs from the previous one
    for (a, _), (b, _) in itertools.pairwise(net.calls):
        assert (a - b).abs().max() > 1e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pt", PRED_TYPES)
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_deterministic_sampler_trajectory_matches_longhand(pt, steps):
    """Every intermediate (z, t) the network sees, and the final sample, equal the
    longhand multistep sampler driven by LCMScheduler's timesteps and scalings."""
    lcm = LCMScheduler.from_config(SD_CONFIG)
    lcm.set_timesteps(steps, original_inference_steps=50)
    ref_ts = [int(t) for t in lcm.timesteps]
    assert len(set(ref_ts)) == steps
    assert sampling_timesteps(steps, 1000, 50) == ref_ts
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    _check_trajectory(pt, ref_ts, noise)


@pytest.mark.parametrize("pt", PRED_TYPES)
@pytest.mark.parametrize("timesteps", [[999, 259, 3, 1], [999, 499, 1, 0]], ids=str)
def test_deterministic_sampler_applies_the_boundary_near_t0(pt, timesteps):
    """On the LCM grid c_skip is ~1e-7, so f ~ x_hat; near t = 0 the boundary condition
    f = c_skip z + c_out x_hat matters and must be applied at every step and at the end
    (at t = 0 the sampler returns its input z)."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    _check_trajectory(pt, timesteps, noise)
