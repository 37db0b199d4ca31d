"""The report's statistics for few seeds: intervals, tests, P(A>B), Holm, seed counts, convergence.

Pure functions of numbers; nothing here reads run folders or formats text.
`scipy.stats` does the bootstrap intervals (`scipy.stats.bootstrap`, BCa with a percentile
fallback), the t-tests, the noncentral-t power and the normal quantiles. Written here because
no dependency has them: Holm's step-down correction (scipy has none, statsmodels is not a
dependency), P(A>B) (Bouthillier et al. 2021, a few numpy lines), the seed count searched with
the noncentral t, and the convergence rule of a learning curve (README, "Sweeps and the
report").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

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


def mean_statistic(x: Any, axis: int = -1) -> Any:
    """The mean along `axis` (a vectorized statistic for `bootstrap_ci`)."""
    import numpy as np

    return np.mean(x, axis=axis)


def mean_difference_statistic(a: Any, b: Any, axis: int = -1) -> Any:
    """mean(a) - mean(b) along `axis` (a vectorized statistic for `bootstrap_ci`)."""
    import numpy as np

    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def p_better_paired(a: Any, b: Any, axis: int = -1) -> Any:
    """P(A>B) over seed pairs (a_i, b_i), ties counting 1/2; vectorized along `axis`."""
    import numpy as np

    return np.mean(a > b, axis=axis) + 0.5 * np.mean(a == b, axis=axis)


def p_better_unpaired(a: Any, b: Any, axis: int = -1) -> Any:
    """P(A>B) over all pairs (a_i, b_j), ties counting 1/2; vectorized along `axis`."""
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

    fn = p_better_paired if paired else p_better_unpaired
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


def holm_levels(pvalues: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """The level each p-value must reach in Holm's step-down: alpha / (k - i) for the i-th
    smallest of the k finite ones (NaN for a NaN p), the level a seed count must be planned for
    if the corrected test is to separate that pair."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    levels = [math.nan] * len(pvalues)
    for rank, (_, i) in enumerate(order):
        levels[i] = alpha / (len(order) - rank)
    return levels


def paired_t_power(n: int, effect: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test with n pairs at effect size |mean| / std (noncentral t)."""
    from scipy import stats

    df = n - 1
    t_crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(effect) * math.sqrt(n)
    return float(stats.nct.sf(t_crit, df, nc) + stats.nct.cdf(-t_crit, df, nc))


AFFORDABLE_SEEDS = 1000  # above this many seeds per cell the verdict calls a pair not separable


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
    low, high, method = (
        bootstrap_ci([x], mean_statistic, level=level) if n else (math.nan,) * 2 + ("",)
    )
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
