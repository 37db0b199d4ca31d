"""lit_spine.runs, the one owner of the run folder: schema round trip, one flatten rule for
every source, atomic writes, and a real Lightning fit resumed in its own folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import test_train
import yaml

from lit_spine import runs

CONFIG = {
    "seed_everything": 3,
    "model": {"net": {"init_args": {"norm": "groupnorm", "drop_rate": 0.1}}, "lr": 0.002},
    "data": {"batch_size": 8, "image_size": [64, 64], "augment": {}},
    "trainer": {"callbacks": None, "devices": ("a", "b")},
}


def test_flatten_rule():
    assert runs.flatten(CONFIG) == {
        "seed_everything": 3,
        "model.net.init_args.norm": "groupnorm",
        "model.net.init_args.drop_rate": 0.1,
        "model.lr": 0.002,
        "data.batch_size": 8,
        "data.image_size": [64, 64],  # lists stay lists
        "data.augment": {},  # an empty mapping stays a value
        "trainer.callbacks": None,
        "trainer.devices": ["a", "b"],  # tuples become lists, as in JSON
    }


def test_factor_types_do_not_depend_on_the_file(tmp_path):
    """The same config read from meta.json's config_flat, from config.yaml alone and with a
    sweep's parameters gives the same values of the same types."""
    from_meta, from_yaml, from_sweep = tmp_path / "meta", tmp_path / "yaml", tmp_path / "sweep"
    runs.write_config(from_meta, CONFIG)
    runs.write_meta(from_meta, {"config_flat": CONFIG})
    runs.write_config(from_yaml, CONFIG)
    runs.write_config(from_sweep, {**CONFIG, "data": {**CONFIG["data"], "image_size": 32}})
    runs.write_sweep_params(from_sweep, {"data.image_size": [64, 64]})
    configs = [runs.read_config(d) for d in (from_meta, from_yaml, from_sweep)]
    assert configs[0] == configs[1] == configs[2]
    types = [{k: type(v) for k, v in c.items()} for c in configs]
    assert types[0] == types[1] == types[2]
    assert types[0]["data.image_size"] is list


def test_schema_round_trip(tmp_path):
    run = tmp_path / "run"
    runs.write_config(run, CONFIG)
    runs.write_meta(run, {"run_id": "run", "config_flat": CONFIG, "params": 1234})
    summary = {"status": "finished", "val/mAP_best": 0.5, "runtime_s": 12.5, "resumes": 0}
    runs.write_summary(run, summary)
    metrics = pd.DataFrame(
        [{"epoch": 0, "step": 4, "train/loss": 1.5}, {"epoch": 0, "step": 4, "val/mAP": 0.5}],
        columns=["epoch", "step", "train/loss", "val/mAP"],
    )
    runs.write_metrics(run, metrics)
    assert yaml.safe_load((run / runs.CONFIG).read_text()) == {
        **CONFIG,
        "trainer": {"callbacks": None, "devices": ["a", "b"]},
    }
    assert runs.read_summary(run) == summary
    assert runs.read_meta(run)["config_flat"] == runs.flatten(CONFIG)
    pd.testing.assert_frame_equal(runs.read_metrics(run), metrics)
    assert runs.find_run_dirs(tmp_path) == [run]

    table = runs.load_runs(tmp_path)
    assert len(table) == 1 and table.loc[0, "run_dir"] == str(run)
    assert table.loc[0, "config.data.image_size"] == [64, 64]
    assert table.loc[0, "summary.val/mAP_best"] == 0.5
    assert table.loc[0, "summary.status"] == "finished"
    assert runs.load_run(run).to_dict() == table.to_dict()
    # Every documented summary field name is what the writer of a real run uses (below).
    assert set(summary) <= set(runs.SUMMARY_FIELDS)


def test_bad_status_and_missing_runs_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"summary.json: status 'done' is not one of running"):
        runs.write_summary(tmp_path, {"status": "done"})
    with pytest.raises(ValueError, match=rf"{tmp_path}: no run folder \(summary.json\)"):
        runs.load_runs(tmp_path)


def test_a_crash_while_writing_leaves_the_old_file_whole(tmp_path, monkeypatch):
    runs.write_summary(tmp_path, {"status": "running", "epochs": 1})

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        runs.write_summary(tmp_path, {"status": "finished", "epochs": 2})
    assert json.loads((tmp_path / runs.SUMMARY).read_text()) == {"status": "running", "epochs": 1}
    assert [p.name for p in tmp_path.iterdir()] == [runs.SUMMARY]  # no temporary file left


def test_resumed_fit_accumulates_and_keeps_metrics_csv(phantom_root, tmp_path):
    """A real 2-epoch fit, resumed in its folder for a third epoch."""
    run = test_train._tiny_fit(phantom_root, tmp_path)
    first = runs.read_summary(run)
    first_metrics = runs.read_metrics(run)
    assert first["status"] == "finished" and first["resumes"] == 0 and first["runtime_s"] > 0
    assert sorted(first_metrics["epoch"].unique()) == [0, 1]

    test_train._resume(run, tmp_path, epochs=3)
    resumed = runs.read_summary(run)
    assert resumed["status"] == "finished" and resumed["epochs"] == 3
    assert resumed["resumes"] == 1
    assert resumed["runtime_s"] > first["runtime_s"]  # both pieces, not only the third epoch
    if first["peak_mem_mb"] is not None:
        assert resumed["peak_mem_mb"] >= first["peak_mem_mb"]
    metrics = runs.read_metrics(run)
    assert sorted(metrics["epoch"].unique()) == [0, 1, 2]
    # The first piece's rows are still there, unchanged, ahead of the third epoch's.
    kept = metrics.iloc[: len(first_metrics)][list(first_metrics.columns)]
    pd.testing.assert_frame_equal(kept.reset_index(drop=True), first_metrics, check_dtype=False)
    assert set(metrics.dropna(subset=["val/mAP"])["epoch"]) == {0, 1, 2}


def test_interrupted_fit_leaves_a_truthful_summary(phantom_root, tmp_path, monkeypatch):
    """The summary is written at the start and after every epoch: a run killed mid-fit has
    one saying how far it got (here the fit fails in its second epoch)."""
    from lit_spine.module import SpineModule

    original = SpineModule.training_step
    seen = []  # summary.json as it stood while the second epoch ran

    def fail_in_epoch_two(self, batch, batch_idx):
        if self.current_epoch == 1:
            seen.append(runs.read_summary(self.trainer.default_root_dir))
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SpineModule, "training_step", fail_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        test_train._tiny_fit(phantom_root, tmp_path)
    (run,) = test_train._run_dirs(tmp_path, "tiny")
    assert seen[0]["status"] == "running" and seen[0]["runtime_s"] > 0
    assert seen[0]["resumes"] == 0 and seen[0]["val/mAP_best"] is not None
    summary = runs.read_summary(run)
    assert summary["status"] == "failed" and summary["epochs"] == 1


def test_read_curve_takes_each_epoch_once_in_order(tmp_path):
    """Sparse Lightning rows and an epoch logged twice by a resume give one value per epoch."""
    from lit_spine.sweep_plan import _read_history

    (tmp_path / runs.METRICS).write_text(
        "epoch,step,train/loss,val/mAP\n"
        "0,9,1.5,\n0,9,,0.10\n1,19,,0.20\n"  # first piece
        "1,19,,0.25\n2,29,1.1,\n2,29,,0.30\n"  # resumed at epoch 1: logged again
    )
    assert runs.read_curve(tmp_path, "val/mAP") == {0: 0.10, 1: 0.25, 2: 0.30}
    assert _read_history(tmp_path, "val/mAP") == [{"val/mAP": v} for v in (0.10, 0.25, 0.30)]
    assert runs.read_curve(tmp_path, "val/absent") == {}


def test_load_runs_keeps_each_value_type_across_runs(tmp_path):
    """An int key one run lacks stays an int in the others (a plain DataFrame would make it
    3.0), a list stays a list, a None stays None; row_fields leaves out the missing key."""
    first, second = tmp_path / "a", tmp_path / "b"
    runs.write_meta(first, {"config_flat": {"x": 3, "sched": [0.1, 0.2], "opt": None}, "params": 7})
    runs.write_meta(second, {"config_flat": {"sched": [0.0], "opt": None, "extra": "y"}})
    runs.write_summary(first, {"status": "finished", "epochs": 2})
    runs.write_summary(second, {"status": "failed"})
    table = runs.load_runs([first, second])
    assert "meta.config_flat" not in table and table.loc[0, "meta.params"] == 7
    rows = [row for _, row in table.iterrows()]
    config = [runs.row_fields(row, "config") for row in rows]
    assert config == [
        {"x": 3, "sched": [0.1, 0.2], "opt": None},
        {"sched": [0.0], "opt": None, "extra": "y"},
    ]
    assert type(config[0]["x"]) is int
    assert runs.row_fields(rows[1], "summary") == {"status": "failed"}
    assert type(runs.row_fields(rows[0], "summary")["epochs"]) is int
    assert runs.row_fields(rows[1], "meta") == {}


def test_folder_status_and_diagnostics_readers(tmp_path):
    assert runs.folder_status(tmp_path / "never") == "pending"
    run = tmp_path / "run"
    run.mkdir()
    assert runs.folder_status(run) == "pending"  # an empty folder was never started
    (run / runs.LOG).write_text("started\n")
    assert runs.folder_status(run) == "interrupted"  # started, killed before a summary
    runs.write_summary(run, {"status": "running"})
    assert runs.folder_status(run) == "interrupted"  # no process writes to it any more
    runs.write_summary(run, {"status": "finished"})
    assert runs.folder_status(run) == "finished"

    assert runs.read_diagnostics(run) is None and runs.read_erf_map(run, "trained") is None
    (run / runs.DIAGNOSTICS).write_text(json.dumps({"erf": {"spacing_mm": [1.0, 1.0]}}))
    assert runs.read_diagnostics(run) == {"erf": {"spacing_mm": [1.0, 1.0]}}
    (run / runs.DIAGNOSTICS_DIR).mkdir()
    np.savez_compressed(run / runs.ERF_MAPS, trained=np.eye(3))
    np.testing.assert_array_equal(runs.read_erf_map(run, "trained"), np.eye(3))
    assert runs.read_erf_map(run, "init") is None
