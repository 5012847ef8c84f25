"""The CoDi loss: gradient flow, every switch, and a hand-written reference."""

import itertools
import math

import pytest
import torch
from torch import nn

from codi_lightning.diffusion import CoDiLossConfig, NoiseSchedule, codi_loss, distance

SCHED = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


class Net(nn.Module):
    """A timestep-aware toy denoiser."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.temb = nn.Linear(1, 4)

    def forward(self, z, t):
        return self.conv(z) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([19, 499, 999][:batch])
    s = (t - 20).clamp(min=0)
    return x, noise, t, s


ALL_CONFIGS = [
    CoDiLossConfig(ode_noise=n, consistency_space=c, guidance_weight=w, distance=d)
    for n, c, w, d in itertools.product(
        ["true", "predicted"], ["epsilon", "x"], [0.0, 1.0], ["l2", "huber"]
    )
]


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_no_gradient_reaches_target_or_solver(config, pt):
    sched = NoiseSchedule.from_config({**SCHED, "prediction_type": pt})
    online, target, teacher = Net(0), Net(1), Net(2)
    x, noise, t, s = _inputs()
    loss, terms = codi_loss(online, target, teacher, x, noise, t, s, sched, config)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert set(terms) == {"consistency", "guidance", "loss"}
    assert all(not v.requires_grad for v in terms.values())
    expected = terms["consistency"] + config.guidance_weight * terms["guidance"]
    torch.testing.assert_close(terms["loss"], expected)


def test_reused_online_prediction_is_detached():
    """solver=None (reuse the online output) must give the same loss and gradient as
    calling the online net again under no_grad: no gradient flows through the ODE step."""
    sched = NoiseSchedule.from_config(SCHED)
    x, noise, t, s = _inputs()
    config = CoDiLossConfig(ode_noise="predicted")
    grads = []
    for solver_is_none in (True, False):
        online, target = Net(0), Net(1)
        solver = None if solver_is_none else online
        loss, _ = codi_loss(online, target, solver, x, noise, t, s, sched, config)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in online.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)


def _l2(a, b):
    return ((a - b) ** 2).mean()


def _huber(a, b, c=0.001):
    """LCM's pseudo-Huber sqrt(d^2 + c^2) - c per element, averaged."""
    return (((a - b) ** 2 + c * c).sqrt() - c).mean()


def _reference_loss(online, target, x, noise, t, s, sched, consistency_space, ode_noise, dist=_l2):
    """The paper's equations written out longhand for epsilon prediction (L2 by default)."""
    abar = sched.alphas_cumprod.float()
    a_t, s_t = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    a_s, s_s = abar[s].sqrt().view(-1, 1, 1, 1), (1 - abar[s]).sqrt().view(-1, 1, 1, 1)

    def cskip_cout(tt):
        st = 10.0 * tt.double()
        return (
            (0.25 / (st**2 + 0.25)).float().view(-1, 1, 1, 1),
            (st / (st**2 + 0.25).sqrt()).float().view(-1, 1, 1, 1),
        )

    z_t = a_t * x + s_t * noise
    eps_t = online(z_t, t)
    x_t = (z_t - s_t * eps_t) / a_t
    cs, co = cskip_cout(t)
    f_t = cs * z_t + co * x_t
    with torch.no_grad():
        eps_sol = eps_t.detach()
        x_sol = (z_t - s_t * eps_sol) / a_t
        z_s = a_s * x_sol + s_s * (noise if ode_noise == "true" else eps_sol)
        eps_s = target(z_s, s)
        x_s = (z_s - s_s * eps_s) / a_s
        cs, co = cskip_cout(s)
        f_s = cs * z_s + co * x_s
    if consistency_space == "epsilon":
        cons = dist(eps_t, eps_s)
    else:
        cons = dist(f_t, f_s)
    return cons + dist(f_t, x)


@pytest.mark.parametrize("space", ["epsilon", "x"])
@pytest.mark.parametrize("ode_noise", ["true", "predicted"])
def test_matches_longhand_reference(space, ode_noise):
    sched = NoiseSchedule.from_config(SCHED)
    online, target = Net(0), Net(1)
    x, noise, t, s = _inputs()
    cfg = CoDiLossConfig(consistency_space=space, ode_noise=ode_noise)
    loss, _ = codi_loss(online, target, None, x, noise, t, s, sched, cfg)
    ref = _reference_loss(online, target, x, noise, t, s, sched, space, ode_noise)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", ["epsilon", "x"])
def test_huber_loss_matches_longhand_reference(space):
    sched = NoiseSchedule.from_config(SCHED)
    online, target = Net(0), Net(1)
    x, noise, t, s = _inputs()
    cfg = CoDiLossConfig(consistency_space=space, distance="huber")
    loss, _ = codi_loss(online, target, None, x, noise, t, s, sched, cfg)
    ref = _reference_loss(online, target, x, noise, t, s, sched, space, "true", dist=_huber)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_huber_distance_on_known_values():
    """d(a, b) = mean over elements of sqrt((a - b)^2 + c^2) - c, one value per sample."""
    a = torch.tensor([[[0.001, -0.002], [0.5, 3.0]], [[0.0, 0.0005], [-0.1, 0.02]]])
    b = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    for c in (0.001, 0.1):
        expected = torch.tensor(
            [
                sum(math.sqrt(d * d + c * c) - c for d in row) / len(row)
                for row in ([0.001, -0.002, 0.5, 2.0], [0.0, 0.0005, -0.1, 0.02])
            ]
        )
        got = distance(a, b, "huber", huber_c=c)
        assert got.shape == (2,)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)
    # the default constant is c = 0.001: at |d| = c the element is (sqrt(2) - 1) c
    one = distance(torch.full((1, 4), 0.001), torch.zeros(1, 4), "huber")
    assert one.item() == pytest.approx((math.sqrt(2) - 1) * 0.001, rel=1e-4)
    assert CoDiLossConfig(distance="huber").huber_c == 0.001


def test_switches_change_the_loss():
    sched = NoiseSchedule.from_config(SCHED)
    online, target = Net(0), Net(1)
    x, noise, t, s = _inputs()
    values = {
        str(c): codi_loss(online, target, None, x, noise, t, s, sched, c)[0].item()
        for c in ALL_CONFIGS
    }
    assert len(set(values.values())) == len(values)


def test_perfect_model_has_zero_loss():
    """A denoiser that knows x predicts the true noise everywhere: consistency and
    guidance both vanish (up to fp error) with true-noise replacement."""
    sched = NoiseSchedule.from_config(SCHED)
    x, noise, _, _ = _inputs()
    t = torch.tensor([39, 499, 999])  # s > 0 everywhere; s = 0 is checked below
    s = t - 20

    def oracle(z, tt):
        a, sg = sched.alpha_sigma(tt, z)
        return (z - a * x) / sg

    for space in ("epsilon", "x"):
        loss, terms = codi_loss(
            oracle, oracle, None, x, noise, t, s, sched, CoDiLossConfig(consistency_space=space)
        )
        assert terms["guidance"] < 1e-8, terms
        assert terms["consistency"] < 1e-8, terms


def test_x_space_target_at_s0_is_the_boundary_sample():
    """At s = 0, c_skip = 1 and c_out = 0: the x-space target is z_hat_0 itself, whatever
    the target network says (the consistency-model boundary f(z, 0) = z)."""
    sched = NoiseSchedule.from_config(SCHED)
    x, noise, _, _ = _inputs(batch=1)
    t, s = torch.tensor([19]), torch.tensor([0])
    online = Net(0)
    cfg = CoDiLossConfig(consistency_space="x", guidance_weight=0.0)
    loss_a, _ = codi_loss(online, Net(1), None, x, noise, t, s, sched, cfg)
    loss_b, _ = codi_loss(online, Net(2), None, x, noise, t, s, sched, cfg)
    torch.testing.assert_close(loss_a, loss_b)


@pytest.mark.parametrize("bad", [{"solver": "ema"}, {"ode_noise": "x"}, {"distance": "lpips"}])
def test_bad_switch_names_choices(bad):
    with pytest.raises(ValueError, match="choose one of"):
        CoDiLossConfig(**bad)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_matches_longhand_and_is_zero_for_an_oracle(pt):
    from codi_lightning.diffusion import diffusion_loss

    sched = NoiseSchedule.from_config({**SCHED, "prediction_type": pt})
    x, noise, t, _ = _inputs()
    abar = sched.alphas_cumprod[t].float()[:, None, None, None]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    z = a * x + s * noise
    target = {"epsilon": noise, "v_prediction": a * noise - s * x, "sample": x}[pt]
    net = Net(0)
    expected = ((net(z, t) - target) ** 2).mean()
    torch.testing.assert_close(diffusion_loss(net, x, noise, t, sched), expected)

    def oracle(zz, tt):
        torch.testing.assert_close(zz, z)  # the model sees z_t = alpha x + sigma eps
        return target

    assert diffusion_loss(oracle, x, noise, t, sched) < 1e-10
