"""A sweep's state: the planned runs and their progress, kept in `<sweep dir>/state.json`.

`SweepState` is the plan (the sweep file's config and hash, one `PlannedRun` per run with
its parameters, command and folder) plus what the runner records about each run (status,
attempts, times, exit code, metric). It is rewritten atomically after every change, so a
rerun after Ctrl-C or a crash continues from it. A run's folder is the authority on whether
it finished (lit_spine.runs, summary.json): `reconcile` brings the recorded statuses in line
with the folders when a sweep starts.
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


def reconcile(state: SweepState) -> list[str]:
    """Bring statuses in line with the run folders after a crash or a deletion; return notes."""
    notes = []
    for run in state.runs:
        run_dir = state.dir / run.run_dir
        if run.status == "finished" and not run_is_finished(run_dir):
            notes.append(f"{run.id}: marked finished but {run_dir}/summary.json is not; redoing")
            run.status = "pending"
        elif run.status == "running":
            run.status = "interrupted"  # the sweep that ran it died
        elif run.status in ("pending", "failed", "interrupted") and run_is_finished(run_dir):
            run.status = "finished"  # it finished after the sweep stopped watching
    return notes
