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


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018, seed 002): the decoder signal ``g`` weights the
    skip features ``x`` per pixel before they are concatenated. Written here rather than taken
    from MONAI so inference needs only torch (MONAI is a training extra)."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.wg = nn.Conv2d(channels, inner, 1)
        self.wx = nn.Conv2d(channels, inner, 1, bias=False)
        self.psi = nn.Conv2d(inner, 1, 1)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.psi(torch.relu(self.wg(g) + self.wx(x))))


class UNet2D(nn.Module):
    """Plain 2D U-Net: ``channels`` per level, max-pool down, transposed-conv up, skip concat;
    ``attention=True`` gates every skip with an AttentionGate (seed 002's attention U-Net).

    ``dropout`` is applied once at the bottom (end of the contracting path), as in seeds 000/003.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels=(32, 64, 128, 128),
                 activation: str = "elu", norm: str = "batch", dropout: float = 0.0, attention: bool = False):
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
        self.gates = nn.ModuleList(AttentionGate(c) for c in reversed(channels[:-1])) if attention else None
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
        for n, (up, block) in enumerate(zip(self.up, self.up_blocks)):
            x = up(x)
            skip = skips.pop()
            if self.gates is not None:
                skip = self.gates[n](x, skip)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class CReLU(nn.Module):
    """Concatenated ReLU (seed 004's option): doubles channels, so convs after it see 2x inputs."""

    def forward(self, x):
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=1)


class MultiNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, activation: str, norm: str):
        super().__init__()
        widen = 2 if activation == "crelu" else 1
        act = CReLU if activation == "crelu" else ACTIVATIONS[activation]
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), act(),
            nn.Conv2d(cout * widen, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), act(),
        )
        self.out_channels = cout * widen

    def forward(self, x):
        return self.body(x)


class MultiNet(nn.Module):
    """Seed 004's MultiNet: a U-Net with ``levels`` resolution levels whose widths double up to
    ``max_channels``, and deep supervision by adding each level's upsampled output to the next finer
    one (out_l = head_l(f_l) + up(out_{l+1})). Input: 3 adjacent sagittal slices; output: one
    logit map per channel (sigmoid: L1..L5)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 5, levels: int = 5, base_channels: int = 8,
                 max_channels: int = 16, activation: str = "elu", norm: str = "batch"):
        super().__init__()
        widths = [min(base_channels * 2 ** i, max_channels) for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            block = MultiNetBlock(cin, w, activation, norm)
            self.down.append(block)
            cin = block.out_channels
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.heads = nn.ModuleList([nn.Conv2d(cin, out_channels, 1)])
        for i in reversed(range(levels - 1)):
            skip = self.down[i].out_channels
            self.up.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            block = MultiNetBlock(cin + skip, widths[i], activation, norm)
            self.up_blocks.append(block)
            cin = block.out_channels
            self.heads.append(nn.Conv2d(cin, out_channels, 1))
        self.levels = levels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # He init, as the seed
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        out = self.heads[0](x)
        for up, block, head in zip(self.up, self.up_blocks, self.heads[1:]):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
            out = head(x) + nn.functional.interpolate(out, scale_factor=2, mode="bilinear", align_corners=False)
        return out


class MeanOf(nn.Module):
    """An ensemble: the members' probabilities averaged (sigmoid per channel, or softmax over
    channels), given back as logits of the mean so that every caller reads it like one network.
    Members are independently trained networks (e.g. seeds of one recipe); their weights cannot be
    averaged, their outputs can. ``members``: [{"factory": ..., "config": ...}, ...]."""

    def __init__(self, members: list, activation: str = "sigmoid", in_channels: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"ensemble activation must be sigmoid or softmax, not {activation!r}")
        nets = [build_network(m["factory"], m["config"]) for m in members]
        for m, net in zip(members, nets):
            for key, want in (("in_channels", in_channels), ("out_channels", out_channels)):
                if want is not None and m["config"].get(key, want) != want:
                    raise ValueError(f"ensemble member has {key} {m['config'][key]}, the ensemble {want}")
        self.members = nn.ModuleList(nets)
        self.activation = activation

    @property
    def size_multiple(self) -> int:
        return max(getattr(m, "size_multiple", 1) for m in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x).float() for m in self.members]
        if self.activation == "sigmoid":
            mean = torch.stack([o.sigmoid() for o in outs]).mean(0)
            return torch.logit(mean, eps=1e-6)
        return torch.stack([o.softmax(1) for o in outs]).mean(0).clamp_min(1e-12).log()


class LevelRefiner(nn.Module):
    """The lumbar level outline refiner (tasks/spine/level_refinement.py, issue 21): (normalised
    image, summed level probability) -> body logit at the scan's own pixels; two scales (full, and
    half with dilated convolutions), its output added to the probability's own logit so that it
    learns the correction. ``in_channels`` 2 + 2k: the image slices k either side of the slice
    come first (session 34; the seed's refiner: k = 0), the probability is the last channel."""

    def __init__(self, in_channels: int = 2, out_channels: int = 1, width: int = 16):
        super().__init__()
        if in_channels < 2 or in_channels % 2 or out_channels != 1:
            raise ValueError(f"the level refiner takes 2 + 2k channels (image slices, probability) to 1, not "
                             f"{in_channels} to {out_channels}")
        self.neighbours = (in_channels - 2) // 2

        def block(i, o, d=1):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=d, dilation=d), nn.BatchNorm2d(o), nn.ELU())
        w = width
        self.enc = nn.Sequential(block(in_channels, w), block(w, w))
        self.down = nn.Sequential(block(w, 2 * w), block(2 * w, 2 * w, 2), block(2 * w, 2 * w, 4))
        self.dec = nn.Sequential(block(3 * w, w), nn.Conv2d(w, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        d = nn.functional.interpolate(self.down(nn.functional.avg_pool2d(e, 2)), size=e.shape[-2:], mode="bilinear",
                                      align_corners=False)
        p = x[:, -1:].clamp(1e-3, 1 - 1e-3)
        return self.dec(torch.cat([e, d], 1)) + torch.log(p / (1 - p))


NETWORKS: dict[str, Callable[..., nn.Module]] = {"unet2d": UNet2D, "multinet": MultiNet, "mean_of": MeanOf,
                                                  "level_refiner": LevelRefiner}


def build_network(factory: str, config: dict) -> nn.Module:
    if factory not in NETWORKS:
        raise ValueError(f"unknown network factory {factory!r} (known: {', '.join(sorted(NETWORKS))})")
    return NETWORKS[factory](**config)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Inference only: fold every BatchNorm2d that directly follows a Conv2d in a Sequential into
    that convolution (torch's fuse_conv_bn_eval), leaving an Identity. Same output in eval mode;
    the knee U-Net's batch norms were ~1/6 of its CPU forward time."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (it bakes in the running statistics)")
    with torch.no_grad():
        for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            for i in range(len(seq) - 1):
                conv, bn = seq[i], seq[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    # fuse_conv_bn_eval's arithmetic, in place: its deep copy of every convolution
                    # was ~10 ms of the lumbar level model's load
                    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                                  bn.running_var, bn.eps, bn.weight, bn.bias)
                    seq[i + 1] = nn.Identity()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
