"""Heads: heatmap decoders (deconvolution, feature pyramid) and a per-point classifier.

- ``deconv``: SimpleBaseline (Xiao et al. 2018, https://arxiv.org/abs/1804.06208): from
  the deepest feature, 4x4 stride-2 transposed convolutions + norm + ReLU until the
  heatmap stride.
- ``fpn``: FPN / U-Net style top-down decoder (Lin et al. 2017, https://arxiv.org/abs/1612.03144;
  Ronneberger et al. 2015): 1x1 laterals on every feature level at or above the heatmap
  stride, nearest 2x upsampling + sum, a 3x3 conv + norm + ReLU after each merge.

Heads receive their norm as a layer constructor `norm_layer` (channels -> fused norm +
ReLU, BatchNorm+ReLU by default); `SpineNet` passes the chosen norm's
(`norms.norm_act_layer`), so the heads are built with it rather than swapped afterwards. Coordinates are input pixels, x (column) first; heatmap
pixel i has its centre at input coordinate (i + 0.5) * stride - 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from lit_spine.task import get_task

NormLayer = Callable[[int], nn.Module]  # channels -> fused norm + activation


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    norm_layer: NormLayer = BatchNormAct2d,
) -> nn.Sequential:
    """Conv (no bias) + norm + ReLU, the head's basic unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        norm_layer(out_channels),
    )


def _levels(reductions: list[int], stride: int) -> int:
    if stride not in (1, 2, 4, 8) or stride > max(reductions):
        raise ValueError(
            f"heatmap_stride must be one of 1, 2, 4, 8 and at most the backbone's deepest "
            f"reduction {max(reductions)}; got {stride}"
        )
    return int(math.log2(max(reductions) // stride))


class DeconvHead(nn.Module):
    """SimpleBaseline decoder: deepest feature -> stride-2 transposed convs -> `channels` at `stride`."""

    def __init__(
        self,
        in_channels: list[int],
        reductions: list[int],
        stride: int,
        channels: int,
        norm_layer: NormLayer = BatchNormAct2d,
    ):
        super().__init__()
        steps = _levels(reductions, stride)
        layers: list[nn.Module] = []
        c = in_channels[-1]
        for _ in range(steps):
            layers += [
                nn.ConvTranspose2d(c, channels, 4, stride=2, padding=1, bias=False),
                norm_layer(channels),
            ]
            c = channels
        if not steps:  # heatmap at the deepest stride: still give the heads their width
            layers.append(conv_norm_act(c, channels, 1, norm_layer))
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.layers(features[-1])


class FPNDecoder(nn.Module):
    """Top-down feature pyramid merging every level down to `stride` (U-Net style smoothing)."""

    def __init__(
        self,
        in_channels: list[int],
        reductions: list[int],
        stride: int,
        channels: int,
        norm_layer: NormLayer = BatchNormAct2d,
    ):
        super().__init__()
        _levels(reductions, stride)
        self.used = [i for i, r in enumerate(reductions) if r >= stride]
        self.laterals = nn.ModuleList(nn.Conv2d(in_channels[i], channels, 1) for i in self.used)
        self.smooth = nn.ModuleList(
            conv_norm_act(channels, channels, norm_layer=norm_layer) for _ in self.used[:-1]
        )
        finest = min(reductions[i] for i in self.used)
        self.extra = nn.ModuleList(
            conv_norm_act(channels, channels, norm_layer=norm_layer)
            for _ in range(int(math.log2(finest // stride)))
        )
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = [features[i] for i in self.used]
        x = self.laterals[-1](levels[-1])
        for k in range(len(levels) - 2, -1, -1):
            lateral = self.laterals[k](levels[k])
            x = F.interpolate(x, size=lateral.shape[-2:], mode="nearest") + lateral
            x = self.smooth[k](x)
        for layer in self.extra:
            x = layer(F.interpolate(x, scale_factor=2, mode="nearest"))
        return x


# The one place that lists the heatmap decoders.
HEADS: dict[str, type[nn.Module]] = {"deconv": DeconvHead, "fpn": FPNDecoder}


def heatmap_argmax(heatmaps: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, P, h, w) heatmaps -> (B, P, 2) input-pixel (x, y) of each map's maximum."""
    b, p, h, w = heatmaps.shape
    index = heatmaps.detach().flatten(2).argmax(-1)
    xy = torch.stack((index % w, torch.div(index, w, rounding_mode="floor")), -1).float()
    return (xy + 0.5) * stride - 0.5


class PointClassifier(nn.Module):
    """Classify each point from decoder features sampled at it (bilinear) + a learned point embedding."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        num_vertebra_classes: int,
        num_disc_classes: int,
        dropout: float = 0.0,
        task: str = "tianchi2020",
    ):
        super().__init__()
        spec = get_task(task)
        self.point_embedding = nn.Parameter(torch.zeros(spec.num_points, channels))
        nn.init.normal_(self.point_embedding, std=0.02)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)
        )
        self.vertebra = nn.Linear(hidden, num_vertebra_classes)
        self.disc = nn.Linear(hidden, num_disc_classes)
        self.register_buffer(
            "vertebra_index",
            torch.tensor(spec.points_of_kind("vertebra"), dtype=torch.long),
            persistent=False,
        )
        self.register_buffer(
            "disc_index",
            torch.tensor(spec.points_of_kind("disc"), dtype=torch.long),
            persistent=False,
        )

    def forward(
        self, features: torch.Tensor, points: torch.Tensor, input_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, C, h, w), points (B, P, 2) input-pixel (x, y) -> vertebra, disc logits."""
        height, width = input_size
        # align_corners=False maps input pixel x to (x + 0.5) / width * 2 - 1; the feature
        # map covers the same extent, so the sample lands on the same physical point.
        scale = points.new_tensor([width, height])
        grid = ((points + 0.5) / scale * 2 - 1).unsqueeze(2)  # (B, P, 1, 2)
        sampled = F.grid_sample(features, grid.to(features.dtype), align_corners=False)
        hidden = self.mlp(sampled.squeeze(-1).transpose(1, 2) + self.point_embedding)
        return (
            self.vertebra(hidden.index_select(1, self.vertebra_index)),
            self.disc(hidden.index_select(1, self.disc_index)),
        )
