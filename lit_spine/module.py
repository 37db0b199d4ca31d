"""The LightningModule: thin wiring of an injected `SpineNet`, `SpineLoss` and the metrics.

Also the callbacks that belong to training: the DropBlock rate warm-up (Ghiasi et al. 2018,
"DropBlock: A regularization method for convolutional networks": the drop rate grows
linearly from 0 to its target during training), a throughput / peak-memory monitor, and a
checkpoint on interruption so that `fit --ckpt_path last` continues where a run stopped, and
the exponential moving average of the weights that validation, checkpoints and the finished
model use when a preset asks for it (`WeightEMA`, on Lightning's `WeightAveraging`).
"""

from __future__ import annotations

import math
import resource
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torchmetrics import MaxMetric

from lit_spine.losses import SpineLoss, class_probabilities
from lit_spine.metrics import SpineDetectionMetric, decode_heatmaps, select_predictions
from lit_spine.metrics_rsna import RSNA_LOGLOSS, RsnaCanalLogLoss
from lit_spine.task import get_task
from lit_spine.utils import choose

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")
LR_SCALINGS = ("none", "linear", "sqrt")


def scaled_lr(lr: float, rule: str, batch: int, reference_batch: int) -> float:
    """The learning rate at `batch` when `lr` is given at `reference_batch` under `rule`.

    "linear": lr * batch / reference (Goyal et al. 2017, used by the GroupNorm paper with SGD);
    "sqrt": lr * sqrt(batch / reference) (the usual rule for Adam-type optimizers);
    "none": lr at every batch size.
    """
    choose(rule, LR_SCALINGS, "lr_scaling")
    if batch < 1 or reference_batch < 1:
        raise ValueError(
            f"lr scaling needs positive batch sizes, got batch={batch}, "
            f"lr_reference_batch={reference_batch}"
        )
    ratio = batch / reference_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


class SpineModule(pl.LightningModule):
    """Trains and evaluates a `SpineNet` on heatmap + per-point class targets.

    The points, vocabulary and so the losses and metrics follow the net's task (`net.task`,
    linked from `data.task`). On the rsna2024_canal task validation also logs the
    competition's sample-weighted log loss as `val/rsna_canal_logloss` (rsna2024_foraminal:
    `val/rsna_foraminal_logloss`, one weighted log loss over both sides as the competition
    pools them; docs/datasets.md).

    Args:
        net: the network (backbone + heads), built from its own config section.
        optimizer: "adamw" or "sgd" (Nesterov momentum).
        lr: peak learning rate, at `lr_reference_batch` images per optimizer step.
        lr_scaling: how the learning rate follows the batch size: "none" (lr as given),
            "linear" (lr * batch / lr_reference_batch, the GroupNorm paper's rule for SGD) or
            "sqrt" (lr * sqrt(batch / lr_reference_batch), Adam-style). The batch is the one
            an optimizer step sees: data.batch_size x processes x accumulate_grad_batches.
        lr_reference_batch: the batch size at which `lr` is given.
        weight_decay: L2 / decoupled weight decay for conv and linear weights.
        norm_weight_decay: weight decay for norm scales/shifts (0 as in the GroupNorm paper);
            biases always get none (docs/regularizers.md).
        momentum: SGD momentum.
        scheduler: "cosine" (linear warm-up then cosine decay, per step) or "constant".
        warmup_epochs: length of the linear warm-up, in epochs (fractions allowed).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        hold_fraction: the last part of the planned steps trained at that final rate: the
            cosine decay ends this fraction of the steps before the end (0: at the end). A
            run whose metric still rises while the rate is held at its floor has not reached
            its plateau, so the report's convergence check tests the model, not the annealing.
        heatmap_loss: "mse" or "focal" (penalty-reduced focal loss on sigmoid heatmaps).
        heatmap_weight: weight of the heatmap loss (for "mse", squared error summed over each
            point's heatmap, which lets localisation lead the classification loss).
        class_loss: "bce", "ce" or "focal" for the per-point disease labels.
        multi_label: disease codes as independent sigmoids (a disc can be v2 and v5 at once);
            False uses one softmax per point.
        class_weight: weight of the classification loss.
        label_smoothing: label smoothing of the disease targets.
        focal_gamma: focusing parameter of the focal losses.
        focal_alpha: class-balance weight of the focal class loss.
        radius_mm: hit radius of the primary point-detection metric.
        baseline_radius_mm: hit radius of the 2020 baseline's macro-F1.
        multi_label_threshold: extra disease labels predicted when their probability reaches this.
        channels_last: run the net in channels_last memory format (faster convolutions on GPUs;
            on this suite's CPU presets it is measured by `lit-spine bench --only precision`).
        compile: wrap the net with `torch.compile`.
        sync_batchnorm: convert BatchNorm to SyncBatchNorm when training on several GPU processes.
        point_jitter: standard deviation, in heatmap pixels, of the Gaussian noise added to the
            true points the classifier reads in training (it reads decoded points at inference);
            0 (default) reads the exact true points.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: str = "adamw",
        lr: float = 2e-3,
        lr_scaling: str = "none",
        lr_reference_batch: int = 8,
        weight_decay: float = 1e-4,
        norm_weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        hold_fraction: float = 0.0,
        heatmap_loss: str = "mse",
        heatmap_weight: float = 1.0,
        class_loss: str = "bce",
        multi_label: bool = True,
        class_weight: float = 1.0,
        label_smoothing: float = 0.0,
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        radius_mm: float = 8.0,
        baseline_radius_mm: float = 6.0,
        multi_label_threshold: float = 0.5,
        channels_last: bool = False,
        compile: bool = False,
        sync_batchnorm: bool = True,
        point_jitter: float = 0.0,
    ) -> None:
        super().__init__()
        choose(optimizer, OPTIMIZERS, "optimizer")
        choose(scheduler, SCHEDULERS, "scheduler")
        choose(lr_scaling, LR_SCALINGS, "lr_scaling")
        if not 0.0 <= hold_fraction < 1.0:
            raise ValueError(f"hold_fraction must be in [0, 1), got {hold_fraction}")
        if lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch must be >= 1, got {lr_reference_batch}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.vocab = net.vocabulary
        self.task = getattr(net, "task", None) or get_task("tianchi2020")
        self.loss_fn = SpineLoss(
            heatmap_loss=heatmap_loss,
            heatmap_weight=heatmap_weight,
            class_loss=class_loss,
            class_weight=class_weight,
            label_smoothing=label_smoothing,
            focal_gamma=focal_gamma,
            focal_alpha=focal_alpha,
            multi_label=multi_label,
            task=self.task,
        )
        metric_args = dict(
            vocab=self.vocab.name,
            radius_mm=radius_mm,
            baseline_radius_mm=baseline_radius_mm,
            task=self.task,
        )
        self.val_metric = SpineDetectionMetric(**metric_args)
        self.test_metric = SpineDetectionMetric(**metric_args)
        # The running best of val/mAP over epochs (its own metric object: it must never be reset).
        self.val_map_best = MaxMetric()
        # The competition's own score, for the task it was defined for only.
        self.rsna_logloss_name, groups = RSNA_LOGLOSS.get(self.task.name, (None, None))
        self.val_rsna_logloss = RsnaCanalLogLoss(groups) if self.rsna_logloss_name else None
        self._compiled = False
        self.lr_effective: float | None = None  # set by configure_optimizers

    # ------------------------------------------------------------------ model set-up
    def configure_model(self) -> None:
        """Apply SyncBatchNorm, channels_last and compile once the strategy is known."""
        if self._compiled:
            return
        # SyncBatchNorm needs GPU tensors; on CPU processes each keeps its own statistics.
        if (
            self.hparams.sync_batchnorm
            and self.trainer.world_size > 1
            and self.device.type == "cuda"
        ):
            from timm.layers import convert_sync_batchnorm

            self.net = convert_sync_batchnorm(self.net)
        if self.hparams.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.net = torch.compile(self.net)
        self._compiled = True

    @property
    def best_val_map(self) -> float:
        """The best finite val/mAP so far, -inf before the first one."""
        if self.val_map_best.update_count == 0:
            return -math.inf
        return float(self.val_map_best.compute())

    @property
    def spine_net(self) -> nn.Module:
        """The SpineNet itself (unwrapped from torch.compile)."""
        return getattr(self.net, "_orig_mod", self.net)

    @property
    def heatmap_stride(self) -> int:
        return int(self.spine_net.heatmap_stride)

    def forward(self, images: torch.Tensor, points: torch.Tensor | None = None) -> dict:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        outputs = self.net(images, points)
        # Under bf16 autocast the convolutions return bf16; the losses, sigmoids and heatmap
        # decoding must see fp32 (a bf16 sum over a heatmap keeps 3 significant digits and
        # bf16 probabilities tie in the AP ranking), so the outputs leave the module in fp32.
        return {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        points = batch["points"]
        if self.hparams.point_jitter > 0:
            # At inference the classifier reads features at decoded points, a pixel or two off
            # the truth; jitter trains it for that (off by default: on the overfit preset it
            # slowed localisation markedly, the class gradients then dominate shared features).
            sd = self.hparams.point_jitter * self.heatmap_stride
            points = points + torch.randn_like(points) * sd
        outputs = self(batch["image"], points)
        losses = self.loss_fn(outputs, batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log("train/heatmap_loss", losses["heatmap"], batch_size=bs)
        self.log("train/class_loss", losses["cls"], batch_size=bs)
        return losses["loss"]

    def _predict(self, images: torch.Tensor) -> dict:
        """Decoded points, point scores and class probabilities for a batch of images."""
        outputs = self(images)
        points, scores = decode_heatmaps(outputs["heatmaps"].float(), self.heatmap_stride)
        probs = class_probabilities(outputs, self.hparams.multi_label)
        return {
            "outputs": outputs,
            "points": points,
            "scores": scores,
            "vertebra_probs": probs["vertebra"].float(),
            "disc_probs": probs["disc"].float(),
        }

    def _eval_step(self, batch: dict, metric: SpineDetectionMetric, stage: str) -> None:
        pred = self._predict(batch["image"])
        losses = self.loss_fn(pred["outputs"], batch)
        self.log(
            f"{stage}/loss", losses["loss"], batch_size=batch["image"].shape[0], sync_dist=True
        )
        rows = select_predictions(
            pred["points"],
            pred["scores"],
            pred["vertebra_probs"],
            pred["disc_probs"],
            self.vocab,
            multi_label_threshold=self.hparams.multi_label_threshold,
            task=self.task,
        )
        if stage == "val" and self.val_rsna_logloss is not None:
            self._update_rsna_logloss(pred["disc_probs"], batch)
        metric.update(
            *rows,
            gt_points=batch["points"],
            gt_present=batch["present"],
            gt_labels=batch["labels"],
            spacing_mm=batch["spacing_mm"],
        )

    def _update_rsna_logloss(self, disc_probs: torch.Tensor, batch: dict) -> None:
        """Add the graded disc levels of a batch: probabilities at the decoded points, and the
        true severity index (-1 where the level is absent from the item or has no grade)."""
        disc = list(self.task.points_of_kind("disc"))
        labels = batch["labels"][:, disc, : disc_probs.shape[-1]].bool()
        graded = batch["present"][:, disc].bool() & labels.any(-1)
        grades = torch.where(
            graded, labels.int().argmax(-1), torch.full_like(graded, -1, dtype=torch.long)
        )
        self.val_rsna_logloss.update(disc_probs, grades)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metric, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metric, "test")

    def _log_metric(self, metric: SpineDetectionMetric, stage: str) -> dict[str, float]:
        values = metric.compute()
        metric.reset()
        logged = {f"{stage}/{'mAP' if k == 'map' else k}": float(v) for k, v in values.items()}
        # NaN (a class without ground truth) would poison loggers' aggregations; leave it out,
        # except the monitored mAP, which checkpointing and early stopping need to see.
        logged = {k: v for k, v in logged.items() if math.isfinite(v) or k == f"{stage}/mAP"}
        if not math.isfinite(logged[f"{stage}/mAP"]) and not self.trainer.sanity_checking:
            rank_zero_warn(f"{stage}: no ground-truth points in this split, so mAP is undefined")
        # The metric state is already synced, so every rank holds the same values; the
        # (cheap) sync_dist mean keeps Lightning's bookkeeping consistent across ranks.
        self.log_dict(logged, sync_dist=True)
        return logged

    def on_validation_epoch_end(self) -> None:
        logged = self._log_metric(self.val_metric, "val")
        if self.val_rsna_logloss is not None and self.val_rsna_logloss.update_count:
            try:
                value = self.val_rsna_logloss.compute().float()
            except ValueError as err:  # no graded level (undefined, not 0) or a NaN output
                rank_zero_warn(f"val: val/{self.rsna_logloss_name} not logged: {err}")
            else:
                self.log(f"val/{self.rsna_logloss_name}", value, sync_dist=True)
            self.val_rsna_logloss.reset()
        if self.trainer.sanity_checking:
            return
        current = logged["val/mAP"]
        if math.isfinite(current):
            self.val_map_best.update(current)
        if math.isfinite(self.best_val_map):
            self.log("val/mAP_best", self.best_val_map, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        pred = self._predict(batch["image"])
        pred.pop("outputs")
        pred["index"] = batch["index"]
        return {k: v.detach().cpu() for k, v in pred.items()}

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best_val_map"] = float(self.best_val_map)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Metric states are not part of the state_dict, so the best travels as a plain float.
        self.val_map_best.reset()
        best = float(checkpoint.get("best_val_map", -math.inf))
        if math.isfinite(best):
            self.val_map_best.update(best)

    # ------------------------------------------------------------------ optimisation
    def optimizer_batch_size(self) -> int:
        """Images per optimizer step: the datamodule's batch x processes x accumulation."""
        data = getattr(self.trainer, "datamodule", None)
        batch = getattr(getattr(data, "hparams", None), "batch_size", None)
        if batch is None:
            batch = getattr(data, "batch_size", None)
        if batch is None:
            raise ValueError(
                f"model.lr_scaling={self.hparams.lr_scaling!r} needs the training batch size, "
                "read from the datamodule's batch_size; this trainer has no datamodule with one "
                "(use SpineDataModule, or model.lr_scaling=none)"
            )
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        return int(batch) * int(self.trainer.world_size) * accumulate

    def _fused_adamw(self) -> bool:
        """Whether AdamW takes torch's fused kernel: on CPU its step is 4x the default
        single-tensor one (RegNetX-200MF, 2.8 M parameters, one thread: 2.3 vs 9.9 ms,
        measured side by side), the same algorithm. Not under a gradient scaler (fp16
        mixed precision), whose unscaling the fused step does itself, so Lightning's
        gradient clipping would see scaled gradients and refuses it."""
        device = self.device.type
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        return device in ("cpu", "cuda") and scaler is None

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        """Lightning's clipping, done here for the fused AdamW under bf16 autocast: the mixed-
        precision plugin refuses to clip for any optimizer that unscales itself, though with
        bf16 there is no scaler and the gradients are the true ones (see `_fused_adamw`)."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not gradient_clip_val or not fused:
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def _optimizer_steps_per_epoch(self, total_steps: int) -> float:
        """Optimizer steps of one epoch (the warm-up counts epochs of them), from the training
        batches the Trainer found (`estimated_stepping_batches` has loaded them) and the
        gradient accumulation, whatever bounds the run: max_epochs, or max_steps cutting it
        short or running without an epoch limit (the steps spread over max_epochs were wrong
        then: no warm-up, or one as long as the run)."""
        trainer = self.trainer
        if not 0 < getattr(trainer, "num_training_batches", math.inf) < math.inf:
            trainer.fit_loop.setup_data()  # max_epochs=-1: the estimate did not load the data
        batches = getattr(trainer, "num_training_batches", math.inf)
        if isinstance(batches, int | float) and 0 < batches < math.inf:
            return math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        return total_steps / max(1, trainer.max_epochs or 1)  # an iterable of unknown length

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.spine_net.param_groups(
            hp.weight_decay, norm_weight_decay=hp.norm_weight_decay
        )
        lr = hp.lr
        if hp.lr_scaling != "none":
            batch = self.optimizer_batch_size()
            lr = scaled_lr(hp.lr, hp.lr_scaling, batch, hp.lr_reference_batch)
            rank_zero_info(
                f"lr_scaling={hp.lr_scaling}: lr {hp.lr:g} at batch {hp.lr_reference_batch} "
                f"-> {lr:g} at batch {batch}"
            )
        self.lr_effective = lr
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr, fused=self._fused_adamw())
        else:
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, nesterov=True)
        if hp.scheduler == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        decay_steps = max(1, total_steps - int(round(hp.hold_fraction * total_steps)))
        warmup = int(round(hp.warmup_epochs * self._optimizer_steps_per_epoch(total_steps)))
        warmup_steps = min(decay_steps - 1, warmup)
        scheduler = warmup_cosine_schedule(optimizer, warmup_steps, decay_steps, hp.min_lr_ratio)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up to the peak over `warmup_steps`, then cosine decay to `min_lr_ratio` x peak.

    Step k of the warm-up runs at (k + 1) / (warmup_steps + 1) of the peak; the decay reaches
    its floor at `total_steps`. PyTorch's schedulers, not a hand-written lambda; the cosine
    floor is one absolute value, so every parameter group must share the peak (the suite's
    groups differ only in weight decay).
    """
    peak_lrs = {group["lr"] for group in optimizer.param_groups}
    if len(peak_lrs) != 1:
        raise ValueError(
            f"warmup_cosine_schedule needs one peak learning rate for all parameter groups, "
            f"got {sorted(peak_lrs)}"
        )
    cosine_steps = max(1, total_steps - warmup_steps)
    phases: list[torch.optim.lr_scheduler.LRScheduler] = []
    if warmup_steps > 0:
        phases.append(
            torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1 / (warmup_steps + 1), total_iters=warmup_steps
            )
        )
    phases.append(
        torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=cosine_steps, eta_min=min_lr_ratio * peak_lrs.pop()
        )
    )
    # Hold the floor after the planned end (CosineAnnealingLR alone would rise again): a
    # resumed run given more epochs keeps its checkpointed plan and trains on at the floor.
    phases.append(
        torch.optim.lr_scheduler.ConstantLR(optimizer, factor=min_lr_ratio, total_iters=sys.maxsize)
    )
    milestones = [warmup_steps, warmup_steps + cosine_steps][-(len(phases) - 1) :]
    return torch.optim.lr_scheduler.SequentialLR(optimizer, phases, milestones=milestones)


class DropBlockSchedule(pl.Callback):
    """Ramp the DropBlock rate linearly from 0 to its target over the first part of training.

    Args:
        enabled: False keeps the full rate from the first step (schedule off).
        warmup_fraction: share of all training steps over which the rate grows (the DropBlock
            paper ramps over the whole of training: 1.0).
    """

    def __init__(self, enabled: bool = True, warmup_fraction: float = 1.0) -> None:
        self.enabled = enabled
        self.warmup_fraction = warmup_fraction

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        net = getattr(pl_module, "spine_net", None)
        if net is None or not hasattr(net, "set_drop_schedule"):
            return
        if not self.enabled:
            net.set_drop_schedule(1.0)
            return
        total = max(1.0, float(trainer.estimated_stepping_batches) * self.warmup_fraction)
        net.set_drop_schedule(min(1.0, trainer.global_step / total))


class WeightEMA(WeightAveraging):
    """Validate, checkpoint and end training with an exponential moving average of the weights
    (and of the BatchNorm statistics): w_ema <- decay * w_ema + (1 - decay) * w after every
    optimizer step, starting from the initial weights.

    Lightning's `WeightAveraging` does the averaging, the swap around validation, the checkpoint
    (`state_dict` holds the average, so `test`, `predict` and `load_checkpoint` use it; the raw
    weights travel beside it for a resume) and the copy into the model at the end of `fit`.
    This subclass only picks torch's foreach EMA update (Lightning's `EMAWeightAveraging`
    updates tensor by tensor) and names the two settings a preset needs.

    Args:
        decay: weight of the old average per step; the average spans about 1 / (1 - decay)
            steps (0.99: about 100).
        start_step: first optimizer step (0-based) that updates the average; before it the
            average stays at the initial weights.
    """

    def __init__(self, decay: float = 0.99, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA decay={decay!r}: must lie strictly between 0 and 1")
        if start_step < 0:
            raise ValueError(f"WeightEMA start_step={start_step!r}: must be 0 or more")
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = decay
        self.start_step = start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def setup(self, trainer, pl_module, stage: str) -> None:
        # SpineModule.configure_model only sets the memory format (and, on GPUs, SyncBatchNorm);
        # it shards nothing, so Lightning's warning about sharded models does not apply here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*WeightAveraging.*configure_model")
            super().setup(trainer, pl_module, stage)


class ThroughputMonitor(pl.Callback):
    """Log training images/s (per epoch, after a short warm-up) and peak memory in MB."""

    def __init__(self, warmup_batches: int = 2) -> None:
        self.warmup_batches = warmup_batches
        self.images = 0
        self.seconds = 0.0
        self._t0: float | None = None
        self.images_per_s: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.images, self.seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None or batch_idx < self.warmup_batches:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.seconds += time.perf_counter() - self._t0
        self.images += int(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.images and self.seconds > 0:
            self.images_per_s = self.images / self.seconds * trainer.world_size
            pl_module.log("train/images_per_s", self.images_per_s, sync_dist=True)
        pl_module.log(
            "sys/peak_mem_mb", peak_memory_mb(pl_module.device), sync_dist=True, reduce_fx="max"
        )


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPUs, else the process's peak resident set size, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class CheckpointOnInterrupt(pl.Callback):
    """Save `last.ckpt` when training stops on an exception (Ctrl-C included) so it can resume."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.dirpath / "last.ckpt")


def load_checkpoint(
    path: str | Path, config: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> SpineModule:
    """A trained SpineModule from a checkpoint, in eval mode, for notebooks and scripts.

    The network is rebuilt from the run's resolved config (`config`, default: the
    `config.yaml` of the run folder holding `checkpoints/<name>.ckpt`), the module's own
    settings from the checkpoint; the file is read with `weights_only=True`.
    """
    import importlib

    import yaml

    path = Path(path)
    config = Path(config) if config else path.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config}: no run config beside {path}; pass config= the run's config.yaml"
        )
    net_cfg = (yaml.safe_load(config.read_text()).get("model") or {}).get("net")
    if not isinstance(net_cfg, dict) or "class_path" not in net_cfg:
        raise ValueError(f"{config}: model.net has no class_path; is this a lit-spine run config?")
    module_name, _, class_name = net_cfg["class_path"].rpartition(".")
    net_cls = getattr(importlib.import_module(module_name), class_name)
    net = net_cls(**(net_cfg.get("init_args") or {}))
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    hparams = {
        k: v
        for k, v in checkpoint.get("hyper_parameters", {}).items()
        if not k.startswith("_") and k != "net"
    }
    module = SpineModule(net, **hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
