"""A phantom layout written once under a marker file (the rsna2024 and spider layouts).

`ensure_layout` writes a layout into `root` unless a complete one with the same parameters is
there already, so its files (and the cache key built from them) stay unchanged between runs.
The marker records the parameters and whether the write finished; a file lock orders parallel
builders; a folder written with other parameters or left half-written is replaced; a
non-empty folder without the marker is refused, never overwritten.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from lit_spine.utils import atomic_write_json, file_lock


def ensure_layout(
    root: str | Path,
    params: dict,
    marker_name: str,
    what: str,
    folders: Sequence[str],
    write: Callable[[Path], object],
) -> Path:
    """`root` holding the phantom of `params`, calling `write(root)` when needed.

    `what` names it in the refusal ("an rsna2024 phantom"); `folders` are the layout's data
    folders, removed before a rewrite."""
    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        marker = root / marker_name
        if marker.is_file():
            if json.loads(marker.read_text()) == {"params": params, "complete": True}:
                return root
            for folder in folders:
                shutil.rmtree(root / folder, ignore_errors=True)
        elif root.is_dir() and any(root.iterdir()):
            raise FileExistsError(
                f"{root}: not empty and not {what} (no {marker_name}); "
                "choose another folder (--out, or data.phantom_dir) or remove it"
            )
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"params": params, "complete": False})
        write(root)
        atomic_write_json(marker, {"params": params, "complete": True})
    return root
