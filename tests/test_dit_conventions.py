"""Our DDPM, DDIM and VLB term against small independent re-statements of facebookresearch/DiT's ``diffusion``.

The re-statements follow DiT's ``respace.py`` (``space_timesteps``: a fractional stride accumulated and rounded;
``SpacedDiffusion``: betas ``1 - ab[t] / ab[t_prev]`` over the kept timesteps, the model called with the original
timestep) and ``gaussian_diffusion.py`` (every coefficient a float64 numpy array, cast to float32 at
``_extract_into_tensor``; ``p_sample``, ``ddim_sample``, ``_vb_terms_bpd``), sampling with ``clip_denoised=False``
as DiT's scripts do. Same model, same noise.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reals.diffusion import DDIMSampler, DDPMSampler, GaussianDiffusion
from reals.diffusion.respace import space_timesteps

TOL = 1e-5


def dit_space_timesteps(num_timesteps, section_counts):
    """DiT's ``space_timesteps`` (a list of section counts)."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


class DiTDiffusion:
    """DiT's ``GaussianDiffusion`` quantities (float64 numpy) and its float32 extraction."""

    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        ab = np.cumprod(1.0 - self.betas)
        ab_prev = np.append(1.0, ab[:-1])
        self.ab, self.ab_prev = ab, ab_prev
        self.sqrt_ab, self.sqrt_1m_ab = np.sqrt(ab), np.sqrt(1.0 - ab)
        self.sqrt_recip, self.sqrt_recipm1 = np.sqrt(1.0 / ab), np.sqrt(1.0 / ab - 1)
        self.post_var = self.betas * (1.0 - ab_prev) / (1.0 - ab)
        self.post_log_var = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = self.betas * np.sqrt(ab_prev) / (1.0 - ab)
        self.coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ab)

    @staticmethod
    def at(arr, t, x):
        return torch.from_numpy(arr)[t].float().view(-1, *([1] * (x.ndim - 1))) + torch.zeros_like(x)

    def q_sample(self, x0, t, noise):
        return self.at(self.sqrt_ab, t, x0) * x0 + self.at(self.sqrt_1m_ab, t, x0) * noise

    def q_posterior(self, x0, xt, t):
        return self.at(self.coef1, t, xt) * x0 + self.at(self.coef2, t, xt) * xt, self.at(self.post_log_var, t, xt)

    def p_mean_variance(self, out, x, t):
        eps, v = out.chunk(2, dim=1)
        frac = (v + 1) / 2
        log_var = frac * self.at(np.log(self.betas), t, x) + (1 - frac) * self.at(self.post_log_var, t, x)
        x0 = self.at(self.sqrt_recip, t, x) * x - self.at(self.sqrt_recipm1, t, x) * eps
        return self.q_posterior(x0, x, t)[0], log_var, x0


def dit_spaced(n):
    """DiT's ``create_diffusion(str(n))``: the respaced diffusion and its timestep map."""
    base = DiTDiffusion(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    use, last, betas, timestep_map = dit_space_timesteps(1000, [n]), 1.0, [], []
    for i, ab in enumerate(base.ab):
        if i in use:
            betas.append(1 - ab / last)
            last = ab
            timestep_map.append(i)
    return DiTDiffusion(np.array(betas)), torch.tensor(timestep_map)


def dit_p_sample_loop(model, x, n, noise):
    d, tmap = dit_spaced(n)
    for i in reversed(range(n)):
        t = torch.full((x.shape[0],), i)
        mean, log_var, _ = d.p_mean_variance(model(x, tmap[t]), x, t)
        x = mean + (t != 0).float().view(-1, 1, 1, 1) * torch.exp(0.5 * log_var) * noise(x)
    return x


def dit_ddim_sample_loop(model, x, n, eta, noise):
    d, tmap = dit_spaced(n)
    for i in reversed(range(n)):
        t = torch.full((x.shape[0],), i)
        _, _, x0 = d.p_mean_variance(model(x, tmap[t]), x, t)
        eps = (d.at(d.sqrt_recip, t, x) * x - x0) / d.at(d.sqrt_recipm1, t, x)
        ab, ab_prev = d.at(d.ab, t, x), d.at(d.ab_prev, t, x)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        x = mean + (t != 0).float().view(-1, 1, 1, 1) * sigma * noise(x)
    return x


def approx_cdf(x):
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def dit_vb(d, out, x0, xt, t):
    """DiT's ``_vb_terms_bpd`` on a frozen model output."""
    true_mean, true_log_var = d.q_posterior(x0, xt, t)
    mean, log_var, _ = d.p_mean_variance(out, xt, t)
    kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                + (true_mean - mean) ** 2 * torch.exp(-log_var))
    kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)
    inv = torch.exp(-0.5 * log_var)
    cdf_plus, cdf_min = approx_cdf(inv * (x0 - mean + 1 / 255)), approx_cdf(inv * (x0 - mean - 1 / 255))
    log_probs = torch.where(x0 < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                            torch.where(x0 > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    nll = -log_probs.mean(dim=(1, 2, 3)) / np.log(2.0)
    return torch.where(t == 0, nll, kl)


def model_of(mu=0.5, s2=0.3):
    """The optimal ε for N(mu, s2) data at the original timestep, and variance values that vary with x and t."""
    ab_all = GaussianDiffusion().alphas_cumprod

    def model(x, t, **_):
        ab = ab_all[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s2 + 1 - ab)
        return torch.cat([eps, torch.tanh(x - t.view(-1, 1, 1, 1) / 1000)], dim=1)
    return model


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def rows(gens):
    return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])


def test_respacing_is_dits_for_every_step_count():
    for n in range(1, 1001):
        assert space_timesteps(1000, n) == sorted(dit_space_timesteps(1000, [n])), n
    # The odd counts where diffusers' rounded linspace (this project's former respacing) differs, e.g. N = 21.
    assert 499 in space_timesteps(1000, 21) and 500 in np.linspace(0, 999, 21).round()


@pytest.mark.parametrize("n", [21, 35, 250])
def test_ddpm_equals_dits_p_sample_loop(n):
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sampler = DDPMSampler(GaussianDiffusion(), n)
    ours = sampler(x_T, model_of(), generators=generators([1, 2, 3]))
    theirs = dit_p_sample_loop(model_of(), x_T, n, rows(generators([1, 2, 3])))
    assert sampler.nfe == n
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("n,eta", [(10, 0.0), (25, 0.0), (11, 0.5)])
def test_ddim_equals_dits_ddim_sample_loop(n, eta):
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = DDIMSampler(GaussianDiffusion(), n, eta)(x_T, model_of(), generators=generators([4, 5, 6]))
    theirs = dit_ddim_sample_loop(model_of(), x_T, n, eta, rows(generators([4, 5, 6])))
    trailing = DDIMSampler(GaussianDiffusion(), 10, eta, spacing="trailing")
    assert (ours - theirs).abs().max().item() <= TOL
    if n == 10:  # the former default, trailing timesteps, is another sampler
        assert (trailing(x_T, model_of()) - theirs).abs().max().item() > 1e-3


def test_trailing_ddim_is_diffusers_trailing_ddim():
    """The kept option: diffusers' DDIMScheduler with "trailing" timesteps, eta 0."""
    from diffusers import DDIMScheduler

    d = GaussianDiffusion()
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sched = DDIMScheduler(num_train_timesteps=1000, trained_betas=d.betas.tolist(), clip_sample=False,
                          timestep_spacing="trailing")
    sched.set_timesteps(20)
    x = x_T
    for t in sched.timesteps:
        x = sched.step(model_of()(x, t.expand(3))[:, :2], t, x).prev_sample
    ours = DDIMSampler(d, 20, spacing="trailing")(x_T, model_of())
    assert (ours - x).abs().max().item() <= TOL


def test_vb_term_equals_dits_at_the_smallest_timesteps():
    d = GaussianDiffusion()
    theirs_d = DiTDiffusion(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    model = model_of()
    ours = d.training_losses(model, x0, noise=noise, t=t)["vb"]
    xt = theirs_d.q_sample(x0, t, noise)
    theirs = dit_vb(theirs_d, model(xt, t), x0, xt, t)
    assert ours.shape == (6,) and bool(torch.isfinite(ours).all())
    assert (ours - theirs).abs().max().item() <= TOL
    assert (d.q_sample(x0, t, noise) - xt).abs().max().item() <= 1e-7
