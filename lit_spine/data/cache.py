"""Preprocessing cache: decode each chosen slice once, store training-ready arrays on disk.

`build_cache` turns a folder of DICOM studies plus an annotation file into a folder

```
<cache_dir>/<key>/images.f16     float16 (N, C, S, S) raw, memory-mapped by SpineCache
                 points.npy      float32 (N, P, 2)   [x, y] in cache pixels (centres at integers)
                 present.npy     bool    (N, P)      annotated and inside the image
                 labels.npy      bool    (N, P, num_classes)   multi-hot over vocab.classes
                 spacing_mm.npy  float32 (N, 2)      (row_mm, col_mm) after the resize
                 index.json      settings, shape, per-sample records, problems (written last)
```
(P: the task's points, 11 for tianchi2020.)

Each image is letterboxed: scaled so that its longer side is `image_size` (bilinear,
antialiased), centred, padded with 0; normalised to [0, 1] by the percentile window of the
annotated slice; C = 2 * neighbors + 1 slices ordered along the series normal (the edge slice
repeats at the series ends). The key hashes every file's (path, size, mtime, ctime), the annotation
and series-map bytes, the settings, the vocabulary and `CACHE_FORMAT_VERSION`, so any change
rebuilds; a build goes to `<key>.tmp-<pid>/` and is renamed into place only when complete.
That build (`open_or_build`) and the row writer (`CacheRows`) serve every layout's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lit_spine.data.annotation import StudyAnnotation, load_annotations
from lit_spine.data.dicom import (
    DatasetError,
    DicomFileError,
    PixelReader,
    choose_slice,
    find_annotation,
    find_series_map,
    index_dataset,
    load_series_map,
    unknown_side_file_studies,
)
from lit_spine.data.labels import NUM_POINTS, POINT_INDEX, Vocabulary, get_vocabulary
from lit_spine.utils import atomic_write_json, file_lock, one_line

CACHE_FORMAT_VERSION = 3  # 2: studies without a trustworthy spacing are left out; 3: and those
# whose annotated slice is in the folder but unreadable (never moved onto another slice)
CACHE_DIR_ENV = "LIT_SPINE_CACHE_DIR"
ARRAY_FILES = ("points", "present", "labels", "spacing_mm")


def default_cache_dir() -> Path:
    """`$LIT_SPINE_CACHE_DIR`, else `cache/` under the working directory."""
    return Path(os.environ.get(CACHE_DIR_ENV) or "cache")


class CacheError(RuntimeError):
    """A cache folder is missing, incomplete or from another format version."""


@dataclass(frozen=True)
class CacheSettings:
    """What a cache depends on besides the data: any change builds a new cache."""

    image_size: int = 256
    neighbors: int = 0  # extra slices on each side of the annotated one, as channels
    percentiles: tuple[float, float] = (0.5, 99.5)  # normalisation window

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.neighbors < 0:
            raise ValueError(f"neighbors must be >= 0, got {self.neighbors}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {lo}, {hi}")
        object.__setattr__(self, "percentiles", (float(lo), float(hi)))

    @property
    def channels(self) -> int:
        return 2 * self.neighbors + 1


# ----------------------------------------------------------------------------- image ops


def letterbox(
    stack: np.ndarray, size: int
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize (C, H, W) so the longer side is `size`, centre it on a zero (C, size, size) canvas.

    Returns (image, (scale_y, scale_x), (pad_y, pad_x)). A pixel centre (x, y) of the source
    lands at ``((x + 0.5) * scale_x - 0.5 + pad_x, (y + 0.5) * scale_y - 0.5 + pad_y)``.
    """
    c, h, w = stack.shape
    s = size / max(h, w)
    nh, nw = min(size, max(1, round(h * s))), min(size, max(1, round(w * s)))
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    if (nh, nw) != (h, w):
        t = F.interpolate(
            t[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
        )[0]
    py, px = (size - nh) // 2, (size - nw) // 2
    out = np.zeros((c, size, size), dtype=np.float32)
    out[:, py : py + nh, px : px + nw] = t.numpy()
    return out, (nh / h, nw / w), (py, px)


def percentile_normalise(
    stack: np.ndarray, percentiles: tuple[float, float], ref: int
) -> np.ndarray:
    """Map the [low, high] percentile window of channel `ref` to [0, 1] for all channels, clipped."""
    lo, hi = np.percentile(stack[ref], percentiles)
    scale = 1.0 / max(float(hi - lo), 1e-6)
    return np.clip((stack - lo) * scale, 0.0, 1.0)


def to_cache_coords(xy: np.ndarray, scale: tuple[float, float], pad: tuple[int, int]) -> np.ndarray:
    """Original-image pixel coordinates (..., 2) [x, y] -> cache pixel coordinates."""
    xy = np.asarray(xy, dtype=np.float64)
    sx_sy = np.array([scale[1], scale[0]])
    return (xy + 0.5) * sx_sy - 0.5 + np.array([pad[1], pad[0]])


def from_cache_coords(
    xy: np.ndarray, scale: tuple[float, float], pad: tuple[int, int]
) -> np.ndarray:
    """Cache pixel coordinates (..., 2) [x, y] -> original-image pixel coordinates."""
    xy = np.asarray(xy, dtype=np.float64)
    sx_sy = np.array([scale[1], scale[0]])
    return (xy - np.array([pad[1], pad[0]]) + 0.5) / sx_sy - 0.5


# ----------------------------------------------------------------------------- the cache


class SpineCache:
    """An opened cache: memory-mapped images plus small in-memory arrays and per-sample records.

    `records[i]` holds study, study_uid, series_uid, instance_uid, index, n_slices, source,
    annotated, orig_size [rows, cols], orig_spacing_mm, scale [y, x] and pad [y, x].
    """

    def __init__(self, path: Path, index: dict, images: np.ndarray, arrays: dict[str, np.ndarray]):
        self.path = path
        self.index = index
        self.settings = CacheSettings(
            **{**index["settings"], "percentiles": tuple(index["settings"]["percentiles"])}
        )
        self.vocab = index["vocab"]
        self.images = images
        self.points: np.ndarray = arrays["points"]
        self.present: np.ndarray = arrays["present"]
        self.labels: np.ndarray = arrays["labels"]
        self.spacing_mm: np.ndarray = arrays["spacing_mm"]
        self.records: list[dict] = index["records"]
        self.problems: list[str] = index["problems"]

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"SpineCache({str(self.path)!r}, n={len(self)}, "
            f"images={tuple(self.images.shape)}, vocab={self.vocab!r})"
        )

    @classmethod
    def open(cls, path: str | os.PathLike) -> SpineCache:
        """Open a finished cache folder; raises CacheError naming what is missing or wrong."""
        path = Path(path)
        index_path = path / "index.json"
        hint = f"delete {path} and build the cache again"
        if not index_path.is_file():
            raise CacheError(f"{path}: incomplete cache (no index.json); {hint}")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"{index_path}: unreadable ({err}); {hint}") from None
        if index.get("format_version") != CACHE_FORMAT_VERSION:
            raise CacheError(
                f"{path}: cache format {index.get('format_version')} is not "
                f"{CACHE_FORMAT_VERSION}; {hint}"
            )
        shape = tuple(index["shape"])
        n = shape[0]
        image_path = path / "images.f16"
        expected = int(np.prod(shape)) * 2
        if not image_path.is_file() or image_path.stat().st_size != expected:
            got = image_path.stat().st_size if image_path.is_file() else "missing"
            raise CacheError(f"{image_path}: expected {expected} bytes, found {got}; {hint}")
        images = np.memmap(image_path, dtype=np.float16, mode="r", shape=shape)
        arrays = {}
        for name in ARRAY_FILES:
            try:
                arrays[name] = np.load(path / f"{name}.npy")
            except (OSError, ValueError) as err:
                raise CacheError(f"{path / (name + '.npy')}: unreadable ({err}); {hint}") from None
            if len(arrays[name]) != n:
                raise CacheError(
                    f"{path / (name + '.npy')}: {len(arrays[name])} rows, expected {n}; {hint}"
                )
        if len(index["records"]) != n:
            raise CacheError(f"{index_path}: {len(index['records'])} records, expected {n}; {hint}")
        return cls(path, index, images, arrays)

    def to_original(self, i: int, xy: np.ndarray) -> np.ndarray:
        """Map cache pixel coordinates (..., 2) of sample `i` to its original DICOM pixels."""
        r = self.records[i]
        return from_cache_coords(xy, tuple(r["scale"]), tuple(r["pad"]))


# ----------------------------------------------------------------------------- building


def _file_fingerprints(root: Path) -> list[tuple[str, int, int, int]]:
    """(path, size, mtime, ctime) of every file below `root`, through symlinked folders as
    the indexer reads them (each real folder once). The ctime catches a file rewritten with
    its old size and mtime put back (os.utime, cp -p, rsync -t): no call can set it."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or one folder linked twice
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            rel = p.relative_to(root).as_posix()
            out.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return sorted(out)


def cache_key(
    root: str | os.PathLike,
    settings: CacheSettings,
    annotation: str | os.PathLike | None = None,
    series_map: str | os.PathLike | None = None,
    vocab: str = "tianchi2020",
) -> str:
    """Content hash of everything a cache depends on (files, side files, settings, vocab)."""
    h = hashlib.sha256()
    h.update(f"lit_spine cache v{CACHE_FORMAT_VERSION}\n".encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode() + b"\n")
    h.update(vocab.encode() + b"\n")
    for rel, size, mtime, ctime in _file_fingerprints(Path(root)):
        h.update(f"{rel}\0{size}\0{mtime}\0{ctime}\n".encode())
    for side in (annotation, series_map):
        h.update(b"\0side\0" + (Path(side).read_bytes() if side else b"-"))
    return h.hexdigest()[:20]


def open_existing(final: Path) -> SpineCache | None:
    """The complete cache folder `final`, or None when absent; a damaged one is removed
    (rebuilt, never trusted)."""
    if final.is_dir():
        try:
            return SpineCache.open(final)
        except CacheError:
            shutil.rmtree(final, ignore_errors=True)
    return None


def publish_build(tmp: Path, final: Path, arrays: dict[str, np.ndarray], index: dict) -> None:
    """Save a finished build's arrays, write index.json last (it marks the folder complete)
    and rename `tmp` into place; when another builder finished first with the same key, its
    folder is kept."""
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    atomic_write_json(tmp / "index.json", index, indent=1)
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "index.json").is_file():
            raise


def _remove_stale_builds(cache_dir: Path, key: str) -> None:
    """Drop `<key>.tmp-<pid>` folders left by builders that no longer run."""
    for tmp in cache_dir.glob(f"{key}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def blank_row(num_points: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's points (NaN), present (False) and labels (False), to be filled in."""
    points = np.full((num_points, 2), np.nan, dtype=np.float32)
    return points, np.zeros(num_points, dtype=bool), np.zeros((num_points, num_classes), bool)


def _points_arrays(
    ann: StudyAnnotation | None,
    rows: int,
    cols: int,
    scale,
    pad,
    vocab,
    where: str,
    problems: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points, present, labels = blank_row(NUM_POINTS, vocab.num_classes)
    for p in ann.points if ann is not None else []:
        k = POINT_INDEX[p.identification]
        for code in p.labels:
            labels[k, vocab.class_index(p.kind, code)] = True
        if not (-0.5 <= p.x <= cols - 0.5 and -0.5 <= p.y <= rows - 0.5):
            problems.append(
                f"{where}: point {p.identification} at ({p.x:g}, {p.y:g}) lies "
                f"outside the {cols}x{rows} image; marked not present"
            )
            continue
        points[k] = to_cache_coords(np.array([p.x, p.y]), scale, pad)
        present[k] = True
    return points, present, labels


class CacheRows:
    """The rows of a cache being built: images streamed to `<out>/images.f16`, the arrays of
    `ARRAY_FILES` and the records kept in memory until `arrays()`.

    Shared by every layout's cache. Use it as a context manager: on a normal exit the image
    file is flushed and fsynced, so it is on disk before index.json declares the folder complete.
    """

    def __init__(self, out: Path, num_points: int, num_classes: int) -> None:
        self.num_points, self.num_classes = num_points, num_classes
        self.records: list[dict] = []
        self._cols: dict[str, list[np.ndarray]] = {name: [] for name in ARRAY_FILES}
        self._images = open(out / "images.f16", "wb")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> CacheRows:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._images.flush()
                os.fsync(self._images.fileno())
        finally:
            self._images.close()

    def add(
        self,
        record: dict,
        image: np.ndarray,
        points: np.ndarray,
        present: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        """Append one row; its spacing is the record's `orig_spacing_mm` over its `scale`."""
        row_mm, col_mm = record["orig_spacing_mm"]
        scale_y, scale_x = record["scale"]
        self._images.write(image.astype(np.float16).tobytes())
        self._cols["points"].append(points)
        self._cols["present"].append(present)
        self._cols["labels"].append(labels)
        self._cols["spacing_mm"].append(np.array([row_mm / scale_y, col_mm / scale_x], np.float32))
        self.records.append(record)

    def arrays(self) -> dict[str, np.ndarray]:
        """The stacked arrays of the rows added, by name (empty arrays of the right shape
        when there is none)."""
        if self.records:
            return {name: np.stack(rows) for name, rows in self._cols.items()}
        p, c = self.num_points, self.num_classes
        return {
            "points": np.zeros((0, p, 2), np.float32),
            "present": np.zeros((0, p), bool),
            "labels": np.zeros((0, p, c), bool),
            "spacing_mm": np.zeros((0, 2), np.float32),
        }


def open_or_build(
    cache_dir: Path,
    key: str,
    write_rows: Callable[[Path, list[str]], tuple[list[dict], dict[str, np.ndarray]]],
    *,
    root: str | os.PathLike,
    settings: CacheSettings,
    vocabulary: Vocabulary,
    nothing: str,
    annotation: str | None,
    series_map: str | None = None,
    problems: Iterable[str] = (),
    head: dict | None = None,
) -> SpineCache:
    """Open the cache folder `<cache_dir>/<key>`, building it first if absent or damaged.

    Shared by every layout's cache. Parallel runs wanting the same cache wait on a file lock
    for the first builder, then open its result. `write_rows(out, problems)` writes the rows'
    images into `out` and returns (records, arrays); the `problems` it is given start with
    the ones passed here, and every problem lands once in the index. Without any record it
    raises DatasetError "<root>: <nothing>. Problems: ...". The index holds `head` (e.g. the
    layout and task) after the format version. The build goes to `<key>.tmp-<pid>/` and is
    renamed into place only when complete (index.json last); a damaged folder is rebuilt,
    never trusted.
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
                raise DatasetError(f"{root}: {nothing}. Problems:\n  " + "\n  ".join(problems[:20]))
            size = settings.image_size
            index = {
                "format_version": CACHE_FORMAT_VERSION,
                **(head or {}),
                "key": key,
                "root": str(Path(root).resolve()),
                "annotation": annotation,
                "series_map": series_map,
                "settings": asdict(settings),
                "vocab": vocabulary.name,
                "classes": list(vocabulary.classes),
                "shape": [len(records), settings.channels, size, size],
                "records": records,
                "problems": list(dict.fromkeys(problems)),  # each problem once
            }
            publish_build(tmp, final, arrays, index)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return SpineCache.open(final)


def build_cache(
    root: str | os.PathLike,
    settings: CacheSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    annotation: str | os.PathLike | None = None,
    series_map: str | os.PathLike | None = None,
    vocab: str = "tianchi2020",
    progress: bool = True,
    workers: int | None = None,
) -> SpineCache:
    """Build (or reuse) the cache of `root` for `settings`, and open it.

    `cache_dir` defaults to `default_cache_dir()`; `annotation` / `series_map` default to
    ``<split>_annotation.json`` / ``<split>_series_map.json`` beside ``root = <parent>/<split>``
    when those exist. Studies without an annotation are kept with no points present (test
    splits). Every per-file and per-study issue lands in `SpineCache.problems`; only a missing
    root, a dataset with no usable study or a broken annotation file raises.
    """
    settings = settings or CacheSettings()
    vocabulary = get_vocabulary(vocab)  # an unknown vocabulary fails before any work
    root = Path(root)
    annotation = Path(annotation) if annotation else find_annotation(root)
    series_map = Path(series_map) if series_map else find_series_map(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    return open_or_build(
        Path(cache_dir) if cache_dir else default_cache_dir(),
        cache_key(root, settings, annotation, series_map, vocab),
        lambda out, problems: _write_dataset(
            out, root, annotation, series_map, settings, vocabulary, problems, progress, workers
        ),
        root=root,
        settings=settings,
        vocabulary=vocabulary,
        nothing="no usable study (no T2 sagittal slice could be read)",
        annotation=str(annotation) if annotation else None,
        series_map=str(series_map) if series_map else None,
    )


def _write_dataset(
    out: Path,
    root: Path,
    annotation: Path | None,
    series_map: Path | None,
    settings: CacheSettings,
    vocabulary: Vocabulary,
    problems: list[str],
    progress: bool,
    workers: int | None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Index the studies of `root`, read its side files, then write the cache rows into `out`."""
    annotations = load_annotations(annotation, vocabulary) if annotation else {}
    forced = load_series_map(series_map) if series_map else {}
    studies = index_dataset(root, workers, progress)
    problems += studies.problems
    problems += [f"{s.name}: {p}" for s in studies for p in s.problems]
    problems += unknown_side_file_studies(
        studies, root, annotation, annotations, series_map, forced
    )
    kept, first = [], {}
    for s in studies:  # a copied study folder would count its study twice
        if s.study_uid and s.study_uid in first:
            problems.append(f"{s.name}: StudyInstanceUID {s.study_uid} is also that of "
                            f"{first[s.study_uid]}, which is kept; this folder is left out")  # fmt: skip
            continue
        first.setdefault(s.study_uid, s.name)
        kept.append(s)
    return _write_samples(
        out, root, kept, annotations, forced, settings, vocabulary, problems, progress
    )


def _write_samples(
    out: Path,
    root: Path,
    studies,
    annotations,
    forced,
    settings: CacheSettings,
    vocab,
    problems: list[str],
    progress: bool,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    reader = PixelReader()
    size, radius = settings.image_size, settings.neighbors
    with (
        CacheRows(out, NUM_POINTS, vocab.num_classes) as rows,
        tqdm(
            studies,
            desc=f"caching {root.name}",
            unit="study",
            disable=None if progress else True,
            leave=False,
        ) as bar,
    ):
        for study in bar:
            where = study.name
            ann = annotations.get(study.study_uid) if study.study_uid else None
            choice, _, found = choose_slice(
                study, ann, forced.get(study.study_uid or ""), reader, verify=True
            )
            problems += [f"{where}: {p}" for p in found]
            problems += [f"{where}: annotation: {w}" for w in (ann.warnings if ann else [])]
            if choice is None:
                reader.forget()
                continue
            if choice.header.spacing_mm is None:
                problems.append(
                    f"{where}: study left out: its slice {one_line(choice.header.path)} has no usable "
                    f"pixel spacing ({choice.header.spacing_problem}), so no distance in mm "
                    "could be computed for it"
                )
                reader.forget()
                continue
            try:
                centre = reader(choice.header)
            except DicomFileError as err:  # verified above; kept for a file changed meanwhile
                problems.append(
                    f"{where}: skipped {one_line(err.path)}: {err.reason}; study left out"
                )
                reader.forget()
                continue
            neighbours = choice.series.neighbours(choice.index, radius)
            stack = reader.stack(neighbours, centre, where, problems, "the annotated slice")
            reader.forget()
            n_rows, n_cols = centre.shape
            # Normalise before padding so that the padding stays exactly 0 (= the window's low end).
            stack = percentile_normalise(stack, settings.percentiles, radius)
            image, scale, pad = letterbox(stack, size)
            if not np.isfinite(image).all():  # never train on NaN/inf (decoding checks too)
                problems.append(
                    f"{where}: study left out: {one_line(choice.header.path)} gives non-finite values "
                    "after normalisation"
                )
                continue
            pts, present, labels = _points_arrays(
                ann, n_rows, n_cols, scale, pad, vocab, where, problems
            )
            record = {
                "study": study.name,
                "folder": os.path.relpath(study.folder, root),
                "study_uid": study.study_uid,
                "series_uid": choice.series.uid,
                "series_description": choice.series.description,
                "instance_uid": choice.instance_uid,
                "index": choice.index,
                "n_slices": choice.series.n_slices,
                "source": choice.source,
                "annotated": ann is not None and bool(ann.points),
                "orig_size": [n_rows, n_cols],
                "orig_spacing_mm": list(choice.header.spacing_mm),
                "scale": list(scale),
                "pad": list(pad),
            }
            rows.add(record, image, pts, present, labels)
    return rows.records, rows.arrays()
