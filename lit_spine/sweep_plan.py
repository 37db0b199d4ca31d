"""A sweep's plan: the sweep file, the runs W&B's `sweeps` engine proposes, their commands.

`load_sweep_file` checks a W&B sweep YAML with the `sweeps` package's own schema; `Planner`
asks the same engine `wandb agent` uses for the next runs (grid enumerates every point,
random and bayes draw `--count` runs, bayes sees the metrics of finished runs);
`expand_command` builds each run's argv with wandb's own macro helpers (`${args}`,
`${args_no_hyphens}`, `${args_json}`, `${args_json_file}`, `${program}`, `${interpreter}`,
`${env}`, `${envvar:NAME}`); `open_state` keeps the finished runs a changed sweep file still
plans. The one loop written here is the `${...}` chunk walk of `wandb agent`, which wandb
keeps inside its agent class rather than as a public function.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from lit_spine import runs as run_folder
from lit_spine.sweep_state import (
    PlannedRun,
    SweepError,
    SweepState,
    metric_of,
    run_is_finished,
    run_metric,
)

# wandb's default when a sweep file has no `command` (wandb/sdk/launch/sweeps/utils.py).
WANDB_DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
# Entry points that mean "this package": run through the current interpreter, no PATH needed.
OWN_ENTRY_POINTS = ("lit-spine", "lightning")


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


def sweep_hash(config: dict[str, Any], overlay: list[str] | tuple[str, ...] = ()) -> str:
    """Hash of the parsed sweep config and its `--config` overlay (comments and formatting do
    not count; without an overlay, the hash of the config alone, as before overlays existed)."""
    identity: Any = {"config": config, "overlay": list(overlay)} if overlay else config
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def with_overlay(template: list[Any], overlay: list[str] | tuple[str, ...]) -> list[Any]:
    """The sweep `command` with `--config FILE` for each overlay file, right after the file's
    own last `--config` entry (so overlays apply after the sweep's configs and before the
    sweep parameters `${args}`, which still win); without one, before the first args macro."""
    template = list(template)
    if not overlay:
        return template
    words = [str(c) for c in template]
    own = [i + (2 if w == "--config" else 1) for i, w in enumerate(words) if w == "--config"]
    own += [i + 1 for i, w in enumerate(words) if w.startswith("--config=")]
    if own:
        at = max(own)
    else:
        at = next((i for i, w in enumerate(words) if w.startswith("${args")), len(words))
    extra = [word for path in overlay for word in ("--config", str(path))]
    return template[:at] + extra + template[at:]


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


def _read_history(run_dir: Path, metric: str) -> list[dict[str, float]]:
    """The metric once per epoch, in epoch order, for the bayes planner."""
    return [{metric: v} for v in run_folder.read_curve(run_dir, metric).values()]


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
            run_dir = state.run_path(run)
            folder = state.status(run)
            status = {"pending": "running", "interrupted": "running"}.get(folder, folder)
            metric = run_metric(run_dir, name)
            summary = {name: metric} if metric is not None else {}
            history = _read_history(run_dir, name) if folder == "finished" else []
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
        with_overlay(state.config.get("command", WANDB_DEFAULT_COMMAND), state.overlay),
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
    config: dict[str, Any],
    sweep_file: str,
    sweep_dir: Path,
    planner: Planner,
    force: bool,
    overlay: list[str] | tuple[str, ...] = (),
) -> SweepState:
    """Load the sweep folder's state (checking that neither the sweep file nor its `--config`
    overlay changed) or start one."""
    name = sweep_dir.name
    overlay = list(overlay)
    new_hash = sweep_hash(config, overlay)
    path = sweep_dir / "state.json"
    fresh = SweepState(
        path=path, sweep_file=sweep_file, name=name, hash=new_hash, config=config, overlay=overlay
    )
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
    done = [r for r in state.runs if run_is_finished(sweep_dir / r.run_dir)]  # folders decide
    missing = [
        r for r in done if new_keys is None or (r.key, json.dumps(r.command)) not in new_keys
    ]
    what, overlay_note = sweep_file, ""
    if state.overlay != overlay:
        what = f"{sweep_file} or its --config overlay"
        was, now = " ".join(state.overlay) or "none", " ".join(overlay) or "none"
        overlay_note = f" (overlay was {was}, now {now})"
    if missing and not force:
        raise SweepError(
            f"{what} changed since {path} was written{overlay_note} and {len(missing)} finished "
            f"run(s) "
            f"(e.g. {missing[0].id}) are not in the new plan. Rerun with --force to drop them "
            f"(their folders move to {sweep_dir / 'stale'}), or use --out to start a new folder."
        )
    changed = "sweep file" if state.overlay == overlay else "sweep file or --config overlay"
    print(f"[sweep {name}] {changed} changed; keeping {len(done) - len(missing)} finished run(s)")
    state.config, state.hash, state.sweep_file = config, new_hash, sweep_file
    state.overlay = overlay
    keep = {r.key for r in done if r not in missing}
    for run in state.runs:
        if run.key not in keep:
            old = sweep_dir / run.run_dir
            if old.exists():
                (sweep_dir / "stale").mkdir(exist_ok=True)
                shutil.move(str(old), str(sweep_dir / "stale" / f"{run.id}.{int(time.time())}"))
    state.runs = [r for r in state.runs if r.key in keep]
    return state
