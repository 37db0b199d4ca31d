"""The reports of a bench run: the machine it ran on, the printed summary, and BENCHMARKS.md,
where each device rewrites its own section between markers and keeps the other one."""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lit_spine.bench.figures import Recorder, summarize
from lit_spine.utils import atomic_write_text

CPU_BEGIN, CPU_END = "<!-- cpu -->", "<!-- /cpu -->"
GPU_BEGIN, GPU_END = "<!-- gpu -->", "<!-- /gpu -->"
# timm's own published benchmark CSVs (huggingface/pytorch-image-models, results/), copied for
# comparison, as no installed package ships them: samples/s of the bare encoder.
TIMM_SOURCES = {
    "train": ("benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv", "RTX 3090, AMP, NCHW, PyTorch 1.12, CUDA 11.3"),
    "infer": ("benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv", "RTX 4090, AMP, NCHW, PyTorch 2.4.0, CUDA 12.4"),
}  # fmt: skip
TIMM_PUBLISHED = """kind model samples_per_s batch image_size
train mobilenetv3_small_100 5749.13 512 224
train resnet18 2764.22 512 224
train mobilenetv3_large_100 2167.29 512 224
train efficientnet_b0 1459.11 384 224
infer mobilenetv3_small_100 43953.49 1024 224
infer mobilenetv3_large_100 14191.17 1024 224
infer resnet18 13537.15 1024 224
infer convnext_atto 12819.99 1024 224
infer efficientnet_b0 7082.56 1024 256
"""
PREAMBLE = (
    "Written by `lit-spine bench --out BENCHMARKS.md` (`make bench`) from real runs only. Each "
    "figure is the median of repeated runs, with min and max; each ratio is a ratio of two "
    "medians of the same run, whose sides were run interleaved so that machine noise hits both "
    "alike ('paired min-max' is the spread of the per-repeat ratios). The device that ran last "
    "rewrites its own section; the other section is kept."
)


def machine_info(device) -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, package versions, date and git commit of this run."""
    import psutil
    import torch
    from torch.utils import collect_env

    from lit_spine.train_cli import package_versions
    from lit_spine.utils import git_state

    lines = (collect_env.get_cpu_info(collect_env.run) or "").splitlines()  # lscpu, sysctl, wmic
    model = [ln.split(":", 1)[1].strip() for ln in lines if re.match(r"\s*Model name\s*:", ln)]
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "platform": platform.platform(),
        "cpu": (model or [platform.processor() or platform.machine()])[0],
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": " ".join(f"{x:.2f}" for x in psutil.getloadavg()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    commit, dirty = git_state()
    git = commit[:7] + (" (with uncommitted changes)" if dirty else "") if commit else "unknown"
    return info | package_versions() | {"git_commit": git}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(
        lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    )


FIGURE_HEADER = ["figure", "median", "min", "max", "unit", "n", "context"]
RATIO_HEADER = ["ratio", "value", "paired min-max", "target", "verdict"]


def _figure_row(f) -> list[str]:
    r = f.record()
    if not f.values:
        return [f.name, "skipped", "", "", f.unit, "0", r.get("skipped", "")]
    context = ", ".join(
        f"{k}={v}" for k, v in f.extra.items() if k not in ("what", "includes", "meaning")
    )
    return [f.name, _fmt(r["median"]), _fmt(r["min"]), _fmt(r["max"]), f.unit, str(r["n"]), context]


def _ratio_row(r: dict[str, Any]) -> list[str]:
    target = f"{r['target_op']} {r['target']}" if "target" in r else "-"
    verdict = "-" if "meets" not in r else ("met" if r["meets"] else "MISSED: " + r.get("why", ""))
    if r.get("straddles_target"):
        verdict += " (single repeats fell on both sides of the target: within noise)"
    spread = f"{_fmt(r['paired_min'])}-{_fmt(r['paired_max'])}" if "paired_min" in r else ""
    return [r["figure"], _fmt(r.get("ratio", r.get("value"))), spread, target, verdict]


def grid_table(rec: Recorder) -> str:
    """Backbone x norm: images/s (min-max), cost relative to BatchNorm, peak memory."""
    rows = []
    for f in (f for f in rec.figures if f.name.startswith("grid/")):
        x, s = f.extra, summarize(f.values)
        if not f.values:
            rows.append([x["backbone"], x["norm"], "skipped", "", "", "", x.get("skipped", "")])
            continue
        base = rec.get(f"grid/{x['backbone']}/batchnorm")
        rel = base.median / f.median if base is not None and base.values else math.nan
        vs_bn = "1.00x" if x["norm"] == "batchnorm" else _fmt_x(rel)
        keys = ("batch", "params_m", "norm_group_size")
        notes = ", ".join(f"{k}={v}" for k, v in x.items() if k in keys)
        spread, mem = f"{_fmt(s['min'])}-{_fmt(s['max'])}", _fmt(x.get("peak_mem_mb"))
        rows.append([x["backbone"], x["norm"], _fmt(s["median"]), spread, vs_bn, mem, notes])
    header = ["backbone", "norm", "images/s", "min-max", "step time vs BN", "peak mem (MB)"]
    return _table([*header, "notes"], rows)


def _fmt_x(v: float) -> str:
    return f"{v:.2f}x" if math.isfinite(v) else "n/a"


def mfu_table(rec: Recorder) -> str:
    """Backbone x variant: images/s, achieved GFLOP/s, the peak it is divided by, MFU."""
    rows = []
    for f in (f for f in rec.figures if f.name.startswith("step/") and f.values):
        x = f.extra
        dtype = "bf16" if x["variant"].startswith("bf16") else "fp32"
        p = rec.get(f"peak_flops/{dtype}")
        peak = f"{_fmt(p.median if p else None)} ({dtype})"
        mfu = f"{100 * x['mfu']:.1f}%" if x.get("mfu") is not None else "n/a"
        rows.append([x["backbone"], x["variant"], _fmt(f.median), _fmt(x["achieved_gflops"]), peak, mfu])  # fmt: skip
    header = ["backbone", "variant", "images/s", "achieved GFLOP/s", "peak GFLOP/s", "MFU"]
    return _table(header, rows)


def timm_table() -> str:
    """timm's published encoder throughput for the suite's backbones (reference only)."""
    rows = [line.split() for line in TIMM_PUBLISHED.splitlines()[1:]]
    parts = []
    for kind, (source, gpu) in TIMM_SOURCES.items():
        table = [[m, _fmt(float(v)), b, size] for k, m, v, b, size in rows if k == kind]
        head = f"*{kind}* (timm `results/{source}`, {gpu}; bare encoder, ImageNet head):"
        parts.append(head + "\n\n" + _table(["model", f"{kind} samples/s", "batch", "image size"], table))  # fmt: skip
    return "\n\n".join(parts + ["convnext_atto is absent from timm's published training CSVs."])


GRID_TEXT = (
    "The real `SpineModule` training step (forward, SpineLoss, backward, AdamW) on one "
    "synthetic batch; 'step time vs BN' is BatchNorm's images/s over this norm's (above 1 = "
    "slower)."
)
MFU_TEXT = (
    "The real `SpineModule` training step (forward under the autocast Lightning uses, "
    "SpineLoss, backward, AdamW) per variant, and a plain fp32 NCHW PyTorch loop of the same "
    "net, batch {batch}, {size} px, timed with torch.utils.benchmark. Training FLOPs = 3x the "
    "forward FLOPs `describe` counts (backward ~ 2x forward); MFU divides the achieved FLOP/s "
    "by the measured peak of the same dtype (the larger of a dense GEMM and a 3x3 "
    "convolution, this run)."
)


def run_markdown(rec: Recorder, info: dict[str, Any], seconds: float, cfg) -> str:
    """The Markdown block of this run: machine, targets, figures, ratios, grid, MFU, notes."""
    figs = [_figure_row(f) for f in rec.figures if not f.name.startswith("grid/")]
    targets = [_ratio_row(r) for r in rec.ratios if "target" in r]
    others = [_ratio_row(r) for r in rec.ratios if "target" not in r]
    out = [
        f"## {'GPU' if 'gpu' in info else 'CPU'} run: {info.get('gpu') or info['cpu']}",
        f"Run of `lit-spine bench` on {info['date']}, {seconds:.0f} s in all, {cfg.repeats} "
        f"repeats per figure, image size {cfg.image_size}.",
        _table(["machine", ""], [[k, str(v)] for k, v in info.items()]),
        "### Targets",
        _table(["ratio", "value (ratio of medians)", *RATIO_HEADER[2:]], targets),
        "### Figures (median, min, max over the repeats)",
        _table(FIGURE_HEADER, figs),
        "### Ratios",
        _table(RATIO_HEADER, others),
    ]
    if any(f.name.startswith("grid/") for f in rec.figures):
        out += ["### Backbone x norm: training cost at the default size", GRID_TEXT, grid_table(rec)]  # fmt: skip
    if any(f.name.startswith("step/") for f in rec.figures):
        text = MFU_TEXT.format(batch=cfg.step_batch, size=cfg.step_image_size)
        out += ["### Training step: precision, memory format, MFU", text, mfu_table(rec)]
    if rec.notes:
        out += ["### Notes", "\n".join(f"- {n}" for n in rec.notes)]
    return "\n\n".join(out)


def write_markdown(path: Path, body: str, gpu_run: bool) -> None:
    """Write BENCHMARKS.md (atomically) with this run's section and the other device's kept."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = {
        b: m.group(0)
        for b, e in ((CPU_BEGIN, CPU_END), (GPU_BEGIN, GPU_END))
        if (m := re.search(re.escape(b) + ".*?" + re.escape(e), old, flags=re.S))
    }
    timm = "### timm's published encoder throughput (reference, not measured here)"
    timm += "\n\n" + timm_table()
    if gpu_run:
        gpu = f"{GPU_BEGIN}\n{body}\n\n{timm}\n{GPU_END}"
        none = "## CPU run\n\nNo CPU run has been recorded yet."
        cpu = kept.get(CPU_BEGIN, f"{CPU_BEGIN}\n{none}\n{CPU_END}")
    else:
        cpu = f"{CPU_BEGIN}\n{body}\n{CPU_END}"
        gpu = kept.get(GPU_BEGIN) or (
            f"{GPU_BEGIN}\n## GPU run\n\nNo GPU was available to this run, and no earlier GPU "
            "figures exist: there are no measured GPU figures yet. Run `lit-spine bench "
            "--device cuda --out BENCHMARKS.md` on a GPU machine (bf16, channels_last) to fill "
            f"this section; it is kept as is by later CPU-only runs.\n\n{timm}\n{GPU_END}"
        )
    atomic_write_text(path, "\n".join(["# Benchmarks", "", PREAMBLE, "", cpu, "", gpu, ""]))
