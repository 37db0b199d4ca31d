"""`SpineDataset` over the preprocessing caches, the caches' concatenation, the k-fold split
and the epoch-seeded sampler; `SpineDataModule` (lit_spine.data.datamodule) builds them.

Items are dicts, P being the number of points of the task (11 for tianchi2020,
5 for rsna2024_canal and spider_disc):

    image       float32 (slices, S, S)  the annotated slice and its neighbours, about [0, 1]
    heatmap     float32 (P, S / stride, S / stride)  Gaussian targets (`targets.py`)
    points      float32 (P, 2)   [x, y] input pixels; 0 where not present
    present     bool    (P,)     annotated and inside the (augmented) image
    labels      bool    (P, max(Kv, Kd))  multi-hot over the point's own type's codes
                                 (`targets.per_type_labels`; absent points all False)
    graded      bool    (P,)     rsna2024 and spider: present and with a grade (a missing grade is
                                 not invented: such a point counts in no class loss)
    spacing_mm  float32 (2,)     [row, col] mm per input pixel (after any scale augmentation)
    index       int              row of the item in `dataset.cache` (records, `to_original`);
                                 int64 (B,) once batched

Randomness: an item's augmentation is drawn from ``np.random.default_rng([seed, epoch,
row])``, and the training order from ``default_rng([seed, epoch])``; `EpochSampler` hands the
epoch to the dataset together with each index, so an epoch is the same with any number of
workers, with persistent workers, and under DDP (it is a `DistributedSampler`, which
Lightning neither replaces nor wraps, and whose `set_epoch` Lightning calls every epoch).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from lit_spine.data.labels import get_vocabulary
from lit_spine.data.targets import gaussian_heatmaps, heatmap_size, per_type_labels
from lit_spine.data.transforms import SpineAugment
from lit_spine.task import Task, get_task


# ---------------------------------------------------------------------------- caches
def _locate(starts: np.ndarray, i: int) -> tuple[int, int]:
    """(part, row within the part) of row `i` of parts that begin at `starts` (cumulative)."""
    i = int(i)
    if not 0 <= i < starts[-1]:
        raise IndexError(f"row {i} out of range for {int(starts[-1])} rows")
    part = int(np.searchsorted(starts, i, side="right")) - 1
    return part, i - int(starts[part])


class _ConcatImages:
    """Row access over the image arrays of several caches, without copying them."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        part, row = _locate(self.starts, i)
        return self.parts[part][row]


class ConcatCache:
    """Several `SpineCache`s seen as one (same attributes), e.g. lumbar_train150 + lumbar_train51."""

    def __init__(self, caches: Sequence) -> None:
        if not caches:
            raise ValueError("ConcatCache needs at least one cache")
        shapes = {tuple(c.images.shape[1:]) for c in caches}
        vocabs = {c.vocab for c in caches}
        if len(shapes) > 1 or len(vocabs) > 1:
            raise ValueError(f"caches differ in image shape {shapes} or vocabulary {vocabs}")
        self.caches = list(caches)
        self.vocab = caches[0].vocab
        self.images = _ConcatImages([c.images for c in caches])
        for name in ("points", "present", "labels", "spacing_mm"):
            setattr(self, name, np.concatenate([getattr(c, name) for c in caches]))
        self.records = [r for c in caches for r in c.records]
        self.problems = [p for c in caches for p in c.problems]

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"ConcatCache({self.caches!r})"

    def to_original(self, i: int, xy: np.ndarray) -> np.ndarray:
        """Map cache pixel coordinates of row `i` to its original DICOM pixels."""
        part, row = _locate(self.images.starts, i)
        return self.caches[part].to_original(row, xy)


def study_key(record: dict) -> str:
    """What groups the rows of one study: its StudyInstanceUID, else its folder name."""
    return str(record.get("study_uid") or record.get("study"))


def kfold_indices(
    records: Sequence[dict], folds: int, fold: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of fold `fold` of `folds`, split by study.

    The sorted study keys are permuted by ``default_rng(seed)`` and cut into `folds` nearly
    equal parts; the result depends only on the set of studies and the seed, not on the
    order of the records, the machine or the run.
    """
    if folds < 2:
        raise ValueError(f"k-fold needs folds >= 2, got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds - 1}] for folds={folds}, got {fold}")
    keys = [study_key(r) for r in records]
    studies = sorted(set(keys))
    if len(studies) < folds:
        raise ValueError(f"{len(studies)} studies cannot be split into {folds} folds")
    order = np.random.default_rng(seed).permutation(len(studies))
    val_studies = {studies[j] for j in np.array_split(order, folds)[fold]}
    is_val = np.array([k in val_studies for k in keys], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---------------------------------------------------------------------------- dataset
def non_finite_rows(images, rows: Sequence[int], chunk: int = 64) -> np.ndarray:
    """The rows of `images` (N, C, H, W) among `rows` that hold a NaN or inf value."""
    rows = np.asarray(rows, dtype=np.int64)
    bad = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        block = np.stack([np.asarray(images[int(r)]) for r in part]) if len(part) else None
        if block is not None:
            finite = np.isfinite(block.reshape(len(part), -1)).all(axis=1)
            bad.extend(part[~finite].tolist())
    return np.asarray(bad, dtype=np.int64)


def _report(text: str) -> None:
    """Print a data problem once, on the main process only (stderr, so stdout stays clean)."""
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(text, file=sys.stderr, flush=True)


def report_cache_problems(split: str, cache, limit: int = 10) -> None:
    """Print a split's data problems (skipped files, left-out studies) once per opened cache."""
    problems = list(getattr(cache, "problems", []))
    if not problems:
        return
    studies = len({r.get("study") for r in getattr(cache, "records", [])}) or len(cache)
    images = f" as {len(cache)} images" if studies != len(cache) else ""
    lines = [
        f"lit-spine: split {split!r}: {len(problems)} data problems; bad files and studies "
        f"were skipped ({studies} studies kept{images}; all problems in "
        f"{cache.path / 'index.json'}):"
    ]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    _report("\n".join(lines))


class SpineDataset(Dataset):
    """Items (see module docstring) from rows of a cache, with optional augmentation.

    An index may be a row position ``i`` (the dataset's own `epoch` is used, see
    `set_epoch`) or a pair ``(i, epoch)`` as yielded by `EpochSampler`.
    """

    def __init__(
        self,
        cache,
        indices: Sequence[int] | None = None,
        stride: int = 4,
        heatmap_sigma: float = 2.0,
        augment: SpineAugment | None = None,
        seed: int = 0,
        task: str | Task = "tianchi2020",
        graded: bool = False,
    ) -> None:
        self.cache = cache
        self.task = get_task(task) if isinstance(task, str) else task
        self.graded = bool(graded)
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices, np.int64)
        # Never train on NaN/inf: the cache builder rejects such images, this guards caches
        # written by anything else (rows are dropped and listed in `skipped_rows`).
        bad = non_finite_rows(cache.images, self.indices)
        self.skipped_rows = [int(r) for r in bad]
        if self.skipped_rows:
            self.indices = self.indices[~np.isin(self.indices, bad)]
            studies = ", ".join(str(cache.records[r].get("study")) for r in self.skipped_rows[:5])
            _report(
                f"lit-spine: {len(self.skipped_rows)} cached images hold NaN/inf values and "
                f"are left out ({studies}{', ...' if len(self.skipped_rows) > 5 else ''}); "
                "delete the cache folder to rebuild it"
            )
        self.stride = int(stride)
        self.heatmap_sigma = float(heatmap_sigma)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.image_size = tuple(int(s) for s in cache.images.shape[-2:])
        heatmap_size(self.image_size, self.stride)  # fail now, not in a worker
        # Small (N, P, K) bool: convert every row once instead of per item.
        self.labels = per_type_labels(
            np.asarray(cache.labels, dtype=bool), get_vocabulary(cache.vocab), self.task
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, image_size={self.image_size}, "
            f"stride={self.stride}, augment={self.augment is not None})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices (the sampler passes its own with each index)."""
        self.epoch = int(epoch)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, epoch = item if isinstance(item, tuple) else (item, self.epoch)
        row = int(self.indices[i])
        cache = self.cache
        # Copy the (read-only, float16) row, then widen in torch: 9x faster than NumPy's cast.
        image = torch.from_numpy(np.array(cache.images[row])).float()
        points = np.asarray(cache.points[row], dtype=np.float32)
        present = np.asarray(cache.present[row], dtype=bool)
        spacing = np.asarray(cache.spacing_mm[row], dtype=np.float32)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, int(epoch), row])
            image, points, present, spacing = self.augment(image, points, present, spacing, rng)
        points = np.where(present[:, None], points, 0.0).astype(np.float32)
        heatmap = gaussian_heatmaps(
            points, present, self.image_size, self.stride, self.heatmap_sigma
        )
        labels = self.labels[row] & present[:, None]
        item = {
            "image": image,
            "heatmap": torch.from_numpy(heatmap),
            "points": torch.from_numpy(points),
            "present": torch.from_numpy(present.copy()),
            "labels": torch.from_numpy(labels),
            "spacing_mm": torch.from_numpy(np.array(spacing, dtype=np.float32)),
            "index": row,
        }
        if self.graded:
            item["graded"] = torch.from_numpy(labels.any(-1))
        return item


class EpochSampler(DistributedSampler):
    """Seeded per-epoch order that yields ``(index, epoch)`` pairs; shards itself under DDP.

    The order of epoch e is ``default_rng([seed, e]).permutation(n)`` (or 0..n-1 without
    shuffle), dealt out round-robin to the replicas. With `pad` (training) it is first padded
    to a multiple of the replicas, as `DistributedSampler` does, so every process runs the
    same number of steps; without it (evaluation) no item is seen twice, so metrics count
    every study exactly once.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.pad = pad
        if not pad:
            self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        if self.pad and self.total_size > n:
            order = np.resize(order, self.total_size)  # pad by repeating from the start
        for i in order[self.rank :: self.num_replicas]:
            yield int(i), self.epoch
