"""Training-step speed of the suite on one device: precision and memory-format variants of the
real `SpineModule` step against a plain fp32 PyTorch loop, the machine's measured peak FLOP/s,
and the model FLOPs utilisation (MFU) that follows. Used by `lit-spine bench --only precision`.

Timing is `torch.utils.benchmark.Timer.blocked_autorange` (warm-up, adaptive block size,
thread control, CUDA synchronisation); nothing here times by hand. Hand-written, because no
library does it: the variant set-up and the MFU arithmetic. FLOPs of a training step are the
forward FLOPs that `describe` counts (torch.utils.flop_counter, batch 1) times the batch times
3: the backward pass costs about twice the forward (one product for the input gradient, one
for the weight gradient per layer; Kaplan et al. 2020 use the same 2x rule).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKWARD_FACTOR = 2.0  # backward FLOPs / forward FLOPs (see the module docstring)


@dataclass(frozen=True)
class Variant:
    """One way of running the training step: precision, memory format, compilation."""

    precision: str = "32-true"  # a Trainer precision: "32-true" or "bf16-mixed"
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        """Short label, e.g. 'bf16+cl' (fp32 NCHW eager is 'fp32')."""
        parts = ["bf16" if self.precision.startswith("bf16") else "fp32"]
        if self.channels_last:
            parts.append("cl")
        if self.compile:
            parts.append("compile")
        return "+".join(parts)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the convolutions run in."""
        return torch.bfloat16 if self.precision.startswith("bf16") else torch.float32


def autocast(device: torch.device, variant: Variant) -> contextlib.AbstractContextManager:
    """The autocast context Lightning's MixedPrecision plugin opens around training_step."""
    if variant.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_batch(batch_size: int, image_size: int, device: torch.device, seed: int = 0) -> dict:
    """A synthetic training batch with the keys and shapes `SpineLoss` reads (11 points, stride 4).

    Step time does not depend on pixel values, so random images and targets do for timing.
    """
    from lit_spine.data.labels import NUM_POINTS

    g = torch.Generator().manual_seed(seed)
    hm = image_size // 4
    batch = {
        "image": torch.rand(batch_size, 1, image_size, image_size, generator=g),
        "heatmap": torch.rand(batch_size, NUM_POINTS, hm, hm, generator=g),
        "points": torch.rand(batch_size, NUM_POINTS, 2, generator=g) * (image_size - 1),
        "present": torch.ones(batch_size, NUM_POINTS, dtype=torch.bool),
        "labels": (torch.rand(batch_size, NUM_POINTS, 16, generator=g) > 0.7),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build_module(backbone: str, variant: Variant, device: torch.device, seed: int = 0):
    """A SpineModule around a seeded SpineNet, set up as `configure_model` does for `variant`."""
    from lit_spine.models.net import SpineNet
    from lit_spine.module import SpineModule

    torch.manual_seed(seed)
    module = SpineModule(
        SpineNet(backbone=backbone), channels_last=variant.channels_last, compile=variant.compile
    ).to(device)
    if variant.channels_last:
        module.net = module.net.to(memory_format=torch.channels_last)
    if variant.compile:
        module.net = torch.compile(module.net)
    module._compiled = True  # configure_model's work is done above
    return module.train()


def _optimizer(net: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the net's parameter groups, as `SpineModule.configure_optimizers` builds it."""
    return torch.optim.AdamW(net.param_groups(1e-4), lr=1e-3)


def suite_step(backbone: str, variant: Variant, batch: dict, device: torch.device) -> Callable:
    """One real `SpineModule.training_step` + backward + AdamW step, as a zero-argument call."""
    module = build_module(backbone, variant, device)
    optimizer = _optimizer(module.spine_net)

    def step() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer: a no-op that warns
            with autocast(device, variant):
                loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def plain_step(backbone: str, batch: dict, device: torch.device) -> Callable:
    """The same network trained by a plain fp32 NCHW PyTorch loop (no module, no autocast)."""
    from lit_spine.losses import SpineLoss
    from lit_spine.models.net import SpineNet

    torch.manual_seed(0)
    net = SpineNet(backbone=backbone).to(device).train()
    optimizer = _optimizer(net)
    loss_fn = SpineLoss(class_loss="bce")

    def step() -> None:
        loss = loss_fn(net(batch["image"], batch["points"]), batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_call(
    fn: Callable, threads: int, min_run_time: float, label: str = "", warmup: int = 2
) -> float:
    """Median seconds per call of `fn` (blocked_autorange, after `warmup` untimed calls)."""
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()  # oneDNN primitives, AdamW state and compiled graphs are built in the warm-up
    timer = benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label or "step"
    )
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def forward_flops(backbone: str, image_size: int) -> float:
    """Forward FLOPs per image of SpineNet(backbone) at `image_size` (from `describe`)."""
    from lit_spine.models.net import SpineNet
    from lit_spine.models.summary import describe

    return float(describe(SpineNet(backbone=backbone), input_size=image_size)["flops"])


def train_flops_per_image(forward: float) -> float:
    """Forward + backward FLOPs per image (backward ~ 2x forward)."""
    return forward * (1.0 + BACKWARD_FACTOR)


def peak_flops(
    device: torch.device, dtype: torch.dtype, threads: int, min_run_time: float, quick: bool
) -> dict[str, float]:
    """Measured FLOP/s of a dense GEMM and of a 3x3 convolution in `dtype`; 'peak' is the larger.

    Sizes are large enough to reach the BLAS/oneDNN steady state (smaller under `quick`).
    """
    n = 512 if quick else (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm_s = time_call(lambda: a @ b, threads, min_run_time, "gemm")
    batch, chans, size = (
        (2, 64, 16) if quick else ((32, 256, 32) if device.type == "cuda" else (8, 128, 32))
    )
    conv = torch.nn.Conv2d(chans, chans, 3, padding=1, bias=False).to(device, dtype)
    x = torch.randn(batch, chans, size, size, device=device, dtype=dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv_s = time_call(lambda: conv(x), threads, min_run_time, "conv")
    gemm = 2.0 * n**3 / gemm_s
    conv_flops = 2.0 * batch * chans * size * size * chans * 9 / conv_s
    return {"gemm": gemm, "conv": conv_flops, "peak": max(gemm, conv_flops)}
