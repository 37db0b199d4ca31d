"""Normalization layers chosen by name, and a swap that puts one kind into any network.

Group Normalization (Wu & He, 2018, https://arxiv.org/abs/1803.08494) frames all four
norms as x_i -> (x_i - mean) / std over a set S_i followed by a per-channel scale and
shift; for NCHW features they differ only in S_i:

- ``batchnorm``: same channel, across (N, H, W).
- ``groupnorm``: same sample, across (H, W) and a group of C/G channels.
- ``layernorm``: same sample, across (C, H, W): the definition of the GroupNorm paper,
  i.e. GroupNorm with one group (``nn.GroupNorm(1, C)``).
- ``layernorm2d``: same sample and position, across C only: the ConvNeXt variant
  (timm ``LayerNorm2d``); a different layer from ``layernorm``, hence its own name.
- ``instancenorm``: same sample and channel, across (H, W), with a per-channel affine.
- ``frozen_batchnorm``: BatchNorm whose statistics and affine are fixed buffers (the
  "BN*" of detectors): a constant affine map, nothing trainable, same in train and eval.

Every constructor takes the channel count first, so any norm drops in where BatchNorm
was. The per-sample norms (group, layer, instance) share one kernel, ``F.group_norm``; on
CPU it is computed on an NCHW copy when the features arrive channels-last (see `group_norm`),
the one piece written here rather than taken from torch or timm. Fused norm+activation
modules (timm ``BatchNormAct2d`` and friends) are replaced by the fused module of the chosen
kind, keeping their activation and drop layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import (
    BatchNormAct2d,
    FrozenBatchNormAct2d,
    GroupNorm1Act,
    GroupNormAct,
    LayerNorm2d,
    LayerNormAct2d,
    freeze_batch_norm_2d,
)
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lit_spine.utils import choose


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``F.group_norm``; CPU channels-last input with small groups is normalised in NCHW and
    handed back channels-last.

    torch's CPU group-norm kernel on channels-last tensors slows down as groups get smaller
    (bf16, one thread, forward + backward, RegNetX-200MF shapes at 96 px, against the two
    layout copies that avoid it: 1.3-1.4x slower at 8 channels per group, 4-8x at one), and
    is the faster one from about 16 channels per group up (LayerNorm's single group among
    them). So groups of fewer than 16 channels take the NCHW detour; the result is the same
    op on the same numbers. Elsewhere (NCHW input, CUDA) this is ``F.group_norm`` unchanged.
    """
    if (
        x.device.type == "cpu"
        and x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.shape[1] < 16 * num_groups
    ):
        y = F.group_norm(x.contiguous(), num_groups, weight, bias, eps)
        return y.contiguous(memory_format=torch.channels_last)
    return F.group_norm(x, num_groups, weight, bias, eps)


class GroupNorm2d(nn.GroupNorm):
    """``nn.GroupNorm`` computed by `group_norm` (fast on channels-last CPU features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _GroupNormActForward:
    """The forward of timm's fused group norms (norm, drop, act), its norm by `group_norm`;
    timm's own when it was built with its fast-norm option."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            return super().forward(x)
        x = group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


class GroupNormAct2d(_GroupNormActForward, GroupNormAct):
    """timm ``GroupNormAct`` with its norm computed by `group_norm`."""


class GroupNorm1Act2d(_GroupNormActForward, GroupNorm1Act):
    """timm ``GroupNorm1Act`` (one group: the paper's LayerNorm) computed by `group_norm`."""


class InstanceNorm2d(nn.InstanceNorm2d):
    """Affine ``nn.InstanceNorm2d`` without running statistics; on CPU computed as the
    GroupNorm with one channel per group that it equals (`group_norm`): torch's CPU
    instance norm reshapes to a batch norm over N x C channels and copies the input, which
    made it the slowest of the four norms in the RegNetX-200MF training step (1.7x
    BatchNorm's, bf16 channels-last, measured side by side)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        if self.training and x.shape[2] * x.shape[3] == 1:  # as nn.InstanceNorm2d refuses it
            raise ValueError(
                f"InstanceNorm2d: expected more than 1 spatial element when training, got input "
                f"size {tuple(x.shape)} (a 1x1 map normalises to 0: use a larger image_size)"
            )
        return group_norm(x, self.num_features, self.weight, self.bias, self.eps)


class InstanceNormAct2d(InstanceNorm2d):
    """Affine InstanceNorm followed by an activation (the fused twin timm lacks)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        act_layer: Callable[[], nn.Module] | None = nn.ReLU,
        drop_layer: Callable[[], nn.Module] | None = None,
    ):
        super().__init__(num_features, eps=eps)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


@dataclass(frozen=True)
class NormChoice:
    """How to build one norm kind: plain and fused (norm + act) constructors."""

    plain: Callable[[int, int], nn.Module]  # (channels, groups) -> module
    fused: Callable[[int, int], nn.Module]  # (channels, groups) -> module with .act / .drop
    grouped: bool  # whether the group count matters (validated against channel counts)


def _frozen(module: nn.Module) -> nn.Module:
    return freeze_batch_norm_2d(module)


# The one place that lists the norms; add a norm here.
NORMS: dict[str, NormChoice] = {
    # BatchNorm: statistics per channel over (N, H, W)
    "batchnorm": NormChoice(
        lambda c, g: nn.BatchNorm2d(c),
        lambda c, g: BatchNormAct2d(c),
        False,
    ),
    # GroupNorm: per sample over (H, W) and C/G channels
    "groupnorm": NormChoice(
        lambda c, g: GroupNorm2d(g, c),
        lambda c, g: GroupNormAct2d(c, num_groups=g),
        True,
    ),
    # LayerNorm as in the GroupNorm paper: per sample over (C, H, W) = GroupNorm(1, C)
    "layernorm": NormChoice(
        lambda c, g: GroupNorm2d(1, c),
        lambda c, g: GroupNorm1Act2d(c),
        False,
    ),
    # channels-only LayerNorm (ConvNeXt): per sample and position over C
    "layernorm2d": NormChoice(
        lambda c, g: LayerNorm2d(c),
        lambda c, g: LayerNormAct2d(c),
        False,
    ),
    # InstanceNorm with affine: per sample and channel over (H, W)
    "instancenorm": NormChoice(
        lambda c, g: InstanceNorm2d(c),
        lambda c, g: InstanceNormAct2d(c),
        False,
    ),
    # frozen BatchNorm (BN*): fixed statistics and affine, nothing trainable
    "frozen_batchnorm": NormChoice(
        lambda c, g: _frozen(nn.BatchNorm2d(c)),
        lambda c, g: _frozen(BatchNormAct2d(c)),
        False,
    ),
}

# Every class the swap recognises as a 2-D norm layer (subclasses included).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    LayerNorm2d,
    LayerNormAct2d,
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
)


def is_norm(module: nn.Module) -> bool:
    """Whether `module` is a norm layer the suite knows (or one it cannot swap)."""
    return isinstance(module, (*NORM_TYPES, nn.LayerNorm))


def norm_channels(module: nn.Module) -> int:
    """Channel count a norm layer normalises."""
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    return int(module.weight.shape[0])  # torchvision FrozenBatchNorm2d keeps only buffers


def group_count(channels: int, groups: int, group_size: int | None) -> int:
    """Groups for a GroupNorm over `channels`: `channels // group_size` if a size is given."""
    if group_size:
        return channels // group_size if channels % group_size == 0 else 0
    return groups if channels % groups == 0 else 0


def check_groups(
    channel_counts: dict[str, int], norm: str, groups: int, group_size: int | None
) -> None:
    """Raise a ValueError naming every layer whose channels the GroupNorm setting cannot split."""
    if not NORMS[norm].grouped:
        return
    if group_size is not None and group_size < 1 or groups < 1:
        raise ValueError(f"norm_groups ({groups}) and norm_group_size ({group_size}) must be >= 1")
    bad = {p: c for p, c in channel_counts.items() if group_count(c, groups, group_size) == 0}
    if not bad:
        return
    setting = f"norm_group_size={group_size}" if group_size else f"norm_groups={groups}"
    shown = ", ".join(f"{p or '<root>'} ({c} ch)" for p, c in list(bad.items())[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    common = math.gcd(*channel_counts.values())
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    raise ValueError(
        f"groupnorm with {setting} does not divide the channels of {len(bad)} layer(s): "
        f"{shown}{more}. Every channel count here is a multiple of {common}: use norm_groups "
        f"or norm_group_size from {divisors} (norm_group_size takes precedence)."
    )


def make_norm(
    norm: str,
    channels: int,
    act: nn.Module | None = None,
    groups: int = 32,
    group_size: int | None = None,
) -> nn.Module:
    """Build norm `norm` over `channels`; with `act`, a fused norm+act module using that act."""
    choice = NORMS[choose(norm, NORMS, "norm")]
    check_groups({"": channels}, norm, groups, group_size)
    g = group_count(channels, groups, group_size)
    if act is None:
        return choice.plain(channels, g)
    module = choice.fused(channels, g)
    module.act = act
    return module


def norm_act_layer(
    norm: str, groups: int = 32, group_size: int | None = None
) -> Callable[[int], nn.Module]:
    """A layer constructor, channels -> fused `norm` + ReLU, for layers built with the chosen
    norm (the heads); a GroupNorm setting that cannot split the channels raises there."""
    norm = choose(norm, NORMS, "norm")

    def build(channels: int) -> nn.Module:
        return make_norm(norm, channels, nn.ReLU(inplace=True), groups, group_size)

    return build


def reset_frozen_batch_norms(module: nn.Module) -> int:
    """Set every frozen BatchNorm in `module` to the identity map (scale 1, shift 0, mean 0,
    variance 1); the number reset. For a network without pretrained weights, where there are
    no statistics to freeze: the swap would otherwise freeze timm's zero-initialised last
    scale of each residual block (`zero_init_last`) at 0, and every residual branch would
    output 0 forever."""
    frozen = [
        m for m in module.modules() if isinstance(m, FrozenBatchNorm2d | FrozenBatchNormAct2d)
    ]
    with torch.no_grad():
        for m in frozen:
            m.weight.fill_(1.0)
            m.bias.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    return len(frozen)


def _copy_affine(old: nn.Module, new: nn.Module) -> None:
    """Carry a per-channel scale and shift over (keeps pretrained or zero-init gammas)."""
    for name in ("weight", "bias"):
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if (
            isinstance(src, torch.Tensor)
            and isinstance(dst, torch.Tensor)
            and src.shape == dst.shape
        ):
            with torch.no_grad():
                dst.copy_(src)


def _already(module: nn.Module, norm: str) -> bool:
    """Whether `module` is already exactly the chosen kind (left untouched by the swap)."""
    kinds = {
        "batchnorm": lambda m: type(m) in (nn.BatchNorm2d, BatchNormAct2d),
        "frozen_batchnorm": lambda m: type(m) in (FrozenBatchNorm2d, FrozenBatchNormAct2d),
        "layernorm2d": lambda m: type(m) in (LayerNorm2d, LayerNormAct2d),
    }
    return kinds.get(norm, lambda m: False)(module)


def _replacement(old: nn.Module, norm: str, groups: int, group_size: int | None) -> nn.Module:
    channels = norm_channels(old)
    fused = isinstance(getattr(old, "act", None), nn.Module)
    if norm == "frozen_batchnorm":
        # Freeze a BatchNorm that carries the old affine (and statistics, if it had some).
        bn = (
            _replacement(old, "batchnorm", groups, group_size)
            if not _already(old, "batchnorm")
            else old
        )
        if hasattr(old, "running_mean") and old.running_mean is not None:
            bn.running_mean.copy_(old.running_mean)
            bn.running_var.copy_(old.running_var)
        return freeze_batch_norm_2d(bn)
    choice = NORMS[norm]
    g = group_count(channels, groups, group_size)
    new = choice.fused(channels, g) if fused else choice.plain(channels, g)
    if fused:
        new.act = old.act
        new.drop = getattr(old, "drop", nn.Identity())
    _copy_affine(old, new)
    return new


def find_norms(module: nn.Module) -> dict[str, nn.Module]:
    """Norm layers of `module` by path, outermost first, not descending into a norm."""
    found: dict[str, nn.Module] = {}

    def walk(m: nn.Module, path: str) -> None:
        if is_norm(m):
            found[path] = m
            return
        for name, child in m.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(module, "")
    return found


def swap_norms(
    module: nn.Module, norm: str, groups: int = 32, group_size: int | None = None
) -> nn.Module:
    """Replace every norm layer of `module` by `norm`; validate everything before changing anything.

    Raises ValueError for a channels-last ``nn.LayerNorm`` (it normalises NHWC tensors and
    cannot take a 2-D norm's place) and for GroupNorm settings that do not divide a layer's
    channels. Returns the module (a new one if `module` itself is a norm).
    """
    norm = choose(norm, NORMS, "norm")
    found = find_norms(module)
    channels_last = [
        p
        for p, m in found.items()
        if isinstance(m, nn.LayerNorm) and not isinstance(m, (LayerNorm2d, LayerNormAct2d))
    ]
    if channels_last:
        raise ValueError(
            f"cannot swap norms in {type(module).__name__}: {len(channels_last)} channels-last "
            f"nn.LayerNorm layer(s) (e.g. {channels_last[0]!r}) normalise NHWC tensors; build "
            "the model in its NCHW variant (for ConvNeXt: conv_mlp=True)"
        )
    check_groups({p: norm_channels(m) for p, m in found.items()}, norm, groups, group_size)
    for path, old in found.items():
        if _already(old, norm):
            continue
        new = _replacement(old, norm, groups, group_size)
        new.train(old.training)
        if not path:
            return new
        parent_path, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent_path), name, new)
    return module
