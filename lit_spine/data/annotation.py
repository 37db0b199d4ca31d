"""Annotation files of the spine dataset: parse and validate them (with real-data quirks), write them.

Schema (see docs/data-format.md): a JSON list with one object per study,
``{"studyUid", "data": [{"seriesUid", "instanceUid", "annotation": [{"data": {"point": [
{"coord": [x, y], "tag": {"identification": "L1", "vertebra": "v2"}, "zIndex": 6}, ...]}}]}]}``.
Prediction files use the same schema with an optional per-point ``"score"`` in [0, 1].

Ground truth and predictions go through the same checks (`parse_annotations`, then
`check_against_images` once the annotated images are known). Each finding is one of two kinds:

- an error (`AnnotationError`, the caller stops with exit code 2): the file, or a value in it,
  has no single reading: unreadable file, not UTF-8, malformed or too deeply nested JSON, wrong
  types, a study listed twice, one study annotating two images, a coordinate that is not two
  finite numbers within +-65535 px, a zIndex that is not a non-negative integer, a score outside
  [0, 1], a missing, null or unknown disease, an empty identification or one in the wrong case,
  and (ground truth only) one identification annotated twice at different places;
- a reported `Problem` (the rest is used; the caller prints it): an unknown identification
  such as 'T11-T12' (left out), ground-truth points missing, an exact duplicate point (kept
  once), a point outside its image or a zIndex outside its series (kept).

The validation is hand-written (no schema library reports real-data quirks as problems while
failing on ambiguity); every message is one line naming the file, study and point.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lit_spine.data.labels import POINT_INDEX, Vocabulary, get_vocabulary, point_type
from lit_spine.utils import atomic_write_json, one_line

# DICOM Rows/Columns are 16-bit: no image is larger, so a coordinate beyond this is a unit or
# format mistake (mm, normalised, swapped fields), not a point.
MAX_COORD_PX = 65535.0
_IDENT_BY_FOLDED = {name.casefold(): name for name in POINT_INDEX}
_UTF16_32_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 3, 60, 60, 6, 4


def show(value: object) -> str:
    """A short, one-line repr of a value from a file (nested or huge values are abbreviated)."""
    return one_line(_short.repr(value))


class AnnotationError(ValueError):
    """An annotation or prediction file cannot be used as it is."""


@dataclass(frozen=True)
class Problem:
    """A reported, non-fatal finding about an input file: what and where (file, study, point)."""

    kind: str  # e.g. 'unknown_identification', 'missing_points', 'outside_image'
    file: str
    study: str | None
    point: str | None
    message: str

    def line(self) -> str:
        """One line: file, study, point and message."""
        where = [one_line(self.file)]
        if self.study is not None:
            where.append(f"study {one_line(self.study)}")
        if self.point is not None:
            where.append(f"point {one_line(self.point)}")
        return f"{', '.join(where)}: {one_line(self.message)}"

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "kind": self.kind,
            "file": self.file,
            "study": self.study,
            "point": self.point,
            "message": self.message,
        }


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
    """The annotated image of one study, its points and the problems found reading them."""

    study_uid: str
    series_uid: str | None
    instance_uid: str | None
    points: list[Point] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    source: str = "<annotation>"  # the file the study was read from, named in its problems

    @property
    def warnings(self) -> list[str]:
        """The problems' messages (without file and study, which the caller knows)."""
        return [p.message for p in self.problems]

    def report(self, kind: str, message: str, point: str | None = None) -> None:
        """Record a problem of this study."""
        self.problems.append(Problem(kind, self.source, self.study_uid, point, message))


def _number(value: object) -> float | None:
    """`value` as a finite float, or None for anything else (bools, strings, huge ints, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def _uid(value: object, where: str, key: str, required: bool) -> str | None:
    """A UID field: a non-empty string (stripped of DICOM padding), or None when optional."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip(" \0"):
        need = "a non-empty string" + ("" if required else " or null")
        raise AnnotationError(f"{where}: {key!r} must be {need}, got {show(value)}")
    return value.strip(" \0")


def _identification(tag: dict, where: str) -> str:
    ident = tag.get("identification")
    if not isinstance(ident, str) or not ident.strip():
        raise AnnotationError(
            f"{where}: 'tag'.'identification' must be a non-empty string such as 'L1' or "
            f"'L4-L5', got {show(ident)}"
        )
    ident = ident.strip()
    right = _IDENT_BY_FOLDED.get(ident.casefold())
    if right is not None and right != ident:
        raise AnnotationError(
            f"{where}: identification {ident!r} is in the wrong case; identifications are "
            f"case-sensitive: write {right!r}"
        )
    return ident


def _tag_labels(tag: dict, kind: str, vocab: Vocabulary, where: str) -> tuple[str, ...]:
    # Real files sometimes carry both keys with one empty, or the other type's key only; the
    # key of the point's own type wins when present.
    other = "vertebra" if kind == "disc" else "disc"
    key = kind if kind in tag else other
    if key not in tag:
        raise AnnotationError(
            f'{where}: no disease label (tag key {kind!r}); write "" for normal (v1) '
            f'or codes such as "v2"'
        )
    text = tag[key]
    if not isinstance(text, str):
        raise AnnotationError(
            f'{where}: disease {key!r} must be a string ("" means normal, v1), got {show(text)}'
        )
    labels = _parse_labels(vocab, kind, text)
    if isinstance(labels, str):
        raise AnnotationError(
            f"{where}: {labels}. Check the file's vocabulary (--vocab tianchi2020 or seed7)."
        )
    return labels


_LABELS_CACHE: dict[tuple[str, str, str], tuple[str, ...] | str] = {}


def _parse_labels(vocab: Vocabulary, kind: str, text: str) -> tuple[str, ...] | str:
    """`vocab.parse`, memoised (files repeat a handful of disease strings); the error text
    instead of raising."""
    key = (vocab.name, kind, text)
    if key not in _LABELS_CACHE:
        if len(_LABELS_CACHE) > 4096:
            _LABELS_CACHE.clear()
        try:
            _LABELS_CACHE[key] = vocab.parse(kind, text)
        except ValueError as err:
            _LABELS_CACHE[key] = one_line(err)
    return _LABELS_CACHE[key]


def _z_index(value: object, where: str) -> int | None:
    if value is None:
        return None
    z = _number(value)
    if z is None or z != int(z) or z < 0:
        raise AnnotationError(
            f"{where}: 'zIndex' must be a non-negative integer slice index, got {show(value)}"
        )
    return int(z)


def parse_annotations(
    obj: object,
    vocab: str | Vocabulary = "tianchi2020",
    source: str = "<annotation>",
    predictions: bool = False,
) -> dict[str, StudyAnnotation]:
    """Parse and check an already-loaded annotation/prediction JSON object; studies by study UID.

    Errors (see the module docstring) raise `AnnotationError` naming the file, study and point;
    reported problems are kept in each study's `problems`. Unknown keys are ignored.
    """
    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    src = one_line(source)
    if not isinstance(obj, list):
        raise AnnotationError(f"{src}: expected a JSON list of studies, got {type(obj).__name__}")
    studies: dict[str, StudyAnnotation] = {}
    entry_of: dict[str, int] = {}
    for s_i, entry in enumerate(obj):
        if not isinstance(entry, dict) or "studyUid" not in entry:
            raise AnnotationError(f"{src}: entry {s_i} is not an object with a 'studyUid'")
        study_uid = _uid(entry["studyUid"], f"{src}: entry {s_i}", "studyUid", required=True)
        if study_uid in entry_of:
            raise AnnotationError(
                f"{src}: study {one_line(study_uid)} is listed twice (entries {entry_of[study_uid]} "
                f"and {s_i}); keep one entry per study"
            )
        entry_of[study_uid] = s_i
        where = f"{src}: study {one_line(study_uid)}"
        data = entry.get("data")
        if data is None:
            data = []
        if not isinstance(data, list):
            raise AnnotationError(f"{where}: 'data' must be a list, got {show(data)}")
        study = StudyAnnotation(study_uid, None, None, source=str(source))
        for d in data:
            if not isinstance(d, dict):
                raise AnnotationError(f"{where}: 'data' entries must be objects, got {show(d)}")
            series_uid = _uid(d.get("seriesUid"), where, "seriesUid", required=False)
            instance_uid = _uid(d.get("instanceUid"), where, "instanceUid", required=False)
            if instance_uid and study.instance_uid and instance_uid != study.instance_uid:
                raise AnnotationError(
                    f"{where}: annotates two images (instances {one_line(study.instance_uid)} "
                    f"and {one_line(instance_uid)}); the suite scores one image per study: keep "
                    f"the points of one"
                )
            study.series_uid = study.series_uid or series_uid
            study.instance_uid = study.instance_uid or instance_uid
            annotations = d.get("annotation")
            if annotations is None:
                annotations = []
            if not isinstance(annotations, list):
                raise AnnotationError(
                    f"{where}: 'annotation' must be a list, got {show(annotations)}"
                )
            for ann in annotations:
                inner = ann.get("data") if isinstance(ann, dict) else None
                pts = inner.get("point") if isinstance(inner, dict) else None
                if not isinstance(pts, list):
                    raise AnnotationError(f"{where}: annotation has no 'data'.'point' list")
                for p_i, p in enumerate(pts):
                    point = _parse_point(p, p_i, study, vocab, src, predictions)
                    if point is not None:
                        study.points.append(point)
        _check_duplicates(study, src, predictions)
        studies[study_uid] = study
    return studies


def _check_duplicates(study: StudyAnnotation, src: str, predictions: bool) -> None:
    """Exact duplicate points are kept once (reported); a ground-truth identification placed
    twice is an error. Linear in the number of points."""
    where = f"{src}: study {one_line(study.study_uid)}"
    exact: set[tuple] = set()
    first_at: dict[str, Point] = {}
    kept: list[Point] = []
    n_dropped: Counter[str] = Counter()
    for p in study.points:
        key = (p.identification, p.x, p.y, p.labels, p.score)
        if key in exact:
            n_dropped[p.identification] += 1
            continue
        exact.add(key)
        if not predictions and p.identification in first_at:
            q = first_at[p.identification]
            raise AnnotationError(
                f"{where}, point {p.identification}: annotated twice, at ({q.x:g}, {q.y:g}) "
                f"{','.join(q.labels)} and at ({p.x:g}, {p.y:g}) {','.join(p.labels)}; keep one"
            )
        first_at.setdefault(p.identification, p)
        kept.append(p)
    for ident, n in n_dropped.items():
        study.report(
            "duplicate_point", f"{n} exact duplicate(s) of point {ident} scored once", ident
        )
    study.points = kept
    if not predictions:
        missing = [n for n in POINT_INDEX if n not in first_at]
        if missing:
            study.report(
                "missing_points", f"{len(study.points)} points; missing {', '.join(missing)}"
            )


def _parse_point(
    p: object, p_i: int, study: StudyAnnotation, vocab: Vocabulary, src: str, predictions: bool
) -> Point | None:
    where = f"{src}: study {one_line(study.study_uid)}, point {p_i}"
    if not isinstance(p, dict):
        raise AnnotationError(f"{where}: expected an object, got {show(p)}")
    tag = p.get("tag")
    if not isinstance(tag, dict):
        raise AnnotationError(f"{where}: missing 'tag' object, got {show(tag)}")
    ident = _identification(tag, where)
    where = f"{src}: study {one_line(study.study_uid)}, point {one_line(ident)}"
    coord = p.get("coord")
    xy = [_number(c) for c in coord] if isinstance(coord, list) and len(coord) == 2 else None
    if xy is None or None in xy:
        raise AnnotationError(
            f"{where}: 'coord' must be two finite numbers [x, y], got {show(coord)}"
        )
    if max(abs(v) for v in xy) > MAX_COORD_PX:
        raise AnnotationError(
            f"{where}: 'coord' {show(coord)} is beyond any DICOM image (|x|, |y| <= "
            f"{MAX_COORD_PX:g} px); coordinates are [column, row] in pixels of the original image"
        )
    z_index = _z_index(p.get("zIndex"), where)
    if ident not in POINT_INDEX:
        study.report(
            "unknown_identification", f"unexpected identification {ident!r} ignored", ident
        )
        return None
    labels = _tag_labels(tag, point_type(ident), vocab, where)
    score = p.get("score")
    if score is not None:
        score = _number(score)
        if score is None or not 0.0 <= score <= 1.0:
            raise AnnotationError(
                f"{where}: 'score' must be a number in [0, 1], got {show(p['score'])}"
            )
    return Point(ident, xy[0], xy[1], labels, score, z_index)


@dataclass(frozen=True)
class ImageFacts:
    """What the checks need to know of a study's annotated image (from its DICOM header)."""

    rows: int
    cols: int
    n_slices: int | None = None  # length of the image's series, when known


def check_against_images(
    studies: Mapping[str, StudyAnnotation], images: Mapping[str, ImageFacts], source: str
) -> list[Problem]:
    """Problems for points outside their study's image or zIndex outside its series.

    `images` is keyed by study UID (the image the points are scored in); studies without an
    entry are not checked. The points are kept: the caller scores them and reports the problems.
    """
    out = []
    for uid, study in studies.items():
        image = images.get(uid)
        if image is None:
            continue
        for p in study.points:
            if not (-0.5 <= p.x <= image.cols - 0.5 and -0.5 <= p.y <= image.rows - 0.5):
                out.append(
                    Problem(
                        "outside_image",
                        str(source),
                        uid,
                        p.identification,
                        f"coord ({p.x:g}, {p.y:g}) lies outside the {image.cols}x{image.rows} "
                        "image (x = column, y = row)",
                    )
                )
            if p.z_index is not None and image.n_slices is not None and p.z_index >= image.n_slices:
                out.append(
                    Problem(
                        "z_outside_series",
                        str(source),
                        uid,
                        p.identification,
                        f"zIndex {p.z_index} is outside the annotated series "
                        f"({image.n_slices} slices, 0..{image.n_slices - 1})",
                    )
                )
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str, first: object, second: object) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`json.loads` object hook: a key given twice in one object is an error, not "last wins"."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, out[key], value)
        out[key] = value
    return out


def read_json_file(path: str | Path, what: str = "annotation") -> object:
    """Load a JSON file; any unreadable file raises `AnnotationError` with a one-line reason.

    UTF-8 is expected (a UTF-8 byte-order mark is accepted); UTF-16/32, other encodings,
    folders, malformed and too deeply nested JSON are reported with the file named.
    """
    path = Path(path)
    name = one_line(path)
    if path.is_dir():
        raise AnnotationError(f"{name}: is a folder; expected a JSON {what} file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{name}: file not found") from None
    except OSError as err:
        raise AnnotationError(
            f"{name}: cannot read the file ({one_line(err.strerror or err)})"
        ) from None
    for bom, encoding in _UTF16_32_BOMS.items():
        if data.startswith(bom):
            raise AnnotationError(f"{name}: the file is {encoding} text; save it as UTF-8")
    if b"\x00" in data[:4096]:
        raise AnnotationError(
            f"{name}: the file holds NUL bytes (UTF-16/32 text or binary data); expected UTF-8 JSON"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AnnotationError(
            f"{name}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise AnnotationError(
            f"{name}: key {show(err.key)} appears twice in one JSON object (values "
            f"{show(err.first)} and {show(err.second)}); a JSON reader keeps only one of them "
            "silently, so keep the one that is right and delete the other"
        ) from None
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{name}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise AnnotationError(
            f"{name}: JSON nested too deeply to parse; the {what} schema is 7 levels deep"
        ) from None
    except ValueError as err:  # e.g. an integer literal with more than 4300 digits
        raise AnnotationError(f"{name}: unreadable JSON value ({one_line(err)})") from None


def load_annotations(
    path: str | Path, vocab: str | Vocabulary = "tianchi2020", predictions: bool = False
) -> dict[str, StudyAnnotation]:
    """Read and check an annotation (or prediction) file; errors name the file and what to fix."""
    obj = read_json_file(path, "prediction" if predictions else "annotation")
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
