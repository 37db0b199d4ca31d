"""`lit-spine bench`: time the suite against the obvious alternatives, side by side, in one run.

Every figure is measured here, now, on this machine; nothing is extrapolated or copied in
(the one exception, timm's published encoder throughput, is labelled as such). A figure is
the median of `--repeats` runs with their min and max; a ratio is the ratio of two medians
taken in the same run, with the runs of both sides interleaved (A, B, A, B, ...) so that
load from other processes on a shared machine hits both sides alike.

What is compared (`--only` picks sections by name):

- ``phantom``   phantom generation (studies/s) and cache build (DICOM files/s, studies/s);
- ``io``        reading a cached image vs decoding its DICOM slice (the same pydicom decode,
                percentile window and letterbox resize the cache builder uses) each epoch;
- ``loader``    the augmented training loader over the cache (0 and 2 workers), no model;
- ``metric``    scoring 10,000 studies, and the in-training metric's cost per validation
                epoch against the validation forward pass of the same epoch;
- ``lightning`` `SpineModule` under `pl.Trainer` vs a plain PyTorch loop doing the same
                steps (same net and seed, same loader, optimizer and schedule);
- ``grid``      training images/s and peak memory per backbone x norm at the default size;
- ``precision`` the real `SpineModule` step in fp32/bf16 x NCHW/channels_last (and compiled)
                vs a plain fp32 loop, the measured peak FLOP/s and MFU (lit_spine/perf.py);
- ``sweep``     one sweep-preset run end to end, today's preset vs the one before bf16.

Output: one JSON line per figure on stdout, then a readable summary; `--out` writes
Markdown (atomically), `--json-out` all figures as JSON. The run keeps to `--max-minutes`
by skipping the remaining grid cells (reported as skipped) when time runs short.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_spine import runs as run_folder
from lit_spine.utils import git_state

if TYPE_CHECKING:
    import numpy as np
    from torch.utils.data import DataLoader

    from lit_spine.metrics import GroundTruthArrays, PredictionArrays
    from lit_spine.task import Vocabulary

SECTIONS = ("phantom", "io", "loader", "metric", "lightning", "grid", "precision", "sweep")
DEFAULT_BACKBONES_CPU = ("resnet18", "mobilenetv3_large_100", "convnext_atto")
DEFAULT_BACKBONES_GPU = ("resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_large_100")
DEFAULT_NORMS = ("batchnorm", "groupnorm", "layernorm", "instancenorm")
GPU_BEGIN, GPU_END = "<!-- gpu -->", "<!-- /gpu -->"
CPU_BEGIN, CPU_END = "<!-- cpu -->", "<!-- /cpu -->"

# Ratio targets from the issue: (figure, target, direction).
LIGHTNING_TARGET = 0.95  # Lightning images/s over plain-loop images/s
LOADER_TARGET = 10.0  # loader images/s over the fastest backbone's training images/s
METRIC_TARGET_S = 1.0  # seconds to score 10,000 studies
PHANTOM_TARGET_S = 120.0  # seconds to generate 200 studies with every core
STEP_TARGET = 1.4  # the suite's ResNet-18 step (its preset's precision) over a plain fp32 loop
SWEEP_TARGET = 1.5  # one sweep-preset run, old preset's wall time over today's
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# experiments/sweep_cpu.yaml before the performance work (commit 160c282), as overrides of
# today's: fp32, NCHW, validation and a last.ckpt every epoch.
OLD_SWEEP_PRESET = (
    "--trainer.precision=32-true",
    "--model.channels_last=false",
    "--trainer.check_val_every_n_epoch=1",
    "--checkpoint.save_last=true",
)

# timm's own published benchmark CSVs (huggingface/pytorch-image-models, results/), copied
# verbatim for comparison: samples/s of the bare encoder at the stated size and batch.
TIMM_PUBLISHED = {
    "train": {
        "source": "results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv",
        "gpu": "RTX 3090, AMP, NCHW, PyTorch 1.12, CUDA 11.3",
        "rows": {  # model: (samples/s, batch, image size)
            "mobilenetv3_small_100": (5749.13, 512, 224),
            "resnet18": (2764.22, 512, 224),
            "mobilenetv3_large_100": (2167.29, 512, 224),
            "efficientnet_b0": (1459.11, 384, 224),
        },
    },
    "infer": {
        "source": "results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv",
        "gpu": "RTX 4090, AMP, NCHW, PyTorch 2.4.0, CUDA 12.4",
        "rows": {
            "mobilenetv3_small_100": (43953.49, 1024, 224),
            "mobilenetv3_large_100": (14191.17, 1024, 224),
            "resnet18": (13537.15, 1024, 224),
            "convnext_atto": (12819.99, 1024, 224),
            "efficientnet_b0": (7082.56, 1024, 256),
        },
    },
}


# ---------------------------------------------------------------------------- figures
def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (NaN for none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


@dataclass
class Figure:
    """One measured quantity: repeated values, a unit, and context (batch, backbone, ...)."""

    name: str
    unit: str
    values: list[float]
    section: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return summarize(self.values)["median"]

    def record(self) -> dict[str, Any]:
        """The JSON line of this figure."""
        s = summarize(self.values)
        return {
            "figure": self.name,
            "median": _clean(s["median"]),
            "min": _clean(s["min"]),
            "max": _clean(s["max"]),
            "unit": self.unit,
            "n": s["n"],
            "section": self.section,
            **self.extra,
        }


def check_target(value: float, target: float, higher_is_better: bool = True) -> bool:
    """Whether `value` meets `target` (>= when higher is better, else <); NaN never does."""
    if value is None or not math.isfinite(value):
        return False
    return value >= target if higher_is_better else value < target


def ratio_record(
    name: str,
    numerator: Figure,
    denominator: Figure,
    target: float | None = None,
    higher_is_better: bool = True,
    why: str = "",
    section: str = "",
) -> dict[str, Any]:
    """A ratio of two medians from the same run, with its target and, when missed, why."""
    num, den = numerator.median, denominator.median
    value = num / den if den and math.isfinite(den) and math.isfinite(num) else math.nan
    rec: dict[str, Any] = {
        "figure": name,
        "ratio": _clean(value),
        "numerator": numerator.name,
        "denominator": denominator.name,
        "unit": "x",
        "section": section,
    }
    paired = [a / b for a, b in zip(numerator.values, denominator.values) if b]
    if len(paired) == len(numerator.values) == len(denominator.values) and paired:
        s = summarize(paired)  # per-repeat ratios: spread of the interleaved pairs
        rec["paired_min"], rec["paired_max"] = _clean(s["min"]), _clean(s["max"])
    if target is not None:
        rec["target"] = target
        rec["target_op"] = ">=" if higher_is_better else "<"
        rec["meets"] = check_target(value, target, higher_is_better)
        if not rec["meets"]:
            rec["why"] = why or "measured below the target on this machine"
        lo, hi = rec.get("paired_min"), rec.get("paired_max")
        if lo is not None and hi is not None and lo < target <= hi:
            # Single repeats fell on both sides: the verdict is within this machine's noise.
            rec["straddles_target"] = True
    return rec


def _clean(v: Any) -> Any:
    """JSON-safe float (NaN/inf -> None), rounded to 6 significant digits."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return v


class Recorder:
    """Collects figures and ratios and prints each as one JSON line as soon as it exists."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.figures: list[Figure] = []
        self.ratios: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.stream = stream or sys.stdout
        self.quiet = quiet

    def figure(self, fig: Figure) -> Figure:
        """Record and print a figure."""
        self.figures.append(fig)
        self._emit(fig.record())
        return fig

    def ratio(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Record and print a ratio line."""
        self.ratios.append(rec)
        self._emit(rec)
        return rec

    def note(self, text: str) -> None:
        """A remark for the report (a skipped section, a fallback, a breakage)."""
        self.notes.append(text)
        print(f"# note: {text}", file=sys.stderr)

    def get(self, name: str) -> Figure | None:
        """The figure called `name`, if measured."""
        return next((f for f in self.figures if f.name == name), None)

    def _emit(self, rec: dict[str, Any]) -> None:
        if not self.quiet:
            print(json.dumps(rec), file=self.stream, flush=True)


# ---------------------------------------------------------------------------- timing helpers
class Clock:
    """perf_counter that first waits for queued CUDA work, so GPU times are real."""

    def __init__(self, device) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or on Linux the process's peak
    resident set size (VmHWM) after resetting it via /proc/self/clear_refs, minus the
    resident size at the start. Elsewhere, the lifetime peak RSS (`exact` False)."""

    def __init__(self, device) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.baseline_mb = 0.0
        self.peak_mb = math.nan
        self.exact = True

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
            return self
        _malloc_trim()  # hand freed heap pages back, so the baseline is memory in use
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline_mb = _proc_status_mb("VmRSS")
        except OSError:
            self.exact = False
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.exact:
            self.peak_mb = _proc_status_mb("VmHWM")
        else:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = rss / 2**20 if sys.platform == "darwin" else rss / 1024

    @property
    def added_mb(self) -> float:
        """Peak above the memory held when the block started."""
        return self.peak_mb - self.baseline_mb if self.exact else math.nan

    @property
    def what(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated above the allocation at the start of the cell"
        if self.exact:
            return (
                "peak resident set size (VmHWM, reset per cell after malloc_trim) above "
                "the RSS at the start of the cell"
            )
        return "process lifetime peak RSS (no per-cell reset on this OS)"


def _malloc_trim() -> None:
    """glibc `malloc_trim(0)`; a no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024  # kB
    raise OSError(f"/proc/self/status has no {key}")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info banners and the tiny-run warnings of a benchmark."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


# ---------------------------------------------------------------------------- settings
@dataclass
class BenchConfig:
    """Sizes of every section; `quick` shrinks them for tests."""

    repeats: int
    image_size: int
    phantom_studies: int  # per repeat
    phantom_size: int | None
    loader_batches: int
    batch_size: int
    lightning_steps: int
    val_studies: int
    grid_batch: int
    loop_backbone: str
    backbones: tuple[str, ...]
    norms: tuple[str, ...]
    metric_studies: int = 10000
    phantom_batch: int = 200  # studies of the one-shot "whole dataset" phantom figure
    quick: bool = False
    step_backbones: tuple[str, ...] = ("resnet18",)  # the precision section's backbones
    step_batch: int = 8  # the sweep preset's batch and image size
    step_image_size: int = 128
    step_min_run_s: float = 2.0  # blocked_autorange's min_run_time per repeat
    compile: bool = False  # also time the suite's variant under torch.compile
    sweep_repeats: int = 1
    sweep_overrides: tuple[str, ...] = ()  # extra `lit-spine fit` options of the sweep runs
    sweep_phantom_dir: str | None = None  # None: a phantom built in the work folder

    @classmethod
    def from_args(cls, args: Any, cuda: bool) -> BenchConfig:
        """Defaults for the device, overridden by the command line."""
        quick = args.quick
        backbones = args.backbones or (
            ("mobilenetv3_small_100",)
            if quick
            else DEFAULT_BACKBONES_GPU
            if cuda
            else DEFAULT_BACKBONES_CPU
        )
        norms = args.norms or (("batchnorm", "groupnorm") if quick else DEFAULT_NORMS)
        return cls(
            repeats=args.repeats or (2 if quick else 5),
            image_size=args.image_size or (64 if quick else 256),
            phantom_studies=1 if quick else 6,
            phantom_size=128 if quick else None,
            loader_batches=3 if quick else (32 if cuda else 8),
            batch_size=args.batch_size or (2 if quick else (32 if cuda else 8)),
            lightning_steps=1 if quick else (20 if cuda else 3),
            val_studies=4 if quick else (96 if cuda else 24),
            grid_batch=args.grid_batch or (2 if quick else (32 if cuda else 4)),
            loop_backbone=args.loop_backbone or "mobilenetv3_small_100",
            backbones=tuple(backbones),
            norms=tuple(norms),
            metric_studies=1000 if quick else 10000,
            phantom_batch=4 if quick else 200,
            quick=quick,
            step_backbones=tuple(
                args.step_backbones
                or (
                    ("resnet18",)
                    if quick
                    else ("resnet18", "mobilenetv3_large_100", "convnext_atto")
                )
            ),
            step_batch=2 if quick else (32 if cuda else 8),
            step_image_size=64 if quick else (256 if cuda else 128),
            step_min_run_s=0.2 if quick else 2.0,
            compile=args.compile if args.compile is not None else cuda,
            sweep_repeats=1,
            sweep_overrides=(
                ("--trainer.max_epochs=1", "--data.image_size=64", "--data.phantom_studies=10")
                + ("--data.batch_size=2",)  # 3+ batches: ThroughputMonitor skips the first 2
                if quick
                else (f"--trainer.max_epochs={args.sweep_epochs}",)
                if args.sweep_epochs
                else ()
            ),
            sweep_phantom_dir=None
            if quick or not Path("data/phantom").is_dir()
            else str(Path("data/phantom").resolve()),
        )


class Bench:
    """State shared by the sections: device, work folder, caches, deadline, recorder."""

    def __init__(self, cfg: BenchConfig, device, workdir: Path, rec: Recorder, deadline: float):
        self.cfg = cfg
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = Clock(device)
        self.workdir = workdir
        self.rec = rec
        self.deadline = deadline
        self.phantom_roots: list[Path] = []
        self.caches: list = []
        self.train_cache = None

    def time_left(self) -> float:
        """Seconds until the run's deadline."""
        return self.deadline - time.perf_counter()

    # -------------------------------------------------------------- shared builders
    def ensure_data(self) -> None:
        """Phantom + caches for the sections that need data (built by `phantom` if it ran)."""
        if self.train_cache is None:
            bench_phantom(self, record=False)

    def make_net(self, backbone: str, norm: str = "batchnorm", seed: int = 0):
        """A SpineNet with seeded weights; GroupNorm falls back to 8-channel groups when 32
        groups do not divide a backbone's channels (the suite's own error suggests this)."""
        import torch

        from lit_spine.models.net import SpineNet

        torch.manual_seed(seed)
        try:
            return SpineNet(backbone=backbone, norm=norm), {}
        except ValueError as err:
            if norm != "groupnorm" or "does not divide" not in str(err):
                raise
        torch.manual_seed(seed)
        return SpineNet(backbone=backbone, norm=norm, norm_group_size=8), {"norm_group_size": 8}

    def train_dataset(self, augment: bool = True, length: int | None = None):
        """The augmented training dataset over the bench cache (rows repeated to `length`)."""
        import numpy as np

        from lit_spine.data.datamodule import SpineDataset
        from lit_spine.data.transforms import AugmentConfig, SpineAugment

        n = len(self.train_cache)
        indices = None if length is None else np.resize(np.arange(n), length)
        return SpineDataset(
            self.train_cache,
            indices,
            stride=4,
            augment=SpineAugment(AugmentConfig()) if augment else None,
            seed=0,
        )

    def train_loader(self, batch_size: int, workers: int = 0, length: int | None = None):
        """DataLoader as `SpineDataModule.train_dataloader` builds it (seeded epoch sampler)."""
        from torch.utils.data import DataLoader

        from lit_spine.data.datamodule import EpochSampler

        ds = self.train_dataset(length=length)
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=EpochSampler(ds, shuffle=True, seed=0, pad=True),
            num_workers=workers,
            pin_memory=self.cuda,
            persistent_workers=False,
            drop_last=len(ds) > batch_size,
        )


def to_device(batch: dict, device) -> dict:
    """Move the tensors of a batch to `device` (what Lightning's batch transfer does)."""
    import torch

    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


# ---------------------------------------------------------------------------- sections
def _bench_phantom_dataset(b: Bench) -> None:
    """One whole dataset (200 studies) generated with every core, against the 2-minute target."""
    from lit_spine.phantom.generate import generate_phantom

    n, workers = b.cfg.phantom_batch, os.cpu_count() or 1
    root = b.workdir / "phantom-dataset"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    generate_phantom(root, studies=n, seed=0, size=b.cfg.phantom_size, workers=workers)
    seconds = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    context = {"studies": n, "workers": workers, "repeats": 1}
    b.rec.figure(Figure("phantom_dataset", "s", [seconds], "phantom", context))
    meets = check_target(seconds, PHANTOM_TARGET_S, higher_is_better=False)
    b.rec.ratio(
        {
            "figure": "phantom_200_studies_target",
            "value": _clean(seconds),
            "unit": "s",
            "target": PHANTOM_TARGET_S,
            "target_op": "<",
            "section": "phantom",
            "meets": meets,
            **(
                {}
                if meets
                else {
                    "why": f"the generator is slower than 200 studies in 2 min on {workers} cores"
                }
            ),
            **({"note": f"measured on {n} studies (--quick)"} if n != 200 else {}),
        }
    )


def bench_phantom(b: Bench, record: bool = True) -> None:
    """Phantom generation (studies/s) and cache build (files/s, studies/s), per repeat."""
    from lit_spine.data.cache import CacheSettings, build_cache
    from lit_spine.data.datamodule import ConcatCache
    from lit_spine.phantom.generate import generate_phantom

    cfg = b.cfg
    gen_rate, files_rate, study_rate, n_files = [], [], [], []
    roots, caches = [], []
    settings = CacheSettings(image_size=cfg.image_size)
    for r in range(cfg.repeats):
        root = b.workdir / f"phantom-{r}"  # a fresh folder: a finished phantom is never re-timed
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        generate_phantom(
            root,
            studies=cfg.phantom_studies,
            seed=r,
            splits={"train": cfg.phantom_studies},
            size=cfg.phantom_size,
        )
        gen_rate.append(cfg.phantom_studies / (time.perf_counter() - t0))
        files = sum(1 for p in (root / "train").rglob("*") if p.is_file())
        t0 = time.perf_counter()
        cache = build_cache(root / "train", settings, cache_dir=b.workdir / "cache", progress=False)
        dt = time.perf_counter() - t0
        files_rate.append(files / dt)
        study_rate.append(len(cache) / dt)
        n_files.append(files)
        roots.append(root)
        caches.append(cache)
    b.phantom_roots, b.caches = roots, caches
    b.train_cache = caches[0] if len(caches) == 1 else ConcatCache(caches)
    if not record:
        return
    _bench_phantom_dataset(b)
    size = (
        "random challenge-like sizes (384-640 px)"
        if cfg.phantom_size is None
        else f"{cfg.phantom_size} px"
    )
    b.rec.figure(
        Figure(
            "phantom_generation",
            "studies/s",
            gen_rate,
            "phantom",
            {"studies_per_repeat": cfg.phantom_studies, "workers": 1, "image_size": size},
        )
    )
    b.rec.figure(
        Figure(
            "cache_build_files",
            "files/s",
            files_rate,
            "phantom",
            {
                "dicom_files_per_repeat": int(statistics.median(n_files)),
                "cache_image_size": cfg.image_size,
            },
        )
    )
    b.rec.figure(
        Figure(
            "cache_build_studies",
            "studies/s",
            study_rate,
            "phantom",
            {"studies_per_repeat": cfg.phantom_studies},
        )
    )


def _slice_paths(b: Bench) -> list[tuple[int, str]]:
    """(cache row, DICOM path of its chosen slice) for every row of the bench cache."""
    from lit_spine.data.dicom import index_study

    out, offset = [], 0
    for root, cache in zip(b.phantom_roots, b.caches):
        for i, record in enumerate(cache.records):
            study = index_study(root / "train" / record["folder"], workers=1)
            found = study.find_instance(record["instance_uid"])
            if found is None:
                raise RuntimeError(
                    f"{root}: instance {record['instance_uid']} of cache row {i} not found"
                )
            series, index = found
            out.append((offset + i, str(series.slices[index].path)))
        offset += len(cache)
    return out


def bench_io(b: Bench) -> None:
    """Reading a cached image vs decoding + windowing + resizing its DICOM slice, per image."""
    import numpy as np
    import torch

    from lit_spine.data.cache import letterbox, percentile_normalise
    from lit_spine.data.dicom import decode_pixels

    b.ensure_data()
    cfg = b.cfg
    rows = _slice_paths(b)  # found once, outside the timing: the alternative is not charged
    settings = b.caches[0].settings
    images = b.train_cache.images

    def read_cache() -> None:
        for row, _ in rows:
            torch.from_numpy(np.asarray(images[row], dtype=np.float32))

    def decode() -> None:
        for _, path in rows:
            stack = decode_pixels(path)[None]
            stack = percentile_normalise(stack, settings.percentiles, 0)
            image, _, _ = letterbox(stack, settings.image_size)
            torch.from_numpy(image)

    read_cache()  # page the memory map in: training reads it warm from the second epoch
    cache_rate, decode_rate = [], []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        read_cache()
        cache_rate.append(len(rows) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        decode()
        decode_rate.append(len(rows) / (time.perf_counter() - t0))
    extra = {"images_per_repeat": len(rows), "image_size": cfg.image_size}
    fc = b.rec.figure(Figure("cache_read", "images/s", cache_rate, "io", extra))
    fd = b.rec.figure(Figure("dicom_decode", "images/s", decode_rate, "io", extra))
    b.rec.ratio(ratio_record("cache_read_vs_dicom_decode", fc, fd, section="io"))


# Inputs and timers for the bench alone (and the tests that check them): an evaluation set
# of random studies, the scoring time, and a loader's throughput.
def random_case(
    n_studies: int, seed: int = 0, vocab: str | Vocabulary = "tianchi2020"
) -> tuple[GroundTruthArrays, PredictionArrays, np.ndarray]:
    """A random but realistic evaluation set of the tianchi2020 task: 11 GT points per study
    (a few missing, some multi-label), 11-20 noisy predictions per study (duplicates, extra
    labels), anisotropic spacing. Used by the benchmark and the tests."""
    import numpy as np

    from lit_spine.metrics import GroundTruthArrays, PredictionArrays
    from lit_spine.task import get_task, get_vocabulary

    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    spec = get_task("tianchi2020")
    n_points, disc_points = spec.num_points, spec.points_of_kind("disc")
    rng = np.random.default_rng(seed)
    n_vert, n_classes = len(vocab.vertebra), vocab.num_classes
    spacing = rng.uniform(0.55, 1.0, size=(n_studies, 2))
    # Anatomy-like layout: points stacked top to bottom, 18 px apart, jittered per study.
    base = np.stack(
        [
            rng.uniform(100, 160, (n_studies, n_points)),
            60.0 + np.arange(n_points) * 18.0 + rng.normal(0, 3, (n_studies, n_points)),
        ],
        axis=-1,
    )
    study = np.repeat(np.arange(n_studies), n_points)
    point = np.tile(np.arange(n_points), n_studies)
    keep = rng.random(len(study)) > 0.03
    study, point = study[keep], point[keep]
    is_disc = np.isin(point, disc_points)
    lo, hi = np.where(is_disc, n_vert, 0), np.where(is_disc, n_classes, n_vert)
    labels = np.zeros((len(point), n_classes), dtype=bool)
    labels[np.arange(len(point)), rng.integers(lo, hi)] = True
    extra = rng.random(len(point)) < 0.08
    labels[np.flatnonzero(extra), rng.integers(lo, hi)[extra]] = True
    gt = GroundTruthArrays(study, point, base[study, point], labels)

    n_pred = rng.integers(11, 21, size=n_studies)
    p_study = np.repeat(np.arange(n_studies), n_pred)
    p_point = rng.integers(0, n_points, size=len(p_study))
    p_disc = np.isin(p_point, disc_points)
    p_cls = rng.integers(np.where(p_disc, n_vert, 0), np.where(p_disc, n_classes, n_vert))
    p_xy = base[p_study, p_point] + rng.normal(0, 5, (len(p_study), 2))
    score = np.round(rng.random(len(p_point)), 3)
    pred = PredictionArrays(p_study, p_point, p_cls, p_xy, score)
    return gt, pred, spacing


def benchmark_scoring(n_studies: int = 10000, seed: int = 0, repeats: int = 3) -> float:
    """Seconds `score_detections` takes for `n_studies` random studies (best of `repeats`)."""
    from lit_spine.metrics import score_detections

    gt, pred, spacing = random_case(n_studies, seed)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        score_detections(gt, pred, spacing)
        best = min(best, time.perf_counter() - start)
    return best


def loader_throughput(loader: DataLoader, batches: int | None = None, warmup: int = 2) -> float:
    """Images per second one pass of `loader` delivers (after `warmup` batches)."""
    n_images, start = 0, None
    for b, batch in enumerate(loader):
        if b == warmup:
            start, n_images = time.perf_counter(), 0
        n_images += int(batch["image"].shape[0])
        if batches is not None and b + 1 >= warmup + batches:
            break
    if start is None:
        return math.nan
    return n_images / max(time.perf_counter() - start, 1e-9)


def bench_loader(b: Bench) -> None:
    """The augmented training loader over the cache, without a model, 0 and 2 workers."""
    b.ensure_data()
    cfg = b.cfg
    warmup = 2
    length = cfg.batch_size * (cfg.loader_batches + warmup)
    for workers in (0, 2):
        rates = []
        for _ in range(cfg.repeats):
            loader = b.train_loader(cfg.batch_size, workers, length=length)
            rates.append(loader_throughput(loader, batches=cfg.loader_batches, warmup=warmup))
            del loader
        b.rec.figure(
            Figure(
                f"loader_workers{workers}",
                "images/s",
                rates,
                "loader",
                {
                    "batch": cfg.batch_size,
                    "batches": cfg.loader_batches,
                    "augment": True,
                    "image_size": cfg.image_size,
                },
            )
        )


def bench_metric(b: Bench) -> None:
    """Scoring 10,000 studies; the in-training metric's cost per validation epoch."""
    import torch

    from lit_spine.losses import class_probabilities
    from lit_spine.metrics import (
        SpineDetectionMetric,
        decode_heatmaps,
        select_predictions,
    )

    cfg = b.cfg
    score_s = [benchmark_scoring(cfg.metric_studies, seed=r, repeats=1) for r in range(cfg.repeats)]
    f = b.rec.figure(
        Figure(
            "metric_score_10k",
            "s",
            score_s,
            "metric",
            {"studies": cfg.metric_studies},
        )
    )
    b.rec.ratio(
        {
            "figure": "metric_score_10k_target",
            "value": _clean(f.median),
            "unit": "s",
            "target": METRIC_TARGET_S,
            "target_op": "<",
            "section": "metric",
            "meets": check_target(f.median, METRIC_TARGET_S, higher_is_better=False),
            **(
                {}
                if check_target(f.median, METRIC_TARGET_S, False)
                else {"why": "score_detections is slower than 1 s per 10,000 studies here"}
            ),
            **(
                {"note": f"measured on {cfg.metric_studies} studies (--quick)"}
                if cfg.metric_studies != 10000
                else {}
            ),
        }
    )

    b.ensure_data()
    net, _ = b.make_net(cfg.loop_backbone)
    net = net.to(b.device).eval()
    if b.cuda:
        net = net.to(memory_format=torch.channels_last)
    ds = b.train_dataset(augment=False, length=cfg.val_studies)
    loader = torch.utils.data.DataLoader(ds, batch_size=min(8, cfg.val_studies))
    batches = [to_device(batch, b.device) for batch in loader]
    metric = SpineDetectionMetric(vocab=net.vocabulary.name).to(b.device)
    forward_s, metric_s = [], []
    autocast = _autocast(b)
    for r in range(cfg.repeats + 1):  # the first epoch warms up and is not counted
        fwd = met = 0.0
        for batch in batches:
            t0 = b.clock()
            with torch.no_grad(), autocast():
                images = batch["image"]
                if b.cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                outputs = net(images)
            t1 = b.clock()
            points, scores = decode_heatmaps(outputs["heatmaps"].float(), net.heatmap_stride)
            probs = class_probabilities(outputs, True)
            rows = select_predictions(
                points, scores, probs["vertebra"].float(), probs["disc"].float(), net.vocabulary
            )
            metric.update(
                *rows,
                gt_points=batch["points"],
                gt_present=batch["present"],
                gt_labels=batch["labels"],
                spacing_mm=batch["spacing_mm"],
            )
            t2 = b.clock()
            fwd, met = fwd + (t1 - t0), met + (t2 - t1)
        t0 = b.clock()
        metric.compute()
        metric.reset()
        met += b.clock() - t0
        if r:
            forward_s.append(fwd)
            metric_s.append(met)
    extra = {
        "val_studies": cfg.val_studies,
        "backbone": cfg.loop_backbone,
        "image_size": cfg.image_size,
    }
    fm = b.rec.figure(
        Figure(
            "metric_per_val_epoch",
            "s",
            metric_s,
            "metric",
            {
                **extra,
                "includes": "decode_heatmaps + select_predictions + update per batch, compute",
            },
        )
    )
    ff = b.rec.figure(Figure("val_forward_per_epoch", "s", forward_s, "metric", extra))
    b.rec.ratio(ratio_record("metric_vs_val_forward", fm, ff, section="metric"))


def _autocast(b: Bench) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA, nothing on the CPU."""
    import torch

    if b.cuda:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


class _StepClock:
    """Stand-in for the few Trainer attributes `SpineModule.configure_optimizers` reads, so
    the plain loop gets the identical optimizer and schedule (max_steps runs: max_epochs -1)."""

    def __init__(self, steps: int) -> None:
        self.estimated_stepping_batches = steps
        self.max_epochs = -1
        self.world_size = 1


def _module(b: Bench, seed: int):
    """A fresh SpineModule around a seeded SpineNet (bf16 + channels_last on CUDA)."""
    from lit_spine.module import SpineModule

    net, _ = b.make_net(b.cfg.loop_backbone, seed=seed)
    return SpineModule(net, channels_last=b.cuda)


def _run_lightning(b: Bench, steps: int, seed: int) -> tuple[float, float]:
    """(images/s after the warm-up step, whole fit() seconds) of SpineModule under pl.Trainer."""
    import pytorch_lightning as pl

    from lit_spine.module import DropBlockSchedule, ThroughputMonitor

    cfg = b.cfg
    clock = b.clock
    ends: list[float] = []

    class StepEnds(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            ends.append(clock())

    module = _module(b, seed)
    loader = b.train_loader(cfg.batch_size)
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="gpu" if b.cuda else "cpu",
            devices=1,
            precision="bf16-mixed" if b.cuda else "32-true",
            max_steps=steps + 1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[StepEnds(), DropBlockSchedule(), ThroughputMonitor()],
        )
        t0 = clock()
        trainer.fit(module, train_dataloaders=loader)
        total = clock() - t0
    if len(ends) != steps + 1:
        raise RuntimeError(f"Lightning ran {len(ends)} steps, expected {steps + 1}")
    return steps * cfg.batch_size / (ends[-1] - ends[0]), total


def _run_plain(b: Bench, steps: int, seed: int) -> tuple[float, float]:
    """(images/s after the warm-up step, whole-run seconds) of a plain PyTorch loop doing
    the same steps: forward, SpineLoss, backward, optimizer step, zero_grad, scheduler step."""
    import torch

    cfg = b.cfg
    clock = b.clock
    t_start = clock()
    module = _module(b, seed).to(b.device)
    if b.cuda:
        module.net = module.net.to(memory_format=torch.channels_last)
    module.trainer = _StepClock(steps + 1)
    try:
        opt_cfg = module.configure_optimizers()
    finally:
        module.trainer = None
    optimizer = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    scheduler = opt_cfg["lr_scheduler"]["scheduler"] if isinstance(opt_cfg, dict) else None
    loader = b.train_loader(cfg.batch_size)
    autocast = _autocast(b)
    module.train()
    ends: list[float] = []
    epoch = 0
    while len(ends) < steps + 1:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = to_device(batch, b.device)
            with autocast():
                outputs = module(batch["image"], batch["points"])
                loss = module.loss_fn(outputs, batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            ends.append(clock())
            if len(ends) == steps + 1:
                break
        epoch += 1
    return steps * cfg.batch_size / (ends[-1] - ends[0]), clock() - t_start


def bench_lightning(b: Bench) -> None:
    """SpineModule under pl.Trainer vs a plain loop, interleaved L, P, L, P, ..."""
    b.ensure_data()
    cfg = b.cfg
    steps = cfg.lightning_steps
    lit, plain, lit_total, plain_total = [], [], [], []
    for r in range(cfg.repeats):
        # ABBA order (L P, P L, L P, ...): neither side always runs first, after the other.
        for side in ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning"):
            if side == "lightning":
                ips, total = _run_lightning(b, steps, seed=r)
                lit.append(ips)
                lit_total.append(total)
            else:
                ips, total = _run_plain(b, steps, seed=r)
                plain.append(ips)
                plain_total.append(total)
    extra = {
        "backbone": cfg.loop_backbone,
        "batch": cfg.batch_size,
        "timed_steps": steps,
        "warmup_steps": 1,
        "image_size": cfg.image_size,
        "precision": "bf16-mixed, channels_last" if b.cuda else "fp32",
    }
    fl = b.rec.figure(Figure("train_lightning", "images/s", lit, "lightning", extra))
    fp = b.rec.figure(Figure("train_plain_loop", "images/s", plain, "lightning", extra))
    b.rec.figure(
        Figure(
            "lightning_run_overhead",
            "s",
            [a - p for a, p in zip(lit_total, plain_total)],
            "lightning",
            {
                "what": "fit() wall time minus the plain loop's (model, optimizer, loader and all "
                f"{steps + 1} steps included in both): Trainer set-up and teardown per run"
            },
        )
    )
    ratio = fl.median / fp.median if fp.median else math.nan
    b.rec.ratio(
        ratio_record(
            "lightning_vs_plain",
            fl,
            fp,
            LIGHTNING_TARGET,
            section="lightning",
            why=(
                f"under pl.Trainer the steps ran at {ratio:.3f} of the plain loop's speed: "
                "Lightning's per-step loop, hooks, logging and batch prefetching, plus the "
                "noise of a shared CPU (see the paired per-repeat range)"
                if math.isfinite(ratio)
                else ""
            ),
        )
    )


def _grid_cell(b: Bench, backbone: str, norm: str, images, batch, loss_fn) -> dict:
    """Build one backbone x norm net and run its warm-up step, measuring peak memory."""
    import torch

    with PeakMemory(b.device) as mem:
        net, norm_args = b.make_net(backbone, norm)
        net = net.to(b.device).train()
        if b.cuda:
            net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(net.param_groups(1e-4), lr=1e-3)
        cell = {"net": net, "optimizer": optimizer, "norm_args": norm_args, "rates": []}
        _grid_step(b, cell, images, batch, loss_fn)  # warm-up: also creates the AdamW state
    cell["peak_mem_mb"] = mem.added_mb
    cell["memory_what"] = mem.what
    return cell


def _grid_step(b: Bench, cell: dict, images, batch, loss_fn) -> float:
    """One training step of a grid cell; returns its seconds."""
    net, optimizer = cell["net"], cell["optimizer"]
    t0 = b.clock()
    with _autocast(b)():
        out = net(images, batch["points"])
        loss = loss_fn(out, batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return b.clock() - t0


def bench_grid(b: Bench) -> None:
    """Training images/s and peak memory per backbone x norm (plain step, default size).

    Per backbone, every norm's net is built and warmed up (peak memory measured then), and
    the timed steps go round-robin over the norms (BN, GN, LN, IN, BN, ...), so the cost
    ratios between norms come from the same moments of machine load.
    """
    import torch

    from lit_spine.losses import SpineLoss

    b.ensure_data()
    cfg = b.cfg
    loader = b.train_loader(cfg.grid_batch, length=max(cfg.grid_batch * 2, len(b.train_cache)))
    batch = to_device(next(iter(loader)), b.device)
    images = batch["image"]
    if b.cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    loss_fn = SpineLoss(class_loss="bce")
    spent: list[float] = []
    memory_what = ""
    for backbone in cfg.backbones:
        guess = max(spent, default=0.0) * 1.2
        if guess > b.time_left():
            b.rec.note(
                f"grid/{backbone}: skipped, about {guess:.0f} s needed but "
                f"{b.time_left():.0f} s left of --max-minutes"
            )
            for norm in cfg.norms:
                b.rec.figure(
                    Figure(
                        f"grid/{backbone}/{norm}",
                        "images/s",
                        [],
                        "grid",
                        {"backbone": backbone, "norm": norm, "skipped": "time budget"},
                    )
                )
            continue
        t_backbone = time.perf_counter()
        cells: dict[str, dict] = {}
        for norm in cfg.norms:
            try:
                cells[norm] = _grid_cell(b, backbone, norm, images, batch, loss_fn)
                memory_what = cells[norm]["memory_what"]
            except ValueError as err:  # a norm the backbone does not admit
                b.rec.note(f"grid/{backbone}/{norm}: not built: {err}")
        for _ in range(cfg.repeats):
            for cell in cells.values():
                cell["rates"].append(cfg.grid_batch / _grid_step(b, cell, images, batch, loss_fn))
        for norm in cfg.norms:
            cell = cells.get(norm)
            extra = {"backbone": backbone, "norm": norm}
            if cell is None:
                b.rec.figure(
                    Figure(
                        f"grid/{backbone}/{norm}",
                        "images/s",
                        [],
                        "grid",
                        {**extra, "skipped": "not supported"},
                    )
                )
                continue
            params = sum(p.numel() for p in cell["net"].parameters())
            b.rec.figure(
                Figure(
                    f"grid/{backbone}/{norm}",
                    "images/s",
                    cell["rates"],
                    "grid",
                    {
                        **extra,
                        "batch": cfg.grid_batch,
                        "image_size": cfg.image_size,
                        "params_m": round(params / 1e6, 2),
                        "peak_mem_mb": _clean(cell["peak_mem_mb"]),
                        **cell["norm_args"],
                    },
                )
            )
        base = b.rec.get(f"grid/{backbone}/batchnorm")
        for norm in cfg.norms:
            f = b.rec.get(f"grid/{backbone}/{norm}")
            if norm == "batchnorm" or base is None or not base.values or not f.values:
                continue
            rec = ratio_record(f"grid_cost/{backbone}/{norm}_vs_batchnorm", base, f, section="grid")
            rec["meaning"] = f"{norm} step time / batchnorm step time (above 1: slower)"
            b.rec.ratio(rec)
        del cells
        spent.append(time.perf_counter() - t_backbone)
    if memory_what:
        b.rec.note(
            f"grid peak_mem_mb: {memory_what}; the net, its gradients, AdamW state "
            "and one step's activations"
        )


# ---------------------------------------------------------------------------- precision, MFU
def suite_variant(cuda: bool):
    """How the suite trains on this device: precision and channels_last of its preset
    (experiments/gpu.yaml on a GPU, experiments/sweep_cpu.yaml on the CPU), resolved as
    `lit-spine fit` resolves them (bf16 falls back to fp32 on a CPU without native bf16)."""
    import yaml

    from lit_spine.hardware import resolve_precision
    from lit_spine.perf import Variant

    preset = yaml.safe_load((EXPERIMENTS / ("gpu.yaml" if cuda else "sweep_cpu.yaml")).read_text())
    precision, _ = resolve_precision(
        (preset.get("trainer") or {}).get("precision", "32-true"), "gpu" if cuda else "cpu"
    )
    return Variant(precision, bool((preset.get("model") or {}).get("channels_last", False)))


def bench_precision(b: Bench) -> None:
    """The real SpineModule training step per precision x memory format against a plain fp32
    loop of the same net, the machine's peak FLOP/s, and MFU per backbone x precision.

    Timed with torch.utils.benchmark (blocked_autorange); the variants of one backbone are
    interleaved per repeat (A B C .. then .. C B A) so machine load hits them alike.
    """
    import torch

    from lit_spine import perf
    from lit_spine.hardware import cpu_bf16_native

    cfg = b.cfg
    threads = torch.get_num_threads()
    bf16 = b.cuda or cpu_bf16_native()
    suite = suite_variant(b.cuda)
    variants = [perf.Variant(), perf.Variant(channels_last=True)]
    if bf16:
        variants += [perf.Variant("bf16-mixed"), perf.Variant("bf16-mixed", channels_last=True)]
    else:
        b.rec.note("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 variants not measured")
    compiled = perf.Variant(suite.precision, suite.channels_last, compile=True)
    peak: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        runs = [
            perf.peak_flops(b.device, dtype, threads, cfg.step_min_run_s, cfg.quick)
            for _ in range(cfg.repeats)
        ]
        name = "fp32" if dtype == torch.float32 else "bf16"
        fig = b.rec.figure(
            Figure(
                f"peak_flops/{name}",
                "GFLOP/s",
                [r["peak"] / 1e9 for r in runs],
                "precision",
                {
                    "gemm_gflops": _clean(statistics.median(r["gemm"] for r in runs) / 1e9),
                    "conv3x3_gflops": _clean(statistics.median(r["conv"] for r in runs) / 1e9),
                    "threads": threads,
                    "what": "max of a dense GEMM and a 3x3 convolution (channels_last) "
                    "microbenchmark in this dtype",
                },
            )
        )
        peak[dtype] = fig.median * 1e9
    batch = perf.make_batch(cfg.step_batch, cfg.step_image_size, b.device)
    spent: list[float] = []
    for backbone in cfg.step_backbones:
        if max(spent, default=0.0) * 1.2 > b.time_left():
            b.rec.note(f"step/{backbone}: skipped, too little of --max-minutes left")
            continue
        t0 = time.perf_counter()
        train_flops = perf.train_flops_per_image(perf.forward_flops(backbone, cfg.step_image_size))
        # Compiling takes minutes per network: only the first backbone gets a compiled step.
        chosen = variants + ([compiled] if cfg.compile and not spent else [])
        steps = {v.name: (v, perf.suite_step(backbone, v, batch, b.device)) for v in chosen}
        steps["plain_fp32"] = (perf.Variant(), perf.plain_step(backbone, batch, b.device))
        for _, fn in steps.values():
            fn()
            fn()  # warm-up once: later repeats reuse the primitives and optimizer state
        rates: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(cfg.repeats):
            for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                seconds = perf.time_call(steps[name][1], threads, cfg.step_min_run_s, warmup=0)
                rates[name].append(cfg.step_batch / seconds)
        for name, (variant, _) in steps.items():
            achieved = statistics.median(rates[name]) * train_flops
            b.rec.figure(
                Figure(
                    f"step/{backbone}/{name}",
                    "images/s",
                    rates[name],
                    "precision",
                    {
                        "backbone": backbone,
                        "variant": name,
                        "what": "plain PyTorch loop, fp32 NCHW"
                        if name == "plain_fp32"
                        else "SpineModule.training_step + backward + AdamW",
                        "batch": cfg.step_batch,
                        "image_size": cfg.step_image_size,
                        "threads": threads,
                        "train_gflop_per_image": _clean(train_flops / 1e9),
                        "achieved_gflops": _clean(achieved / 1e9),
                        "mfu": _clean(achieved / peak[variant.dtype]),
                    },
                )
            )
        plain = b.rec.get(f"step/{backbone}/plain_fp32")
        for name in steps:
            if name == "plain_fp32":
                continue
            target = STEP_TARGET if backbone == "resnet18" and name == suite.name else None
            rec = ratio_record(
                f"step_vs_plain_fp32/{backbone}/{name}",
                b.rec.get(f"step/{backbone}/{name}"),
                plain,
                target,
                section="precision",
                why=f"the suite's step ({name}) is not {STEP_TARGET}x the plain fp32 loop here",
            )
            if target is not None:
                rec["meaning"] = "the suite's training step (as its CPU/GPU preset runs it)"
            b.rec.ratio(rec)
        del steps
        spent.append(time.perf_counter() - t0)


def mfu_table(rec: Recorder) -> str:
    """Backbone x variant: images/s, achieved GFLOP/s, the peak it is divided by, MFU."""
    rows = []
    for f in rec.figures:
        if f.name.startswith("step/") and f.values:
            x = f.extra
            dtype = "bf16" if x["variant"].startswith("bf16") else "fp32"
            p = rec.get(f"peak_flops/{dtype}")
            rows.append(
                [
                    x["backbone"],
                    x["variant"],
                    _fmt(f.median),
                    _fmt(x["achieved_gflops"]),
                    f"{_fmt(p.median if p else None)} ({dtype})",
                    f"{100 * x['mfu']:.1f}%" if x.get("mfu") is not None else "n/a",
                ]
            )
    return _table(
        ["backbone", "variant", "images/s", "achieved GFLOP/s", "peak GFLOP/s", "MFU"], rows
    )


# ---------------------------------------------------------------------------- sweep run
def _sweep_fit(b: Bench, overrides: Sequence[str], tag: str) -> tuple[float, Path]:
    """Wall seconds and run folder of one `lit-spine fit` with the sweep preset, in a child
    process with one `make sweep` worker's share of the threads (as the sweep runs it)."""
    import subprocess

    cfg = b.cfg
    runs = b.workdir / "sweep-runs" / tag
    threads = max(1, (os.cpu_count() or 1) // 2)
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        LIT_SPINE_NUM_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        LIT_SPINE_RUN_DIR=str(runs),
    )
    command = [
        sys.executable, "-m", "lit_spine", "fit",
        "--config", str(EXPERIMENTS / "base.yaml"),
        "--config", str(EXPERIMENTS / "sweep_cpu.yaml"),
        *overrides,
        f"--data.phantom_dir={cfg.sweep_phantom_dir or b.workdir / 'sweep-phantom'}",
        f"--data.cache_dir={b.workdir / 'sweep-cache'}",
        "--wandb=disabled",
        *cfg.sweep_overrides,
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        tail = "\n".join(done.stderr.splitlines()[-5:])
        raise RuntimeError(f"sweep-preset run {tag} exited {done.returncode}: {tail}")
    return seconds, runs


def bench_sweep(b: Bench) -> None:
    """One sweep-preset run end to end (data ready): today's preset against the preset as it
    was before the performance work (fp32, NCHW, validation and last.ckpt every epoch)."""
    if b.cuda:
        b.rec.note("sweep: experiments/sweep_cpu.yaml is a CPU preset; not run with --device cuda")
        return
    _sweep_fit(b, ["--trainer.fast_dev_run=1"], "warm-up")  # phantom + cache, untimed
    sides = {"sweep_run/old_fp32": OLD_SWEEP_PRESET, "sweep_run/new": ()}
    walls: dict[str, list[float]] = {k: [] for k in sides}
    ips: dict[str, list[float]] = {k: [] for k in sides}
    per_epoch: dict[str, list[float]] = {k: [] for k in sides}
    diag_share: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(b.cfg.sweep_repeats):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            seconds, run = _sweep_fit(b, sides[name], f"{name.split('/')[1]}-{r}")
            summary = run_folder.read_summary(run)
            if summary is None:
                raise RuntimeError(f"{run}: the fit left no readable summary.json; see its log")
            walls[name].append(seconds)
            ips[name].append(summary.get("images_per_s") or math.nan)
            per_epoch[name].append(summary["runtime_s"] / max(1, summary["epochs"]))
            diag_share[name].append(_diagnostics_share(run))
    extra = {"overrides": " ".join(b.cfg.sweep_overrides) or "none"}
    figs = {}
    for name in sides:
        what = {"preset": "before: " + " ".join(OLD_SWEEP_PRESET) if "old" in name else "today"}
        figs[name] = b.rec.figure(Figure(name, "s", walls[name], "sweep", {**extra, **what}))
        b.rec.figure(Figure(f"{name}/images_per_s", "images/s", ips[name], "sweep", what))
        b.rec.figure(Figure(f"{name}/s_per_epoch", "s", per_epoch[name], "sweep", what))
        share = {**what, "meaning": "Diagnostics callback's seconds / the whole fit (issue: < 10%)"}
        b.rec.figure(Figure(f"{name}/diagnostics_pct", "%", diag_share[name], "sweep", share))
    rec = ratio_record(
        "sweep_run_speedup",
        figs["sweep_run/old_fp32"],
        figs["sweep_run/new"],
        SWEEP_TARGET,
        section="sweep",
        why="one sweep-preset run end to end is not 1.5x faster than with the old preset",
    )
    rec["meaning"] = "old preset's wall seconds / today's (process start to exit, data ready)"
    b.rec.ratio(rec)


def _diagnostics_share(run: Path) -> float:
    """Percent of a fit the Diagnostics callback took (its `cost` in diagnostics.json); NaN
    when the run wrote no diagnostics (switched off, or the fit was too short)."""
    try:
        cost = json.loads((Path(run) / "diagnostics.json").read_text())["cost"]
        return 100.0 * float(cost["fraction_of_fit"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


SECTION_FUNCS: dict[str, Callable[[Bench], None]] = {
    "phantom": bench_phantom,
    "io": bench_io,
    "loader": bench_loader,
    "metric": bench_metric,
    "lightning": bench_lightning,
    "grid": bench_grid,
    "precision": bench_precision,
    "sweep": bench_sweep,
}


def derived_ratios(b: Bench) -> None:
    """Ratios across sections: loader throughput vs the fastest backbone's training."""
    loader = b.rec.get("loader_workers2")  # SpineDataModule's default num_workers is 2
    candidates = [
        f
        for f in b.rec.figures
        if f.values
        and (
            f.name in ("train_plain_loop", "train_lightning")
            or (f.name.startswith("grid/") and f.name.endswith("/batchnorm"))
        )
    ]
    if loader is None or not candidates:
        return
    fastest = max(candidates, key=lambda f: f.median)
    rec = ratio_record(
        "loader_vs_fastest_training",
        loader,
        fastest,
        LOADER_TARGET,
        section="loader",
        why=(
            "the augmented loader (SpineDataModule's default 2 workers) cannot feed the "
            "fastest backbone ten times over on this machine"
        ),
    )
    rec["fastest_training"] = fastest.name
    b.rec.ratio(rec)
    single = b.rec.get("loader_workers0")
    if single is not None:
        rec = ratio_record("loader_workers0_vs_fastest_training", single, fastest, section="loader")
        rec["fastest_training"] = fastest.name
        b.rec.ratio(rec)


# ---------------------------------------------------------------------------- machine
def machine_info(device) -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, package versions, date and git commit of this run."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = cpu
    info["cpu_cores"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(OSError, ValueError, IndexError):
        info["ram_gb"] = round(_meminfo_kb("MemTotal") / 2**20, 1)
    with contextlib.suppress(OSError):
        info["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    for pkg in ("torch", "timm", "pytorch-lightning", "torchmetrics", "numpy", "pydicom"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    info["git_commit"] = _git_commit()
    return info


def _meminfo_kb(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    raise ValueError(key)


def _git_commit() -> str:
    commit, dirty = git_state()
    if commit is None:
        return "unknown"
    return commit[:7] + (" (with uncommitted changes)" if dirty else "")


# ---------------------------------------------------------------------------- reports
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _figure_row(f: Figure) -> list[str]:
    r = f.record()
    if not f.values:
        return [f.name, "skipped", "", "", f.unit, "0", r.get("skipped", "")]
    context = ", ".join(f"{k}={v}" for k, v in f.extra.items() if k not in ("what", "includes"))
    return [f.name, _fmt(r["median"]), _fmt(r["min"]), _fmt(r["max"]), f.unit, str(r["n"]), context]


def _ratio_row(r: dict[str, Any]) -> list[str]:
    value = r.get("ratio", r.get("value"))
    target = f"{r['target_op']} {r['target']}" if "target" in r else "-"
    verdict = "-" if "meets" not in r else ("met" if r["meets"] else "MISSED: " + r.get("why", ""))
    if r.get("straddles_target"):
        verdict += " (single repeats fell on both sides of the target: within noise)"
    spread = ""
    if "paired_min" in r:
        spread = f"{_fmt(r['paired_min'])}-{_fmt(r['paired_max'])}"
    return [r["figure"], _fmt(value), spread, target, verdict]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def grid_table(rec: Recorder) -> str:
    """Backbone x norm: images/s (min-max), cost relative to BatchNorm, peak memory."""
    rows = []
    for f in rec.figures:
        if not f.name.startswith("grid/"):
            continue
        backbone, norm = f.extra["backbone"], f.extra["norm"]
        if not f.values:
            rows.append([backbone, norm, "skipped", "", "", "", f.extra.get("skipped", "")])
            continue
        base = rec.get(f"grid/{backbone}/batchnorm")
        rel = base.median / f.median if base is not None and base.values and f.median else math.nan
        s = summarize(f.values)
        rows.append(
            [
                backbone,
                norm,
                _fmt(s["median"]),
                f"{_fmt(s['min'])}-{_fmt(s['max'])}",
                "1.00x"
                if norm == "batchnorm"
                else (f"{rel:.2f}x" if math.isfinite(rel) else "n/a"),
                _fmt(f.extra.get("peak_mem_mb")),
                ", ".join(
                    f"{k}={v}"
                    for k, v in f.extra.items()
                    if k in ("batch", "params_m", "norm_group_size")
                ),
            ]
        )
    return _table(
        ["backbone", "norm", "images/s", "min-max", "step time vs BN", "peak mem (MB)", "notes"],
        rows,
    )


def summary_text(rec: Recorder, info: dict[str, Any], seconds: float) -> str:
    """The readable summary printed after the JSON lines."""
    lines = [
        "",
        f"lit-spine bench on {info.get('gpu') or info['cpu']} ({info['device']}), {seconds:.0f} s",
        "",
        _table(
            ["figure", "median", "min", "max", "unit", "n", "context"],
            [_figure_row(f) for f in rec.figures if not f.name.startswith("grid/")],
        ),
        "",
        _table(
            ["ratio", "value", "paired min-max", "target", "verdict"],
            [_ratio_row(r) for r in rec.ratios],
        ),
    ]
    if any(f.name.startswith("grid/") for f in rec.figures):
        lines += ["", grid_table(rec)]
    if rec.notes:
        lines += ["", *[f"note: {n}" for n in rec.notes]]
    return "\n".join(lines)


def _section(text: str, begin: str, end: str) -> str | None:
    m = re.search(re.escape(begin) + r".*?" + re.escape(end), text, flags=re.S)
    return m.group(0) if m else None


def timm_table() -> str:
    """timm's published encoder throughput for the suite's backbones (reference only)."""
    parts = []
    for kind, data in TIMM_PUBLISHED.items():
        rows = [[m, _fmt(v[0]), str(v[1]), str(v[2])] for m, v in data["rows"].items()]
        parts.append(
            f"*{kind}* (timm `{data['source']}`, {data['gpu']}; bare encoder, ImageNet head):\n\n"
            + _table(["model", f"{kind} samples/s", "batch", "image size"], rows)
        )
    parts.append("convnext_atto is absent from timm's published training CSVs.")
    return "\n\n".join(parts)


def run_markdown(rec: Recorder, info: dict[str, Any], seconds: float, cfg: BenchConfig) -> str:
    """The Markdown block of this run: machine, targets, figures, grid, notes."""
    machine = [[k, str(v)] for k, v in info.items()]
    figs = [_figure_row(f) for f in rec.figures if not f.name.startswith("grid/")]
    targets = [_ratio_row(r) for r in rec.ratios if "target" in r]
    others = [_ratio_row(r) for r in rec.ratios if "target" not in r]
    where = info.get("gpu") or info["cpu"]
    out = [
        f"## {'GPU' if 'gpu' in info else 'CPU'} run: {where}",
        "",
        f"Run of `lit-spine bench` on {info['date']}, {seconds:.0f} s in all, "
        f"{cfg.repeats} repeats per figure, image size {cfg.image_size}.",
        "",
        _table(["machine", ""], machine),
        "",
        "### Targets",
        "",
        _table(
            ["ratio", "value (ratio of medians)", "paired min-max", "target", "verdict"], targets
        ),
        "",
        "### Figures (median, min, max over the repeats)",
        "",
        _table(["figure", "median", "min", "max", "unit", "n", "context"], figs),
        "",
        "### Ratios",
        "",
        _table(["ratio", "value", "paired min-max", "target", "verdict"], others),
    ]
    if any(f.name.startswith("grid/") for f in rec.figures):
        out += [
            "",
            "### Backbone x norm: training cost at the default size",
            "",
            "Plain training step (forward, SpineLoss, backward, AdamW) on one cached batch; "
            "'step time vs BN' is BatchNorm's images/s over this norm's (above 1 = slower).",
            "",
            grid_table(rec),
        ]
    if any(f.name.startswith("step/") for f in rec.figures):
        out += [
            "",
            "### Training step: precision, memory format, MFU",
            "",
            f"The real `SpineModule` training step (forward under the autocast Lightning uses, "
            f"SpineLoss, backward, AdamW) per variant, and a plain fp32 NCHW PyTorch loop of the "
            f"same net, batch {cfg.step_batch}, {cfg.step_image_size} px, timed with "
            "torch.utils.benchmark. Training FLOPs = 3x the forward FLOPs `describe` counts "
            "(backward ~ 2x forward); MFU divides the achieved FLOP/s by the measured peak of "
            "the same dtype (the larger of a dense GEMM and a 3x3 convolution, this run).",
            "",
            mfu_table(rec),
        ]
    if rec.notes:
        out += ["", "### Notes", "", *[f"- {n}" for n in rec.notes]]
    return "\n".join(out)


def write_markdown(path: Path, body: str, gpu_run: bool) -> None:
    """Write BENCHMARKS.md, keeping the other device's section from the existing file."""
    from lit_spine.utils import atomic_write_text

    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    old_gpu, old_cpu = _section(old, GPU_BEGIN, GPU_END), _section(old, CPU_BEGIN, CPU_END)
    if gpu_run:
        gpu = f"{GPU_BEGIN}\n{body}\n\n### timm's published encoder throughput\n\n{timm_table()}\n{GPU_END}"
        cpu = old_cpu or f"{CPU_BEGIN}\n## CPU run\n\nNo CPU run has been recorded yet.\n{CPU_END}"
    else:
        cpu = f"{CPU_BEGIN}\n{body}\n{CPU_END}"
        gpu = old_gpu or (
            f"{GPU_BEGIN}\n## GPU run\n\nNo GPU was available to this run, and no earlier GPU "
            "figures exist: there are no measured GPU figures yet. Run `lit-spine bench "
            "--device cuda --out BENCHMARKS.md` on a GPU machine (bf16, channels_last) to fill "
            "this section; it is kept as is by later CPU-only runs.\n\n"
            "### timm's published encoder throughput (reference, not measured here)\n\n"
            f"{timm_table()}\n{GPU_END}"
        )
    text = "\n".join(
        [
            "# Benchmarks",
            "",
            "Written by `lit-spine bench --out BENCHMARKS.md` (`make bench`) from real runs only. "
            "Each figure is the median of repeated runs, with min and max; each ratio is a ratio "
            "of two medians of the same run, whose sides were run interleaved so that machine "
            "noise hits both alike ('paired min-max' is the spread of the per-repeat ratios). "
            "The device that ran last rewrites its own section; the other section is kept.",
            "",
            cpu,
            "",
            gpu,
            "",
        ]
    )
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------- entry
def _resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lit-spine bench: --device cuda asked for, but torch sees no CUDA GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_bench(args: Any, sections: Sequence[str]) -> int:
    """Run `sections`; print JSON lines and a summary; write the reports; 1 if one failed.

    `args`: the checked options of `lit-spine bench` (lit_spine.commands.bench)."""
    start = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = _resolve_device(args.device)
    cfg = BenchConfig.from_args(args, device.type == "cuda")
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="lit-spine-bench-", dir=args.workdir))
    rec = Recorder()
    bench = Bench(cfg, device, workdir, rec, deadline=start + 60 * args.max_minutes)
    failed = False
    try:
        for name in sections:
            t0 = time.perf_counter()
            try:
                SECTION_FUNCS[name](bench)
            except Exception as err:  # noqa: BLE001 - one broken part must not hide the rest
                failed = True
                rec.note(f"section {name!r} failed: {type(err).__name__}: {err}")
            print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        derived_ratios(bench)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - start
    info = machine_info(device)
    print(summary_text(rec, info, seconds), flush=True)
    if args.json_out:
        from lit_spine.utils import atomic_write_json

        atomic_write_json(
            args.json_out,
            {
                "machine": info,
                "seconds": seconds,
                "config": vars(cfg),
                "figures": [f.record() | {"values": f.values} for f in rec.figures],
                "ratios": rec.ratios,
                "notes": rec.notes,
            },
        )
    if args.out:
        write_markdown(Path(args.out), run_markdown(rec, info, seconds, cfg), device.type == "cuda")
        print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0
