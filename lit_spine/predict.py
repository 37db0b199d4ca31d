"""Turn `predict` outputs into a prediction file (annotation schema, with scores) and overlays.

Points come out of the network in cache-image pixels; they are mapped back to the pixels of
the original annotated DICOM image so that `lit-spine evaluate` scores the file against the
dataset's own annotation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from lit_spine.data.annotation import Point, StudyAnnotation, write_annotations
from lit_spine.data.labels import DISC_POINTS, POINT_NAMES, VERTEBRA_POINTS, Vocabulary


def point_predictions(
    points_xy: np.ndarray,
    scores: np.ndarray,
    vertebra_probs: np.ndarray,
    disc_probs: np.ndarray,
    vocab: Vocabulary,
    multi_label_threshold: float = 0.5,
) -> list[Point]:
    """Points of one study: the top label per point plus any other label above the threshold.

    A point with several labels is written once per label, each with score = point score x
    label probability, so that AP ranks labels by confidence (the metric counts one
    prediction per label either way).
    """
    out: list[Point] = []
    for kind, rows, probs in (("vertebra", VERTEBRA_POINTS, vertebra_probs),
                              ("disc", DISC_POINTS, disc_probs)):
        codes = vocab.codes(kind)
        for r, p_idx in enumerate(rows):
            p = probs[r, : len(codes)]
            top = int(np.argmax(p))
            chosen = [top] + [c for c in range(len(codes)) if c != top and p[c] >= multi_label_threshold]
            for c in chosen:
                out.append(Point(
                    identification=POINT_NAMES[p_idx],
                    x=float(points_xy[p_idx, 0]),
                    y=float(points_xy[p_idx, 1]),
                    labels=(codes[c],),
                    score=float(np.clip(scores[p_idx] * p[c], 0.0, 1.0)),
                ))
    return out


class PredictionWriter(pl.Callback):
    """Collect `predict_step` outputs; write predictions.json and PNG overlays into `out_dir`."""

    def __init__(self, out_dir: str | Path, overlays: int = 16) -> None:
        self.out_dir = Path(out_dir)
        self.overlays = overlays
        self.batches: list[dict] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
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
        threshold = pl_module.hparams.multi_label_threshold
        studies = []
        for row, index in enumerate(merged["index"].tolist()):
            rec = cache.records[index]
            orig_xy = cache.to_original(index, merged["points"][row])
            points = point_predictions(
                orig_xy, merged["scores"][row], merged["vertebra_probs"][row],
                merged["disc_probs"][row], vocab, threshold,
            )
            studies.append(StudyAnnotation(
                rec["study_uid"], rec.get("series_uid"), rec.get("instance_uid"), points
            ))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pred_path = self.out_dir / "predictions.json"
        write_annotations(pred_path, studies)
        paths = self._overlays(cache, merged)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and paths:
                logger.log_image(key="predict/overlays", images=[str(p) for p in paths])
        print(f"lit-spine: wrote {pred_path} ({len(studies)} studies) and {len(paths)} overlays")

    def _overlays(self, cache, merged: dict) -> list[Path]:
        if self.overlays <= 0:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = self.out_dir / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for row, index in enumerate(merged["index"].tolist()[: self.overlays]):
            image = np.asarray(cache.images[index], dtype=np.float32)
            image = image[image.shape[0] // 2]
            fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            gt, present = cache.points[index], cache.present[index]
            pred = merged["points"][row]
            for k, name in enumerate(POINT_NAMES):
                if present[k]:
                    ax.plot(*gt[k], "o", ms=5, mfc="none", mec="lime")
                ax.plot(*pred[k], "x", ms=5, color="red")
                ax.text(pred[k][0] + 4, pred[k][1], name, color="yellow", fontsize=6)
            ax.set_title(f"{cache.records[index]['study']}: true (green o) vs predicted (red x)",
                         fontsize=8)
            ax.axis("off")
            path = folder / f"{cache.records[index]['study']}.png"
            fig.savefig(path, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
        return paths
