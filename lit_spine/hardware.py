"""What this machine's CPU can do fast, and the precision and thread settings that follow.

bf16 autocast on a CPU is only faster where the CPU computes bf16 natively (AVX512-BF16 or
AMX); elsewhere oneDNN emulates it and it is slower than fp32, so a run that asks for bf16 on
such a CPU falls back to fp32 and says so in one line. Why bf16 is safe for this suite (which
ops stay fp32 under CPU autocast) is in docs/architecture.md.
"""

from __future__ import annotations

import contextlib

import torch

BF16_PRECISIONS = ("bf16-mixed", "bf16", "bf16-true")
FP32_PRECISION = "32-true"


def cpu_bf16_native() -> bool:
    """True when the CPU has AVX512-BF16 or AMX tiles (torch's own runtime check)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _accelerator_is_cpu(accelerator: str | None) -> bool:
    """Whether a Trainer `accelerator` value trains on the CPU ('auto' without a GPU)."""
    name = str(accelerator or "auto").lower()
    if name == "cpu":
        return True
    return name == "auto" and not torch.cuda.is_available()


def resolve_precision(precision: str | int | None, accelerator: str | None) -> tuple[str, str]:
    """(precision to use, one-line note or "") for a Trainer `precision` and `accelerator`.

    A bf16 precision on a CPU without native bf16 becomes "32-true"; everything else is kept.
    """
    value = str(precision) if precision is not None else FP32_PRECISION
    if value in BF16_PRECISIONS and _accelerator_is_cpu(accelerator) and not cpu_bf16_native():
        note = (
            f"trainer.precision={value}: this CPU has neither AVX512-BF16 nor AMX, so bf16 would "
            f"be emulated (slower than fp32); training in fp32 ({FP32_PRECISION}) instead"
        )
        return FP32_PRECISION, note
    return value, ""


def set_cpu_threads(threads: int) -> None:
    """Use `threads` intra-op threads and as many inter-op threads (two workers sharing two
    cores must not each start a pool sized for the whole machine)."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    # Only settable before the first inter-op parallel work; a process that already started
    # its pool keeps it (the intra-op threads, the ones that matter, are set above).
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
