"""Backbones: timm feature extractors (`features_only`), grouped into the families the suite covers.

A family is the timm model file a name comes from; it decides how a backbone is built
(ConvNeXt in its NCHW ``conv_mlp`` variant so that any 2-D norm can replace its
LayerNorms) and which drop methods it admits (stochastic depth needs residual blocks).
Weights are random unless `pretrained=True` is asked for explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
from torch import nn


@dataclass(frozen=True)
class Family:
    """One backbone family: example names, whether it has residual blocks, build options."""

    examples: tuple[str, ...]
    residual: bool
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    unsupported_norms: dict[str, str] = field(default_factory=dict)  # norm -> why


# The one place that lists the families, keyed by timm model module; add a family here.
FAMILIES: dict[str, Family] = {
    "resnet": Family(
        (
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet18d",
            "resnet26d",
            "resnext50_32x4d",
            "seresnext26d_32x4d",
            "test_resnet",
        ),
        residual=True,  # ResNet, ResNet-D, ResNeXt, SE-ResNe(X)t
    ),
    "resnest": Family(
        ("resnest14d", "resnest26d", "resnest50d"),
        residual=True,  # ResNeSt (split attention)
        unsupported_norms={
            "instancenorm": "split attention normalises globally pooled 1x1 features, where "
            "statistics over (H, W) of one channel are undefined",
        },
    ),
    "densenet": Family(("densenet121",), residual=False),
    "efficientnet": Family(
        ("efficientnet_b0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "test_efficientnet"),
        residual=True,  # EfficientNet, EfficientNetV2 (Fused-MBConv)
    ),
    "mobilenetv3": Family(("mobilenetv3_small_100", "mobilenetv3_large_100"), residual=True),
    "convnext": Family(
        ("convnext_atto", "convnext_nano", "convnext_tiny", "test_convnext"),
        residual=True,
        create_kwargs={"conv_mlp": True},  # built with conv_mlp=True (NCHW norms, 1x1-conv MLP)
    ),
    "regnet": Family(("regnetx_002", "regnety_002", "regnetx_004"), residual=True),
}


def backbone_family(name: str) -> str:
    """The family of a timm model name; a clear error for unknown or unsupported models."""
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        examples = "; ".join(f"{f}: {', '.join(s.examples[:3])}" for f, s in FAMILIES.items())
        raise ValueError(
            f"unknown backbone {name!r}"
            + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else "")
            + f"; supported timm families and examples: {examples}"
        )
    family = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    if family not in FAMILIES:
        supported = "; ".join(f"{f}: {', '.join(s.examples[:3])}" for f, s in FAMILIES.items())
        raise ValueError(
            f"backbone {name!r} is a timm {family!r} model, which lit_spine does not support "
            f"(norm swap and drop insertion are validated per family). Supported: {supported}"
        )
    return family


def create_backbone(name: str, in_chans: int, pretrained: bool = False) -> nn.Module:
    """A timm `features_only` model returning all feature levels (see `.feature_info`)."""
    family = FAMILIES[backbone_family(name)]
    return timm.create_model(
        name, features_only=True, pretrained=pretrained, in_chans=in_chans, **family.create_kwargs
    )


def stage_paths(backbone: nn.Module) -> list[str]:
    """Module path, inside `backbone`, of the module producing each feature level."""
    paths = []
    for name in backbone.feature_info.module_name():
        # FeatureListNet flattens 'stages.2' into a child named 'stages_2'.
        for candidate in (name, name.replace(".", "_")):
            try:
                backbone.get_submodule(candidate)
            except AttributeError:
                continue
            paths.append(candidate)
            break
        else:
            raise ValueError(f"cannot find feature module {name!r} in {type(backbone).__name__}")
    return paths
