"""A PNG grid of annotated slices with their points and labels, for any challenge-layout root.

Reads the dataset back through `lit_spine.data` (annotations, DICOM indexing and decoding),
so the preview shows what training will see, phantom or real data alike.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from lit_spine.phantom.generate import MARKER, PhantomError


def write_preview(
    root: str | os.PathLike,
    png: str | os.PathLike | None = None,
    max_studies: int = 12,
    vocab: str | None = None,
) -> Path:
    """Save a PNG grid of annotated slices with their points and labels (any dataset root)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lit_spine.data.annotation import load_annotations
    from lit_spine.data.dicom import decode_pixels, index_study

    root = Path(root)
    png = Path(png) if png else root / "preview.png"
    if vocab is None:
        try:
            vocab = json.loads((root / MARKER).read_text())["params"]["vocab"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            vocab = "tianchi2020"
    files = sorted(root.glob("*_annotation.json"))
    if not files:
        raise PhantomError(f"{root}: no <split>_annotation.json to preview")
    tiles = []
    for ann_file in files:
        split = ann_file.name[: -len("_annotation.json")]
        ann = load_annotations(ann_file, vocab)
        folders = (
            sorted(
                (p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: (len(p.name), p.name),
            )
            if (root / split).is_dir()
            else []
        )
        for folder in folders:
            if len(tiles) >= max_studies:
                break
            study = index_study(folder, workers=1)
            a = ann.get(study.study_uid or "")
            found = study.find_instance(a.instance_uid) if a and a.instance_uid else None
            if found is None:
                continue
            series, i = found
            tiles.append(
                (
                    f"{split}/{folder.name}",
                    series.description,
                    decode_pixels(series.slices[i].path),
                    a.points,
                )
            )
        if len(tiles) >= max_studies:
            break
    if not tiles:
        raise PhantomError(f"{root}: no annotated slice found to preview")
    ncol = min(4, len(tiles))
    nrow = math.ceil(len(tiles) / ncol)
    fig = Figure(figsize=(4.2 * ncol, 4.6 * nrow), dpi=90)
    FigureCanvasAgg(fig)
    for k, (name, desc, img, points) in enumerate(tiles):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        lo, hi = np.percentile(img, [0.5, 99.7])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        for p in points:
            text = ",".join(p.labels)
            colour = "lime" if text == "v1" else "orangered"
            ax.plot(p.x, p.y, "+", color=colour, ms=6, mew=1.2)
            ax.text(
                p.x - 0.09 * img.shape[1],
                p.y,
                f"{p.identification} {text}",
                color=colour,
                fontsize=6,
                ha="right",
                va="center",
            )
        ax.set_title(f"{name}  {desc}  {img.shape[1]}x{img.shape[0]}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png
