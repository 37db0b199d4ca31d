"""Shared setup of the training-path tests: data modules on a generated phantom, one checked
SGD step, in-process `lit-spine fit` / `predict` runs on a phantom, a bare Lightning trainer
with a module that records its batches, layout prediction files written from the cache's
labels, a geometry-only augmentation and a hand-written diagnostics.json for the report tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from lit_spine.data.transforms import AugmentConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


# ---------------------------------------------------------------------------- data
def copy_data(root: Path, tmp_path: Path) -> Path:
    """A copy of the dataset at `root` as tmp_path/data, for a test that breaks files."""
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    return dst


def phantom_datamodule(tmp_path: Path, preset: dict[str, Any] | None = None, **settings: Any):
    """A `SpineDataModule` without a data root: it generates its phantom in tmp_path/phantom
    and caches in tmp_path/cache, 64 px images, no loader workers. The settings of `preset`
    (a test file's layout and task) and then `settings` add to that or override it."""
    from lit_spine.data.datamodule import SpineDataModule

    defaults = dict(
        phantom_dir=str(tmp_path / "phantom"),
        cache_dir=str(tmp_path / "cache"),
        image_size=64,
        num_workers=0,
    )
    return SpineDataModule(**(defaults | (preset or {}) | settings))


def geometry_only(
    rotate_deg: float, scale: float, translate: float, shear_deg: float
) -> AugmentConfig:
    """An augmentation that always warps (rotation, scale, translation, shear) and does
    nothing else: no slice flip, gamma, contrast, bias field, noise or cutout."""
    others = ("slice_flip_p", "gamma_p", "contrast_p", "bias_field_p", "noise_p", "cutout_p")
    warp = dict(rotate_deg=rotate_deg, scale=scale, translate=translate, shear_deg=shear_deg)
    return AugmentConfig(affine_p=1.0, **warp, **dict.fromkeys(others, 0.0))


# ---------------------------------------------------------------------------- training
def checked_losses(module, batch: dict) -> dict:
    """The module's losses on `batch`, asserted finite and with a classification part."""
    losses = module.loss_fn(module(batch["image"], batch["points"]), batch)
    assert torch.isfinite(losses["loss"]) and losses["cls"] > 0
    return losses


def train_one_step(module, batch: dict) -> dict:
    """`checked_losses`, then one SGD step (lr 0.01) on them, asserting that it moves the
    disc classifier's weights; returns the losses."""
    net = module.net
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    losses = checked_losses(module, batch)
    before = net.classifier.disc.weight.detach().clone()
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    assert not torch.equal(before, net.classifier.disc.weight)
    return losses


class BatchRecorder(pl.LightningModule):
    """Trains one scalar; records (epoch, rows, image sum) and a copy of the images of every
    training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[int], float]] = []
        self.images: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["index"].tolist(), float(batch["image"].sum())))
        self.images.append(batch["image"].clone())
        return (self.w - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def bare_trainer(max_epochs: int) -> pl.Trainer:
    """A CPU trainer with no logger, validation, checkpoints, progress bar or model summary."""
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


# ---------------------------------------------------------------------------- the CLI
def phantom_fit_argv(
    tmp_path: Path,
    data_config: str,
    experiment: str,
    *settings: str,
    studies: int,
    batch_size: int,
    max_epochs: int = 1,
) -> list[str]:
    """`lit-spine fit` arguments: base + smoke + experiments/data/`data_config`, then
    `settings`, on a phantom of `studies` studies generated in tmp_path (2 folds, 64 px),
    the test_resnet backbone, no sanity check, runs under tmp_path/runs/`experiment`."""
    return [
        "fit",
        "--config", str(EXPERIMENTS / "base.yaml"),
        "--config", str(EXPERIMENTS / "smoke.yaml"),
        "--config", str(EXPERIMENTS / "data" / data_config),
        *settings,
        "--data.data_root=null",
        f"--data.phantom_dir={tmp_path / 'phantom'}",
        f"--data.phantom_studies={studies}",
        "--data.folds=2",
        "--data.image_size=64",
        f"--data.batch_size={batch_size}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--model.net.init_args.backbone=test_resnet",
        "--model.net.init_args.norm_groups=8",
        f"--trainer.max_epochs={max_epochs}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--experiment={experiment}",
        f"--runs_root={tmp_path / 'runs'}",
        "--wandb=disabled",
    ]  # fmt: skip


def fit_on_phantom(
    tmp_path: Path, data_config: str, experiment: str, *settings: str, **sizes: int
) -> tuple[Path, dict, dict]:
    """Run `lit-spine fit` in-process with `phantom_fit_argv`; the one run folder it made,
    the flat config of its meta.json and the state dict of its last checkpoint."""
    from lit_spine.train_cli import run_lightning_cli

    run_lightning_cli(phantom_fit_argv(tmp_path, data_config, experiment, *settings, **sizes))
    (run,) = (tmp_path / "runs" / experiment).iterdir()
    config = json.loads((run / "meta.json").read_text())["config_flat"]
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return run, config, state


def predict_run(run: Path) -> None:
    """Run `lit-spine predict` in-process on the last checkpoint of the run folder `run`."""
    from lit_spine.train_cli import run_lightning_cli

    run_lightning_cli(
        [
            "predict",
            "--config", str(run / "config.yaml"),
            "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
            "--trainer.enable_progress_bar=false",
            "--wandb=disabled",
        ]
    )  # fmt: skip


# ---------------------------------------------------------------------------- predictions
def write_labelled_predictions(
    out: Path,
    cache,
    indices: Sequence[int],
    task,
    split_probs: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> tuple[Path, ...]:
    """Write the layout's prediction file(s) for the cache rows `indices` as a perfect model
    would: every point at its cached place with score 0.95, 0.9 on each true class and 0.025
    on the others. `split_probs` turns those (rows, points, classes) probabilities into the
    (vertebra_probs, disc_probs) of the task's heads."""
    from lit_spine.metrics import select_predictions
    from lit_spine.predict_layouts import write_layout_predictions

    vocab = task.vocabulary()
    probs = np.where(cache.labels[indices], 0.9, 0.025).astype(np.float32)
    vertebra_probs, disc_probs = split_probs(probs)
    merged = {
        "index": np.asarray(indices),
        "points": np.nan_to_num(cache.points[indices]).astype(np.float32),
        "scores": np.full((len(indices), task.num_points), 0.95, np.float32),
        "vertebra_probs": vertebra_probs,
        "disc_probs": disc_probs,
    }
    heads = ("points", "scores", "vertebra_probs", "disc_probs")
    rows = select_predictions(*(torch.from_numpy(merged[k]) for k in heads), vocab, task=task)
    return tuple(write_layout_predictions(out, merged, cache, task, vocab, rows))


# ---------------------------------------------------------------------------- reports
def write_diagnostics(
    d: Path,
    levels: Sequence[str],
    *,
    hit_rate: float,
    ap: float,
    norm: str,
    batchnorm: dict,
    calibration: dict,
) -> Path:
    """A run folder `d` holding a diagnostics.json: per-level rows for `levels` (n 2, error
    1 mm + the level's index, `hit_rate`, `ap`, no level shifts), the given norm, batchnorm
    and calibration sections, and fixed localisation and ERF sections."""
    d.mkdir(parents=True)
    rows = [
        {"name": n, "n": 2, "mre_mm": 1.0 + k, "hit_rate": hit_rate, "ap": ap,
         "off_by_one_rate": 0.0}
        for k, n in enumerate(levels)
    ]  # fmt: skip
    diag = {
        "radius_mm": 8.0,
        "norm": norm,
        "localisation_vs_classification": {"mre_mm": 2.0, "sdr": {"8": 0.9},
            "map_decoded": 0.2, "map_true_points": 0.6, "map_gap": 0.4},
        "per_level": {"levels": rows, "hit_rate": hit_rate, "off_by_one_rate": 0.0},
        "batchnorm": batchnorm,
        "calibration": calibration,
        "erf": {"theoretical_px": [99, 99], "init": {"r50_px": 5.0}, "trained": {"r50_px": 7.0}},
    }  # fmt: skip
    (d / "diagnostics.json").write_text(json.dumps(diag))
    return d
