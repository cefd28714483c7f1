"""Transport: path endpoints and velocities, prediction conversions, training losses, factory checks."""
from __future__ import annotations

import pytest
import torch

from reals import ReaLSError
from reals.transport import GVPPath, LinearPath, LossWeight, PathType, Prediction, create_transport

PATHS = [LinearPath(), GVPPath()]


@pytest.mark.parametrize("path", PATHS, ids=type)
def test_path_endpoints_and_velocity_match_finite_differences(path):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(path.plan(torch.zeros(5, dtype=torch.float64), x0, x1)[1], x0)  # t=0: noise
    assert torch.allclose(path.plan(torch.ones(5, dtype=torch.float64), x0, x1)[1], x1)  # t=1: data
    t, h = torch.linspace(0.05, 0.95, 5, dtype=torch.float64), 1e-6
    _, xt, ut = path.plan(t, x0, x1)
    fd = (path.plan(t + h, x0, x1)[1] - path.plan(t - h, x0, x1)[1]) / (2 * h)
    assert torch.allclose(ut, fd, atol=1e-7)
    for coef in (path.alpha, path.sigma):
        deriv = coef(t)[1]
        assert torch.allclose(deriv, (coef(t + h)[0] - coef(t - h)[0]) / (2 * h), atol=1e-7)


@pytest.mark.parametrize("path", PATHS, ids=type)
def test_conversions_match_gaussian_closed_form(path):
    # Data N(m, s^2): x_t ~ N(alpha m, alpha^2 s^2 + sigma^2); E[u|x] and the score are affine in x.
    m, s = 0.7, 1.3
    t = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (a, da), (sg, dsg) = path.alpha(t[:, None]), path.sigma(t[:, None])
    var = a ** 2 * s ** 2 + sg ** 2
    velocity = da * m + (da * a * s ** 2 + dsg * sg) / var * (x - a * m)
    score = -(x - a * m) / var
    assert torch.allclose(path.score_from_velocity(velocity, x, t), score)
    assert torch.allclose(path.velocity_from_score(score, x, t), velocity)
    assert torch.allclose(path.velocity_from_noise(-sg * score, x, t), velocity)
    assert torch.allclose(path.noise_from_velocity(velocity, x, t), -sg * score)


@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_training_loss_targets(prediction, path_type):
    weights = [None] if prediction == "velocity" else [None, "velocity", "likelihood"]
    g = torch.Generator().manual_seed(2)
    x1, x0 = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 2, 3, 3, generator=g)
    for weight in weights:
        transport = create_transport(path_type, prediction, weight)
        t = transport.sample_t(6, generator=g)
        _, xt, ut = transport.path.plan(t, x0, x1)
        sigma = transport.path.sigma(t)[0].reshape(-1, 1, 1, 1)
        oracle = {"velocity": ut, "noise": x0, "score": -x0 / sigma}[prediction]
        exact = transport.training_losses(lambda x, tt: oracle, x1, x0=x0, t=t)["loss"]
        assert exact.shape == (6,) and torch.allclose(exact, torch.zeros(6), atol=1e-10)
        off = transport.training_losses(lambda x, tt: oracle + 0.1, x1, x0=x0, t=t)["loss"]
        assert (off > 0).all()
    transport = create_transport(path_type, prediction)
    zero = transport.training_losses(lambda x, tt: torch.zeros_like(x), x1, x0=x0, t=t)
    if prediction == "velocity":  # unweighted squared error against u_t, averaged per sample
        assert torch.allclose(zero["loss"], (ut ** 2).mean(dim=(1, 2, 3)))


def test_training_loss_passes_model_kwargs_and_draws_t_in_range():
    transport = create_transport("Linear", "noise")
    seen = {}

    def model(x, t, y):
        seen["t"], seen["y"] = t, y
        return torch.zeros_like(x)

    transport.training_losses(model, torch.randn(400, 2), {"y": torch.arange(400)})
    assert torch.equal(seen["y"], torch.arange(400))
    assert seen["t"].min() >= transport.train_eps and seen["t"].max() <= 1 - transport.train_eps
    assert seen["t"].std() > 0.2  # uniform on ~[0, 1]


def test_create_transport_parses_names_and_rejects_bad_settings():
    t = create_transport("linear", "Velocity")
    assert (t.path_type, t.prediction, t.loss_weight) == (PathType.LINEAR, Prediction.VELOCITY, LossWeight.NONE)
    assert t.train_eps == 0 and t.sample_eps == 0
    assert create_transport("GVP", "score").sample_eps > 0
    assert create_transport(PathType.GVP, Prediction.NOISE, LossWeight.LIKELIHOOD).loss_weight is LossWeight.LIKELIHOOD
    with pytest.raises(ReaLSError, match="unknown path type"):
        create_transport("VPSDE")
    with pytest.raises(ReaLSError, match="not velocity"):
        create_transport("Linear", "velocity", "likelihood")
    with pytest.raises(ReaLSError, match="sample_eps"):
        create_transport(sample_eps=0.7)
