"""A sweep's state: the planned runs and their progress, kept in `<sweep dir>/state.json`.

`SweepState` is the plan (the sweep file's config and hash, one `PlannedRun` per run with
its parameters, command and folder) plus what the runner records about each attempt (times,
exit code, metric). It is rewritten atomically after every change, so a rerun after Ctrl-C
or a crash continues from it. A run's status is its folder's (summary.json, through
lit_spine.runs; `folder_status`): when a child ends without saying how, the sweep writes the
status into the folder (`record_status`), and every start takes each status from the folders
(`reconcile`): the statuses state.json shows are never read back as the truth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lit_spine import runs as run_folder
from lit_spine.utils import atomic_write_json

STATE_VERSION = 1
DEFAULT_METRIC = {"name": "val/mAP_best", "goal": "maximize"}


class SweepError(Exception):
    """A problem the user can fix (bad sweep file, changed plan, locked folder)."""


def metric_of(config: dict[str, Any]) -> dict[str, str]:
    """The sweep's metric {name, goal}, defaulting to val/mAP_best maximized."""
    metric = dict(DEFAULT_METRIC)
    metric.update(config.get("metric") or {})
    return metric


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class PlannedRun:
    """One run of the sweep as recorded in state.json."""

    id: str
    params: dict[str, Any]
    command: list[str]
    run_dir: str  # relative to the sweep folder
    status: str = "pending"  # pending | running | finished | failed | interrupted
    attempts: int = 0
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None
    returncode: int | None = None
    metric: float | None = None
    resumed_from: str | None = None
    error: str | None = None
    search_info: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """Identity of the run for plan comparison: its parameters."""
        return json.dumps(self.params, sort_keys=True, default=str)


@dataclass
class SweepState:
    """The sweep's plan and progress, persisted to `<sweep dir>/state.json`."""

    path: Path
    sweep_file: str
    name: str
    hash: str
    config: dict[str, Any]
    runs: list[PlannedRun] = field(default_factory=list)
    created: str = field(default_factory=utc_now)
    overlay: list[str] = field(default_factory=list)  # `--config` files added to every run

    @property
    def dir(self) -> Path:
        return self.path.parent

    def save(self) -> None:
        """Write atomically: a crash leaves the previous or the new state, never half."""
        data = {
            "version": STATE_VERSION,
            "sweep_file": self.sweep_file,
            "name": self.name,
            "hash": self.hash,
            "config": self.config,
            "overlay": self.overlay,
            "metric": metric_of(self.config),
            "created": self.created,
            "updated": utc_now(),
            "runs": [asdict(run) for run in self.runs],
        }
        atomic_write_json(self.path, data)

    @classmethod
    def load(cls, path: Path) -> SweepState:
        """Read a state file written by `save`."""
        data = json.loads(path.read_text())
        if data.get("version") != STATE_VERSION:
            raise SweepError(f"{path}: state version {data.get('version')} is not {STATE_VERSION}")
        runs = [PlannedRun(**run) for run in data["runs"]]
        return cls(
            path=path,
            sweep_file=data["sweep_file"],
            name=data["name"],
            hash=data["hash"],
            config=data["config"],
            runs=runs,
            created=data.get("created", utc_now()),
            overlay=list(data.get("overlay", [])),
        )

    def counts(self) -> dict[str, int]:
        """Number of runs per status."""
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts


read_summary = run_folder.read_summary  # the run folder's summary.json, None when missing


def run_is_finished(run_dir: Path) -> bool:
    """A run counts as finished only when its folder says so (summary.json status finished)."""
    return run_folder.read_status(run_dir) == "finished"


def folder_status(run_dir: Path) -> str:
    """A run's status as its folder says it: summary.json's status, where "running" means the
    fit stopped without saying so (interrupted); without a summary, pending for a folder never
    started and interrupted for one that was (a killed sweep leaves no summary behind)."""
    status = run_folder.read_status(run_dir)
    if status is None:
        started = run_dir.is_dir() and any(run_dir.iterdir())
        return "interrupted" if started else "pending"
    return "interrupted" if status == "running" else status


def record_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """Write `status` into the run folder's summary.json, keeping its other fields: for a run
    whose process ended without writing that status itself (it crashed, could not start, or
    was stopped by the sweep)."""
    summary = read_summary(run_dir) or {}
    summary.update(status=status, ended=utc_now())
    if error is not None:
        summary["error"] = error
    run_folder.write_summary(run_dir, summary)


def reconcile(state: SweepState) -> list[str]:
    """Take every run's status from its folder (`folder_status`), after a crash, a deletion or
    a run that finished unwatched; return notes where a run recorded as finished is not."""
    notes = []
    for run in state.runs:
        run_dir = state.dir / run.run_dir
        status = folder_status(run_dir)
        if run.status == "finished" and status != "finished":
            notes.append(f"{run.id}: marked finished but {run_dir}/summary.json is not; redoing")
        run.status = status
    return notes
