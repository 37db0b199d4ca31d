"""lit_spine: compare backbones, normalization layers and drop methods on lumbar-spine MRI."""

__version__ = "0.1.0"
