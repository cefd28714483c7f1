"""Samplers against flows with closed-form velocities; classifier-free guidance and its interval; seeds."""
from __future__ import annotations

import pytest
import torch

from helpers import random_sit
from reals import ReaLSError
from reals.sit import SiT_models
from reals.transport import ClassifierFreeGuidance, ODESampler, SDESampler, create_transport, randn_per_sample

f64 = torch.float64


class GaussianMixtureFlow:
    """Exact prediction E[target | x_t] for data = sum_k w_k N(m_k, s_k^2 I) and N(0, I) noise, on any path."""

    def __init__(self, transport, weights, means, stds):
        self.transport = transport
        self.w, self.m, self.s = (torch.tensor(v, dtype=f64) for v in (weights, means, stds))

    def __call__(self, x, t, y=None):
        path = self.transport.path
        (a, da), (sg, dsg) = path.alpha(t[:, None, None]), path.sigma(t[:, None, None])
        s2 = self.s[None, :, None] ** 2
        var = a ** 2 * s2 + sg ** 2  # [B, K, 1]
        diff = x[:, None, :] - a * self.m[None]  # [B, K, D]
        v = var[..., 0]
        log_r = torch.log(self.w)[None] - 0.5 * (diff ** 2).sum(-1) / v - 0.5 * x.shape[1] * torch.log(v)
        r = torch.softmax(log_r, dim=1)[..., None]
        velocity = (r * (da * self.m[None] + (da * a * s2 + dsg * sg) / var * diff)).sum(1)
        score = (r * (-diff / var)).sum(1)
        kind = self.transport.prediction.value
        return {"velocity": velocity, "score": score, "noise": -sg[:, 0] * score}[kind]

    def moments(self):
        mean = (self.w[:, None] * self.m).sum(0)
        second = (self.w[:, None] * (self.m ** 2 + self.s[:, None] ** 2)).sum(0)
        return mean, second - mean ** 2


MEAN, STD = (0.5, -1.0), 1.5


def gaussian(transport):
    """Data N(MEAN, STD^2 I): the exact flow map from noise x0 is MEAN + STD * x0 (for any path)."""
    return GaussianMixtureFlow(transport, [1.0], [list(MEAN)], [STD])


def exact_map(x0):
    return torch.tensor(MEAN, dtype=f64) + STD * x0


def mixture(transport):
    return GaussianMixtureFlow(transport, [0.3, 0.7], [[-2.0, 1.0], [1.5, -0.5]], [0.5, 0.8])


def noise(n, seed=0, d=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=f64)


def assert_moments(x, flow, n_sigma=5.0, var_rtol=0.06):
    mean, var = flow.moments()
    assert torch.all((x.mean(0) - mean).abs() < n_sigma * (var / x.shape[0]).sqrt()), (x.mean(0), mean)
    assert torch.allclose(x.var(0), var, rtol=var_rtol), (x.var(0), var)


# ----------------------------------------------------------------------------- ODE accuracy

@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_ode_solvers_against_the_exact_flow_map(path_type):
    transport = create_transport(path_type)
    flow, x0 = gaussian(transport), noise(256)
    exact = exact_map(x0)

    def err(method, steps, **tolerances):
        return (ODESampler(transport, method, steps, **tolerances)(x0, flow) - exact).abs().max().item()

    assert err("dopri5", 2, atol=1e-7, rtol=1e-7) < 1e-5
    assert err("dopri5", 2) < 5e-2  # default tolerances (atol 1e-6, rtol 1e-3)
    euler_10, euler_20, heun_10, heun_20 = err("euler", 11), err("euler", 21), err("heun", 11), err("heun", 21)  # 10 and 20 steps
    assert heun_10 < euler_10 / 3 and heun_20 < euler_20 / 3
    assert 1.6 < euler_10 / euler_20 < 2.5  # first order
    assert heun_10 / heun_20 > 3.0  # second order


@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_ode_on_a_mixture_matches_moments_and_heun_beats_euler(path_type):
    transport = create_transport(path_type)
    flow = mixture(transport)
    x0 = noise(2000)
    reference = ODESampler(transport, "dopri5", 2, atol=1e-7, rtol=1e-7)(x0, flow)
    assert_moments(reference, flow)
    euler = ODESampler(transport, "euler", 17)(x0, flow)
    heun = ODESampler(transport, "heun", 17)(x0, flow)
    assert (heun - reference).pow(2).mean() < (euler - reference).pow(2).mean() / 4


@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_ode_with_score_or_noise_prediction(prediction):
    transport = create_transport("Linear", prediction)
    flow, x0 = gaussian(transport), noise(256)
    x = ODESampler(transport, "dopri5", 2, atol=1e-8, rtol=1e-8)(x0, flow)
    # Integration runs over [sample_eps, 1 - sample_eps], so the map is exact up to O(sample_eps).
    assert torch.allclose(x, exact_map(x0), atol=2e-2)
    assert not torch.allclose(x, exact_map(x0), atol=1e-4)


# ----------------------------------------------------------------------------- SDE

@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_sde_with_exact_score_matches_moments(path_type):
    transport = create_transport(path_type)
    flow = mixture(transport)
    gen = torch.Generator().manual_seed(123)
    brownian = lambda z: torch.randn(z.shape, dtype=z.dtype, generator=gen)  # noqa: E731
    x = SDESampler(transport, num_steps=100)(noise(2000), flow, noise_fn=brownian)
    assert_moments(x, flow)


def test_sde_without_diffusion_is_the_euler_ode():
    transport = create_transport()
    flow = mixture(transport)
    x0 = noise(64)
    sde = SDESampler(transport, num_steps=50, diffusion_norm=0.0, last_step_size=0.02)(x0, flow)
    # Same grid: 49 Euler steps on [0, 0.98] and one last step of 0.02 equals Euler on the uniform grid.
    ode = ODESampler(transport, "euler", 51)(x0, flow)
    assert torch.allclose(sde, ode, atol=1e-12)


# ----------------------------------------------------------------------------- bookkeeping

class CountingModel:
    """Counts calls to a model."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_nfe_and_trajectory():
    transport = create_transport()
    x0 = noise(4)
    for sampler, expected_nfe, states in [
        (ODESampler(transport, "euler", 7), 6, 7),  # 7 grid points, 6 steps (SiT's convention)
        (ODESampler(transport, "heun", 7), 12, 7),
        (ODESampler(transport, "heun-repa", 7), 11, 7),  # no corrector on the last step
        (ODESampler(transport, "dopri5", 7), None, 7),
        (SDESampler(transport, num_steps=7), 7, 8),  # 6 Euler-Maruyama steps and the last step
        (SDESampler(transport, num_steps=7, method="heun"), 13, 8),
    ]:
        model = CountingModel(mixture(transport))
        x, trajectory = sampler(x0, model, return_trajectory=True)
        assert sampler.nfe == model.calls > 0
        if expected_nfe is not None:
            assert sampler.nfe == expected_nfe
        assert trajectory.shape == (states, 4, 2)
        assert torch.equal(trajectory[0], x0) and torch.equal(trajectory[-1], x)
    with pytest.raises(ReaLSError, match="unknown ODE method"):
        ODESampler(transport, "rk4")
    with pytest.raises(ReaLSError, match="last_step_size"):
        SDESampler(transport, last_step_size=0.0)


# ----------------------------------------------------------------------------- guidance

class LabelModel:
    """Prediction 1 for a real class and 0 for the null class, in every channel."""

    num_classes = 10

    def __call__(self, x, t, y):
        return (y != self.num_classes).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x).clone()


def test_cfg_formula_scale_one_and_channels():
    model = random_sit(input_size=4, std=0.1)
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 3, 5])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 6))
        assert torch.allclose(ClassifierFreeGuidance(model, 1.0)(x, t, y), cond)
        guided = ClassifierFreeGuidance(model, 2.5)(x, t, y)
        assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-5)
        first3 = ClassifierFreeGuidance(model, 2.5, cfg_channels=3)(x, t, y)
    assert torch.allclose(first3[:, :3], guided[:, :3], atol=1e-5)
    assert torch.allclose(first3[:, 3:], cond[:, 3:], atol=1e-5)  # DiT/SiT: other channels stay conditional

    transport = create_transport()
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    sampler = ODESampler(transport, "euler", 5)
    with torch.no_grad():
        plain = sampler(x0, model, y=y)
        assert torch.allclose(sampler(x0, ClassifierFreeGuidance(model, 1.0), y=y), plain)
        assert not torch.allclose(sampler(x0, ClassifierFreeGuidance(model, 4.0), y=y), plain)
    with pytest.raises(ReaLSError, match="guidance interval"):
        ClassifierFreeGuidance(model, 1.5, guidance_interval=(0.8, 0.2))


def test_guidance_interval_is_on_the_noise_level_axis():
    model, scale = LabelModel(), 3.0
    cfg = ClassifierFreeGuidance(model, scale, guidance_interval=(0.0, 0.75))
    x, y = torch.zeros(4, 2, dtype=f64), torch.arange(4)
    t = torch.tensor([0.0, 0.2, 0.25, 0.9], dtype=f64)  # tau = 1 - t = 1, 0.8, 0.75, 0.1
    out = cfg(x, t, y)[:, 0]
    assert out.tolist() == [1.0, 1.0, scale, scale]  # noisiest quarter unguided

    # End to end: constant velocity 1, or `scale` where guided. Euler steps at t = i/8 -> tau = 1 - i/8;
    # steps i = 0, 1 (tau = 1, 0.875) are outside [0, 0.75], the other 6 inside.
    x1 = ODESampler(create_transport(), "euler", 9)(x, cfg, y=y)
    assert torch.allclose(x1, torch.full_like(x1, 2 / 8 + 6 / 8 * scale))
    counting = CountingModel(model)
    cfg_counted = ClassifierFreeGuidance(counting, scale, null_class=10, guidance_interval=(0.0, 0.75))
    ODESampler(create_transport(), "euler", 9)(x, cfg_counted, y=y)
    assert counting.calls == 8  # one (doubled or plain) model call per step


def test_per_sample_results_do_not_depend_on_batch_composition():
    torch.manual_seed(0)
    model = SiT_models["SiT-T/2"](input_size=4, in_channels=4, num_classes=6).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    guided = ClassifierFreeGuidance(model, 1.8, guidance_interval=(0.0, 0.75))
    transport = create_transport()
    sampler = SDESampler(transport, num_steps=12)
    seeds, labels = [11, 22, 33], torch.tensor([1, 2, 5])

    def run(order):
        gens = [torch.Generator().manual_seed(seeds[i]) for i in order]
        x0 = randn_per_sample(gens, (4, 4, 4))
        return sampler(x0, guided, generators=gens, y=labels[order])

    full, part = run([0, 1, 2]), run([2, 0])
    assert torch.allclose(full[2], part[0], atol=1e-5) and torch.allclose(full[0], part[1], atol=1e-5)
    assert not torch.allclose(full[0], full[2])
    with pytest.raises(ReaLSError, match="generators"):
        sampler(torch.zeros(2, 4, 4, 4), guided, generators=[torch.Generator()], y=labels[:2])
