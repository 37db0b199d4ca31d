"""A stand-in for `lit-spine fit` in sweep and report tests: writes a run folder like the real one.

As a program it reads LIT_SPINE_RUN_DIR and `--key=value` arguments (`--config FILE` pairs are
ignored), then writes config.yaml, meta.json (with config_flat), metrics.csv,
checkpoints/last.ckpt and summary.json, all through lit_spine.runs. The metric is a deterministic function of the norm
and the seed. Report tests call `write_run` directly with the numbers they need.

Environment knobs for tests:
    FAKE_FIT_SLEEP   seconds per epoch (default 0.05)
    FAKE_FIT_MARKER  a file to which every start appends one JSON line (run dir, argv)
    FAKE_FIT_FAIL    `key=value`: exit 3 without a finished summary when that argument matches
    FAKE_FIT_EPOCHS  epochs in metrics.csv (default 3)
    FAKE_FIT_PLATEAU share of the epochs after which val/mAP stays at its best (default 1.0:
                     still rising at the last epoch)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from lit_spine import runs as run_folder

NORM_SCORE = {"batchnorm": 0.50, "groupnorm": 0.60, "layernorm": 0.40, "instancenorm": 0.30}
METRIC_COLUMNS = ["epoch", "step", "train/loss", "val/mAP"]
TRAIN_IMAGES = 96  # steps per epoch = ceil(TRAIN_IMAGES / batch size)


def parse(argv: list[str]) -> dict[str, object]:
    """`--a.b=1 --c=x` -> {"a.b": 1, "c": "x"} (values parsed as YAML, like jsonargparse)."""
    params: dict[str, object] = {}
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--config":
            skip = True
            continue
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            params[key] = yaml.safe_load(value)
    return params


def default_score(params: dict[str, object]) -> float:
    """The program's metric: a per-norm score plus 0.01 per seed."""
    norm = str(params.get("model.net.init_args.norm", "batchnorm"))
    return NORM_SCORE.get(norm, 0.45) + 0.01 * int(params.get("seed_everything", 0))


def _write_config(run_dir: Path, params: dict[str, object], epochs: int) -> None:
    """config.yaml, meta.json (config_flat: defaults overridden by `params`), a checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    flat = {
        "seed_everything": 0,
        "data.batch_size": 8,
        "trainer.max_epochs": epochs,
        "model.optimizer": "adamw",
        "model.lr": 0.002,
        "model.lr_scaling": "none",
        "model.lr_reference_batch": 8,
        "run_dir": str(run_dir),
        **params,
    }
    config = {"seed_everything": 0, "model": {"norm": "batchnorm"}, "data": {"batch_size": 8}}
    run_folder.write_config(run_dir, config)
    run_folder.write_meta(run_dir, {"config_flat": flat, "params": 1234})
    (run_dir / run_folder.CHECKPOINTS).mkdir(exist_ok=True)
    (run_dir / run_folder.LAST_CHECKPOINT).write_text("fake")


def write_run(
    run_dir: Path,
    params: dict[str, object],
    best: float,
    epochs: int = 3,
    plateau: float = 1.0,
    sleep: float = 0.0,
) -> Path:
    """A finished run folder whose per-epoch val/mAP rises linearly to `best`, reached at
    epoch ceil(plateau * epochs) and held from there (plateau 1.0: still rising at the end)."""
    _write_config(run_dir, params, epochs)
    batch = int(params.get("data.batch_size", 8))
    rise = max(1, math.ceil(plateau * epochs))
    steps = math.ceil(TRAIN_IMAGES / batch)
    rows = []  # Lightning's sparse layout: a training row and a validation row per epoch
    for epoch in range(epochs):
        time.sleep(sleep)
        step = (epoch + 1) * steps
        rows.append({"epoch": epoch, "step": step, "train/loss": round(1.0 / (epoch + 1), 4)})
        rows.append(
            {"epoch": epoch, "step": step, "val/mAP": round(best * min(1.0, (epoch + 1) / rise), 6)}
        )
    run_folder.write_metrics(run_dir, pd.DataFrame(rows, columns=METRIC_COLUMNS))
    summary = {
        "status": "finished",
        "val/mAP_best": best,
        "runtime_s": epochs * sleep,
        "images_per_s": 100.0,
        "params": 1234,
        "epochs": epochs,
        "global_step": epochs * steps,
    }
    run_folder.write_summary(run_dir, summary)
    return run_dir


def main() -> int:
    params = parse(sys.argv[1:])
    run_dir = Path(os.environ["LIT_SPINE_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = int(os.environ.get("FAKE_FIT_EPOCHS", "3"))
    # The checkpoint exists before the start is announced, so a test that interrupts a run
    # once its start is in the marker file always finds something to resume from.
    _write_config(run_dir, params, epochs)
    marker = os.environ.get("FAKE_FIT_MARKER")
    if marker:
        with open(marker, "a") as f:
            env = {
                k: os.environ.get(k)
                for k in ("LIT_SPINE_NUM_THREADS", "WANDB_MODE", "WANDB_RUN_GROUP")
            }
            f.write(json.dumps({"run_dir": str(run_dir), "argv": sys.argv[1:], "env": env}) + "\n")
    fail = os.environ.get("FAKE_FIT_FAIL")
    if fail and any(f"{k}={v}" == fail for k, v in params.items()):
        run_folder.write_summary(run_dir, {"status": "failed"})
        print(f"lit-spine fit: fake failure for {fail}", file=sys.stderr)
        return 3
    stop = os.environ.get("FAKE_FIT_SIGTERM")  # stopped from outside after saving last.ckpt
    if stop and any(f"{k}={v}" == stop for k, v in params.items()):
        run_folder.write_summary(run_dir, {"status": "interrupted"})
        return 143
    write_run(
        run_dir,
        params,
        default_score(params),
        epochs=epochs,
        plateau=float(os.environ.get("FAKE_FIT_PLATEAU", "1.0")),
        sleep=float(os.environ.get("FAKE_FIT_SLEEP", "0.05")),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
