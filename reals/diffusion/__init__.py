"""DDPM with ε-prediction and learned Σ (DiT): the linear schedule, the hybrid loss, DDPM/DDIM samplers.

Time convention: the DDPM timestep t in 0..T-1 (T = 1000; t = 0 is one step of noise, t = T-1 nearly pure noise).
The guidance interval is given on the noise level tau = t / T (``GaussianDiffusion.noise_level``), the same axis
as SiT's tau = 1 - t: tau near 1 is pure noise, tau near 0 data.
"""
from reals.diffusion.gaussian import GaussianDiffusion, linear_betas, normal_kl
from reals.diffusion.sampling import DDIMSampler, DDPMSampler

__all__ = ["DDIMSampler", "DDPMSampler", "GaussianDiffusion", "linear_betas", "normal_kl"]
