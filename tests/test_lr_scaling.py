"""The learning-rate rule across batch sizes (`model.lr_scaling`): the formula on hand-computed
values, and the effective lr of a real `lit-spine fit` read from its optimizer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lit_spine.module import scaled_lr
from lit_spine.train_cli import run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]


def test_scaled_lr_hand_values():
    assert scaled_lr(0.1, "linear", 2, 8) == pytest.approx(0.025)
    assert scaled_lr(0.1, "linear", 32, 8) == pytest.approx(0.4)
    assert scaled_lr(0.1, "sqrt", 2, 8) == pytest.approx(0.05)  # sqrt(1/4) = 1/2
    assert scaled_lr(0.1, "sqrt", 32, 8) == pytest.approx(0.2)
    assert scaled_lr(0.1, "none", 2, 8) == 0.1
    with pytest.raises(ValueError, match="lr_scaling 'linaer'.*did you mean 'linear'"):
        scaled_lr(0.1, "linaer", 2, 8)
    with pytest.raises(ValueError, match="lr_reference_batch=0"):
        scaled_lr(0.1, "linear", 2, 0)


@pytest.mark.parametrize(
    ("rule", "batch", "accumulate", "expected"),
    [
        ("linear", 2, 1, 0.004 * 2 / 8),
        ("sqrt", 2, 2, 0.004 * math.sqrt(4 / 8)),
        ("none", 4, 1, 0.004),
    ],
)
def test_fit_uses_the_scaled_lr(phantom_root, tmp_path, rule, batch, accumulate, expected):
    """The batch size comes from the datamodule (times gradient accumulation) at fit time."""
    cli = run_lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "experiments" / "smoke.yaml"),
            f"--data.data_root={phantom_root}",
            "--data.train_split=train",
            "--data.val_split=val",
            "--data.image_size=64",
            f"--data.batch_size={batch}",
            "--data.num_workers=0",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--model.net.init_args.backbone=test_resnet",
            "--model.net.init_args.norm_groups=8",
            "--model.lr=0.004",
            f"--model.lr_scaling={rule}",
            "--model.lr_reference_batch=8",
            "--model.scheduler=constant",
            f"--trainer.accumulate_grad_batches={accumulate}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={accumulate}",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            f"--runs_root={tmp_path / 'runs'}",
            "--wandb=disabled",
        ]
    )
    assert cli.model.lr_effective == pytest.approx(expected)
    lrs = [group["lr"] for group in cli.trainer.optimizers[0].param_groups]
    assert lrs == [pytest.approx(expected)] * len(lrs) and lrs
    # The rule and its reference batch are part of the run's saved config.
    config = yaml.safe_load((cli.run_dir / "config.yaml").read_text())
    assert config["model"]["lr_scaling"] == rule and config["model"]["lr_reference_batch"] == 8


@pytest.mark.parametrize("max_epochs", [-1, 40])
def test_warmup_counts_epochs_of_optimizer_steps_under_a_max_steps_budget(
    phantom_root, tmp_path, max_epochs
):
    """8 training studies at batch 2: 4 optimizer steps per epoch, so warmup_epochs=1 is 4
    steps also when max_steps bounds the run (before: 11 steps with max_epochs=-1, the whole
    run climbing; 0 with max_epochs=40, the run starting at the peak)."""
    cli = run_lightning_cli([
        "fit", "--config", str(ROOT / "experiments" / "smoke.yaml"),
        f"--data.data_root={phantom_root}", "--data.train_split=train", "--data.val_split=val",
        "--data.image_size=64", "--data.batch_size=2", "--data.num_workers=0",
        f"--data.cache_dir={tmp_path / 'cache'}", "--model.net.init_args.backbone=test_resnet",
        "--model.net.init_args.norm_groups=8", "--model.lr=0.004", "--model.warmup_epochs=1",
        f"--trainer.max_epochs={max_epochs}", "--trainer.max_steps=12",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--diagnostics.enabled=false",
        f"--runs_root={tmp_path / 'runs'}", "--wandb=disabled",
    ])  # fmt: skip
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler  # warm-up, cosine, floor
    assert isinstance(scheduler._schedulers[0], torch.optim.lr_scheduler.LinearLR)
    assert scheduler._milestones == [4, 12], "4 warm-up steps, then the cosine to step 12"
