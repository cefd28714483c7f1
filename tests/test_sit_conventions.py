"""Our samplers against small independent re-statements of SiT's ``sample_ddp.py`` loops and REPA's samplers.

The re-statements follow willisma/SiT (``transport/integrators.py``: ODE through torchdiffeq on
``linspace(t0, t1, N)``; SDE Euler-Maruyama / Heun with ``sqrt(2 * diffusion)`` noise and drift
``v + diffusion * score``; last step "Mean") and sihyun-yu/REPA (``samplers.py``: time runs from noise 1 to data 0,
``--num-steps N`` makes N steps, Heun skips the corrector on the last step). Same tiny model, same noise.
"""
from __future__ import annotations

import math

import pytest
import torch
from torchdiffeq import odeint

from helpers import random_sit
from reals import ReaLSError
from reals.transport import ClassifierFreeGuidance, ODESampler, SDESampler, create_transport

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return random_sit(input_size=8, std=0.05)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 2, 5])


def sit_score(v, x, t):
    """SiT's ``get_score_from_velocity`` on the linear path (alpha = t, sigma = 1 - t)."""
    t = t.view(-1, 1, 1, 1)
    ratio = t / 1.0
    var = (1 - t) ** 2 + ratio * (1 - t)
    return (ratio * v - x) / var


def sit_ode(fn, x, num_steps, method):
    """SiT's ``ode.sample``: torchdiffeq on ``linspace(0, 1, num_steps)`` (velocity, linear path)."""
    ts = torch.linspace(0, 1, num_steps)
    return odeint(lambda t, z: fn(z, torch.ones(z.shape[0]) * t), x, ts, method=method)[-1]


def sit_sde(fn, x, num_steps, noises, norm=1.0, heun=False, last_step_size=0.04):
    """SiT's ``sde.sample`` plus the "Mean" last step, diffusion form "sigma"."""
    ts = torch.linspace(0, 1 - last_step_size, num_steps)
    dt = ts[1] - ts[0]

    def drift(z, t):
        v = fn(z, t)
        return v + norm * (1 - t).view(-1, 1, 1, 1) * sit_score(v, z, t)

    for ti, w in zip(ts[:-1], noises):
        t = torch.ones(x.shape[0]) * ti
        diffusion = norm * (1 - t).view(-1, 1, 1, 1)
        dw = w * torch.sqrt(dt)
        if heun:
            xhat = x + torch.sqrt(2 * diffusion) * dw
            k1 = drift(xhat, t)
            k2 = drift(xhat + dt * k1, t + dt)
            x = xhat + 0.5 * dt * (k1 + k2)
        else:
            x = x + drift(x, t) * dt + torch.sqrt(2 * diffusion) * dw
    return x + drift(x, torch.ones(x.shape[0]) * ts[-1]) * last_step_size


def repa_guided(model, x, t_r, y, cfg, lo, hi, t_decide):
    """REPA's guided velocity in its own time (x_t = (1 - t) x + t eps, so v_R(x, t) = -v_SiT(x, 1 - t))."""
    def v(z, yy):
        return -model(z, 1 - t_r.expand(z.shape[0]).float(), yy)
    if cfg > 1 and lo <= t_decide <= hi:
        cond, uncond = v(torch.cat([x, x]).float(), torch.cat([y, torch.full_like(y, model.num_classes)])).chunk(2)
        return (uncond + cfg * (cond - uncond)).double()
    return v(x.float(), y).double()


def repa_heun(model, x, y, num_steps, cfg, lo, hi):
    """REPA's ``euler_sampler(heun=True)``."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = x.double()
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        d = repa_guided(model, x, t_cur, y, cfg, lo, hi, t_cur)
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:
            d2 = repa_guided(model, x_next, t_next, y, cfg, lo, hi, t_cur)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def repa_score(v, z, t, path):
    """REPA's ``get_score_from_velocity`` in its time (linear: alpha = 1 - t, sigma = t; cosine: alpha = cos(pi t / 2),
    sigma = sin(pi t / 2))."""
    if path == "linear":
        alpha, d_alpha, sigma, d_sigma = 1 - t, -1.0, t, 1.0
    else:
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        d_alpha, d_sigma = -math.pi / 2 * sigma, math.pi / 2 * alpha
    ratio = alpha / d_alpha
    return (ratio * v - z) / (sigma ** 2 - ratio * d_sigma * sigma)


def repa_sde(model, x, y, num_steps, cfg, lo, hi, noises, path="linear"):
    """REPA's ``euler_maruyama_sampler``: diffusion 2t (on either path), N - 1 noisy steps from 1 to 0.04, then a
    mean step to 0."""
    ts = torch.cat([torch.linspace(1, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = x.double()

    def drift(z, t_cur):
        v = repa_guided(model, z, t_cur, y, cfg, lo, hi, t_cur)
        return v - 0.5 * 2 * t_cur * repa_score(v, z, t_cur, path)

    for (t_cur, t_next), w in zip(zip(ts[:-2], ts[1:-1]), noises):
        dt = t_next - t_cur
        x = x + drift(x, t_cur) * dt + torch.sqrt(2 * t_cur) * w.double() * torch.sqrt(dt.abs())
    return x + (ts[-1] - ts[-2]) * drift(x, ts[-2])


def replay(noises):
    it = iter(noises)
    return lambda x: next(it).to(x.dtype)


def draws(n, shape, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method,torchdiffeq_method,nfe", [("euler", "euler", 9), ("heun", "heun2", 18)])
def test_ode_equals_sit(model, batch, method, torchdiffeq_method, nfe):
    x0, y = batch
    fn = lambda x, t: model(x, t, y)  # noqa: E731
    sampler = ODESampler(create_transport(), method, 10)  # 10 grid points, 9 steps, as SiT's --num-sampling-steps 10
    with torch.no_grad():
        ours, theirs = sampler(x0, model, y=y), sit_ode(fn, x0, 10, torchdiffeq_method)
    assert (ours - theirs).abs().max().item() < TOL
    assert sampler.nfe == nfe


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sde_equals_sit(model, batch, method):
    x0, y = batch
    noises = draws(11, x0.shape)
    fn = lambda x, t: model(x, t, y)  # noqa: E731
    sampler = SDESampler(create_transport(), num_steps=12, method=method)
    with torch.no_grad():
        ours = sampler(x0, model, noise_fn=replay(noises), y=y)
        theirs = sit_sde(fn, x0, 12, noises, heun=method == "heun")
        halved = sit_sde(fn, x0, 12, noises, norm=0.5, heun=method == "heun")
    assert (ours - theirs).abs().max().item() < TOL
    assert (ours - halved).abs().max().item() > 1e-2  # the norm is SiT's, not half of it
    assert sampler.nfe == (12 if method == "euler" else 23)


def test_heun_repa_equals_repa_with_an_interval(model, batch):
    x0, y = batch
    cfg = ClassifierFreeGuidance(model, 1.8, guidance_interval=(0.0, 0.75))
    # REPA's ODE --num-steps 8 is 9 grid points here (its SDE's N is ours: test_sde_equals_repa_euler_maruyama).
    # Its grid t = 1, 0.875, 0.75 ... puts a step on the interval edge.
    sampler = ODESampler(create_transport(), "heun-repa", 9)
    with torch.no_grad():
        ours = sampler(x0, cfg, y=y)
        theirs = repa_heun(model, x0, y, 8, 1.8, 0.0, 0.75)
        plain_heun = ODESampler(create_transport(), "heun", 9)(x0, cfg, y=y)
    assert (ours.double() - theirs).abs().max().item() < TOL
    assert (plain_heun.double() - theirs).abs().max().item() > 1e-4
    assert sampler.nfe == 2 * 8 - 1


def test_sde_equals_repa_euler_maruyama(model, batch):
    x0, y = batch
    noises = draws(9, x0.shape)
    cfg = ClassifierFreeGuidance(model, 1.8, guidance_interval=(0.0, 0.75))
    with torch.no_grad():
        ours = SDESampler(create_transport(), num_steps=10)(x0, cfg, noise_fn=replay(noises), y=y)
        theirs = repa_sde(model, x0, y, 10, 1.8, 0.0, 0.75, noises)
    assert (ours.double() - theirs).abs().max().item() < TOL


def test_sde_equals_repa_on_its_cosine_path_with_its_diffusion(model, batch):
    """REPA's cosine path is SiT's GVP; its SDE keeps diffusion 2t (SiT's "linear" form), not SiT's sigma_t."""
    x0, y = batch
    noises = draws(9, x0.shape)
    cfg = ClassifierFreeGuidance(model, 1.8, guidance_interval=(0.0, 0.75))
    with torch.no_grad():
        theirs = repa_sde(model, x0, y, 10, 1.8, 0.0, 0.75, noises, path="cosine")
        outs = {form: SDESampler(create_transport("GVP"), num_steps=10, diffusion_form=form)(
            x0, cfg, noise_fn=replay(noises), y=y).double() for form in ("linear", "sigma")}
    assert (outs["linear"] - theirs).abs().max().item() < TOL
    assert (outs["sigma"] - theirs).abs().max().item() > 1e-2  # SiT's form is another sampler


def test_sde_heun_to_t1_is_refused():
    """SDE Heun with no last step evaluates the score at t = 1 (sigma = 0): NaN in SiT, refused here."""
    with pytest.raises(ReaLSError, match="heun with last step none"):
        SDESampler(create_transport(), method="heun", last_step="none")
    SDESampler(create_transport(), method="euler", last_step="none")
    SDESampler(create_transport(prediction="noise"), method="heun", last_step="none")  # stops at 1 - 1e-3


def test_last_step_choices(model, batch):
    x0, y = batch
    noises = draws(9, x0.shape)
    outs = {}
    with torch.no_grad():
        for last in ("mean", "euler", "tweedie", "none"):
            sampler = SDESampler(create_transport(), num_steps=10, last_step=last)
            outs[last] = sampler(x0, model, noise_fn=replay(noises), y=y)
            assert sampler.nfe == (9 if last == "none" else 10)
    assert all((outs[a] - outs[b]).abs().max() > 1e-4 for a, b in [("mean", "euler"), ("mean", "tweedie"),
                                                                    ("mean", "none")])
