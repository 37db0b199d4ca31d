"""The command-line entry points: help texts, aliases, unknown commands."""

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
