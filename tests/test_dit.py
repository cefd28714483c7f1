"""DiT family: registry, the official checkpoint layout, and the DDPM quantities checked in closed form."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from reals import ReaLSError
from reals.diffusion import DDIMSampler, DDPMSampler, GaussianDiffusion, linear_betas
from reals.dit import DiT, DiT_models, create_dit, dit_name
from reals.models import create_model, model_family
from reals.sit import SiT
from reals.transport import ClassifierFreeGuidance

def official_layout(depth: int, width: int, patch: int, channels: int = 4, side: int = 32,
                    classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a facebookresearch/DiT state dict (``DiT-XL-2-256x256.pt`` for 28, 1152, 2), written out
    from DiT's models.py (timm PatchEmbed, Attention and Mlp names; learned sigma: 2C output channels)."""
    layout = {
        "pos_embed": (1, (side // patch) ** 2, width),
        "x_embedder.proj.weight": (width, channels, patch, patch), "x_embedder.proj.bias": (width,),
        "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (classes + 1, width),
        "final_layer.linear.weight": (patch * patch * 2 * channels, width),
        "final_layer.linear.bias": (patch * patch * 2 * channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * width, width),
        "final_layer.adaLN_modulation.1.bias": (2 * width,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        layout.update({
            b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
            b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
            b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
            b + "adaLN_modulation.1.weight": (6 * width, width), b + "adaLN_modulation.1.bias": (6 * width,),
        })
    return layout


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

def test_registry_names_both_families():
    sizes = {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} | {"T/2"}
    assert {f"DiT-{a}" for a in sizes} <= set(DiT_models)
    assert model_family("DiT-B/4") == "DiT" and model_family("SiT-B/4") == "SiT"
    assert isinstance(create_model("DiT-T/2", input_size=4, num_classes=3), DiT)
    assert type(create_model("SiT-T/2", input_size=4, num_classes=3)) is SiT
    with pytest.raises(ReaLSError, match="unknown DiT model"):
        create_dit("SiT-T/2")
    with pytest.raises(ReaLSError, match="unknown model"):
        model_family("DiT-XXL/2")
    with pytest.raises(ReaLSError, match="DiT: input_size 6 is not divisible"):
        create_dit("DiT-T/4", input_size=6)


def test_official_xl2_layout_matches_key_for_key():
    with torch.device("meta"):
        model = create_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_layout(28, 1152, 2)
    assert dit_name({k: torch.empty(s, device="meta") for k, s in ours.items()}) == "DiT-XL/2"


def test_official_layout_state_dict_loads_and_returns_eps_and_variance():
    torch.manual_seed(0)
    state = {k: torch.randn(s) * 0.02 for k, s in official_layout(4, 128, 2, side=8, classes=10).items()}
    name = dit_name(state)
    assert name == "DiT-T/2"
    model = create_dit(name, input_size=8, in_channels=4, num_classes=10).eval()
    model.load_state_dict(state)  # strict: every key and shape
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([999, 0]), torch.tensor([3, 10])
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8)
    # The same weights as a learned-sigma SiT: DiT keeps the variance channels, SiT drops them.
    sit = SiT(**{**model.init_config, "learn_sigma": True}).eval()
    sit.load_state_dict(state)
    assert torch.equal(sit(x, t, y), out[:, :4])
    assert dit_name({**state, "final_layer.linear.weight": state["final_layer.linear.weight"][:16]}) is None


# ---------------------------------------------------------------------------------------------------
# Diffusion, in closed form on Gaussian data
# ---------------------------------------------------------------------------------------------------

def test_linear_schedule():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000 and d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert d.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - b for b in d.betas.tolist()), rel=1e-9)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_is_the_gaussian_conditional(t):
    """q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    d = GaussianDiffusion()
    ab_prev, ab, beta = (d.alphas_cumprod[t - 1].item(), d.alphas_cumprod[t].item(), d.betas[t].item())
    x0, xt = 0.7, -1.3
    cov = math.sqrt(1 - beta) * (1 - ab_prev)  # Cov(x_{t-1}, x_t | x_0)
    mean = math.sqrt(ab_prev) * x0 + cov / (1 - ab) * (xt - math.sqrt(ab) * x0)
    var = (1 - ab_prev) - cov ** 2 / (1 - ab)
    m, v, logv = d.q_posterior(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64),
                               torch.tensor([t]))
    assert m.item() == pytest.approx(mean, rel=1e-9)
    assert v.item() == pytest.approx(var, rel=1e-9)
    assert logv.item() == pytest.approx(math.log(var), rel=1e-9)


def test_learned_range_interpolates_log_variance_and_agrees_with_diffusers():
    d = GaussianDiffusion()
    t = torch.tensor([1, 300, 999])
    lo, hi = d.posterior_variance[t], d.betas[t]
    v = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    for i, expected in enumerate([lo, (lo * hi).sqrt(), hi]):  # v=0 is the geometric mean
        got = d.learned_log_variance(torch.full((3, 1), v[i].item(), dtype=torch.float64), t).exp().squeeze(1)
        assert torch.allclose(got, expected, rtol=1e-9)
    # t = 0: the lower end is the clipped posterior variance (that of t = 1).
    got = d.learned_log_variance(torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([0])).exp()
    assert got.item() == pytest.approx(d.posterior_variance[1].item(), rel=1e-9)
    sched = DDPMScheduler(trained_betas=d.betas.tolist(), variance_type="learned_range")
    for step, value in [(10, -0.4), (500, 0.3), (999, 0.9)]:
        ours = d.learned_log_variance(torch.tensor([[value]], dtype=torch.float64), torch.tensor([step]))
        theirs = sched._get_variance(step, torch.tensor([[value]]))
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)


@pytest.mark.parametrize("t", [5, 700])
def test_vb_term_is_the_hand_computed_kl_in_bits(t):
    d = GaussianDiffusion()
    ab_prev, ab, beta = (d.alphas_cumprod[t - 1].item(), d.alphas_cumprod[t].item(), d.betas[t].item())
    x0, xt, eps, v = 0.4, 0.9, -0.35, 0.25
    post_var = beta * (1 - ab_prev) / (1 - ab)
    c1, c2 = beta * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
    true_mean = c1 * x0 + c2 * xt
    x0_hat = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    model_mean = c1 * x0_hat + c2 * xt
    model_var = math.exp((v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(post_var))
    kl_nats = 0.5 * math.log(model_var / post_var) + (post_var + (true_mean - model_mean) ** 2) / (2 * model_var) - 0.5
    out = torch.tensor([[[[eps]], [[v]]]], dtype=torch.float64)  # [B=1, 2C=2, 1, 1]
    got = d.vb_terms(out, torch.full((1, 1, 1, 1), x0, dtype=torch.float64),
                     torch.full((1, 1, 1, 1), xt, dtype=torch.float64), torch.tensor([t]))
    assert got.item() == pytest.approx(kl_nats / math.log(2), rel=1e-8)


def test_hybrid_loss_trains_the_variance_only_through_vb():
    d = GaussianDiffusion()
    torch.manual_seed(0)
    x0 = torch.randn(4, 2, 2, 2)
    eps_head = torch.zeros(1, requires_grad=True)
    var_head = torch.zeros(1, requires_grad=True)

    def model(xt, t, y=None):
        return torch.cat([xt * eps_head, torch.ones_like(xt) * var_head], dim=1)

    terms = d.training_losses(model, x0, t=torch.tensor([0, 3, 500, 999]))
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert eps_head.grad.item() == 0 and var_head.grad.item() != 0  # stop-gradient mean


def test_optimal_eps_on_gaussian_data_gives_the_true_reverse_mean():
    """For x_0 ~ N(mu, s^2) the ideal ε-predictor E[ε | x_t] is linear; the model mean it implies is the exact
    E[x_{t-1} | x_t] (the mean of the true reverse step)."""
    d = GaussianDiffusion()
    mu, s2, t, xt = 0.5, 0.3, 200, torch.tensor([[-0.8]], dtype=torch.float64)
    ab, ab_prev = d.alphas_cumprod[t].item(), d.alphas_cumprod[t - 1].item()
    var_t = ab * s2 + 1 - ab
    eps_star = math.sqrt(1 - ab) * (xt - math.sqrt(ab) * mu) / var_t
    mean, _ = d.p_mean_log_variance(torch.cat([eps_star, torch.zeros_like(xt)], 1), xt, torch.tensor([t]))
    # E[x_{t-1} | x_t] from the joint Gaussian of (x_{t-1}, x_t) under the data distribution.
    cov = math.sqrt(ab / ab_prev) * (ab_prev * s2 + 1 - ab_prev)
    expected = math.sqrt(ab_prev) * mu + cov / var_t * (xt.item() - math.sqrt(ab) * mu)
    assert mean.item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------

def _gaussian_eps_model(mu: float, s2: float, d: GaussianDiffusion):
    """The exact ε-predictor for x_0 ~ N(mu, s2) per dimension, with variance values v = 0."""
    ab_all = d.alphas_cumprod

    def model(x, t, y=None):
        ab = ab_all[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)
    return model


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
def test_samplers_reach_the_gaussian_data_distribution(sampler_cls):
    d = GaussianDiffusion()
    mu, s2 = 1.5, 0.25
    sampler = sampler_cls(d, num_steps=50)
    x = sampler(torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0)), _gaussian_eps_model(mu, s2, d))
    assert sampler.nfe == 50
    assert x.mean().item() == pytest.approx(mu, abs=0.05)
    assert x.var().item() == pytest.approx(s2, rel=0.15)


def test_ddim_eta0_is_deterministic_and_ddpm_follows_per_sample_generators():
    d = GaussianDiffusion()
    model = _gaussian_eps_model(0.0, 1.0, d)
    x_T = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    ddim = DDIMSampler(d, num_steps=20, eta=0.0)
    assert torch.equal(ddim(x_T, model), ddim(x_T, model))
    ddpm = DDPMSampler(d, num_steps=20)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    a = ddpm(x_T, model, generators=gens([5, 6, 7]))
    b = ddpm(x_T[1:], model, generators=gens([6, 7]))  # row i depends on its own seed alone
    assert torch.allclose(a[1:], b, atol=1e-6)
    assert not torch.allclose(a, ddpm(x_T, model, generators=gens([8, 9, 10])))
    assert torch.equal(DDPMSampler(d, 250).timesteps[[0, -1]], torch.tensor([0, 999]))
    DDIMSampler(d, num_steps=300)  # DiT's spacing takes any N
    with pytest.raises(ReaLSError, match="divide"):
        DDIMSampler(d, num_steps=300, spacing="trailing")


def test_guidance_interval_on_the_timestep_noise_level():
    d = GaussianDiffusion()
    calls = []

    class M(torch.nn.Module):
        num_classes = 3

        def forward(self, x, t, y):
            calls.append(len(x))
            return torch.cat([x, x], 1) * (y.view(-1, 1, 1, 1) + 1)

    cfg = ClassifierFreeGuidance(M(), 2.0, cfg_channels=1, guidance_interval=(0.0, 0.5), noise_level=d.noise_level)
    x = torch.ones(2, 1, 1, 1)
    out = cfg(x, torch.tensor([800, 800]), torch.tensor([0, 1]))  # tau = 0.8: outside, conditional only
    assert calls[-1] == 2 and torch.equal(out[:, 0].flatten(), torch.tensor([1.0, 2.0]))
    out = cfg(x, torch.tensor([100, 100]), torch.tensor([0, 1]))  # tau = 0.1: guided ε, conditional variance
    assert calls[-1] == 4
    assert torch.equal(out[:, 0].flatten(), torch.tensor([4 + 2 * (1 - 4), 4 + 2 * (2 - 4)], dtype=torch.float32))
    assert torch.equal(out[:, 1].flatten(), torch.tensor([1.0, 2.0]))
    assert linear_betas(10).shape == (10,)
