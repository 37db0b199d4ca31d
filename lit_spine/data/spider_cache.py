"""Preprocessing cache of the SPIDER layout: the same folder format as `data/cache.py`.

`build_spider_cache` reads the layout with `data/spider.py` and writes one cache row per
patient: the network input is the mid-sagittal slice of the T2 volume (reoriented as the
reader does) and its neighbours, the points are the mask centroids on that slice, and each
point's labels are the reader's codes in the task's vocabulary (`SpiderStudy.labels`: a
Pfirrmann grade for `spider_disc`, the findings for `spider_spine`; a point without them
is present but ungraded). The
normalisation and letterboxing are those of the 2020 cache (`percentile_normalise`,
`letterbox`, `to_cache_coords`), so `SpineCache.open`, `SpineDataset` and the k-fold split
read it as they read a 2020 cache. Records carry `patient`, `series`, `slice_index` and
`levels` besides the 2020 fields.

The key hashes the gradings CSV, every chosen image and mask file (path, size, mtime, ctime), the
settings, task, vocabulary and `SPIDER_CACHE_VERSION`; a build goes to `<key>.tmp-<pid>/`
and is renamed into place only when complete. A patient whose volume cannot be read is
reported in `problems` and left out; only a dataset without any usable patient raises.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lit_spine.data.cache import (
    CacheRows,
    CacheSettings,
    SpineCache,
    blank_row,
    letterbox,
    percentile_normalise,
    to_cache_coords,
)
from lit_spine.data.rsna_cache import build_task_cache, task_cache_hash
from lit_spine.data.spider import GRADINGS_CSV, SpiderDataset, read_spider, read_volume

SPIDER_CACHE_VERSION = 2  # 2: labels from SpiderStudy.labels (spider_spine)


def spider_cache_key(data: SpiderDataset, settings: CacheSettings, task: str, vocab: str) -> str:
    """Content hash of the gradings, the chosen volumes, the settings, task and vocabulary."""
    h = task_cache_hash("spider", SPIDER_CACHE_VERSION, settings, task, vocab)
    h.update(b"\0csv\0" + (data.root / GRADINGS_CSV).read_bytes())
    for st in data.studies:
        for path in (st.image_path, st.mask_path):
            stat = path.stat()
            rel = os.path.relpath(path, data.root)
            h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_spider_cache(
    root: str | os.PathLike,
    settings: CacheSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    task: str = "spider_disc",
    vocab: str | None = None,
) -> SpineCache:
    """Build (or reuse) the cache of the SPIDER folder `root`, and open it."""
    return build_task_cache(
        root,
        settings,
        cache_dir,
        task,
        vocab,
        fmt="spider",
        read=read_spider,
        key=spider_cache_key,
        annotation=GRADINGS_CSV,
        write_rows=_write_rows,
        usable="spider patient",
        readable="spider volume",
    )


def _write_rows(out: Path, data: SpiderDataset, settings: CacheSettings, vocabulary, problems):
    spec = data.task
    radius = settings.neighbors
    with CacheRows(out, spec.num_points, vocabulary.num_classes) as rows:
        for st in data.studies:
            where = f"patient {st.patient} ({st.image_path})"
            try:
                volume, spacing, _ = read_volume(st.image_path)
            except ValueError as err:
                problems.append(f"{err}; patient left out")
                continue
            if volume.shape != (st.n_slices, *st.shape) or not np.allclose(spacing, st.spacing_mm):
                problems.append(f"{where}: volume grid differs from its mask's after "
                                "reorientation; patient left out")  # fmt: skip
                continue
            last = st.n_slices - 1
            picks = [min(max(st.slice_index + d, 0), last) for d in range(-radius, radius + 1)]
            stack = percentile_normalise(
                volume[picks].astype(np.float32), settings.percentiles, radius
            )
            image, scale, pad = letterbox(stack, settings.image_size)
            if not np.isfinite(image).all():
                problems.append(f"{where}: non-finite values after normalisation; left out")
                continue
            points, present, labels = blank_row(spec.num_points, vocabulary.num_classes)
            kept = []
            for k, level in enumerate(spec.point_names):
                p = st.points.get(level)
                if p is None:
                    continue  # reported by the reader
                points[k] = to_cache_coords(np.array([p.x, p.y]), scale, pad)
                present[k] = True
                kept.append(level)
                kind = spec.point_kinds[k]
                for code in st.labels.get(level, ()):  # unlabelled: all False (reported)
                    labels[k, vocabulary.class_index(kind, code)] = True
            rows.add(
                {
                    "study": str(st.patient),
                    "folder": os.path.relpath(st.image_path, data.root),
                    "study_uid": None,
                    "series_uid": None,
                    "series_description": st.series,
                    "instance_uid": None,
                    "index": st.slice_index,
                    "n_slices": st.n_slices,
                    "source": "spider masks",
                    "annotated": bool(kept),
                    "orig_size": list(st.shape),
                    "orig_spacing_mm": list(st.spacing_mm[:2]),
                    "scale": list(scale),
                    "pad": list(pad),
                    "patient": st.patient,
                    "series": st.series,
                    "slice_index": st.slice_index,
                    "levels": kept,
                },
                image,
                points,
                present,
                labels,
            )
    return rows.records, rows.arrays()
