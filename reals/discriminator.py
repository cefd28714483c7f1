"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, as used by taming-transformers and LDM)."""
from __future__ import annotations

from torch import nn

from reals.pretrained import PretrainedMixin, register_to_config


def weights_init(m: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module, PretrainedMixin):
    """Conv stack with ``n_layers`` stride-2 stages; outputs a logit map, one logit per image patch."""

    config_name = "discriminator.json"
    weights_name = "discriminator.safetensors"

    @register_to_config
    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(channels * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, images):
        """Images [B, 3, H, W] in [-1, 1] -> patch logits [B, 1, h, w]."""
        return self.main(images)
