"""Rectified flow beside VP (METHOD.md, "Other teacher families"): the schedule and the
Euler step against diffusers' FlowMatchEulerDiscreteScheduler, the conversions, and the
CoDi loss on a flow schedule against a longhand computation."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from codi_lightning.diffusion import (
    CoDiLossConfig,
    FlowSchedule,
    NoiseSchedule,
    codi_loss,
    diffusion_loss,
    ode_step,
    sample,
    sampling_timesteps,
    schedule_from_config,
    to_output,
    to_x_eps,
)
from codi_lightning.testing.tiny import SD_SCHEDULER


@pytest.fixture
def stock():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's


def test_schedule_matches_diffusers(stock):
    # as scheduler/scheduler_config.json of an SD3 folder reads
    flow = schedule_from_config({"_class_name": type(stock).__name__, **stock.config})
    assert isinstance(flow, FlowSchedule) and flow.shift == 3.0
    assert isinstance(schedule_from_config(SD_SCHEDULER), NoiseSchedule)
    # diffusers lists sigmas from noisiest to cleanest; ours are indexed by t = 0 .. T-1
    torch.testing.assert_close(flow.sigmas.flip(0).float(), stock.sigmas.float())
    t = torch.arange(1000)
    torch.testing.assert_close(flow.model_timesteps(t).flip(0), stock.timesteps.float())
    x = torch.randn(2, 4, 3, 3)
    alpha, sigma = flow.alpha_sigma(torch.tensor([0, 999]), x)
    assert torch.allclose(alpha + sigma, torch.ones_like(alpha))
    assert sigma[1].item() == pytest.approx(1.0) and sigma[0].item() == pytest.approx(
        3e-3 / (1 + 2e-3), rel=1e-4
    )


def test_conversions_recover_x_and_eps():
    x, eps = (
        torch.randn(2, 4, 3, 3, dtype=torch.float64),
        torch.randn(2, 4, 3, 3, dtype=torch.float64),
    )
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64).view(2, 1, 1, 1)
    z = (1 - sigma) * x + sigma * eps
    v = to_output(x, eps, 1 - sigma, sigma, "flow")
    torch.testing.assert_close(v, eps - x)
    x_hat, eps_hat = to_x_eps(v, z, 1 - sigma, sigma, "flow")
    torch.testing.assert_close(x_hat, x)
    torch.testing.assert_close(eps_hat, eps)


def test_ode_step_is_diffusers_euler_step(stock):
    """z_s = (1 - sigma_s) x_hat + sigma_s eps_hat is FlowMatchEulerDiscreteScheduler.step."""
    flow = FlowSchedule.from_config(dict(stock.config))
    t, s = torch.tensor([699]), torch.tensor([499])
    u = [(t.item() + 1) / 1000, (s.item() + 1) / 1000]  # set_timesteps shifts these
    stock.set_timesteps(sigmas=u)
    z, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    expected = stock.step(v, stock.timesteps[0], z).prev_sample
    alpha_t, sigma_t = flow.alpha_sigma(t, z)
    alpha_s, sigma_s = flow.alpha_sigma(s, z)
    x_hat, eps_hat = to_x_eps(v, z, alpha_t, sigma_t, "flow")
    torch.testing.assert_close(
        ode_step(x_hat, eps_hat, alpha_s, sigma_s), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("ode_noise", ["true", "predicted"])
@pytest.mark.parametrize("space", ["epsilon", "x"])
def test_codi_loss_on_flow_matches_a_longhand_computation(stock, ode_noise, space):
    flow = FlowSchedule.from_config(dict(stock.config))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t, s = torch.tensor([999, 500, 0]), torch.tensor([979, 480, 0])  # t = 0: f = x_hat, not z

    def online(z, tt):
        return 0.7 * z - 0.2

    def target(z, tt):
        return 0.5 * z + 0.1

    config = CoDiLossConfig(ode_noise=ode_noise, consistency_space=space, guidance_weight=0.5)
    loss, terms = codi_loss(online, target, None, x, eps, t, s, flow, config)
    # longhand, METHOD.md steps 1-5 with the flow formulas (f = x_hat: no c_skip / c_out)
    sig_t, sig_s = flow.sigmas[t].float().view(3, 1, 1, 1), flow.sigmas[s].float().view(3, 1, 1, 1)
    z_t = (1 - sig_t) * x + sig_t * eps
    v_t = 0.7 * z_t - 0.2
    x_t, eps_t = z_t - sig_t * v_t, z_t + (1 - sig_t) * v_t
    # Euler step with the true eps (noise replacement) or the solver's own eps_hat (DDIM)
    z_s = (1 - sig_s) * x_t + sig_s * (eps if ode_noise == "true" else eps_t)
    v_s = 0.5 * z_s + 0.1
    x_s, eps_s = z_s - sig_s * v_s, z_s + (1 - sig_s) * v_s
    a, b = (eps_t, eps_s) if space == "epsilon" else (x_t, x_s)
    consistency = (a - b).square().flatten(1).mean(1)
    guidance = (x_t - x).square().flatten(1).mean(1)
    torch.testing.assert_close(terms["consistency"], consistency.mean())
    torch.testing.assert_close(loss, (consistency + 0.5 * guidance).mean())
    # the diffusion loss regresses the velocity eps - x
    expected = ((0.7 * z_t - 0.2) - (eps - x)).square().mean()
    torch.testing.assert_close(diffusion_loss(online, x, eps, t, flow), expected)


def test_flow_consistency_function_is_x_hat_without_boundary_scalings(stock):
    """f(z, t) = x_hat = z - sigma v_hat already equals z at sigma = 0; LCM's c_skip /
    c_out (which give f = z at t = 0) must not be applied on top."""
    flow = FlowSchedule.from_config(dict(stock.config))
    z, x_hat, t0 = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.tensor([0])
    assert torch.equal(flow.boundary(z, x_hat, t0), x_hat)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    _, terms = codi_loss(lambda zz, tt: 0.7 * zz - 0.2, lambda zz, tt: zz, None, x, eps, t0, t0,
                         flow, CoDiLossConfig())  # fmt: skip
    sig = flow.sigmas[0].float()
    z0 = (1 - sig) * x + sig * eps
    expected = ((z0 - sig * (0.7 * z0 - 0.2)) - x).square().mean()  # O(sigma^2): exact rtol
    torch.testing.assert_close(terms["guidance"], expected, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_stochastic_sampler_is_flow_match_lcm_scheduler(stock, steps):
    """Our multistep consistency sampler on a flow schedule runs the same sigmas, feeds the
    network the same timesteps and produces the same latents as diffusers'
    FlowMatchLCMScheduler given our steps as (unshifted) sigmas, with the same generator."""
    from diffusers import FlowMatchLCMScheduler

    flow = FlowSchedule.from_config(dict(stock.config))
    lcm = FlowMatchLCMScheduler(shift=3.0)
    timesteps = sampling_timesteps(steps, 1000, 50)
    lcm.set_timesteps(sigmas=flow.unshifted(timesteps))
    t = torch.tensor(timesteps)
    torch.testing.assert_close(lcm.sigmas[:-1], flow.sigmas[t].float())
    assert lcm.sigmas[-1].item() == 0.0
    torch.testing.assert_close(lcm.timesteps, flow.model_timesteps(t))

    fed = []

    def velocity(z, model_t):  # a smooth stand-in network of (z, 1000 sigma)
        fed.append(model_t.flatten()[0].item())
        return 0.8 * z - 0.3 + model_t.view(-1, 1, 1, 1) / 2000

    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    ours = sample(
        lambda z, tt: velocity(z, flow.model_timesteps(tt)), noise, flow, timesteps,
        stochastic=True, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    ours_fed, fed[:] = list(fed), []
    g = torch.Generator().manual_seed(7)
    z = noise.clone()
    for model_t in lcm.timesteps:
        z = lcm.step(velocity(z, model_t.expand(2)), model_t, z, generator=g).prev_sample
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)
    assert ours_fed == pytest.approx(fed)
    # the deterministic sampler (noise = eps_hat) is FlowMatchEulerDiscreteScheduler
    stock.set_timesteps(sigmas=flow.unshifted(timesteps))
    z = noise.clone()
    for model_t in stock.timesteps[:-1] if steps > 1 else []:
        z = stock.step(velocity(z, model_t.expand(2)), model_t, z).prev_sample
    last = stock.timesteps[-1]
    x_last = z - stock.sigmas[-2] * velocity(z, last.expand(2))  # f = x_hat at the last step
    det = sample(lambda zz, tt: velocity(zz, flow.model_timesteps(tt)), noise, flow, timesteps)
    torch.testing.assert_close(det, x_last, rtol=1e-5, atol=1e-5)


FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                  "max_shift": 1.15, "shift": 3.0, "use_dynamic_shifting": True}  # fmt: skip


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_dynamic_shifting_is_the_stock_schedule_at_that_size(seq_len):
    """Flux's scheduler shifts sigmas by the image size (mu from the token count, as the
    stock pipelines compute it); the table at a fixed resolution is the stock sampler's
    at that size, for the full grid and for our steps given as sigmas."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    stock = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = calculate_shift(seq_len)  # the pipeline's own mu (its defaults are Flux.1's)
    flow = schedule_from_config({"_class_name": type(stock).__name__, **stock.config}, seq_len)
    assert flow.shift == pytest.approx(torch.tensor(mu).exp().item())
    stock.set_timesteps(1000, mu=mu)
    torch.testing.assert_close(flow.sigmas.flip(0).float(), stock.sigmas[:-1].float())
    steps = [999, 759, 499, 259]
    stock.set_timesteps(sigmas=flow.unshifted(steps), mu=mu)
    torch.testing.assert_close(stock.sigmas[:-1].double(), flow.sigmas[steps], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="model.shift_resolution"):
        schedule_from_config({"_class_name": type(stock).__name__, **stock.config})


def test_a_multistep_solvers_flow_config_is_the_flow_schedule_it_samples():
    """SANA's scheduler (DPMSolverMultistepScheduler in flow mode, ``flow_shift`` 3): the
    flow schedule of that shift, FlowMatchEulerDiscreteScheduler's table."""
    from diffusers import DPMSolverMultistepScheduler

    solver = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    schedule = schedule_from_config(solver.config)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 3.0
    torch.testing.assert_close(
        schedule.sigmas.float(), FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0)
    )
    # the network is fed 1000 sigma in both (the solver's timesteps are its sigmas x 1000)
    solver.set_timesteps(4)
    torch.testing.assert_close(
        solver.timesteps.double(), (solver.sigmas[:-1] * 1000).double().round(), atol=1, rtol=0
    )
    t = torch.tensor([999, 500, 0])
    torch.testing.assert_close(schedule.model_timesteps(t).double(), schedule.sigmas[t] * 1000)


def test_the_vp_view_of_a_flow_state_has_its_noise_level():
    """vp_view_of_flow: at any flow sigma the VP scales give b / (a + b) = sigma with
    a^2 + b^2 = 1, at a fractional timestep between the integer ones that bracket it;
    levels a VP schedule never reaches are refused."""
    from codi_lightning.diffusion import NoiseSchedule, vp_view_of_flow
    from codi_lightning.testing.tiny import SD_SCHEDULER

    abar = NoiseSchedule.from_config(SD_SCHEDULER).alphas_cumprod
    sigma = torch.tensor([0.1, 0.5, 0.77, 0.9]).double()
    t, a, b = vp_view_of_flow(abar, sigma)
    torch.testing.assert_close(b / (a + b), sigma, rtol=0, atol=2e-4)
    torch.testing.assert_close(a.square() + b.square(), torch.ones(4, dtype=torch.float64))
    ratio = (1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt())
    for level, when in zip(sigma, t, strict=True):
        below = int(when)
        assert ratio[below] <= level <= ratio[below + 1]
    with pytest.raises(ValueError, match="noise levels"):
        vp_view_of_flow(abar, torch.tensor([0.99]))
