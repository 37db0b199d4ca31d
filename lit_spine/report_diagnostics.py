"""The report's diagnostics sections, rendered from the runs' `diagnostics.json` files.

Six sections, one per diagnostic of `lit_spine.diagnostics` ("Localisation vs
classification", "Per level", "Generalisation gap", "BatchNorm train/eval gap",
"Calibration", "Effective receptive field"), each a per-cell table of the mean over the
cell's runs (seeds) with an interval, and plots where they help: per-level radial error,
reliability diagrams pooled per cell, mean ERF maps per cell. `interval` is the one place
that turns a cell's per-run values into the printed mean and interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lit_spine import runs as run_folder
from lit_spine.report_stats import mean_ci

SECTIONS = (
    "Localisation vs classification",
    "Per level",
    "Generalisation gap",
    "BatchNorm train/eval gap",
    "Calibration",
    "Effective receptive field",
)
INTERVAL_NOTE = (
    "mean [95% t-interval over the cell's seeds, cut to the quantity's range: rates, AP and ECE "
    "within [0, 1], errors, losses and radii >= 0]; n = runs with diagnostics"
)
UNIT = (0.0, 1.0)  # rates, AP, mAP, ECE
NONNEG = (0.0, math.inf)  # errors in mm, losses, radii


def interval(values: Sequence[float | None]) -> dict[str, float]:
    """n, mean, std and a 95% interval of the finite values (the report's mean_ci)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return mean_ci(finite) if finite else {"n": 0, "mean": math.nan, "std": math.nan,
                                           "ci_low": math.nan, "ci_high": math.nan}  # fmt: skip


def fmt(
    values: Sequence[float | None],
    digits: int = 3,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> str:
    """'mean [low, high]' (n >= 2), 'mean' (n = 1) or 'n/a' (no value).

    A t-interval of a few seeds can leave the quantity's range (a hit rate above 1); `bounds`
    cuts it there (INTERVAL_NOTE says so in the report).
    """
    s = interval(values)
    if not s["n"]:
        return "n/a"
    if s["n"] < 2 or not math.isfinite(s["ci_low"]):
        return f"{s['mean']:.{digits}f}"
    low, high = max(s["ci_low"], bounds[0]), min(s["ci_high"], bounds[1])
    return f"{s['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _get(d: dict[str, Any] | None, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _column(diags: list[dict], path: str) -> list[float | None]:
    return [_get(d, path) for d in diags]


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_sections(cells: Sequence[Any], label: Callable[[Any], str], out: Path) -> str:
    """Markdown of the six sections for `cells` (objects with `.runs`, each with `.dir`);
    `label(cell)` names a cell; plots are written into `out` and linked by file name."""
    out = Path(out)
    groups = []
    for cell in cells:
        diags = [
            d for d in (run_folder.read_diagnostics(r.dir) for r in cell.runs) if d is not None
        ]
        groups.append((label(cell), diags, [r.dir for r in cell.runs]))
    if not any(diags for _, diags, _ in groups):
        return "\n".join(
            f"## {name}\n\nNo run has a diagnostics.json (diagnostics were off: "
            "`--diagnostics.enabled=false`, or the runs predate them).\n"
            for name in SECTIONS
        )
    missing = []  # runs without diagnostics.json: named, never silently dropped
    for (name, diags, _), cell in zip(groups, cells):
        lacking = [r.dir.name for r in cell.runs if run_folder.read_diagnostics(r.dir) is None]
        if lacking:
            what = "no run" if not diags else f"{len(lacking)} of {len(cell.runs)} runs"
            missing.append(f"{name}: {what} ({', '.join(lacking[:6])}"
                           + (f" and {len(lacking) - 6} more)" if len(lacking) > 6 else ")"))  # fmt: skip
    groups = [g for g in groups if g[1]]
    parts = [
        _localisation(groups),
        _per_level(groups, out),
        _generalisation(groups),
        _batchnorm(groups),
        _calibration(groups, out),
        _erf(groups, out),
    ]
    if missing:
        note = (
            "Runs without a diagnostics.json are left out of these sections (diagnostics off, "
            "or the run predates them): " + "; ".join(missing) + "."
        )
        parts[0] = parts[0].replace("\n\n", f"\n\n{note}\n\n", 1)
    return "\n".join(parts)


def _n(diags: list[dict]) -> str:
    return str(len(diags))


def _localisation(groups) -> str:
    radius = next((d.get("radius_mm") for _, ds, _ in groups for d in ds), None)
    r_key = f"{radius:g}" if radius is not None else "8"
    rows = [
        [
            name,
            _n(ds),
            fmt(_column(ds, "localisation_vs_classification.mre_mm"), 2, bounds=NONNEG),
            fmt(
                [(_get(d, "localisation_vs_classification.sdr") or {}).get(r_key) for d in ds],
                bounds=UNIT,
            ),
            fmt(_column(ds, "localisation_vs_classification.map_decoded"), bounds=UNIT),
            fmt(_column(ds, "localisation_vs_classification.map_true_points"), bounds=UNIT),
            fmt(_column(ds, "localisation_vs_classification.map_gap")),
        ]
        for name, ds, _ in groups
    ]
    head = [
        "cell", "n", "MRE mm", f"SDR {r_key} mm", "mAP at decoded points",
        "mAP at true points", "true - decoded",
    ]  # fmt: skip
    return "\n".join(
        [
            f"## {SECTIONS[0]}",
            "",
            "Validation split, best checkpoint. Localisation: mean radial error and the share "
            f"of points within {r_key} mm. Classification: the class mAP when the classifier reads "
            "the decoded points (the real pipeline) and when it reads the ground-truth points "
            "(classification given perfect localisation; scored with the point score set to 1). "
            "A large 'true - decoded' says the failure is localisation, not classification. "
            + INTERVAL_NOTE
            + ".",
            "",
            *_table(head, rows),
            "",
        ]
    )


def _per_level(groups, out: Path) -> str:
    names = [lv["name"] for lv in groups[0][1][0]["per_level"]["levels"]]
    others = {
        tuple(lv["name"] for lv in d["per_level"]["levels"]) for _, ds, _ in groups for d in ds
    }
    if len(others) > 1:  # runs of different tasks: a shared level table would mislabel levels
        return (
            f"## {SECTIONS[1]}\n\nSkipped: the runs have different levels (tasks: "
            + "; ".join(", ".join(n) for n in sorted(others))
            + "); compare per-level results within one task.\n"
        )
    summary_rows = []
    blocks = []
    for name, ds, _ in groups:
        summary_rows.append(
            [
                name,
                _n(ds),
                fmt(_column(ds, "per_level.hit_rate"), bounds=UNIT),
                fmt(_column(ds, "per_level.off_by_one_rate"), bounds=UNIT),
            ]
        )
        rows = []
        for k, level in enumerate(names):
            per = [d["per_level"]["levels"][k] for d in ds]
            rows.append(
                [
                    level,
                    fmt([p.get("mre_mm") for p in per], 2, bounds=NONNEG),
                    fmt([p.get("hit_rate") for p in per], bounds=UNIT),
                    fmt([p.get("ap") for p in per], bounds=UNIT),
                    fmt([p.get("off_by_one_rate") for p in per], bounds=UNIT),
                ]
            )
        blocks += [
            f"**{name}** ({_n(ds)} runs)",
            "",
            *_table(["level", "MRE mm", "hit rate", "AP", "off-by-one"], rows),
            "",
        ]
    plot = _plot_per_level(groups, names, out / "diagnostics_per_level.png")
    return "\n".join(
        [
            f"## {SECTIONS[1]}",
            "",
            "Per level: mean radial error, hit rate within the metric's radius, AP of that "
            "level's classes, and the off-by-one rate: the prediction misses its own point but "
            "lands within the radius of the same-type neighbour above or below (a level shift). "
            + INTERVAL_NOTE
            + ".",
            "",
            *_table(["cell", "n", "hit rate", "off-by-one rate"], summary_rows),
            "",
            *blocks,
            f"![per-level radial error]({plot.name})",
            "",
        ]
    )


def _plot_per_level(groups, names: list[str], path: Path) -> Path:
    from lit_spine.diagnostics import _save

    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 5.6), sharex=True)
    x = np.arange(len(names))
    width = 0.8 / max(len(groups), 1)
    for i, (name, ds, _) in enumerate(groups):
        for axis, key in ((ax, "mre_mm"), (ax2, "off_by_one_rate")):
            stats = [
                interval([d["per_level"]["levels"][k].get(key) for d in ds])
                for k in range(len(names))
            ]
            means = [s["mean"] for s in stats]
            err = [0 if not math.isfinite(s["std"]) else s["std"] for s in stats]
            axis.bar(x + (i - (len(groups) - 1) / 2) * width, means, width, yerr=err,
                     capsize=2, label=name)  # fmt: skip
    ax.set_ylabel("mean radial error (mm)")
    ax2.set_ylabel("off-by-one rate")
    ax2.set_ylim(bottom=0)
    ax2.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set_title("Per level, validation split (bars: mean over seeds, whiskers: std)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    for axis in (ax, ax2):
        axis.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _generalisation(groups) -> str:
    rows = []
    for name, ds, _ in groups:
        gen = [d for d in ds if d.get("generalisation")]
        rows.append(
            [
                name,
                _n(gen),
                fmt(_column(gen, "generalisation.train.loss"), bounds=NONNEG),
                fmt(_column(gen, "generalisation.val.loss"), bounds=NONNEG),
                fmt(_column(gen, "generalisation.gap.loss")),
                fmt(_column(gen, "generalisation.train.map"), bounds=UNIT),
                fmt(_column(gen, "generalisation.val.map"), bounds=UNIT),
                fmt(_column(gen, "generalisation.gap.map")),
                fmt(_column(gen, "generalisation.gap.mre_mm"), 2),
            ]
        )
    n_train = next(
        (_get(d, "generalisation.train.n_studies") for _, ds, _ in groups for d in ds), None
    )
    head = [
        "cell", "n", "train loss", "val loss", "loss gap", "train mAP", "val mAP", "mAP gap",
        "MRE gap mm",
    ]  # fmt: skip
    return "\n".join(
        [
            f"## {SECTIONS[2]}",
            "",
            f"Loss and metric of the best checkpoint on the first {n_train or '?'} studies of the "
            "training split (no augmentation, eval mode) and on the validation split; gap = "
            "train - val (a regularizer that works narrows it). " + INTERVAL_NOTE + ".",
            "",
            *_table(head, rows),
            "",
        ]
    )


def _batchnorm(groups) -> str:
    rows = []
    for name, ds, _ in groups:
        norms = sorted({str(d.get("norm")) for d in ds})
        has_bn = any(_get(d, "batchnorm.has_batchnorm") for d in ds)
        drift = fmt(_column(ds, "batchnorm.mean_shift_sd")) if has_bn else "n/a"
        ratio = fmt(_column(ds, "batchnorm.log_var_ratio")) if has_bn else "n/a"
        rows.append(
            [
                name,
                "/".join(norms),
                _n(ds),
                fmt(_column(ds, "batchnorm.map_eval"), bounds=UNIT),
                fmt(_column(ds, "batchnorm.map_batch_stats"), bounds=UNIT),
                fmt(_column(ds, "batchnorm.map_gap")),
                fmt(_column(ds, "batchnorm.mre_mm_eval"), 2, bounds=NONNEG),
                fmt(_column(ds, "batchnorm.mre_mm_batch_stats"), 2, bounds=NONNEG),
                drift,
                ratio,
            ]
        )
    head = [
        "cell", "norm", "n", "mAP eval (running stats)", "mAP batch stats", "eval - batch",
        "MRE eval mm", "MRE batch mm", "mean shift (running sd)", "abs log var ratio",
    ]  # fmt: skip
    return "\n".join(
        [
            f"## {SECTIONS[3]}",
            "",
            "The validation metric with BatchNorm's running statistics (eval mode) and with the "
            "statistics of each validation batch (BatchNorm layers in train mode, running "
            "statistics untouched), and the drift between the two per layer, averaged over "
            "layers: abs(mu_batch - mu_running) / sd_running and abs(log(var_batch / var_running)). "
            "GroupNorm, LayerNorm and InstanceNorm normalise each sample by itself, so both "
            "numbers are the same by construction and drift is n/a. " + INTERVAL_NOTE + ".",
            "",
            *_table(head, rows),
            "",
        ]
    )


def _pooled_bins(ds: list[dict]) -> dict[str, Any]:
    """Reliability bins pooled over runs: counts add, means weight by count."""
    n_bins = max(len(_get(d, "calibration.bins") or []) for d in ds)
    bins = []
    for i in range(n_bins):
        entries = [d["calibration"]["bins"][i] for d in ds if len(d["calibration"]["bins"]) > i]
        n = sum(e["n"] for e in entries)
        bins.append(
            {
                "n": n,
                "confidence": sum(e["n"] * (e["confidence"] or 0) for e in entries) / n
                if n
                else None,
                "accuracy": sum(e["n"] * (e["accuracy"] or 0) for e in entries) / n if n else None,
            }
        )
    return {"bins": bins, "ece": interval(_column(ds, "calibration.ece"))["mean"]}


def _calibration(groups, out: Path) -> str:
    from lit_spine.diagnostics import plot_reliability

    rows = [
        [
            name,
            _n(ds),
            fmt(_column(ds, "calibration.ece"), bounds=UNIT),
            str(_get(ds[0], "calibration.kind")),
            str(sum(_get(d, "calibration.n") or 0 for d in ds)),
        ]
        for name, ds, _ in groups
    ]
    plot = plot_reliability(
        {name: _pooled_bins(ds) for name, ds, _ in groups},
        out / "diagnostics_reliability.png",
        "Reliability per cell (validation, runs pooled; legend: mean ECE)",
    )
    return "\n".join(
        [
            f"## {SECTIONS[4]}",
            "",
            "Expected calibration error (torchmetrics, L1, equal-width bins) of the disease "
            "probabilities at the decoded points, over the present points' (probability, "
            "outcome) pairs. " + INTERVAL_NOTE + ".",
            "",
            *_table(["cell", "n", "ECE", "pairs scored", "pairs (all runs)"], rows),
            "",
            f"![reliability diagrams]({plot.name})",
            "",
        ]
    )


def _erf(groups, out: Path) -> str:
    from lit_spine.diagnostics import erf_size, plot_erf

    rows, maps, sizes = [], {}, {}
    theoretical = None
    for name, ds, dirs in groups:
        th = next(
            (d["erf"].get("theoretical_px") for d in ds if d["erf"].get("theoretical_px")), None
        )
        theoretical = theoretical or th

        def px_mm(which: str, share: int, ds=ds) -> str:
            px = fmt(_column(ds, f"erf.{which}.r{share}_px"), 1, bounds=NONNEG)
            mm = fmt(_column(ds, f"erf.{which}.r{share}_mm"), 1, bounds=NONNEG)
            return f"{px} px / {mm} mm"

        rows.append(
            [
                name,
                _n(ds),
                "x".join(map(str, th)) if th else "n/a",
                px_mm("init", 50),
                px_mm("init", 90),
                px_mm("trained", 50),
                px_mm("trained", 90),
            ]
        )
        stack = []
        for run_dir in dirs:
            trained = run_folder.read_erf_map(run_dir, "trained")
            if trained is not None:
                stack.append(trained)
        shapes = {m.shape for m in stack}
        if stack and len(shapes) == 1:
            mean = np.mean(stack, axis=0)
            maps[name] = mean
            sizes[name] = erf_size(mean, ds[0]["erf"].get("spacing_mm") or (1.0, 1.0))
    head = [
        "cell", "n", "theoretical RF px", "init r50", "init r90", "trained r50", "trained r90",
    ]  # fmt: skip
    lines = [
        f"## {SECTIONS[5]}",
        "",
        "Effective receptive field (Luo et al. 2016): |d heatmap peak / d input| averaged over "
        "validation images and the task's points, re-centred on each peak; r50 / r90 = the radius "
        "holding 50% / 90% of that gradient mass, at initialisation and after training, beside "
        "the theoretical receptive field (`lit-spine describe`). " + INTERVAL_NOTE + ".",
        "",
        *_table(head, rows),
        "",
    ]
    if maps:
        shown = dict(list(maps.items())[:6])
        plot = plot_erf(shown, sizes, out / "diagnostics_erf.png", theoretical)
        lines += [f"![effective receptive field, trained, mean per cell]({plot.name})", ""]
    return "\n".join(lines)
