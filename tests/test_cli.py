"""The command-line entry points: help texts, aliases, unknown commands."""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lit_spine.cli import LIGHTNING_COMMANDS, SUITE_COMMANDS, main

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [[str(BIN / "lit-spine")], [str(BIN / "lightning")], [sys.executable, "-m", "lit_spine"]],
)
def test_help_lists_every_command(argv):
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in [*LIGHTNING_COMMANDS, *SUITE_COMMANDS]:
        assert f"  {name} " in out.stdout


def test_unknown_command_names_closest(capsys):
    assert main(["fti"]) == 2
    assert "did you mean 'fit'" in capsys.readouterr().err


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: lit-spine" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(SUITE_COMMANDS))
def test_every_suite_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"lit-spine {command}" in capsys.readouterr().out


def test_fit_help_shows_lightning_and_suite_options():
    out = subprocess.run(
        [str(BIN / "lit-spine"), "fit", "--help"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    for option in (
        "--trainer.max_epochs",
        "--model.lr",
        "--data.batch_size",
        "--experiment",
        "--print_model",
        "--checkpoint.monitor",
        "--early_stopping.patience",
    ):
        assert option in out.stdout


# ----------------------------------------------------------------------------- one CLI layer

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_cli_layer_parses_command_lines():
    """Parsers live in lit_spine/commands/ and train_cli.py only (cli.py dispatches)."""
    allowed = {"lit_spine/train_cli.py", "lit_spine/cli.py"}  # LightningCLI; the dispatcher
    offenders = []
    for path in sorted((ROOT / "lit_spine").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("lit_spine/commands/") or rel in allowed:
            continue
        text = path.read_text()
        if re.search(r"^\s*(import argparse|from argparse|from jsonargparse)", text, re.M):
            offenders.append(rel)
        if re.search(r"^def (main|build_parser)\(", text, re.M):
            offenders.append(rel)
    assert offenders == []


def test_describe_takes_exactly_spinenet_arguments(capsys):
    from lit_spine.commands.describe import build_parser
    from lit_spine.models.net import SpineNet

    parser = build_parser()
    own = {"help", "config", "print_config", "image_size", "json"}
    dests = {a.dest for a in parser._actions} - own
    assert dests == set(inspect.signature(SpineNet).parameters) - {"self"}
    with pytest.raises(SystemExit):
        main(["describe", "--help"])
    text = capsys.readouterr().out
    for option in ("--pretrained", "--head", "--head_channels", "--class_features", "--task"):
        assert option in text


def test_describe_options_in_either_spelling_and_from_config(tmp_path, capsys):
    common = ["describe", "--backbone", "test_resnet", "--image-size", "64", "--json"]
    assert main([*common, "--head", "fpn", "--head-channels", "16"]) == 0
    dashed = json.loads(capsys.readouterr().out)
    assert main([*common, "--head", "fpn", "--head_channels", "16"]) == 0
    assert json.loads(capsys.readouterr().out) == dashed
    config = tmp_path / "net.yaml"
    config.write_text("head: fpn\nhead_channels: 16\n")
    assert main([*common, "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == dashed
    assert main([*common, "--config", str(config), "--head_channels", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] != dashed["params"]  # options win


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["phantom", "--studies", "many"], ["argument --studies:", "many"]),
        (["phantom", "--layout", "dicom"], ["argument --layout:", "'dicom'", "'rsna2024'"]),
        (["describe", "--norm_groups", "x"], ["argument --norm_groups:", "x"]),
        (["evaluate", "--pred", "p", "--gt", "g", "--radius-mm", "-1"], ["argument --radius-mm:"]),
        (["bench", "--device", "tpu"], ["argument --device:", "'tpu'", "'cuda'"]),
        (["report", "--goal", "best"], ["argument --goal:", "'best'", "'maximize'"]),
    ],
)
def test_a_bad_value_names_the_option_the_value_and_the_choices(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    for text in expected:
        assert text in line, (text, line)
    assert f"usage: lit-spine {argv[0]}" in err


def test_unusable_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path), "--vocab", "seed9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lit-spine inspect: error: --vocab: unknown vocabulary 'seed9'")
    assert "did you mean 'seed7'" in err and "\n" not in err
    assert main(["bench", "--norms", "grupnorm"]) == 2
    assert "--norms: unknown norm 'grupnorm' (did you mean 'groupnorm'?)" in capsys.readouterr().err


def test_every_suite_command_reads_its_options_from_config_files(tmp_path, capsys):
    options = tmp_path / "phantom.yaml"
    options.write_text(
        f"out: {tmp_path / 'ph'}\nstudies: 2\nsplits: train=1,test=1\nsize: 64\nworkers: 1\n"
        "no_progress: true\n"
    )
    assert main(["phantom", "--config", str(options), "--seed", "3"]) == 0
    assert (tmp_path / "ph" / "test_annotation.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["phantom", "--config", str(options), "--print_config"])
    printed = capsys.readouterr().out
    assert "studies: 2" in printed and "layout: tianchi2020" in printed


def test_more_bad_values_are_one_line_and_exit_2(tmp_path, capsys):
    """A bad value in a tool's --config file, a zero or negative size or count, a misspelt
    backbone (a short message, not timm's whole model list) and a metric no run has."""
    config = tmp_path / "ev.yaml"
    config.write_text("radius_mm: 0\n")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--pred", "p.json", "--gt", "g.json", "--config", str(config)])
    assert exc.value.code == 2 and "--radius-mm takes a finite radius" in capsys.readouterr().err
    for argv, expected in (
        (["describe", "--image-size", "0"], "--image-size takes one or two sizes in px >= 1"),
        (
            ["sweep", "sweeps/default.yaml", "--count", "0", "--dry-run"],
            "--count must be at least 1",
        ),
        (["sweep", "sweeps/default.yaml", "--workers", "0", "--dry-run"], "--workers must be"),
        (
            ["bench", "--backbones", "resnet19"],
            "unknown backbone 'resnet19' (did you mean 'resnet18'",
        ),
        (["describe", "--backbone", "resnet19"], "unknown backbone 'resnet19' (did you mean"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and len(err) < 1500 and "Traceback" not in err, err

    from fake_fit import write_run

    write_run(tmp_path / "runs" / "r0", {"seed_everything": 0}, 0.5)
    assert main(["report", str(tmp_path / "runs"), "--metric", "val/mAPP",
                 "--out", str(tmp_path / "rep")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no finished run has the metric 'val/mAPP'" in err and "did you mean 'val/mAP" in err


def test_describe_reads_experiment_files_as_fit_does(capsys):
    """The data section's image size (and the task, vocab and slices fit links into the net)
    come with a LightningCLI file; an overlay without a model section is accepted."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    assert main(["describe", "--config", str(root / "smoke.yaml")]) == 0
    assert "input 1x128x128" in capsys.readouterr().out
    overlay = [
        "--config",
        str(root / "base.yaml"),
        "--config",
        str(root / "data/challenge2020.yaml"),
    ]
    assert main(["describe", *overlay]) == 0
    assert "input 1x256x256" in capsys.readouterr().out
    assert main(["describe", "--config", str(root / "smoke.yaml"), "--image-size", "64"]) == 0
    assert "input 1x64x64" in capsys.readouterr().out  # the command line wins
