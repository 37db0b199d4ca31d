"""`lit-spine report`: rank a sweep's cells (configuration minus seed) with statistics and plots.

Reads run folders (summary.json, meta.json's config_flat or config.yaml, metrics.csv), groups
finished runs by every config key that varies across them except the training seed, and writes
`report.md`, `report.csv` (one row per cell), `runs.csv` (one row per run) and PNG plots:
learning curves per cell, a bar chart with 95% confidence intervals per factor and, when the
factors include a norm and the batch size, the metric against batch size per norm (the Group
Normalization paper's central experiment, Wu & He 2018, figure 1).

This module assembles the report: `build_report` runs the analysis, `write_report` writes the
files and `print_report` prints the summary; the command line is lit_spine.commands.report.
The parts live beside it, one concept each (docs/architecture.md, "Package layout"):
- lit_spine.report_cells: finding runs, grouping them into cells, ranking, comparisons;
- lit_spine.report_stats: the statistics for few seeds and the convergence rule;
- lit_spine.report_verdict: the protocol line, the statistics and convergence notes and the
  Verdict paragraph, generated from the numbers only;
- lit_spine.report_plots: the matplotlib figures;
- lit_spine.report_diagnostics: the sections rendered from the runs' diagnostics.json.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lit_spine import runs as run_folder
from lit_spine.report_cells import (
    DEFAULT_METRIC,
    IMAGES_PER_S_KEYS,
    PARAMS_KEYS,
    RUNTIME_KEYS,
    SEED_KEYS,
    Report,
    Run,
    Source,
    choose_baseline,
    compare_all,
    curve_column,
    data_caveats,
    default_baseline,
    factor_keys,
    find_runs,
    group_cells,
    latest_sweep,  # noqa: F401 - kept as report.latest_sweep (its users import it from here)
    left_out_runs,
    load_runs,
    marginal_means,
    norm_vs_batch_analysis,
    parse_baseline,
    rank_cells,
    short_names,
)
from lit_spine.report_plots import plot_curves, plot_factor_bars, plot_norm_vs_batch
from lit_spine.report_stats import POWER, convergence
from lit_spine.report_verdict import (
    STATISTICS_TEXT,
    convergence_note,
    fmt_interval,
    fmt_number,
    fmt_p,
    protocol_line,
    verdict_text,
)
from lit_spine.utils import atomic_write_text


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
    seen: set[Path] = set()
    run_dirs = []  # each folder once, however often it was given or listed in a state.json
    for d in source.run_dirs:
        if (key := Path(d).resolve()) not in seen:
            seen.add(key)
            run_dirs.append(d)
    loaded = load_runs(run_dirs)
    runs = [r for r in loaded if r.finished]
    skipped = [r.dir for r in loaded if not r.finished]
    if not runs:
        raise ValueError(
            f"no finished runs in {', '.join(map(str, paths))} ({len(skipped)} unfinished: "
            + "; ".join(left_out_runs(loaded))
            + ")"
        )
    if all(math.isnan(r.number([metric])) for r in runs):
        import difflib

        known = sorted(
            {k for r in runs for k, v in r.summary.items() if isinstance(v, int | float)}
        )
        close = difflib.get_close_matches(metric, known, n=3)
        raise ValueError(
            f"no finished run has the metric {metric!r} in its summary.json"
            + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "")
            + f" (numeric fields: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''})"
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
    duplicates = len(source.run_dirs) - len(run_dirs)
    report.left_out = left_out_runs(loaded)
    report.caveats = data_caveats(loaded, cells, factors, metric, seed_keys)
    if duplicates:
        report.caveats.append(f"{duplicates} run folder(s) were given more than once and are "
                              "counted once")  # fmt: skip
    report.norm_batch = norm_vs_batch_analysis(report)
    report.protocol = protocol_line(report)
    report.verdict = verdict_text(report)
    return report, runs, source


def _params(x: float) -> str:
    return "-" if math.isnan(x) else (f"{x / 1e6:.2f}M" if x >= 1e5 else f"{int(x)}")


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
            f"{fmt_number(s['mean'])} ± {fmt_number(s['std'])}",
            fmt_interval(s["boot_low"], s["boot_high"], 4),
            f"{s.get('not_converged', 0)}/{len(cell.runs)}"
            + (f" ({s['too_short']} too short)" if s.get("too_short") else ""),
            fmt_number(s["runtime_s"], 0),
            fmt_number(s["images_per_s"], 1),
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
        lines.append(f"Left out: {len(report.skipped)} unfinished run(s): "
                     + "; ".join(report.left_out) + ".")  # fmt: skip
    if report.caveats:
        lines += ["", "**Caveats.** " + "; ".join(report.caveats) + "."]
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
        "pair up), Holm-corrected over this table; seeds to separate: seeds per cell for a "
        f"paired t-test to reach its Holm level with power {POWER} if Δ is real.",
        "",
        f"| cell | Δ {m} | 95% CI of Δ | n pairs | P(A>B) | 95% CI of P(A>B) | p | p (Holm) "
        "| seeds to separate | test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, d in report.differences:
        need = d.get("seeds_needed")
        lines.append(
            f"| {cell.label(report.names)} | {fmt_number(d['diff'])} ± {fmt_number(d['std'])} "
            f"| {fmt_interval(d['diff_low'], d['diff_high'], 4)} | {d['n']} "
            f"| {fmt_number(d['p_better'], 2)} "
            f"| {fmt_interval(d['p_better_low'], d['p_better_high'], 2)} "
            f"| {fmt_p(d['p'])} | {fmt_p(d['p_holm'])} | {need if need is not None else '-'} "
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
            f"| {norm} | {fmt_number(d['large_mean'])} | {fmt_number(d['small_mean'])} "
            f"| {fmt_number(d['diff'])} | {fmt_interval(d['diff_low'], d['diff_high'], 4)} "
            f"| {d['n']} | {fmt_p(d['p_holm'])} |"
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
                f"| {value} | {s['n']} | {fmt_number(s['mean'])} ± {fmt_number(s['std'])} "
                f"| {fmt_interval(s['boot_low'], s['boot_high'], 4)} |"
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
    if report.skipped:
        print(f"Left out: {len(report.skipped)} unfinished run(s): " + "; ".join(report.left_out))
    if report.caveats:
        print("Caveats: " + "; ".join(report.caveats) + ".")
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
