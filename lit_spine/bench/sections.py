"""The sections of `lit-spine bench`, each timing the suite's own parts: the phantom generator
and cache builder, `SpineDataModule`'s loaders, `score_detections` and
`SpineModule.validation_step`, `SpineModule` under `pl.Trainer`, its training step per
backbone x norm and per precision, and `lit-spine fit` with the sweep preset.

Hand-written, because no library does it: the pairing (the sides of a ratio interleaved per
repeat, so load from other processes hits both alike), the one plain PyTorch loop that the
Lightning-overhead ratio compares with, and the time budget.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lit_spine import runs as run_folder
from lit_spine.bench import step as st
from lit_spine.bench.cases import benchmark_scoring, loader_throughput
from lit_spine.bench.record import Recorder

LIGHTNING_TARGET = 0.95  # Lightning images/s over plain-loop images/s
LOADER_TARGET = 10.0  # loader images/s over the fastest backbone's training images/s
METRIC_TARGET_S = 1.0  # seconds to score 10,000 studies
PHANTOM_TARGET_S = 120.0  # seconds to generate 200 studies with every core
STEP_TARGET = 1.4  # the suite's ResNet-18 step (its preset's precision) over a plain fp32 loop
SWEEP_TARGET = 1.5  # one sweep-preset run, old preset's wall time over today's
# experiments/sweep_cpu.yaml before the performance work (commit 160c282), as overrides of
# today's: fp32, NCHW, validation and a last.ckpt every epoch.
OLD_SWEEP_PRESET = (
    "--trainer.precision=32-true",
    "--model.channels_last=false",
    "--trainer.check_val_every_n_epoch=1",
    "--checkpoint.save_last=true",
)


@dataclass
class Bench:
    """What the sections share: sizes (`run.SIZES`), device, work folder, recorder, deadline."""

    cfg: SimpleNamespace
    device: torch.device
    workdir: Path
    rec: Recorder
    deadline: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def variant(self) -> st.Variant:
        """How the Lightning, validation and grid sections train: bf16 + channels_last on a
        GPU (experiments/gpu.yaml), fp32 NCHW on the CPU (the Trainer's default)."""
        return st.Variant("bf16-mixed", True) if self.cuda else st.Variant()

    def out_of_time(self, spent: list[float], what: str) -> bool:
        """Whether the next of a series of parts (`spent`: seconds of each so far) would not
        fit in `--max-minutes`; noted when so."""
        left = self.deadline - time.perf_counter()
        if max(spent, default=0.0) * 1.2 <= left:
            return False
        self.rec.note(f"{what}: skipped, {left:.0f} s left of --max-minutes")
        return True

    def clock(self) -> float:
        """perf_counter after the queued CUDA work, so GPU times are real."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @cached_property
    def data_root(self) -> Path:
        """A phantom of `cfg.data_studies` training studies, generated on first use."""
        from lit_spine.phantom.generate import generate_phantom

        n, size, workers = self.cfg.data_studies, self.cfg.phantom_size, os.cpu_count() or 1
        return generate_phantom(
            self.workdir / "data", n, splits={"train": n}, size=size, workers=workers
        )

    def datamodule(self, batch_size: int, workers: int = 0, items: int = 0):
        """`SpineDataModule` over the bench phantom, set up for fit; its training split is
        listed as often as one epoch needs to hold `items` images ('train,train,...')."""
        from lit_spine.data.datamodule import SpineDataModule

        train = ",".join(["train"] * max(1, math.ceil(items / self.cfg.data_studies)))
        dm = SpineDataModule(
            str(self.data_root), train_split=train, val_split="train", test_split="train",
            image_size=self.cfg.image_size, batch_size=batch_size, num_workers=workers,
            cache_dir=str(self.workdir / "cache"), seed=0,
        )  # fmt: skip
        dm.setup("fit")
        return dm

    def to_device(self, batch: dict) -> dict:
        """The tensors of a batch on the bench's device (Lightning's batch transfer)."""
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def timed(fn: Callable[[], object]) -> float:
    """Seconds of exactly one call of `fn` (a fresh phantom, one pass over the images)."""
    return st.time_call(fn, torch.get_num_threads(), 0.0, warmup=0)


def images_per_s(n: int, fn: Callable[[], object], min_run_time: float = 0.0) -> float:
    """`n` images over the seconds of `fn`: one call, or `blocked_autorange`'s median."""
    return n / st.time_call(fn, torch.get_num_threads(), min_run_time, warmup=0)


def interleaved(calls: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, list]:
    """Each call's results over `repeats` rounds, the order reversed every other round
    (A B C, C B A, ...), so that machine load hits every side alike."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
            out[name].append(calls[name]())
    return out


# ---------------------------------------------------------------------------- data
def bench_phantom(b: Bench) -> None:
    """A whole dataset (200 studies) with every core against the 2-minute target; phantom
    generation (studies/s, one worker) and cache build (files/s, studies/s) per repeat."""
    from lit_spine.data.cache import CacheSettings, build_cache
    from lit_spine.phantom.generate import generate_phantom

    cfg, rec, size = b.cfg, b.rec, b.cfg.phantom_size
    n, workers, root = cfg.phantom_batch, os.cpu_count() or 1, b.workdir / "phantom-dataset"
    seconds = timed(lambda: generate_phantom(root, n, size=size, workers=workers))
    shutil.rmtree(root)
    f = rec.figure("phantom_dataset", "s", [seconds], studies=n, workers=workers, repeats=1)
    why = f"the generator is slower than 200 studies in 2 min on {workers} cores"
    note = f"measured on {n} studies (--quick)" if n != 200 else ""
    rec.bound("phantom_200_studies_target", f, PHANTOM_TARGET_S, why, note)
    gen, files, studies, n_files = [], [], [], []
    n, settings = cfg.phantom_studies, CacheSettings(image_size=cfg.image_size)
    for r in range(cfg.repeats):
        root = b.workdir / f"phantom-{r}"  # a fresh folder: a finished phantom is never re-timed
        split = {"train": n}
        gen.append(n / timed(lambda: generate_phantom(root, n, r, split, size=size)))  # noqa: B023
        n_files.append(sum(1 for p in (root / "train").rglob("*") if p.is_file()))
        t0 = time.perf_counter()
        cache = build_cache(root / "train", settings, cache_dir=b.workdir / "cache", progress=False)
        seconds = time.perf_counter() - t0
        files.append(n_files[-1] / seconds)
        studies.append(len(cache) / seconds)
        shutil.rmtree(root)
    size = f"{size} px" if size else "random challenge-like sizes (384-640 px)"
    extra = {"studies_per_repeat": n, "workers": 1, "image_size": size}
    rec.figure("phantom_generation", "studies/s", gen, **extra)
    extra = {"dicom_files_per_repeat": int(statistics.median(n_files))}
    rec.figure("cache_build_files", "files/s", files, **extra, cache_image_size=cfg.image_size)
    rec.figure("cache_build_studies", "studies/s", studies, studies_per_repeat=n)


def bench_io(b: Bench) -> None:
    """Reading a cached image vs decoding + windowing + resizing its DICOM slice (the cache
    builder's own pydicom decode, percentile window and letterbox), per image."""
    import numpy as np

    from lit_spine.data.cache import letterbox, percentile_normalise
    from lit_spine.data.dicom import decode_pixels, index_study

    cache = b.datamodule(1).val_dataset.cache
    paths = []  # found once, outside the timing: the alternative is not charged for it
    for i, record in enumerate(cache.records):
        study = index_study(b.data_root / "train" / record["folder"], workers=1)
        if (found := study.find_instance(record["instance_uid"])) is None:
            raise RuntimeError(
                f"{cache.path}: instance {record['instance_uid']} of row {i} not found"
            )
        paths.append(str(found[0].slices[found[1]].path))
    settings = cache.settings

    def read_cache() -> None:
        for row in range(len(paths)):
            torch.from_numpy(np.asarray(cache.images[row], dtype=np.float32))

    def decode() -> None:
        for path in paths:
            stack = percentile_normalise(decode_pixels(path)[None], settings.percentiles, 0)
            torch.from_numpy(letterbox(stack, settings.image_size)[0])

    read_cache()  # page the memory map in: training reads it warm from the second epoch
    calls = {"cache_read": read_cache, "dicom_decode": decode}
    rates = interleaved(
        {k: partial(images_per_s, len(paths), f) for k, f in calls.items()}, b.cfg.repeats
    )
    extra = {"images_per_repeat": len(paths), "image_size": b.cfg.image_size}
    fc = b.rec.figure("cache_read", "images/s", rates["cache_read"], **extra)
    fd = b.rec.figure("dicom_decode", "images/s", rates["dicom_decode"], **extra)
    b.rec.ratio("cache_read_vs_dicom_decode", fc, fd)


def bench_loader(b: Bench) -> None:
    """`SpineDataModule.train_dataloader` (augmented, over the cache), no model: 0, 2 workers."""
    cfg, warmup = b.cfg, 2
    items = cfg.batch_size * (cfg.loader_batches + warmup)
    for workers in (0, 2):
        rates = []
        for _ in range(cfg.repeats):
            loader = b.datamodule(cfg.batch_size, workers, items).train_dataloader()
            rates.append(loader_throughput(loader, cfg.loader_batches, warmup))
            del loader  # its worker processes end here
        extra = {"batch": cfg.batch_size, "batches": cfg.loader_batches, "augment": True}
        b.rec.figure(
            f"loader_workers{workers}", "images/s", rates, **extra, image_size=cfg.image_size
        )


def bench_metric(b: Bench) -> None:
    """Scoring 10,000 studies; what `SpineModule.validation_step` costs per validation epoch
    beyond the net's forward (decoding, selection, loss, metric update and compute)."""
    cfg, rec = b.cfg, b.rec
    seconds = [benchmark_scoring(cfg.metric_studies, seed=r, repeats=1) for r in range(cfg.repeats)]
    f = rec.figure("metric_score_10k", "s", seconds, studies=cfg.metric_studies)
    note = f"measured on {cfg.metric_studies} studies (--quick)" if cfg.quick else ""
    why = "score_detections is slower than 1 s per 10,000 studies here"
    rec.bound("metric_score_10k_target", f, METRIC_TARGET_S, why, note)

    module = st.build_module(cfg.loop_backbone, b.variant, b.device).eval()
    dm = b.datamodule(min(8, cfg.data_studies))
    batches = [b.to_device(batch) for batch in dm.val_dataloader()]
    marks: list[float] = []  # -start and end of each forward of the net in validation_step
    module.net.register_forward_pre_hook(lambda *_: marks.append(-b.clock()))
    module.net.register_forward_hook(lambda *_: marks.append(b.clock()))
    forward_s, metric_s = [], []
    for r in range(cfg.repeats + 1):  # the first epoch warms up and is not counted
        marks.clear()
        t0 = b.clock()
        with torch.inference_mode(), st.autocast(b.device, b.variant), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer: a no-op that warns
            for i, batch in enumerate(batches):
                module.validation_step(batch, i)
            module.val_metric.compute()
            module.val_metric.reset()
        if r:
            forward_s.append(sum(marks))
            metric_s.append(b.clock() - t0 - sum(marks))
    extra = {"val_studies": len(dm.val_dataset), "backbone": cfg.loop_backbone}
    extra["image_size"] = cfg.image_size
    includes = "validation_step beyond the forward (decode, select, loss, update), compute"
    fm = rec.figure("metric_per_val_epoch", "s", metric_s, **extra, includes=includes)
    ff = rec.figure("val_forward_per_epoch", "s", forward_s, **extra)
    rec.ratio("metric_vs_val_forward", fm, ff)


# ---------------------------------------------------------------------------- training
def _fit(b: Bench, plain: bool, seed: int) -> tuple[float, float]:
    """(images/s after the warm-up step, seconds of it all, model and loader included) of
    `lightning_steps` + 1 steps of SpineModule: under `pl.Trainer`, or with `plain` in the
    bench's one plain PyTorch loop (the same net, seed, loader, optimizer and schedule: what
    `configure_optimizers` builds for max_steps=steps, built here as no Trainer is attached)."""
    import pytorch_lightning as pl

    from lit_spine.bench.run import quiet_lightning
    from lit_spine.module import (
        DropBlockSchedule,
        SpineModule,
        ThroughputMonitor,
        warmup_cosine_schedule,
    )

    t0, batch_size, steps, ends = b.clock(), b.cfg.batch_size, b.cfg.lightning_steps + 1, []
    net = st.make_net(b.cfg.loop_backbone, seed=seed)[0]
    module = SpineModule(net, channels_last=b.cuda, sync_batchnorm=False)  # one device
    loader = b.datamodule(batch_size, items=batch_size * steps).train_dataloader()
    if plain:
        module.to(b.device).train().configure_model()  # channels_last on a GPU
        hp = module.hparams
        groups = module.spine_net.param_groups(hp.weight_decay, hp.norm_weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, fused=module._fused_adamw())
        scheduler = warmup_cosine_schedule(optimizer, steps - 1, steps, hp.min_lr_ratio)
        for batch in loader:
            batch = b.to_device(batch)
            st.plain_step(module, optimizer, module.loss_fn, batch, scheduler, b.variant)
            ends.append(b.clock())
            if len(ends) == steps:
                break
    else:

        class StepEnds(pl.Callback):
            def on_train_batch_end(self, *args) -> None:
                ends.append(b.clock())

        callbacks = [StepEnds(), DropBlockSchedule(), ThroughputMonitor()]
        with quiet_lightning():
            trainer = pl.Trainer(
                accelerator="gpu" if b.cuda else "cpu", devices=1, max_steps=steps,
                precision=b.variant.precision, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                callbacks=callbacks,
            )  # fmt: skip
            trainer.fit(module, train_dataloaders=loader)
    if len(ends) != steps:
        side = "the plain loop" if plain else "Lightning"
        raise RuntimeError(f"{side} ran {len(ends)} steps, expected {steps}")
    return (steps - 1) * batch_size / (ends[-1] - ends[0]), b.clock() - t0


def bench_lightning(b: Bench) -> None:
    """SpineModule under pl.Trainer vs the plain loop, in ABBA order (L P, P L, L P, ...)."""
    cfg, rec, seeds = b.cfg, b.rec, iter(range(2 * b.cfg.repeats))

    def fit(plain: bool) -> tuple[float, float]:
        return _fit(b, plain, seed=next(seeds) // 2)  # both sides of round r: seed r

    sides = {False: partial(fit, False), True: partial(fit, True)}
    runs = interleaved(sides, cfg.repeats)
    extra = {
        "backbone": cfg.loop_backbone, "batch": cfg.batch_size, "timed_steps": cfg.lightning_steps,
        "warmup_steps": 1, "image_size": cfg.image_size, "precision": b.variant.name,
    }  # fmt: skip
    fl = rec.figure("train_lightning", "images/s", [x[0] for x in runs[False]], **extra)
    fp = rec.figure("train_plain_loop", "images/s", [x[0] for x in runs[True]], **extra)
    what = (
        "fit() wall time minus the plain loop's (model, optimizer, loader and all steps "
        "included in both): Trainer set-up and teardown per run"
    )
    overhead = [a[1] - p[1] for a, p in zip(runs[False], runs[True])]
    rec.figure("lightning_run_overhead", "s", overhead, what=what)
    why = (
        f"under pl.Trainer the steps ran at {fl.median / fp.median:.3f} of the plain loop's "
        "speed: Lightning's per-step loop, hooks, logging and batch prefetching, plus the "
        "noise of a shared CPU (see the paired per-repeat range)"
    )
    rec.ratio("lightning_vs_plain", fl, fp, LIGHTNING_TARGET, why)


def _grid_cells(b: Bench, backbone: str, batch: dict) -> dict[str, tuple]:
    """Per norm: (training step, figure context with its peak memory), each built and warmed
    up; a norm the backbone does not admit is noted and left out."""
    cells = {}
    for norm in b.cfg.norms:
        try:
            net, norm_args = st.make_net(backbone, norm)
        except ValueError as err:
            b.rec.note(f"grid/{backbone}/{norm}: not built: {err}")
            continue
        fn = st.suite_step(st.build_module(net, b.variant, b.device), batch, b.variant)
        params = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
        more = {"batch": len(batch["image"]), "image_size": b.cfg.image_size, "params_m": params}
        # The warm-up step, which also creates the optimizer state, counts the memory held.
        cells[norm] = (fn, more | {"peak_mem_mb": st.held_memory_mb(fn), **norm_args})
    return cells


def bench_grid(b: Bench) -> None:
    """Training images/s and peak memory per backbone x norm: the real SpineModule step at the
    default size. Per backbone every norm's module is built and warmed up (peak memory
    measured then), and the timed steps go round-robin over the norms (BN, GN, LN, IN, BN,
    ...), so the cost ratios between norms come from the same moments of machine load."""
    cfg, rec = b.cfg, b.rec
    batch, spent = st.make_batch(cfg.grid_batch, cfg.image_size, b.device), []
    for backbone in cfg.backbones:
        t0, cells, skipped = time.perf_counter(), {}, "time budget"
        if not b.out_of_time(spent, f"grid/{backbone}"):
            cells, skipped = _grid_cells(b, backbone, batch), "not supported"
        calls = {norm: partial(images_per_s, cfg.grid_batch, fn) for norm, (fn, _) in cells.items()}
        rates = interleaved(calls, cfg.repeats)
        for norm in cfg.norms:
            more = cells[norm][1] if norm in cells else {"skipped": skipped}
            name = f"grid/{backbone}/{norm}"
            rec.figure(name, "images/s", rates.get(norm, []), backbone=backbone, norm=norm, **more)
        base = rec.get(f"grid/{backbone}/batchnorm")
        for norm in (n for n in cells if n != "batchnorm" and base is not None and base.values):
            meaning = f"{norm} step time / batchnorm step time (above 1: slower)"
            fig = rec.get(f"grid/{backbone}/{norm}")
            rec.ratio(f"grid_cost/{backbone}/{norm}_vs_batchnorm", base, fig, meaning=meaning)
        del cells, calls  # this backbone's modules go before the next one's are built
        spent.append(time.perf_counter() - t0)
    if spent:
        rec.note(
            "grid peak_mem_mb: tensor memory of the training step at its peak: the net, its "
            "gradients, optimizer state and the activations saved for the backward"
        )


def _peak_flops(b: Bench, bf16: bool) -> dict[torch.dtype, float]:
    """The machine's measured peak FLOP/s per dtype (fp32, and bf16 where native), recorded."""
    cfg, threads, peak = b.cfg, torch.get_num_threads(), {}
    for dtype in (torch.float32, torch.bfloat16)[: 1 + bf16]:
        runs = [
            st.peak_flops(b.device, dtype, threads, cfg.step_min_run_s, cfg.quick)
            for _ in range(cfg.repeats)
        ]
        extra = {
            f"{k}_gflops": statistics.median(r[k] for r in runs) / 1e9 for k in ("gemm", "conv3x3")
        }
        extra["threads"] = threads
        extra["what"] = "max of a dense GEMM and a 3x3 convolution (channels_last) in this dtype"
        name = "fp32" if dtype == torch.float32 else "bf16"
        fig = b.rec.figure(
            f"peak_flops/{name}", "GFLOP/s", [r["peak"] / 1e9 for r in runs], **extra
        )
        peak[dtype] = fig.median * 1e9
    return peak


def bench_precision(b: Bench) -> None:
    """The real SpineModule training step per precision x memory format against the plain
    fp32 step of the same net, the machine's peak FLOP/s, and MFU per backbone x precision.
    The variants of one backbone are interleaved per repeat (A B C .. then .. C B A)."""
    from lit_spine.hardware import cpu_bf16_native

    cfg, rec, threads = b.cfg, b.rec, torch.get_num_threads()
    bf16, suite = b.cuda or cpu_bf16_native(), st.suite_variant(b.cuda)
    precisions = ("32-true", "bf16-mixed")[: 1 + bf16]
    variants = [st.Variant(p, cl) for p in precisions for cl in (False, True)]
    if not bf16:
        rec.note("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 variants not measured")
    peak = _peak_flops(b, bf16)
    batch, spent = st.make_batch(cfg.step_batch, cfg.step_image_size, b.device), []
    for backbone in cfg.step_backbones:
        if b.out_of_time(spent, f"step/{backbone}"):
            continue
        t0 = time.perf_counter()
        train_flops = st.train_flops_per_image(st.forward_flops(backbone, cfg.step_image_size))
        # Compiling takes minutes per network: only the first backbone gets a compiled step.
        compiled = [st.Variant(suite.precision, suite.channels_last, compile=True)]
        steps = {}
        for v in variants + compiled * (cfg.compile and not spent):
            steps[v.name] = (v, st.suite_step(st.build_module(backbone, v, b.device), batch, v))
        steps["plain_fp32"] = (st.Variant(), st.plain_fp32_step(backbone, batch, b.device))
        for _, fn in steps.values():
            fn(), fn()  # warm-up: later repeats reuse the primitives and optimizer state
        n, min_run = cfg.step_batch, cfg.step_min_run_s
        calls = {name: partial(images_per_s, n, fn, min_run) for name, (_, fn) in steps.items()}
        rates = interleaved(calls, cfg.repeats)
        for name, (variant, _) in steps.items():
            achieved = statistics.median(rates[name]) * train_flops
            what = "SpineModule.training_step + backward + its configured optimizer"
            extra = {
                "backbone": backbone, "variant": name,
                "what": "plain PyTorch loop, fp32 NCHW" if name == "plain_fp32" else what,
                "batch": cfg.step_batch, "image_size": cfg.step_image_size, "threads": threads,
                "train_gflop_per_image": train_flops / 1e9, "achieved_gflops": achieved / 1e9,
                "mfu": achieved / peak[variant.dtype],
            }  # fmt: skip
            rec.figure(f"step/{backbone}/{name}", "images/s", rates[name], **extra)
        plain = rec.get(f"step/{backbone}/plain_fp32")
        for name in list(steps)[:-1]:
            ratio, fig = f"step_vs_plain_fp32/{backbone}/{name}", rec.get(f"step/{backbone}/{name}")
            if backbone == "resnet18" and name == suite.name:
                why = f"the suite's step ({name}) is not {STEP_TARGET}x the plain fp32 loop here"
                meaning = "the suite's training step (as its CPU/GPU preset runs it)"
                rec.ratio(ratio, fig, plain, STEP_TARGET, why, meaning=meaning)
            else:
                rec.ratio(ratio, fig, plain)
        del steps, calls
        spent.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------- sweep run
def _sweep_fit(b: Bench, overrides, tag: str) -> tuple[float, Path]:
    """Wall seconds and run folder of one `lit-spine fit` with the sweep preset, in a child
    process with one `make sweep` worker's share of the threads (as the sweep runs it)."""
    runs, threads = b.workdir / "sweep-runs" / tag, str(max(1, (os.cpu_count() or 1) // 2))
    env = {**os.environ, "WANDB_MODE": "disabled", "LIT_SPINE_RUN_DIR": str(runs)}
    env |= {k: threads for k in ("LIT_SPINE_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    phantom = b.cfg.sweep_phantom_dir or b.workdir / "sweep-phantom"
    command = [sys.executable, "-m", "lit_spine", "fit"]
    command += ["--config", str(st.EXPERIMENTS / "base.yaml")]
    command += ["--config", str(st.EXPERIMENTS / "sweep_cpu.yaml"), *overrides]
    command += [f"--data.phantom_dir={phantom}", f"--data.cache_dir={b.workdir / 'sweep-cache'}"]
    command += ["--wandb=disabled", *b.cfg.sweep_overrides]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        tail = "\n".join(done.stderr.splitlines()[-5:])
        raise RuntimeError(f"sweep-preset run {tag} exited {done.returncode}: {tail}")
    return seconds, runs


def diagnostics_share(run: Path) -> float:
    """Percent of a fit the Diagnostics callback took (its `cost` in diagnostics.json); NaN
    when the run wrote no diagnostics (switched off, or the fit was too short)."""
    cost = run_folder.read_json(Path(run) / "diagnostics.json").get("cost") or {}
    try:
        return 100.0 * float(cost["fraction_of_fit"])
    except (KeyError, TypeError, ValueError):
        return math.nan


def bench_sweep(b: Bench) -> None:
    """One sweep-preset run end to end (data ready): today's preset against the preset as it
    was before the performance work (fp32, NCHW, validation and last.ckpt every epoch)."""
    if b.cuda:
        b.rec.note("sweep: experiments/sweep_cpu.yaml is a CPU preset; not run with --device cuda")
        return
    _sweep_fit(b, ["--trainer.fast_dev_run=1"], "warm-up")  # phantom + cache, untimed
    figs, overrides = {}, " ".join(b.cfg.sweep_overrides) or "none"
    for name, preset in {"sweep_run/old_fp32": OLD_SWEEP_PRESET, "sweep_run/new": ()}.items():
        seconds, run = _sweep_fit(b, preset, name.split("/")[1])  # one repeat: minutes each
        if (summary := run_folder.read_summary(run)) is None:
            raise RuntimeError(f"{run}: the fit left no readable summary.json; see its log")
        what = "before: " + " ".join(preset) if preset else "today"
        figs[name] = b.rec.figure(name, "s", [seconds], overrides=overrides, preset=what)
        ips = summary.get("images_per_s") or math.nan
        b.rec.figure(f"{name}/images_per_s", "images/s", [ips], preset=what)
        per_epoch = summary["runtime_s"] / max(1, summary["epochs"])
        b.rec.figure(f"{name}/s_per_epoch", "s", [per_epoch], preset=what)
        meaning = "Diagnostics callback's seconds / the whole fit (issue: < 10%)"
        b.rec.figure(
            f"{name}/diagnostics_pct", "%", [diagnostics_share(run)], preset=what, meaning=meaning
        )
    why = "one sweep-preset run end to end is not 1.5x faster than with the old preset"
    meaning = "old preset's wall seconds / today's (process start to exit, data ready)"
    b.rec.ratio("sweep_run_speedup", *figs.values(), SWEEP_TARGET, why, meaning=meaning)


def derived_ratios(b: Bench) -> None:
    """Loader throughput (SpineDataModule's default 2 workers, and 0) vs the fastest training."""
    rec, loaders = b.rec, [b.rec.get("loader_workers2"), b.rec.get("loader_workers0")]
    grid = [f for f in rec.figures if f.name.startswith("grid/") and f.name.endswith("/batchnorm")]
    training = [f for f in [rec.get("train_plain_loop"), rec.get("train_lightning"), *grid] if f]
    training = [f for f in training if f.values]
    if None in loaders or not training:
        return
    rec.section, fastest = "loader", max(training, key=lambda f: f.median)
    why = (
        "the augmented loader (SpineDataModule's default 2 workers) cannot feed the fastest "
        "backbone ten times over on this machine"
    )
    name = {"fastest_training": fastest.name}
    rec.ratio("loader_vs_fastest_training", loaders[0], fastest, LOADER_TARGET, why, **name)
    rec.ratio("loader_workers0_vs_fastest_training", loaders[1], fastest, **name)


SECTION_FUNCS = {
    "phantom": bench_phantom, "io": bench_io, "loader": bench_loader, "metric": bench_metric,
    "lightning": bench_lightning, "grid": bench_grid, "precision": bench_precision,
    "sweep": bench_sweep,
}  # fmt: skip
