"""`lit-spine report` on synthetic run folders: statistics against numpy/scipy and hand-computed
values, convergence marks, the protocol line, the verdict, ranking, paired differences, factor
detection, plots and the command line."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_fit import write_run
from scipy import stats

from lit_spine import report, report_stats
from lit_spine import runs as run_folder
from lit_spine.commands import report as report_command

# metric per (norm, batch size, seed): groupnorm best, batchnorm hurt at batch 2.
VALUES = {
    ("batchnorm", 2): [0.40, 0.43, 0.41],
    ("batchnorm", 8): [0.55, 0.58, 0.54],
    ("groupnorm", 2): [0.57, 0.60, 0.59],
    ("groupnorm", 8): [0.58, 0.61, 0.57],
}


def make_run(
    root: Path, name: str, norm: str, batch: int, seed: int, value: float, status="finished"
):
    run = root / name
    run.mkdir(parents=True)
    flat = {
        "seed_everything": seed,
        "model.net.init_args.norm": norm,
        "model.net.init_args.backbone": "resnet18",
        "data.batch_size": batch,
        "run_dir": str(run),  # run-specific: never a factor
        "config": [f"/tmp/{name}.yaml"],
    }
    run_folder.write_meta(run, {"config_flat": flat, "params": 11_000_000})
    summary = {
        "status": status,
        "val/mAP_best": value,
        "runtime_s": 100.0 + seed,
        "images_per_s": 50.0,
    }
    run_folder.write_summary(run, summary)
    rows = [{"epoch": e, "step": e, "val/mAP": round(value * (e + 1) / 4, 5)} for e in range(4)]
    run_folder.write_metrics(
        run, pd.DataFrame(rows, columns=["epoch", "step", "val/mAP", "train/loss"])
    )
    return run


@pytest.fixture()
def sweep_dir(tmp_path):
    root = tmp_path / "sweep_runs" / "nvb"
    runs = []
    for (norm, batch), values in VALUES.items():
        for seed, value in enumerate(values):
            run_dir = make_run(root / "runs", f"{norm}-{batch}-s{seed}", norm, batch, seed, value)
            runs.append({"run_dir": str(run_dir.relative_to(root)), "status": "finished"})
    make_run(root / "runs", "unfinished", "layernorm", 2, 0, 0.99, status="interrupted")
    runs.append({"run_dir": "runs/unfinished", "status": "interrupted"})
    config = {
        "method": "grid",
        "metric": {"name": "val/mAP_best", "goal": "maximize"},
        "parameters": {
            "model.net.init_args.norm": {"values": ["batchnorm", "groupnorm"]},
            "data.batch_size": {"values": [8, 2]},
            "seed_everything": {"values": [0, 1, 2]},
        },
    }
    state = {"name": "nvb", "config": config, "metric": config["metric"], "runs": runs}
    (root / "state.json").write_text(json.dumps(state))
    return root


def test_statistics_match_numpy_and_scipy(sweep_dir):
    rep = report.write_report([sweep_dir])
    assert rep.factors == ["model.net.init_args.norm", "data.batch_size"]
    assert len(rep.skipped) == 1  # the interrupted run is left out
    for cell in rep.cells:
        x = np.array(
            VALUES[(cell.values["model.net.init_args.norm"], cell.values["data.batch_size"])]
        )
        half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        assert cell.stats["n"] == 3
        assert cell.stats["mean"] == pytest.approx(x.mean())
        assert cell.stats["std"] == pytest.approx(x.std(ddof=1))
        assert cell.stats["ci_low"] == pytest.approx(x.mean() - half)
        assert cell.stats["ci_high"] == pytest.approx(x.mean() + half)
        # The bootstrap interval the report shows: BCa, inside the range of the resample means.
        assert cell.stats["boot_method"] == "BCa"
        assert x.min() - 1e-9 <= cell.stats["boot_low"] < x.mean()
        assert x.mean() < cell.stats["boot_high"] <= x.max() + 1e-9
        assert cell.stats["runtime_s"] == pytest.approx(101.0)
        assert cell.stats["params"] == 11_000_000


def test_ranking_baseline_and_paired_differences(sweep_dir):
    rep = report.write_report([sweep_dir])
    order = [(c.values["model.net.init_args.norm"], c.values["data.batch_size"]) for c in rep.cells]
    expected = sorted(VALUES, key=lambda k: -np.mean(VALUES[k]))
    assert order == expected
    # Default baseline: the first listed value of each factor in the sweep file.
    assert rep.baseline.values == {"model.net.init_args.norm": "batchnorm", "data.batch_size": 8}
    base = np.array(VALUES[("batchnorm", 8)])
    for cell, diff in rep.differences:
        x = np.array(
            VALUES[(cell.values["model.net.init_args.norm"], cell.values["data.batch_size"])]
        )
        assert diff["kind"] == "paired" and diff["n"] == 3
        assert diff["diff"] == pytest.approx((x - base).mean())
        assert diff["std"] == pytest.approx((x - base).std(ddof=1))
        assert diff["p"] == pytest.approx(stats.ttest_rel(x, base).pvalue)
    # An explicit baseline by short key.
    rep = report.write_report([sweep_dir], baseline="norm=groupnorm,batch_size=2")
    assert rep.baseline.values == {"model.net.init_args.norm": "groupnorm", "data.batch_size": 2}
    with pytest.raises(ValueError, match="not a factor"):
        report.write_report([sweep_dir], baseline="backbone=resnet50")


def test_minimize_goal_reverses_ranking(sweep_dir):
    rep = report.write_report([sweep_dir], goal="minimize")
    assert rep.cells[0].values == {"model.net.init_args.norm": "batchnorm", "data.batch_size": 2}


def test_marginal_means(sweep_dir):
    rep = report.write_report([sweep_dir])
    norms = dict((v, s) for v, s in rep.marginals["model.net.init_args.norm"])
    bn = VALUES[("batchnorm", 2)] + VALUES[("batchnorm", 8)]
    assert norms["batchnorm"]["mean"] == pytest.approx(np.mean(bn))
    assert norms["batchnorm"]["n"] == 6


def test_files_tables_and_plots(sweep_dir):
    import matplotlib.image

    rep = report.write_report([sweep_dir])
    out = sweep_dir / "report"
    md = (out / "report.md").read_text()
    assert "| rank | norm | batch_size | n |" in md  # short names in the Markdown table
    assert "(baseline)" in md and "paired" in md
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 4 and "model.net.init_args.norm" in rows[0]  # full keys in the CSV
    assert rows[0]["rank"] == "1" and float(rows[0]["mean"]) == pytest.approx(
        rep.cells[0].stats["mean"]
    )
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 12
    names = {p.name for p in rep.plots}
    assert names == {"curves.png", "factors.png", "norm_vs_batch.png"}
    for plot in rep.plots:
        image = matplotlib.image.imread(plot)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_run_folders_without_sweep_state(sweep_dir, tmp_path):
    rep = report.write_report([sweep_dir / "runs"], out=tmp_path / "r")
    assert len(rep.cells) == 4 and rep.metric == "val/mAP_best"
    single = report.write_report([sweep_dir / "runs" / "groupnorm-2-s0"], out=tmp_path / "one")
    assert single.factors == [] and single.cells[0].stats["n"] == 1
    assert single.verdict.startswith("One cell only (all runs, val/mAP_best 0.570, no CI (n too")
    assert "Not converged: 1 of 1 runs" in single.verdict  # 4 epochs, rising to the end


def test_cli_latest_and_errors(sweep_dir, tmp_path, capsys):
    older = tmp_path / "sweep_runs" / "older"
    older.mkdir()
    (older / "state.json").write_text("{}")
    past = time.time() - 1000
    os.utime(older / "state.json", (past, past))
    assert report.latest_sweep(tmp_path / "sweep_runs") == sweep_dir
    assert report_command.main(["--latest", "--sweeps-root", str(tmp_path / "sweep_runs")]) == 0
    out = capsys.readouterr().out
    assert "| 1 | groupnorm |" in out and "norm_vs_batch.png" in out
    assert report_command.main([str(tmp_path / "nothing")]) == 2
    assert report_command.main(["--latest", "--sweeps-root", str(tmp_path / "none")]) == 2


def test_cell_label_and_short_names():
    assert report.cell_label({"model.net.init_args.norm": "gn", "seed_everything": 1}) == "norm=gn"
    names = report.short_names(
        ["model.net.init_args.drop_rate", "optimizer.drop_rate", "data.batch_size"]
    )
    assert names["data.batch_size"] == "batch_size"
    assert names["model.net.init_args.drop_rate"] == "init_args.drop_rate"


# ----------------------------------------------------------------------------- statistics by hand


def test_bootstrap_interval_methods_and_small_n():
    # n = 3: each all-same resample has probability 1/27 = 3.7% > 2.5%, so the percentile
    # interval of the mean is exactly [min, max].
    assert report_stats.bootstrap_ci(
        [[1.0, 2.0, 4.0]], report_stats.mean_statistic, method="percentile"
    ) == (
        1.0,
        4.0,
        "percentile",
    )
    low, high, method = report_stats.bootstrap_ci([[0.1, 0.5]], report_stats.mean_statistic)
    assert method == "n too small" and np.isnan(low) and np.isnan(high)
    assert report_stats.bootstrap_ci([[0.3, 0.3, 0.3]], report_stats.mean_statistic) == (
        0.3,
        0.3,
        "none (no variation)",
    )
    # A always beats B although both vary: every resample gives P = 1, BCa is degenerate and
    # the percentile interval is used.
    assert report_stats.bootstrap_ci(
        [[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]], report_stats.p_better_paired, paired=True
    ) == (1.0, 1.0, "percentile")
    small = report_stats.mean_ci([0.4, 0.5])
    assert small["boot_method"] == "n too small" and small["n"] == 2


def test_probability_of_improvement_by_hand():
    # paired: 3>1 wins, 1<2 loses, 2=2 ties (1/2) -> 1.5 / 3
    assert report_stats.probability_of_improvement([3, 1, 2], [1, 2, 2], paired=True) == 0.5
    # unpaired, all 6 pairs: 1>0, 1<2, 2>0, 2=2 (1/2), 3>0, 3>2 -> 4.5 / 6
    a, b = [1, 2, 3], [0, 2]
    assert report_stats.probability_of_improvement(a, b, paired=False) == 0.75
    u = stats.mannwhitneyu(a, b).statistic  # U counts ties as 1/2 too
    assert report_stats.probability_of_improvement(a, b, paired=False) == pytest.approx(u / 6)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    adjusted = report_stats.holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and np.isnan(adjusted[3])
    assert report_stats.holm([0.005, 0.2]) == pytest.approx([0.01, 0.2])
    # 3 x 0.3 carries up
    assert report_stats.holm([0.5, 0.4, 0.3]) == pytest.approx([0.9, 0.9, 0.9])
    assert report_stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    # The step-down levels: the smallest of k p-values faces alpha / k, the next alpha / (k - 1).
    levels = report_stats.holm_levels([0.04, 0.01, float("nan"), 0.03])
    assert levels[:2] == pytest.approx([0.05, 0.05 / 3]) and levels[3] == pytest.approx(0.025)
    assert np.isnan(levels[2])


def test_seeds_to_separate_matches_power_tables():
    # Cohen's tables for a two-sided one-sample/paired t-test, alpha 0.05, power 0.8:
    # effect size 1.0 -> 10 pairs, 0.5 -> 34 pairs.
    assert report_stats.seeds_to_separate(0.02, 0.02) == 10
    assert report_stats.seeds_to_separate(-0.01, 0.02) == 34
    assert report_stats.paired_t_power(10, 1.0) >= 0.8 > report_stats.paired_t_power(9, 1.0)
    # For many seeds it approaches ((z_0.975 + z_0.8) * sd / delta)^2 = (2.8016 / 0.1)^2 = 785.
    n = report_stats.seeds_to_separate(0.001, 0.01)
    assert 785 <= n <= 790
    assert report_stats.seeds_to_separate(0.0, 0.01) is None
    assert report_stats.seeds_to_separate(0.01, float("nan")) is None


def test_differences_have_p_better_intervals_and_holm(sweep_dir):
    rep = report.write_report([sweep_dir])
    base = np.array(VALUES[("batchnorm", 8)])
    raw = []
    for cell, diff in rep.differences:
        x = np.array(
            VALUES[(cell.values["model.net.init_args.norm"], cell.values["data.batch_size"])]
        )
        wins = np.mean(x > base) + 0.5 * np.mean(x == base)
        assert diff["p_better"] == pytest.approx(wins)
        assert diff["p_better_low"] <= diff["p_better"] <= diff["p_better_high"]
        assert diff["diff_low"] <= diff["diff"] <= diff["diff_high"]
        raw.append(diff["p"])
    order = np.argsort(raw)
    expected = np.maximum.accumulate([min(1.0, (3 - i) * raw[j]) for i, j in enumerate(order)])
    for rank, j in enumerate(order):
        assert rep.differences[j][1]["p_holm"] == pytest.approx(expected[rank])
    md = (sweep_dir / "report" / "report.md").read_text()
    assert "| P(A>B) |" in md and "p (Holm)" in md
    # Minimizing turns every win into a loss.
    rep = report.write_report([sweep_dir], goal="minimize", baseline="norm=batchnorm,batch_size=8")
    gn2 = next(d for c, d in rep.differences if c.values["data.batch_size"] == 2 and
               c.values["model.net.init_args.norm"] == "groupnorm")  # fmt: skip
    assert gn2["p_better"] == 0.0


def test_convergence_rule_on_constructed_curves():
    def curve(values):
        return dict(enumerate(values))

    plateau = report_stats.convergence(curve([0.1, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]))
    assert plateau["status"] == "converged" and plateau["gain"] == pytest.approx(0.0)
    # 8 epochs, last quarter = 2: best 0.8 vs 0.6 before, tolerance 5% of 0.7 = 0.035.
    rising = report_stats.convergence(curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]))
    assert rising["status"] == "not converged"
    assert rising["gain"] == pytest.approx(0.2) and rising["tol"] == pytest.approx(0.035)
    # A last-quarter wiggle of 0.01 is under 5% of the 0.51 range: converged.
    noisy = report_stats.convergence(curve([0.1, 0.5, 0.6, 0.6, 0.6, 0.6, 0.61, 0.6]))
    assert noisy["status"] == "converged"
    assert report_stats.convergence(curve([0.1, 0.2, 0.3]))["status"] == "too short"
    falling_loss = curve([5, 4, 3, 2, 1, 0.5, 0.2, 0.1])
    assert report_stats.convergence(falling_loss, goal="minimize")["status"] == "not converged"
    assert report_stats.convergence(falling_loss, goal="maximize")["status"] == "converged"


# ----------------------------------------------------------------------------- verdicts

SEED_OFFSET = [0.0, 0.02, -0.01]  # the same seed helps or hurts every cell alike


def make_sweep(root: Path, cells: dict[tuple, list[float]], keys: tuple[str, ...], **run_kwargs):
    """A sweep folder of fake_fit run folders: cells maps factor values to per-seed metrics."""
    runs = []
    unconverged = run_kwargs.pop("unconverged", set())
    extra = run_kwargs.pop("extra", {})
    for values, metrics in cells.items():
        for seed, best in enumerate(metrics):
            params = {**dict(zip(keys, values)), "seed_everything": seed, **extra}
            name = "-".join(map(str, values)) + f"-s{seed}"
            plateau = 1.0 if (values, seed) in unconverged else 0.5
            write_run(root / "runs" / name, params, best, epochs=8, plateau=plateau, **run_kwargs)
            runs.append({"run_dir": f"runs/{name}", "status": "finished"})
    parameters = {
        k: {"values": list(dict.fromkeys(v[i] for v in cells))} for i, k in enumerate(keys)
    }
    config = {
        "method": "grid",
        "metric": {"name": "val/mAP_best", "goal": "maximize"},
        "parameters": {**parameters, "seed_everything": {"values": [0, 1, 2]}},
    }
    state = {"name": root.name, "config": config, "metric": config["metric"], "runs": runs}
    (root / "state.json").write_text(json.dumps(state))
    return root


NORM = ("model.net.init_args.norm",)


def _seeded(mean: float, jitter=(0.0, 0.004, -0.003)) -> list[float]:
    return [mean + o + j for o, j in zip(SEED_OFFSET, jitter)]


def test_verdict_clearly_best_cell(tmp_path, capsys):
    cells = {
        ("groupnorm",): _seeded(0.60),
        ("batchnorm",): _seeded(0.50, (0.002, -0.003, 0.0)),
        ("layernorm",): _seeded(0.40, (-0.002, 0.0, 0.003)),
    }
    root = make_sweep(tmp_path / "best", cells, NORM)
    assert report_command.main([str(root)]) == 0
    printed = capsys.readouterr().out
    rep = report.write_report([root])
    v = rep.verdict
    assert v.startswith("Best: norm=groupnorm with val/mAP_best 0.6")
    assert "Indistinguishable" not in v and "Every other cell is worse" in v
    assert "norm=batchnorm by 0.10" in v and "norm=layernorm by 0.20" in v
    assert "Every judged run reached a plateau" in v and "Not converged" not in v
    assert printed.rstrip().endswith(v)  # `lit-spine report` ends with the verdict
    assert "Verdict: Best: norm=groupnorm" in printed
    md = (root / "report" / "report.md").read_text()
    assert f"## Verdict\n\n{v}\n" in md
    assert md.index("## Protocol") < md.index("## Verdict") < md.index("## Ranking")
    assert "all 9 judged runs reached a plateau" in md
    protocol = rep.protocol
    assert "trainer.max_epochs 8" in protocol and "ran 8 epochs, 96 optimizer steps" in protocol
    assert "lr_scaling none" in protocol and "3 seeds per cell" in protocol
    assert "`val/mAP_best` (maximize" in protocol


def test_verdict_indistinguishable_pair_and_seeds_to_separate(tmp_path):
    cells = {
        ("groupnorm",): _seeded(0.600, (0.0, 0.01, -0.012)),
        ("batchnorm",): _seeded(0.596, (0.006, -0.004, 0.0)),
        ("layernorm",): _seeded(0.40),
    }
    rep = report.write_report([make_sweep(tmp_path / "tie", cells, NORM)])
    v = rep.verdict
    assert v.startswith("Best: norm=groupnorm")
    assert "Indistinguishable from it at n=3" in v and "norm=batchnorm (Δ" in v
    assert "Worse: norm=layernorm by 0.199" in v  # -0.2 + (0 - 0.006 + 0.009) / 3
    gn = np.array(cells[("groupnorm",)])
    bn = np.array(cells[("batchnorm",)])
    d = bn - gn
    need = report_stats.seeds_to_separate(d.mean(), d.std(ddof=1))
    assert need > 3
    assert (
        f"{need} seeds per cell ({need - 3} more) would separate norm=groupnorm from norm=batchnorm"
        in v
    )
    pair = next(x for c, x in rep.versus_best if c.values[NORM[0]] == "batchnorm")
    assert pair["p_better"] == pytest.approx(np.mean(bn > gn))


def test_verdict_seeds_to_separate_use_the_holm_step(tmp_path):
    """Two cells indistinguishable from the best: the one with the smaller raw p faces Holm's
    first step (alpha / 2), so its seed count is the one at alpha 0.025, never the uncorrected
    count (which can already be met while p_Holm is above 0.05)."""
    cells = {
        ("groupnorm",): _seeded(0.600, (0.0, 0.01, -0.012)),
        ("batchnorm",): _seeded(0.596, (0.006, -0.004, 0.0)),
        ("layernorm",): _seeded(0.590, (0.004, 0.012, -0.016)),
    }
    rep = report.write_report([make_sweep(tmp_path / "holm", cells, NORM)])
    v = rep.verdict
    gn = np.array(cells[("groupnorm",)])
    pairs = {}
    for norm in ("batchnorm", "layernorm"):
        d = np.array(cells[(norm,)]) - gn
        pairs[norm] = (float(stats.ttest_rel(cells[(norm,)], gn).pvalue), d.mean(), d.std(ddof=1))
    first = min(pairs, key=lambda k: pairs[k][0])
    second = max(pairs, key=lambda k: pairs[k][0])
    assert "Indistinguishable from it at n=3" in v and "Worse" not in v
    _, mean, sd = pairs[first]
    strict = report_stats.seeds_to_separate(mean, sd, alpha=0.025)
    assert strict > report_stats.seeds_to_separate(mean, sd)
    assert f"{strict} seeds per cell ({strict - 3} more) would separate norm=groupnorm " in v
    assert "α 0.025, its Holm step" in v
    # The differences table states the same counts as the verdict.
    table = {c.values[NORM[0]]: d["seeds_needed"] for c, d in rep.versus_best}
    assert table[first] == strict
    _, mean, sd = pairs[second]
    loose = report_stats.seeds_to_separate(mean, sd)
    assert (
        f"{loose} seeds per cell ({loose - 3} more) would separate norm=groupnorm from norm={second}"
        in v
    )


def test_verdict_marks_unconverged_runs(tmp_path):
    cells = {("groupnorm",): _seeded(0.60), ("batchnorm",): _seeded(0.50)}
    root = make_sweep(tmp_path / "unconv", cells, NORM, unconverged={(("groupnorm",), 1)})
    rep = report.write_report([root])
    assert "Not converged: 1 of 6 runs, in norm=groupnorm (1/3)" in rep.verdict
    assert "train the unconverged cells longer" in rep.verdict
    md = (root / "report" / "report.md").read_text()
    assert "**Not converged: 1 of 6 runs** (norm=groupnorm: 1/3)" in md
    assert "| 1 (baseline) | groupnorm | 3 |" in md and "| 1/3 |" in md
    rows = {
        r["run_dir"].split("/")[-1]: r
        for r in csv.DictReader((root / "report" / "runs.csv").open())
    }
    assert rows["groupnorm-s1"]["converged"] == "not converged"
    assert rows["groupnorm-s0"]["converged"] == "converged"


NVB = ("model.net.init_args.norm", "data.batch_size")


def test_verdict_norm_vs_batch_direction_held(tmp_path):
    cells = {
        ("batchnorm", 16): _seeded(0.58),
        ("batchnorm", 2): _seeded(0.41, (0.003, 0.0, -0.004)),
        ("groupnorm", 16): _seeded(0.60),
        ("groupnorm", 2): _seeded(0.60, (0.004, -0.005, 0.002)),
    }
    extra = {"model.lr_scaling": "linear", "model.lr_reference_batch": 16}
    rep = report.write_report([make_sweep(tmp_path / "nvb", cells, NVB, extra=extra)])
    v = rep.verdict
    assert "direction (BatchNorm degrades at small batch, GroupNorm does not) held" in v
    mean = {k: np.mean(v) for k, v in cells.items()}
    drop = mean[("batchnorm", 2)] - mean[("batchnorm", 16)]
    assert (
        f"batchnorm {mean[('batchnorm', 16)]:.3f} at batch 16 -> "
        f"{mean[('batchnorm', 2)]:.3f} at batch 2 (Δ {drop:+.3f}" in v
    )
    assert f"groupnorm {mean[('groupnorm', 16)]:.3f} at batch 16 -> " in v
    assert "Caution" not in v  # the lr follows the batch
    assert "lr_scaling linear" in rep.protocol and "given at batch 16" in rep.protocol
    # steps per epoch differ with the batch: 96/16 = 6 and 96/2 = 48, over 8 epochs
    assert "48-384 optimizer steps" in rep.protocol
    md = (tmp_path / "nvb" / "report" / "report.md").read_text()
    row = (
        f"| batchnorm | {mean[('batchnorm', 16)]:.4f} | {mean[('batchnorm', 2)]:.4f} | {drop:.4f} |"
    )
    assert "## Norm vs batch size" in md and row in md


def test_verdict_norm_vs_batch_direction_did_not_hold(tmp_path):
    cells = {
        ("batchnorm", 16): _seeded(0.58),
        ("batchnorm", 2): _seeded(0.58, (0.003, -0.006, 0.004)),
        ("groupnorm", 16): _seeded(0.60),
        ("groupnorm", 2): _seeded(0.60, (0.004, -0.005, 0.002)),
    }
    rep = report.write_report([make_sweep(tmp_path / "nvb", cells, NVB)])
    v = rep.verdict
    assert "GroupNorm does not) did not hold on this data: BatchNorm did not degrade" in v
    assert "Caution: lr_scaling none with fixed epochs" in v
    cells[("groupnorm", 2)] = _seeded(0.45)
    cells[("batchnorm", 2)] = _seeded(0.40, (0.003, 0.0, -0.004))
    rep = report.write_report([make_sweep(tmp_path / "both", cells, NVB)])
    assert "did not hold on this data: GroupNorm degraded at the small batch too" in rep.verdict


def test_protocol_states_the_schedule_and_the_held_floor(tmp_path):
    cells = {("batchnorm",): _seeded(0.5), ("groupnorm",): _seeded(0.52)}
    extra = {"model.scheduler": "cosine", "model.warmup_epochs": 1.0, "model.min_lr_ratio": 0.01}
    held = report.write_report(
        [make_sweep(tmp_path / "h", cells, NORM, extra=extra | {"model.hold_fraction": 0.25})]
    )
    assert (
        "schedule: warm-up 1.0 epoch(s), cosine decay to 0.01 x lr, held there for the last "
        "0.25 of the steps" in held.protocol
    )
    plain = report.write_report([make_sweep(tmp_path / "p", cells, NORM, extra=extra)])
    assert "cosine decay to 0.01 x lr at the last step" in plain.protocol
    constant = report.write_report(
        [make_sweep(tmp_path / "c", cells, NORM, extra={"model.scheduler": "constant"})]
    )
    assert "; schedule constant." in constant.protocol


def test_verdict_calls_a_pair_needing_unaffordable_seeds_not_separable(tmp_path):
    """A difference far below the seed-to-seed spread needs thousands of seeds: the verdict says
    the two are not separable at an affordable n (with the count), not 'run 1,000 more'."""
    cells = {
        ("groupnorm",): _seeded(0.600, (0.0, 0.01, -0.012)),
        ("batchnorm",): _seeded(0.600, (0.01, -0.005, -0.0035)),
    }
    rep = report.write_report([make_sweep(tmp_path / "flat", cells, NORM)])
    d = np.array(cells[("groupnorm",)]) - np.array(cells[("batchnorm",)])
    need = report_stats.seeds_to_separate(d.mean(), d.std(ddof=1))
    assert need > report_stats.AFFORDABLE_SEEDS
    v = rep.verdict
    assert v.startswith("Best: norm=batchnorm")
    assert "norm=groupnorm is not separable from norm=batchnorm at any affordable n" in v
    assert f"would need {need:,} seeds per cell" in v and "more) would separate" not in v


def _sweep_of(root: Path, runs: list[tuple[str, dict, float]], epochs: int = 8) -> Path:
    """A sweep folder of fake_fit runs given one by one: (name, params, best)."""
    for name, params, best in runs:
        write_run(root / "runs" / name, params, best, epochs=epochs, plateau=0.5)
    config = {"method": "grid", "metric": {"name": "val/mAP_best", "goal": "maximize"},
              "parameters": {"model.net.init_args.norm": {"values": ["batchnorm", "groupnorm"]}}}  # fmt: skip
    state = {"name": root.name, "config": config, "metric": config["metric"],
             "runs": [{"run_dir": f"runs/{name}"} for name, _, _ in runs]}  # fmt: skip
    (root / "state.json").write_text(json.dumps(state))
    return root


def _run(norm: str, seed: int, best: float, **more) -> tuple[str, dict, float]:
    params = {"model.net.init_args.norm": norm, "seed_everything": seed, **more}
    return f"{norm}-s{seed}" + "".join(f"-{v}" for v in more.values()), params, best


def test_verdict_never_calls_a_cell_worse_that_wins_on_the_shared_seeds(tmp_path):
    """GroupNorm ran seeds 0-3 with one lucky seed, so its mean ranks first; BatchNorm ran
    seeds 1-3 and beats it by 0.05 on each of them. The verdict must not list BatchNorm as
    worse, must say the best is not settled, and must name the differing seed sets."""
    gn = [_run("groupnorm", 0, 0.90)] + [_run("groupnorm", s, 0.50 + s / 100) for s in (1, 2, 3)]
    bn = [_run("batchnorm", s, 0.55 + s / 100 + s / 1000) for s in (1, 2, 3)]
    rep = report.write_report([_sweep_of(tmp_path / "seeds", gn + bn)])
    v = rep.verdict
    assert v.startswith("Best: norm=groupnorm") and "Worse:" not in v
    assert "But norm=batchnorm beats it on the 3 seeds both ran (Δ +0.05" in v
    assert "which is best is not settled; run the same seeds in every cell" in v
    assert (
        "the cells ran different seeds (norm=groupnorm: 0, 1, 2, 3; norm=batchnorm: 1, 2, 3)" in v
    )


def test_one_shared_seed_falls_back_to_welch_and_identical_cells_are_named(tmp_path):
    """With one seed in common the comparison is Welch's over all values (by hand with scipy);
    two cells equal on every shared seed are 'identical', not 'too few seeds'."""
    gn = [_run("groupnorm", s, 0.70 + s / 1000) for s in range(5)]
    bn = [_run("batchnorm", s, 0.50 + s / 1000 + (s % 2) / 500) for s in range(4, 9)]
    rep = report.write_report([_sweep_of(tmp_path / "welch", gn + bn)])
    (cell, d), = rep.versus_best  # fmt: skip
    a = [0.50 + s / 1000 + (s % 2) / 500 for s in range(4, 9)]
    b = [0.70 + s / 1000 for s in range(5)]
    assert d["kind"] == "welch" and d["p"] == pytest.approx(
        stats.ttest_ind(a, b, equal_var=False).pvalue
    )
    assert "Worse: norm=batchnorm by 0.19" in rep.verdict

    same = [_run(n, s, 0.60 + s / 100) for n in ("groupnorm", "batchnorm") for s in range(3)]
    v = report.write_report([_sweep_of(tmp_path / "tie", same)]).verdict
    assert "Identical to it on every seed both ran: norm=" in v and "Not testable" not in v


def test_left_out_and_doubtful_runs_are_named_not_dropped_silently(tmp_path, capsys):
    """Failed, interrupted and unreadable runs are named by status; finished runs without the
    metric, a cell with no finished run, unequal budgets, a missing factor key and two
    factors that always move together are caveats in report.md, on the terminal and in the
    verdict; a folder given twice counts once; a list-valued baseline can be chosen."""
    runs = [_run("groupnorm", s, 0.60 + s / 100, lr=0.01) for s in range(3)]
    runs += [_run("batchnorm", s, 0.50 + s / 100, lr=0.001) for s in range(3)]
    runs += [_run("layernorm", s, 0.99, lr=0.1) for s in range(3)]
    runs += [_run("groupnorm", 3, 0.61, lr=0.01)]
    root = _sweep_of(tmp_path / "caveats", runs)
    folder = root / "runs"
    run_folder.write_summary(folder / "layernorm-s0-0.1", {"status": "failed"})
    run_folder.write_summary(folder / "layernorm-s1-0.1", {"status": "interrupted"})
    (folder / "layernorm-s2-0.1" / "summary.json").write_text("{")
    summary = run_folder.read_summary(folder / "groupnorm-s3-0.01")
    run_folder.write_summary(folder / "groupnorm-s3-0.01", summary | {"val/mAP_best": None})
    summary = run_folder.read_summary(folder / "groupnorm-s2-0.01")
    run_folder.write_summary(folder / "groupnorm-s2-0.01", summary | {"epochs": 30})

    assert report_command.main([str(root)]) == 0
    printed = capsys.readouterr().out
    md = (root / "report" / "report.md").read_text()
    rep = report.write_report([root])
    left = "1 failed: layernorm-s0-0.1; 1 interrupted: layernorm-s1-0.1; 1 no readable summary.json"
    for text in (md, printed):
        assert left in text
    caveats = [
        "1 finished run(s) have no `val/mAP_best` and are left out of the statistics (a "
        "diverged run has none): groupnorm-s3-0.01",
        "no finished run in norm=layernorm, lr=0.1 (3 unfinished",
        "unequal budgets in norm=groupnorm, lr=0.01: its runs ran 8-30 epochs",
        "`norm` and `lr` change together in every run: their effects cannot be told apart",
    ]
    for text in caveats:
        assert text in md and text in printed and text in rep.verdict, text
    twice = report.write_report([root, root], out=tmp_path / "twice")
    assert [c.stats["n"] for c in twice.cells] == [c.stats["n"] for c in rep.cells]
    assert "10 run folder(s) were given more than once and are counted once" in twice.verdict

    lists = [_run("batchnorm", s, 0.5 + s / 100, drop=[0.1, 0.2]) for s in range(3)]
    lists += [_run("batchnorm", s, 0.6 + s / 100, drop="none") for s in range(3)]
    rep = report.write_report([_sweep_of(tmp_path / "lists", lists)], baseline="drop=[0.1, 0.2]")
    assert rep.baseline.values == {"drop": [0.1, 0.2]}


def test_a_run_without_a_batch_size_is_named_not_a_crash(tmp_path):
    runs = [_run(n, s, 0.5 + s / 100, **{"data.batch_size": b})
            for n in ("groupnorm", "batchnorm") for b in (2, 8) for s in range(2)]  # fmt: skip
    runs.append(_run("groupnorm", 5, 0.6))
    root = _sweep_of(tmp_path / "nobatch", runs)
    meta = run_folder.read_json(root / "runs" / "groupnorm-s5" / "meta.json")
    del meta["config_flat"]["data.batch_size"]  # an older run folder without the key
    run_folder.write_meta(root / "runs" / "groupnorm-s5", meta)
    rep = report.write_report([root])
    assert "1 run(s) have no `data.batch_size` in their config" in rep.verdict
    assert rep.norm_batch is not None and rep.norm_batch["small"] == 2


def test_verdict_names_a_best_cell_too_short_to_judge(tmp_path):
    runs = [_run("groupnorm", s, 0.6 + s / 100) for s in range(3)]
    runs += [_run("batchnorm", s, 0.5 + s / 100) for s in range(3)]
    root = _sweep_of(tmp_path / "short", runs)
    for s in range(3):  # the best cell's curves: 3 validations only
        metrics = run_folder.read_metrics(root / "runs" / f"groupnorm-s{s}")
        run_folder.write_metrics(root / "runs" / f"groupnorm-s{s}", metrics[metrics.epoch < 3])
    v = report.write_report([root]).verdict
    assert "too short to judge, fewer than 4 validations: norm=groupnorm 3/3, the best cell" in v
