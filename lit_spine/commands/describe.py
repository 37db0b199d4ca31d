"""`lit-spine describe`: parameters, FLOPs, receptive field and norm/drop map of a SpineNet.

The net's options are `SpineNet`'s own arguments, read from its signature and docstring
(`add_class_arguments`), so describe takes exactly what a config's `model.net.init_args`
takes; `--image-size` and `--json` are describe's own. `--config FILE` reads a LightningCLI
experiment file or overlay (its `model.net.init_args`, the data section's task, vocab and
slices that fit links into the net, and `data.image_size`, as `lit-spine fit --config`
would) or a file of describe's own keys; files apply left to right, command-line options win. Calls
`lit_spine.models.summary.describe` / `format_description`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

from lit_spine.commands import common

NAME = "describe"
# Top-level keys of a LightningCLI experiment file (any of them marks one, overlays included).
LIGHTNING_KEYS = {
    "model", "data", "trainer", "seed_everything", "checkpoint", "early_stopping",
    "drop_schedule", "diagnostics", "experiment", "run_dir", "runs_root", "wandb",
    "wandb_project", "overlays", "print_model", "ckpt_path",
}  # fmt: skip
MODE = "lit_spine_net"  # jsonargparse parser mode: the YAML loader below


def _net_init_args(text: str) -> Any:
    """YAML loader of describe's `--config`: a LightningCLI file gives its net's init_args.

    The net sits at `model.net` (or `model.init_args.net`, as `--print_config` writes it) with
    `class_path`/`init_args`; a file without a `model` key holds describe's keys directly.
    """
    import yaml

    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not set(doc) & LIGHTNING_KEYS:
        return doc
    model = doc.get("model") or {}
    net = model.get("net") or (model.get("init_args") or {}).get("net") or {}
    if not isinstance(net, dict):
        raise ValueError(f"model.net must be a mapping with init_args, got {net!r}")
    args = dict(net.get("init_args") or {})
    # What fit links from the data section into the net, and the size it trains at.
    data = doc.get("data") or {}
    for key, target in (("task", "task"), ("vocab", "vocab"), ("slices", "in_chans")):
        if data.get(key) is not None:
            args[target] = data[key]
    if data.get("image_size") is not None:
        args["image_size"] = [int(data["image_size"])]
    return args


def build_parser():
    """The `lit-spine describe` parser: SpineNet's arguments plus describe's own."""
    from jsonargparse import set_loader

    from lit_spine.models.net import SpineNet

    set_loader(MODE, _net_init_args)
    parser = common.command_parser(
        NAME,
        "Parameters, FLOPs, receptive field and norm/drop layers of a SpineNet. The net "
        "options are SpineNet's arguments (docs/architecture.md); --config also reads "
        "LightningCLI experiment files (model.net.init_args).",
        parser_mode=MODE,
    )
    parser.add_class_arguments(SpineNet, as_group=True)
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=[256],
        metavar="PX",
        help="input size: one value (square) or height width",
    )
    common.add_json(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lit-spine describe`; exit 2 when the net cannot be built."""
    parser = build_parser()
    args = common.parse(parser, argv)
    return common.run(NAME, lambda: _describe(parser, args), (ValueError, TypeError))


def _describe(parser, args) -> int:
    from lit_spine.models.net import SpineNet
    from lit_spine.models.summary import describe, format_description

    size = list(args.image_size)
    if len(size) not in (1, 2) or any(v < 1 for v in size):
        raise common.UsageError(f"--image-size takes one or two sizes in px >= 1, got {size}")
    net_args = {k: v for k, v in vars(args).items() if k not in ("config", "image_size", "json")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = SpineNet(**net_args)
    info = describe(net, (size[0], size[-1]))
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
