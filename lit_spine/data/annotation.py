"""Annotation files of the spine dataset: parse them (with real-data quirks), write them.

Schema (see README "Data format"): a JSON list with one object per study,
``{"studyUid", "data": [{"seriesUid", "instanceUid", "annotation": [{"data": {"point": [
{"coord": [x, y], "tag": {"identification": "L1", "vertebra": "v2"}, "zIndex": 6}, ...]}}]}]}``.
Prediction files use the same schema with an optional per-point ``"score"`` in [0, 1].
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lit_spine.data.labels import POINT_INDEX, Vocabulary, get_vocabulary, point_type
from lit_spine.utils import atomic_write_json


class AnnotationError(ValueError):
    """An annotation or prediction file cannot be used as it is."""


@dataclass(frozen=True)
class Point:
    """One annotated (or predicted) keypoint: pixel coordinates of the original image."""

    identification: str
    x: float
    y: float
    labels: tuple[str, ...]
    score: float | None = None
    z_index: int | None = None

    @property
    def kind(self) -> str:
        """'disc' or 'vertebra'."""
        return point_type(self.identification)


@dataclass
class StudyAnnotation:
    """The annotated image of one study and its points."""

    study_uid: str
    series_uid: str | None
    instance_uid: str | None
    points: list[Point] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _tag_labels(tag: dict, kind: str, vocab: Vocabulary, where: str) -> tuple[str, ...]:
    # Real files sometimes carry both keys with one empty; the key of the point's own type wins.
    text = tag.get(kind)
    if text is None:
        other = "vertebra" if kind == "disc" else "disc"
        text = tag.get(other, "")
    if not isinstance(text, str):
        raise AnnotationError(f"{where}: disease {text!r} is not a string")
    try:
        return vocab.parse(kind, text)
    except ValueError as err:
        raise AnnotationError(
            f"{where}: {err}. Check the file's vocabulary (--vocab tianchi2020 or seed7)."
        ) from None


def parse_annotations(
    obj: object,
    vocab: str | Vocabulary = "tianchi2020",
    source: str = "<annotation>",
    predictions: bool = False,
) -> dict[str, StudyAnnotation]:
    """Parse an already-loaded annotation/prediction JSON object into studies keyed by study UID.

    Unknown identifications (such as 'T11-T12') are kept out of the points and reported in
    the study's `warnings`; unknown keys are ignored. Malformed structure, coordinates,
    disease codes or scores raise `AnnotationError` naming the file, study and point.
    """
    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    if not isinstance(obj, list):
        raise AnnotationError(
            f"{source}: expected a JSON list of studies, got {type(obj).__name__}"
        )
    studies: dict[str, StudyAnnotation] = {}
    for s_i, entry in enumerate(obj):
        if not isinstance(entry, dict) or "studyUid" not in entry:
            raise AnnotationError(f"{source}: entry {s_i} has no 'studyUid'")
        study_uid = str(entry["studyUid"])
        data = entry.get("data") or []
        if not isinstance(data, list):
            raise AnnotationError(f"{source}: study {study_uid}: 'data' must be a list")
        study = studies.get(study_uid) or StudyAnnotation(study_uid, None, None)
        for d in data:
            if not isinstance(d, dict):
                raise AnnotationError(
                    f"{source}: study {study_uid}: 'data' entries must be objects"
                )
            study.series_uid = study.series_uid or d.get("seriesUid")
            study.instance_uid = study.instance_uid or d.get("instanceUid")
            for ann in d.get("annotation") or []:
                inner = ann.get("data") if isinstance(ann, dict) else None
                pts = inner.get("point") if isinstance(inner, dict) else None
                if not isinstance(pts, list):
                    raise AnnotationError(
                        f"{source}: study {study_uid}: annotation has no 'data'.'point' list"
                    )
                for p_i, p in enumerate(pts):
                    point = _parse_point(p, p_i, study, vocab, source, predictions)
                    if point is not None:
                        study.points.append(point)
        studies[study_uid] = study
    for study in studies.values():
        seen = [p.identification for p in study.points]
        if not predictions and len(seen) != len(set(seen)):
            study.warnings.append(
                "duplicate identifications: "
                + ", ".join(sorted({n for n in seen if seen.count(n) > 1}))
            )
        missing = [n for n in POINT_INDEX if n not in seen]
        if missing and not predictions:
            study.warnings.append(f"{len(study.points)} points; missing {', '.join(missing)}")
    return studies


def _parse_point(
    p: object, p_i: int, study: StudyAnnotation, vocab: Vocabulary, source: str, predictions: bool
) -> Point | None:
    where = f"{source}: study {study.study_uid}, point {p_i}"
    if not isinstance(p, dict):
        raise AnnotationError(f"{where}: expected an object")
    tag = p.get("tag")
    if not isinstance(tag, dict) or not isinstance(tag.get("identification"), str):
        raise AnnotationError(f"{where}: missing 'tag'.'identification'")
    ident = tag["identification"].strip()
    where = f"{source}: study {study.study_uid}, point {ident}"
    coord = p.get("coord")
    if (
        not isinstance(coord, (list, tuple))
        or len(coord) != 2
        or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coord)
        or not all(math.isfinite(c) for c in coord)
    ):
        raise AnnotationError(f"{where}: 'coord' must be two finite numbers [x, y], got {coord!r}")
    if ident not in POINT_INDEX:
        study.warnings.append(f"unexpected identification {ident!r} ignored")
        return None
    labels = _tag_labels(tag, point_type(ident), vocab, where)
    score = p.get("score")
    if score is not None:
        if (
            not isinstance(score, (int, float))
            or isinstance(score, bool)
            or not math.isfinite(score)
            or not 0.0 <= score <= 1.0
        ):
            raise AnnotationError(f"{where}: 'score' must be a number in [0, 1], got {score!r}")
        score = float(score)
    z = p.get("zIndex")
    z_index = int(z) if isinstance(z, (int, float)) and not isinstance(z, bool) else None
    return Point(ident, float(coord[0]), float(coord[1]), labels, score, z_index)


def load_annotations(
    path: str | Path, vocab: str | Vocabulary = "tianchi2020", predictions: bool = False
) -> dict[str, StudyAnnotation]:
    """Read an annotation (or prediction) file; errors name the file and what to fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    return parse_annotations(obj, vocab, source=str(path), predictions=predictions)


def to_json(studies: Iterable[StudyAnnotation]) -> list[dict]:
    """Serialise studies to the annotation schema (scores included when present)."""
    out = []
    for s in studies:
        points = []
        for p in s.points:
            tag = {"identification": p.identification, p.kind: ",".join(p.labels)}
            item: dict = {"coord": [round(p.x, 3), round(p.y, 3)], "tag": tag}
            if p.z_index is not None:
                item["zIndex"] = p.z_index
            if p.score is not None:
                item["score"] = round(float(p.score), 6)
            points.append(item)
        out.append(
            {
                "studyUid": s.study_uid,
                "data": [
                    {
                        "seriesUid": s.series_uid,
                        "instanceUid": s.instance_uid,
                        "annotation": [{"data": {"point": points}}],
                    }
                ],
            }
        )
    return out


def write_annotations(path: str | Path, studies: Iterable[StudyAnnotation]) -> None:
    """Atomically write studies as an annotation or prediction file."""
    atomic_write_json(path, to_json(studies), indent=None)
