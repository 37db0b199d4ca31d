"""What a bench run measured and how it is reported: figures (median, min, max of repeats),
ratios of two medians with their paired spread and target, one JSON line each as measured,
the machine, and BENCHMARKS.md (tables by `DataFrame.to_markdown`).

Hand-written, because no library does it: the verdict against a target, the spread of the
interleaved per-repeat ratios, and BENCHMARKS.md's two device sections (each run rewrites its
own and keeps the other).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CPU_BEGIN, CPU_END = "<!-- cpu -->", "<!-- /cpu -->"
GPU_BEGIN, GPU_END = "<!-- gpu -->", "<!-- /gpu -->"
PREAMBLE = (
    "Written by `lit-spine bench --out BENCHMARKS.md` (`make bench`) from real runs only. Each "
    "figure is the median of repeated runs, with min and max; each ratio is a ratio of two "
    "medians of the same run, whose sides were run interleaved so that machine noise hits both "
    "alike ('paired min-max' is the spread of the per-repeat ratios). The device that ran last "
    "rewrites its own section; the other section is kept."
)
NO_CPU = "## CPU run\n\nNo CPU run has been recorded yet."
NO_GPU = (
    "## GPU run\n\nNo GPU was available to this run, and no earlier GPU figures exist: there are "
    "no measured GPU figures yet. Run `lit-spine bench --device cuda --out BENCHMARKS.md` on a "
    "GPU machine (bf16, channels_last) to fill this section; it is kept as is by later CPU-only "
    "runs."
)
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


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements, failed (NaN) repeats left out."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def clean(v: Any) -> Any:
    """JSON-safe float (NaN/inf -> None), rounded to 6 significant digits."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return v


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
        head = {"figure": self.name} | {k: clean(s[k]) for k in ("median", "min", "max")}
        return head | {"unit": self.unit, "n": s["n"], "section": self.section, **self.extra}


def check_target(value: float, target: float, higher_is_better: bool = True) -> bool:
    """Whether `value` meets `target` (>= when higher is better, else <); NaN never does."""
    if value is None or not math.isfinite(value):
        return False
    return value >= target if higher_is_better else value < target


def _verdict(rec: dict, value: float, target: float | None, higher: bool, why: str) -> dict:
    if target is not None:
        rec |= {"target": target, "target_op": ">=" if higher else "<"}
        rec["meets"] = check_target(value, target, higher)
        if not rec["meets"]:
            rec["why"] = why or "measured below the target on this machine"
    return rec


def ratio_record(
    name: str,
    numerator: Figure,
    denominator: Figure,
    target: float | None = None,
    higher_is_better: bool = True,
    why: str = "",
    section: str = "",
) -> dict[str, Any]:
    """A ratio of two medians from the same run, with its target and, when missed, why;
    'straddles_target' when single repeats fell on both sides of it (within noise)."""
    num, den = numerator.median, denominator.median
    value = num / den if den and math.isfinite(den) and math.isfinite(num) else math.nan
    rec = {"figure": name, "ratio": clean(value), "numerator": numerator.name}
    rec |= {"denominator": denominator.name, "unit": "x", "section": section}
    paired = [a / b for a, b in zip(numerator.values, denominator.values) if b]
    if paired and len(paired) == len(numerator.values) == len(denominator.values):
        s = summarize(paired)  # per-repeat ratios: the spread of the interleaved pairs
        rec["paired_min"], rec["paired_max"] = clean(s["min"]), clean(s["max"])
        if target is not None and s["min"] < target <= s["max"]:
            rec["straddles_target"] = True
    return _verdict(rec, value, target, higher_is_better, why)


class Recorder:
    """Collects figures, ratios and notes, printing each figure and ratio as one JSON line
    when it is recorded; `section` (set by the runner) labels them."""

    def __init__(self, stream=None) -> None:
        self.figures: list[Figure] = []
        self.ratios: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.stream, self.section = stream or sys.stdout, ""

    def figure(self, name: str, unit: str, values: Sequence[float], **extra) -> Figure:
        self.figures.append(fig := Figure(name, unit, list(values), self.section, extra))
        print(json.dumps(fig.record()), file=self.stream, flush=True)
        return fig

    def ratio(self, name, numerator, denominator, target=None, why="", **extra) -> dict:
        rec = ratio_record(name, numerator, denominator, target, why=why, section=self.section)
        return self._add(rec | extra)

    def bound(self, name: str, fig: Figure, limit: float, why: str, note: str = "") -> dict:
        """A figure's median against an upper bound (seconds under a budget)."""
        rec = {"figure": name, "value": clean(fig.median), "unit": fig.unit}
        rec = _verdict(rec | {"section": self.section}, fig.median, limit, False, why)
        return self._add(rec | ({"note": note} if note else {}))

    def note(self, text: str) -> None:
        """A remark for the report (a skipped section, a fallback, a breakage)."""
        self.notes.append(text)
        print(f"# note: {text}", file=sys.stderr)

    def get(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)

    def _add(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.ratios.append(rec)
        print(json.dumps(rec), file=self.stream, flush=True)
        return rec


def machine_info(device) -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, package versions, date and git commit of this run."""
    import platform
    from datetime import datetime, timezone

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
        "cpu_cores": psutil.cpu_count(),
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


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table of formatted cells (pandas' `to_markdown`)."""
    import pandas as pd

    cells = [[_fmt(c).replace("|", "/") for c in row] for row in rows]
    frame = pd.DataFrame(cells, columns=list(header))
    return frame.to_markdown(index=False, disable_numparse=True) if cells else frame.to_markdown()


def _spread(s: dict) -> str:
    return f"{_fmt(s['min'])}-{_fmt(s['max'])}"


def _figure_row(f: Figure) -> list:
    if not f.values:
        return [f.name, "skipped", "", "", f.unit, 0, f.extra.get("skipped", "")]
    r, hidden = f.record(), ("what", "includes", "meaning")
    context = ", ".join(f"{k}={v}" for k, v in f.extra.items() if k not in hidden)
    return [f.name, r["median"], r["min"], r["max"], f.unit, r["n"], context]


def _ratio_row(r: dict[str, Any]) -> list:
    target = f"{r['target_op']} {r['target']}" if "target" in r else "-"
    verdict = "-" if "meets" not in r else ("met" if r["meets"] else "MISSED: " + r.get("why", ""))
    if r.get("straddles_target"):
        verdict += " (single repeats fell on both sides of the target: within noise)"
    spread = _spread({"min": r["paired_min"], "max": r["paired_max"]}) if "paired_min" in r else ""
    return [r["figure"], r.get("ratio", r.get("value")), spread, target, verdict]


def _grid_row(rec: Recorder, f: Figure) -> list:
    """Backbone, norm, images/s (min-max), step time relative to BatchNorm, peak memory."""
    x, s = f.extra, summarize(f.values)
    if not f.values:
        return [x["backbone"], x["norm"], "skipped", "", "", "", x.get("skipped", "")]
    base = rec.get(f"grid/{x['backbone']}/batchnorm")
    rel = base.median / f.median if base is not None and base.values else math.nan
    notes = ", ".join(
        f"{k}={v}" for k, v in x.items() if k in ("batch", "params_m", "norm_group_size")
    )
    rel_text = f"{rel:.2f}x" if math.isfinite(rel) else "n/a"
    return [
        x["backbone"],
        x["norm"],
        s["median"],
        _spread(s),
        rel_text,
        x.get("peak_mem_mb"),
        notes,
    ]


def _mfu_row(rec: Recorder, f: Figure) -> list:
    """Backbone, variant, images/s, achieved GFLOP/s, the peak it is divided by, MFU."""
    x, dtype = f.extra, "bf16" if f.extra["variant"].startswith("bf16") else "fp32"
    peak, mfu = rec.get(f"peak_flops/{dtype}"), x.get("mfu")
    peak_text = f"{_fmt(peak.median if peak else None)} ({dtype})"
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    return [x["backbone"], x["variant"], f.median, x["achieved_gflops"], peak_text, mfu_text]


def run_markdown(rec: Recorder, info: dict[str, Any], seconds: float, cfg) -> str:
    """The Markdown block of this run: machine, targets, figures, ratios, grid, MFU, notes."""
    ratio_header = ["ratio", "value", "paired min-max", "target", "verdict"]
    figures = [_figure_row(f) for f in rec.figures if not f.name.startswith("grid/")]
    out = [
        f"## {'GPU' if 'gpu' in info else 'CPU'} run: {info.get('gpu') or info['cpu']}",
        f"Run of `lit-spine bench` on {info['date']}, {seconds:.0f} s in all, {cfg.repeats} "
        f"repeats per figure, image size {cfg.image_size}.",
        table(["machine", ""], list(info.items())),
        "### Targets",
        table(
            ["ratio", "value (ratio of medians)", *ratio_header[2:]],
            [_ratio_row(r) for r in rec.ratios if "target" in r],
        ),
        "### Figures (median, min, max over the repeats)",
        table(["figure", "median", "min", "max", "unit", "n", "context"], figures),
        "### Ratios",
        table(ratio_header, [_ratio_row(r) for r in rec.ratios if "target" not in r]),
    ]
    if grid := [_grid_row(rec, f) for f in rec.figures if f.name.startswith("grid/")]:
        header = ["backbone", "norm", "images/s", "min-max", "step time vs BN", "peak mem (MB)"]
        out += ["### Backbone x norm: training cost at the default size", GRID_TEXT]
        out += [table([*header, "notes"], grid)]
    if mfu := [_mfu_row(rec, f) for f in rec.figures if f.name.startswith("step/") and f.values]:
        header = ["backbone", "variant", "images/s", "achieved GFLOP/s", "peak GFLOP/s", "MFU"]
        text = MFU_TEXT.format(batch=cfg.step_batch, size=cfg.step_image_size)
        out += ["### Training step: precision, memory format, MFU", text, table(header, mfu)]
    if rec.notes:
        out += ["### Notes", "\n".join(f"- {n}" for n in rec.notes)]
    return "\n\n".join(out)


def write_markdown(path: Path, body: str, gpu_run: bool) -> None:
    """Write BENCHMARKS.md (atomically): this run's device section, the other one kept."""
    from lit_spine.utils import atomic_write_text

    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    sections = {}
    for begin, end, empty in ((CPU_BEGIN, CPU_END, NO_CPU), (GPU_BEGIN, GPU_END, NO_GPU)):
        found = re.search(re.escape(begin) + ".*?" + re.escape(end), old, flags=re.S)
        sections[begin] = found.group(0) if found else f"{begin}\n{empty}\n{end}"
    begin, end = (GPU_BEGIN, GPU_END) if gpu_run else (CPU_BEGIN, CPU_END)
    sections[begin] = f"{begin}\n{body}\n{end}"
    text = ["# Benchmarks", "", PREAMBLE, "", sections[CPU_BEGIN], "", sections[GPU_BEGIN], ""]
    atomic_write_text(path, "\n".join(text))
