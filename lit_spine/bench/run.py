"""`lit-spine bench` end to end: the sizes of each section for the device (`--quick` shrinks
them), the sections in turn (a failing one is noted, the others still run), the reports."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

CPU_BACKBONES = ("resnet18", "mobilenetv3_large_100", "convnext_atto")
GPU_BACKBONES = ("resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_large_100")
NORMS = ("batchnorm", "groupnorm", "layernorm", "instancenorm")
# The size of each section: (with --quick, on a GPU, on the CPU). An option of the same name
# given on the command line wins.
SIZES: dict[str, tuple] = {
    "repeats": (2, 5, 5),
    "image_size": (64, 256, 256),
    "phantom_studies": (1, 6, 6),  # per repeat of the phantom section
    "phantom_size": (128, None, None),  # None: random challenge-like sizes
    "phantom_batch": (4, 200, 200),  # the one-shot "whole dataset" phantom figure
    "data_studies": (4, 96, 24),  # the phantom the data sections read; one validation epoch
    "loader_batches": (3, 32, 8),
    "batch_size": (2, 32, 8),  # loader, Lightning and validation sections
    "lightning_steps": (1, 20, 3),
    "grid_batch": (2, 32, 4),
    "loop_backbone": ("mobilenetv3_small_100",) * 3,  # Lightning-vs-plain and validation
    "backbones": (("mobilenetv3_small_100",), GPU_BACKBONES, CPU_BACKBONES),  # grid
    "norms": (NORMS[:2], NORMS, NORMS),  # grid
    "metric_studies": (1000, 10000, 10000),
    "step_backbones": (("resnet18",), CPU_BACKBONES, CPU_BACKBONES),  # precision section
    "step_batch": (2, 32, 8),  # the sweep preset's batch and image size on the CPU
    "step_image_size": (64, 256, 128),
    "step_min_run_s": (0.2, 2.0, 2.0),  # blocked_autorange's min_run_time per repeat
}
# The quick sweep section: 3+ batches, as ThroughputMonitor skips the first 2.
QUICK_SWEEP = ("--trainer.max_epochs=1", "--data.image_size=64", "--data.phantom_studies=10")
QUICK_SWEEP += ("--data.batch_size=2",)


def bench_config(args: Any, cuda: bool) -> SimpleNamespace:
    """The sizes for this device (`SIZES`), overridden by the command line; compile (default
    on CUDA only) and the sweep runs' extra options and phantom."""
    column = 0 if args.quick else 1 if cuda else 2
    cfg = {k: getattr(args, k, None) or v[column] for k, v in SIZES.items()}
    cfg["compile"] = cuda if args.compile is None else args.compile
    cfg["sweep_overrides"] = QUICK_SWEEP if args.quick else ()
    if args.sweep_epochs and not args.quick:
        cfg["sweep_overrides"] = (f"--trainer.max_epochs={args.sweep_epochs}",)
    phantom = Path("data/phantom")  # `make phantom`'s, when there is one
    cfg["sweep_phantom_dir"] = (
        str(phantom.resolve()) if phantom.is_dir() and not args.quick else None
    )
    return SimpleNamespace(**cfg, quick=args.quick)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info banners and the tiny-run warnings of a benchmark."""
    loggers = [
        logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")
    ]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def run_bench(args: Any, sections: Sequence[str]) -> int:
    """Run `sections`; print JSON lines and a summary; write the reports; 1 if one failed.

    `args`: the checked options of `lit-spine bench` (lit_spine.commands.bench)."""
    import torch

    from lit_spine.bench import record
    from lit_spine.bench.sections import SECTION_FUNCS, Bench, derived_ratios
    from lit_spine.utils import atomic_write_json

    start = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lit-spine bench: --device cuda asked for, but torch sees no CUDA GPU")
    name = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    device = torch.device(name)
    cfg = bench_config(args, device.type == "cuda")
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lit-spine-bench-", dir=args.workdir))
    rec = record.Recorder()
    bench = Bench(cfg, device, workdir, rec, deadline=start + 60 * args.max_minutes)
    failed = False
    try:
        for section in sections:
            t0, rec.section = time.perf_counter(), section
            try:
                SECTION_FUNCS[section](bench)
            except Exception as err:  # noqa: BLE001 - one broken part must not hide the rest
                failed = True
                rec.note(f"section {section!r} failed: {type(err).__name__}: {err}")
            print(f"# {section}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        derived_ratios(bench)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds, info = time.perf_counter() - start, record.machine_info(device)
    where = f"{info.get('gpu') or info['cpu']} ({info['device']})"
    body = record.run_markdown(rec, info, seconds, cfg)
    print(f"\nlit-spine bench on {where}, {seconds:.0f} s\n\n{body}", flush=True)
    if args.json_out:
        figures = [f.record() | {"values": f.values} for f in rec.figures]
        atomic_write_json(
            args.json_out,
            {
                "machine": info,
                "seconds": seconds,
                "config": vars(cfg),
                "figures": figures,
                "ratios": rec.ratios,
                "notes": rec.notes,
            },
        )
    if args.out:
        record.write_markdown(Path(args.out), body, gpu_run=device.type == "cuda")
        print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0
