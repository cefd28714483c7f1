"""Transport: the path, what the model predicts, the training loss and the time range used for sampling.

Time convention (SiT's): t=0 is noise, t=1 is data; the linear path is x_t = t * x1 + (1 - t) * x0.
Training draws t uniformly in [train_eps, 1 - train_eps]; velocity prediction on the Linear and GVP paths is
well posed everywhere, so its eps defaults to 0 (score and noise prediction default to 1e-3, as in SiT).
"""
from __future__ import annotations

import enum

import torch

from reals import ReaLSError
from reals.transport.path import GVPPath, LinearPath, Path, expand_t_like_x


class PathType(enum.Enum):
    """Which interpolant joins noise and data."""

    LINEAR = "Linear"
    GVP = "GVP"


class Prediction(enum.Enum):
    """What the model outputs."""

    VELOCITY = "velocity"
    SCORE = "score"
    NOISE = "noise"


class LossWeight(enum.Enum):
    """Weighting of the score / noise loss over time (velocity prediction is always unweighted)."""

    NONE = "none"
    VELOCITY = "velocity"
    LIKELIHOOD = "likelihood"


PATHS: dict[PathType, type[Path]] = {PathType.LINEAR: LinearPath, PathType.GVP: GVPPath}


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=list(range(1, x.ndim)))


def _parse(enum_cls: type[enum.Enum], value, what: str):
    """An enum member from itself or its value (case-insensitive)."""
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if str(value).lower() == member.value.lower():
            return member
    choices = ", ".join(m.value for m in enum_cls)
    raise ReaLSError(f"unknown {what} {value!r}; choose one of: {choices}")


class Transport:
    """Flow-matching transport between N(0, I) noise (t=0) and data (t=1)."""

    def __init__(self, path_type: PathType, prediction: Prediction, loss_weight: LossWeight,
                 train_eps: float, sample_eps: float):
        self.path_type = path_type
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.train_eps = train_eps
        self.sample_eps = sample_eps
        self.path = PATHS[path_type]()

    def __repr__(self) -> str:
        return (f"Transport(path={self.path_type.value}, prediction={self.prediction.value}, "
                f"loss_weight={self.loss_weight.value}, train_eps={self.train_eps}, sample_eps={self.sample_eps})")

    # ------------------------------------------------------------------ training

    def sample_t(self, n: int, device=None, dtype=torch.float32, generator=None) -> torch.Tensor:
        """Training times [n], uniform in [train_eps, 1 - train_eps]."""
        t0, t1 = self.train_eps, 1 - self.train_eps
        return torch.rand(n, device=device, dtype=dtype, generator=generator) * (t1 - t0) + t0

    def training_losses(self, model, x1: torch.Tensor, model_kwargs: dict | None = None,
                        x0: torch.Tensor | None = None, t: torch.Tensor | None = None) -> dict:
        """Per-sample loss [B] of ``model(x_t, t, **model_kwargs)`` on data ``x1``; also returns t and pred.

        ``x0`` (noise) and ``t`` are drawn here unless given.
        """
        model_kwargs = model_kwargs or {}
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = self.sample_t(x1.shape[0], device=x1.device, dtype=x1.dtype) if t is None else t
        t, xt, ut = self.path.plan(t, x0, x1)
        pred = model(xt, t, **model_kwargs)
        if self.prediction is Prediction.VELOCITY:
            loss = mean_flat((pred - ut) ** 2)
        else:
            sigma = self.path.sigma(expand_t_like_x(t, x1))[0]
            if self.loss_weight is LossWeight.VELOCITY:
                weight = (self.path.drift_variance(xt, t) / sigma) ** 2
            elif self.loss_weight is LossWeight.LIKELIHOOD:
                weight = self.path.drift_variance(xt, t) / sigma ** 2
            else:
                weight = 1.0
            # Noise: pred ~ x0. Score: pred ~ -x0 / sigma, compared in noise units.
            err = pred - x0 if self.prediction is Prediction.NOISE else pred * sigma + x0
            loss = mean_flat(weight * err ** 2)
        return {"loss": loss, "t": t, "pred": pred}

    # ------------------------------------------------------------------ sampling

    def velocity(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity implied by a model output ``pred`` at (x, t)."""
        if self.prediction is Prediction.VELOCITY:
            return pred
        if self.prediction is Prediction.SCORE:
            return self.path.velocity_from_score(pred, x, t)
        return self.path.velocity_from_noise(pred, x, t)

    def score(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score implied by a model output ``pred`` at (x, t)."""
        if self.prediction is Prediction.VELOCITY:
            return self.path.score_from_velocity(pred, x, t)
        if self.prediction is Prediction.SCORE:
            return pred
        return self.path.score_from_noise(pred, x, t)

    def sample_interval(self, sde: bool = False, last_step_size: float = 0.0) -> tuple[float, float]:
        """(t0, t1) for integration: where the needed conversions are finite; SDEs stop ``last_step_size`` early
        (SiT's ``check_interval``; a last step of size 0 integrates to ``1 - sample_eps``)."""
        t0 = self.sample_eps
        t1 = 1 - last_step_size if sde and last_step_size > 0 else 1 - self.sample_eps
        return t0, t1


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None,
                     train_eps: float | None = None, sample_eps: float | None = None) -> Transport:
    """Build a transport from names (as on SiT's command line) or enums; eps default per prediction."""
    path_type = _parse(PathType, path_type, "path type")
    prediction = _parse(Prediction, prediction, "prediction")
    loss_weight = _parse(LossWeight, loss_weight or "none", "loss weight")
    if prediction is Prediction.VELOCITY and loss_weight is not LossWeight.NONE:
        raise ReaLSError(f"loss weight {loss_weight.value!r} applies to score or noise prediction, not velocity")
    default_eps = 0.0 if prediction is Prediction.VELOCITY else 1e-3
    train_eps = default_eps if train_eps is None else train_eps
    sample_eps = default_eps if sample_eps is None else sample_eps
    for name, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
        if not 0 <= eps < 0.5:
            raise ReaLSError(f"{name} must lie in [0, 0.5), got {eps}")
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps)
