"""The run folder: its files, their fields, how they are written and how they are read.

This module is the only code that knows the layout of a run folder (docs/architecture.md,
"What a run writes"). `lit-spine fit` writes through it (train_cli.RunFolder); sweep, report
and the test stand-in `tests/fake_fit.py` read and write only through it. A run's status is
its folder's (`folder_status`): a sweep's state.json keeps no copy of it.

One flatten rule (`flatten`): nested mappings become dotted keys; lists and tuples stay
lists; an empty mapping stays an empty dict; any other non-JSON value becomes its `str`.
meta.json stores `config_flat` made by this same rule, and a folder without it has its
config.yaml flattened by it, so a factor's value type does not depend on which file a run
left.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lit_spine.utils import atomic_write_json, atomic_write_text

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
SWEEP_PARAMS = "sweep_params.yaml"  # written by the sweep; wandb.init reads it into run.config
SWEEP_ARGS = "sweep_args.json"  # the sweep's ${args_json_file}
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINTS}/last.ckpt"  # what an interrupted run resumes from
LOG = "stdout.log"  # a sweep run's console output, written by the sweep
DIAGNOSTICS = "diagnostics.json"  # written by the Diagnostics callback (lit_spine.diagnostics)
DIAGNOSTICS_DIR = "diagnostics"  # its plots and ERF_MAPS
ERF_MAPS = f"{DIAGNOSTICS_DIR}/erf.npz"  # the effective receptive field maps, by name

# meta.json, written once at the start of each fit (a resume rewrites it).
META_FIELDS = {
    "run_id": "the folder's name",
    "experiment": "experiment name (from the config file)",
    "subcommand": "fit / validate / test / predict",
    "seed": "the real seed_everything value",
    "git_commit": "commit of the code, None outside git",
    "git_dirty": "whether tracked files differed from the commit",
    "versions": "installed versions of the packages a result depends on",
    "cache_hash": "hashes of the preprocessed caches used",
    "params": "parameter count",
    "trainable_params": "parameters with requires_grad",
    "started": "UTC start time of this piece of the run (ISO 8601)",
    "host": "machine name",
    "device": "GPU name or CPU",
    "world_size": "number of processes",
    "argv": "the command line",
    "config_flat": "the resolved config flattened by runs.flatten",
}

# summary.json, written at the start, after every epoch and at the end of each fit.
SUMMARY_FIELDS = {
    "status": "running, finished, failed or interrupted",
    "val/mAP_best": "best validation mAP so far (None before the first validation)",
    "runtime_s": "seconds of fitting, summed over every piece of a resumed run",
    "images_per_s": "training images per second of the latest piece",
    "peak_mem_mb": "peak memory (MB), the largest over the pieces of a resumed run",
    "resumes": "how many times the run was resumed (0 for a run fitted in one go)",
    "params": "parameter count",
    "epochs": "epochs completed",
    "global_step": "optimizer steps",
    "best_checkpoint": "path of best.ckpt, None before one is saved",
    "ended": "UTC time of the latest write (ISO 8601)",
    "error": "why the run failed or stopped, when its sweep wrote the status (sweep_state)",
}
STATUSES = ("running", "finished", "failed", "interrupted")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys (`{"model": {"lr": 1}}` -> `{"model.lr": 1}`); the one
    rule described in the module docstring."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: _leaf(tree)} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _leaf(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_leaf(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _leaf(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# ----------------------------------------------------------------------------- writing


def write_config(run_dir: Path, config: dict[str, Any] | str) -> None:
    """config.yaml: the resolved configuration (a mapping, or YAML text already dumped)."""
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    atomic_write_text(Path(run_dir) / CONFIG, text)


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """meta.json; `config_flat` given as a nested config is flattened here."""
    meta = dict(meta)
    if "config_flat" in meta:
        meta["config_flat"] = flatten(meta["config_flat"])
    atomic_write_json(Path(run_dir) / META, meta)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json; its status must be one of STATUSES."""
    status = summary.get("status")
    if status not in STATUSES:
        raise ValueError(
            f"{Path(run_dir) / SUMMARY}: status {status!r} is not one of {', '.join(STATUSES)}"
        )
    atomic_write_json(Path(run_dir) / SUMMARY, summary)


def write_metrics(run_dir: Path, rows: pd.DataFrame) -> None:
    """metrics.csv in Lightning CSVLogger's layout (one row per logging call)."""
    atomic_write_text(Path(run_dir) / METRICS, rows.to_csv(index=False))


def write_sweep_params(run_dir: Path, params: dict[str, Any]) -> Path:
    """sweep_params.yaml in `wandb agent`'s layout ({key: {value: v}}); returns its path."""
    path = Path(run_dir) / SWEEP_PARAMS
    atomic_write_text(path, yaml.safe_dump({k: {"value": v} for k, v in params.items()}))
    return path


def write_sweep_args(run_dir: Path, params: dict[str, Any]) -> None:
    """sweep_args.json: the run's parameters as one JSON object."""
    atomic_write_json(Path(run_dir) / SWEEP_ARGS, params, indent=None)


def resumed_summary(run_dir: Path) -> dict[str, Any]:
    """What a resumed fit carries over from the previous pieces: runtime_s (summed),
    peak_mem_mb (the largest) and resumes (counted). Zeros for a fresh folder."""
    previous = read_summary(run_dir) or {}
    fresh = not previous
    return {
        "runtime_s": _number(previous.get("runtime_s"), 0.0),
        "peak_mem_mb": _number(previous.get("peak_mem_mb"), None),
        "resumes": 0 if fresh else int(_number(previous.get("resumes"), 0)) + 1,
    }


def _number(value: Any, default: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return default


# ----------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's summary.json, or None when missing or unreadable."""
    summary = read_json(Path(run_dir) / SUMMARY)
    return summary or None


def read_status(run_dir: Path) -> str | None:
    """The summary's status, None without a summary."""
    return (read_summary(run_dir) or {}).get("status")


def folder_status(run_dir: Path) -> str:
    """A run's status as its folder says it, for a process that no longer writes to it:
    summary.json's status, where "running" means the fit stopped without saying so
    (interrupted); without a summary, "pending" for a folder never started and "interrupted"
    for one that was (a killed process leaves no summary behind)."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status is None:
        started = run_dir.is_dir() and any(run_dir.iterdir())
        return "interrupted" if started else "pending"
    return "interrupted" if status == "running" else status


def read_meta(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / META)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The flat config: meta.json's config_flat, else config.yaml flattened; the sweep's
    parameters (sweep_params.yaml) win over both."""
    run_dir = Path(run_dir)
    config = read_meta(run_dir).get("config_flat")
    if isinstance(config, dict):
        config = {k: _leaf(v) for k, v in config.items()}
    else:
        try:
            config = flatten(yaml.safe_load((run_dir / CONFIG).read_text()) or {})
        except (OSError, yaml.YAMLError):
            config = {}
    params_file = run_dir / SWEEP_PARAMS
    if params_file.is_file():
        params = yaml.safe_load(params_file.read_text()) or {}
        for key, value in params.items():
            config[key] = _leaf(value.get("value") if isinstance(value, dict) else value)
    return config


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.csv as a DataFrame (empty when missing or unreadable)."""
    try:
        return pd.read_csv(Path(run_dir) / METRICS)
    except (OSError, ValueError):
        return pd.DataFrame()


def read_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """diagnostics.json, or None when the run has none (diagnostics off or failed)."""
    return read_json(Path(run_dir) / DIAGNOSTICS) or None


def read_erf_map(run_dir: Path, name: str) -> np.ndarray | None:
    """One map ("init" or "trained") of ERF_MAPS, None when the file or the map is missing."""
    try:
        with np.load(Path(run_dir) / ERF_MAPS) as maps:
            return maps[name]
    except (OSError, KeyError, ValueError):
        return None


def read_curve(run_dir: Path, column: str) -> dict[int, float]:
    """epoch -> last logged value of `column` in metrics.csv. Lightning's rows are sparse, and
    a resumed fit can log the epoch it resumed at a second time: the last value counts."""
    rows = read_metrics(run_dir)
    if "epoch" not in rows or column not in rows:
        return {}
    rows = rows[["epoch", column]].apply(pd.to_numeric, errors="coerce").dropna()
    last = rows.groupby(rows["epoch"].astype(int))[column].last()
    return {int(epoch): float(value) for epoch, value in sorted(last.items())}


def is_run_dir(path: Path) -> bool:
    return (Path(path) / SUMMARY).is_file()


def find_run_dirs(root: Path) -> list[Path]:
    """Run folders at or below `root` (sweep attempts/ copies left out)."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    return sorted({p.parent for p in root.glob(f"**/{SUMMARY}") if "attempts" not in p.parts})


def load_run(path: str | os.PathLike) -> pd.DataFrame:
    """One run as a one-row DataFrame (columns as in `load_runs`)."""
    return load_runs([path])


def load_runs(paths_or_root: str | os.PathLike | list) -> pd.DataFrame:
    """Many runs, one row each: `run_dir`, the flat config keys as `config.<key>`, the summary
    fields as `summary.<field>` and meta.json's fields (config_flat left out: it is the
    config) as `meta.<field>`. A single path is searched for run folders below it; a list
    names run folders (or folders holding them), in that order.

    Every column has dtype object, so a value keeps the type `flatten` gave it (an int stays
    an int next to a run that lacks the key, a list stays a list); a key a run lacks is NaN in
    its row, and `row_fields` gives a row's fields without those."""
    if isinstance(paths_or_root, str | os.PathLike):
        paths_or_root = [paths_or_root]
    run_dirs: list[Path] = []
    for path in map(Path, paths_or_root):
        found = find_run_dirs(path)
        if not found:
            raise ValueError(f"{path}: no run folder ({SUMMARY}) at or below it")
        run_dirs += found
    rows = []
    for run_dir in run_dirs:
        row: dict[str, Any] = {"run_dir": str(run_dir)}
        row.update({f"config.{k}": v for k, v in read_config(run_dir).items()})
        row.update({f"summary.{k}": v for k, v in (read_summary(run_dir) or {}).items()})
        meta = read_meta(run_dir)
        row.update({f"meta.{k}": v for k, v in meta.items() if k != "config_flat"})
        rows.append(row)
    return pd.DataFrame(rows, dtype=object)


def row_fields(row: pd.Series, group: str) -> dict[str, Any]:
    """The `group` ("config", "summary" or "meta") fields of one `load_runs` row, prefix
    removed, in column order, without the keys this run lacks (NaN cells; a float NaN stored
    in a file reads the same as a missing key)."""
    prefix = f"{group}."
    return {
        key[len(prefix) :]: value
        for key, value in row.items()
        if key.startswith(prefix) and not (isinstance(value, float) and math.isnan(value))
    }


# ----------------------------------------------------------------------------- metrics.csv


def csv_logger(run_dir: Path, version: str = ""):
    """Lightning's CSVLogger writing `<run_dir>/<version>/metrics.csv`, except that a resumed
    fit appends to the metrics.csv of the earlier pieces (Lightning's own writer deletes it
    when its folder is not empty). Lightning is imported here, not at the top, so that
    reading run folders (report, sweep) does not load it."""
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    class KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            path = Path(self.metrics_file_path)
            if not path.is_file():
                return
            rows = read_metrics(path.parent)
            # Lightning appends rows under its sorted key list: give it the file's keys, and
            # put the file in that order first so appended rows line up with its header.
            keys = sorted(rows.columns)
            if list(rows.columns) != keys:
                atomic_write_text(path, rows[keys].to_csv(index=False))
            self.metrics_keys = keys

    class KeepingCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None and self.logger_rank_zero():
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = KeepingWriter(log_dir=self.log_dir)
            return super().experiment

        @staticmethod
        def logger_rank_zero() -> bool:
            from pytorch_lightning.utilities.rank_zero import rank_zero_only

            return rank_zero_only.rank == 0

    return KeepingCSVLogger(save_dir=str(run_dir), name="", version=version)
