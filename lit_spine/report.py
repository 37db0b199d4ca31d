"""`lit-spine report`: rank the cells of a sweep (configuration minus seed) with statistics and plots.

Reads run folders (summary.json, meta.json's config_flat or config.yaml, metrics.csv), groups
finished runs by every config key that varies across them except the training seed, and writes
`report.md`, `report.csv` (one row per cell), `runs.csv` (one row per run) and PNG plots:
learning curves per cell, a bar chart with 95% confidence intervals per factor and, when the
factors include a norm and the batch size, the metric against batch size per norm (the Group
Normalization paper's central experiment, Wu & He 2018, figure 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from lit_spine.utils import atomic_write_text

# Only training seeds: a cell's replicates differ in these. (The phantom's seed defines the
# data, so runs with different phantom seeds belong to different cells.)
SEED_KEYS: tuple[str, ...] = ("seed_everything",)
# Keys that differ between runs without defining the experiment: paths, loggers, checkpoints.
RUN_SPECIFIC = re.compile(
    r"(^|\.)(config|ckpt_path|default_root_dir|dirpath|save_dir|log_dir|run_dir|runs_root|logger|callbacks|print_model|overlays"
    r"|cache_dir|enable_progress_bar|num_workers|wandb\w*)(\.|$)"
)
DEFAULT_METRIC = "val/mAP_best"
# summary.json key spellings the report accepts for the side columns, first match wins.
RUNTIME_KEYS = ("runtime_s", "duration_s", "fit_time_s", "time/fit_s", "_runtime")
IMAGES_PER_S_KEYS = ("images_per_s", "train/images_per_s", "throughput/images_per_s", "imgs_per_s")
PARAMS_KEYS = ("params", "num_params", "n_params", "parameters", "model/params")


# ----------------------------------------------------------------------------- reading


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys (`{"model": {"lr": 1}}` -> `{"model.lr": 1}`)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Run:
    """One run folder as the report sees it."""

    dir: Path
    config: dict[str, Any]  # flat dotted keys
    summary: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.summary.get("status") == "finished"

    def number(self, keys: Sequence[str]) -> float:
        """First numeric summary (or meta) value under one of `keys`, else NaN."""
        for key in keys:
            value = self.summary.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return math.nan

    def seed(self, seed_keys: Sequence[str]) -> tuple:
        return tuple(_hashable(self.config.get(k)) for k in seed_keys)


def load_run(run_dir: Path) -> Run:
    """Read a run folder: config from meta.json's config_flat, else config.yaml; sweep params win."""
    meta = _read_json(run_dir / "meta.json")
    config = meta.get("config_flat")
    if not isinstance(config, dict):
        try:
            config = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
        except (OSError, yaml.YAMLError):
            config = {}
    config = dict(config)
    params_file = run_dir / "sweep_params.yaml"
    if params_file.is_file():
        params = yaml.safe_load(params_file.read_text()) or {}
        config.update({k: v.get("value") if isinstance(v, dict) else v for k, v in params.items()})
    summary = _read_json(run_dir / "summary.json")
    for key in PARAMS_KEYS:  # parameter counts may live in meta.json
        if key not in summary and isinstance(meta.get(key), int | float):
            summary[key] = meta[key]
    return Run(run_dir, config, summary)


@dataclass
class Source:
    """Run folders found under the report's arguments, plus what sweep files say."""

    run_dirs: list[Path] = field(default_factory=list)
    metric: dict[str, str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # first sweep's parameters section
    names: list[str] = field(default_factory=list)


def find_runs(paths: Iterable[str | Path]) -> Source:
    """Sweep folders (with state.json), single run folders, or folders holding run folders."""
    source = Source()
    for path in map(Path, paths):
        state_file = path / "state.json"
        if state_file.is_file():
            state = _read_json(state_file)
            config = state.get("config") or {}
            source.metric = source.metric or state.get("metric") or config.get("metric")
            source.parameters = source.parameters or config.get("parameters") or {}
            source.names.append(state.get("name", path.name))
            source.run_dirs += [path / run["run_dir"] for run in state.get("runs", [])]
        elif (path / "summary.json").is_file():
            source.run_dirs.append(path)
            source.names.append(path.name)
        elif path.is_dir():
            found = sorted(
                {p.parent for p in path.glob("**/summary.json") if "attempts" not in p.parts}
            )
            if not found:
                raise ValueError(f"{path}: no run folders (summary.json) below it")
            source.run_dirs += found
            source.names.append(path.name)
        else:
            raise ValueError(f"{path}: not a folder")
    return source


def latest_sweep(root: str | Path = "sweep_runs") -> Path:
    """The sweep folder under `root` whose state.json changed last."""
    states = sorted(Path(root).glob("*/state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        raise ValueError(f"no sweep folders under {root}/ (run `make sweep` first)")
    return states[-1].parent


# ----------------------------------------------------------------------------- statistics


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def factor_keys(
    runs: Sequence[Run], seed_keys: Sequence[str], ignore: re.Pattern = RUN_SPECIFIC
) -> list[str]:
    """Config keys whose values vary across runs, minus seeds and run-specific keys."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    factors = []
    for key in keys:
        if key in seed_keys or ignore.search(key):
            continue
        if len({_hashable(run.config.get(key)) for run in runs}) > 1:
            factors.append(key)
    return factors


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted component, or more where two keys would collide."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[-depth:])
            if sum(k.split(".")[-depth:] == parts[-depth:] for k in keys) == 1:
                break
        names[key] = name
    return names


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """n, mean, sample std and the t-distribution confidence interval of the mean."""
    from scipy import stats

    x = [v for v in values if not math.isnan(v)]
    n = len(x)
    mean = sum(x) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


@dataclass
class Cell:
    """Runs sharing every factor value (replicates over seeds)."""

    values: dict[str, Any]
    runs: list[Run]
    stats: dict[str, float] = field(default_factory=dict)

    def label(self, names: dict[str, str]) -> str:
        return ", ".join(f"{names[k]}={v}" for k, v in self.values.items()) or "all runs"


def group_cells(runs: Sequence[Run], factors: Sequence[str], metric: str) -> list[Cell]:
    """Group runs by factor values and compute each cell's statistics."""
    groups: dict[tuple, Cell] = {}
    for run in runs:
        key = tuple(_hashable(run.config.get(f)) for f in factors)
        cell = groups.setdefault(key, Cell({f: run.config.get(f) for f in factors}, []))
        cell.runs.append(run)
    for cell in groups.values():
        cell.stats = mean_ci([r.number([metric]) for r in cell.runs])
        for name, keys in (
            ("runtime_s", RUNTIME_KEYS),
            ("images_per_s", IMAGES_PER_S_KEYS),
            ("params", PARAMS_KEYS),
        ):
            vals = [r.number(keys) for r in cell.runs]
            vals = [v for v in vals if not math.isnan(v)]
            cell.stats[name] = sum(vals) / len(vals) if vals else math.nan
    return list(groups.values())


def rank_cells(cells: list[Cell], goal: str) -> list[Cell]:
    """Best first; cells without a metric last."""
    sign = -1.0 if goal.startswith("max") else 1.0
    return sorted(cells, key=lambda c: (math.isnan(c.stats["mean"]), sign * c.stats["mean"]))


def paired_difference(
    cell: Cell, baseline: Cell, metric: str, seed_keys: Sequence[str]
) -> dict[str, Any]:
    """cell - baseline, paired by seed (paired t-test); Welch's t-test when no seeds pair up."""
    from scipy import stats

    base = {r.seed(seed_keys): r.number([metric]) for r in baseline.runs}
    mine = {r.seed(seed_keys): r.number([metric]) for r in cell.runs}
    common = [s for s in mine if s in base and not (math.isnan(mine[s]) or math.isnan(base[s]))]
    if len(common) >= 1 and any(seed_keys):
        diffs = [mine[s] - base[s] for s in common]
        summary = mean_ci(diffs)
        with warnings.catch_warnings():  # identical differences: scipy warns, p is still right
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1 else math.nan
        return {
            "kind": "paired",
            "n": len(diffs),
            "diff": summary["mean"],
            "std": summary["std"],
            "p": p,
        }
    a = [v for v in mine.values() if not math.isnan(v)]
    b = [v for v in base.values() if not math.isnan(v)]
    diff = (sum(a) / len(a) - sum(b) / len(b)) if a and b else math.nan
    p = (
        float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        if len(a) > 1 and len(b) > 1
        else math.nan
    )
    return {"kind": "welch", "n": min(len(a), len(b)), "diff": diff, "std": math.nan, "p": p}


def parse_baseline(text: str, factors: Sequence[str], names: dict[str, str]) -> dict[str, str]:
    """`norm=batchnorm,drop=none` (short or full keys) -> {full key: value text}."""
    wanted = {}
    by_short = {names[k]: k for k in factors}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"--baseline {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        key, value = item.split("=", 1)
        full = key if key in factors else by_short.get(key)
        if full is None:
            raise ValueError(f"--baseline: {key!r} is not a factor; factors: {', '.join(by_short)}")
        wanted[full] = value
    return wanted


def choose_baseline(cells: list[Cell], wanted: dict[str, Any]) -> Cell | None:
    """The cell matching `wanted` (values compared as text); None when none matches."""
    for cell in cells:
        if all(str(cell.values.get(k)) == str(v) for k, v in wanted.items()):
            return cell
    return None


def default_baseline(cells: list[Cell], factors: Sequence[str], parameters: dict[str, Any]) -> Cell:
    """First listed value of each factor in the sweep file, else the best-ranked cell."""
    wanted = {}
    for key in factors:
        spec = parameters.get(key) or {}
        if isinstance(spec, dict) and spec.get("values"):
            wanted[key] = spec["values"][0]
    return (choose_baseline(cells, wanted) if len(wanted) == len(factors) else None) or cells[0]


def marginal_means(
    runs: Sequence[Run], factors: Sequence[str], metric: str
) -> dict[str, list[tuple[Any, dict]]]:
    """Per factor and value: statistics over all runs with that value (other factors pooled)."""
    out: dict[str, list[tuple[Any, dict]]] = {}
    for key in factors:
        values: list[Any] = []
        for run in runs:
            if _hashable(run.config.get(key)) not in [_hashable(v) for v in values]:
                values.append(run.config.get(key))
        out[key] = [
            (
                value,
                mean_ci(
                    [
                        r.number([metric])
                        for r in runs
                        if _hashable(r.config.get(key)) == _hashable(value)
                    ]
                ),
            )
            for value in values
        ]
    return out


# ----------------------------------------------------------------------------- curves and plots


def read_curve(run_dir: Path, column: str) -> dict[int, float]:
    """epoch -> last logged value of `column` in metrics.csv (Lightning CSV rows are sparse)."""
    curve: dict[int, float] = {}
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    curve[int(float(row["epoch"]))] = float(row[column])
                except (KeyError, ValueError, TypeError):
                    continue
    except OSError:
        pass
    return curve


def curve_column(runs: Sequence[Run], metric: str) -> str:
    """Plot the per-epoch metric (val/mAP) when the sweep metric is its running best."""
    base = metric[: -len("_best")] if metric.endswith("_best") else metric
    for run in runs:
        try:
            header = (run.dir / "metrics.csv").open().readline()
        except OSError:
            continue
        if base in header.strip().split(","):
            return base
    return metric


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(cells: list[Cell], names: dict[str, str], column: str, path: Path) -> Path | None:
    """Mean learning curve per cell with a min-max band over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for cell in cells:
        curves = [read_curve(r.dir, column) for r in cell.runs]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        per_epoch = [[c[e] for c in curves if e in c] for e in epochs]
        mean = [sum(v) / len(v) for v in per_epoch]
        (line,) = ax.plot(
            epochs, mean, marker="o", ms=3, label=f"{cell.label(names)} (n={len(cell.runs)})"
        )
        if len(cell.runs) > 1:
            ax.fill_between(
                epochs,
                [min(v) for v in per_epoch],
                [max(v) for v in per_epoch],
                color=line.get_color(),
                alpha=0.15,
            )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(
        xlabel="epoch", ylabel=column, title=f"{column} per cell (mean, band = min..max over seeds)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_factor_bars(
    marginals: dict[str, list[tuple[Any, dict]]], names: dict[str, str], metric: str, path: Path
) -> Path | None:
    """One panel per factor: marginal mean with its 95% confidence interval."""
    if not marginals:
        return None
    plt = _plt()
    width = max(6.0, 4.2 * len(marginals))
    fig, axes = plt.subplots(1, len(marginals), figsize=(width, 4.4), squeeze=False)
    for ax, (key, rows) in zip(axes[0], marginals.items()):
        labels = [str(v) for v, _ in rows]
        means = [s["mean"] for _, s in rows]
        errs = [0.0 if math.isnan(s["ci_high"]) else s["ci_high"] - s["mean"] for _, s in rows]
        ax.bar(labels, means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        ax.set(title=names[key], ylabel=metric)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{metric} by factor\n(mean over runs, error bar = 95% CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_norm_vs_batch(
    runs: Sequence[Run], factors: Sequence[str], metric: str, path: Path
) -> Path | None:
    """Metric against batch size, one line per norm (pooling any other factors)."""
    norm = next((k for k in factors if k.split(".")[-1] == "norm"), None)
    batch = next((k for k in factors if k.split(".")[-1] == "batch_size"), None)
    if norm is None or batch is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    for norm_value in dict.fromkeys(r.config.get(norm) for r in runs):
        xs, means, errs = [], [], []
        for bs in sorted({r.config.get(batch) for r in runs}, key=float):
            s = mean_ci(
                [
                    r.number([metric])
                    for r in runs
                    if r.config.get(norm) == norm_value and r.config.get(batch) == bs
                ]
            )
            if s["n"]:
                xs.append(float(bs))
                means.append(s["mean"])
                errs.append(0.0 if math.isnan(s["ci_high"]) else s["ci_high"] - s["mean"])
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=str(norm_value))
    ax.set_xscale("log", base=2)
    sizes = sorted({float(r.config.get(batch)) for r in runs})
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.set(
        xlabel="batch size (images per worker)",
        ylabel=metric,
        title=f"{metric} vs batch size per norm (95% CI)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the report


def _f(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _params(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x / 1e6:.2f}M" if x >= 1e5 else f"{int(x)}")


@dataclass
class Report:
    """Everything the report computed, and where it wrote it."""

    metric: str
    goal: str
    factors: list[str]
    cells: list[Cell]
    baseline: Cell | None
    differences: list[tuple[Cell, dict]]
    marginals: dict[str, list[tuple[Any, dict]]]
    skipped: list[Path]
    markdown: str = ""
    files: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def build_report(
    paths: Sequence[str | Path],
    metric: str | None = None,
    goal: str | None = None,
    baseline: str | None = None,
    seed_keys: Sequence[str] = SEED_KEYS,
) -> tuple[Report, list[Run], Source]:
    """Read the runs and compute cells, ranking, paired differences and marginal means."""
    source = find_runs(paths)
    metric = metric or (source.metric or {}).get("name") or DEFAULT_METRIC
    goal = goal or (source.metric or {}).get("goal") or "maximize"
    loaded = [load_run(d) for d in source.run_dirs]
    runs = [r for r in loaded if r.finished]
    skipped = [r.dir for r in loaded if not r.finished]
    if not runs:
        raise ValueError(
            f"no finished runs in {', '.join(map(str, paths))} ({len(skipped)} unfinished)"
        )
    factors = factor_keys(runs, seed_keys)
    order = list(source.parameters)  # the sweep file's order first
    factors.sort(key=lambda k: order.index(k) if k in order else len(order))
    names = short_names(factors)
    cells = rank_cells(group_cells(runs, factors, metric), goal)
    if baseline:
        base = choose_baseline(cells, parse_baseline(baseline, factors, names))
        if base is None:
            raise ValueError(f"--baseline {baseline!r} matches no cell")
    else:
        base = default_baseline(cells, factors, source.parameters)
    diffs = [(c, paired_difference(c, base, metric, seed_keys)) for c in cells if c is not base]
    report = Report(
        metric, goal, factors, cells, base, diffs, marginal_means(runs, factors, metric), skipped
    )
    return report, runs, source


def ranking_table(report: Report) -> str:
    """The ranked Markdown table: factors, n, mean ± std, 95% CI, runtime, images/s, params."""
    names = short_names(report.factors)
    m = report.metric
    header = [
        "rank",
        *(names[k] for k in report.factors),
        "n",
        f"{m} mean ± std",
        "95% CI",
        "runtime s",
        "images/s",
        "params",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, cell in enumerate(report.cells, 1):
        s = cell.stats
        mark = " (baseline)" if cell is report.baseline else ""
        row = [
            f"{rank}{mark}",
            *(str(cell.values[k]) for k in report.factors),
            str(s["n"]),
            f"{_f(s['mean'])} ± {_f(s['std'])}",
            f"[{_f(s['ci_low'])}, {_f(s['ci_high'])}]",
            _f(s["runtime_s"], 0),
            _f(s["images_per_s"], 1),
            _params(s["params"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_markdown(report: Report, title: str) -> str:
    """The report as Markdown: ranked table, paired differences, marginal means, plots."""
    names = short_names(report.factors)
    m = report.metric
    arrow = "higher" if report.goal.startswith("max") else "lower"
    n_runs = sum(len(c.runs) for c in report.cells)
    lines = [
        f"# {title}",
        "",
        f"{n_runs} finished runs in {len(report.cells)} cells; metric `{m}` ({arrow} is better); "
        f"cells = configurations minus the training seed ({', '.join(SEED_KEYS)}). "
        f"Factors: {', '.join(f'`{k}`' for k in report.factors) or 'none'}.",
    ]
    if report.skipped:
        lines.append(f"Left out: {len(report.skipped)} unfinished run(s).")
    lines += ["", "## Ranking", "", ranking_table(report)]
    if report.baseline is not None and report.differences:
        lines += [
            "",
            f"## Differences against the baseline ({report.baseline.label(names)})",
            "",
            "Paired by seed (same seed, same data order): mean ± std of the per-seed differences and the "
            "paired t-test p-value; Welch's t-test where seeds do not pair up.",
            "",
            f"| cell | Δ {m} | n pairs | p | test |",
            "|---|---|---|---|---|",
        ]
        for cell, d in report.differences:
            lines.append(
                f"| {cell.label(names)} | {_f(d['diff'], 4)} ± {_f(d['std'])} | {d['n']} | {_f(d['p'], 3)} | {d['kind']} |"
            )
    if report.marginals:
        lines += ["", "## Per-factor means (other factors pooled)", ""]
        for key, rows in report.marginals.items():
            lines += [
                f"**{names[key]}** (`{key}`)",
                "",
                f"| value | n | {m} mean ± std | 95% CI |",
                "|---|---|---|---|",
            ]
            for value, s in rows:
                lines.append(
                    f"| {value} | {s['n']} | {_f(s['mean'])} ± {_f(s['std'])} | [{_f(s['ci_low'])}, {_f(s['ci_high'])}] |"
                )
            lines.append("")
    if report.plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.plots]
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    metric: str | None = None,
    goal: str | None = None,
    baseline: str | None = None,
    seed_keys: Sequence[str] = SEED_KEYS,
) -> Report:
    """Compute the report and write report.md, report.csv, runs.csv and the PNG plots to `out`."""
    report, runs, source = build_report(paths, metric, goal, baseline, seed_keys)
    if out is None:
        out = (
            Path(paths[0]) / "report"
            if len(paths) == 1
            else Path("reports") / datetime.now().strftime("%Y%m%d-%H%M%S")
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = short_names(report.factors)
    column = curve_column(runs, report.metric)
    plots = [
        plot_curves(report.cells, names, column, out / "curves.png"),
        plot_factor_bars(report.marginals, names, report.metric, out / "factors.png"),
        plot_norm_vs_batch(runs, report.factors, report.metric, out / "norm_vs_batch.png"),
    ]
    report.plots = [p for p in plots if p is not None]
    title = f"Sweep report: {', '.join(source.names)}"
    report.markdown = render_markdown(report, title)
    # Diagnostics sections (issue 16), rendered from each run's diagnostics.json.
    from lit_spine.report_diagnostics import render_sections

    report.markdown += "\n" + render_sections(report.cells, lambda c: c.label(names), out)
    cell_rows = []
    for rank, cell in enumerate(report.cells, 1):
        row: dict[str, Any] = {"rank": rank, **{k: cell.values[k] for k in report.factors}}
        row.update({"metric": report.metric, **cell.stats, "baseline": cell is report.baseline})
        diff = next((d for c, d in report.differences if c is cell), None)
        if diff:
            row.update(
                {
                    "diff_vs_baseline": diff["diff"],
                    "diff_std": diff["std"],
                    "diff_n": diff["n"],
                    "diff_p": diff["p"],
                    "diff_test": diff["kind"],
                }
            )
        row["runs"] = " ".join(r.dir.name for r in cell.runs)
        cell_rows.append(row)
    run_rows = [
        {
            "run_dir": str(r.dir),
            **{k: r.config.get(k) for k in [*report.factors, *seed_keys]},
            report.metric: r.number([report.metric]),
            "runtime_s": r.number(RUNTIME_KEYS),
            "images_per_s": r.number(IMAGES_PER_S_KEYS),
            "params": r.number(PARAMS_KEYS),
        }
        for r in runs
    ]
    files = {
        "report.md": report.markdown,
        "report.csv": _csv_text(cell_rows),
        "runs.csv": _csv_text(run_rows),
    }
    for name, text in files.items():
        atomic_write_text(out / name, text)
    report.files = [out / name for name in files]
    return report


def print_report(
    paths: Sequence[str | Path], out: str | Path | None = None, **kwargs: Any
) -> Report:
    """Write the report and print its ranking table and where the files went."""
    report = write_report(paths, out, **kwargs)
    print(f"{report.metric} ({report.goal}), best first:")
    print(ranking_table(report))
    print("\nreport: " + ", ".join(str(p) for p in report.files))
    print("plots:  " + (", ".join(str(p) for p in report.plots) or "none"))
    return report


def cell_label(params: dict[str, Any], seed_keys: Sequence[str] = SEED_KEYS) -> str:
    """Short `norm=groupnorm,drop=0.1` label of a run's cell (for W&B run groups)."""
    keys = [k for k in params if k not in seed_keys]
    names = short_names(keys)
    return ",".join(f"{names[k]}={params[k]}" for k in keys) or "all"


def build_parser() -> argparse.ArgumentParser:
    """The `lit-spine report` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lit-spine report",
        description=(
            "Rank sweep cells (configuration minus training seed): mean ± std, n, 95% CI "
            "(t distribution), runtime, images/s, parameters; paired differences against a "
            "baseline cell; learning-curve, per-factor and norm-vs-batch-size plots."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="*",
        help="sweep folders (with state.json), run folders, or folders holding run folders",
    )
    parser.add_argument(
        "--latest",
        action="store_true",
        help="report the most recently updated sweep under --sweeps-root",
    )
    parser.add_argument(
        "--sweeps-root", default="sweep_runs", help="where --latest looks (default sweep_runs/)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: SWEEP_DIR/report for one folder, else reports/<time>)",
    )
    parser.add_argument(
        "--metric",
        default=None,
        help=f"metric to rank by (default: the sweep's, else {DEFAULT_METRIC})",
    )
    parser.add_argument(
        "--goal",
        choices=["maximize", "minimize"],
        default=None,
        help="default: the sweep's, else maximize",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="cell to compare against, e.g. 'norm=batchnorm' or 'norm=batchnorm,drop_rate=0.0' (short or full keys); "
        "default: the first listed value of every factor in the sweep file, else the best cell",
    )
    parser.add_argument(
        "--seed-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"config key(s) that only seed a replicate (default: {', '.join(SEED_KEYS)}); repeat for several",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lit-spine report`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        paths = list(args.paths)
        if args.latest:
            paths.append(str(latest_sweep(args.sweeps_root)))
        if not paths:
            parser.error("give sweep or run folders, or --latest")
        print_report(
            paths,
            args.out,
            metric=args.metric,
            goal=args.goal,
            baseline=args.baseline,
            seed_keys=tuple(args.seed_key or SEED_KEYS),
        )
    except ValueError as err:
        print(f"lit-spine report: {err}", file=sys.stderr)
        return 2
    return 0
