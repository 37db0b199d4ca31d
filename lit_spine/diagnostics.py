"""Diagnostics that explain a run's score: what a norm or drop method changed, and where.

Computed once at the end of `fit`, on the validation split, from the best checkpoint, by the
`Diagnostics` callback (which also sends validation overlays, tables and summary fields to
W&B). The computations are plain functions on tensors/arrays, testable without a Trainer:

- Localisation vs classification: radial error and success rates (the metric's own
  localisation, docs/metric.md), the class mAP at the decoded points beside the class mAP
  with the classifier reading the ground-truth points (classification given perfect
  localisation; `SpineNet.forward(images, points)`).
- Per level: per point of the task (`Task.point_names`, tianchi2020's 11 by default),
  radial error, hit rate within the radius, AP, and
  the off-by-one rate: a prediction that misses its own point but lands within the radius
  of the neighbouring level of the same type (the disc or vertebra above or below), the
  level-shift failure the RSNA 2024 lumbar-spine solutions report.
- Generalisation gap: loss and metric on a fixed subset of the training split (no
  augmentation, eval mode, best checkpoint) vs the same on the validation split.
- BatchNorm train/eval gap: the validation metric with running statistics (eval mode) vs
  batch statistics (BatchNorm layers in train mode on a copy, momentum 0 so running stats
  stay put), and per-layer drift between the two (Wu & He 2018 name this train/test
  discrepancy as the cause of BatchNorm's small-batch failure; docs/regularizers.md).
- Calibration: expected calibration error of the disease probabilities (torchmetrics'
  binary calibration error on (probability, outcome) pairs: every code for the multi-label
  sigmoid head, the top code for the softmax head) and a reliability diagram.
- Effective receptive field (Luo et al. 2016, "Understanding the effective receptive field
  in deep convolutional neural networks"): |d heatmap peak / d input| averaged over images
  and points, re-centred on each peak; its size as the radius holding 50% / 90% of the
  gradient mass, beside the theoretical field of `lit_spine.models.summary`.

The code is split by concept: `diagnostics_measures` (the measurements above, written by
hand where no library does them), `diagnostics_run` (collecting outputs, scoring, one run's
result), `diagnostics_plots` (figures); this module is the callback and W&B logging, and
re-exports the public functions so `lit_spine.diagnostics` stays the one import.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lit_spine import runs as run_folder
from lit_spine.diagnostics_measures import (
    MASS_SHARES,
    BatchNormDrift,
    batch_statistics_copy,
    batchnorm_layers,
    calibration,
    calibration_pairs,
    effective_receptive_field,
    erf_size,
    neighbour_levels,
    per_level_localisation,
    radial_errors_mm,
)
from lit_spine.diagnostics_plots import (
    _save,
    figure_to_array,
    overlay_figure,
    plot_erf,
    plot_reliability,
)
from lit_spine.diagnostics_run import (
    _first_images,
    collect,
    flat_scalars,
    run_diagnostics,
    score,
)
from lit_spine.metrics import decode_heatmaps
from lit_spine.utils import atomic_write_bytes, atomic_write_json

# The public names, importable from here as before the split (report_diagnostics, tests).
__all__ = [
    "MASS_SHARES",
    "BatchNormDrift",
    "Diagnostics",
    "_save",
    "batch_statistics_copy",
    "batchnorm_layers",
    "calibration",
    "calibration_pairs",
    "collect",
    "effective_receptive_field",
    "erf_size",
    "figure_to_array",
    "flat_scalars",
    "neighbour_levels",
    "overlay_figure",
    "per_level_localisation",
    "plot_erf",
    "plot_reliability",
    "radial_errors_mm",
    "run_diagnostics",
    "score",
]


# ---------------------------------------------------------------------------- callback
class Diagnostics(pl.Callback):
    """Run the diagnostics at the end of fit (best checkpoint, validation split) and log them.

    Writes `diagnostics.json`, `diagnostics/reliability.png` and `diagnostics/erf.png`
    (+ `diagnostics/erf.npz`, the maps) into the run folder; on W&B: validation overlays
    every `overlay_every_n_epochs` epochs, the tables as `wandb.Table`, the scalars as
    summary fields (`define_metric`). Skipped under `fast_dev_run`.

    Args:
        enabled: False switches every diagnostic (and the overlays) off.
        train_batches: batches of the (un-augmented) training split for the generalisation
            gap; 0 skips it.
        erf_images: validation images averaged in the effective receptive field.
        n_bins: calibration bins.
        overlay_every_n_epochs: W&B overlay period in epochs (0: none).
        overlay_studies: number of fixed validation studies drawn (the first ones).
    """

    def __init__(
        self,
        enabled: bool = True,
        train_batches: int = 4,
        erf_images: int = 4,
        n_bins: int = 15,
        overlay_every_n_epochs: int = 5,
        overlay_studies: int = 4,
    ) -> None:
        self.enabled = enabled
        self.train_batches = train_batches
        self.erf_images = erf_images
        self.n_bins = n_bins
        self.overlay_every_n_epochs = overlay_every_n_epochs
        self.overlay_studies = overlay_studies
        self.run_dir: Path | None = None  # set by the CLI; else the trainer's default_root_dir
        self.init_erf: np.ndarray | None = None
        self.init_erf_seconds = 0.0
        self.result: dict[str, Any] | None = None
        self._t_fit = time.perf_counter()

    # -------------------------------------------------------------- state (resume keeps init ERF)
    def state_dict(self) -> dict[str, Any]:
        return {"init_erf": None if self.init_erf is None else torch.from_numpy(self.init_erf)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        erf = state_dict.get("init_erf")
        self.init_erf = None if erf is None else torch.as_tensor(erf).double().numpy()

    def _active(self, trainer) -> bool:
        return self.enabled and not trainer.fast_dev_run and trainer.state.fn == "fit"

    def _datamodule(self, trainer):
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "val_dataset"):
            rank_zero_warn("diagnostics: no SpineDataModule on the trainer; skipped")
            return None
        return dm

    def _loader(self, dataset, batch_size: int, n: int | None = None):
        from torch.utils.data import DataLoader, Subset

        if n is not None:
            dataset = Subset(dataset, range(min(n, len(dataset))))
        # A plain loader on this process: the datamodule's own shards itself under DDP.
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t_fit = time.perf_counter()
        if not self._active(trainer) or not trainer.is_global_zero or self.init_erf is not None:
            return
        if trainer.ckpt_path:  # resumed without a stored init ERF: the init weights are gone
            return
        dm = self._datamodule(trainer)
        if dm is None:
            return
        start = time.perf_counter()
        net = copy.deepcopy(pl_module.spine_net).eval()
        images, _ = _first_images(
            self._loader(dm.val_dataset, dm.hparams.batch_size), self.erf_images
        )
        self.init_erf = effective_receptive_field(
            net, images.to(pl_module.device), int(net.heatmap_stride)
        )
        self.init_erf_seconds = time.perf_counter() - start

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if (
            not self._active(trainer)
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or self.overlay_every_n_epochs <= 0
            or trainer.current_epoch % self.overlay_every_n_epochs
        ):
            return
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        dm = self._datamodule(trainer) if loggers else None
        if dm is None:
            return
        batch = next(iter(self._loader(dm.val_dataset, self.overlay_studies, self.overlay_studies)))
        with torch.no_grad():
            outputs = pl_module(batch["image"].to(pl_module.device))
            points, _ = decode_heatmaps(outputs["heatmaps"].float(), pl_module.heatmap_stride)
        points = points.cpu().numpy()
        images, captions = [], []
        for i in range(len(points)):
            image = batch["image"][i]
            title = f"val study #{int(batch['index'][i])}, epoch {trainer.current_epoch}"
            fig = overlay_figure(
                image[image.shape[0] // 2].numpy(),
                batch["points"][i].numpy(),
                batch["present"][i].numpy(),
                points[i],
                title + ": true (green o) vs predicted (red x)",
                names=pl_module.task.point_names,
            )
            images.append(figure_to_array(fig))
            captions.append(title)
        for logger in loggers:
            logger.log_image(
                key="val/overlays", images=images, caption=captions, step=trainer.global_step
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._active(trainer) or not trainer.is_global_zero:
            return
        dm = self._datamodule(trainer)
        if dm is None:
            return
        start = time.perf_counter()
        fit_seconds = start - self._t_fit
        net = copy.deepcopy(pl_module.spine_net)
        weights = _load_best(trainer, net)
        bs = dm.hparams.batch_size
        train_loader = None
        if self.train_batches > 0:
            train_ds = copy.copy(dm.train_dataset)
            train_ds.augment = None  # the gap is measured on the training images as they are
            train_loader = self._loader(train_ds, bs, self.train_batches * bs)
        hp = pl_module.hparams
        result, maps = run_diagnostics(
            net,
            self._loader(dm.val_dataset, bs),
            train_loader,
            vocab=pl_module.vocab,
            multi_label=hp.multi_label,
            loss_fn=pl_module.loss_fn,
            radius_mm=hp.radius_mm,
            baseline_radius_mm=hp.baseline_radius_mm,
            multi_label_threshold=hp.multi_label_threshold,
            device=pl_module.device,
            train_batches=self.train_batches,
            erf_images=self.erf_images,
            n_bins=self.n_bins,
            init_erf=self.init_erf,
            task=pl_module.task,
        )
        result = {
            "weights": weights,
            "split": "val",
            "norm": getattr(net, "norm", None),
            "radius_mm": float(hp.radius_mm),
            **result,
        }
        if self.init_erf is None:
            result["erf"]["init_note"] = "not available (run resumed without the init map)"
        out = Path(self.run_dir or trainer.default_root_dir)
        folder = out / run_folder.DIAGNOSTICS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        plots = {
            "reliability": plot_reliability(
                {"validation": result["calibration"]},
                folder / "reliability.png",
                f"Reliability ({result['calibration']['kind']})",
            ),
            "erf": plot_erf(
                {k: maps[k] for k in ("init", "trained") if k in maps},
                result["erf"],
                folder / "erf.png",
                result["erf"].get("theoretical_px"),
            ),
        }
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **maps)
        atomic_write_bytes(out / run_folder.ERF_MAPS, buf.getvalue())
        end_seconds = time.perf_counter() - start
        seconds = end_seconds + self.init_erf_seconds
        total = fit_seconds + end_seconds  # the whole fit call, diagnostics included
        result["cost"] = {
            "seconds": seconds,
            "end_of_fit_s": end_seconds,
            "init_erf_s": self.init_erf_seconds,
            "phases_s": result.pop("seconds"),
            "fit_s": total,
            "fraction_of_fit": seconds / total if total > 0 else None,
            "note": "seconds = ERF at init (fit start) + end-of-fit diagnostics; "
            "fraction_of_fit = seconds / the whole fit call including them",
        }
        result["plots"] = {k: str(p.relative_to(out)) for k, p in plots.items()}
        atomic_write_json(out / run_folder.DIAGNOSTICS, result)
        self.result = result
        print(
            f"lit-spine: diagnostics in {seconds:.1f} s "
            f"({100 * (result['cost']['fraction_of_fit'] or 0):.1f}% of the fit) "
            f"-> {out / run_folder.DIAGNOSTICS}"
        )
        self._log_wandb(trainer, result, plots)

    def _log_wandb(self, trainer, result: dict[str, Any], plots: dict[str, Path]) -> None:
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers:
            return
        import wandb

        scalars = flat_scalars(result)
        levels = result["per_level"]["levels"]
        level_cols = ["level", "n", "mre_mm", "hit_rate", "ap", "off_by_one_rate"]
        level_rows = [[r["name"], *(r[c] for c in level_cols[1:])] for r in levels]
        summary_rows = [[k.removeprefix("diagnostics/"), v] for k, v in scalars.items()]
        for logger in loggers:
            run = logger.experiment
            for key in scalars:
                run.define_metric(key, summary="last")
            logger.log_table("diagnostics/per_level", columns=level_cols, data=level_rows)
            logger.log_table(
                "diagnostics/summary", columns=["diagnostic", "value"], data=summary_rows
            )
            run.log({f"diagnostics/{k}_png": wandb.Image(str(p)) for k, p in plots.items()})
            run.log(scalars)
            for key, value in scalars.items():
                run.summary[key] = value


def _load_best(trainer, net: nn.Module) -> str:
    """Load the best checkpoint's network weights into `net`; say which weights were used."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if not path or not Path(path).is_file():
        rank_zero_warn("diagnostics: no best checkpoint; using the weights at the end of training")
        return "end of training (no best checkpoint)"
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "net."
    weights = {
        k[len(prefix) :].replace("_orig_mod.", "", 1): v
        for k, v in state.items()
        if k.startswith(prefix)
    }
    net.load_state_dict(weights)
    return f"best checkpoint {path}"
