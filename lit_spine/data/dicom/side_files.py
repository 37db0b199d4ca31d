"""The JSON files beside a split folder: annotation and series map.

``<parent>/<split>_annotation.json`` and ``<parent>/<split>_series_map.json`` for
``root = <parent>/<split>``; `load_series_map` reads a series map with errors naming the
file and entry, and `unknown_annotation_studies` lists annotated studies with no folder
(`unknown_side_file_studies`: those of both side files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lit_spine.data.dicom.series import Study


def find_side_file(root: str | os.PathLike, kind: str) -> Path | None:
    """``<parent>/<split>_<kind>.json`` for ``root = <parent>/<split>``, when it exists."""
    root = Path(root).resolve()
    candidate = root.parent / f"{root.name}_{kind}.json"
    return candidate if candidate.is_file() else None


def find_annotation(root: str | os.PathLike) -> Path | None:
    """The split's annotation file beside `root` (``<split>_annotation.json``), if any."""
    return find_side_file(root, "annotation")


def find_series_map(root: str | os.PathLike) -> Path | None:
    """The split's series map beside `root` (``<split>_series_map.json``), if any."""
    return find_side_file(root, "series_map")


def load_series_map(path: str | os.PathLike) -> dict[str, str]:
    """Read ``[{"studyUid": ..., "seriesUid": ...}]`` into {study uid: series uid}."""
    from lit_spine.data.annotation import AnnotationError

    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(obj, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{studyUid, seriesUid}} objects")
    out: dict[str, str] = {}
    for i, item in enumerate(obj):
        if not isinstance(item, dict) or not item.get("studyUid") or not item.get("seriesUid"):
            raise AnnotationError(f"{path}: entry {i} needs 'studyUid' and 'seriesUid'")
        out[str(item["studyUid"])] = str(item["seriesUid"])
    return out


def unknown_annotation_studies(
    studies: Iterable[Study], annotated_uids: Iterable[str], root: str | os.PathLike, what: str
) -> list[str]:
    """Problems for annotation (or series map) studies that match no study folder under root."""
    found = {s.study_uid for s in studies}
    return [
        f"{what} names study {uid}, which matches no study folder under {root} "
        "(studies are matched by StudyInstanceUID)"
        for uid in annotated_uids
        if uid not in found
    ]


def unknown_side_file_studies(
    studies: Iterable[Study],
    root: str | os.PathLike,
    annotation: str | os.PathLike | None,
    annotated_uids: Iterable[str],
    series_map: str | os.PathLike | None,
    mapped_uids: Iterable[str],
) -> list[str]:
    """`unknown_annotation_studies` of the annotation, then of the series map (each if any)."""
    problems = []
    if annotation:
        problems += unknown_annotation_studies(
            studies, annotated_uids, root, f"annotation {annotation}"
        )
    if series_map:
        problems += unknown_annotation_studies(
            studies, mapped_uids, root, f"series map {series_map}"
        )
    return problems
