"""Gaussian diffusion (DDPM) with ε-prediction and learned-range variance: the schedule and DiT's hybrid loss.

Forward process q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) over timesteps t = 0..T-1 (t = 0 is one step of
noise; ab_t is the cumulative product of 1 - beta). The model returns ``2C`` channels: ε and values v in [-1, 1]
that interpolate the log-variance of p(x_{t-1} | x_t) between the posterior's (v = -1) and beta_t (v = +1), as in
improved DDPM. The loss is DiT's: ``mse(ε) + vb``, where ``vb`` is the VLB term (in bits per dimension) of the
learned variance on a stop-gradient mean, so the VLB shapes only the variance.

Every coefficient (square roots included) is computed once in float64 and cast to the input's dtype at use, as DiT
does; casting first and taking roots in float32 would move the VLB term at t <= 2 by up to 2e-4.
"""
from __future__ import annotations

import math

import torch

from reals import ReaLSError

NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF by the tanh approximation (as improved DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor):
    """log-probability (nats, elementwise) of ``x`` in [-1, 1] under a Gaussian discretised into 255 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def linear_betas(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = BETA_START,
                 beta_end: float = BETA_END) -> torch.Tensor:
    """Ho et al.'s linear beta schedule [T] in float64 (DiT: 1e-4 .. 0.02 over 1000 steps)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


class GaussianDiffusion:
    """The DDPM quantities of one beta schedule (float64) and DiT's training loss."""

    def __init__(self, betas: torch.Tensor | None = None):
        betas = linear_betas() if betas is None else betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ReaLSError("diffusion betas must be a 1-D schedule in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = ab.sqrt(), (1 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod = (1 / ab).sqrt(), (1 / ab - 1).sqrt()
        self.log_betas = betas.log()
        self.posterior_variance = betas * (1 - ab_prev) / (1 - ab)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value (improved DDPM).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * ab_prev.sqrt() / (1 - ab)
        self.posterior_mean_coef2 = (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped [B, 1, ...] to broadcast against ``x``, in ``x``'s dtype and device."""
        out = values.to(t.device)[t.long()].to(x.dtype)
        return out.reshape(-1, *([1] * (x.ndim - 1)))

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """tau = t / T: the axis of the guidance interval (tau near 1 pure noise, near 0 data)."""
        return t.to(torch.float64) / self.num_timesteps

    # ------------------------------------------------------------------ the forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x_0) with the given standard normal ``noise``."""
        return (self._at(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    # ------------------------------------------------------------------ the model's p(x_{t-1} | x_t)

    def learned_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Σ from the model's values ``v`` in [-1, 1]: frac * log beta_t + (1 - frac) * log posterior variance,
        with frac = (v + 1) / 2."""
        frac = (v + 1) / 2
        max_log = self._at(self.log_betas, t, v)
        min_log = self._at(self.posterior_log_variance_clipped, t, v)
        return frac * max_log + (1 - frac) * min_log

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 implied by the noise prediction ``eps`` at x_t."""
        return (self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps)

    def predict_eps(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise implied by the data estimate ``x0`` at x_t."""
        recip = self._at(self.sqrt_recip_alphas_cumprod, t, xt)
        return (recip * xt - x0) / self._at(self.sqrt_recipm1_alphas_cumprod, t, xt)

    def p_mean_log_variance(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and log-variance of p(x_{t-1} | x_t) from the model's ``output`` [B, 2C, ...] (ε, v)."""
        eps, v = output.chunk(2, dim=1)
        mean, _, _ = self.q_posterior(self.predict_x0(xt, t, eps), xt, t)
        return mean, self.learned_log_variance(v, t)

    def vb_terms(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The VLB term [B] in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the
        discretised decoder NLL of x_0 at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var = self.p_mean_log_variance(output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ training

    def training_losses(self, model, x0: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> dict:
        """DiT's hybrid loss [B] of ``model(x_t, t, **model_kwargs)`` on data ``x0``: ``mse`` of ε plus ``vb`` on
        a stop-gradient mean. ``noise`` and timesteps ``t`` (uniform over 0..T-1) are drawn here unless given."""
        model_kwargs = model_kwargs or {}
        noise = torch.randn_like(x0) if noise is None else noise
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device) if t is None else t
        xt = self.q_sample(x0, t, noise)
        output = model(xt, t, **model_kwargs)
        if output.shape[1] != 2 * x0.shape[1]:
            raise ReaLSError(f"a learned-variance diffusion model returns {2 * x0.shape[1]} channels "
                             f"(ε and variance), got {output.shape[1]}")
        eps, v = output.chunk(2, dim=1)
        vb = self.vb_terms(torch.cat([eps.detach(), v], dim=1).float(), x0.float(), xt.float(), t)
        mse = mean_flat((noise - eps.float()) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "t": t, "pred": output}
