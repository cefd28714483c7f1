"""Flow-matching transport (SiT-style): paths, training loss, ODE/SDE samplers and classifier-free guidance.

Time convention throughout (SiT's): t=0 is Gaussian noise x0, t=1 is data x1; the linear path is
x_t = t * x1 + (1 - t) * x0 with velocity u_t = x1 - x0. The guidance interval alone is given on the
noise-level axis tau = 1 - t (ReaLS/REPA convention), see ``reals.transport.guidance``.
"""
from reals.transport.guidance import ClassifierFreeGuidance
from reals.transport.path import GVPPath, LinearPath, Path
from reals.transport.sampling import ODESampler, SDESampler, randn_per_sample
from reals.transport.transport import LossWeight, PathType, Prediction, Transport, create_transport

__all__ = [
    "ClassifierFreeGuidance", "GVPPath", "LinearPath", "LossWeight", "ODESampler", "Path", "PathType",
    "Prediction", "SDESampler", "Transport", "create_transport", "randn_per_sample",
]
