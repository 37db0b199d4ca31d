"""`lit-spine fit|validate|test|predict`: LightningCLI with the suite's run folders.

Every invocation writes into one run folder (default `runs/<experiment>/<run_id>`, the id being
a timestamp plus random hex so that runs started together never collide; the environment
variable LIT_SPINE_RUN_DIR or `--run_dir` name it exactly):

    config.yaml  meta.json  metrics.csv  summary.json  checkpoints/{best,last}.ckpt

`validate`, `test` and `predict` on a checkpoint inside a run folder write into a subfolder
of that run (`<run>/test/...`), never over the training run's files.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, WeightAveraging
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lit_spine import runs as run_folder
from lit_spine.data.datamodule import SpineDataModule
from lit_spine.diagnostics import Diagnostics
from lit_spine.hardware import resolve_precision, set_cpu_threads
from lit_spine.module import (
    CheckpointOnInterrupt,
    DropBlockSchedule,
    SpineModule,
    ThroughputMonitor,
    peak_memory_mb,
)
from lit_spine.utils import atomic_write_json, git_state

PACKAGES = (
    "lit_spine",
    "torch",
    "torchvision",
    "pytorch-lightning",
    "timm",
    "torchmetrics",
    "wandb",
    "pydicom",
    "numpy",
    "jsonargparse",
    "omegaconf",
    "sweeps",
)
# Config keys copied to W&B under short names so dashboards can group and filter runs.
GROUP_KEYS = {
    "backbone": "model.net.init_args.backbone",
    "norm": "model.net.init_args.norm",
    "drop": "model.net.init_args.drop",
    "drop_rate": "model.net.init_args.drop_rate",
    "head": "model.net.init_args.head",
    "batch_size": "data.batch_size",
    "image_size": "data.image_size",
    "seed": "seed_everything",
    "task": "data.task",
}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def new_run_id() -> str:
    """A run id unique even for runs started in the same second."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def wandb_mode(requested: str) -> str:
    """Resolve 'auto' to online (API key and server reachable) or offline; respect WANDB_MODE."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    if requested != "auto":
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        netrc = Path.home() / ".netrc"
        has_key = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not has_key:
        return "offline"
    import socket

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
        return "online"
    except OSError:
        return "offline"


class RunFolder(SaveConfigCallback):
    """Save config.yaml and meta.json at start, summary.json at the end (or on failure)."""

    run_dir: Path
    cli: SpineCLI

    def save_config(self, trainer, pl_module, stage) -> None:
        cli = self.cli
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        import yaml

        config_flat = run_folder.flatten(yaml.safe_load(config))
        commit, dirty = git_state(Path.cwd())
        data = trainer.datamodule
        meta = {
            "run_id": self.run_dir.name,
            "experiment": cli.experiment,
            "subcommand": cli.subcommand,
            "seed": self.config.get("seed_everything"),
            "git_commit": commit,
            "git_dirty": dirty,
            "versions": package_versions(),
            "cache_hash": getattr(data, "cache_hashes", None),
            "params": sum(p.numel() for p in pl_module.parameters()),
            "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "device": torch.cuda.get_device_name(0)
            if torch.cuda.is_available()
            else platform.processor() or "cpu",
            "world_size": trainer.world_size,
            "argv": sys.argv,
            "config_flat": config_flat,
        }
        # Only rank 0 runs this: never touch trainer.log_dir here, it is a collective call.
        run_folder.write_meta(Path(cli.log_dir), meta)
        self._short_keys = {k: config_flat.get(v) for k, v in GROUP_KEYS.items()}
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.config.update(
                    {**config_flat, **self._short_keys}, allow_val_change=True
                )

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning logs the module's and data module's hyperparameters after save_config;
        # the data module's own `seed` argument (None unless set) would then stand in W&B's
        # `seed` where the run's seed_everything belongs: the short keys are put back.
        short = getattr(self, "_short_keys", None)
        for logger in trainer.loggers if short and trainer.is_global_zero else ():
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.config.update(short, allow_val_change=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        # What earlier pieces of a resumed run measured (runs.SUMMARY_FIELDS): read once,
        # before this piece writes its own "running" summary.
        self._previous = run_folder.resumed_summary(Path(self.cli.log_dir))
        self._summary(trainer, pl_module, "running")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._summary(trainer, pl_module, "running")

    def _summary(self, trainer, pl_module, status: str) -> None:
        if not trainer.is_global_zero:
            return
        previous = getattr(self, "_previous", None) or run_folder.resumed_summary(
            Path(self.cli.log_dir)
        )
        throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "test/"))
        }
        best = getattr(pl_module, "best_val_map", None)
        ckpt = trainer.checkpoint_callback
        peak = peak_memory_mb(pl_module.device)
        if previous["peak_mem_mb"] is not None:
            peak = (
                max(previous["peak_mem_mb"], peak) if peak is not None else previous["peak_mem_mb"]
            )
        summary = {
            "status": status,
            "val/mAP_best": best if best is not None and best > -1 else None,
            "runtime_s": previous["runtime_s"]
            + time.perf_counter()
            - getattr(self, "_t0", time.perf_counter()),
            "images_per_s": throughput.images_per_s if throughput else None,
            "peak_mem_mb": peak,
            "resumes": previous["resumes"],
            "params": sum(p.numel() for p in pl_module.parameters()),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "best_checkpoint": getattr(ckpt, "best_model_path", None) or None,
            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **metrics,
        }
        run_folder.write_summary(Path(self.cli.log_dir), summary)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._summary(trainer, pl_module, "finished")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn == "fit":
            stopped = isinstance(exception, KeyboardInterrupt | SIGTERMException)
            status = "interrupted" if stopped else "failed"  # a stopped run resumes
            self._summary(trainer, pl_module, status)

    def on_test_end(self, trainer, pl_module) -> None:
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
        }
        if trainer.is_global_zero:
            atomic_write_json(Path(self.cli.log_dir) / "test_metrics.json", metrics)


def last_checkpoint_every_epoch(callbacks: list) -> list[ModelCheckpoint]:
    """Callbacks that keep `last.ckpt` at the latest epoch where the configured checkpoint asks
    for it (`checkpoint.save_last`).

    Since Lightning 2.6 a monitoring `ModelCheckpoint` writes `last.ckpt` only at the steps
    where it also saved a top-k checkpoint, i.e. when the monitored metric improved: with
    save_top_k=1 `last.ckpt` is a copy of `best.ckpt`, and resuming a run to more epochs would
    silently restart from its best epoch. Here the monitoring callback keeps `best.ckpt` only,
    and a second one without a monitor rewrites `last.ckpt` at the end of every epoch.
    """
    extra = []
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.save_last:
            cb.save_last = False
            last = ModelCheckpoint(
                dirpath=cb.dirpath, filename=ModelCheckpoint.CHECKPOINT_NAME_LAST, monitor=None,
                save_top_k=1, save_on_train_epoch_end=True, enable_version_counter=False,
            )  # fmt: skip
            extra.append(last)
    return extra


class SpineCLI(LightningCLI):
    """LightningCLI for SpineModule + SpineDataModule with run folders and default callbacks."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--experiment",
            type=str,
            default="default",
            help="experiment name: runs land in runs/<experiment>/<run_id>",
        )
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="exact run folder (also env LIT_SPINE_RUN_DIR); default: a new one",
        )
        parser.add_argument("--runs_root", type=str, default="runs", help="parent of run folders")
        parser.add_argument(
            "--wandb",
            type=str,
            default="auto",
            help="W&B logging: auto (online with a key and network, else offline), "
            "online, offline, disabled",
        )
        parser.add_argument("--wandb_project", type=str, default="lit_spine", help="W&B project")
        parser.add_argument(
            "--print_model",
            type=bool,
            default=False,
            help="print the model summary (params, FLOPs, receptive field, "
            "norm/drop layers) and exit",
        )
        parser.add_argument(
            "--overlays",
            type=int,
            default=16,
            help="predict: number of PNG overlays of predicted vs true points",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mAP",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/mAP",
                "early_stopping.mode": "max",
                "early_stopping.patience": 1000,
                "early_stopping.check_finite": False,
            }
        )
        parser.add_lightning_class_args(DropBlockSchedule, "drop_schedule")
        # End-of-fit diagnostics (lit_spine.diagnostics): diagnostics.json + PNGs, W&B tables.
        parser.add_lightning_class_args(Diagnostics, "diagnostics")
        parser.link_arguments("data.slices", "model.net.init_args.in_chans", apply_on="parse")
        parser.link_arguments("data.vocab", "model.net.init_args.vocab", apply_on="parse")
        # The task sizes the heatmap channels, classifiers, losses and metrics (lit_spine.task).
        parser.link_arguments("data.task", "model.net.init_args.task", apply_on="parse")
        parser.link_arguments("model.net.init_args.heatmap_stride", "data.stride", apply_on="parse")

    def _set_seed(self) -> None:
        """`seed_everything: true` draws a real random seed (recorded in config.yaml and
        meta.json like any other): Lightning's help promises a random seed, but its
        `seed_everything()` without one gives 0 every time. DDP children inherit the drawn
        seed through PL_GLOBAL_SEED, which seeding sets."""
        if self._get(self.config, "seed_everything") is True and "PL_GLOBAL_SEED" not in os.environ:
            seed = secrets.randbelow(2**31)
            if self.subcommand:
                self.config[self.subcommand]["seed_everything"] = seed
            else:
                self.config["seed_everything"] = seed
        super()._set_seed()

    # ------------------------------------------------------------------ run folder
    def _resolve_run_dir(self, cfg) -> Path:
        explicit = cfg.get("run_dir") or os.environ.get("LIT_SPINE_RUN_DIR")
        ckpt = cfg.get("ckpt_path")
        root = Path(cfg.get("runs_root") or "runs") / self.experiment
        if explicit:
            return Path(explicit)
        if ckpt and ckpt != "last" and Path(ckpt).parent.name == "checkpoints":
            return Path(ckpt).parent.parent
        if ckpt in ("last", "best"):
            candidates = sorted(
                (p.parent.parent for p in root.glob("*/checkpoints/last.ckpt")),
                key=lambda p: p.stat().st_mtime,
            )
            unfinished = [p for p in candidates if run_folder.read_status(p) != "finished"]
            pick = (unfinished or candidates or [None])[-1]
            if pick is None:
                raise SystemExit(
                    f"lit-spine: --ckpt_path {ckpt}: no run of experiment {self.experiment!r} with "
                    f"checkpoints under {root}; pass --run_dir or a checkpoint path"
                )
            print(f"lit-spine: resuming run folder {pick}", file=sys.stderr)
            return pick
        return root / new_run_id()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        self.experiment = cfg.get("experiment") or "default"
        self.run_dir = self._resolve_run_dir(cfg)
        ckpt = cfg.get("ckpt_path")
        if ckpt in ("last", "best"):
            path = self.run_dir / "checkpoints" / f"{ckpt}.ckpt"
            if not path.is_file():
                raise SystemExit(f"lit-spine: --ckpt_path {ckpt}: {path} does not exist")
            cfg["ckpt_path"] = str(path)
        if _launching_rank():
            self._check_against_the_run(cfg)
        self.new_folder = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # DDP children re-run this program: they must land in the same folder.
        os.environ["LIT_SPINE_RUN_DIR"] = str(self.run_dir)
        self.log_dir = self.run_dir if self.subcommand == "fit" else self.run_dir / self.subcommand
        cfg["checkpoint"]["dirpath"] = str(self.run_dir / "checkpoints")
        norm = cfg["model"]["net"]["init_args"].get("norm") if cfg["model"].get("net") else None
        if norm == "batchnorm":
            cfg["model"]["sync_batchnorm"] = cfg["model"].get("sync_batchnorm", True)

    def _drop_empty_new_folder(self) -> None:
        """Remove the run folder this command created when it stops before training (a size
        the backbone cannot take, `--print_model`) and nothing has been written into it."""
        if getattr(self, "new_folder", False) and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()

    def _check_against_the_run(self, cfg) -> None:
        """Refuse, before any file is written, a `fit` that would silently change a run: a new
        fit into a folder that holds a run, or a resume whose settings differ from the run's
        config.yaml (the restored optimizer and schedule would keep the old ones while the
        record said the new). `test`/`predict`/`validate` on a run's checkpoint refuse another
        net or task and warn at another image size."""
        ckpt = cfg.get("ckpt_path")
        saved_at = self.run_dir
        if self.subcommand != "fit":
            if not ckpt or Path(ckpt).parent.name != "checkpoints":
                return
            saved_at = Path(ckpt).parent.parent
        if not (saved_at / run_folder.CONFIG).is_file():
            if self.subcommand == "fit" and (saved_at / run_folder.METRICS).is_file() and not ckpt:
                raise SystemExit(
                    f"lit-spine: {saved_at} already holds a run (metrics.csv); resume it with "
                    "--ckpt_path last, or pass another --run_dir (--run_dir=null: a new folder)"
                )
            return
        if self.subcommand == "fit" and not ckpt:
            status = run_folder.read_status(saved_at) or "no summary"
            raise SystemExit(
                f"lit-spine: {saved_at} already holds a run ({status}); resume it with "
                "--ckpt_path last, or pass another --run_dir (--run_dir=null: a new folder; a "
                "run's config.yaml records its run_dir)"
            )
        import yaml

        try:
            old = run_folder.flatten(yaml.safe_load((saved_at / run_folder.CONFIG).read_text()))
        except (OSError, yaml.YAMLError):
            return  # nothing readable to compare with
        new = run_folder.flatten(json.loads(json.dumps(cfg.as_dict(), default=str)))
        may_change = RESUME_MAY_CHANGE if self.subcommand == "fit" else EVAL_MUST_MATCH
        changed = [
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) & set(new))  # linked keys (the task, ...) are not saved
            if _text(old.get(k)) != _text(new.get(k))
            and (not may_change.search(k) if self.subcommand == "fit" else may_change.search(k))
        ]
        if changed:
            what = (
                f"--ckpt_path resumes run {saved_at}, but this config differs from its "
                "config.yaml; a resumed run keeps the settings it was trained with (only the "
                "budget and the hardware may change): drop these options, or start a new run"
                if self.subcommand == "fit"
                else f"{ckpt} was trained with another net or task: use its run's config "
                f"(--config {saved_at / 'config.yaml'}) without overriding these"
            )
            raise SystemExit(f"lit-spine: {what}:\n  " + "\n  ".join(changed))
        trained, asked = old.get("data.image_size"), new.get("data.image_size")
        if self.subcommand != "fit" and trained != asked:
            print(
                f"lit-spine: warning: {self.subcommand} at data.image_size={asked}, but the "
                f"checkpoint was trained at {trained} ({saved_at / 'config.yaml'}): its numbers "
                "are not those of the trained setting",
                file=sys.stderr,
            )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        cfg = self.config_init[self.subcommand]
        trainer_cfg = cfg.get("trainer", {})
        precision, note = resolve_precision(
            trainer_cfg.get("precision"), trainer_cfg.get("accelerator")
        )
        if note:
            print(f"lit-spine: {note}", file=sys.stderr)
            trainer_cfg["precision"] = precision
            # config.yaml records what the run trained with, not what was asked for.
            self.config[self.subcommand]["trainer"]["precision"] = precision
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = self._loggers(cfg)
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        return super().instantiate_trainer(**kwargs)

    def _loggers(self, cfg) -> list:
        version = "" if self.subcommand == "fit" else self.subcommand
        loggers: list = [run_folder.csv_logger(self.run_dir, version)]
        mode = wandb_mode(cfg.get("wandb") or "auto")
        if mode != "disabled":
            from pytorch_lightning.loggers import WandbLogger

            loggers.append(
                WandbLogger(
                    project=cfg.get("wandb_project") or "lit_spine",
                    # A sweep names and groups its runs through the environment (WANDB_*).
                    name=os.environ.get("WANDB_NAME") or f"{self.experiment}/{self.run_dir.name}",
                    id=self.run_dir.name.replace("-", "")[-16:] + self.subcommand[:1],
                    group=os.environ.get("WANDB_RUN_GROUP") or self.experiment,
                    job_type=os.environ.get("WANDB_JOB_TYPE") or self.subcommand,
                    save_dir=str(self.run_dir),
                    offline=mode == "offline",
                    resume="allow",
                )
            )
        return loggers

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> pl.Trainer:
        callbacks = list(callbacks)
        if self.subcommand == "fit":
            callbacks += last_checkpoint_every_epoch(callbacks)
        callbacks.append(ThroughputMonitor())
        callbacks.append(CheckpointOnInterrupt(self.run_dir / "checkpoints"))
        if self.subcommand != "fit":
            # A checkpoint of a run with weight averaging already holds the averaged weights.
            fit_only = (ModelCheckpoint, EarlyStopping, CheckpointOnInterrupt, WeightAveraging)
            callbacks = [c for c in callbacks if not isinstance(c, fit_only)]
            given = config.get("callbacks") or []  # `trainer.callbacks` (a preset's EMA)
            given = given if isinstance(given, list) else [given]
            config = {**config, "callbacks": [c for c in given if not isinstance(c, fit_only)]}
        if self.subcommand == "predict":
            from lit_spine.predict import PredictionWriter

            cfg = self.config_init[self.subcommand]
            callbacks.append(PredictionWriter(self.log_dir, overlays=cfg.get("overlays", 16)))
        return super()._instantiate_trainer(config, callbacks)

    def after_instantiate_classes(self) -> None:
        cfg = self.config_init[self.subcommand]
        size = self.datamodule.hparams.get("image_size")
        deepest = getattr(self.model.spine_net, "size_multiple", 1)  # SpineNet.forward's rule
        if isinstance(size, int) and size % deepest:
            fits = sorted({max(deepest, size // deepest * deepest), -(-size // deepest) * deepest})
            self._drop_empty_new_folder()
            raise SystemExit(
                f"lit-spine: data.image_size={size} is not a multiple of {deepest}, the deepest "
                f"reduction of backbone {self.model.spine_net.backbone_name!r}; use "
                + " or ".join(str(f) for f in fits)
            )
        if cfg.get("print_model"):
            from lit_spine.models.summary import describe, format_description

            image_size = self.datamodule.hparams.get("image_size", 256)
            print(format_description(describe(self.model.spine_net, input_size=image_size)))
            self._drop_empty_new_folder()
            raise SystemExit(0)
        for cb in self.trainer.callbacks:
            if isinstance(cb, RunFolder):
                cb.run_dir = self.run_dir
                cb.cli = self
            if isinstance(cb, Diagnostics):
                cb.run_dir = self.run_dir


# Keys a resumed fit may change (the budget, the hardware, where things go and what is
# printed); any other difference from the run's config.yaml is refused.
RESUME_MAY_CHANGE = re.compile(
    r"^(trainer\.(max_epochs|max_steps|max_time|accelerator|devices|num_nodes|strategy"
    r"|enable_progress_bar|logger.*)|data\.(num_workers|cache_dir)|checkpoint\.dirpath|ckpt_path"
    r"|run_dir|runs_root"
    r"|config|experiment|print_model|overlays|wandb\w*)$"
)
# Keys `test`/`predict`/`validate` must share with the checkpoint's run: the net and the task.
EVAL_MUST_MATCH = re.compile(r"^(model\.net\..*|data\.(task|vocab|slices))$")


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _launching_rank() -> bool:
    """Whether this process starts the run (not a DDP child, which re-runs the command)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def run_lightning_cli(argv: list[str]) -> SpineCLI:
    """Run LightningCLI on argv (e.g. ['fit', '--config', 'experiments/smoke.yaml'])."""
    threads = os.environ.get("LIT_SPINE_NUM_THREADS")
    if threads:
        set_cpu_threads(int(threads))
    # The run folder is handed to DDP children through the environment; restore it
    # afterwards so that a second run in the same process gets a folder of its own.
    saved = os.environ.get("LIT_SPINE_RUN_DIR")
    cli: SpineCLI | None = None

    class CLI(SpineCLI):
        def before_instantiate_classes(self) -> None:
            nonlocal cli
            cli = self  # for the clean-up below, should anything fail
            super().before_instantiate_classes()

    try:
        return CLI(
            SpineModule,
            SpineDataModule,
            save_config_callback=RunFolder,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", "prog": "lit-spine"},
            args=argv,
            auto_configure_optimizers=False,
        )
    except SIGTERMException:
        raise SystemExit(128 + 15) from None  # stopped, not a success (Lightning's exits 0)
    except Exception:
        if cli is not None and getattr(cli, "new_folder", False):
            _remove_if_nothing_ran(cli.run_dir)
        raise
    finally:
        if saved is None:
            os.environ.pop("LIT_SPINE_RUN_DIR", None)
        else:
            os.environ["LIT_SPINE_RUN_DIR"] = saved


def _remove_if_nothing_ran(run_dir: Path) -> None:
    """Remove a run folder this command created when it failed before any training step (a
    bad setting or missing data): it holds no result, and left behind it would count as a
    failed run in reports. A folder with a checkpoint or a trained step is kept."""
    summary = run_folder.read_summary(run_dir) or {}
    if any(run_dir.glob(f"{run_folder.CHECKPOINTS}/*.ckpt")) or summary.get("global_step"):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"lit-spine: removed {run_dir}: the run failed before its first step", file=sys.stderr)
