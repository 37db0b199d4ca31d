"""Models: norms, drops, timm backbones, heads and the plain `nn.Module` SpineNet (no Lightning)."""

from lit_spine.models.net import SpineNet

__all__ = ["SpineNet"]
