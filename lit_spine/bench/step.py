"""The training step the bench times: the real `SpineModule` step per precision and memory
format, the one plain PyTorch step it is compared with, the peak FLOP/s and MFU arithmetic.

Timing is `torch.utils.benchmark.Timer` (warm-up, adaptive block size, `num_threads`, CUDA
synchronisation); nothing here times by hand. Hand-written, because no library does it: the
variant set-up and the MFU arithmetic. FLOPs of a training step are the forward FLOPs that
`describe` counts (torch.utils.flop_counter, batch 1) times 3: the backward pass costs about
twice the forward (one product for the input gradient, one for the weight gradient per layer;
Kaplan et al. 2020 use the same 2x rule).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import benchmark

BACKWARD_FACTOR = 2.0  # backward FLOPs / forward FLOPs (see the module docstring)
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


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
        return "+".join(parts + ["cl"] * self.channels_last + ["compile"] * self.compile)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the convolutions run in."""
        return torch.bfloat16 if self.precision.startswith("bf16") else torch.float32


def suite_variant(cuda: bool) -> Variant:
    """How the suite trains on this device: precision and channels_last of its preset
    (experiments/gpu.yaml on a GPU, experiments/sweep_cpu.yaml on the CPU), resolved as
    `lit-spine fit` resolves them (bf16 falls back to fp32 on a CPU without native bf16)."""
    import yaml

    from lit_spine.hardware import resolve_precision

    preset = yaml.safe_load((EXPERIMENTS / ("gpu.yaml" if cuda else "sweep_cpu.yaml")).read_text())
    precision, _ = resolve_precision(
        (preset.get("trainer") or {}).get("precision", "32-true"), "gpu" if cuda else "cpu"
    )
    return Variant(precision, bool((preset.get("model") or {}).get("channels_last", False)))


def autocast(device: torch.device | str, variant: Variant) -> contextlib.AbstractContextManager:
    """The autocast context Lightning's MixedPrecision plugin opens around training_step."""
    if variant.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def make_batch(batch_size: int, image_size: int, device: torch.device, seed: int = 0) -> dict:
    """A synthetic training batch with the keys and shapes `SpineLoss` reads (stride 4).

    Step time does not depend on pixel values, so random images and targets do for timing.
    """
    from lit_spine.task import NUM_POINTS, get_vocabulary

    g = torch.Generator().manual_seed(seed)
    n, hm, classes = batch_size, image_size // 4, get_vocabulary("tianchi2020").num_classes
    batch = {
        "image": torch.rand(n, 1, image_size, image_size, generator=g),
        "heatmap": torch.rand(n, NUM_POINTS, hm, hm, generator=g),
        "points": torch.rand(n, NUM_POINTS, 2, generator=g) * (image_size - 1),
        "present": torch.ones(n, NUM_POINTS, dtype=torch.bool),
        "labels": torch.rand(n, NUM_POINTS, classes, generator=g) > 0.7,
    }
    return {k: v.to(device) for k, v in batch.items()}


def make_net(backbone: str, norm: str = "batchnorm", seed: int = 0):
    """(SpineNet with seeded weights, extra arguments used): GroupNorm falls back to 8-channel
    groups when 32 groups do not divide a backbone's channels (the suite's error suggests it)."""
    from lit_spine.models.net import SpineNet

    torch.manual_seed(seed)
    try:
        return SpineNet(backbone=backbone, norm=norm), {}
    except ValueError as err:
        if norm != "groupnorm" or "does not divide" not in str(err):
            raise
    torch.manual_seed(seed)
    return SpineNet(backbone=backbone, norm=norm, norm_group_size=8), {"norm_group_size": 8}


def build_module(backbone: str | torch.nn.Module, variant: Variant, device: torch.device | str):
    """A SpineModule around a SpineNet (seeded, for a backbone name) on `device`, after its own
    `configure_model` for `variant` (channels_last, compile). Constant lr and no SyncBatchNorm:
    no Trainer is attached to plan a schedule or report a world size."""
    from lit_spine.module import SpineModule

    net = make_net(backbone)[0] if isinstance(backbone, str) else backbone
    hp = {"channels_last": variant.channels_last, "compile": variant.compile}
    module = SpineModule(net, **hp, scheduler="constant", sync_batchnorm=False).to(device)
    module.configure_model()
    return module.train()


def suite_step(module, batch: dict, variant: Variant) -> Callable[[], None]:
    """One real `SpineModule.training_step` + backward + step of the optimizer the module
    configures (fused AdamW where no grad scaler runs, as in training), as a zero-argument call."""
    optimizer = module.configure_optimizers()

    def step() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer: a no-op that warns
            with autocast(module.device, variant):
                loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step.optimizer = optimizer  # for `held_memory_mb`
    return step


def plain_step(net, optimizer, loss_fn, batch: dict, scheduler=None, variant=Variant()) -> None:
    """The plain PyTorch training step: forward and SpineLoss (under `variant`'s autocast),
    backward, optimizer and scheduler step. The bench's one plain loop runs this."""
    with autocast(batch["image"].device, variant):
        loss = loss_fn(net(batch["image"], batch["points"]), batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def plain_fp32_step(backbone: str, batch: dict, device: torch.device) -> Callable[[], None]:
    """The same network trained by `plain_step` (no module, no autocast), as a zero-argument call."""
    from lit_spine.losses import SpineLoss

    net = make_net(backbone)[0].to(device).train()
    optimizer = torch.optim.AdamW(net.param_groups(1e-4), lr=1e-3)  # torch's default step
    loss_fn = SpineLoss(class_loss="bce")
    return lambda: plain_step(net, optimizer, loss_fn, batch)


def held_memory_mb(step: Callable[[], None]) -> float:
    """Tensor memory a training step holds, in MB, from one call of `step` (a `suite_step`):
    parameters, gradients and optimizer state after it, plus the activations autograd saved
    for the backward (`torch.autograd.graph.saved_tensors_hooks`), a bound of its peak."""

    def nbytes(tensors) -> int:  # by storage address: views and shared weights count once
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}
        return sum(s.nbytes() for s in storages.values())

    params = [p for group in step.optimizer.param_groups for p in group["params"]]
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved = []  # kept here to the end, so no address is reused among them

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    state = [v for s in step.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    grads = [p.grad for p in params if p.grad is not None]
    return sum(nbytes(ts) for ts in (params, grads, state, saved)) / 2**20


def time_call(fn: Callable, threads: int, min_run_time: float, warmup: int = 2) -> float:
    """Median seconds per call of `fn` (blocked_autorange for `min_run_time` s, after `warmup`
    untimed calls), or, with `min_run_time` 0, the seconds of exactly one call (a long job, or
    one step of several interleaved ones: `Timer.timeit` would add two untimed calls)."""
    for _ in range(warmup):
        fn()  # oneDNN primitives, optimizer state and compiled graphs are built in the warm-up
    if min_run_time <= 0:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # as Timer does: queued GPU work is part of the call
        return time.perf_counter() - start
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def forward_flops(backbone: str, image_size: int) -> float:
    """Forward FLOPs per image of SpineNet(backbone) at `image_size` (from `describe`)."""
    from lit_spine.models.summary import describe

    return float(describe(make_net(backbone)[0], input_size=image_size)["flops"])


def train_flops_per_image(forward: float) -> float:
    """Forward + backward FLOPs per image (backward ~ 2x forward)."""
    return forward * (1.0 + BACKWARD_FACTOR)


def peak_flops(
    device: torch.device, dtype: torch.dtype, threads: int, min_run_time: float, quick: bool
) -> dict[str, float]:
    """Measured FLOP/s of a dense GEMM and of a 3x3 convolution in `dtype`; 'peak' is the larger.

    Sizes are large enough to reach the BLAS/oneDNN steady state (smaller under `quick`).
    """
    cuda = device.type == "cuda"
    n = 512 if quick else (4096 if cuda else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    gemm_s = time_call(lambda: a @ b, threads, min_run_time)
    batch, chans, size = (2, 64, 16) if quick else ((32, 256, 32) if cuda else (8, 128, 32))
    conv = torch.nn.Conv2d(chans, chans, 3, padding=1, bias=False).to(device, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, chans, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv_s = time_call(lambda: conv(x), threads, min_run_time)
    gemm = 2.0 * n**3 / gemm_s
    conv_flops = 2.0 * batch * chans * size * size * chans * 9 / conv_s
    return {"gemm": gemm, "conv3x3": conv_flops, "peak": max(gemm, conv_flops)}
