"""Training end to end: every experiment file, run folders, resume, test/predict/evaluate, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_spine.commands.evaluate import main as evaluate_main
from lit_spine.module import load_checkpoint, warmup_cosine_schedule
from lit_spine.train_cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
OVERLAYS = sorted(
    p.relative_to(EXPERIMENTS).as_posix()
    for sub in ("backbone", "norm", "drop", "data", "train")
    for p in (EXPERIMENTS / sub).glob("*.yaml")
)
STANDALONE = ("smoke.yaml", "overfit.yaml")
PRESETS = ("base.yaml", "cpu.yaml", "gpu.yaml", "ddp.yaml", "sweep_cpu.yaml")


def tiny_args(phantom_root: Path, tmp_path: Path) -> list[str]:
    """Overrides that shrink any experiment to a seconds-long CPU run on the test phantom."""
    return [
        f"--data.data_root={phantom_root}",
        "--data.train_split=train",
        "--data.val_split=val",
        "--data.test_split=test",
        "--data.image_size=64",
        "--data.batch_size=2",
        "--data.num_workers=0",
        f"--data.cache_dir={tmp_path.parent / 'cache'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        f"--runs_root={tmp_path / 'runs'}",
        "--wandb=disabled",
    ]


def test_every_experiment_file_is_listed():
    on_disk = {p.relative_to(EXPERIMENTS).as_posix() for p in EXPERIMENTS.rglob("*.yaml")}
    assert on_disk == set(OVERLAYS) | set(STANDALONE) | set(PRESETS)


@pytest.mark.parametrize("overlay", OVERLAYS + [p for p in PRESETS if p != "base.yaml"])
def test_experiment_overlay_fast_dev_run(overlay, phantom_root, tmp_path):
    extra = []
    if overlay in ("gpu.yaml", "ddp.yaml"):
        # The hardware presets are checked for what they configure, on the CPU here.
        extra = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]
    if overlay == "data/challenge2020.yaml":
        extra = ["--data.predict_split=test"]
    if overlay in ("data/rsna2024.yaml", "data/spider.yaml"):
        # Their own layouts: that layout's phantom, split in two folds.
        layout = overlay.removeprefix("data/").removesuffix(".yaml")
        extra = [
            "--data.data_root=null",
            f"--data.phantom_dir={tmp_path.parent / f'phantom_{layout}_overlay'}",
            "--data.phantom_studies=4",
            "--data.folds=2",
        ]
    run_lightning_cli(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / "base.yaml"),
            "--config",
            str(EXPERIMENTS / overlay),
            *tiny_args(phantom_root, tmp_path),
            *extra,
            "--trainer.fast_dev_run=1",
        ]
    )


@pytest.mark.parametrize("preset", STANDALONE)
def test_standalone_preset_fast_dev_run(preset, phantom_root, tmp_path):
    run_lightning_cli(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / preset),
            *tiny_args(phantom_root, tmp_path),
            "--trainer.fast_dev_run=1",
        ]
    )


def _run_dirs(tmp_path: Path, experiment: str) -> list[Path]:
    return sorted((tmp_path / "runs" / experiment).iterdir())


def _resume(run: Path, tmp_path, epochs: int) -> None:
    """Continue a finished or interrupted run in its own folder from last.ckpt to `epochs`."""
    run_lightning_cli(
        [
            "fit",
            "--config",
            str(run / "config.yaml"),
            f"--runs_root={tmp_path / 'runs'}",
            "--wandb=disabled",
            "--ckpt_path=last",
            f"--trainer.max_epochs={epochs}",
        ]
    )


def _tiny_fit(phantom_root, tmp_path, *more: str) -> Path:
    run_lightning_cli(
        [
            "fit",
            "--config",
            str(EXPERIMENTS / "smoke.yaml"),
            *tiny_args(phantom_root, tmp_path),
            "--model.net.init_args.backbone=test_resnet",
            "--model.net.init_args.norm_groups=8",
            "--trainer.max_epochs=2",
            "--trainer.num_sanity_val_steps=0",
            "--experiment=tiny",
            *more,
        ]
    )
    return _run_dirs(tmp_path, "tiny")[-1]


def test_fit_writes_run_folder_then_resume_test_predict_evaluate(phantom_root, tmp_path, capsys):
    run = _tiny_fit(phantom_root, tmp_path, "--seed_everything=true")
    # Resolved config with the real (randomly chosen) seed.
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert isinstance(config["seed_everything"], int)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == config["seed_everything"]
    for key in ("git_commit", "versions", "cache_hash", "params", "config_flat"):
        assert key in meta
    assert meta["versions"]["torch"] and meta["cache_hash"]["train"]
    assert meta["config_flat"]["model.net.init_args.backbone"] == "test_resnet"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("val/mAP") for r in rows) and any(r.get("train/loss") for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    assert summary["val/mAP_best"] is not None and summary["images_per_s"] > 0
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    steps_two_epochs = summary["global_step"]

    # The running best (MaxMetric) is the best epoch's val/mAP, in summary and checkpoint.
    val_maps = [float(r["val/mAP"]) for r in rows if r.get("val/mAP")]
    last_ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert summary["val/mAP_best"] == pytest.approx(max(val_maps), abs=1e-6)
    assert last_ckpt["best_val_map"] == pytest.approx(max(val_maps), abs=1e-6)
    # Each checkpoint's learning rate is the warm-up cosine formula at its step (smoke.yaml:
    # peak 0.002, warm-up 0.5 of 2 epochs, floor 1% of the peak).
    warmup_steps = round(0.5 * steps_two_epochs / 2)
    for ckpt in (last_ckpt, torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)):
        expected = 0.002 * lr_formula(ckpt["global_step"], warmup_steps, steps_two_epochs, 0.01)
        for group in ckpt["optimizer_states"][0]["param_groups"]:
            assert group["lr"] == pytest.approx(expected, rel=1e-9)

    # Resume the same run folder for a third epoch: it continues from the last step.
    _resume(run, tmp_path, epochs=3)
    assert _run_dirs(tmp_path, "tiny") == [run]
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["epochs"] == 3
    # The best so far came back from the checkpoint: the third epoch can only raise it.
    assert resumed["val/mAP_best"] >= summary["val/mAP_best"]
    assert resumed["global_step"] == steps_two_epochs * 3 // 2

    # test and predict on the best checkpoint write beside the run, never over it.
    best = run / "checkpoints" / "best.ckpt"
    run_lightning_cli(
        ["test", "--config", str(run / "config.yaml"), f"--ckpt_path={best}", "--wandb=disabled"]
    )
    test_metrics = json.loads((run / "test" / "test_metrics.json").read_text())
    assert "test/mAP" in test_metrics
    run_lightning_cli(
        [
            "predict",
            "--config",
            str(run / "config.yaml"),
            f"--ckpt_path={best}",
            "--wandb=disabled",
            "--overlays=2",
        ]
    )
    pred = run / "predict" / "predictions.json"
    assert pred.is_file() and len(list((run / "predict" / "overlays").glob("*.png"))) == 2
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3

    # The prediction file, scored from DICOM spacing, agrees with the in-training test metric.
    capsys.readouterr()
    assert (
        evaluate_main(
            [
                "--pred",
                str(pred),
                "--gt",
                str(phantom_root / "test_annotation.json"),
                "--data-root",
                str(phantom_root / "test"),
                "--json",
            ]
        )
        == 0
    )
    scored = json.loads(capsys.readouterr().out)
    assert scored["map"] == pytest.approx(test_metrics["test/mAP"], abs=1e-4)
    assert scored["mre_mm"] == pytest.approx(test_metrics["test/mre_mm"], rel=1e-4)
    assert scored["sdr"]["8"] == pytest.approx(test_metrics["test/sdr/8mm"], abs=1e-6)

    # A notebook user loads the best checkpoint without the CLI and gets the same weights.
    module = load_checkpoint(best)
    saved = torch.load(best, weights_only=True)["state_dict"]
    assert not module.training and module.hparams.heatmap_weight == 1.0
    assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


def lr_formula(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The suite's warm-up cosine learning-rate factor, written out as it was before the
    schedule moved onto PyTorch's schedulers (the reference the schedulers must match)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup_steps,total_steps", [(0, 1), (0, 12), (3, 10), (9, 10), (40, 400)])
def test_warmup_cosine_schedule_matches_the_formula(warmup_steps, total_steps):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(
        [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=0.002
    )
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, total_steps, min_lr_ratio=0.01)
    # Twice the planned length: after the end the rate stays at the floor.
    for step in range(2 * total_steps):
        expected = 0.002 * lr_formula(step, warmup_steps, total_steps, 0.01)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_warmup_cosine_schedule_hand_values():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=3, total_steps=7, min_lr_ratio=0.0)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Warm-up 1/4, 2/4, 3/4; then the peak and cosine over 4 steps: 1, (1+cos(pi/4))/2, 1/2, ...
    half_cos = (1 + math.cos(math.pi / 4)) / 2
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, half_cos, 0.5, 1 - half_cos, 0.0, 0.0])


def test_warmup_cosine_schedule_refuses_different_peaks():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1.0, 0.1)]
    with pytest.raises(ValueError, match="one peak learning rate"):
        warmup_cosine_schedule(torch.optim.SGD(groups, lr=1.0), 2, 10, 0.01)


def test_print_model(phantom_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_lightning_cli(
            [
                "fit",
                "--config",
                str(EXPERIMENTS / "smoke.yaml"),
                *tiny_args(phantom_root, tmp_path),
                "--print_model=true",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "FLOPs" in out and "receptive field" in out.lower()
    assert not list((tmp_path / "runs").glob("*/*")), "--print_model trains nothing: no run folder"


def test_two_process_cpu_ddp_gives_the_same_metrics(phantom_root, tmp_path):
    single = _tiny_fit(phantom_root, tmp_path, "--trainer.max_epochs=1")
    env = {**os.environ, "LIT_SPINE_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    ddp_run = tmp_path / "ddp_run"
    cmd = [
        sys.executable,
        "-m",
        "lit_spine",
        "fit",
        "--config",
        str(EXPERIMENTS / "smoke.yaml"),
        *tiny_args(phantom_root, tmp_path),
        "--model.net.init_args.backbone=test_resnet",
        "--model.net.init_args.norm_groups=8",
        "--trainer.max_epochs=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        f"--run_dir={ddp_run}",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((ddp_run / "meta.json").read_text())
    assert meta["world_size"] == 2

    def keys(run):
        rows = csv.DictReader((run / "metrics.csv").open())
        return {k for r in rows for k, v in r.items() if v}

    assert {k for k in keys(single) if k.startswith("val/")} == {
        k for k in keys(ddp_run) if k.startswith("val/")
    }
    assert json.loads((ddp_run / "summary.json").read_text())["status"] == "finished"


def test_weight_ema_under_two_process_ddp_validates_and_saves_the_average(phantom_root, tmp_path):
    """experiments/train/ema.yaml under CPU DDP (a subprocess): both ranks keep the same
    average, so the validation the run logged (one val study per rank, synced) is what a
    one-process `test` of last.ckpt on the same split scores, and the checkpoint's state_dict
    is the average, not the raw weights."""
    env = {**os.environ, "LIT_SPINE_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run = tmp_path / "ddp_ema"
    cmd = [sys.executable, "-m", "lit_spine", "fit", "--config", str(EXPERIMENTS / "smoke.yaml"),
           "--config", str(EXPERIMENTS / "train" / "ema.yaml"), *tiny_args(phantom_root, tmp_path),
           "--model.net.init_args.backbone=test_resnet", "--model.net.init_args.norm_groups=8",
           "--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=0",
           "--trainer.strategy=ddp", "--trainer.devices=2", f"--run_dir={run}"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "meta.json").read_text())["world_size"] == 2
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    average, raw = last["state_dict"], last["current_model_state"]
    assert any(
        "weight" in k and v.is_floating_point() and not torch.equal(v, raw[k])
        for k, v in average.items()
    ), "the checkpoint should hold the average, which differs from the raw weights"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    last_val = [r for r in rows if r.get("val/mre_mm")][-1]
    run_lightning_cli(
        [
            "test", "--config", str(run / "config.yaml"), "--wandb=disabled",
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--data.test_split=val",
            "--trainer.devices=1", "--trainer.strategy=auto",
        ]
    )  # fmt: skip
    tested = json.loads((run / "test" / "test_metrics.json").read_text())
    assert tested["test/mre_mm"] == pytest.approx(float(last_val["val/mre_mm"]), rel=1e-5)
    assert tested["test/mAP"] == pytest.approx(float(last_val["val/mAP"]), abs=1e-6)


def test_overfit_preset_learns(tmp_path):
    """The whole pipeline learns: loss falls and >90% of points land within 8 mm."""
    run_lightning_cli([
        "fit", "--config", str(EXPERIMENTS / "overfit.yaml"),
        f"--data.phantom_dir={tmp_path / 'phantom'}", f"--data.cache_dir={tmp_path / 'cache'}",
        f"--runs_root={tmp_path / 'runs'}", "--wandb=disabled",
        "--trainer.enable_progress_bar=false", "--diagnostics.enabled=false",
    ])  # fmt: skip
    run = _run_dirs(tmp_path, "overfit")[-1]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.05 * sum(losses[:3]) / 3, losses
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["val/sdr/8mm"] > 0.9, summary
    assert summary["val/mre_mm"] < 5.0, summary


def test_hold_fraction_ends_the_cosine_early_and_holds_the_floor():
    """`model.hold_fraction`: the decay ends that fraction of the planned steps before the end
    and the rate stays at its floor after (20 steps, 0.25: decay over 15, floor for 5)."""
    import pytorch_lightning as pl

    from lit_spine.models.net import SpineNet
    from lit_spine.module import SpineModule

    module = SpineModule(
        SpineNet("test_resnet", head_channels=16), lr=1.0, warmup_epochs=0.0,
        min_lr_ratio=0.01, hold_fraction=0.25,
    )  # fmt: skip
    module.trainer = pl.Trainer(accelerator="cpu", max_steps=20, max_epochs=4, logger=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:16] == pytest.approx([lr_formula(s, 0, 15, 0.01) for s in range(16)])
    assert seen[15:] == pytest.approx([0.01] * 5)
    with pytest.raises(ValueError, match="hold_fraction must be in"):
        SpineModule(SpineNet("test_resnet", head_channels=16), hold_fraction=1.0)


def test_weight_ema_validates_checkpoints_and_resumes_with_the_average(phantom_root, tmp_path):
    """`WeightEMA` (a preset's `trainer.callbacks`): validation scores the averaged weights, the
    checkpoint's state_dict is that average (the raw weights beside it), `test` on the
    checkpoint reproduces the last in-training validation, and a resumed run goes on."""
    from lit_spine.module import WeightEMA

    preset = tmp_path / "ema.yaml"
    callbacks = [{"class_path": "lit_spine.module.WeightEMA", "init_args": {"decay": 0.8}}]
    preset.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    run = _tiny_fit(phantom_root, tmp_path, "--config", str(preset), "--seed_everything=3")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    average, raw = last["state_dict"], last["current_model_state"]
    assert average.keys() == raw.keys()
    moved = [k for k, v in average.items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    assert any("weight" in k for k in moved), "the average should differ from the raw weights"

    # The last epoch's validation ran on the average: testing the checkpoint on the same
    # split gives the same numbers.
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    last_val = [r for r in rows if r.get("val/mAP")][-1]
    run_lightning_cli(
        [
            "test", "--config", str(run / "config.yaml"), "--wandb=disabled",
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--data.test_split=val",
        ]
    )  # fmt: skip
    tested = json.loads((run / "test" / "test_metrics.json").read_text())
    assert tested["test/mAP"] == pytest.approx(float(last_val["val/mAP"]), abs=1e-6)
    assert tested["test/mre_mm"] == pytest.approx(float(last_val["val/mre_mm"]), rel=1e-5)

    _resume(run, tmp_path, epochs=3)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3

    for bad in ({"decay": 1.0}, {"decay": 0.0}, {"start_step": -1}):
        with pytest.raises(ValueError, match="WeightEMA"):
            WeightEMA(**bad)
    ema = WeightEMA(start_step=5)
    assert not ema.should_update(step_idx=4) and ema.should_update(step_idx=5)
    assert not ema.should_update(epoch_idx=9), "the average is updated per step, not per epoch"


def test_last_checkpoint_is_the_last_epoch_when_validation_did_not_improve(phantom_root, tmp_path):
    """`checkpoint.save_last`: last.ckpt is the final epoch, not a copy of the best one (Lightning
    2.6 writes it only when the monitored metric improved). With lr 0 validation never
    improves after the first epoch, so best.ckpt stays at epoch 0 while last.ckpt moves on."""
    run = _tiny_fit(phantom_root, tmp_path, "--model.lr=0.0", "--trainer.max_epochs=3")
    summary = json.loads((run / "summary.json").read_text())
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == summary["global_step"]


def test_image_size_not_a_multiple_of_the_reduction_stops_before_training(phantom_root, tmp_path):
    """A size the backbone cannot take is refused at start-up, naming the key and the sizes
    that fit, not at the first forward pass of a run."""
    from lit_spine.models.net import SpineNet

    deepest = max(SpineNet("test_resnet", head_channels=16).reductions)
    bad = 2 * deepest + 4  # a multiple of the heatmap stride (4), not of the reduction
    assert deepest > 4
    with pytest.raises(SystemExit, match=f"data.image_size={bad} is not a multiple of {deepest}"):
        _tiny_fit(phantom_root, tmp_path, f"--data.image_size={bad}")
    assert not list((tmp_path / "runs" / "tiny").glob("*")), "no empty run folder is left"


def test_a_later_command_never_silently_changes_a_run(phantom_root, tmp_path, capsys):
    """A new fit into a folder that holds a run, and a resume whose settings differ from the
    run's config.yaml (the restored optimizer would keep the old lr while the record said the
    new), are refused before any file is touched; `predict` on a run's checkpoint refuses
    another net and warns at another image size; a resume that changes only the budget runs."""
    run = _tiny_fit(phantom_root, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    same_run = ["fit", "--config", str(run / "config.yaml"), f"--run_dir={run}", "--wandb=disabled"]
    for extra, expected in (
        ([], f"{run} already holds a run (finished); resume it with --ckpt_path last"),
        (["--ckpt_path=last", "--model.lr=0.5"], "model.lr: 0.002 -> 0.5"),
        (
            ["--ckpt_path=last", "--model.net.init_args.backbone=resnet18"],
            "model.net.init_args.backbone: 'test_resnet' -> 'resnet18'",
        ),
    ):
        with pytest.raises(SystemExit) as exc:
            run_lightning_cli([*same_run, *extra])
        assert expected in str(exc.value.code), exc.value.code
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    best = run / "checkpoints" / "best.ckpt"
    predict = ["predict", "--config", str(run / "config.yaml"), f"--ckpt_path={best}"]
    with pytest.raises(SystemExit) as exc:
        run_lightning_cli([*predict, "--wandb=disabled", "--model.net.init_args.norm=groupnorm"])
    assert "was trained with another net or task" in str(exc.value.code)
    assert not (run / "predict").exists()
    capsys.readouterr()
    run_lightning_cli([*predict, "--wandb=disabled", "--data.image_size=96", "--overlays=0"])
    assert "warning: predict at data.image_size=96, but the checkpoint was trained at 64" in (
        capsys.readouterr().err
    )
    _resume(run, tmp_path, epochs=3)  # only the budget changes: allowed
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3


def test_a_bad_setting_is_one_line_and_leaves_no_run_folder(phantom_root, tmp_path, capsys):
    """`lit-spine fit` with a misspelt norm, a batch larger than the training split or a
    phantom_dir that is a file: exit 2, one line naming the key and value, and no run folder
    left behind to count as a failed run in reports."""
    from lit_spine.cli import main

    base = ["fit", "--config", str(EXPERIMENTS / "smoke.yaml"), *tiny_args(phantom_root, tmp_path),
            "--model.net.init_args.backbone=test_resnet", "--model.net.init_args.norm_groups=8",
            "--trainer.max_epochs=1", "--experiment=bad"]  # fmt: skip
    (tmp_path / "a_file").write_text("")
    for extra, expected in (
        (["--model.net.init_args.norm=groupnrom"], "unknown norm 'groupnrom' (did you mean"),
        (["--data.batch_size=64"], "data.batch_size=64 is larger than the 8 training items"),
        (
            ["--data.data_root=null", f"--data.phantom_dir={tmp_path / 'a_file'}"],
            f"data.phantom_dir={str(tmp_path / 'a_file')!r} is a file, not a folder",
        ),
    ):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert f"lit-spine fit: {expected}" in err and "Traceback" not in err, err
        assert not list((tmp_path / "runs" / "bad").glob("*")), "no run folder is left"


def test_sigterm_stops_a_fit_as_interrupted_with_a_nonzero_exit(phantom_root, tmp_path):
    """SIGTERM (a scheduler's stop) saves last.ckpt, marks the run interrupted (so a sweep
    resumes it instead of restarting it) and exits 143, not 0."""
    import signal
    import time

    run = tmp_path / "term"
    cmd = [sys.executable, "-m", "lit_spine", "fit", "--config", str(EXPERIMENTS / "smoke.yaml"),
           *tiny_args(phantom_root, tmp_path), "--model.net.init_args.backbone=test_resnet",
           "--model.net.init_args.norm_groups=8", "--trainer.max_epochs=500", f"--run_dir={run}"]  # fmt: skip
    env = {**os.environ, "LIT_SPINE_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        summary = run / "summary.json"
        if summary.is_file() and (json.loads(summary.read_text()).get("epochs") or 0) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs"] >= 2
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_run_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a temporary file (mode 0600); the result has the mode a plain
    write would give (0666 minus the umask), so others can read a shared run folder."""
    from lit_spine import runs as run_folder

    mask = os.umask(0o022)
    os.umask(mask)
    run_folder.write_summary(tmp_path, {"status": "finished"})
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_seed_everything_true_draws_and_records_a_real_seed(phantom_root, tmp_path):
    """Lightning's seed_everything() without a seed gives 0 every time; `seed_everything:
    true` here draws a random seed, recorded in config.yaml and meta.json."""
    os.environ.pop("PL_GLOBAL_SEED", None)  # as in a fresh process
    seeds = []
    for _ in range(2):
        run = _tiny_fit(phantom_root, tmp_path, "--seed_everything=true", "--trainer.max_epochs=1")
        os.environ.pop("PL_GLOBAL_SEED", None)
        seed = yaml.safe_load((run / "config.yaml").read_text())["seed_everything"]
        assert isinstance(seed, int) and not isinstance(seed, bool)
        assert json.loads((run / "meta.json").read_text())["seed"] == seed
        seeds.append(seed)
    assert seeds[0] != seeds[1], "two draws of 2**31 seeds should differ"


def test_predict_overlays_are_exactly_this_predicts_and_never_overwrite_each_other(
    phantom_root, tmp_path
):
    """Two splits hold same-named study folders (train/study0, val/study0): each item gets its
    own PNG; a later predict into the same folder leaves none of the earlier PNGs, and
    --overlays 0 leaves no overlay at all."""
    import numpy as np

    from lit_spine.data.cache import CacheSettings, build_cache
    from lit_spine.data.dataset import ConcatCache
    from lit_spine.predict import PredictionWriter
    from lit_spine.task import POINT_NAMES

    settings = CacheSettings(image_size=64)
    train, val = (build_cache(phantom_root / s, settings, cache_dir=tmp_path / "cache",
                              progress=False) for s in ("train", "val"))  # fmt: skip
    cache = ConcatCache([train, val])
    assert {r["study"] for r in train.records} & {r["study"] for r in val.records}

    def overlays(indices, n=16):
        merged = {"index": np.asarray(indices), "points": cache.points[indices]}
        writer = PredictionWriter(tmp_path / "predict", overlays=n)
        return writer._overlays(cache, merged, POINT_NAMES)

    folder = tmp_path / "predict" / "overlays"
    every = list(range(len(cache)))
    paths = overlays(every)
    assert len(set(paths)) == len(paths) == len(cache)
    assert sorted(folder.iterdir()) == sorted(paths)  # as many files as the count printed
    assert folder / "train_study0.png" in paths and folder / "val_study0.png" in paths
    again = overlays(every[-2:])
    assert sorted(folder.iterdir()) == sorted(again) and len(again) == 2
    assert overlays(every[:3], n=0) == [] and not folder.exists()
    assert [p.name for p in (tmp_path / "predict").iterdir()] == []  # no temporary left


def test_wandb_short_keys_are_put_back_after_the_hyperparameters(tmp_path):
    """Lightning logs the data module's own `seed` argument (None) after save_config; the run
    folder callback puts the short keys (seed = the run's seed_everything) back at train start."""
    from types import SimpleNamespace

    from lit_spine.train_cli import RunFolder

    class WandbLogger:  # the callback recognises W&B's logger by its class name
        def __init__(self):
            self.experiment = SimpleNamespace(config=SimpleNamespace(update=self.update))
            self.updates = []

        def update(self, values, allow_val_change=False):
            self.updates.append(dict(values))

    logger = WandbLogger()
    folder = RunFolder.__new__(RunFolder)
    folder._short_keys = {"seed": 7, "norm": "groupnorm"}
    folder.on_train_start(SimpleNamespace(loggers=[logger], is_global_zero=True), None)
    assert logger.updates == [{"seed": 7, "norm": "groupnorm"}]
