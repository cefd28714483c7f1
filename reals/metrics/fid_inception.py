"""The FID-Inception network: pytorch-fid's port of the TF Inception v3 (2015-12-05) graph that FID, sFID and IS use.

Built from torchvision's Inception3 pieces with ``weights=None``; the FID weights are read from a local file
(pytorch-fid's ``pt_inception-2015-12-05-*.pth``), never downloaded. One forward pass gives the three ADM
activations: ``pool`` (pool_3, 2048), ``spatial`` (mixed_6/conv, first 7 channels, 17*17*7 = 2023, flattened
in TF's HWC order so precomputed ``mu_s``/``sigma_s`` of published reference batches stay comparable) and
``logits`` (1008, the softmax head's MatMul without its bias, as the ADM evaluator computes IS).

The weights file must be pytorch-fid's published one: its sha256 must start with the prefix in its official
name (``6726825d``, torch hub's convention), else it is refused and no number is called FID.

Inputs are resized to 299 x 299 and normalised in one of two ways (``resize``):
- ``pytorch-fid`` (default): ``F.interpolate(bilinear, align_corners=False)`` then ``2 x - 1``, as pytorch-fid;
- ``tf``: the TF graph the ADM evaluator runs (TF 1.x ``ResizeBilinear`` without half-pixel centres on [0, 255],
  then ``(x - 128) / 128``), as torch-fidelity reproduces it; use it to compare with ADM's published numbers.
"""
from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from reals import ReaLSError

WEIGHTS_GLOB = "pt_inception-2015-12-05-*.pth"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "REALS_INCEPTION_WEIGHTS"
WEIGHTS_SHA256_PREFIX = "6726825d"  # published in the file name; torch hub checks downloads against it
RESIZES = ("pytorch-fid", "tf")
SPATIAL_CHANNELS = 7
INPUT_SIZE = 299


#################################################################################
#                  TF-compatible Inception blocks (pytorch-fid)                 #
#################################################################################

class FIDInceptionA(InceptionA):
    """InceptionA whose average pool ignores the zero padding, as TF's does."""

    def _forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [b1, b5, b3, bp]


class FIDInceptionC(InceptionC):
    """InceptionC whose average pool ignores the zero padding; ``branches`` exposes mixed_6/conv."""

    def branches(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return [b1, b7, bd, bp]

    _forward = branches


class FIDInceptionE(InceptionE):
    """InceptionE with TF's pooling: padding-free average (mixed_9) or max pooling (mixed_10)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [b1, b3, bd, self.branch_pool(pooled)]


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x ``ResizeBilinear`` (align_corners=False, no half-pixel centres) of ``x`` [B, C, H, W] to size x size:
    output pixel i reads input position ``i * in / out`` (float32), interpolating towards the next pixel."""
    def taps(n_in: int):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.dtype)

    h0, h1, fh = taps(x.shape[2])
    w0, w1, fw = taps(x.shape[3])
    rows = x[:, :, h0] + (x[:, :, h1] - x[:, :, h0]) * fh.view(1, 1, -1, 1)
    return rows[..., w0] + (rows[..., w1] - rows[..., w0]) * fw


#################################################################################
#                                 The network                                   #
#################################################################################

class FIDInceptionV3(Inception3):
    """Inception v3 with the FID graph's blocks and 1008-class head; random weights until loaded."""

    def __init__(self, resize: str = "pytorch-fid"):
        if resize not in RESIZES:
            raise ReaLSError(f"unknown Inception resize {resize!r}; choose one of: {', '.join(RESIZES)}")
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.resize = resize
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.weights_path: str | None = None
        self.weights_sha256: str | None = None
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images ``[B, 3, H, W]`` in [0, 1] -> ``{"pool": [B, 2048], "spatial": [B, 2023], "logits": [B, 1008]}``."""
        if self.resize == "tf":
            x = (tf1_resize_bilinear(images * 255.0, INPUT_SIZE) - 128.0) / 128.0
        else:
            x = 2.0 * F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False) - 1.0
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(self, name)(x)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = torch.cat(branches, 1)
        for name in ("Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        pool = x.flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": F.linear(pool, self.fc.weight)}


#################################################################################
#                                    Weights                                    #
#################################################################################

def checkpoints_dir() -> Path:
    """torch hub's checkpoint folder (``~/.cache/torch/hub/checkpoints`` unless ``TORCH_HOME`` moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights() -> Path:
    """The local FID-Inception weights file: ``$REALS_INCEPTION_WEIGHTS``, else torch hub's checkpoint folder."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        hits = sorted(glob.glob(str(p / WEIGHTS_GLOB))) if p.is_dir() else ([str(p)] if p.is_file() else [])
        if not hits:
            raise ReaLSError(f"FID Inception weights not found at ${WEIGHTS_ENV}={env}: put {WEIGHTS_FILE} "
                             f"(pytorch-fid's {WEIGHTS_URL}) there")
        return Path(hits[0])
    hits = sorted(glob.glob(str(checkpoints_dir() / WEIGHTS_GLOB)))
    if not hits:
        raise ReaLSError(f"FID Inception weights not found: put {WEIGHTS_FILE} (pytorch-fid's {WEIGHTS_URL}) "
                         f"into {checkpoints_dir()}/ or set ${WEIGHTS_ENV} to its path")
    return Path(hits[-1])


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_fid_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        resize: str = "pytorch-fid") -> FIDInceptionV3:
    """The FID-Inception network with its weights loaded from ``weights`` (found with ``find_weights`` if None),
    after checking the file against the published hash."""
    path = Path(weights) if weights else find_weights()
    if not path.is_file():
        raise ReaLSError(f"FID Inception weights not found: {path} (expected {WEIGHTS_FILE})")
    digest = file_sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise ReaLSError(f"{path} is not pytorch-fid's published {WEIGHTS_FILE}: its sha256 {digest[:16]}... does "
                         f"not start with {WEIGHTS_SHA256_PREFIX}; numbers from it would not be FID")
    model = FIDInceptionV3(resize)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # a truncated file or a different network's state dict
        raise ReaLSError(f"{path} is not pytorch-fid's FID Inception state dict ({WEIGHTS_FILE}): "
                         f"{str(e).splitlines()[0]}") from e
    model.weights_path, model.weights_sha256 = str(path), digest
    return model.to(device)
