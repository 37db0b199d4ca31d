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

`DROPS` maps each name to a builder that puts the method into a built `SpineNet`; a
`DropSpec` carries the chosen name, rate and the builder's keyword arguments together
(docs/architecture.md, "Worked example: adding a drop method").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import DropBlock2d, DropPath
from torch import nn

from lit_spine.models.backbones import stage_paths

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


# Builders: each puts its method into a built `SpineNet` (duck-typed: `backbone`,
# `reductions`, `head_drop`, `stochastic_depth`) and takes the rate plus its own keywords.


def build_none(net: nn.Module, rate: float) -> None:
    """No drop method: the net stays as built."""


def build_dropout(net: nn.Module, rate: float) -> None:
    """Elementwise dropout on the decoder features feeding the heads."""
    if rate > 0:
        net.head_drop = nn.Dropout(rate)


def build_spatial_dropout(net: nn.Module, rate: float) -> None:
    """Channel dropout (Dropout2d) on the decoder features feeding the heads."""
    if rate > 0:
        net.head_drop = nn.Dropout2d(rate)


def build_dropblock(
    net: nn.Module, rate: float, dropblock_size: int = 5, dropblock_stages: list[int] | None = None
) -> None:
    """DropBlock after the backbone feature levels `dropblock_stages` (0 = shallowest;
    default the last two), blocks of `dropblock_size` feature pixels."""
    levels = len(net.reductions)
    chosen = list(range(levels - 2, levels)) if dropblock_stages is None else list(dropblock_stages)
    if not chosen or any(not 0 <= s < levels for s in chosen):
        raise ValueError(
            f"dropblock_stages {chosen} outside the {levels} feature levels of "
            f"{net.backbone_name!r} (0..{levels - 1}, reductions {net.reductions})"
        )
    paths = stage_paths(net.backbone)
    insert_dropblock(net.backbone, [paths[s] for s in sorted(set(chosen))], rate, dropblock_size)


def build_stochastic_depth(
    net: nn.Module, rate: float, stochastic_depth_rule: str = "linear"
) -> None:
    """A DropPath in every residual block of the backbone, probabilities by the rule."""
    net.stochastic_depth = apply_stochastic_depth(net.backbone, rate, stochastic_depth_rule)


@dataclass(frozen=True)
class DropChoice:
    """One drop method: how to build it into a net, and whether it needs residual blocks."""

    build: Callable[..., None]  # (net, rate, **settings) -> None, changes `net` in place
    needs_residual: bool = False


# The one place that lists the drop methods; add a method here (and its builder above).
DROPS: dict[str, DropChoice] = {
    "none": DropChoice(build_none),
    "dropout": DropChoice(build_dropout),  # in the heads
    "spatial_dropout": DropChoice(build_spatial_dropout),  # in the heads
    "dropblock": DropChoice(build_dropblock),  # after chosen backbone stages
    "stochastic_depth": DropChoice(build_stochastic_depth, needs_residual=True),  # backbone blocks
}


@dataclass(frozen=True)
class DropSpec:
    """A drop method's settings travelling together: name, rate and its keyword arguments."""

    name: str = "none"
    rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def keywords(self) -> set[str]:
        """The keyword arguments the method's builder accepts."""
        return set(inspect.signature(DROPS[self.name].build).parameters) - {"net", "rate"}

    def validate(self) -> DropSpec:
        """Raise a ValueError naming keyword arguments the method does not take; return self."""
        unknown = sorted(set(self.kwargs) - self.keywords())
        if unknown:
            raise ValueError(
                f"drop method {self.name!r} takes no setting(s) {unknown}; "
                f"it takes {sorted(self.keywords()) or 'none'}"
            )
        return self

    @classmethod
    def from_arguments(
        cls, name: str, rate: float, settings: dict[str, Any], extra: dict[str, Any] | None
    ) -> DropSpec:
        """The spec for method `name`: of `settings` (SpineNet's flat keyword arguments, such
        as ``dropblock_size``) the ones its builder takes, then `extra` (``drop_kwargs``)."""
        spec = cls(name, rate)
        taken = {k: v for k, v in settings.items() if k in spec.keywords()}
        return cls(name, rate, {**taken, **(extra or {})}).validate()

    def apply(self, net: nn.Module) -> None:
        """Build the method into `net` (a SpineNet after its backbone and heads exist)."""
        DROPS[self.name].build(net, self.rate, **self.kwargs)
