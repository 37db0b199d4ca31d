"""Preprocessing cache of the RSNA 2024 layout: the same folder format as `data/cache.py`.

`build_rsna2024_cache` reads the layout with `data/rsna.py` and writes one cache row per
(study, labelled instance): the network input is the slice stack centred on an instance that
the coordinates file names, and a level is present only in the row of its own instance
(docs/datasets.md, "Network input"). A level whose point lies on another instance of the
series is not present in that row, never moved onto it. The arrays, image normalisation and
letterboxing are those of the 2020 cache (`letterbox`, `percentile_normalise`,
`to_cache_coords`), so `SpineCache.open`, `SpineDataset` and the k-fold split read it as
they read a 2020 cache. Records carry `study_id`, `series_id`, `instance_number` and
`levels` besides the 2020 fields.

The key hashes the three CSV files, every file of the chosen series (path, size, mtime), the
settings, task, vocabulary and `RSNA_CACHE_VERSION`; a build goes to `<key>.tmp-<pid>/` and
is renamed into place only when complete. A study whose series cannot be read is reported
in `problems` and left out; only a dataset without any usable study raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lit_spine.data.cache import (
    ARRAY_FILES,
    CACHE_FORMAT_VERSION,
    CacheSettings,
    SpineCache,
    _file_fingerprints,
    _remove_stale_builds,
    default_cache_dir,
    letterbox,
    open_existing,
    percentile_normalise,
    publish_build,
    to_cache_coords,
)
from lit_spine.data.dicom import DatasetError, DicomFileError, PixelReader, index_study
from lit_spine.data.rsna import (
    COORDS_CSV,
    GRADES_CSV,
    IMAGES_DIR,
    SERIES_CSV,
    RsnaDataset,
    RsnaStudy,
    read_rsna2024,
)
from lit_spine.task import Task, get_task
from lit_spine.utils import file_lock, one_line

RSNA_CACHE_VERSION = 1


def rsna_cache_key(data: RsnaDataset, settings: CacheSettings, task: str, vocab: str) -> str:
    """Content hash of the CSVs, the chosen series' files, the settings, task and vocabulary."""
    h = hashlib.sha256()
    h.update(f"lit_spine rsna2024 cache v{CACHE_FORMAT_VERSION}.{RSNA_CACHE_VERSION}\n".encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode() + b"\n")
    h.update(f"{task}\0{vocab}\n".encode())
    for name in (SERIES_CSV, COORDS_CSV, GRADES_CSV):
        h.update(b"\0csv\0" + (data.root / name).read_bytes())
    for st in data.studies:
        folder = data.root / IMAGES_DIR / str(st.study_id) / str(st.series_id)
        h.update(f"\0series\0{st.study_id}/{st.series_id}\n".encode())
        for rel, size, mtime in _file_fingerprints(folder):
            h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:20]


def build_rsna2024_cache(
    root: str | os.PathLike,
    settings: CacheSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    task: str = "rsna2024_canal",
    vocab: str | None = None,
    progress: bool = True,
) -> SpineCache:
    """Build (or reuse) the cache of the RSNA 2024 tree under `root`, and open it."""
    settings = settings or CacheSettings()
    spec = get_task(task)
    vocabulary = spec.vocabulary(vocab)
    data = read_rsna2024(root, spec.name)
    if not data.studies:
        raise DatasetError(
            f"{root}: no usable rsna2024 study for task {spec.name!r}. Problems:\n  "
            + "\n  ".join(data.problems[:20])
        )
    return open_or_build_task_cache(
        cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
        key=rsna_cache_key(data, settings, spec.name, vocabulary.name),
        fmt="rsna2024",
        root=root,
        annotation=Path(root) / COORDS_CSV,
        task=spec,
        vocabulary=vocabulary,
        settings=settings,
        problems=data.problems,
        write_rows=lambda out, problems: _write_rows(
            out, data, settings, vocabulary, problems, progress
        ),
        what="rsna2024 study",
    )


def open_or_build_task_cache(
    *,
    cache_dir: Path,
    key: str,
    fmt: str,
    root: str | os.PathLike,
    annotation: Path,
    task: Task,
    vocabulary,
    settings: CacheSettings,
    problems: list[str],
    write_rows,
    what: str,
) -> SpineCache:
    """Open the cache folder `<cache_dir>/<key>` of a task layout, building it first if absent.

    Shared by the rsna2024 and spider caches. `write_rows(out, problems)` writes the rows'
    images into `out` and returns (records, arrays); problems it appends are kept in the
    index. The build goes to `<key>.tmp-<pid>/` and is renamed into place only when complete
    (index.json last); a damaged folder is rebuilt, never trusted.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / f".{key}.lock"):
        final = cache_dir / key
        if (cache := open_existing(final)) is not None:
            return cache
        _remove_stale_builds(cache_dir, key)
        tmp = cache_dir / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            problems = list(problems)
            records, arrays = write_rows(tmp, problems)
            if not records:
                raise DatasetError(
                    f"{root}: no {what} could be read. Problems:\n  " + "\n  ".join(problems[:20])
                )
            size = settings.image_size
            index = {
                "format_version": CACHE_FORMAT_VERSION,
                "format": fmt,
                "task": task.name,
                "key": key,
                "root": str(Path(root).resolve()),
                "annotation": str(annotation),
                "series_map": None,
                "settings": asdict(settings),
                "vocab": vocabulary.name,
                "classes": list(vocabulary.classes),
                "shape": [len(records), settings.channels, size, size],
                "records": records,
                "problems": list(dict.fromkeys(problems)),
            }
            publish_build(tmp, final, arrays, index)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return SpineCache.open(final)


def _write_rows(
    out: Path,
    data: RsnaDataset,
    settings: CacheSettings,
    vocabulary,
    problems: list[str],
    progress: bool,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    spec = data.task
    n_points, n_classes = spec.num_points, vocabulary.num_classes
    records: list[dict] = []
    cols: dict[str, list[np.ndarray]] = {name: [] for name in ARRAY_FILES}
    with (
        open(out / "images.f16", "wb") as images,
        tqdm(
            data.studies,
            desc="caching rsna2024",
            unit="study",
            leave=False,
            disable=None if progress else True,
        ) as bar,  # fmt: skip
    ):
        for st in bar:
            for rec, image, pts, present, labels, spacing in _study_rows(
                data.root, spec, st, settings, vocabulary, problems
            ):
                images.write(image.astype(np.float16).tobytes())
                cols["points"].append(pts)
                cols["present"].append(present)
                cols["labels"].append(labels)
                cols["spacing_mm"].append(spacing)
                records.append(rec)
        images.flush()
        os.fsync(images.fileno())
    empty = {
        "points": np.zeros((0, n_points, 2), np.float32),
        "present": np.zeros((0, n_points), bool),
        "labels": np.zeros((0, n_points, n_classes), bool),
        "spacing_mm": np.zeros((0, 2), np.float32),
    }
    arrays = {k: np.stack(v) if records else empty[k] for k, v in cols.items()}
    return records, arrays


def _study_rows(
    root: Path, spec: Task, st: RsnaStudy, settings: CacheSettings, vocabulary, problems
):
    """Yield (record, image, points, present, labels, spacing) per labelled instance of a study."""
    where = f"study {st.study_id} series {st.series_id}"
    folder = root / IMAGES_DIR / str(st.study_id) / str(st.series_id)
    study = index_study(folder)
    problems += [f"{where}: {p}" for p in study.problems]
    by_instance: dict[int, list[str]] = {}
    for level, point in st.points.items():
        by_instance.setdefault(point.instance_number, []).append(level)
    reader = PixelReader()
    radius = settings.neighbors
    for inst in sorted(by_instance):
        levels = by_instance[inst]
        found = [
            (s, i)
            for s in study.series
            for i, h in enumerate(s.slices)
            if h.instance_number == inst and Path(h.path).name == f"{inst}.dcm"
        ]
        if len(found) != 1:
            problems.append(
                f"{where}: instance {inst} ({', '.join(levels)}) is "
                f"{'not a readable slice' if not found else 'found in several series'} "
                f"of {one_line(folder)}; those levels are left out"
            )
            continue
        series, index = found[0]
        header = series.slices[index]
        if header.spacing_mm is None:
            problems.append(
                f"{where}: instance {inst} left out: {one_line(header.path)} has no usable "
                f"pixel spacing ({header.spacing_problem}), so no distance in mm could be "
                "computed for it"
            )
            continue
        try:
            centre = reader(header)
        except DicomFileError as err:
            problems.append(f"{where}: skipped {one_line(err.path)}: {err.reason}; "
                            f"levels {', '.join(levels)} left out")  # fmt: skip
            continue
        stack = []
        for h in series.neighbours(index, radius):
            try:
                arr = reader(h)
            except DicomFileError as err:
                problems.append(f"{where}: skipped {one_line(err.path)}: {err.reason}; "
                                "the labelled instance stands in")  # fmt: skip
                arr = centre
            if arr.shape != centre.shape:
                problems.append(
                    f"{where}: neighbour {one_line(h.path)} is {arr.shape[1]}x{arr.shape[0]}, "
                    f"not {centre.shape[1]}x{centre.shape[0]}; the labelled instance stands in"
                )
                arr = centre
            stack.append(arr)
        rows, ncols = centre.shape
        stack = percentile_normalise(np.stack(stack), settings.percentiles, radius)
        image, scale, pad = letterbox(stack, settings.image_size)
        if not np.isfinite(image).all():
            problems.append(f"{where}: instance {inst} left out: non-finite values after "
                            "normalisation")  # fmt: skip
            continue
        points = np.full((spec.num_points, 2), np.nan, dtype=np.float32)
        present = np.zeros(spec.num_points, dtype=bool)
        labels = np.zeros((spec.num_points, vocabulary.num_classes), dtype=bool)
        kept = []
        for level in levels:
            p = st.points[level]
            k = spec.point_index[level]
            if not (-0.5 <= p.x <= ncols - 0.5 and -0.5 <= p.y <= rows - 0.5):
                problems.append(
                    f"{where}: {level} at ({p.x:g}, {p.y:g}) on instance {inst} lies outside "
                    f"the {ncols}x{rows} image; marked not present"
                )
                continue
            points[k] = to_cache_coords(np.array([p.x, p.y]), scale, pad)
            present[k] = True
            kept.append(level)
            grade = st.grades.get(level)
            if grade is not None:  # missing grades stay all False (reported by the reader)
                kind = spec.point_kinds[k]
                labels[k, vocabulary.class_index(kind, vocabulary.codes(kind)[grade])] = True
        row_mm, col_mm = header.spacing_mm
        record = {
            "study": str(st.study_id),
            "folder": os.path.relpath(folder, root),
            "study_uid": study.study_uid,
            "series_uid": series.uid,
            "series_description": series.description,
            "instance_uid": header.instance_uid,
            "index": index,
            "n_slices": series.n_slices,
            "source": "rsna2024 coordinates",
            "annotated": bool(kept),
            "orig_size": [rows, ncols],
            "orig_spacing_mm": [row_mm, col_mm],
            "scale": list(scale),
            "pad": list(pad),
            "study_id": st.study_id,
            "series_id": st.series_id,
            "instance_number": inst,
            "levels": kept,
        }
        spacing = np.array([row_mm / scale[0], col_mm / scale[1]], np.float32)
        yield record, image, points, present, labels, spacing
    reader.forget()
