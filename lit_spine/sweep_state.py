"""A sweep's plan, kept in `<sweep dir>/state.json`; each run's status, read from its folder.

`SweepState` is the plan only: the sweep file's config and hash, the `--config` overlay, and
one `PlannedRun` per run (its id, parameters, command, folder and how many attempts it has
had, which names the folders of earlier attempts). It is rewritten atomically whenever the
plan changes, so a rerun after Ctrl-C or a crash continues from it. Nothing in it can
disagree with the run folders: a run's status, metric and error are read from its folder
whenever they are needed (`SweepState.status`, through lit_spine.runs.folder_status), and
when a child ends without saying how, the sweep writes the status into the folder
(`record_status`). A state.json written before this (with per-run statuses and attempt
records) still loads; those fields are ignored (`SweepState.legacy_fields`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lit_spine import runs as run_folder
from lit_spine.utils import atomic_write_json

STATE_VERSION = 1
DEFAULT_METRIC = {"name": "val/mAP_best", "goal": "maximize"}
# Per-run fields older state files recorded; the run folders say all of it now.
LEGACY_RUN_FIELDS = (
    "status", "started", "ended", "duration_s", "returncode", "metric", "resumed_from", "error",
)  # fmt: skip


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
    """One run of the sweep's plan as recorded in state.json."""

    id: str
    params: dict[str, Any]
    command: list[str]
    run_dir: str  # relative to the sweep folder
    attempts: int = 0  # starts so far; attempt n's leftover folder is attempts/<id>.<n>
    search_info: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """Identity of the run for plan comparison: its parameters."""
        return json.dumps(self.params, sort_keys=True, default=str)


@dataclass
class SweepState:
    """The sweep's plan, persisted to `<sweep dir>/state.json`; statuses from the folders."""

    path: Path
    sweep_file: str
    name: str
    hash: str
    config: dict[str, Any]
    runs: list[PlannedRun] = field(default_factory=list)
    created: str = field(default_factory=utc_now)
    overlay: list[str] = field(default_factory=list)  # `--config` files added to every run
    legacy_fields: bool = False  # loaded from a state.json with per-run statuses (ignored)

    @property
    def dir(self) -> Path:
        return self.path.parent

    def run_path(self, run: PlannedRun) -> Path:
        """The run's folder."""
        return self.dir / run.run_dir

    def status(self, run: PlannedRun) -> str:
        """pending, finished, failed or interrupted, as the run's folder says it
        (lit_spine.runs.folder_status; a run in progress reads as interrupted)."""
        return run_folder.folder_status(self.run_path(run))

    def statuses(self) -> dict[str, str]:
        """Run id -> status, every one read from its folder now."""
        return {run.id: self.status(run) for run in self.runs}

    def counts(self) -> dict[str, int]:
        """Number of runs per status."""
        counts: dict[str, int] = {}
        for status in self.statuses().values():
            counts[status] = counts.get(status, 0) + 1
        return counts

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
        """Read a state file written by `save`, or by an older version (its per-run statuses
        and attempt records are dropped: the folders say them)."""
        data = json.loads(path.read_text())
        if data.get("version") != STATE_VERSION:
            raise SweepError(f"{path}: state version {data.get('version')} is not {STATE_VERSION}")
        known = {f.name for f in fields(PlannedRun)}
        runs, legacy = [], False
        for run in data["runs"]:
            legacy = legacy or any(k in run for k in LEGACY_RUN_FIELDS)
            runs.append(PlannedRun(**{k: v for k, v in run.items() if k in known}))
        return cls(
            path=path,
            sweep_file=data["sweep_file"],
            name=data["name"],
            hash=data["hash"],
            config=data["config"],
            runs=runs,
            created=data.get("created", utc_now()),
            overlay=list(data.get("overlay", [])),
            legacy_fields=legacy,
        )


read_summary = run_folder.read_summary  # the run folder's summary.json, None when missing


def run_is_finished(run_dir: Path) -> bool:
    """A run counts as finished only when its folder says so (summary.json status finished)."""
    return run_folder.folder_status(run_dir) == "finished"


def run_metric(run_dir: Path, name: str) -> float | None:
    """The run's summary value of `name` (the sweep metric, say), None when not a number."""
    value = (read_summary(run_dir) or {}).get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def runtime_s(run_dir: Path) -> float | None:
    """The run's seconds of fitting (summary.json runtime_s), None when it has none."""
    return run_metric(run_dir, "runtime_s")


def run_error(run_dir: Path) -> str:
    """Why the run failed, as its summary.json says (`error`, written by `record_status`)."""
    summary = read_summary(run_dir) or {}
    return summary.get("error") or f"{run_folder.SUMMARY} says {summary.get('status', 'nothing')}"


def record_status(run_dir: Path, status: str, error: str | None = None) -> None:
    """Write `status` into the run folder's summary.json, keeping its other fields: for a run
    whose process ended without writing that status itself (it crashed, could not start, or
    was stopped by the sweep)."""
    summary = read_summary(run_dir) or {}
    summary.update(status=status, ended=utc_now())
    if error is not None:
        summary["error"] = error
    run_folder.write_summary(run_dir, summary)
