"""The suite's command lines: one module per `lit-spine` tool, one place that parses them.

`lit_spine.cli` dispatches `lit-spine <command>`: `fit`, `validate`, `test` and `predict` go to
LightningCLI (`lit_spine.train_cli`); `phantom`, `inspect`, `evaluate`, `describe`, `sweep`,
`report` and `bench` come here. Each module has `build_parser()` (a jsonargparse parser) and
`main(argv) -> int`, and calls the library's plain typed functions; nothing below `lit_spine`
outside this package and `train_cli.py` parses a command line. The conventions every command
shares (`--help`, `--config`, option spelling, error messages, exit codes) are in
`common.py` and docs/architecture.md.
"""
