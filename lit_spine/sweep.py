"""`lit-spine sweep`: run a W&B sweep file offline, resumably, in parallel; or online with agents.

Offline (the default) plans runs with W&B's open-source `sweeps` engine (the planner behind
`wandb agent`: grid enumerates every point, random and bayes draw `--count` runs, bayes sees
the metrics of finished runs) and builds each command with W&B's own macro rules (`${args}`,
`${args_no_hyphens}`, `${args_json}`, `${args_json_file}`, `${program}`, `${interpreter}`,
`${env}`, `${envvar:NAME}`). Runs go to `<out>/<sweep name>/runs/<run id>/`; the plan and every
run's status live in `<out>/<sweep name>/state.json`, rewritten atomically after every change,
so a rerun after Ctrl-C or a crash skips finished runs and redoes only the others.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock
import yaml

from lit_spine import runs as run_folder
from lit_spine.utils import atomic_write_json

STATE_VERSION = 1
DEFAULT_OUT = "sweep_runs"
DEFAULT_METRIC = {"name": "val/mAP_best", "goal": "maximize"}
# wandb's default when a sweep file has no `command` (wandb/sdk/launch/sweeps/utils.py).
WANDB_DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
# Entry points that mean "this package": run through the current interpreter, no PATH needed.
OWN_ENTRY_POINTS = ("lit-spine", "lightning")
KILL_GRACE_S = 30.0  # for a run to stop after SIGINT (Lightning saves last.ckpt)
POLL_S = 0.2


class SweepError(Exception):
    """A problem the user can fix (bad sweep file, changed plan, locked folder)."""


# ----------------------------------------------------------------------------- sweep file


def load_sweep_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a sweep YAML file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file (see sweeps/*.yaml)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with method/parameters/command keys")
    params = config.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: key 'parameters' must map config keys to {{values: [...]}}")
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise SweepError(
                f"{path}: parameters.{key}: expected a mapping such as {{values: [a, b]}} or "
                f"{{value: a}}, got {type(spec).__name__} {spec!r}"
            )
        if "parameters" in spec:
            raise SweepError(
                f"{path}: parameters.{key}: nested parameters are not supported; "
                "write the full dotted config key instead (model.net.init_args.norm)"
            )
    command = config.get("command", WANDB_DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(c, str | int | float) for c in command):
        raise SweepError(f"{path}: key 'command' must be a list of strings")
    metric = config.get("metric")
    if metric is not None and not (isinstance(metric, dict) and "name" in metric):
        raise SweepError(
            f"{path}: key 'metric' must look like {{name: val/mAP_best, goal: maximize}}"
        )
    with warnings.catch_warnings():  # sweeps' pydantic models warn about v1-style config
        warnings.simplefilter("ignore")
        from sweeps.config.schema import validator

        from sweeps import schema_violations_from_proposed_config

    # The schema's own errors, prefixed with the key they concern; then the engine's extra checks.
    errors = list(validator.iter_errors(config))
    violations = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" if e.absolute_path else e.message
        for e in errors
    ]
    try:
        extra = schema_violations_from_proposed_config(config)
    except ValueError as err:
        extra = [str(err)]
    violations += [m for m in extra if m not in {e.message for e in errors}]
    if violations:
        lines = "\n".join(f"  - {v}" for v in violations)
        raise SweepError(f"{path}: not a valid W&B sweep config:\n{lines}")
    return config


def sweep_name(config: dict[str, Any], path: str | os.PathLike) -> str:
    """The sweep's folder name: its `name` key, else the file stem."""
    name = str(config.get("name") or Path(path).stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def sweep_hash(config: dict[str, Any]) -> str:
    """Hash of the parsed sweep config (comments and formatting do not count)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def metric_of(config: dict[str, Any]) -> dict[str, str]:
    """The sweep's metric {name, goal}, defaulting to val/mAP_best maximized."""
    metric = dict(DEFAULT_METRIC)
    metric.update(config.get("metric") or {})
    return metric


# ----------------------------------------------------------------------------- commands


def expand_command(
    template: list[Any],
    params: dict[str, Any],
    program: str | None = None,
    args_json_file: str | None = None,
    interpreter: str = "python",
) -> list[str]:
    """Build a run's argv from a sweep `command` exactly as `wandb agent` does.

    `${envvar:NAME}` and the args formats come from wandb's own helpers; the loop over
    `${...}` chunks mirrors `wandb.wandb_agent.Agent._command_run` (a chunk that is exactly a
    macro is replaced by a list of words, an unknown macro by nothing).
    """
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command([str(c) for c in template])
    sweep_vars: dict[str, Any] = create_sweep_command_args(
        {"args": {key: {"value": value} for key, value in params.items()}}
    )
    sweep_vars["interpreter"] = [interpreter]
    sweep_vars["program"] = [program]
    sweep_vars["args_json_file"] = [args_json_file]
    if sys.platform != "win32":
        sweep_vars["env"] = ["/usr/bin/env"]
    argv: list[str] = []
    for chunk in command:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def resolve_executable(argv: list[str]) -> list[str]:
    """Point `lit-spine` and `python` at the interpreter running the sweep (no PATH needed)."""
    argv = list(argv)
    start = 1 if argv and argv[0] in ("/usr/bin/env", "env") else 0
    if len(argv) > start:
        head = argv[start]
        if head in OWN_ENTRY_POINTS:
            argv[start : start + 1] = [sys.executable, "-m", "lit_spine"]
        elif head in ("python", "python3"):
            argv[start] = sys.executable
    return argv


def run_slug(index: int, params: dict[str, Any], seed_keys: tuple[str, ...]) -> str:
    """A readable, unique run id: index plus the parameter values (`003-groupnorm-0.1-s1`)."""
    parts = []
    for key, value in params.items():
        text = f"s{value}" if key in seed_keys else str(value)
        parts.append(re.sub(r"[^A-Za-z0-9.]+", "", text)[:16])
    return f"{index:03d}-" + "-".join(p for p in parts if p)[:60]


# ----------------------------------------------------------------------------- state


def _now() -> str:
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
    created: str = field(default_factory=_now)

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
            "updated": _now(),
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
            created=data.get("created", _now()),
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


def _read_history(run_dir: Path, metric: str) -> list[dict[str, float]]:
    """The metric once per epoch, in epoch order, for the bayes planner."""
    return [{metric: v} for v in run_folder.read_curve(run_dir, metric).values()]


# ----------------------------------------------------------------------------- planning


class Planner:
    """Asks W&B's `sweeps` engine for the next runs, given what the state already holds."""

    def __init__(self, config: dict[str, Any], count: int | None):
        self.config = config
        self.method = config["method"]
        self.metric = metric_of(config)
        if self.method in ("random", "bayes"):
            count = count or config.get("run_cap")
            if not count:
                raise SweepError(
                    f"method {self.method!r} draws runs forever: give --count N "
                    "(or run_cap: N in the sweep file)"
                )
        self.count = count

    def _as_sweep_runs(self, state: SweepState) -> list[Any]:
        from sweeps import SweepRun

        runs = []
        name = self.metric["name"]
        for run in state.runs:
            status = {"pending": "running", "interrupted": "running"}.get(run.status, run.status)
            summary = {name: run.metric} if run.metric is not None else {}
            history = (
                _read_history(state.dir / run.run_dir, name) if run.status == "finished" else []
            )
            runs.append(
                SweepRun(
                    name=run.id,
                    state=status,
                    config={k: {"value": v} for k, v in run.params.items()},
                    summary_metrics=summary,
                    history=history,
                )
            )
        return runs

    def next_params(self, state: SweepState) -> tuple[dict[str, Any], dict | None] | None:
        """Parameters of the next run to add, or None when the sweep is fully planned."""
        from sweeps import next_run

        if self.count is not None and len(state.runs) >= self.count:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            suggestion = next_run(self.config, self._as_sweep_runs(state), validate=True)
        if suggestion is None:
            return None
        params = {key: value["value"] for key, value in suggestion.config.items()}
        return params, suggestion.search_info

    @property
    def plans_ahead(self) -> bool:
        """Grid and random runs do not depend on results: plan them all at once."""
        return self.method in ("grid", "random")


def add_run(
    state: SweepState, params: dict[str, Any], search_info: dict | None = None
) -> PlannedRun:
    """Append a pending run with its expanded command to the state."""
    from lit_spine.report import SEED_KEYS

    index = max((int(r.id.split("-")[0]) for r in state.runs), default=-1) + 1
    run_id = run_slug(index, params, SEED_KEYS)
    run_dir = f"runs/{run_id}"
    command = expand_command(
        state.config.get("command", WANDB_DEFAULT_COMMAND),
        params,
        program=state.config.get("program"),
        args_json_file=str((state.dir / run_dir / "sweep_args.json").resolve()),
    )
    run = PlannedRun(id=run_id, params=params, command=command, run_dir=run_dir)
    run.search_info = _jsonable(search_info)
    state.runs.append(run)
    return run


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON (NaN stays, numpy scalars become floats)."""
    if obj is None:
        return None
    return json.loads(json.dumps(obj, default=float))


def open_state(
    config: dict[str, Any], sweep_file: str, sweep_dir: Path, planner: Planner, force: bool
) -> SweepState:
    """Load the sweep folder's state (checking the sweep file did not change) or start one."""
    name = sweep_dir.name
    new_hash = sweep_hash(config)
    path = sweep_dir / "state.json"
    fresh = SweepState(path=path, sweep_file=sweep_file, name=name, hash=new_hash, config=config)
    if not path.exists():
        return fresh
    state = SweepState.load(path)
    if state.hash == new_hash:
        return state
    # The sweep file changed: keep the old runs only if the new plan still contains them.
    new_keys = None
    if planner.plans_ahead:
        while (nxt := planner.next_params(fresh)) is not None:
            add_run(fresh, *nxt)
        new_keys = {(r.key, json.dumps(r.command)) for r in fresh.runs}
    done = [r for r in state.runs if r.status == "finished"]
    missing = [
        r for r in done if new_keys is None or (r.key, json.dumps(r.command)) not in new_keys
    ]
    if missing and not force:
        raise SweepError(
            f"{sweep_file} changed since {path} was written and {len(missing)} finished run(s) "
            f"(e.g. {missing[0].id}) are not in the new plan. Rerun with --force to drop them "
            f"(their folders move to {sweep_dir / 'stale'}), or use --out to start a new folder."
        )
    print(f"[sweep {name}] sweep file changed; keeping {len(done) - len(missing)} finished run(s)")
    state.config, state.hash, state.sweep_file = config, new_hash, sweep_file
    keep = {r.key for r in done if r not in missing}
    for run in state.runs:
        if run.key not in keep:
            old = sweep_dir / run.run_dir
            if old.exists():
                (sweep_dir / "stale").mkdir(exist_ok=True)
                shutil.move(str(old), str(sweep_dir / "stale" / f"{run.id}.{int(time.time())}"))
    state.runs = [r for r in state.runs if r.key in keep]
    return state


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


# ----------------------------------------------------------------------------- running


def _detach_child() -> None:
    """In the child before exec: own process group, so a terminal Ctrl-C reaches only the sweep
    (which then stops each run once, gracefully); on Linux, SIGTERM when the sweep dies, even
    from SIGKILL, so no run outlives it unwatched."""
    os.setpgid(0, 0)
    # A sweep started in the background (`make sweep &`, nohup) inherits an ignored SIGINT;
    # the run must still stop gracefully (and save last.ckpt) on the SIGINT the sweep sends.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def visible_gpus() -> list[str]:
    """GPU ids a worker may be pinned to (respects CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_env(state: SweepState, run: PlannedRun, threads: int, gpu: str | None) -> dict[str, str]:
    """Environment of one run: its folder, its share of CPU threads and GPUs, W&B settings."""
    from lit_spine.report import cell_label

    run_dir = (state.dir / run.run_dir).resolve()
    env = dict(os.environ)
    env["LIT_SPINE_RUN_DIR"] = str(run_dir)
    env["LIT_SPINE_SWEEP_DIR"] = str(state.dir.resolve())
    env["LIT_SPINE_SWEEP_RUN_ID"] = run.id
    for var in ("LIT_SPINE_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_DIR", str(run_dir))
    env["WANDB_RUN_GROUP"] = f"{state.name}/{cell_label(run.params)}"
    env["WANDB_JOB_TYPE"] = "sweep"
    env["WANDB_TAGS"] = f"sweep:{state.name}"
    env["WANDB_NAME"] = f"{state.name}/{run.id}"
    # As `wandb agent` does: wandb.init() reads the sweep parameters into run.config.
    param_file = run_folder.write_sweep_params(run_dir, run.params)
    env["WANDB_SWEEP_PARAM_PATH"] = str(param_file)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Active:
    """A run in progress."""

    run: PlannedRun
    proc: subprocess.Popen
    slot: int
    t0: float
    log: Any


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Runner:
    """Runs the planned runs with up to `workers` child processes and keeps the state current."""

    def __init__(self, state: SweepState, planner: Planner, workers: int, limit: int | None):
        self.state = state
        self.planner = planner
        self.workers = max(1, workers)
        self.limit = limit  # most runs to start in this invocation (None: all)
        self.threads = max(1, cpu_count() // self.workers)
        gpus = visible_gpus()
        self.gpus = gpus if len(gpus) > 1 else []  # one GPU: every worker sees it
        self.active: dict[int, Active] = {}
        self.t_start = time.monotonic()
        self.started = 0
        self.failed_here: set[str] = set()

    # -- progress
    def _progress(self, event: str) -> None:
        counts = self.state.counts()
        done = counts.get("finished", 0)
        total = len(self.state.runs)
        if not self.planner.plans_ahead:
            total = max(total, self.planner.count or 0)
        durations = [
            r.duration_s for r in self.state.runs if r.status == "finished" and r.duration_s
        ]
        remaining = total - done
        eta = None
        if durations:
            eta = sum(durations) / len(durations) * remaining / self.workers
        print(
            f"[sweep {self.state.name}] {done}/{total} done, {len(self.active)} running, "
            f"{counts.get('failed', 0)} failed | elapsed {_fmt_s(time.monotonic() - self.t_start)}"
            f" | ETA {_fmt_s(eta) if remaining else '0s'} | {event}",
            flush=True,
        )

    # -- choosing work
    def _next_run(self) -> PlannedRun | None:
        if self.limit is not None and self.started >= self.limit:
            return None
        busy = {a.run.id for a in self.active.values()}
        for run in self.state.runs:
            # A run that failed in this invocation is retried by the next one, not now.
            if (
                run.status in ("pending", "failed", "interrupted")
                and run.id not in busy | self.failed_here
            ):
                return run
        nxt = self.planner.next_params(self.state)
        if nxt is None:
            return None
        run = add_run(self.state, *nxt)
        self.state.save()
        return run

    # -- starting and finishing
    def _start(self, run: PlannedRun, slot: int) -> None:
        run_dir = self.state.dir / run.run_dir
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        command = list(run.command)
        run.resumed_from = None
        if run.status == "interrupted" and ckpt.is_file():
            command.append(f"--ckpt_path={ckpt.resolve()}")
            run.resumed_from = str(ckpt)
        elif run_dir.exists() and any(run_dir.iterdir()):
            # A previous attempt left files: keep them for post-mortem, start clean.
            attempts = self.state.dir / "attempts"
            attempts.mkdir(exist_ok=True)
            shutil.move(str(run_dir), str(attempts / f"{run.id}.{run.attempts}"))
        run_dir.mkdir(parents=True, exist_ok=True)
        if "${args_json_file}" in [str(c) for c in self.state.config.get("command", [])]:
            run_folder.write_sweep_args(run_dir, run.params)
        gpu = self.gpus[slot % len(self.gpus)] if self.gpus else None
        env = run_env(self.state, run, self.threads, gpu)
        log = open(run_dir / "stdout.log", "a", buffering=1)  # noqa: SIM115
        log.write(f"# {_now()} attempt {run.attempts + 1}: {' '.join(command)}\n")
        argv = resolve_executable(command)
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_detach_child if os.name == "posix" else None,
            )
        except OSError as err:
            log.close()
            run.status, run.error = "failed", f"could not start {argv[0]!r}: {err}"
            self.failed_here.add(run.id)
            self.state.save()
            self._progress(f"FAILED to start {run.id}: {err}")
            return
        run.status, run.started, run.ended = "running", _now(), None
        run.attempts += 1
        run.returncode = run.error = None
        self.active[slot] = Active(run, proc, slot, time.monotonic(), log)
        self.started += 1
        self.state.save()
        where = f" on GPU {gpu}" if gpu is not None else ""
        resumed = " (resuming from last.ckpt)" if run.resumed_from else ""
        self._progress(f"started {run.id}{where}{resumed}")

    def _finish(self, active: Active, returncode: int) -> None:
        run = active.run
        active.log.close()
        run.ended = _now()
        run.duration_s = round(time.monotonic() - active.t0, 2)
        run.returncode = returncode
        run_dir = self.state.dir / run.run_dir
        summary = read_summary(run_dir) or {}
        metric_name = self.planner.metric["name"]
        value = summary.get(metric_name)
        run.metric = float(value) if isinstance(value, int | float) else None
        if returncode == 0 and summary.get("status") == "finished":
            run.status = "finished"
            shown = f"{metric_name}={run.metric:.4f}" if run.metric is not None else "no metric"
            event = f"finished {run.id} ({shown}, {_fmt_s(run.duration_s)})"
        else:
            run.status = "failed"
            self.failed_here.add(run.id)
            run.error = (
                f"exit code {returncode}"
                if returncode != 0
                else "exit code 0 but summary.json does not say status: finished"
            )
            event = f"FAILED {run.id}: {run.error}; log: {run_dir / 'stdout.log'}"
        del self.active[active.slot]
        self.state.save()
        self._progress(event)

    def _stop_all(self) -> None:
        """Stop running children: SIGINT (Lightning saves last.ckpt and exits), then SIGTERM,
        then SIGKILL, each after a grace period."""
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: kill at once
            for sig, grace in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGTERM, 5.0)):
                alive = [a for a in self.active.values() if a.proc.poll() is None]
                for active in alive:
                    with contextlib.suppress(ProcessLookupError):
                        active.proc.send_signal(sig)
                deadline = time.monotonic() + grace
                for active in alive:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        active.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for active in self.active.values():
            if active.proc.poll() is None:
                active.proc.kill()
                active.proc.wait()
        for active in list(self.active.values()):
            active.log.close()
            run = active.run
            run.ended, run.returncode = _now(), active.proc.returncode
            run.duration_s = round(time.monotonic() - active.t0, 2)
            run.status = (
                "finished" if run_is_finished(self.state.dir / run.run_dir) else "interrupted"
            )
        self.active.clear()
        self.state.save()

    def run(self) -> None:
        """Start runs while slots are free; return when nothing is left to start or running."""
        try:
            while True:
                for slot in range(self.workers):
                    if slot not in self.active:
                        run = self._next_run()
                        if run is None:
                            break
                        self._start(run, slot)
                if not self.active:
                    if self._next_run() is None:
                        return
                    continue
                time.sleep(POLL_S)
                for active in list(self.active.values()):
                    code = active.proc.poll()
                    if code is not None:
                        self._finish(active, code)
        except KeyboardInterrupt:
            n = len(self.active)
            print(
                f"\n[sweep {self.state.name}] interrupted: stopping {n} running run(s) "
                "(they save last.ckpt; Ctrl-C again to kill them now)...",
                flush=True,
            )
            self._stop_all()
            raise


def _sweep_lock(sweep_dir: Path) -> filelock.SoftFileLock:
    """`<sweep dir>/.lock`: two sweeps must not run the same folder. filelock's SoftFileLock
    records the holder's pid and host, removes the file on release and takes over a lock
    whose holder has died (a killed sweep leaves no lock that blocks the rerun). Held at once
    or not at all."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return filelock.SoftFileLock(sweep_dir / ".lock", timeout=0)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- online


def run_online(config: dict[str, Any], args: argparse.Namespace) -> int:
    """Create the sweep on a W&B server and run `--workers` agents that execute its command."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        print(
            f"lit-spine sweep: --online needs W&B online, but WANDB_MODE={os.environ['WANDB_MODE']}; "
            "unset it (or drop --online to run offline)",
            file=sys.stderr,
        )
        return 2
    import wandb

    try:
        api_key = wandb.Api().api_key if os.environ.get("WANDB_API_KEY") is None else "env"
    except Exception:
        api_key = None
    if not api_key:
        print(
            "lit-spine sweep: --online needs a W&B login: run `wandb login` or set WANDB_API_KEY "
            "(offline sweeps need neither; drop --online)",
            file=sys.stderr,
        )
        return 2
    try:
        sweep_id = wandb.sweep(config, entity=args.entity, project=args.project)
    except Exception as err:
        print(
            f"lit-spine sweep: could not create the sweep on the W&B server: {err}", file=sys.stderr
        )
        return 1
    # The agents run the sweep command as written; make `lit-spine` resolvable from this venv.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    threads = max(1, cpu_count() // max(1, args.workers))
    gpus = visible_gpus()
    target = "/".join(p for p in (args.entity, args.project, sweep_id) if p)
    agent = [sys.executable, "-m", "wandb", "agent"]
    if args.count:
        agent += ["--count", str(args.count)]
    procs = []
    for slot in range(max(1, args.workers)):
        worker_env = dict(env, OMP_NUM_THREADS=str(threads), LIT_SPINE_NUM_THREADS=str(threads))
        if len(gpus) > 1:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        procs.append(subprocess.Popen([*agent, target], env=worker_env))
    print(f"[sweep] {len(procs)} agent(s) on sweep {target}; Ctrl-C stops them", flush=True)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        return 130
    return max(codes)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The `lit-spine sweep` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lit-spine sweep",
        description=(
            "Run a W&B sweep file. Offline (default): plan runs with W&B's `sweeps` engine, run "
            "them in parallel, log each to W&B offline, keep <out>/<name>/state.json so that a "
            "rerun skips finished runs, and end with the report table and plots. "
            "With --online: create the sweep on a W&B server and start agents."
        ),
        epilog=(
            "examples:\n"
            "  lit-spine sweep sweeps/default.yaml --workers 2\n"
            "  lit-spine sweep sweeps/full.yaml --workers 4 --dry-run\n"
            "  lit-spine sweep sweeps/random_lr.yaml --count 20\n"
            "  lit-spine sweep sweeps/full.yaml --online --project lit_spine --workers 4\n"
            "Rerunning the same command continues an interrupted sweep."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_file", help="W&B sweep YAML (see sweeps/*.yaml)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs at once (default 1); CPU threads are divided among them and, with several "
        "GPUs, each run gets one (CUDA_VISIBLE_DEVICES)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help="total runs of the sweep: required for random/bayes (or run_cap in the file); "
        "for grid, plan only the first N points. Online: runs per agent, as `wandb agent --count`",
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help="offline: start at most N runs in this invocation, then stop (rerun to continue)",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"parent folder of sweep folders (default {DEFAULT_OUT}/); the sweep goes to OUT/<name>/",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="continue even though the sweep file changed and finished runs left the plan "
        "(they move to OUT/<name>/stale/)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the planned commands and exit"
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument(
        "--online",
        action="store_true",
        help="create the sweep on a W&B server (needs `wandb login` and network) and run agents",
    )
    parser.add_argument(
        "--project", default="lit_spine", help="W&B project for --online (default lit_spine)"
    )
    parser.add_argument("--entity", default=None, help="W&B entity (user or team) for --online")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lit-spine sweep`."""
    args = build_parser().parse_args(argv)
    try:
        config = load_sweep_file(args.sweep_file)
        if args.online:
            return run_online(config, args)
        planner = Planner(config, args.count)
        sweep_dir = Path(args.out) / sweep_name(config, args.sweep_file)
        if args.dry_run:
            return _dry_run(config, args.sweep_file, sweep_dir, planner)
        try:
            lock = _sweep_lock(sweep_dir).acquire()
        except filelock.Timeout:
            raise SweepError(
                f"{sweep_dir / '.lock'}: another sweep is running this folder; "
                "wait for it or stop it first"
            ) from None
        with lock:
            return _run_offline(config, args, sweep_dir, planner)
    except SweepError as err:
        print(f"lit-spine sweep: {err}", file=sys.stderr)
        return 2


def _dry_run(config: dict[str, Any], sweep_file: str, sweep_dir: Path, planner: Planner) -> int:
    state = SweepState(
        path=sweep_dir / "state.json",
        sweep_file=sweep_file,
        name=sweep_dir.name,
        hash=sweep_hash(config),
        config=config,
    )
    while (nxt := planner.next_params(state)) is not None:
        add_run(state, *nxt)
        if not planner.plans_ahead:
            break
    for run in state.runs:
        print(f"{run.id}: {' '.join(run.command)}")
    more = (
        "" if planner.plans_ahead else f" (first of {planner.count}; bayes plans as results come)"
    )
    print(f"[sweep {state.name}] {len(state.runs)} run(s) planned{more} -> {sweep_dir}")
    return 0


def _run_offline(
    config: dict[str, Any], args: argparse.Namespace, sweep_dir: Path, planner: Planner
) -> int:
    state = open_state(config, args.sweep_file, sweep_dir, planner, args.force)
    for note in reconcile(state):
        print(f"[sweep {state.name}] {note}")
    if planner.plans_ahead:
        while (nxt := planner.next_params(state)) is not None:
            add_run(state, *nxt)
    state.save()
    done = state.counts().get("finished", 0)
    if done:
        print(f"[sweep {state.name}] resuming: {done} finished run(s) kept, not rerun")
    runner = Runner(state, planner, args.workers, args.max_runs)
    print(
        f"[sweep {state.name}] {state.sweep_file}: method {planner.method}, "
        f"{len(state.runs) if planner.plans_ahead else planner.count} run(s), {runner.workers} "
        f"worker(s) x {runner.threads} thread(s) -> {sweep_dir}",
        flush=True,
    )
    # SIGINT too: a sweep started in the background (`nohup`, `&`) inherits an ignored SIGINT,
    # and `kill -INT` must still stop it gracefully.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        runner.run()
    except KeyboardInterrupt:
        counts = state.counts()
        print(
            f"[sweep {state.name}] stopped: {counts.get('finished', 0)}/{len(state.runs)} finished; "
            f"state saved to {state.path}. Rerun the same command to continue.",
            flush=True,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    counts = state.counts()
    failed = [r for r in state.runs if r.status == "failed"]
    left = len(state.runs) - counts.get("finished", 0) - len(failed)
    print(
        f"[sweep {state.name}] done: {counts.get('finished', 0)}/{len(state.runs)} finished, "
        f"{len(failed)} failed"
        + (f", {left} not started (--max-runs)" if left else "")
        + f" in {_fmt_s(time.monotonic() - runner.t_start)}",
        flush=True,
    )
    for run in failed:
        log = sweep_dir / run.run_dir / "stdout.log"
        print(f"  {run.id}: {run.error}; log: {log}. Rerun the same command to retry.")
    if not args.no_report and counts.get("finished", 0):
        from lit_spine.report import print_report

        print_report([sweep_dir], out=sweep_dir / "report")
    print(f"[sweep {state.name}] {throughput_line(state, time.monotonic() - runner.t_start)}")
    return 1 if failed else 0


def throughput_line(state: SweepState, wall_s: float) -> str:
    """Total wall time and training images/s of the finished runs (from their summary.json)."""
    rates = []
    for run in state.runs:
        summary = read_summary(state.dir / run.run_dir) if run.status == "finished" else None
        if summary and summary.get("images_per_s"):
            rates.append(float(summary["images_per_s"]))
    if not rates:
        return f"wall time {_fmt_s(wall_s)}; no finished run reported images/s"
    median = statistics.median(rates)
    return (
        f"wall time {_fmt_s(wall_s)}; training {median:.1f} images/s per run "
        f"(median of {len(rates)} finished run(s), after each epoch's warm-up batches)"
    )
