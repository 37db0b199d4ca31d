"""A stand-in for `lit-spine fit` in sweep tests: writes a run folder like the real one, fast.

Reads LIT_SPINE_RUN_DIR and `--key=value` arguments (`--config FILE` pairs are ignored), then
writes config.yaml, meta.json (with config_flat), metrics.csv, checkpoints/last.ckpt and
summary.json. The metric is a deterministic function of the norm and the seed.

Environment knobs for tests:
    FAKE_FIT_SLEEP   seconds per epoch (default 0.05)
    FAKE_FIT_MARKER  a file to which every start appends one JSON line (run dir, argv)
    FAKE_FIT_FAIL    `key=value`: exit 3 without a finished summary when that argument matches
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml

NORM_SCORE = {"batchnorm": 0.50, "groupnorm": 0.60, "layernorm": 0.40, "instancenorm": 0.30}


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


def main() -> int:
    params = parse(sys.argv[1:])
    run_dir = Path(os.environ["LIT_SPINE_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = os.environ.get("FAKE_FIT_MARKER")
    if marker:
        with open(marker, "a") as f:
            env = {
                k: os.environ.get(k)
                for k in ("LIT_SPINE_NUM_THREADS", "WANDB_MODE", "WANDB_RUN_GROUP")
            }
            f.write(json.dumps({"run_dir": str(run_dir), "argv": sys.argv[1:], "env": env}) + "\n")
    config = {"seed_everything": 0, "model": {"norm": "batchnorm"}, "data": {"batch_size": 8}}
    flat = {"seed_everything": 0, "data.batch_size": 8, "run_dir": str(run_dir), **params}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "meta.json").write_text(json.dumps({"config_flat": flat, "params": 1234}))
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_text("fake")
    fail = os.environ.get("FAKE_FIT_FAIL")
    if fail and any(f"{k}={v}" == fail for k, v in params.items()):
        (run_dir / "summary.json").write_text(json.dumps({"status": "failed"}))
        return 3
    norm = str(params.get("model.net.init_args.norm", "batchnorm"))
    seed = int(params.get("seed_everything", 0))
    best = NORM_SCORE.get(norm, 0.45) + 0.01 * seed
    sleep = float(os.environ.get("FAKE_FIT_SLEEP", "0.05"))
    lines = ["epoch,step,train/loss,val/mAP"]
    for epoch in range(3):
        time.sleep(sleep)
        lines.append(f"{epoch},{epoch * 10},{1.0 / (epoch + 1):.4f},")
        lines.append(f"{epoch},{epoch * 10},,{best * (epoch + 1) / 3:.6f}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    summary = {
        "status": "finished",
        "val/mAP_best": best,
        "runtime_s": 3 * sleep,
        "images_per_s": 100.0,
        "params": 1234,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
