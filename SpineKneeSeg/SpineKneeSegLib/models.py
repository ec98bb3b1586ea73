"""Networks, built by name from a plain config so a checkpoint can rebuild its own network.

The seeds define their own small 2D U-Nets (seed 000: constant 32 channels, ELU, one dropout;
seed 003: 32-64-128-128, dropout 0.2; ...), which no library offers exactly, so the generic
configurable U-Net lives here; task issues add their specific networks (MultiNet, attention U-Net)
to ``NETWORKS``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "elu": lambda: nn.ELU(inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, activation: str, norm: str):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), ACTIVATIONS[activation](),
            nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), ACTIVATIONS[activation](),
        )


class UNet2D(nn.Module):
    """Plain 2D U-Net: ``channels`` per level, max-pool down, transposed-conv up, skip concat.

    ``dropout`` is applied once at the bottom (end of the contracting path), as in seeds 000/003.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels=(32, 64, 128, 128),
                 activation: str = "elu", norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        channels = list(channels)
        self.down = nn.ModuleList()
        cin = in_channels
        for c in channels:
            self.down.append(ConvBlock(cin, c, activation, norm))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for c_skip in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, c_skip, 2, stride=2))
            self.up_blocks.append(ConvBlock(2 * c_skip, c_skip, activation, norm))
            cin = c_skip
        self.head = nn.Conv2d(cin, out_channels, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # He init
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        """Input height/width must be a multiple of this."""
        return 2 ** (len(self.down) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        x = self.dropout(x)
        for up, block in zip(self.up, self.up_blocks):
            x = up(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


NETWORKS: dict[str, Callable[..., nn.Module]] = {"unet2d": UNet2D}


def build_network(factory: str, config: dict) -> nn.Module:
    if factory not in NETWORKS:
        raise ValueError(f"unknown network factory {factory!r} (known: {', '.join(sorted(NETWORKS))})")
    return NETWORKS[factory](**config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
