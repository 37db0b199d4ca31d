"""Turn `predict` outputs into a prediction file and overlays.

For tianchi2020 the file is the annotation schema with scores (`predictions.json`); for the
rsna2024 and spider tasks it is the layout's own CSV format (`lit_spine/predict_layouts.py`,
docs/datasets.md "Prediction files"). Points come out of the network in cache-image pixels;
they are mapped back to the pixels of the original image so that `lit-spine evaluate`
scores the file against the dataset's own labels.

`overlays/` holds exactly the overlays of the last predict: they are drawn into a fresh
hidden folder beside it that then replaces it (`--overlays 0` removes it), so no PNG of an
earlier predict stays beside a new prediction file. Each overlay's name is unique among
them (`overlay_names`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from lit_spine.data.annotation import Point, StudyAnnotation, write_annotations
from lit_spine.metrics import PredictionRows, select_predictions
from lit_spine.predict_layouts import WRITTEN_TASKS, write_layout_predictions
from lit_spine.task import POINT_NAMES, Vocabulary, get_task
from lit_spine.utils import UMASK


def rows_to_points(rows: PredictionRows, i: int, xy: np.ndarray, vocab: Vocabulary) -> list[Point]:
    """Prediction rows of batch item `i` (from `select_predictions`) as annotation points.

    `xy` holds the item's 11 points in the pixels the file should use (the original image's).
    Rows keep their order, which is the metric's input order, so that scoring the written file
    gives the same numbers as the in-training metric.
    """
    points = []
    valid = rows.valid[i].tolist()
    for r, ok in enumerate(valid):
        if not ok:
            continue
        k = int(rows.point_index[i, r])
        kind, code = vocab.classes[int(rows.cls[i, r])].split("/")
        points.append(
            Point(
                identification=POINT_NAMES[k],
                x=float(xy[k, 0]),
                y=float(xy[k, 1]),
                labels=(code,),
                score=float(rows.score[i, r]),
            )
        )
    return points


def overlay_names(cache, indices: list[int]) -> list[str]:
    """File stems of the overlays of cache rows `indices`, unique among them: the study folder
    (rsna2024: plus `_<instance_number>`, one item per labelled instance), after its split
    folder's name when the cache joins several splits (`--data.predict_split=train,val` may
    hold a `study0` in each); a stem that is still repeated gets `_row<cache row>`."""
    parts = getattr(cache, "caches", None) or []
    starts = np.cumsum([0] + [len(c) for c in parts])
    names = []
    for index in indices:
        rec = cache.records[index]
        suffix = f"_{rec['instance_number']}" if "instance_number" in rec else ""
        name = f"{rec['study']}{suffix}"
        if len(parts) > 1:
            k = int(np.searchsorted(starts, index, side="right")) - 1
            root = getattr(parts[k], "index", {}).get("root")
            name = f"{Path(root).name if root else f'part{k}'}_{name}"
        names.append(name)
    counts = Counter(names)
    return [f"{n}_row{i}" if counts[n] > 1 else n for n, i in zip(names, indices)]


def replace_folder(folder: Path, new: Path | None) -> None:
    """Put the folder `new` in the place of `folder` (None: remove `folder`): the old one is
    renamed aside first and deleted after, so `folder` is never a mix of the two."""
    old = None
    if folder.exists() or folder.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=folder.parent))
        os.replace(folder, old / folder.name)
    if new is not None:
        os.replace(new, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class PredictionWriter(pl.Callback):
    """Collect `predict_step` outputs; write predictions.json and PNG overlays into `out_dir`."""

    def __init__(self, out_dir: str | Path, overlays: int = 16) -> None:
        self.out_dir = Path(out_dir)
        self.overlays = overlays
        self.batches: list[dict] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        task = getattr(pl_module, "task", None)
        if task is not None and task.name not in WRITTEN_TASKS:
            raise ValueError(
                f"lit-spine predict: task {task.name!r} has no prediction writer yet; "
                f"written are: {', '.join(WRITTEN_TASKS)} (docs/datasets.md, Prediction files)"
            )
        self.batches = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches.append(outputs)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if not self.batches:
            return
        merged = {k: torch.cat([b[k] for b in self.batches]).numpy() for k in self.batches[0]}
        dataset = trainer.datamodule.predict_dataset
        cache = dataset.cache
        vocab = pl_module.vocab
        task = getattr(pl_module, "task", None) or get_task("tianchi2020")
        threshold = pl_module.hparams.multi_label_threshold
        rows = select_predictions(
            torch.from_numpy(merged["points"]),
            torch.from_numpy(merged["scores"]),
            torch.from_numpy(merged["vertebra_probs"]),
            torch.from_numpy(merged["disc_probs"]),
            vocab,
            multi_label_threshold=threshold,
            task=task,
        )
        if task.name == "tianchi2020":
            pred_paths = [self._write_annotations(cache, merged, rows, vocab)]
        else:
            pred_paths = write_layout_predictions(self.out_dir, merged, cache, task, vocab, rows)
        paths = self._overlays(cache, merged, task.point_names)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and paths:
                logger.log_image(key="predict/overlays", images=[str(p) for p in paths])
        problems = list(getattr(cache, "problems", []))
        left_out = (
            f"; {len(problems)} data problems while caching (unreadable files skipped, "
            "unusable studies left out: listed above and in the cache's index.json)"
            if problems
            else ""
        )
        n_items = len(merged["index"])
        print(
            f"lit-spine: wrote {', '.join(str(p) for p in pred_paths)} ({n_items} items) and "
            f"{len(paths)} overlays" + left_out
        )

    def _write_annotations(self, cache, merged: dict, rows: PredictionRows, vocab) -> Path:
        """predictions.json in the 2020 annotation schema."""
        studies = []
        for row, index in enumerate(merged["index"].tolist()):
            rec = cache.records[index]
            orig_xy = cache.to_original(index, merged["points"][row])
            studies.append(
                StudyAnnotation(
                    rec["study_uid"],
                    rec.get("series_uid"),
                    rec.get("instance_uid"),
                    rows_to_points(rows, row, orig_xy, vocab),
                )
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pred_path = self.out_dir / "predictions.json"
        write_annotations(pred_path, studies)
        return pred_path

    def _overlays(self, cache, merged: dict, point_names: tuple[str, ...]) -> list[Path]:
        """Draw the first `self.overlays` items into a fresh folder that replaces `overlays/`;
        returns the paths of the files written (one per item: the names are unique)."""
        folder = self.out_dir / "overlays"
        if self.overlays <= 0:
            replace_folder(folder, None)  # no overlay of an earlier predict stays
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        indices = merged["index"].tolist()[: self.overlays]
        names = overlay_names(cache, indices)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".overlays-new-", dir=self.out_dir))
        try:
            for row, (index, name) in enumerate(zip(indices, names)):
                image = np.asarray(cache.images[index], dtype=np.float32)
                image = image[image.shape[0] // 2]
                fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
                ax.imshow(image, cmap="gray", vmin=0, vmax=1)
                gt, present = cache.points[index], cache.present[index]
                pred = merged["points"][row]
                for k, point in enumerate(point_names):
                    if present[k]:
                        ax.plot(*gt[k], "o", ms=5, mfc="none", mec="lime")
                    ax.plot(*pred[k], "x", ms=5, color="red")
                    ax.text(pred[k][0] + 4, pred[k][1], point, color="yellow", fontsize=6)
                ax.set_title(f"{name}: true (green o) vs predicted (red x)", fontsize=8)
                ax.axis("off")
                fig.savefig(tmp / f"{name}.png", bbox_inches="tight")
                plt.close(fig)
            tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it 0700; a plain mkdir would not
            replace_folder(folder, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [folder / f"{name}.png" for name in names]
