"""`lit-spine sweep`: run a W&B sweep file offline, resumably, in parallel; or online with agents.

Offline (the default) plans runs with W&B's open-source `sweeps` engine (the planner behind
`wandb agent`: grid enumerates every point, random and bayes draw `--count` runs, bayes sees
the metrics of finished runs) and builds each command with W&B's own macro rules (`${args}`,
`${args_no_hyphens}`, `${args_json}`, `${args_json_file}`, `${program}`, `${interpreter}`,
`${env}`, `${envvar:NAME}`). Runs go to `<out>/<sweep name>/runs/<run id>/`; the plan and every
run's status live in `<out>/<sweep name>/state.json`, rewritten atomically after every change,
so a rerun after Ctrl-C or a crash skips finished runs and redoes only the others.

This module is the command (options, the offline and online modes, the closing summary); its
parts, one concept each: lit_spine.sweep_plan (sweep file, planner, commands),
lit_spine.sweep_state (state.json), lit_spine.sweep_proc (child processes and signals).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import filelock

from lit_spine.sweep_plan import (
    Planner,
    add_run,
    load_sweep_file,
    open_state,
    sweep_hash,
    sweep_name,
)
from lit_spine.sweep_plan import expand_command as expand_command  # re-exported
from lit_spine.sweep_plan import resolve_executable as resolve_executable  # re-exported
from lit_spine.sweep_proc import Runner, cpu_count, fmt_seconds, visible_gpus
from lit_spine.sweep_state import PlannedRun as PlannedRun  # re-exported
from lit_spine.sweep_state import SweepError, SweepState, read_summary, reconcile

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
        + f" in {fmt_seconds(time.monotonic() - runner.t_start)}",
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
        return f"wall time {fmt_seconds(wall_s)}; no finished run reported images/s"
    median = statistics.median(rates)
    return (
        f"wall time {fmt_seconds(wall_s)}; training {median:.1f} images/s per run "
        f"(median of {len(rates)} finished run(s), after each epoch's warm-up batches)"
    )
