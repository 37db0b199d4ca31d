"""SpineNet: any timm backbone x any norm x any drop method, with heatmap and class heads.

A plain ``nn.Module`` (no Lightning): its flat, typed constructor is the configuration
schema (LightningCLI reads the hints; sweeps set ``model.net.init_args.<name>``). Every
choice is validated at construction, so an unsupported combination fails there with a
message, never inside a forward pass.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lit_spine.models import backbones, drops, heads, norms
from lit_spine.task import get_task
from lit_spine.utils import choose


class SpineNet(nn.Module):
    """Backbone + heatmap decoder + per-point classifier for the points of a task (the 11
    lumbar keypoints of tianchi2020 by default).

    Args:
        backbone: timm model name from a supported family (`backbones.FAMILIES`).
        in_chans: input channels (slices stacked as channels).
        vocab: disease vocabulary, 'tianchi2020' or 'seed7' (sets the class counts).
        pretrained: load timm's pretrained weights (explicit opt-in; needs them cached).
        norm: one of `norms.NORMS`: batchnorm, groupnorm, layernorm (GroupNorm(1, C): stats
            over C, H, W), layernorm2d (channels only, ConvNeXt), instancenorm (affine),
            frozen_batchnorm. Applied to every norm layer of backbone and heads.
        norm_groups: GroupNorm group count (used when `norm_group_size` is None).
        norm_group_size: GroupNorm channels per group; groups = C // size per layer.
        drop: one of `drops.DROPS`: none, dropout, spatial_dropout (in the heads),
            dropblock, stochastic_depth (in the backbone). Only that method is applied; it
            receives `drop_rate` and, of the flat settings below, those its builder takes,
            together as one `drops.DropSpec`.
        drop_rate: rate of the chosen method: dropout probability; DropBlock's target drop
            rate; for stochastic depth the last block's drop probability 1 - p_L ("linear")
            or every block's ("uniform").
        dropblock_size: DropBlock block size in feature pixels.
        dropblock_stages: feature levels (0 = shallowest) followed by DropBlock; default
            the last two.
        stochastic_depth_rule: 'linear' or 'uniform'.
        drop_kwargs: further keyword arguments for the chosen method's builder (for a method
            whose settings have no flat argument above); a name it does not take is refused.
        head: heatmap decoder, one of `heads.HEADS`: deconv, fpn.
        head_channels: decoder width (also the features the classifier samples).
        heatmap_stride: input pixels per heatmap pixel, 1, 2, 4 or 8.
        class_features: hidden width of the classifier MLP.
        head_dropout: dropout inside the classifier MLP, independent of `drop` (default 0).
        task: a registered `lit_spine.task.Task` (sets the heatmap channels and which points
            each classifier reads); `vocab` must be one of the task's vocabularies
            (rsna2024_canal: rsna2024_severity).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_chans: int = 1,
        vocab: str = "tianchi2020",
        pretrained: bool = False,
        norm: str = "batchnorm",
        norm_groups: int = 32,
        norm_group_size: int | None = None,
        drop: str = "none",
        drop_rate: float = 0.1,
        dropblock_size: int = 5,
        dropblock_stages: list[int] | None = None,
        stochastic_depth_rule: str = "linear",
        drop_kwargs: dict[str, Any] | None = None,
        head: str = "deconv",
        head_channels: int = 128,
        heatmap_stride: int = 4,
        class_features: int = 128,
        head_dropout: float = 0.0,
        task: str = "tianchi2020",
    ):
        super().__init__()
        spec = get_task(task)
        vocabulary = spec.vocabulary(vocab)  # unknown, or of another task: refused
        norm = choose(norm, norms.NORMS, "norm")
        drop = choose(drop, drops.DROPS, "drop method")
        head = choose(head, heads.HEADS, "head")
        stochastic_depth_rule = choose(
            stochastic_depth_rule, drops.STOCHASTIC_DEPTH_RULES, "stochastic_depth_rule"
        )
        family = backbones.backbone_family(backbone)
        if not 0.0 <= drop_rate < 1.0 or not 0.0 <= head_dropout < 1.0:
            raise ValueError(
                f"drop_rate ({drop_rate}) and head_dropout ({head_dropout}) must be in [0, 1)"
            )
        if drops.DROPS[drop].needs_residual and not backbones.FAMILIES[family].residual:
            raise ValueError(
                f"drop={drop!r} needs residual blocks; backbone {backbone!r} is a "
                f"{family} model without them. Use dropblock, dropout or spatial_dropout."
            )
        why = backbones.FAMILIES[family].unsupported_norms.get(norm)
        if why:
            raise ValueError(f"norm={norm!r} does not fit backbone {backbone!r} ({family}): {why}")
        if dropblock_size < 1:
            raise ValueError(f"dropblock_size must be >= 1, got {dropblock_size}")
        drop_spec = drops.DropSpec.from_arguments(
            drop,
            drop_rate,
            {
                "dropblock_size": dropblock_size,
                "dropblock_stages": dropblock_stages,
                "stochastic_depth_rule": stochastic_depth_rule,
            },
            drop_kwargs,
        )
        if norm == "frozen_batchnorm" and not pretrained:
            warnings.warn(
                "frozen_batchnorm without pretrained weights fixes every norm at mean 0, "
                "variance 1, scale 1, shift 0: the layers become identity maps (timm's "
                "zero-initialised last scale of each residual block is reset to 1, or that "
                "branch would output 0 forever)",
                stacklevel=2,
            )

        self.backbone = backbones.create_backbone(backbone, in_chans, pretrained)
        norms.swap_norms(self.backbone, norm, norm_groups, norm_group_size)
        if norm == "frozen_batchnorm" and not pretrained:
            norms.reset_frozen_batch_norms(self.backbone)  # identity maps, as warned above
        info = self.backbone.feature_info
        self.reductions: list[int] = list(info.reduction())
        channels: list[int] = list(info.channels())
        self.decoder = heads.HEADS[head](
            channels,
            self.reductions,
            heatmap_stride,
            head_channels,
            norms.norm_act_layer(norm, norm_groups, norm_group_size),
        )
        self.head_drop: nn.Module = nn.Identity()  # a heads drop method replaces it
        self.heatmap = nn.Conv2d(head_channels, spec.num_points, 1)
        self.classifier = heads.PointClassifier(
            head_channels,
            class_features,
            len(vocabulary.vertebra),
            len(vocabulary.disc),
            head_dropout,
            task=task,
        )
        self.backbone_name, self.family, self.norm, self.drop = backbone, family, norm, drop
        self.stochastic_depth: dict[str, float] = {}  # block path -> drop probability
        self.drop_spec = drop_spec
        drop_spec.apply(self)
        self.in_chans = in_chans
        self.heatmap_stride = heatmap_stride
        self.vocabulary = vocabulary
        self.task = spec

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this: the backbone's deepest reduction."""
        return max(self.reductions)

    def forward(
        self, images: torch.Tensor, points: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """images (B, in_chans, H, W); points (B, P, 2) input-pixel (x, y) for the classifier.

        P is the task's number of points (11 for tianchi2020, whose counts are shown below).
        Returns heatmaps (B, 11, H / stride, W / stride), vertebra_logits (B, 5, Kv),
        disc_logits (B, 6, Kd) and the points the classifier read (decoded from the
        heatmaps by argmax when `points` is None).
        """
        height, width = images.shape[-2:]
        deepest = self.size_multiple
        if height % deepest or width % deepest:
            raise ValueError(
                f"input size {height}x{width} must be a multiple of the backbone's deepest "
                f"reduction {deepest}"
            )
        features = self.head_drop(self.decoder(self.backbone(images)))
        heatmaps = self.heatmap(features)
        if points is None:
            with torch.no_grad():
                points = heads.heatmap_argmax(heatmaps, self.heatmap_stride)
        vertebra, disc = self.classifier(features, points, (height, width))
        return {
            "heatmaps": heatmaps,
            "vertebra_logits": vertebra,
            "disc_logits": disc,
            "points": points,
        }

    def set_drop_schedule(self, progress: float) -> None:
        """DropBlock linear warm-up: rate = drop_rate * min(1, progress); no-op for other drops."""
        drops.set_dropblock_progress(self, progress)

    def param_groups(
        self, weight_decay: float, norm_weight_decay: float = 0.0, bias_weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer parameter groups: norm scales/shifts and biases get their own decay (0 by default)."""
        norm_params = {
            id(p) for m in self.modules() if norms.is_norm(m) for p in m.parameters(recurse=False)
        }
        groups: dict[str, tuple[float, list[nn.Parameter]]] = {
            "decay": (weight_decay, []),
            "norm": (norm_weight_decay, []),
            "bias": (bias_weight_decay, []),
        }
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            key = "norm" if id(p) in norm_params else "bias" if name.endswith("bias") else "decay"
            groups[key][1].append(p)
        return [
            {"name": key, "params": params, "weight_decay": decay}
            for key, (decay, params) in groups.items()
            if params
        ]
