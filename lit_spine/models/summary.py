"""Parameters, FLOPs, receptive field and the norm/drop map of a SpineNet.

Receptive field: the theoretical one (Araujo et al. 2019, "Computing receptive fields of
convolutional neural networks"), propagated through the real forward pass. A torch
function mode follows every tensor: a conv / pool of kernel k, stride s, dilation d turns
(size r, jump j) into (r + (k - 1) d j, j s); an upsampling by f into (r + (n - 1) j, j / f)
with n = 1 (nearest) or 2 (bilinear) taps, a transposed conv of kernel k and stride s into
(r + (ceil(k / s) - 1) j, j / s); any other op keeps the largest r of its inputs, so
residual sums and concatenations follow the deepest path. Limitations: tensors that pass
through global pooling (SE, split attention) see the whole image; they are reported as
`global_context` and left out of the local size. Padding and image borders are ignored
(the size is that of an interior pixel); the effective receptive field is much smaller.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from lit_spine.models.drops import find_drops
from lit_spine.models.norms import find_norms

_CONV = {"conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices"}
_GLOBAL = {"adaptive_avg_pool2d", "adaptive_max_pool2d"}


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[-1]))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _pooled_globally(out: torch.Tensor, args: tuple) -> bool:
    """Whether an op reduced a spatial input to 1x1 (or fewer dims): a global pooling."""
    src = next((a for a in args if isinstance(a, torch.Tensor) and a.ndim == 4), None)
    if src is None or src.shape[-2:].numel() == 1:
        return False
    return out.ndim < 3 or out.shape[-2:].numel() == 1


class _ReceptiveFieldMode(TorchFunctionMode):
    """Tracks (size, jump) per spatial axis for every tensor produced in the forward pass."""

    def __init__(self, source: torch.Tensor):
        super().__init__()
        self.fields: dict[int, tuple[tuple[float, float], tuple[float, float]] | None] = {}
        self.keep: list[torch.Tensor] = []  # ids must stay unique while the mode runs
        self.global_context = False
        self._set(source, ((1.0, 1.0), (1.0, 1.0)))

    def _set(self, t: torch.Tensor, field: Any) -> None:
        self.fields[id(t)] = field
        self.keep.append(t)

    def _inputs(self, args: tuple, kwargs: dict) -> list:
        found = []
        for a in [*args, *kwargs.values()]:
            items = a if isinstance(a, (list, tuple)) else [a]
            found += [
                self.fields[id(t)]
                for t in items
                if isinstance(t, torch.Tensor) and id(t) in self.fields
            ]
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = self._inputs(args, kwargs)
        if not inputs:
            return out
        local = [f for f in inputs if f is not None]
        if len(local) < len(inputs):
            self.global_context = True
        if name in _GLOBAL:
            self.global_context = True
            field = None
        elif not local:
            field = None
        else:
            (rh, rw), (jh, jw) = max(local, key=lambda f: f[0][0] * f[0][1])
            if name in _CONV or name == "conv_transpose2d":
                if name.startswith("conv"):
                    kernel = tuple(args[1].shape[-2:])
                    stride = _pair(_arg(args, kwargs, 3, "stride", 1))
                    dilation = _pair(
                        _arg(args, kwargs, 7 if name == "conv_transpose2d" else 5, "dilation", 1)
                    )
                else:
                    kernel = _pair(_arg(args, kwargs, 1, "kernel_size"))
                    stride = _pair(_arg(args, kwargs, 2, "stride", None) or kernel)
                    dilation = (
                        _pair(_arg(args, kwargs, 4, "dilation", 1)) if "max" in name else (1, 1)
                    )
                span = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
                if name == "conv_transpose2d":
                    taps = [math.ceil(s / st) for s, st in zip(span, stride)]
                    field = (
                        (rh + (taps[0] - 1) * jh, rw + (taps[1] - 1) * jw),
                        (jh / stride[0], jw / stride[1]),
                    )
                else:
                    field = (
                        (rh + (span[0] - 1) * jh, rw + (span[1] - 1) * jw),
                        (jh * stride[0], jw * stride[1]),
                    )
            elif name == "interpolate" and isinstance(out, torch.Tensor):
                src = args[0]
                fh, fw = out.shape[-2] / src.shape[-2], out.shape[-1] / src.shape[-1]
                mode = _arg(args, kwargs, 3, "mode", "nearest")
                n = 1 if mode.startswith("nearest") else 2
                field = ((rh + (n - 1) * jh, rw + (n - 1) * jw), (jh / fh, jw / fw))
            else:
                field = ((rh, rw), (jh, jw))
            if isinstance(out, torch.Tensor) and _pooled_globally(out, args):
                self.global_context, field = True, None
        outputs = out if isinstance(out, (list, tuple)) else [out]
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self._set(t, field)
        return out


def receptive_field(fn: Any, example: torch.Tensor) -> dict[str, Any]:
    """Theoretical receptive field of `fn(example)`'s output pixels, in input pixels.

    `fn` returns a tensor, or a dict whose "heatmaps" entry is used. Returns size and jump
    (effective stride) per axis (height, width) and whether global context is present.
    """
    example = example.clone()
    with torch.no_grad():
        mode = _ReceptiveFieldMode(example)
        with mode:
            out = fn(example)
    if isinstance(out, dict):
        out = out["heatmaps"]
    field = mode.fields.get(id(out))
    if field is None:
        raise ValueError("the output has no local receptive field (only global context)")
    (rh, rw), (jh, jw) = field
    return {"size": (int(rh), int(rw)), "jump": (jh, jw), "global_context": mode.global_context}


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter: 2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(example)
    return int(counter.get_total_flops())


def _one_line(module: nn.Module) -> str:
    return " ".join(line.strip() for line in repr(module).splitlines())


def describe(
    net: nn.Module, input_size: tuple[int, int] | int = 256, in_chans: int | None = None
) -> dict[str, Any]:
    """Parameters, FLOPs, receptive field and norm/drop modules of `net` at `input_size`."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    channels = in_chans or getattr(net, "in_chans", 1)
    example = torch.zeros(1, channels, height, width)
    was_training = net.training
    net.eval()
    try:
        flops = count_flops(net, example)
        rf = receptive_field(net, example)
    finally:
        net.train(was_training)
    norms = find_norms(net)
    drops = find_drops(net)
    params = list(net.parameters())
    return {
        "backbone": getattr(net, "backbone_name", type(net).__name__),
        "norm": getattr(net, "norm", None),
        "drop": getattr(net, "drop", None),
        "input_size": [height, width],
        "in_chans": channels,
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "flops": flops,
        "flops_note": "torch.utils.flop_counter: 2 FLOPs per multiply-add, batch 1, eval mode",
        "heatmap_stride": getattr(net, "heatmap_stride", None),
        "receptive_field": rf,
        "norm_counts": dict(Counter(type(m).__name__ for m in norms.values())),
        "drop_counts": dict(Counter(type(m).__name__ for m in drops.values())),
        "norm_modules": {p: _one_line(m) for p, m in norms.items()},
        "drop_modules": {p: _one_line(m) for p, m in drops.items()},
    }


def format_description(info: dict[str, Any]) -> str:
    """A human-readable report of `describe`'s dictionary."""
    rf = info["receptive_field"]
    lines = [
        f"backbone {info['backbone']}  norm {info['norm']}  drop {info['drop']}  "
        f"input {info['in_chans']}x{info['input_size'][0]}x{info['input_size'][1]}",
        f"parameters       {info['params']:,} ({info['trainable_params']:,} trainable)",
        f"FLOPs            {info['flops'] / 1e9:.3f} G ({info['flops'] / 2e9:.3f} G multiply-adds; "
        "batch 1, eval)",
        f"receptive field  {rf['size'][0]}x{rf['size'][1]} px, jump {rf['jump'][0]:g}x{rf['jump'][1]:g} "
        f"px at the heatmap (stride {info['heatmap_stride']})"
        + ("; plus global context (SE / attention pooling)" if rf["global_context"] else ""),
        "",
        "norm layers: "
        + (", ".join(f"{k} x{v}" for k, v in info["norm_counts"].items()) or "none"),
        "drop layers: "
        + (", ".join(f"{k} x{v}" for k, v in info["drop_counts"].items()) or "none"),
        "",
    ]
    rows = [*info["norm_modules"].items(), *info["drop_modules"].items()]
    width = max((len(p) for p, _ in rows), default=10)
    lines += [f"  {p:<{width}}  {r}" for p, r in rows]
    return "\n".join(lines)
