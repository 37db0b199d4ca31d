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

The key hashes the three CSV files, every file of the chosen series (path, size, mtime, ctime), the
settings, task, vocabulary and `RSNA_CACHE_VERSION`; a build goes to `<key>.tmp-<pid>/` and
is renamed into place only when complete. A study whose series cannot be read is reported
in `problems` and left out; only a dataset without any usable study raises.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lit_spine.data.cache import (
    CACHE_FORMAT_VERSION,
    CacheRows,
    CacheSettings,
    SpineCache,
    _file_fingerprints,
    blank_row,
    default_cache_dir,
    letterbox,
    open_or_build,
    percentile_normalise,
    to_cache_coords,
)
from lit_spine.data.dicom import (
    DatasetError,
    DicomFileError,
    PixelReader,
    index_study,
    read_header,
)
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
from lit_spine.utils import one_line

RSNA_CACHE_VERSION = 2  # 2: the file the coordinates name is read; first train.csv row wins


def rsna_cache_key(data: RsnaDataset, settings: CacheSettings, task: str, vocab: str) -> str:
    """Content hash of the CSVs, the chosen series' files, the settings, task and vocabulary."""
    h = task_cache_hash("rsna2024", RSNA_CACHE_VERSION, settings, task, vocab)
    for name in (SERIES_CSV, COORDS_CSV, GRADES_CSV):
        h.update(b"\0csv\0" + (data.root / name).read_bytes())
    for st in data.studies:
        folder = data.root / IMAGES_DIR / str(st.study_id) / str(st.series_id)
        h.update(f"\0series\0{st.study_id}/{st.series_id}\n".encode())
        for rel, size, mtime, ctime in _file_fingerprints(folder):
            h.update(f"{rel}\0{size}\0{mtime}\0{ctime}\n".encode())
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
    return build_task_cache(
        root,
        settings,
        cache_dir,
        task,
        vocab,
        fmt="rsna2024",
        read=read_rsna2024,
        key=rsna_cache_key,
        annotation=COORDS_CSV,
        write_rows=partial(_write_rows, progress=progress),
        usable="rsna2024 study",
        readable="rsna2024 study",
    )


def task_cache_hash(
    what: str, version: int, settings: CacheSettings, task: str, vocab: str
) -> hashlib._Hash:
    """A sha256 holding what every task layout's cache key starts with: the layout `what`, its
    cache `version` (after `CACHE_FORMAT_VERSION`), the settings, task and vocabulary."""
    h = hashlib.sha256()
    h.update(f"lit_spine {what} cache v{CACHE_FORMAT_VERSION}.{version}\n".encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode() + b"\n")
    h.update(f"{task}\0{vocab}\n".encode())
    return h


def build_task_cache(
    root: str | os.PathLike,
    settings: CacheSettings | None,
    cache_dir: str | os.PathLike | None,
    task: str,
    vocab: str | None,
    *,
    fmt: str,
    read: Callable[[str | os.PathLike, str], Any],
    key: Callable[[Any, CacheSettings, str, str], str],
    annotation: str,
    write_rows: Callable[..., tuple[list[dict], dict[str, np.ndarray]]],
    usable: str,
    readable: str,
) -> SpineCache:
    """Build (or reuse) the cache of the task layout `fmt` under `root`, and open it.

    Shared by the rsna2024 and spider caches. `read(root, task)` reads the layout (its
    `studies` and `problems`; none of the former raises DatasetError "no usable <usable>"),
    `key(data, settings, task, vocab)` hashes it, and `write_rows(out, data, settings,
    vocabulary, problems)` writes its rows into `out` and returns (records, arrays); problems
    it appends are kept in the index; without any row it raises "no <readable> could be read".
    `annotation` names the file under `root` recorded as the annotation. The lock, the build
    in `<key>.tmp-<pid>/` and the index are `data.cache.open_or_build`'s.
    """
    settings = settings or CacheSettings()
    spec = get_task(task)
    vocabulary = spec.vocabulary(vocab)
    data = read(root, spec.name)
    if not data.studies:
        raise DatasetError(
            f"{root}: no usable {usable} for task {spec.name!r}. Problems:\n  "
            + "\n  ".join(data.problems[:20])
        )
    return open_or_build(
        Path(cache_dir) if cache_dir else default_cache_dir(),
        key(data, settings, spec.name, vocabulary.name),
        lambda out, problems: write_rows(out, data, settings, vocabulary, problems),
        root=root,
        settings=settings,
        vocabulary=vocabulary,
        nothing=f"no {readable} could be read",
        annotation=str(Path(root) / annotation),
        problems=data.problems,
        head={"format": fmt, "task": spec.name},
    )


def _write_rows(
    out: Path,
    data: RsnaDataset,
    settings: CacheSettings,
    vocabulary,
    problems: list[str],
    progress: bool,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    with (
        CacheRows(out, data.task.num_points, vocabulary.num_classes) as rows,
        tqdm(
            data.studies,
            desc="caching rsna2024",
            unit="study",
            leave=False,
            disable=None if progress else True,
        ) as bar,  # fmt: skip
    ):
        for st in bar:
            for row in _study_rows(data.root, data.task, st, settings, vocabulary, problems):
                rows.add(*row)
    return rows.records, rows.arrays()


def locate_instances(root: Path, st: RsnaStudy, problems: list[str]) -> tuple[Path, Any, list]:
    """(series folder, its indexed `Study`, the labelled instances usable as far as the headers
    tell) of one study: per instance number (levels on it, levels inside the image, series,
    index, header), in instance order. Read from headers only (`lit-spine inspect` runs it
    too); what is left out or doubtful goes to `problems`.

    The file is the one the coordinates name (`<instance_number>.dcm`, as the competition names
    its files): a different InstanceNumber tag is reported and the file still read; a file the
    indexer dropped as a duplicate SOPInstanceUID of another file is read itself, at that
    copy's place in the series."""
    where = f"study {st.study_id} series {st.series_id}"
    folder = root / IMAGES_DIR / str(st.study_id) / str(st.series_id)
    study = index_study(folder)
    problems += [f"{where}: {p}" for p in study.problems]
    by_instance: dict[int, list[str]] = {}
    for level, point in st.points.items():
        by_instance.setdefault(point.instance_number, []).append(level)
    located = []
    for inst, levels in sorted(by_instance.items()):
        named, what = folder / f"{inst}.dcm", f"instance {inst} ({', '.join(levels)})"
        found = [
            (s, i) for s in study.series for i, h in enumerate(s.slices) if Path(h.path) == named
        ]
        header = found[0][0].slices[found[0][1]] if len(found) == 1 else None
        if not found:  # unreadable, or dropped as a duplicate of another file's SOPInstanceUID
            reason = study.unreadable.get(str(named))
            if reason is None:
                try:
                    header = read_header(named)
                except DicomFileError as err:
                    reason = err.reason
            if reason is not None:
                problems.append(f"{where}: {what}: {one_line(named)} cannot be read "
                                f"({reason}); those levels are left out")  # fmt: skip
                continue
            found = [
                (s, i) for s in study.series if (i := s.index_of(header.instance_uid)) is not None
            ]
            if found:
                copy = found[0][0].slices[found[0][1]].path
                problems.append(f"{where}: {what}: {named.name} and {one_line(copy)} share "
                                f"SOPInstanceUID {header.instance_uid}; {named.name}, the file "
                                "the coordinates name, is read")  # fmt: skip
        if len(found) != 1:
            problems.append(
                f"{where}: {what} is {'not a slice' if not found else 'found in several series'} "
                f"of {one_line(folder)}; those levels are left out"
            )
            continue
        if header.instance_number != inst:
            tag = header.instance_number
            tag = "no InstanceNumber" if tag is None else f"InstanceNumber {tag}"
            problems.append(f"{where}: {what}: {named.name} has {tag}; the file the "
                            "coordinates name is read")  # fmt: skip
        if header.spacing_mm is None:
            problems.append(
                f"{where}: instance {inst} left out: {one_line(header.path)} has no usable "
                f"pixel spacing ({header.spacing_problem}), so no distance in mm could be "
                "computed for it"
            )
            continue
        inside = []
        for level in levels:
            p = st.points[level]
            if -0.5 <= p.x <= header.cols - 0.5 and -0.5 <= p.y <= header.rows - 0.5:
                inside.append(level)
            else:
                problems.append(
                    f"{where}: {level} at ({p.x:g}, {p.y:g}) on instance {inst} lies outside "
                    f"the {header.cols}x{header.rows} image; marked not present"
                )
        located.append((inst, levels, inside, found[0][0], found[0][1], header))
    return folder, study, located


def _study_rows(
    root: Path, spec: Task, st: RsnaStudy, settings: CacheSettings, vocabulary, problems
):
    """Yield (record, image, points, present, labels) per labelled instance of a study."""
    where = f"study {st.study_id} series {st.series_id}"
    folder, study, located = locate_instances(root, st, problems)
    reader = PixelReader()
    radius = settings.neighbors
    for inst, levels, inside, series, index, header in located:
        try:
            centre = reader(header)
        except DicomFileError as err:
            problems.append(f"{where}: skipped {one_line(err.path)}: {err.reason}; "
                            f"levels {', '.join(levels)} left out")  # fmt: skip
            continue
        neighbours = series.neighbours(index, radius)
        stack = reader.stack(neighbours, centre, where, problems, "the labelled instance")
        rows, ncols = centre.shape
        stack = percentile_normalise(stack, settings.percentiles, radius)
        image, scale, pad = letterbox(stack, settings.image_size)
        if not np.isfinite(image).all():
            problems.append(f"{where}: instance {inst} left out: non-finite values after "
                            "normalisation")  # fmt: skip
            continue
        points, present, labels = blank_row(spec.num_points, vocabulary.num_classes)
        kept = []
        for level in inside:
            p = st.points[level]
            k = spec.point_index[level]
            points[k] = to_cache_coords(np.array([p.x, p.y]), scale, pad)
            present[k] = True
            kept.append(level)
            grade = st.grades.get(level)
            if grade is not None:  # missing grades stay all False (reported by the reader)
                kind = spec.point_kinds[k]
                labels[k, vocabulary.class_index(kind, vocabulary.codes(kind)[grade])] = True
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
            "orig_spacing_mm": list(header.spacing_mm),
            "scale": list(scale),
            "pad": list(pad),
            "study_id": st.study_id,
            "series_id": st.series_id,
            "instance_number": inst,
            "levels": kept,
        }
        yield record, image, points, present, labels
    reader.forget()
