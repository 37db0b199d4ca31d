"""A sweep's processes: up to `--workers` child runs at once, their environment and signals.

`Runner` starts the planned runs as child processes (one folder, log and share of CPU
threads, and of the GPUs where there are several, per run), counts each start in the plan,
writes into the run folder the end of a run that did not write it itself, and on Ctrl-C or
SIGTERM stops the children once, gracefully (SIGINT: Lightning saves last.ckpt), then
harder. Each child gets its own process group, and on Linux the
kernel's parent-death signal (prctl PR_SET_PDEATHSIG), so that no run outlives a killed
sweep; elsewhere that last guard is missing and everything else works the same.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_spine import runs as run_folder
from lit_spine.sweep_plan import Planner, add_run, resolve_executable
from lit_spine.sweep_state import (
    PlannedRun,
    SweepState,
    record_status,
    run_is_finished,
    run_metric,
    runtime_s,
    utc_now,
)
from lit_spine.utils import one_line

KILL_GRACE_S = 30.0  # for a run to stop after SIGINT (Lightning saves last.ckpt)
POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_signal(platform: str = sys.platform) -> Callable[[], Any] | None:
    """Linux: a call that makes the calling process receive SIGTERM when its parent dies
    (prctl PR_SET_PDEATHSIG, through ctypes: the standard library has no wrapper). None on
    other systems, or where the C library has no prctl."""
    if not platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the C library already loaded
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Looked up once, in the sweep: the child between fork and exec only makes the call.
_SET_PARENT_DEATH_SIGNAL = parent_death_signal()


def _detach_child() -> None:
    """In the child before exec: own process group, so a terminal Ctrl-C reaches only the sweep
    (which then stops each run once, gracefully); on Linux, SIGTERM when the sweep dies, even
    from SIGKILL, so no run outlives it unwatched."""
    os.setpgid(0, 0)
    # A sweep started in the background (`make sweep &`, nohup) inherits an ignored SIGINT;
    # the run must still stop gracefully (and save last.ckpt) on the SIGINT the sweep sends.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _SET_PARENT_DEATH_SIGNAL is not None:
        _SET_PARENT_DEATH_SIGNAL()


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

    run_dir = state.run_path(run).resolve()
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


def fmt_seconds(seconds: float | None) -> str:
    """Seconds as `1h02m03s`, `2m03s` or `3s`; '?' when unknown."""
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
        self.durations: dict[str, float] = {}  # wall seconds of the runs finished here

    # -- progress
    def _progress(self, event: str) -> None:
        statuses = self.state.statuses()
        counts = Counter(statuses.values())
        done, failed = counts["finished"], counts["failed"]
        total = len(self.state.runs)
        if not self.planner.plans_ahead:
            total = max(total, self.planner.count or 0)
        # Wall time of the runs finished here; until one has, the fitting time (runtime_s)
        # that the folders of runs finished earlier report, which leaves out process start-up.
        durations = list(self.durations.values()) or [
            seconds
            for r in self.state.runs
            if statuses[r.id] == "finished" and (seconds := runtime_s(self.state.run_path(r)))
        ]
        remaining = total - done
        eta = None
        if durations:
            eta = sum(durations) / len(durations) * remaining / self.workers
        print(
            f"[sweep {self.state.name}] {done}/{total} done, {len(self.active)} running, "
            f"{failed} failed | elapsed {fmt_seconds(time.monotonic() - self.t_start)}"
            f" | ETA {fmt_seconds(eta) if remaining else '0s'} | {event}",
            flush=True,
        )

    # -- choosing work
    def _next_run(self) -> PlannedRun | None:
        if self.limit is not None and self.started >= self.limit:
            return None
        busy = {a.run.id for a in self.active.values()}
        for run in self.state.runs:
            # A run that failed in this invocation is retried by the next one, not now.
            if run.id in busy | self.failed_here:
                continue
            if self.state.status(run) in ("pending", "failed", "interrupted"):
                return run
        nxt = self.planner.next_params(self.state)
        if nxt is None:
            return None
        run = add_run(self.state, *nxt)
        self.state.save()
        return run

    # -- starting and finishing
    def _start(self, run: PlannedRun, slot: int) -> None:
        run_dir = self.state.run_path(run)
        ckpt = run_dir / run_folder.LAST_CHECKPOINT
        command = list(run.command)
        resumed = self.state.status(run) == "interrupted" and ckpt.is_file()
        if resumed:
            command.append(f"--ckpt_path={ckpt.resolve()}")
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
        log = open(run_dir / run_folder.LOG, "a", buffering=1)  # noqa: SIM115
        log.write(f"# {utc_now()} attempt {run.attempts + 1}: {' '.join(command)}\n")
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
            record_status(run_dir, "failed", f"could not start {argv[0]!r}: {err}")
            self.failed_here.add(run.id)
            self._progress(f"FAILED to start {run.id}: {err}")
            return
        run.attempts += 1
        self.active[slot] = Active(run, proc, slot, time.monotonic(), log)
        self.started += 1
        self.state.save()
        where = f" on GPU {gpu}" if gpu is not None else ""
        note = " (resuming from last.ckpt)" if resumed else ""
        self._progress(f"started {run.id}{where}{note}")

    def _finish(self, active: Active, returncode: int) -> None:
        run = active.run
        active.log.close()
        duration = round(time.monotonic() - active.t0, 2)
        run_dir = self.state.run_path(run)
        metric_name = self.planner.metric["name"]
        if run_is_finished(run_dir):  # a finished result stands, whatever the exit code
            self.durations[run.id] = duration
            metric = run_metric(run_dir, metric_name)
            shown = f"{metric_name}={metric:.4f}" if metric is not None else "no metric"
            code = f", exit code {returncode}" if returncode != 0 else ""
            event = f"finished {run.id} ({shown}, {fmt_seconds(duration)}{code})"
        elif (
            run_folder.read_status(run_dir) == "interrupted"
            and (run_dir / run_folder.LAST_CHECKPOINT).is_file()
        ):
            # Stopped from outside (a scheduler's SIGTERM): it saved last.ckpt and says so.
            # Not retried in this invocation; the next one resumes it.
            self.failed_here.add(run.id)
            event = f"INTERRUPTED {run.id} (exit code {returncode}): the next sweep resumes it"
        else:
            self.failed_here.add(run.id)
            error = (
                f"exit code {returncode}"
                if returncode != 0
                else f"exit code 0 but {run_folder.SUMMARY} does not say status: finished"
            )
            record_status(run_dir, "failed", error)
            why = last_error_line(run_dir / run_folder.LOG)
            event = f"FAILED {run.id}: {error}" + (f": {why}" if why else "")
            event += f"; log: {run_dir / run_folder.LOG}"
        del self.active[active.slot]
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
            run_dir = self.state.run_path(active.run)
            if not run_is_finished(run_dir):
                record_status(run_dir, "interrupted")
        self.active.clear()

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


def last_error_line(log: Path, limit: int = 300) -> str:
    """The line of a failed run's log that says why, for the sweep's progress: the last line
    naming an error (the suite's one-line messages start with 'lit-spine'), else ''."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-40:]
    except OSError:
        return ""
    pattern = re.compile(r"^(lit-spine[\w ]*: |\w*(Error|Exception)\b|error: )")
    hits = [i for i, ln in enumerate(lines) if pattern.search(ln.strip())]
    hits = [i for i in hits if "LIT_SPINE_TRACEBACK" not in lines[i]]
    if not hits:
        return ""
    # An argument error continues on indented lines (jsonargparse: the class, the option).
    tail = [lines[hits[-1]].strip()]
    tail += [ln.strip() for ln in lines[hits[-1] + 1 :] if ln.startswith(" ") and ln.strip()]
    return one_line(" ".join(tail), limit)
