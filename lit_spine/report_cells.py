"""The report's analysis: run folders -> finished runs -> cells -> ranking and comparisons.

A cell is the set of runs sharing every factor value (a factor: a config key that varies
across the runs, except the training seed and run-specific keys such as paths); its runs are
replicates over seeds. This module finds the runs (sweep folders, run folders, folders of
run folders; read through lit_spine.runs), groups them into cells, ranks them, compares each
cell with a reference cell (paired by seed, Holm over the family), pools per factor, and runs
the norm-vs-batch-size analysis. The numbers come from lit_spine.report_stats; the words
about them are lit_spine.report_verdict's.

Runs are `Run` objects made from the rows of `runs.load_runs` (the one loader of run
folders): its columns keep each value's JSON type, so a factor's value is the same in labels
and report.csv whichever file its run left. Cells are grouped by a dict rather than
`DataFrame.groupby`, because a list value (a drop schedule) cannot be a groupby key;
report_diagnostics and the plots read each run by its folder, through lit_spine.runs.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_spine import runs as run_folder
from lit_spine.report_stats import (
    ALPHA,
    bootstrap_ci,
    holm,
    holm_levels,
    mean_ci,
    mean_difference_statistic,
    p_better_paired,
    p_better_unpaired,
    probability_of_improvement,
    seeds_to_separate,
)

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


@dataclass
class Run:
    """One run folder as the report sees it."""

    dir: Path
    config: dict[str, Any]  # flat dotted keys
    summary: dict[str, Any]
    convergence: dict[str, Any] = field(default_factory=dict)  # see report_stats.convergence

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
        return tuple(hashable(self.config.get(k)) for k in seed_keys)


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """One `Run` per folder, in order, from `runs.load_runs`' rows; a folder without a
    summary.json (a planned run not started yet) becomes a Run with no config or summary,
    which the report counts as unfinished. Parameter counts may live in meta.json."""
    run_dirs = [Path(d) for d in run_dirs]
    present = [d for d in run_dirs if run_folder.is_run_dir(d)]
    rows = (row for _, row in run_folder.load_runs(present).iterrows()) if present else iter(())
    runs = []
    for run_dir in run_dirs:
        if run_dir not in present:
            runs.append(Run(run_dir, {}, {}))
            continue
        row = next(rows)
        summary = run_folder.row_fields(row, "summary")
        meta = run_folder.row_fields(row, "meta")
        for key in PARAMS_KEYS:
            if key not in summary and isinstance(meta.get(key), int | float):
                summary[key] = meta[key]
        runs.append(Run(run_dir, run_folder.row_fields(row, "config"), summary))
    return runs


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
            state = run_folder.read_json(state_file)
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


def hashable(value: Any) -> Any:
    """A value usable as a dict key or set member: lists and dicts as sorted JSON text."""
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
        if len({hashable(run.config.get(key)) for run in runs}) > 1:
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
        key = tuple(hashable(run.config.get(f)) for f in factors)
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
    """cell - baseline: paired by seed (paired t-test) or, when fewer than 2 seeds pair up,
    Welch's t-test over all values of both cells.

    Also the difference's bootstrap interval (diff_low/diff_high), P(A>B) = the probability that
    this cell beats the baseline (for `goal`) with its percentile bootstrap interval, and the
    seeds per cell that would detect the observed difference (paired only).
    """
    from scipy import stats

    base = {r.seed(seed_keys): r.number([metric]) for r in baseline.runs}
    mine = {r.seed(seed_keys): r.number([metric]) for r in cell.runs}
    common = [s for s in mine if s in base and not (math.isnan(mine[s]) or math.isnan(base[s]))]
    sign = 1.0 if goal.startswith("max") else -1.0
    if len(common) >= 2 and any(seed_keys):  # else Welch's test over all values
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
            [a_better, b_better], p_better_paired, paired=True, method="percentile"
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
    low, high, method = (
        bootstrap_ci([a, b], mean_difference_statistic) if a and b else (math.nan,) * 3
    )
    a_better = [sign * v for v in a]
    b_better = [sign * v for v in b]
    prob_low, prob_high, _ = (
        bootstrap_ci([a_better, b_better], p_better_unpaired, method="percentile")
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
    """Every other cell against `reference`, with Holm-adjusted p-values (p_holm) over them, the
    level each comparison faces in Holm's step-down (holm_alpha), and the seeds a paired
    comparison would need to pass at that level (seeds_needed): the count at 0.05 can already
    be met while p_Holm is above 0.05."""
    diffs = [
        (c, paired_difference(c, reference, metric, seed_keys, goal))
        for c in cells
        if c is not reference
    ]
    pvalues = [d["p"] for _, d in diffs]
    for (_, d), adjusted, level in zip(diffs, holm(pvalues), holm_levels(pvalues)):
        d["p_holm"] = adjusted
        d["holm_alpha"] = level
        if d["kind"] == "paired" and math.isfinite(level):
            d["seeds_needed"] = seeds_to_separate(d["diff"], d["std"], alpha=level)
    return diffs


def parse_baseline(text: str, factors: Sequence[str], names: dict[str, str]) -> dict[str, str]:
    """`norm=batchnorm,drop=none` (short or full keys) -> {full key: value text}."""
    wanted = {}
    by_short = {names[k]: k for k in factors}
    items = re.split(r",(?![^\[\]{}]*[\]}])", text)  # commas inside [..] / {..} stay
    for item in filter(None, (s.strip() for s in items)):
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

    def same(value: Any, text: Any) -> bool:
        if str(value) == str(text):
            return True
        try:  # a list or dict value given as JSON text, e.g. drop=[0.1, 0.2]
            return hashable(value) == hashable(json.loads(str(text)))
        except ValueError:
            return False

    for cell in cells:
        if all(same(cell.values.get(k), v) for k, v in wanted.items()):
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
            if hashable(run.config.get(key)) not in [hashable(v) for v in values]:
                values.append(run.config.get(key))
        out[key] = [
            (
                value,
                mean_ci(
                    [
                        r.number([metric])
                        for r in runs
                        if hashable(r.config.get(key)) == hashable(value)
                    ]
                ),
            )
            for value in values
        ]
    return out


def curve_column(runs: Sequence[Run], metric: str) -> str:
    """Plot the per-epoch metric (val/mAP) when the sweep metric is its running best."""
    base = metric[: -len("_best")] if metric.endswith("_best") else metric
    for run in runs:
        if base in run_folder.read_metrics(run.dir).columns:
            return base
    return metric


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
    caveats: list[str] = field(default_factory=list)  # see data_caveats
    left_out: list[str] = field(default_factory=list)  # unfinished runs, by name and status
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


def distinct_values(runs: Sequence[Run], key: str, summary: bool = False) -> list[Any]:
    """The distinct non-None values of a config (or summary) key over `runs`, first seen first."""
    values: list[Any] = []
    for run in runs:
        value = (run.summary if summary else run.config).get(key)
        if value is not None and hashable(value) not in map(hashable, values):
            values.append(value)
    return values


def better(report: Report, d: dict) -> float:
    """The difference signed so that positive means better for the report's goal."""
    return d["diff"] if report.goal.startswith("max") else -d["diff"]


def significant(d: dict) -> bool:
    """Whether a comparison's Holm-adjusted p-value is below ALPHA."""
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
    # A run without a numeric batch size is left out here (data_caveats names it).
    runs = [r for r in runs if isinstance(r.config.get(batch), int | float)]
    batches = sorted({r.config.get(batch) for r in runs}, key=float)
    if len(batches) < 2:
        return None
    small, large = batches[0], batches[-1]
    others = [k for k in report.factors if k not in (norm, batch)]
    pair_keys = (*report.seed_keys, *others)
    rows: dict[str, dict] = {}
    for value in distinct_values(runs, norm):
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
        return significant(d) and better(report, d) < 0

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


def _runs_text(runs: Sequence[Run], limit: int = 6) -> str:
    names = [r.dir.name for r in runs]
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def left_out_runs(loaded: Sequence[Run]) -> list[str]:
    """One line per status of the runs the report leaves out (not finished), with names."""
    by_status: dict[str, list[Run]] = {}
    for run in loaded:
        if run.finished:
            continue
        status = run.summary.get("status")
        if not status:
            readable = run_folder.read_summary(run.dir) is not None
            status = "no status in summary.json" if readable else "no readable summary.json"
        by_status.setdefault(str(status), []).append(run)
    return [f"{len(rs)} {status}: {_runs_text(rs)}" for status, rs in sorted(by_status.items())]


def data_caveats(
    loaded: Sequence[Run], cells: Sequence[Cell], factors: Sequence[str], metric: str,
    seed_keys: Sequence[str],
) -> list[str]:  # fmt: skip
    """What could make the ranking mislead, in words: finished runs without the metric (a
    diverged run has none, and leaving it out silently favours what diverges), cells with no
    finished run, cells run on different seeds, unequal budgets within a cell, and factors that
    change together in every run (their effects cannot be told apart)."""
    names, out = short_names(factors), []
    runs = [r for c in cells for r in c.runs]
    missing = [r for r in runs if math.isnan(r.number([metric]))]
    if missing:
        out.append(f"{len(missing)} finished run(s) have no `{metric}` and are left out of the "
                   f"statistics (a diverged run has none): {_runs_text(missing)}")  # fmt: skip
    keys = {tuple(hashable(v) for v in c.values.values()) for c in cells}
    lost: dict[tuple, list[Run]] = {}
    for run in loaded:
        if not run.finished and run.config and factors:
            key = tuple(hashable(run.config.get(f)) for f in factors)
            if key not in keys:
                lost.setdefault(key, []).append(run)
    for key, rs in lost.items():
        label = ", ".join(f"{names[f]}={v}" for f, v in zip(factors, key))
        out.append(f"no finished run in {label} ({len(rs)} unfinished: {_runs_text(rs)}); "
                   "it is not ranked")  # fmt: skip
    seeds = {c.label(names): sorted({r.seed(seed_keys) for r in c.runs}, key=str) for c in cells}
    if len(cells) > 1 and len({tuple(v) for v in seeds.values()}) > 1:
        listed = "; ".join(
            f"{label}: {', '.join(str(s[0] if len(s) == 1 else s) for s in v)}"
            for label, v in seeds.items()
        )
        out.append(f"the cells ran different seeds ({listed}); each comparison pairs the seeds "
                   "both cells have, while the ranking uses each cell's mean over all its seeds")  # fmt: skip
    for f in factors:
        unset = [r for r in runs if r.config.get(f) is None]
        if unset:
            out.append(f"{len(unset)} run(s) have no `{f}` in their config (their cell has "
                       f"{names[f]}=None): {_runs_text(unset)}")  # fmt: skip
    for c in cells:
        epochs = sorted({r.summary.get("epochs") for r in c.runs} - {None})
        if len(epochs) > 1:
            out.append(f"unequal budgets in {c.label(names)}: its runs ran {epochs[0]}-"
                       f"{epochs[-1]} epochs")  # fmt: skip
    for i, f in enumerate(factors):
        for g in factors[i + 1 :]:
            pairs = {(hashable(c.values.get(f)), hashable(c.values.get(g))) for c in cells}
            if len(pairs) > 1 and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(
                pairs
            ):
                out.append(f"`{names[f]}` and `{names[g]}` change together in every run: their "
                           "effects cannot be told apart (each factor's mean shows both)")  # fmt: skip
    return out
