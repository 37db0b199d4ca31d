"""Figures and ratios of a bench run: median, min and max of repeats, ratios of medians with
their paired spread and target, each printed as one JSON line when measured.

Hand-written: torch.utils.benchmark measures one statement; the verdict against a target and
the spread of interleaved per-repeat ratios are this bench's own.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (NaN for none)."""
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
        stats = {k: clean(s[k]) for k in ("median", "min", "max")}
        head = {"figure": self.name, **stats, "unit": self.unit, "n": s["n"]}
        return head | {"section": self.section, **self.extra}


def check_target(value: float, target: float, higher_is_better: bool = True) -> bool:
    """Whether `value` meets `target` (>= when higher is better, else <); NaN never does."""
    if value is None or not math.isfinite(value):
        return False
    return value >= target if higher_is_better else value < target


def _verdict(rec: dict, value: float, target: float | None, higher: bool, why: str) -> dict:
    """Add target, direction, verdict and (when missed) why to a ratio or target record."""
    if target is not None:
        rec.update(target=target, target_op=">=" if higher else "<")
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
    """A ratio of two medians from the same run, with its target and, when missed, why."""
    num, den = numerator.median, denominator.median
    value = num / den if den and math.isfinite(den) and math.isfinite(num) else math.nan
    names = {"numerator": numerator.name, "denominator": denominator.name}
    rec = {"figure": name, "ratio": clean(value), **names, "unit": "x", "section": section}
    paired = [a / b for a, b in zip(numerator.values, denominator.values) if b]
    if paired and len(paired) == len(numerator.values) == len(denominator.values):
        s = summarize(paired)  # per-repeat ratios: spread of the interleaved pairs
        rec["paired_min"], rec["paired_max"] = clean(s["min"]), clean(s["max"])
    _verdict(rec, value, target, higher_is_better, why)
    lo, hi = rec.get("paired_min"), rec.get("paired_max")
    if target is not None and lo is not None and hi is not None and lo < target <= hi:
        rec["straddles_target"] = True  # single repeats on both sides: within this machine's noise
    return rec


class Recorder:
    """Collects figures and ratios and prints each as one JSON line as soon as it exists;
    `section` (set by the runner) labels what is recorded."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.figures: list[Figure] = []
        self.ratios: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.stream, self.quiet, self.section = stream or sys.stdout, quiet, ""

    def figure(self, name: str, unit: str, values: Sequence[float], **extra) -> Figure:
        """Record and print a figure; `extra` is its context (batch, backbone, ...)."""
        fig = Figure(name, unit, list(values), self.section, extra)
        self.figures.append(fig)
        self._emit(fig.record())
        return fig

    def ratio(self, name, numerator, denominator, target=None, why="", **extra) -> dict:
        """Record and print the ratio of two figures' medians (`ratio_record`)."""
        rec = ratio_record(name, numerator, denominator, target, why=why, section=self.section)
        return self._add(rec | extra)

    def bound(self, name: str, fig: Figure, limit: float, why: str, note: str = "") -> dict:
        """Record and print a figure's median against an upper bound (seconds under a budget)."""
        rec = {
            "figure": name,
            "value": clean(fig.median),
            "unit": fig.unit,
            "section": self.section,
        }
        _verdict(rec, fig.median, limit, False, why)
        return self._add(rec | ({"note": note} if note else {}))

    def note(self, text: str) -> None:
        """A remark for the report (a skipped section, a fallback, a breakage)."""
        self.notes.append(text)
        print(f"# note: {text}", file=sys.stderr)

    def get(self, name: str) -> Figure | None:
        """The figure called `name`, if measured."""
        return next((f for f in self.figures if f.name == name), None)

    def _add(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.ratios.append(rec)
        self._emit(rec)
        return rec

    def _emit(self, rec: dict[str, Any]) -> None:
        if not self.quiet:
            print(json.dumps(rec), file=self.stream, flush=True)
