"""The phantom in the challenge layout (tianchi2020): splits, studies and annotation files.

``generate_phantom`` writes ``<out>/<split>/study<k>/image<j>.dcm`` and
``<out>/<split>_annotation.json`` for every split (see ``docs/data-format.md``), so that DICOM
reading, series choice, annotation parsing, training and evaluation run unchanged on it.
Rare, harmless annotation quirks of the real data (about 2 % of studies each) are included
(in `study.render_study`): extra ``annotator`` / ``version`` keys, and both ``disc`` and
``vertebra`` keys with one empty. Interrupt safety: a study is written into
``<split>/.tmp-study<k>-<pid>`` and renamed when complete; annotations and the
``.phantom.json`` marker are written atomically, the marker's ``complete`` flag last. A rerun
with the same parameters keeps finished studies and rebuilds the rest; different parameters
are refused unless ``force``. Studies render in worker processes when asked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from lit_spine.data.labels import get_vocabulary
from lit_spine.phantom.study import PhantomStudy, render_study, write_study
from lit_spine.utils import atomic_write_json, file_lock

FORMAT_VERSION = 1
MARKER = ".phantom.json"
DEFAULT_SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}


class PhantomError(RuntimeError):
    """The phantom cannot be written where or as asked."""


def parse_splits(text: str | Mapping[str, float] | None, studies: int) -> dict[str, int]:
    """Study counts per split from 'train=0.7,val=0.15,test=0.15' (fractions) or counts."""
    if text is None:
        spec: Mapping[str, float] = DEFAULT_SPLITS
    elif isinstance(text, str):
        spec = {}
        for part in text.split(","):
            name, eq, value = part.partition("=")
            if not eq or not name.strip():
                raise ValueError(
                    f"--splits: expected name=value pairs, got {part!r} "
                    "(example: train=0.7,val=0.15,test=0.15 or train=80,val=20,test=20)"
                )
            try:
                spec[name.strip()] = float(value)
            except ValueError:
                raise ValueError(
                    f"--splits: {value!r} for split {name.strip()!r} is not a number"
                ) from None
    else:
        spec = dict(text)
    if not spec or any(v < 0 for v in spec.values()):
        raise ValueError(f"splits must be non-negative and not empty, got {spec}")
    for name in spec:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid split name {name!r}")
    values = list(spec.values())
    if all(float(v).is_integer() for v in values) and sum(values) > 1.0 + 1e-9:
        counts = {k: int(v) for k, v in spec.items()}
        if studies is not None and sum(counts.values()) != studies:
            raise ValueError(
                f"split counts {counts} add up to {sum(counts.values())}, "
                f"not --studies {studies}; give fractions or matching counts"
            )
        return counts
    total = sum(values)
    if total <= 0:
        raise ValueError(f"split fractions add up to 0: {spec}")
    raw = [studies * v / total for v in values]
    counts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: studies - sum(counts)]:
        counts[i] += 1
    return dict(zip(spec, counts))


def _params(studies, seed, counts, vocab, size, difficulty) -> dict:
    return {
        "format": FORMAT_VERSION,
        "studies": int(studies),
        "seed": int(seed),
        "splits": counts,
        "vocab": vocab,
        "size": size,
        "difficulty": float(difficulty),
    }


def _study_complete(folder: Path, st: PhantomStudy) -> bool:
    """A study folder is complete when it holds the expected files of the expected study."""
    import pydicom

    if not folder.is_dir():
        return False
    names = sorted(p.name for p in folder.iterdir())
    if names != sorted(st.file_names):
        return False
    try:
        ds = pydicom.dcmread(
            folder / st.file_names[0], stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
        )
    except Exception:  # noqa: BLE001 - any unreadable file means "rebuild"
        return False
    return str(ds.get("StudyInstanceUID", "")) == st.study.uid


def _job(args) -> dict:
    root, split, index, seed, vocab, size, difficulty = args
    st = render_study(seed, split, index, vocab, size, difficulty)
    final = Path(root) / split / f"study{index}"
    tmp = Path(root) / split / f".tmp-study{index}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_study(st, tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {"split": split, "index": index}


def _check_unmarked(root: Path, counts, seed, vocab, size, difficulty) -> None:
    """A folder without the marker (a phantom whose marker was lost) is finished only if all
    in it is the phantom's: its split folders hold only studies of these parameters (a file of
    each carries the StudyInstanceUID the phantom gives it) beside its annotation files. A
    user's own dataset in this layout has the same names but other UIDs: it is refused, never
    overwritten."""
    bad = []
    for split, n in counts.items():
        ann = root / f"{split}_annotation.json"
        if ann.exists():  # the phantom's holds exactly its studies' entries
            want = [render_study(seed, split, i, vocab, size, difficulty, pixels=False).annotation
                    for i in range(n)]  # fmt: skip
            try:
                same = json.loads(ann.read_text()) == json.loads(json.dumps(want))
            except (OSError, ValueError):
                same = False
            if not same:
                bad.append(ann.name)
        folder = root / split
        for study in sorted(folder.iterdir()) if folder.is_dir() else []:
            if study.name.startswith("."):
                continue  # a temporary folder of an interrupted run
            k = study.name[len("study") :] if study.name.startswith("study") else ""
            uid = (
                render_study(seed, split, int(k), vocab, size, difficulty, pixels=False).study.uid
                if k.isdigit() and int(k) < n
                else None
            )
            if uid is None or not _carries_study_uid(study, uid):
                bad.append(f"{split}/{study.name}")
    if bad:
        raise PhantomError(
            f"{root} has no {MARKER} and holds files the phantom did not write "
            f"({', '.join(bad[:5])}); choose an empty --out, or pass --force to write into it "
            "anyway"
        )


def _carries_study_uid(folder: Path, uid: str) -> bool:
    """Whether the first readable DICOM file below `folder` has StudyInstanceUID `uid`."""
    import pydicom

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - an unreadable file: look at the next one
            continue
        return str(ds.get("StudyInstanceUID", "")) == uid
    return False


def _check_root(root: Path, params: dict, counts: Mapping[str, int], force: bool) -> dict | None:
    """Validate the output folder; returns the existing marker or None. Clears it under `force`."""
    marker_path = root / MARKER
    marker = None
    if marker_path.exists():
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, json.JSONDecodeError):
            marker = {"params": None}
    ours = set(counts) | {f"{s}_annotation.json" for s in counts} | {"preview.png", MARKER}
    foreign = [p.name for p in root.iterdir() if p.name not in ours] if root.is_dir() else []
    if marker is not None and marker.get("params") != params:
        if not force:
            raise PhantomError(
                f"{root} holds a phantom made with other parameters ({marker.get('params')}); "
                f"asked for {params}. Use another --out, or --force to replace it."
            )
    elif marker is None and foreign and not force:
        raise PhantomError(
            f"{root} is not empty and was not written by the phantom "
            f"(found {', '.join(sorted(foreign)[:5])}); choose an empty --out "
            "or pass --force to write into it anyway."
        )
    if force and marker is not None and marker.get("params") != params:
        prev = (marker.get("params") or {}).get("splits") or {}
        for split in set(prev) | set(counts):
            shutil.rmtree(root / split, ignore_errors=True)
            (root / f"{split}_annotation.json").unlink(missing_ok=True)
        marker_path.unlink(missing_ok=True)
        (root / "preview.png").unlink(missing_ok=True)
        marker = None
    return marker


def generate_phantom(
    out: str | os.PathLike,
    studies: int = 120,
    seed: int = 0,
    splits: Mapping[str, float] | str | None = None,
    vocab: str = "tianchi2020",
    size: int | None = None,
    difficulty: float = 1.0,
    progress: bool = False,
    workers: int = 1,
    force: bool = False,
) -> Path:
    """Write (or finish) a phantom dataset under `out`; returns `out` as a Path.

    `splits` gives fractions (``{"train": 0.7, ...}``) or counts (``{"train": 8, ...}``) of the
    `studies`; the default is train/val/test 70/15/15 %. A complete phantom with the same
    parameters is returned at once; an interrupted one is finished.
    """
    get_vocabulary(vocab)
    if studies < 1:
        raise ValueError(f"studies must be at least 1, got {studies}")
    if size is not None and not 64 <= int(size) <= 2048:
        raise ValueError(f"size must be between 64 and 2048 px, got {size}")
    if not 0.0 <= difficulty <= 3.0:
        raise ValueError(
            f"difficulty must be in [0, 3] (0 easy, 1 default, 2 hard), got {difficulty}"
        )
    counts = parse_splits(splits, studies)
    root = Path(out).expanduser()
    # Processes that want the same phantom (parallel sweep runs) build it once, in turn.
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        return _generate_locked(
            root, studies, counts, seed, vocab, size, difficulty, workers, force, progress
        )


def _generate_locked(
    root, studies, counts, seed, vocab, size, difficulty, workers, force, progress
) -> Path:
    params = _params(studies, seed, counts, vocab, size, difficulty)
    if root.is_dir() and not (root / MARKER).exists() and not force:
        _check_unmarked(root, counts, seed, vocab, size, difficulty)
    marker = _check_root(root, params, counts, force)
    if (
        marker is not None
        and marker.get("complete")
        and all((root / s / f"study{i}").is_dir() for s, n in counts.items() for i in range(n))
        and all((root / f"{s}_annotation.json").exists() for s in counts)
    ):
        return root
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MARKER, {"params": params, "complete": False})
    todo, entries = [], {s: [None] * n for s, n in counts.items()}
    for split, n in counts.items():
        (root / split).mkdir(exist_ok=True)
        for leftover in (root / split).glob(".tmp-study*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for i in range(n):
            st = render_study(seed, split, i, vocab, size, difficulty, pixels=False)
            entries[split][i] = st.annotation
            if not _study_complete(root / split / f"study{i}", st):
                todo.append((str(root), split, i, seed, vocab, size, difficulty))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"phantom -> {root}", unit="study", disable=not progress)
    try:
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                for _ in pool.imap_unordered(_job, todo, chunksize=1):
                    bar.update()
        else:
            for job in todo:
                _job(job)
                bar.update()
    finally:
        bar.close()
    for split in counts:
        atomic_write_json(root / f"{split}_annotation.json", entries[split], indent=None)
    atomic_write_json(root / MARKER, {"params": params, "complete": True})
    return root
