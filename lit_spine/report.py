"""`lit-spine report`: rank the cells of a sweep (configuration minus seed) with statistics and plots.

Reads run folders (summary.json, meta.json's config_flat or config.yaml, metrics.csv), groups
finished runs by every config key that varies across them except the training seed, and writes
`report.md`, `report.csv` (one row per cell), `runs.csv` (one row per run) and PNG plots:
learning curves per cell, a bar chart with 95% confidence intervals per factor and, when the
factors include a norm and the batch size, the metric against batch size per norm (the Group
Normalization paper's central experiment, Wu & He 2018, figure 1).

report.md states the protocol (budget, learning-rate rule, seeds, metric), marks runs that were
still improving at the end (`convergence`), and ends its analysis in a Verdict paragraph
generated from the numbers only (`verdict_text`). Statistics for few seeds: bootstrap intervals,
t-tests, noncentral-t power and normal quantiles come from scipy.stats; Holm's correction,
P(A>B) (Bouthillier et al. 2021) and the convergence rule are written here, since no
dependency has them.
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

from lit_spine import runs as run_folder
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


def _read_json(path: Path) -> dict[str, Any]:
    return run_folder.read_json(path)


@dataclass
class Run:
    """One run folder as the report sees it."""

    dir: Path
    config: dict[str, Any]  # flat dotted keys
    summary: dict[str, Any]
    convergence: dict[str, Any] = field(default_factory=dict)  # see convergence()

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
    """Read a run folder through lit_spine.runs (config: meta.json's config_flat, else
    config.yaml; sweep params win); parameter counts may live in meta.json."""
    meta = run_folder.read_meta(run_dir)
    summary = run_folder.read_summary(run_dir) or {}
    for key in PARAMS_KEYS:
        if key not in summary and isinstance(meta.get(key), int | float):
            summary[key] = meta[key]
    return Run(run_dir, run_folder.read_config(run_dir), summary)


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
        elif run_folder.is_run_dir(path):
            source.run_dirs.append(path)
            source.names.append(path.name)
        elif path.is_dir():
            found = run_folder.find_run_dirs(path)
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


# Small-n statistics. scipy.stats does the bootstrap, the t-tests and the normal quantiles;
# Holm's step-down correction, P(A>B) and the seed count are a few lines written here
# (scipy has no Holm, statsmodels is not a dependency).
ALPHA = 0.05  # two-sided significance level of every test and interval (95%)
POWER = 0.8  # power of the seed-count estimate
N_RESAMPLES = 9999
MIN_BOOTSTRAP_N = 3  # below this a bootstrap interval is meaningless: "n too small"
BOOTSTRAP_SEED = 0  # the same runs always give the same intervals


def bootstrap_ci(
    samples: Sequence[Sequence[float]],
    statistic: Any,
    paired: bool = False,
    method: str = "BCa",
    level: float = 1 - ALPHA,
) -> tuple[float, float, str]:
    """(low, high, method) of a `scipy.stats.bootstrap` interval, BCa falling back to percentile.

    `statistic(*samples, axis=-1)` must be vectorized. BCa is undefined when the resampled
    statistic does not vary or its acceleration is degenerate (scipy warns and returns NaN):
    then the percentile interval is used. Fewer than MIN_BOOTSTRAP_N values (in any sample):
    no interval, method "n too small".
    """
    import numpy as np
    from scipy import stats

    arrays = [np.asarray(x, dtype=float) for x in samples]
    if min(len(a) for a in arrays) < MIN_BOOTSTRAP_N:
        return math.nan, math.nan, "n too small"
    if all(np.ptp(a) == 0 for a in arrays):  # every resample gives the same statistic
        value = float(statistic(*arrays, axis=-1))
        return value, value, "none (no variation)"
    methods = [method] + (["percentile"] if method != "percentile" else [])
    for name in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning: handled by the fallback
            result = stats.bootstrap(
                tuple(arrays),
                statistic,
                n_resamples=N_RESAMPLES,
                paired=paired,
                vectorized=True,
                confidence_level=level,
                method=name,
                rng=np.random.default_rng(BOOTSTRAP_SEED),
            )
        low, high = (float(v) for v in result.confidence_interval)
        if math.isfinite(low) and math.isfinite(high):
            return low, high, name
    return math.nan, math.nan, "degenerate"


def _mean(x: Any, axis: int = -1) -> Any:
    import numpy as np

    return np.mean(x, axis=axis)


def _mean_difference(a: Any, b: Any, axis: int = -1) -> Any:
    import numpy as np

    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _prob_paired(a: Any, b: Any, axis: int = -1) -> Any:
    import numpy as np

    return np.mean(a > b, axis=axis) + 0.5 * np.mean(a == b, axis=axis)


def _prob_unpaired(a: Any, b: Any, axis: int = -1) -> Any:
    import numpy as np

    a, b = np.moveaxis(a, axis, -1)[..., :, None], np.moveaxis(b, axis, -1)[..., None, :]
    return np.mean(a > b, axis=(-2, -1)) + 0.5 * np.mean(a == b, axis=(-2, -1))


def probability_of_improvement(a: Sequence[float], b: Sequence[float], paired: bool) -> float:
    """P(A>B) (Bouthillier et al. 2021): share of seeds where A beats B, ties counting 1/2.

    Paired: over the seed pairs (a_i, b_i); unpaired: over all pairs (a_i, b_j), which is the
    Mann-Whitney U statistic divided by n_a * n_b. "Beats" means larger: pass negated values
    for a metric to minimize.
    """
    import numpy as np

    fn = _prob_paired if paired else _prob_unpaired
    return float(fn(np.asarray(a, dtype=float), np.asarray(b, dtype=float)))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family = the finite ones); NaN stays NaN."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))  # monotone step-down
        adjusted[i] = running
    return adjusted


def paired_t_power(n: int, effect: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test with n pairs at effect size |mean| / std (noncentral t)."""
    from scipy import stats

    df = n - 1
    t_crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(effect) * math.sqrt(n)
    return float(stats.nct.sf(t_crit, df, nc) + stats.nct.cdf(-t_crit, df, nc))


def seeds_to_separate(
    difference: float, std_difference: float, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Seeds per cell for a paired t-test to detect `difference` given the paired differences' std.

    The smallest n whose power (noncentral t, `paired_t_power`) reaches `power`, searched from
    the normal approximation n_z = ((z_{1-alpha/2} + z_{power}) * std / |difference|)^2, which
    it approaches for large n; None when the difference is 0 or the std unknown.
    """
    from scipy import stats

    if not (math.isfinite(difference) and math.isfinite(std_difference)) or difference == 0:
        return None
    if std_difference == 0:
        return 2  # no spread: any two pairs already separate them
    effect = abs(difference) / std_difference
    z = float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    n = max(2, math.floor((z / effect) ** 2))
    while paired_t_power(n, effect, alpha) < power:
        n += 1
    return n


def mean_ci(values: Sequence[float], level: float = 1 - ALPHA) -> dict[str, Any]:
    """n, mean, sample std, the t interval of the mean (ci_low/ci_high) and a bootstrap one.

    The bootstrap interval (boot_low/boot_high, method in boot_method) is what the report
    shows: BCa, percentile where BCa is degenerate, none below MIN_BOOTSTRAP_N values.
    """
    from scipy import stats

    x = [v for v in values if not math.isnan(v)]
    n = len(x)
    mean = sum(x) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    low, high, method = bootstrap_ci([x], _mean, level=level) if n else (math.nan,) * 2 + ("",)
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "boot_low": low,
        "boot_high": high,
        "boot_method": method,
    }


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
        statuses = [r.convergence.get("status") for r in cell.runs]
        cell.stats["not_converged"] = statuses.count("not converged")
        cell.stats["too_short"] = statuses.count("too short")
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
    cell: Cell,
    baseline: Cell,
    metric: str,
    seed_keys: Sequence[str],
    goal: str = "maximize",
) -> dict[str, Any]:
    """cell - baseline: paired by seed (paired t-test) or, when no seeds pair up, Welch's t-test.

    Also the difference's bootstrap interval (diff_low/diff_high), P(A>B) = the probability that
    this cell beats the baseline (for `goal`) with its percentile bootstrap interval, and the
    seeds per cell that would detect the observed difference (paired only).
    """
    from scipy import stats

    base = {r.seed(seed_keys): r.number([metric]) for r in baseline.runs}
    mine = {r.seed(seed_keys): r.number([metric]) for r in cell.runs}
    common = [s for s in mine if s in base and not (math.isnan(mine[s]) or math.isnan(base[s]))]
    sign = 1.0 if goal.startswith("max") else -1.0
    if len(common) >= 1 and any(seed_keys):
        a = [mine[s] for s in common]
        b = [base[s] for s in common]
        diffs = [x - y for x, y in zip(a, b)]
        summary = mean_ci(diffs)
        with warnings.catch_warnings():  # identical differences: scipy warns, p is still right
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1 else math.nan
        a_better = [sign * v for v in a]
        b_better = [sign * v for v in b]
        prob_low, prob_high, _ = bootstrap_ci(
            [a_better, b_better], _prob_paired, paired=True, method="percentile"
        )
        return {
            "kind": "paired",
            "n": len(diffs),
            "diff": summary["mean"],
            "std": summary["std"],
            "p": p,
            "diff_low": summary["boot_low"],
            "diff_high": summary["boot_high"],
            "diff_method": summary["boot_method"],
            "p_better": probability_of_improvement(a_better, b_better, paired=True),
            "p_better_low": prob_low,
            "p_better_high": prob_high,
            "seeds_needed": seeds_to_separate(summary["mean"], summary["std"]),
        }
    a = [v for v in mine.values() if not math.isnan(v)]
    b = [v for v in base.values() if not math.isnan(v)]
    diff = (sum(a) / len(a) - sum(b) / len(b)) if a and b else math.nan
    p = (
        float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        if len(a) > 1 and len(b) > 1
        else math.nan
    )
    low, high, method = bootstrap_ci([a, b], _mean_difference) if a and b else (math.nan,) * 3
    a_better = [sign * v for v in a]
    b_better = [sign * v for v in b]
    prob_low, prob_high, _ = (
        bootstrap_ci([a_better, b_better], _prob_unpaired, method="percentile")
        if a and b
        else (math.nan,) * 3
    )
    return {
        "kind": "welch",
        "n": min(len(a), len(b)),
        "diff": diff,
        "std": math.nan,
        "p": p,
        "diff_low": low,
        "diff_high": high,
        "diff_method": method,
        "p_better": probability_of_improvement(a_better, b_better, paired=False)
        if a and b
        else math.nan,
        "p_better_low": prob_low,
        "p_better_high": prob_high,
        "seeds_needed": None,
    }


def compare_all(
    cells: Sequence[Cell], reference: Cell, metric: str, seed_keys: Sequence[str], goal: str
) -> list[tuple[Cell, dict]]:
    """Every other cell against `reference`, with Holm-adjusted p-values (p_holm) over them."""
    diffs = [
        (c, paired_difference(c, reference, metric, seed_keys, goal))
        for c in cells
        if c is not reference
    ]
    for (_, d), adjusted in zip(diffs, holm([d["p"] for _, d in diffs])):
        d["p_holm"] = adjusted
    return diffs


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


def curve_column(runs: Sequence[Run], metric: str) -> str:
    """Plot the per-epoch metric (val/mAP) when the sweep metric is its running best."""
    base = metric[: -len("_best")] if metric.endswith("_best") else metric
    for run in runs:
        if base in run_folder.read_metrics(run.dir).columns:
            return base
    return metric


# The convergence rule (documented in README, "Sweeps and the report"): a run is "not
# converged" when the best per-epoch value in its last quarter of epochs beats the best value
# before that quarter by more than CONVERGE_REL of the curve's whole range (max - min over all
# epochs) and by more than CONVERGE_ABS in metric units; with fewer than CONVERGE_MIN_EPOCHS
# epochs it is "too short" to judge.
CONVERGE_TAIL = 0.25
CONVERGE_REL = 0.05
CONVERGE_ABS = 0.005
CONVERGE_MIN_EPOCHS = 4


def convergence(
    curve: dict[int, float],
    goal: str = "maximize",
    tail: float = CONVERGE_TAIL,
    rel_tol: float = CONVERGE_REL,
    abs_tol: float = CONVERGE_ABS,
) -> dict[str, Any]:
    """Whether a learning curve (epoch -> metric) was still improving in its last `tail`."""
    values = [v for _, v in sorted(curve.items()) if math.isfinite(v)]
    if len(values) < CONVERGE_MIN_EPOCHS:
        return {"status": "too short", "epochs": len(values), "gain": math.nan, "tol": math.nan}
    sign = 1.0 if goal.startswith("max") else -1.0
    k = max(1, math.ceil(tail * len(values)))
    head, last = values[:-k], values[-k:]
    gain = sign * (max(last) - max(head)) if sign > 0 else sign * (min(last) - min(head))
    tol = max(rel_tol * (max(values) - min(values)), abs_tol)
    status = "not converged" if gain > tol else "converged"
    return {"status": status, "epochs": len(values), "gain": gain, "tol": tol}


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
        curves = [run_folder.read_curve(r.dir, column) for r in cell.runs]
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


def _error_bar(s: dict[str, Any]) -> tuple[float, float]:
    """(below, above) the mean to the bootstrap interval's ends; (0, 0) without an interval."""
    if math.isnan(s["boot_low"]) or math.isnan(s["boot_high"]):
        return 0.0, 0.0
    return max(0.0, s["mean"] - s["boot_low"]), max(0.0, s["boot_high"] - s["mean"])


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
        errs = list(zip(*(_error_bar(s) for _, s in rows)))
        ax.bar(labels, means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
        ax.set(title=names[key], ylabel=metric)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{metric} by factor\n(mean over runs, error bar = 95% bootstrap CI)", fontsize=10)
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
                errs.append(_error_bar(s))
        yerr = list(zip(*errs)) if errs else None
        ax.errorbar(xs, means, yerr=yerr, marker="o", capsize=3, label=str(norm_value))
    ax.set_xscale("log", base=2)
    sizes = sorted({float(r.config.get(batch)) for r in runs})
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.set(
        xlabel="batch size (images per worker)",
        ylabel=metric,
        title=f"{metric} vs batch size per norm (95% bootstrap CI)",
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


def _interval(low: float, high: float, digits: int = 3) -> str:
    """`[low, high]`, or "n too small" when there is no interval."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "n too small"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _p(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


@dataclass
class Report:
    """Everything the report computed, and where it wrote it."""

    metric: str
    goal: str
    factors: list[str]
    cells: list[Cell]
    baseline: Cell | None
    differences: list[tuple[Cell, dict]]  # against the baseline, Holm over them
    marginals: dict[str, list[tuple[Any, dict]]]
    skipped: list[Path]
    versus_best: list[tuple[Cell, dict]] = field(default_factory=list)  # against cells[0]
    norm_batch: dict[str, Any] | None = None
    protocol: str = ""
    curve_column: str = ""
    seed_keys: tuple[str, ...] = SEED_KEYS
    title: str = "Sweep report"
    verdict: str = ""
    markdown: str = ""
    files: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    @property
    def names(self) -> dict[str, str]:
        return short_names(self.factors)

    @property
    def runs(self) -> list[Run]:
        return [r for c in self.cells for r in c.runs]


def _distinct(runs: Sequence[Run], key: str, summary: bool = False) -> list[Any]:
    values: list[Any] = []
    for run in runs:
        value = (run.summary if summary else run.config).get(key)
        if value is not None and _hashable(value) not in map(_hashable, values):
            values.append(value)
    return values


def _span(values: Sequence[Any]) -> str:
    if not values:
        return "not recorded"
    if len(values) == 1:
        return f"{values[0]}"
    try:
        return f"{min(values)}-{max(values)}"
    except TypeError:
        return "/".join(map(str, values))


def protocol_line(report: Report) -> str:
    """Budget, learning-rate rule, seeds per cell, metric and goal, read from the runs' configs."""
    runs = report.runs
    max_epochs = _distinct(runs, "trainer.max_epochs")
    max_steps = [v for v in _distinct(runs, "trainer.max_steps") if v not in (-1, None)]
    budget = f"trainer.max_epochs {_span(max_epochs)}"
    if max_steps:
        budget += f", trainer.max_steps {_span(max_steps)}"
    epochs = _distinct(runs, "epochs", summary=True)
    steps = _distinct(runs, "global_step", summary=True)
    ran = [f"{_span(epochs)} epochs"] if epochs else []
    ran += [f"{_span(steps)} optimizer steps"] if steps else []
    if ran:
        budget += f" (ran {', '.join(ran)} per run)"
    rules = _distinct(runs, "model.lr_scaling")
    refs = _distinct(runs, "model.lr_reference_batch")
    lrs = _distinct(runs, "model.lr")
    optimizers = _distinct(runs, "model.optimizer")
    lr = f"{_span(optimizers)} at lr {_span(lrs)}" if lrs else "lr not recorded"
    if not rules:
        lr += ", lr_scaling not recorded (runs from before the option: none)"
    elif rules == ["none"]:
        lr += ", lr_scaling none (the same lr at every batch size)"
    else:
        lr += (
            f" given at batch {_span(refs)}, lr_scaling {_span(rules)} "
            "(effective lr = lr x batch/reference, or its square root for sqrt)"
        )
    counts = sorted({c.stats["n"] for c in report.cells})
    seeds = [v for k in report.seed_keys for v in _distinct(runs, k)]
    seed_text = f"{_span(counts)} seeds per cell"
    if seeds:
        seed_text += f" ({', '.join(report.seed_keys)} in {sorted(seeds, key=str)})"
    arrow = "higher" if report.goal.startswith("max") else "lower"
    return (
        f"**Protocol.** Budget: {budget}. Learning rate: {lr}. Seeds: {seed_text}. "
        f"Metric: `{report.metric}` ({report.goal}: {arrow} is better)."
    )


STATISTICS_TEXT = (
    f"**Statistics.** Intervals are {100 * (1 - ALPHA):.0f}% bootstrap intervals "
    f"(`scipy.stats.bootstrap`, {N_RESAMPLES} resamples, BCa; percentile where BCa is "
    f"degenerate; none below {MIN_BOOTSTRAP_N} seeds: 'n too small'); with few seeds they are "
    "narrower than their nominal level, so decisions use the test. Differences are paired by "
    "seed; p is the paired t-test (Welch's t-test where no seeds pair up), Holm-corrected over "
    f"all comparisons with the same reference cell (family-wise α = {ALPHA}). P(A>B) is the "
    "probability that a cell (A) beats the reference (B) on a seed (Bouthillier et al. 2021; "
    "ties count 1/2), with a percentile bootstrap interval over the seed pairs. 'Seeds to "
    "separate' is the smallest number of seeds per cell at which a paired t-test at "
    f"α = {ALPHA} detects the observed mean difference δ with power {POWER}, given the std "
    "σ_d of the paired differences (noncentral t; for many seeds it approaches "
    f"n = ((z(1-α/2) + z({POWER})) σ_d / δ)²)."
)


def convergence_note(report: Report) -> str:
    """How many runs were still improving at the end, per cell, and the rule."""
    runs = report.runs
    rule = (
        f"still improving = the best `{report.curve_column}` of the last "
        f"{CONVERGE_TAIL:.0%} of epochs beats the best before by more than "
        f"{CONVERGE_REL:.0%} of the curve's range and more than {CONVERGE_ABS}"
    )
    bad = [r for r in runs if r.convergence.get("status") == "not converged"]
    short = [r for r in runs if r.convergence.get("status") == "too short"]
    names = report.names
    if bad:
        per_cell = ", ".join(
            f"{c.label(names)}: {c.stats['not_converged']}/{len(c.runs)}"
            for c in report.cells
            if c.stats.get("not_converged")
        )
        text = (
            f"**Not converged: {len(bad)} of {len(runs)} runs** ({per_cell}) were still "
            f"improving in their last quarter of epochs ({rule}); those cells' ranks measure "
            "speed of learning in this budget, not final quality."
        )
    elif len(short) < len(runs):
        judged = len(runs) - len(short)
        text = f"Convergence: all {judged} judged runs reached a plateau ({rule})."
    else:
        text = f"Convergence: not judged ({rule})."
    if short:
        text += (
            f" {len(short)} run(s) have fewer than {CONVERGE_MIN_EPOCHS} logged epochs of "
            f"`{report.curve_column}`: too short to judge."
        )
    return text


def _better(report: Report, d: dict) -> float:
    """The difference signed so that positive means better for the report's goal."""
    return d["diff"] if report.goal.startswith("max") else -d["diff"]


def _significant(d: dict) -> bool:
    return math.isfinite(d.get("p_holm", math.nan)) and d["p_holm"] < ALPHA


def norm_vs_batch_analysis(report: Report) -> dict[str, Any] | None:
    """Per norm: the change from the largest to the smallest batch, paired by seed.

    Other factors are pooled, runs paired by seed and the other factors' values; p-values are
    Holm-corrected over the norms. None unless the factors include a norm and a batch size
    with at least two batch sizes.
    """
    norm = next((k for k in report.factors if k.split(".")[-1] == "norm"), None)
    batch = next((k for k in report.factors if k.split(".")[-1] == "batch_size"), None)
    if norm is None or batch is None:
        return None
    runs = report.runs
    batches = sorted({r.config.get(batch) for r in runs}, key=float)
    if len(batches) < 2:
        return None
    small, large = batches[0], batches[-1]
    others = [k for k in report.factors if k not in (norm, batch)]
    pair_keys = (*report.seed_keys, *others)
    rows: dict[str, dict] = {}
    for value in _distinct(runs, norm):
        at = {
            b: Cell(
                {}, [r for r in runs if r.config.get(norm) == value and r.config.get(batch) == b]
            )
            for b in (small, large)
        }
        if not (at[small].runs and at[large].runs):
            continue
        for cell in at.values():
            cell.stats = mean_ci([r.number([report.metric]) for r in cell.runs])
        d = paired_difference(at[small], at[large], report.metric, pair_keys, report.goal)
        d["small_mean"], d["large_mean"] = at[small].stats["mean"], at[large].stats["mean"]
        rows[str(value)] = d
    for d, adjusted in zip(rows.values(), holm([d["p"] for d in rows.values()])):
        d["p_holm"] = adjusted
    bn, gn = rows.get("batchnorm"), rows.get("groupnorm")

    def degraded(d: dict) -> bool:
        return _significant(d) and _better(report, d) < 0

    if bn is None or gn is None:
        held = None
        reason = "needs batchnorm and groupnorm cells at both batch sizes"
    elif not (math.isfinite(bn.get("p_holm", math.nan)) and math.isfinite(gn["p_holm"])):
        held = None
        reason = "cannot be tested: fewer than 2 paired seeds per norm"
    elif degraded(bn) and not degraded(gn):
        held, reason = True, "BatchNorm degraded at the small batch and GroupNorm did not"
    elif not degraded(bn) and not degraded(gn):
        held, reason = False, "BatchNorm did not degrade significantly at the small batch"
    elif degraded(bn):
        held, reason = False, "GroupNorm degraded at the small batch too"
    else:
        held, reason = False, "GroupNorm degraded at the small batch and BatchNorm did not"
    return {
        "norm_key": norm,
        "batch_key": batch,
        "small": small,
        "large": large,
        "rows": rows,
        "held": held,
        "reason": reason,
    }


def _ci(low: float, high: float, digits: int = 3) -> str:
    """`95% CI [low, high]`, or `no CI (n too small)`."""
    text = _interval(low, high, digits)
    return f"95% CI {text}" if text.startswith("[") else f"no CI ({text})"


def _effect(report: Report, d: dict) -> str:
    text = f"Δ {d['diff']:+.3f}, {_ci(d['diff_low'], d['diff_high'])}"
    p = d.get("p_holm", math.nan)
    return text + (f", p_Holm {_p(p)}" if math.isfinite(p) else ", untested")


def verdict_text(report: Report) -> str:
    """The verdict paragraph, generated from the numbers only."""
    names, m = report.names, report.metric
    ranked = [c for c in report.cells if not math.isnan(c.stats["mean"])]
    if not ranked:
        return f"No run has a value for `{m}`: nothing to rank."
    best = ranked[0]
    s = best.stats
    parts = []
    if len(report.cells) == 1:
        parts.append(
            f"One cell only ({best.label(names)}, {m} {s['mean']:.3f}, "
            f"{_ci(s['boot_low'], s['boot_high'])}, n={s['n']}): nothing to compare."
        )
    else:
        parts.append(
            f"Best: {best.label(names)} with {m} {s['mean']:.3f} "
            f"({_ci(s['boot_low'], s['boot_high'])}, n={s['n']})."
        )

    def tested(d: dict) -> bool:
        return math.isfinite(d.get("p_holm", math.nan))

    same = [(c, d) for c, d in report.versus_best if not _significant(d)]
    worse = [(c, d) for c, d in report.versus_best if _significant(d)]
    for group, intro in (
        (
            [x for x in same if tested(x[1])],
            f"Indistinguishable from it at n={s['n']} (Holm-corrected paired t-test, p ≥ {ALPHA})",
        ),
        (
            [x for x in same if not tested(x[1])],
            "Not testable against it (fewer than 2 paired seeds)",
        ),
    ):
        if group:
            listed = "; ".join(
                f"{c.label(names)} ({_effect(report, d)}, P(A>B) {_f(d['p_better'], 2)}"
                + (
                    f" {_interval(d['p_better_low'], d['p_better_high'], 2)})"
                    if math.isfinite(d["p_better_low"])
                    else ")"
                )
                for c, d in group
            )
            parts.append(f"{intro}: {listed}.")
    if not same and report.versus_best:
        parts.append(f"Every other cell is worse (Holm-corrected paired t-test, p < {ALPHA}).")
    if worse:
        listed = "; ".join(
            f"{c.label(names)} by {abs(d['diff']):.3f} ({_effect(report, d)})" for c, d in worse
        )
        parts.append(f"Worse: {listed}.")
    bad = [c for c in report.cells if c.stats.get("not_converged")]
    if bad:
        n_bad = sum(c.stats["not_converged"] for c in bad)
        cells_text = ", ".join(
            f"{c.label(names)} ({c.stats['not_converged']}/{len(c.runs)})" for c in bad
        )
        parts.append(
            f"Not converged: {n_bad} of {len(report.runs)} runs, in {cells_text}; "
            "their ranking reflects learning speed in this budget."
        )
    elif any(r.convergence.get("status") == "converged" for r in report.runs):
        parts.append("Every judged run reached a plateau.")
    else:
        parts.append(f"Convergence not judged (fewer than {CONVERGE_MIN_EPOCHS} epochs).")
    nb = report.norm_batch
    if nb is not None:
        rows = "; ".join(
            f"{norm} {d['large_mean']:.3f} at batch {nb['large']} -> {d['small_mean']:.3f} at "
            f"batch {nb['small']} ({_effect(report, d)}, n={d['n']})"
            for norm, d in nb["rows"].items()
        )
        word = {True: "held", False: "did not hold", None: "could not be judged"}[nb["held"]]
        parts.append(
            "The GroupNorm paper's direction (BatchNorm degrades at small batch, GroupNorm "
            f"does not) {word} on this data: {nb['reason']}. {rows}."
        )
        if _distinct(report.runs, "model.lr_scaling") in ([], ["none"]):
            parts.append(
                "Caution: lr_scaling none with fixed epochs, so small batches took more "
                "optimizer steps at the same lr; use lr_scaling linear to follow the paper."
            )
    nxt = []
    for c, d in same:
        need = d.get("seeds_needed")
        if d["kind"] == "paired" and d["diff"] == 0:
            nxt.append(
                f"{c.label(names)} has the same mean as {best.label(names)} over these seeds: "
                "no seed count is predicted to separate them"
            )
        elif need is not None and d["kind"] == "paired":
            more = max(0, need - d["n"])
            nxt.append(
                f"{need} seeds per cell ({more} more) would separate {best.label(names)} "
                f"from {c.label(names)} if the observed difference of {abs(d['diff']):.3f} "
                f"is real (power {POWER}, α {ALPHA})"
            )
        else:
            nxt.append(
                f"{c.label(names)}: too few paired seeds to estimate; run at least "
                f"{MIN_BOOTSTRAP_N} shared seeds per cell"
            )
    if bad:
        nxt.append("train the unconverged cells longer (more epochs) before trusting their rank")
    if nxt:
        parts.append("Next: " + "; ".join(nxt) + ".")
    return " ".join(parts)


def build_report(
    paths: Sequence[str | Path],
    metric: str | None = None,
    goal: str | None = None,
    baseline: str | None = None,
    seed_keys: Sequence[str] = SEED_KEYS,
) -> tuple[Report, list[Run], Source]:
    """Read the runs and compute cells, convergence, ranking, comparisons and the verdict."""
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
    column = curve_column(runs, metric)
    for run in runs:
        run.convergence = convergence(run_folder.read_curve(run.dir, column), goal)
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
    report = Report(
        metric,
        goal,
        factors,
        cells,
        base,
        compare_all(cells, base, metric, seed_keys, goal),
        marginal_means(runs, factors, metric),
        skipped,
        versus_best=compare_all(cells, cells[0], metric, seed_keys, goal),
        curve_column=column,
        seed_keys=tuple(seed_keys),
        title=f"Sweep report: {', '.join(source.names)}",
    )
    report.norm_batch = norm_vs_batch_analysis(report)
    report.protocol = protocol_line(report)
    report.verdict = verdict_text(report)
    return report, runs, source


def ranking_table(report: Report) -> str:
    """The ranked Markdown table: factors, n, mean ± std, bootstrap CI, convergence, costs."""
    names = report.names
    m = report.metric
    header = [
        "rank",
        *(names[k] for k in report.factors),
        "n",
        f"{m} mean ± std",
        "95% CI (bootstrap)",
        "not converged",
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
            _interval(s["boot_low"], s["boot_high"], 4),
            f"{s.get('not_converged', 0)}/{len(cell.runs)}",
            _f(s["runtime_s"], 0),
            _f(s["images_per_s"], 1),
            _params(s["params"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _header_section(report: Report) -> list[str]:
    n_runs = len(report.runs)
    lines = [
        f"# {report.title}",
        "",
        f"{n_runs} finished runs in {len(report.cells)} cells; cells = configurations minus "
        f"the training seed ({', '.join(report.seed_keys)}). "
        f"Factors: {', '.join(f'`{k}`' for k in report.factors) or 'none'}.",
    ]
    if report.skipped:
        lines.append(f"Left out: {len(report.skipped)} unfinished run(s).")
    return lines


def _protocol_section(report: Report) -> list[str]:
    return [
        "## Protocol",
        "",
        report.protocol,
        "",
        convergence_note(report),
        "",
        STATISTICS_TEXT,
    ]


def _verdict_section(report: Report) -> list[str]:
    return ["## Verdict", "", report.verdict]


def _ranking_section(report: Report) -> list[str]:
    return ["## Ranking", "", ranking_table(report)]


def _differences_section(report: Report) -> list[str]:
    if report.baseline is None or not report.differences:
        return []
    m = report.metric
    lines = [
        f"## Differences against the baseline ({report.baseline.label(report.names)})",
        "",
        "Δ = cell - baseline over shared seeds (mean ± std of the per-seed differences); "
        "P(A>B): A = the cell, B = the baseline; p: paired t-test (Welch's where seeds do not "
        "pair up), Holm-corrected over this table.",
        "",
        f"| cell | Δ {m} | 95% CI of Δ | n pairs | P(A>B) | 95% CI of P(A>B) | p | p (Holm) "
        "| seeds to separate | test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, d in report.differences:
        need = d.get("seeds_needed")
        lines.append(
            f"| {cell.label(report.names)} | {_f(d['diff'])} ± {_f(d['std'])} "
            f"| {_interval(d['diff_low'], d['diff_high'], 4)} | {d['n']} "
            f"| {_f(d['p_better'], 2)} | {_interval(d['p_better_low'], d['p_better_high'], 2)} "
            f"| {_p(d['p'])} | {_p(d['p_holm'])} | {need if need is not None else '-'} "
            f"| {d['kind']} |"
        )
    return lines


def _norm_batch_section(report: Report) -> list[str]:
    nb = report.norm_batch
    if nb is None:
        return []
    lines = [
        "## Norm vs batch size",
        "",
        f"Change of `{report.metric}` from batch {nb['large']} to batch {nb['small']} per "
        "norm, paired by seed (other factors pooled), Holm-corrected over the norms.",
        "",
        f"| norm | batch {nb['large']} | batch {nb['small']} | Δ | 95% CI of Δ | n pairs "
        "| p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for norm, d in nb["rows"].items():
        lines.append(
            f"| {norm} | {_f(d['large_mean'])} | {_f(d['small_mean'])} | {_f(d['diff'])} "
            f"| {_interval(d['diff_low'], d['diff_high'], 4)} | {d['n']} | {_p(d['p_holm'])} |"
        )
    return lines


def _marginals_section(report: Report) -> list[str]:
    if not report.marginals:
        return []
    m, names = report.metric, report.names
    lines = ["## Per-factor means (other factors pooled)", ""]
    for key, rows in report.marginals.items():
        lines += [
            f"**{names[key]}** (`{key}`)",
            "",
            f"| value | n | {m} mean ± std | 95% CI (bootstrap) |",
            "|---|---|---|---|",
        ]
        for value, s in rows:
            lines.append(
                f"| {value} | {s['n']} | {_f(s['mean'])} ± {_f(s['std'])} "
                f"| {_interval(s['boot_low'], s['boot_high'], 4)} |"
            )
        lines.append("")
    return lines


def _plots_section(report: Report) -> list[str]:
    if not report.plots:
        return []
    return ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.plots]


# The report's Markdown sections in order; each maps the Report to lines (empty: left out).
# Further sections (e.g. diagnostics) are added to this list.
SECTIONS: list[Any] = [
    _header_section,
    _protocol_section,
    _verdict_section,
    _ranking_section,
    _differences_section,
    _norm_batch_section,
    _marginals_section,
    _plots_section,
]


def render_markdown(report: Report, title: str | None = None) -> str:
    """The report as Markdown: every section of SECTIONS in order, separated by blank lines."""
    if title is not None:
        report.title = title
    blocks = [lines for lines in (section(report) for section in SECTIONS) if lines]
    return "\n\n".join("\n".join(lines).rstrip() for lines in blocks) + "\n"


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
    names = report.names
    plots = [
        plot_curves(report.cells, names, report.curve_column, out / "curves.png"),
        plot_factor_bars(report.marginals, names, report.metric, out / "factors.png"),
        plot_norm_vs_batch(runs, report.factors, report.metric, out / "norm_vs_batch.png"),
    ]
    report.plots = [p for p in plots if p is not None]
    report.markdown = render_markdown(report)
    # The diagnostics sections read each run's diagnostics.json and draw their own plots.
    from lit_spine.report_diagnostics import render_sections

    report.markdown += "\n" + render_sections(report.cells, lambda c: c.label(names), out)
    report.plots += sorted(out.glob("diagnostics_*.png"))
    versus_best = {id(c): d for c, d in report.versus_best}
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
                    "diff_ci_low": diff["diff_low"],
                    "diff_ci_high": diff["diff_high"],
                    "diff_p_holm": diff["p_holm"],
                    "p_better_than_baseline": diff["p_better"],
                    "p_better_ci_low": diff["p_better_low"],
                    "p_better_ci_high": diff["p_better_high"],
                    "seeds_to_separate": diff["seeds_needed"],
                }
            )
        best = versus_best.get(id(cell))
        if best:
            row.update({"diff_vs_best": best["diff"], "p_holm_vs_best": best["p_holm"]})
        row["runs"] = " ".join(r.dir.name for r in cell.runs)
        cell_rows.append(row)
    run_rows = [
        {
            "run_dir": str(r.dir),
            **{k: r.config.get(k) for k in [*report.factors, *seed_keys]},
            report.metric: r.number([report.metric]),
            "converged": r.convergence.get("status"),
            "last_quarter_gain": r.convergence.get("gain"),
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
    """Write the report; print its protocol, ranking table, files and, last, the verdict."""
    report = write_report(paths, out, **kwargs)
    print(report.protocol.replace("**", ""))
    print(convergence_note(report).replace("**", ""))
    print(f"\n{report.metric} ({report.goal}), best first:")
    print(ranking_table(report))
    print("\nreport: " + ", ".join(str(p) for p in report.files))
    print("plots:  " + (", ".join(str(p) for p in report.plots) or "none"))
    print("\nVerdict: " + report.verdict)
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
            "Rank sweep cells (configuration minus training seed): mean ± std, n, 95% "
            "bootstrap CI, runs not converged, runtime, images/s, parameters; paired differences, "
            "P(A>B), Holm-corrected p-values and seeds to separate against a baseline cell; "
            "the protocol and a verdict in words; learning-curve, per-factor and "
            "norm-vs-batch-size plots."
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
