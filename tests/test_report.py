"""`lit-spine report` on synthetic run folders: statistics against numpy/scipy, ranking, paired
differences, factor detection, plots and the command line."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lit_spine import report

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
    (run / "meta.json").write_text(json.dumps({"config_flat": flat, "params": 11_000_000}))
    summary = {
        "status": status,
        "val/mAP_best": value,
        "runtime_s": 100.0 + seed,
        "images_per_s": 50.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    rows = ["epoch,step,val/mAP,train/loss"] + [
        f"{e},{e},{value * (e + 1) / 4:.5f}," for e in range(4)
    ]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
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


def test_cli_latest_and_errors(sweep_dir, tmp_path, capsys):
    older = tmp_path / "sweep_runs" / "older"
    older.mkdir()
    (older / "state.json").write_text("{}")
    past = time.time() - 1000
    os.utime(older / "state.json", (past, past))
    assert report.latest_sweep(tmp_path / "sweep_runs") == sweep_dir
    assert report.main(["--latest", "--sweeps-root", str(tmp_path / "sweep_runs")]) == 0
    out = capsys.readouterr().out
    assert "| 1 | groupnorm |" in out and "norm_vs_batch.png" in out
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert report.main(["--latest", "--sweeps-root", str(tmp_path / "none")]) == 2


def test_cell_label_and_short_names():
    assert report.cell_label({"model.net.init_args.norm": "gn", "seed_everything": 1}) == "norm=gn"
    names = report.short_names(
        ["model.net.init_args.drop_rate", "optimizer.drop_rate", "data.batch_size"]
    )
    assert names["data.batch_size"] == "batch_size"
    assert names["model.net.init_args.drop_rate"] == "init_args.drop_rate"
