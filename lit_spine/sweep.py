"""`lit-spine sweep`: run a W&B sweep file offline, resumably, in parallel; or online with agents.

Offline (the default) plans runs with W&B's open-source `sweeps` engine (the planner behind
`wandb agent`: grid enumerates every point, random and bayes draw `--count` runs, bayes sees
the metrics of finished runs) and builds each command with W&B's own macro rules (`${args}`,
`${args_no_hyphens}`, `${args_json}`, `${args_json_file}`, `${program}`, `${interpreter}`,
`${env}`, `${envvar:NAME}`). Runs go to `<out>/<sweep name>/runs/<run id>/`; the plan lives in
`<out>/<sweep name>/state.json`, rewritten atomically after every change, and every run's status
in its own folder, so a rerun after Ctrl-C or a crash skips finished runs and redoes only the
others.

This module runs a sweep (`run_sweep`: the offline and online modes, the closing summary; its
command line is lit_spine.commands.sweep); its parts, one concept each: lit_spine.sweep_plan
(sweep file, planner, commands), lit_spine.sweep_state (state.json, statuses from the run
folders), lit_spine.sweep_proc (child processes and signals).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import filelock

from lit_spine import runs as run_folder
from lit_spine.sweep_plan import (
    WANDB_DEFAULT_COMMAND,
    Planner,
    add_run,
    load_sweep_file,
    open_state,
    sweep_hash,
    sweep_name,
    with_overlay,
)
from lit_spine.sweep_plan import expand_command as expand_command  # re-exported
from lit_spine.sweep_plan import resolve_executable as resolve_executable  # re-exported
from lit_spine.sweep_proc import Runner, cpu_count, fmt_seconds, visible_gpus
from lit_spine.sweep_state import PlannedRun as PlannedRun  # re-exported
from lit_spine.sweep_state import SweepError, SweepState, read_summary, run_error

DEFAULT_OUT = "sweep_runs"


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


def run_online(
    config: dict[str, Any],
    workers: int = 1,
    count: int | None = None,
    project: str | None = "lit_spine",
    entity: str | None = None,
    overlay: list[str] | tuple[str, ...] = (),
) -> int:
    """Create the sweep on a W&B server and run `workers` agents that execute its command
    (with the `--config` overlay files added, as offline)."""
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
        if overlay:
            command = with_overlay(config.get("command", WANDB_DEFAULT_COMMAND), overlay)
            config = dict(config, command=command)
        sweep_id = wandb.sweep(config, entity=entity, project=project)
    except Exception as err:
        print(
            f"lit-spine sweep: could not create the sweep on the W&B server: {err}", file=sys.stderr
        )
        return 1
    # The agents run the sweep command as written; make `lit-spine` resolvable from this venv.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    threads = max(1, cpu_count() // max(1, workers))
    gpus = visible_gpus()
    target = "/".join(p for p in (entity, project, sweep_id) if p)
    agent = [sys.executable, "-m", "wandb", "agent"]
    if count:
        agent += ["--count", str(count)]
    procs = []
    for slot in range(max(1, workers)):
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


# ----------------------------------------------------------------------------- entry


def run_sweep(
    sweep_file: str,
    workers: int = 1,
    count: int | None = None,
    max_runs: int | None = None,
    out: str | os.PathLike = DEFAULT_OUT,
    force: bool = False,
    dry_run: bool = False,
    report: bool = True,
    online: bool = False,
    project: str | None = "lit_spine",
    entity: str | None = None,
    overlay: list[str] | tuple[str, ...] = (),
) -> int:
    """Run (or with `dry_run`, plan) a sweep file; the exit code. Raises SweepError.

    `overlay`: `--config` files appended to every run's command after the sweep file's own
    `--config` entries (e.g. a data overlay); part of the sweep's identity, like the file.
    """
    overlay = [str(p) for p in overlay]
    for path in overlay:
        if not Path(path).is_file():
            raise SweepError(
                f"--config {path}: no such file (an overlay added to every run's command, "
                "e.g. experiments/data/challenge2020.yaml)"
            )
    config = load_sweep_file(sweep_file)
    if online:
        return run_online(config, workers, count, project, entity, overlay)
    planner = Planner(config, count)
    sweep_dir = Path(out) / sweep_name(config, sweep_file)
    if dry_run:
        return _dry_run(config, sweep_file, sweep_dir, planner, overlay)
    try:
        lock = _sweep_lock(sweep_dir).acquire()
    except filelock.Timeout:
        raise SweepError(
            f"{sweep_dir / '.lock'}: another sweep is running this folder; "
            "wait for it or stop it first"
        ) from None
    with lock:
        state = open_state(config, sweep_file, sweep_dir, planner, force, overlay)
        return _run_offline(state, planner, workers, max_runs, report)


def _dry_run(
    config: dict[str, Any], sweep_file: str, sweep_dir: Path, planner: Planner, overlay: list[str]
) -> int:
    state = SweepState(
        path=sweep_dir / "state.json",
        sweep_file=sweep_file,
        name=sweep_dir.name,
        hash=sweep_hash(config, overlay),
        config=config,
        overlay=overlay,
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
    if overlay:
        print(f"[sweep {state.name}] overlay: {' '.join(f'--config {p}' for p in overlay)}")
    print(f"[sweep {state.name}] {len(state.runs)} run(s) planned{more} -> {sweep_dir}")
    return 0


def _run_offline(
    state: SweepState, planner: Planner, workers: int, max_runs: int | None, report: bool
) -> int:
    sweep_dir = state.dir
    if state.legacy_fields:
        print(
            f"[sweep {state.name}] {state.path} has per-run statuses from an older version: "
            "ignored, each run's status is read from its folder"
        )
    if planner.plans_ahead:
        while (nxt := planner.next_params(state)) is not None:
            add_run(state, *nxt)
    state.save()
    done = state.counts().get("finished", 0)
    if done:
        print(f"[sweep {state.name}] resuming: {done} finished run(s) kept, not rerun")
    runner = Runner(state, planner, workers, max_runs)
    print(
        f"[sweep {state.name}] {' + '.join([state.sweep_file, *state.overlay])}: "
        f"method {planner.method}, "
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
    statuses = state.statuses()
    counts = Counter(statuses.values())
    failed = [r for r in state.runs if statuses[r.id] == "failed"]
    left = len(state.runs) - counts.get("finished", 0) - len(failed)
    print(
        f"[sweep {state.name}] done: {counts.get('finished', 0)}/{len(state.runs)} finished, "
        f"{len(failed)} failed"
        + (f", {left} not started (--max-runs)" if left else "")
        + f" in {fmt_seconds(time.monotonic() - runner.t_start)}",
        flush=True,
    )
    for run in failed:
        log = state.run_path(run) / run_folder.LOG
        error = run_error(state.run_path(run))
        print(f"  {run.id}: {error}; log: {log}. Rerun the same command to retry.")
    if report and counts.get("finished", 0):
        from lit_spine.report import print_report

        print_report([sweep_dir], out=sweep_dir / "report")
    print(f"[sweep {state.name}] {throughput_line(state, time.monotonic() - runner.t_start)}")
    return 1 if failed else 0


def throughput_line(state: SweepState, wall_s: float) -> str:
    """Total wall time and training images/s of the finished runs (from their summary.json)."""
    rates = []
    for run in state.runs:
        finished = state.status(run) == "finished"
        summary = read_summary(state.run_path(run)) if finished else None
        if summary and summary.get("images_per_s"):
            rates.append(float(summary["images_per_s"]))
    if not rates:
        return f"wall time {fmt_seconds(wall_s)}; no finished run reported images/s"
    median = statistics.median(rates)
    return (
        f"wall time {fmt_seconds(wall_s)}; training {median:.1f} images/s per run "
        f"(median of {len(rates)} finished run(s), after each epoch's warm-up batches)"
    )
