"""Autoencoder losses (LDM's recipe): reconstruction, LPIPS, KL, hinge GAN with an adaptive weight.

Scale: reconstruction and perceptual terms are per-pixel means; the KL is LDM's per-image sum divided by
the number of image values (3 * H * W), so LDM's weight 1e-6 keeps its meaning next to a mean loss.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from reals import ReaLSError

PerceptualKind = Literal["lpips", "random", "none"]
LPIPSNet = Literal["vgg", "alex", "squeeze"]


#################################################################################
#                               Perceptual (LPIPS)                              #
#################################################################################

def lpips_backbone_file(net: str) -> Path:
    """Where torchvision looks for the ImageNet backbone of LPIPS ``net`` (the torch hub cache)."""
    import torchvision.models as tvm

    weights = {"vgg": tvm.VGG16_Weights, "alex": tvm.AlexNet_Weights, "squeeze": tvm.SqueezeNet1_1_Weights}
    if net not in weights:
        raise ReaLSError(f"unknown LPIPS backbone {net!r}; choose vgg, alex or squeeze")
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights[net].IMAGENET1K_V1.url).name


class PerceptualLoss(nn.Module):
    """LPIPS distance per image: ``lpips`` (ImageNet backbone), ``random`` (random backbone) or ``none``.

    The backbone is never downloaded: ``lpips`` needs its file in the torch hub cache, else a ReaLSError.
    """

    def __init__(self, kind: PerceptualKind = "lpips", net: LPIPSNet = "vgg"):
        super().__init__()
        if kind not in ("lpips", "random", "none"):
            raise ReaLSError(f"unknown perceptual loss {kind!r}; choose lpips, random or none")
        self.kind, self.net_name, self.net = kind, net, None
        if kind == "none":
            return
        backbone = lpips_backbone_file(net)
        if kind == "lpips" and not backbone.is_file():
            raise ReaLSError(
                f"LPIPS needs the ImageNet {net} backbone at {backbone} (torchvision would download it; this "
                f"machine is offline): copy that file there (torch hub cache, $TORCH_HOME), or choose "
                f"perceptual: none, or perceptual: random (random backbone, not the LPIPS metric)")
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = lpips.LPIPS(net=net, pretrained=True, pnet_rand=(kind == "random"), verbose=False)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.source = str(backbone) if kind == "lpips" else "random weights"

    @property
    def enabled(self) -> bool:
        return self.net is not None

    def describe(self) -> str:
        """One line for reports: which perceptual loss this is, and whether it is the LPIPS metric."""
        if self.kind == "none":
            return "none (no perceptual loss)"
        if self.kind == "random":
            return f"random-backbone LPIPS-style loss ({self.net_name}, pnet_rand; not the LPIPS metric)"
        return f"LPIPS v0.1 ({self.net_name} ImageNet backbone from {self.source})"

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stays in eval mode: the LPIPS network is frozen."""
        return super().train(False)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Images and reconstructions in [-1, 1] -> distance per image [B] (zeros for ``none``)."""
        if self.net is None:
            return images.new_zeros(images.shape[0])
        return self.net(images.float(), reconstructions.float()).flatten()


#################################################################################
#                             Reconstruction and KL                             #
#################################################################################

def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-image mean absolute (``l1``) or squared (``mse``) error [B]."""
    diff = images.float() - reconstructions.float()
    if kind == "l1":
        err = diff.abs()
    elif kind == "mse":
        err = diff.square()
    else:
        raise ReaLSError(f"unknown reconstruction loss {kind!r}; choose l1 or mse")
    return err.flatten(1).mean(1)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, num_values: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent values per image, divided by ``num_values``: [B]."""
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    return kl / num_values


#################################################################################
#                                   Adversarial                                 #
#################################################################################

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean(D(x_rec))."""
    return -logits_fake.float().mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """LDM's balance: ||d nll / d last|| / (||d g / d last|| + 1e-4), clamped to [0, max], no gradient."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


#################################################################################
#                              Generator objective                              #
#################################################################################

class AutoencoderLoss(nn.Module):
    """rec + perceptual_weight * LPIPS + kl_weight * KL (+ adaptive-weighted hinge GAN after ``disc_start``)."""

    def __init__(self, perceptual: PerceptualLoss, rec_loss: str = "l1", perceptual_weight: float = 1.0,
                 kl_weight: float = 1e-6, disc_weight: float = 0.5, disc_start: int = 50001):
        super().__init__()
        if rec_loss not in ("l1", "mse"):
            raise ReaLSError(f"unknown reconstruction loss {rec_loss!r}; choose l1 or mse")
        self.perceptual = perceptual
        self.rec_loss, self.perceptual_weight, self.kl_weight = rec_loss, perceptual_weight, kl_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms (both sides) run at this step."""
        return self.disc_weight > 0 and step >= self.disc_start

    def forward(self, images: torch.Tensor, out: dict, logits_fake: torch.Tensor | None = None,
                last_layer: torch.Tensor | None = None) -> dict:
        """Generator terms (scalars) from a ``ReaLSVAE.forward`` output; the GAN term when logits are given."""
        rec = reconstruction_loss(images, out["rec"], self.rec_loss).mean()
        perceptual = self.perceptual(images, out["rec"]).mean()
        kl = kl_loss(out["mean"], out["logvar"], images[0].numel()).mean()
        nll = rec + self.perceptual_weight * perceptual
        terms = {"rec": rec, "perceptual": perceptual, "kl": kl}
        loss = nll + self.kl_weight * kl
        if logits_fake is not None:
            g = generator_loss(logits_fake)
            d_weight = adaptive_weight(nll, g, last_layer) * self.disc_weight
            loss = loss + d_weight * g
            terms.update(g=g, d_weight=d_weight)
        terms["loss"] = loss
        return terms
