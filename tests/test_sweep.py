"""`lit-spine sweep`: sweep files, wandb-identical command macros, the offline runner end to end
(parallel workers, state file, resume after failure and after Ctrl-C), changed sweep files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lit_spine import runs as run_folder
from lit_spine import sweep, sweep_proc, sweep_state
from lit_spine.commands import sweep as sweep_command

ROOT = Path(__file__).resolve().parents[1]
FAKE_FIT = Path(__file__).with_name("fake_fit.py")
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))


# ----------------------------------------------------------------------------- macros


def wandb_agent_command(template: list[str], params: dict, program: str, monkeypatch, tmp_path):
    """The argv wandb's own agent builds for one run (its AgentProcess is captured, not run)."""
    from wandb import wandb_agent

    captured = {}

    class Capture:
        def __init__(self, command=None, **kwargs):
            captured["command"] = command

    monkeypatch.setattr(wandb_agent, "AgentProcess", Capture)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw")
    monkeypatch.chdir(tmp_path)
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)
    agent._sweep_command = list(template)
    agent._function = None
    agent._in_jupyter = False
    agent._forward_signals = False
    agent._run_processes = {}
    agent._last_report_time = None
    agent._command_run(
        {
            "run_id": "r1",
            "program": program,
            "args": {k: {"value": v} for k, v in params.items()},
        }
    )
    return captured["command"]


TEMPLATES = [
    ["${env}", "${interpreter}", "${program}", "${args}"],
    ["lit-spine", "fit", "--config", "experiments/base.yaml", "${args}"],
    ["python", "train.py", "${args_no_hyphens}"],
    ["train", "${args_no_boolean_flags}", "--tag=${envvar:LIT_SPINE_TEST_TAG}"],
    ["train", "${args_json}"],
    ["train", "${args_no_equals}", "${unknown_macro}"],
    ["train", "${args_json_file}"],
]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: " ".join(t)[:40])
def test_expand_command_matches_wandb_agent(template, monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_SPINE_TEST_TAG", "abc")
    params = {
        "model.net.init_args.norm": "groupnorm",
        "model.net.init_args.drop_rate": 0.1,
        "drop_schedule.enabled": False,
        "trainer.fast_dev_run": True,
        "seed_everything": 1,
        "data.image_size": None,
    }
    expected = wandb_agent_command(template, params, "prog.py", monkeypatch, tmp_path)
    json_file = None
    if "${args_json_file}" in template:  # wandb's own path for the file
        json_file = os.path.join(str(tmp_path), "wandb", "sweep-sw", "config-r1.json")
    got = sweep.expand_command(template, params, program="prog.py", args_json_file=json_file)
    assert got == expected


def test_resolve_executable_uses_this_interpreter():
    assert sweep.resolve_executable(["lit-spine", "fit"])[:3] == [sys.executable, "-m", "lit_spine"]
    assert sweep.resolve_executable(["/usr/bin/env", "python", "x.py"]) == [
        "/usr/bin/env",
        sys.executable,
        "x.py",
    ]
    assert sweep.resolve_executable(["bash", "-c", "true"]) == ["bash", "-c", "true"]


# ----------------------------------------------------------------------------- sweep files


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_are_valid_and_replicated(path):
    config = sweep.load_sweep_file(path)
    assert config["metric"] == {"name": "val/mAP_best", "goal": "maximize"}
    assert "${args}" in config["command"] and config["command"][:2] == ["lit-spine", "fit"]
    for i, word in enumerate(config["command"]):
        if word == "--config":
            assert (ROOT / config["command"][i + 1]).is_file(), config["command"][i + 1]
    seeds = config["parameters"]["seed_everything"]["values"]
    assert len(seeds) >= 2
    state = _plan(path, config)
    assert len({r.id for r in state.runs}) == len(state.runs)
    cells = {
        tuple((k, v) for k, v in r.params.items() if k != "seed_everything") for r in state.runs
    }
    assert len(state.runs) == len(cells) * len(seeds)


def _plan(path: Path, config: dict) -> sweep.SweepState:
    """Every run the sweep file plans, without running anything."""
    planner = sweep.Planner(config, None)
    state = sweep.SweepState(
        path=Path("/nonexistent/state.json"),
        sweep_file=str(path),
        name=path.stem,
        hash="",
        config=config,
    )
    while (nxt := planner.next_params(state)) is not None:
        sweep.add_run(state, *nxt)
    return state


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_planned_network_builds(path):
    """No planned run may fail at model construction (e.g. GroupNorm groups vs channels)."""
    from lit_spine.models import SpineNet

    config = sweep.load_sweep_file(path)
    base: dict = {}
    command = config["command"]
    for i, word in enumerate(command):
        if word == "--config":
            overlay = yaml.safe_load((ROOT / command[i + 1]).read_text()) or {}
            net = ((overlay.get("model") or {}).get("net") or {}).get("init_args") or {}
            base.update(net)
    prefix = "model.net.init_args."
    nets = {
        tuple(sorted({**base, **{k[len(prefix) :]: v for k, v in r.params.items()
                                 if k.startswith(prefix)}}.items()))
        for r in _plan(path, config).runs
    }  # fmt: skip
    for args in nets:
        SpineNet(**dict(args))


def test_required_sweep_files_exist():
    names = {p.stem for p in SWEEP_FILES}
    assert {"default", "norms", "drops", "backbones", "full", "norm_vs_batch"} <= names
    assert {"stochastic_depth", "dropblock"} <= names
    nvb = sweep.load_sweep_file(ROOT / "sweeps" / "norm_vs_batch.yaml")["parameters"]
    assert nvb["data.batch_size"]["values"] == [2, 4, 8, 16]
    assert set(nvb["model.net.init_args.norm"]["values"]) == {
        "batchnorm",
        "groupnorm",
        "layernorm",
        "instancenorm",
    }
    # The paper's protocol: fixed epochs, lr scaled linearly with the batch.
    assert nvb["model.lr_scaling"] == {"value": "linear"}
    assert nvb["model.lr_reference_batch"] == {"value": 8}
    cpu = sweep.load_sweep_file(ROOT / "sweeps" / "norm_vs_batch_cpu.yaml")
    assert "experiments/sweep_cpu.yaml" in cpu["command"]
    cpu = cpu["parameters"]
    assert cpu["data.batch_size"]["values"] == [2, 4, 16]
    assert cpu["model.net.init_args.norm"]["values"] == ["batchnorm", "groupnorm", "layernorm"]
    assert cpu["seed_everything"]["values"] == [0, 1, 2]
    assert cpu["model.lr_scaling"] == {"value": "linear"}
    default = sweep.load_sweep_file(ROOT / "sweeps" / "default.yaml")["parameters"]
    assert default["seed_everything"]["values"] == [0, 1, 2]
    full = sweep.load_sweep_file(ROOT / "sweeps" / "full.yaml")["parameters"]
    assert len(full["seed_everything"]["values"]) == 3
    assert {
        "model.net.init_args.backbone",
        "model.net.init_args.norm",
        "model.net.init_args.drop",
    } <= set(full)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_state_their_lr_rule(path):
    """Each file says in a comment which learning-rate rule across batch sizes it uses."""
    comments = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "Learning-rate rule:" in comments
    rule = (sweep.load_sweep_file(path)["parameters"].get("model.lr_scaling") or {}).get("value")
    assert f"Learning-rate rule: {'the paper' if rule == 'linear' else 'none'}" in comments


def test_bad_sweep_files_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters:\n  model.net.init_args.norm: [batchnorm]\n")
    with pytest.raises(sweep.SweepError, match=r"bad.yaml: parameters.model.net.init_args.norm"):
        sweep.load_sweep_file(bad)
    bad.write_text("method: grdi\nparameters:\n  a: {values: [1]}\n")
    with pytest.raises(
        sweep.SweepError, match=r"(?s)bad.yaml: not a valid W&B sweep config.*method: 'grdi'"
    ):
        sweep.load_sweep_file(bad)
    bad.write_text("method: random\nparameters:\n  a: {values: [1, 2]}\n")
    with pytest.raises(sweep.SweepError, match="--count"):
        sweep.Planner(sweep.load_sweep_file(bad), None)
    assert sweep_command.main([str(tmp_path / "missing.yaml")]) == 2


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        sweep_command.main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--workers",
        "--count",
        "--online",
        "--out",
        "--force",
        "--dry-run",
        "--max-runs",
    ):
        assert option in text


def test_online_without_login_fails_clearly(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, norms=["batchnorm"], seeds=[0])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert sweep_command.main([str(path), "--online"]) == 2
    assert "--online needs W&B online" in capsys.readouterr().err


# ----------------------------------------------------------------------------- running


def write_sweep(
    tmp_path: Path, norms=("batchnorm", "groupnorm"), seeds=(0, 1), method="grid", name="tiny"
):
    config = {
        "name": name,
        "program": str(FAKE_FIT),
        "method": method,
        "metric": {"name": "val/mAP_best", "goal": "maximize"},
        "parameters": {
            "model.net.init_args.norm": {"values": list(norms)},
            "seed_everything": {"values": list(seeds)},
        },
        "command": ["${env}", "${interpreter}", "${program}", "--config", "x.yaml", "${args}"],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def statuses(sweep_dir: Path) -> dict[str, str]:
    """Run id -> status of a sweep's runs, in plan order, read from their folders."""
    return sweep.SweepState.load(sweep_dir / "state.json").statuses()


def starts(marker: Path) -> list[dict]:
    return [json.loads(line) for line in marker.read_text().splitlines()] if marker.exists() else []


def test_grid_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker.jsonl"
    monkeypatch.setenv("FAKE_FIT_MARKER", str(marker))
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    assert sweep_command.main([str(path), "--workers", "2", "--out", str(out)]) == 0
    state = json.loads((out / "tiny" / "state.json").read_text())
    assert list(statuses(out / "tiny").values()) == ["finished"] * 4
    assert all("status" not in r and "metric" not in r for r in state["runs"])  # the plan only
    assert state["metric"] == {"name": "val/mAP_best", "goal": "maximize"}
    assert all(r["command"][-1].startswith("--") for r in state["runs"])
    summaries = [run_folder.read_summary(out / "tiny" / r["run_dir"]) for r in state["runs"]]
    assert {s["val/mAP_best"] for s in summaries} == {0.5, 0.51, 0.6, 0.61}
    launched = starts(marker)
    assert len(launched) == 4
    cpus = sweep.cpu_count()
    assert {s["env"]["LIT_SPINE_NUM_THREADS"] for s in launched} == {str(max(1, cpus // 2))}
    assert {s["env"]["WANDB_MODE"] for s in launched} == {"disabled"}  # tests keep W&B off
    assert {s["env"]["WANDB_RUN_GROUP"] for s in launched} == {
        "tiny/norm=batchnorm",
        "tiny/norm=groupnorm",
    }
    text = capsys.readouterr().out
    assert "4/4 done" in text and "ETA" in text
    assert "| 1 | groupnorm | 2 |" in text  # the ranked table, best first
    assert "Protocol. Budget: trainer.max_epochs 3" in text
    verdict = text[text.index("Verdict: ") :]
    assert verdict.startswith("Verdict: Best: norm=groupnorm with val/mAP_best 0.605")
    report = out / "tiny" / "report"
    for name in ("report.md", "report.csv", "runs.csv", "curves.png", "factors.png"):
        assert (report / name).is_file(), name
    assert (report / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\n## Verdict\n" in (report / "report.md").read_text()
    # Rerunning a finished sweep starts nothing.
    assert sweep_command.main([str(path), "--workers", "2", "--out", str(out), "--no-report"]) == 0
    assert len(starts(marker)) == 4


def test_failed_runs_are_redone_and_finished_ones_kept(tmp_path, monkeypatch):
    marker = tmp_path / "marker.jsonl"
    monkeypatch.setenv("FAKE_FIT_MARKER", str(marker))
    monkeypatch.setenv("FAKE_FIT_FAIL", "model.net.init_args.norm=groupnorm")
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    assert sweep_command.main([str(path), "--workers", "2", "--out", str(out), "--no-report"]) == 1
    state = sweep.SweepState.load(out / "tiny" / "state.json")
    status = {
        r.params["model.net.init_args.norm"] + str(r.params["seed_everything"]): state.status(r)
        for r in state.runs
    }
    assert status == {
        "batchnorm0": "finished",
        "batchnorm1": "finished",
        "groupnorm0": "failed",
        "groupnorm1": "failed",
    }
    assert len(starts(marker)) == 4
    monkeypatch.delenv("FAKE_FIT_FAIL")
    assert sweep_command.main([str(path), "--workers", "2", "--out", str(out), "--no-report"]) == 0
    rerun = starts(marker)[4:]
    assert len(rerun) == 2 and all("groupnorm" in s["run_dir"] for s in rerun)
    assert all(not any(a.startswith("--ckpt_path") for a in s["argv"]) for s in rerun)
    assert len(list((out / "tiny" / "attempts").iterdir())) == 2  # failed attempts kept aside
    assert set(statuses(out / "tiny").values()) == {"finished"}


def test_a_failure_says_why_and_an_outside_stop_resumes(tmp_path, monkeypatch, capsys):
    """A failed run's progress line carries its log's error line; a run stopped from outside
    (a scheduler's SIGTERM: it saved last.ckpt and says interrupted) keeps that status, so the
    next invocation resumes it instead of restarting it from scratch."""
    marker = tmp_path / "marker.jsonl"
    monkeypatch.setenv("FAKE_FIT_MARKER", str(marker))
    monkeypatch.setenv("FAKE_FIT_FAIL", "seed_everything=1")
    monkeypatch.setenv("FAKE_FIT_SIGTERM", "model.net.init_args.norm=groupnorm")
    path, out = write_sweep(tmp_path), tmp_path / "out"
    assert sweep_command.main([str(path), "--workers", "1", "--out", str(out), "--no-report"]) == 1
    printed = capsys.readouterr().out
    assert "exit code 3: lit-spine fit: fake failure for seed_everything=1; log:" in printed
    assert "INTERRUPTED" in printed and "the next sweep resumes it" in printed
    state = sweep.SweepState.load(out / "tiny" / "state.json")
    stopped = [r for r in state.runs if r.params["model.net.init_args.norm"] == "groupnorm"
               and r.params["seed_everything"] == 0]  # fmt: skip
    assert [state.status(r) for r in stopped] == ["interrupted"]
    monkeypatch.delenv("FAKE_FIT_SIGTERM")
    monkeypatch.delenv("FAKE_FIT_FAIL")
    assert sweep_command.main([str(path), "--workers", "1", "--out", str(out), "--no-report"]) == 0
    resumed = [s for s in starts(marker)[4:] if any(a.startswith("--ckpt_path") for a in s["argv"])]
    assert [Path(s["run_dir"]).name for s in resumed] == [stopped[0].id]


def test_last_error_line_of_a_log(tmp_path):
    from lit_spine.sweep_proc import last_error_line

    log = tmp_path / "stdout.log"
    log.write_text("Seed set to 0\nusage: lit-spine fit [-h]\nerror: Parser key \"model.net\":\n"
                   "  Problem with given class_path 'lit_spine.models.SpineNet':\n"
                   "    Option 'nrom' is not accepted\n")  # fmt: skip
    assert last_error_line(log) == (
        'error: Parser key "model.net": Problem with given class_path '
        "'lit_spine.models.SpineNet': Option 'nrom' is not accepted"
    )
    log.write_text(
        "Epoch 1\nlit-spine fit: unknown norm 'x'\n(lit-spine: LIT_SPINE_TRACEBACK=1 ...)\n"
    )
    assert last_error_line(log) == "lit-spine fit: unknown norm 'x'"
    assert last_error_line(tmp_path / "missing.log") == ""


def sweep_argv(path: Path, out: Path, *extra: str) -> list[str]:
    """`lit-spine sweep` with two workers, run as a child process."""
    return [sys.executable, "-m", "lit_spine", "sweep", str(path), "--workers", "2",
            "--out", str(out), *extra]  # fmt: skip


def test_ctrl_c_stops_children_and_rerun_resumes(tmp_path):
    marker = tmp_path / "marker.jsonl"
    env = dict(os.environ, FAKE_FIT_MARKER=str(marker), FAKE_FIT_SLEEP="1.5")
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    argv = sweep_argv(path, out, "--no-report")
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    state_file = out / "tiny" / "state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(starts(marker)) == 2:
            break
        time.sleep(0.1)
    assert len(starts(marker)) == 2, proc.stdout.read() if proc.poll() is not None else "no start"
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Rerun the same command to continue" in output
    assert sorted(statuses(state_file.parent).values()) == [
        "interrupted",
        "interrupted",
        "pending",
        "pending",
    ]
    assert not (out / "tiny" / ".lock").exists()
    env["FAKE_FIT_SLEEP"] = "0.01"
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rerun = starts(marker)[2:]
    assert len(rerun) == 4
    resumed = [s for s in rerun if any(a.startswith("--ckpt_path=") for a in s["argv"])]
    assert len(resumed) == 2  # the interrupted runs continue from checkpoints/last.ckpt
    assert set(statuses(state_file.parent).values()) == {"finished"}


def test_changed_sweep_file(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker.jsonl"
    monkeypatch.setenv("FAKE_FIT_MARKER", str(marker))
    out = tmp_path / "out"
    path = write_sweep(tmp_path, norms=["batchnorm"], seeds=[0, 1])
    assert sweep_command.main([str(path), "--out", str(out), "--no-report"]) == 0
    # A superset keeps the finished runs and adds the new ones.
    write_sweep(tmp_path, norms=["batchnorm", "layernorm"], seeds=[0, 1])
    assert sweep_command.main([str(path), "--out", str(out), "--no-report"]) == 0
    assert len(starts(marker)) == 4
    # Dropping planned runs needs --force; their folders move to stale/.
    write_sweep(tmp_path, norms=["groupnorm"], seeds=[0, 1])
    assert sweep_command.main([str(path), "--out", str(out), "--no-report"]) == 2
    assert "--force" in capsys.readouterr().err
    assert sweep_command.main([str(path), "--out", str(out), "--no-report", "--force"]) == 0
    state = json.loads((out / "tiny" / "state.json").read_text())
    assert {r["params"]["model.net.init_args.norm"] for r in state["runs"]} == {"groupnorm"}
    assert len(list((out / "tiny" / "stale").iterdir())) == 4


def test_bayes_and_random_plan_count_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FIT_MARKER", str(tmp_path / "marker.jsonl"))
    out = tmp_path / "out"
    for method in ("bayes", "random"):
        path = write_sweep(
            tmp_path,
            norms=["batchnorm", "groupnorm", "layernorm"],
            seeds=[0, 1],
            method=method,
            name=method,
        )
        assert (
            sweep_command.main(
                [str(path), "--count", "3", "--workers", "2", "--out", str(out), "--no-report"]
            )
            == 0
        )
        assert list(statuses(out / method).values()) == ["finished"] * 3
    assert len(starts(tmp_path / "marker.jsonl")) == 6


def test_dry_run_and_max_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FIT_MARKER", str(tmp_path / "marker.jsonl"))
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    assert sweep_command.main([str(path), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 run(s) planned" in text and "--model.net.init_args.norm=groupnorm" in text
    assert not out.exists()
    assert sweep_command.main([str(path), "--max-runs", "1", "--out", str(out), "--no-report"]) == 0
    assert len(starts(tmp_path / "marker.jsonl")) == 1
    assert sorted(statuses(out / "tiny").values()) == [
        "finished",
        "pending",
        "pending",
        "pending",
    ]


def test_real_fit_grid_with_test_models(tmp_path):
    """Two real `lit-spine fit` runs (test_resnet, batchnorm vs groupnorm) through the sweep,
    stopped after the first run and continued by a rerun that does not redo it."""
    config = {
        "name": "real",
        "program": "lit-spine",
        "method": "grid",
        "metric": {"name": "val/mAP_best", "goal": "maximize"},
        "parameters": {
            "model.net.init_args.norm": {"values": ["batchnorm", "groupnorm"]},
            "seed_everything": {"values": [0]},
        },
        "command": [
            "lit-spine",
            "fit",
            "--config",
            str(ROOT / "experiments" / "smoke.yaml"),
            "--model.net.init_args.backbone=test_resnet",
            "--model.net.init_args.norm_groups=8",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            f"--data.phantom_dir={tmp_path / 'phantom'}",
            "--data.phantom_studies=12",
            "--data.image_size=64",
            "--data.batch_size=2",
            "--wandb=disabled",
            "${args}",
        ],
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = sweep_argv(path, out)
    first = subprocess.run(
        [*argv, "--max-runs", "1", "--no-report"],
        cwd=tmp_path, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    state = sweep.SweepState.load(out / "real" / "state.json")
    assert list(state.statuses().values()).count("finished") == 1
    finished = next(r for r in state.runs if state.status(r) == "finished")
    summary_path = state.run_path(finished) / "summary.json"
    stamp = summary_path.stat().st_mtime_ns
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=850)
    logs = "\n".join(p.read_text()[-3000:] for p in out.glob("real/runs/*/stdout.log"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert summary_path.stat().st_mtime_ns == stamp  # the finished run was not redone
    assert list(statuses(out / "real").values()) == ["finished", "finished"]
    for run in state.runs:
        summary = json.loads((state.run_path(run) / "summary.json").read_text())
        assert summary["status"] == "finished" and "val/mAP_best" in summary
    assert (out / "real" / "report" / "report.md").is_file()


def test_sweep_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    """The sweep folder's .lock (filelock): a live holder blocks, a killed one does not."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from lit_spine import sweep\n"
        "lock = sweep._sweep_lock(Path(sys.argv[1]))\n"
        "lock.acquire()\n"
        "os._exit(0)  # dies holding it, as a killed sweep would\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / ".lock").is_file()
    lock = sweep._sweep_lock(tmp_path)
    lock.acquire()  # the dead holder's lock is taken over at once
    try:
        other = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
        )
        assert other.returncode != 0 and "Timeout" in other.stderr
    finally:
        lock.release()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the signal back with prctl")
def test_children_get_their_own_group_and_the_parent_death_signal_on_linux_only(monkeypatch):
    """A child started the sweep's way leads its own process group and, on Linux, has SIGTERM
    as its parent-death signal (read back with PR_GET_PDEATHSIG); with the lookup made as on
    another system there is no such signal and the child still starts."""
    child = (
        "import ctypes, os\n"
        "sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG\n"
        "print(os.getpgid(0) == os.getpid(), sig.value)\n"
    )

    def start() -> str:
        run = subprocess.run(
            [sys.executable, "-c", child],
            preexec_fn=sweep_proc._detach_child,
            capture_output=True,
            text=True,
            check=True,
        )
        return run.stdout.strip()

    assert start() == f"True {int(signal.SIGTERM)}"
    assert sweep_proc.parent_death_signal("darwin") is None
    assert sweep_proc.parent_death_signal("win32") is None
    monkeypatch.setattr(
        sweep_proc, "_SET_PARENT_DEATH_SIGNAL", sweep_proc.parent_death_signal("darwin")
    )
    assert start() == "True 0"


def test_statuses_come_from_the_run_folders(tmp_path, capsys):
    """state.json holds the plan: every status is read from the run folder, an older
    state.json's recorded statuses are ignored (with one note), and the sweep writes into the
    folder the status of a run that ended without saying it."""
    recorded = {  # what an older state.json said; the folders below say otherwise
        "never-started": "failed",  # no folder
        "killed": "running",  # folder with a log, no summary
        "stopped": "pending",  # summary still says running
        "crashed": "interrupted",  # summary says failed
        "lost": "finished",  # summary says failed: redone
        "done": "failed",  # summary says finished
    }
    (tmp_path / "runs" / "killed").mkdir(parents=True)
    (tmp_path / "runs" / "killed" / "stdout.log").write_text("started\n")
    run_folder.write_summary(tmp_path / "runs" / "stopped", {"status": "running", "epochs": 1})
    for run_id in ("crashed", "lost"):
        run_folder.write_summary(tmp_path / "runs" / run_id, {"status": "failed"})
    run_folder.write_summary(tmp_path / "runs" / "done", {"status": "finished"})
    expected = {
        "never-started": "pending",
        "killed": "interrupted",
        "stopped": "interrupted",
        "crashed": "failed",
        "lost": "failed",
        "done": "finished",
    }

    state = sweep.SweepState(
        path=tmp_path / "state.json", sweep_file="s.yaml", name="s", hash="h", config={}
    )
    for run_id in recorded:
        state.runs.append(
            sweep.PlannedRun(id=run_id, params={"id": run_id}, command=[], run_dir=f"runs/{run_id}")
        )
    assert state.statuses() == expected
    assert state.counts() == {"pending": 1, "interrupted": 2, "failed": 2, "finished": 1}
    state.save()
    saved = json.loads(state.path.read_text())["runs"]
    assert [sorted(r) for r in saved] == [
        ["attempts", "command", "id", "params", "run_dir", "search_info"]
    ] * len(recorded)

    # An older state.json, with per-run statuses and attempt records, still loads.
    for run in saved:
        run.update(status=recorded[run["id"]], metric=0.5, duration_s=3.0, error="old")
    old = json.loads(state.path.read_text())
    state.path.write_text(json.dumps({**old, "runs": saved}))
    loaded = sweep.SweepState.load(state.path)
    assert loaded.legacy_fields and not state.legacy_fields
    assert [r.id for r in loaded.runs] == list(recorded)
    assert loaded.statuses() == expected
    loaded.save()
    assert not sweep.SweepState.load(state.path).legacy_fields
    assert "status" not in json.loads(state.path.read_text())["runs"][0]

    sweep_state.record_status(tmp_path / "runs" / "stopped", "failed", "exit code 3")
    summary = run_folder.read_summary(tmp_path / "runs" / "stopped")
    assert summary["status"] == "failed" and summary["error"] == "exit code 3"
    assert summary["epochs"] == 1  # the run's own fields are kept
    assert run_folder.folder_status(tmp_path / "runs" / "stopped") == "failed"
    assert sweep_state.run_error(tmp_path / "runs" / "stopped") == "exit code 3"
    assert sweep_state.run_error(tmp_path / "runs" / "crashed") == "summary.json says failed"


def test_an_older_state_file_resumes_with_one_note(tmp_path, monkeypatch, capsys):
    """A sweep folder whose state.json has per-run statuses (an older version) continues: the
    folders decide what is finished, and the state is rewritten as the plan only."""
    marker = tmp_path / "marker.jsonl"
    monkeypatch.setenv("FAKE_FIT_MARKER", str(marker))
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    argv = [str(path), "--out", str(out), "--no-report", "--max-runs", "2"]
    assert sweep_command.main(argv) == 0
    state_file = out / "tiny" / "state.json"
    data = json.loads(state_file.read_text())
    for run in data["runs"]:  # an older version's copy, wrong for every run
        run.update(status="finished", metric=0.9, duration_s=1.0)
    state_file.write_text(json.dumps(data))
    capsys.readouterr()
    assert sweep_command.main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("per-run statuses from an older version: ignored") == 1
    assert "resuming: 2 finished run(s) kept" in text
    assert len(starts(marker)) == 4
    assert list(statuses(out / "tiny").values()) == ["finished"] * 4
    assert all("status" not in r for r in json.loads(state_file.read_text())["runs"])


# ----------------------------------------------------------------------------- --config overlay


def test_overlay_goes_after_the_sweep_files_own_configs():
    template = ["lit-spine", "fit", "--config", "a.yaml", "--config=b.yaml", "--x=1", "${args}"]
    assert sweep.with_overlay(template, ["d.yaml"]) == [
        "lit-spine",
        "fit",
        "--config",
        "a.yaml",
        "--config=b.yaml",
        "--config",
        "d.yaml",
        "--x=1",
        "${args}",
    ]
    # No --config of its own: the overlay comes before the sweep parameters.
    assert sweep.with_overlay(["${env}", "${program}", "${args}"], ["d.yaml", "e.yaml"]) == [
        "${env}",
        "${program}",
        "--config",
        "d.yaml",
        "--config",
        "e.yaml",
        "${args}",
    ]
    assert sweep.with_overlay(template, []) == template
    # Without an overlay the identity is that of the sweep file alone (old folders resume).
    config = {"method": "grid"}
    assert sweep.sweep_hash(config) == sweep.sweep_hash(config, [])
    assert sweep.sweep_hash(config, ["d.yaml"]) != sweep.sweep_hash(config)


def test_overlay_reaches_every_run_and_is_part_of_the_sweep(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker.jsonl"
    monkeypatch.setenv("FAKE_FIT_MARKER", str(marker))
    path = write_sweep(tmp_path)
    data = tmp_path / "data.yaml"
    data.write_text("data:\n  batch_size: 2\n")
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  batch_size: 4\n")
    out = tmp_path / "out"
    base = [str(path), "--out", str(out), "--no-report"]
    assert sweep_command.main([*base, "--config", str(data), "--dry-run"]) == 0
    text = capsys.readouterr().out
    planned = [line for line in text.splitlines() if "--model.net.init_args.norm=" in line]
    assert len(planned) == 4
    assert all(f"--config x.yaml --config {data} --model.net.init_args" in p for p in planned)
    assert f"overlay: --config {data}" in text

    assert sweep_command.main([*base, "--config", str(data), "--max-runs", "1"]) == 0
    (first,) = starts(marker)
    argv = first["argv"]
    assert argv[argv.index(str(data)) - 1] == "--config"
    state = json.loads((out / "tiny" / "state.json").read_text())
    assert state["overlay"] == [str(data)]

    # The same overlay continues the sweep; another one is a different sweep state.
    assert sweep_command.main([*base, "--config", str(data), "--max-runs", "1"]) == 0
    assert len(starts(marker)) == 2
    capsys.readouterr()
    assert sweep_command.main([*base, "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--config overlay changed" in err and str(other) in err and "--force" in err
    assert sweep_command.main(base) == 2  # dropping the overlay changes the sweep too
    assert sweep_command.main([*base, "--config", str(other), "--force"]) == 0
    state = json.loads((out / "tiny" / "state.json").read_text())
    assert state["overlay"] == [str(other)]
    assert all(str(other) in r["command"] for r in state["runs"])
    assert list(statuses(out / "tiny").values()) == ["finished"] * 4

    assert sweep_command.main([*base, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
