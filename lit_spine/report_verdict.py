"""The report's sentences, from the numbers only: protocol, statistics, convergence, verdict.

`protocol_line` reads the budget, learning-rate rule, seeds and metric from the runs'
configs; `STATISTICS_TEXT` states how the intervals and tests of lit_spine.report_stats are
made; `convergence_note` counts the runs still improving at the end; `verdict_text` is the
closing paragraph: the best cell, which cells are indistinguishable from it or worse, the
convergence caveat, the norm-vs-batch-size finding and what to run next. The `fmt_*`
helpers are the one place that turns numbers and intervals into report text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lit_spine.report_cells import Report, better, distinct_values, significant
from lit_spine.report_stats import (
    AFFORDABLE_SEEDS,
    ALPHA,
    CONVERGE_ABS,
    CONVERGE_MIN_EPOCHS,
    CONVERGE_REL,
    CONVERGE_TAIL,
    MIN_BOOTSTRAP_N,
    N_RESAMPLES,
    POWER,
)


def fmt_number(x: float, digits: int = 4) -> str:
    """`x` with `digits` decimals, or '-' when missing."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_interval(low: float, high: float, digits: int = 3) -> str:
    """`[low, high]`, or "n too small" when there is no interval."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "n too small"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def fmt_p(x: float) -> str:
    """A p-value as text: '<0.001', three decimals, or '-' when missing."""
    if x is None or math.isnan(x):
        return "-"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _span(values: Sequence[Any]) -> str:
    if not values:
        return "not recorded"
    if len(values) == 1:
        return f"{values[0]}"
    try:
        return f"{min(values)}-{max(values)}"
    except TypeError:
        return "/".join(map(str, values))


def schedule_text(runs) -> str:
    """The learning-rate schedule of the runs, as their configs give it ('' when not recorded):
    warm-up, cosine floor, and the share of the steps held at the floor."""
    kinds = distinct_values(runs, "model.scheduler")
    if kinds != ["cosine"]:
        return f"; schedule {_span(kinds)}" if kinds else ""
    warmup = distinct_values(runs, "model.warmup_epochs")
    floor = distinct_values(runs, "model.min_lr_ratio")
    hold = distinct_values(runs, "model.hold_fraction") or [0.0]
    text = f"; schedule: warm-up {_span(warmup)} epoch(s), cosine decay to {_span(floor)} x lr"
    if hold == [0.0]:
        return text + " at the last step"
    return text + f", held there for the last {_span(hold)} of the steps"


def protocol_line(report: Report) -> str:
    """Budget, learning-rate rule, seeds per cell, metric and goal, read from the runs' configs."""
    runs = report.runs
    max_epochs = distinct_values(runs, "trainer.max_epochs")
    max_steps = [v for v in distinct_values(runs, "trainer.max_steps") if v not in (-1, None)]
    budget = f"trainer.max_epochs {_span(max_epochs)}"
    if max_steps:
        budget += f", trainer.max_steps {_span(max_steps)}"
    epochs = distinct_values(runs, "epochs", summary=True)
    steps = distinct_values(runs, "global_step", summary=True)
    ran = [f"{_span(epochs)} epochs"] if epochs else []
    ran += [f"{_span(steps)} optimizer steps"] if steps else []
    if ran:
        budget += f" (ran {', '.join(ran)} per run)"
    rules = distinct_values(runs, "model.lr_scaling")
    refs = distinct_values(runs, "model.lr_reference_batch")
    lrs = distinct_values(runs, "model.lr")
    optimizers = distinct_values(runs, "model.optimizer")
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
    lr += schedule_text(runs)
    counts = sorted({c.stats["n"] for c in report.cells})
    seeds = [v for k in report.seed_keys for v in distinct_values(runs, k)]
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
    "seed; p is the paired t-test (Welch's t-test where fewer than 2 seeds pair up), Holm-corrected over "
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


def _ci(low: float, high: float, digits: int = 3) -> str:
    """`95% CI [low, high]`, or `no CI (n too small)`."""
    text = fmt_interval(low, high, digits)
    return f"95% CI {text}" if text.startswith("[") else f"no CI ({text})"


def _effect(report: Report, d: dict) -> str:
    text = f"Δ {d['diff']:+.3f}, {_ci(d['diff_low'], d['diff_high'])}"
    p = d.get("p_holm", math.nan)
    return text + (f", p_Holm {fmt_p(p)}" if math.isfinite(p) else ", untested")


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

    def identical(d: dict) -> bool:  # the same value on every shared seed
        return d["kind"] == "paired" and d["diff"] == 0 and d["std"] == 0

    same = [(c, d) for c, d in report.versus_best if not significant(d)]
    worse = [(c, d) for c, d in report.versus_best if significant(d) and better(report, d) < 0]
    # Ranked below the best by its mean over all its seeds, yet significantly better on the
    # seeds both share: the cells ran different seeds, and the ranking is not settled.
    ahead = [(c, d) for c, d in report.versus_best if significant(d) and better(report, d) > 0]
    for c, d in ahead:
        parts.append(
            f"But {c.label(names)} beats it on the {d['n']} seeds both ran ({_effect(report, d)}): "
            "the cells ran different seeds, so which is best is not settled; run the same "
            "seeds in every cell."
        )
    tests = "Holm-corrected t-test paired by seed, Welch's where fewer than 2 seeds pair up"
    for group, intro in (
        (
            [x for x in same if tested(x[1])],
            f"Indistinguishable from it at n={s['n']} ({tests}, p ≥ {ALPHA})",
        ),
        (
            [x for x in same if not tested(x[1]) and identical(x[1])],
            "Identical to it on every seed both ran",
        ),
        (
            [x for x in same if not tested(x[1]) and not identical(x[1])],
            "Not testable against it (fewer than 2 values on one side)",
        ),
    ):
        if group:
            listed = "; ".join(
                f"{c.label(names)} ({_effect(report, d)}, P(A>B) {fmt_number(d['p_better'], 2)}"
                + (
                    f" {fmt_interval(d['p_better_low'], d['p_better_high'], 2)})"
                    if math.isfinite(d["p_better_low"])
                    else ")"
                )
                for c, d in group
            )
            parts.append(f"{intro}: {listed}.")
    if len(worse) == len(report.versus_best) and worse:
        parts.append(f"Every other cell is worse ({tests}, p < {ALPHA}).")
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
        short = [c for c in report.cells if c.stats.get("too_short")]
        parts.append(
            "Every judged run reached a plateau"
            + (
                " (too short to judge, fewer than "
                f"{CONVERGE_MIN_EPOCHS} validations: "
                + ", ".join(
                    f"{c.label(names)} {c.stats['too_short']}/{len(c.runs)}"
                    + (", the best cell" if c is best else "")
                    for c in short
                )
                + ")"
                if short
                else ""
            )
            + "."
        )
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
        if distinct_values(report.runs, "model.lr_scaling") in ([], ["none"]):
            parts.append(
                "Caution: lr_scaling none with fixed epochs, so small batches took more "
                "optimizer steps at the same lr; use lr_scaling linear to follow the paper."
            )
    if report.caveats:
        parts.append("Caveats: " + "; ".join(report.caveats) + ".")
    nxt = []
    for c, d in same:
        alpha = d.get("holm_alpha", math.nan)
        alpha = alpha if math.isfinite(alpha) else ALPHA
        need = d.get("seeds_needed")  # at its Holm level (report_cells.compare_all)
        if d["kind"] == "paired" and d["diff"] == 0 and not identical(d):
            nxt.append(
                f"{c.label(names)} has the same mean as {best.label(names)} over these seeds: "
                "no seed count is predicted to separate them"
            )
        elif identical(d):
            continue  # no difference to separate
        elif need is not None and d["kind"] == "paired" and need > AFFORDABLE_SEEDS:
            nxt.append(
                f"{c.label(names)} is not separable from {best.label(names)} at any affordable "
                f"n: the observed difference of {abs(d['diff']):.3f} would need {need:,} seeds "
                f"per cell (power {POWER}, α {alpha:.3g}); treat them as equal on this data"
            )
        elif need is not None and d["kind"] == "paired":
            more = max(0, need - d["n"])
            nxt.append(
                f"{need} seeds per cell ({more} more) would separate {best.label(names)} "
                f"from {c.label(names)} if the observed difference of {abs(d['diff']):.3f} "
                f"is real (power {POWER}, α {alpha:.3g}"
                + (", its Holm step)" if alpha < ALPHA else ")")
            )
        else:
            nxt.append(
                f"{c.label(names)}: too few paired seeds to estimate the seeds needed; run at "
                f"least {MIN_BOOTSTRAP_N} shared seeds per cell"
            )
    if bad:
        nxt.append("train the unconverged cells longer (more epochs) before trusting their rank")
    if nxt:
        parts.append("Next: " + "; ".join(nxt) + ".")
    return " ".join(parts)
