"""Drop methods chosen by name: dropout, spatial dropout, DropBlock, stochastic depth.

- Dropout (Hinton et al. 2012, https://arxiv.org/abs/1207.0580) and spatial (channel)
  dropout (Tompson et al. 2015, https://arxiv.org/abs/1411.4280) act in the heads.
- DropBlock (Ghiasi et al. 2018, https://arxiv.org/abs/1810.12890) drops contiguous
  block_size x block_size regions, shared by all channels, after chosen backbone stages;
  its rate is ramped up linearly during training (`set_dropblock_progress`).
- Stochastic depth (Huang et al. 2016, https://arxiv.org/abs/1603.09382) drops the
  residual branch of whole blocks per sample. "linear": block l of L drops with
  probability l / L * rate (survival p_l = 1 - l / L * (1 - p_L), so `rate` = 1 - p_L);
  "uniform": every block drops with probability `rate`. Survivors are rescaled by
  1 / p_l during training, so eval mode is the identity (timm ``DropPath``).

The layers are timm's ``DropBlock2d`` and ``DropPath``, inserted the same way in every
family so that one configuration means the same thing everywhere: timm's own
``drop_block_rate`` fixes block sizes and stages per family, and its ``drop_path_rate``
uses linspace(0, rate, L) rather than the paper's l / L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropBlock2d, DropPath
from torch import nn


@dataclass(frozen=True)
class DropChoice:
    """Where one drop method acts."""

    where: str
    description: str


# The one place that lists the drop methods; `drop_rate` is the rate of the chosen one.
DROPS: dict[str, DropChoice] = {
    "none": DropChoice("-", "no drop method"),
    "dropout": DropChoice("heads", "elementwise dropout on the decoder features feeding the heads"),
    "spatial_dropout": DropChoice("heads", "channel dropout (Dropout2d) on the decoder features"),
    "dropblock": DropChoice("backbone", "DropBlock after the chosen backbone stages"),
    "stochastic_depth": DropChoice("backbone", "drop residual branches of backbone blocks"),
}

STOCHASTIC_DEPTH_RULES: dict[str, str] = {
    "linear": "block l of L drops with probability l / L * rate (Huang et al.)",
    "uniform": "every block drops with probability rate",
}


class ScheduledDropBlock2d(DropBlock2d):
    """timm DropBlock2d whose rate is `target_prob * min(1, progress)` (linear warm-up)."""

    def __init__(self, drop_prob: float, block_size: int):
        super().__init__(drop_prob=drop_prob, block_size=block_size)
        self.target_prob = drop_prob

    def set_progress(self, progress: float) -> None:
        """Set the rate for a warm-up `progress` in [0, 1] (values above 1 keep the target)."""
        self.drop_prob = self.target_prob * min(1.0, max(0.0, progress))

    def extra_repr(self) -> str:
        return (
            f"drop_prob={self.drop_prob:.3f}, target_prob={self.target_prob:.3f}, "
            f"block_size={self.block_size}"
        )


class StageWithDropBlock(nn.Module):
    """A backbone stage followed by DropBlock on its output (so the next stage sees it)."""

    def __init__(self, stage: nn.Module, dropblock: ScheduledDropBlock2d):
        super().__init__()
        self.stage = stage
        self.dropblock = dropblock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropblock(self.stage(x))


def stochastic_depth_rates(num_blocks: int, rate: float, rule: str) -> list[float]:
    """Per-block drop probabilities for stochastic depth, first block first."""
    if rule == "uniform":
        return [rate] * num_blocks
    return [rate * (i + 1) / num_blocks for i in range(num_blocks)]


def residual_blocks(module: nn.Module) -> dict[str, nn.Module]:
    """Blocks (in forward order) whose residual branch passes through their `drop_path`.

    timm residual blocks apply ``self.drop_path`` to the residual branch just before the
    sum; MobileNet/EfficientNet blocks do so only when ``has_skip`` (same shape in and out).
    """
    return {
        path: m
        for path, m in module.named_modules()
        if hasattr(m, "drop_path")
        and not callable(getattr(type(m), "drop_path", None))
        and getattr(m, "has_skip", True)
    }


def apply_stochastic_depth(module: nn.Module, rate: float, rule: str) -> dict[str, float]:
    """Give every residual block a DropPath by `rule`; return {block path: drop probability}."""
    blocks = residual_blocks(module)
    if not blocks:
        raise ValueError(
            f"stochastic depth needs residual blocks, and {type(module).__name__} has none; "
            "choose another drop method or a residual family"
        )
    rates = stochastic_depth_rates(len(blocks), rate, rule)
    for block, p in zip(blocks.values(), rates):
        block.drop_path = DropPath(p)
    return dict(zip(blocks, rates))


def insert_dropblock(
    module: nn.Module, stage_paths: list[str], rate: float, block_size: int
) -> list[ScheduledDropBlock2d]:
    """Wrap each stage at `stage_paths` so DropBlock acts on its output; return the layers."""
    layers = []
    for path in stage_paths:
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        layer = ScheduledDropBlock2d(rate, block_size)
        stage = getattr(parent, name)
        wrapped = StageWithDropBlock(stage, layer)
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
            parent[int(name)] = wrapped
        else:
            setattr(parent, name, wrapped)
        layers.append(layer)
    return layers


def set_dropblock_progress(module: nn.Module, progress: float) -> None:
    """Linear DropBlock warm-up: every DropBlock's rate becomes its target * min(1, progress)."""
    for m in module.modules():
        if isinstance(m, ScheduledDropBlock2d):
            m.set_progress(progress)


def head_dropout(drop: str, rate: float) -> nn.Module:
    """The dropout layer the heads use for `drop` ('dropout' / 'spatial_dropout'), else identity."""
    if drop == "dropout" and rate > 0:
        return nn.Dropout(rate)
    if drop == "spatial_dropout" and rate > 0:
        return nn.Dropout2d(rate)
    return nn.Identity()


DROP_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    DropBlock2d,
    DropPath,
)


def find_drops(module: nn.Module) -> dict[str, nn.Module]:
    """Active drop layers of `module` by path (skips timm's rate-0 dropout placeholders)."""
    return {
        p: m
        for p, m in module.named_modules()
        if isinstance(m, DROP_TYPES) and (getattr(m, "p", 1.0) > 0 or isinstance(m, DropBlock2d))
    }
