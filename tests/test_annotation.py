"""Annotation files: write/read round trip, the checks' two outcome kinds, image checks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_spine.data.annotation import (
    AnnotationError,
    ImageFacts,
    Point,
    StudyAnnotation,
    check_against_images,
    load_annotations,
    one_line,
    parse_annotations,
    write_annotations,
)
from lit_spine.data.labels import POINT_NAMES, get_vocabulary

VOCAB = get_vocabulary("seed7")


def label_sets(name: str):
    codes = VOCAB.codes("disc" if "-" in name else "vertebra")
    return st.lists(st.sampled_from(codes), min_size=1, max_size=3, unique=True).map(
        lambda c: tuple(sorted(c))
    )


@st.composite
def studies(draw):
    """Valid studies: unique UIDs, each identification at most once, values the writer keeps."""
    n = draw(st.integers(1, 4))
    out = []
    for s in range(n):
        names = draw(st.lists(st.sampled_from(POINT_NAMES), max_size=11, unique=True))
        pts = [
            Point(
                name,
                draw(st.integers(0, 8000)) / 8,  # eighths survive the 3-decimal rounding
                draw(st.integers(0, 8000)) / 8,
                draw(label_sets(name)),
                score=draw(st.none() | st.integers(0, 64).map(lambda v: v / 64)),
                z_index=draw(st.none() | st.integers(0, 40)),
            )
            for name in names
        ]
        out.append(StudyAnnotation(f"1.2.{s}", f"1.2.{s}.3", f"1.2.{s}.3.4", pts))
    return out


@settings(max_examples=40, deadline=5000, database=None, derandomize=True)
@given(written=studies())
def test_write_then_load_round_trips(tmp_path_factory, written):
    path = tmp_path_factory.mktemp("rt") / "a.json"
    write_annotations(path, written)
    loaded = load_annotations(path, VOCAB, predictions=True)
    assert list(loaded) == [s.study_uid for s in written]
    for s in written:
        got = loaded[s.study_uid]
        assert (got.series_uid, got.instance_uid) == (s.series_uid, s.instance_uid)
        assert got.points == s.points and got.problems == []
        strict = parse_annotations(json.loads(path.read_text()), VOCAB)[s.study_uid]
        assert strict.points == s.points
        missing = [n for n in POINT_NAMES if n not in {p.identification for p in s.points}]
        assert strict.warnings == (
            [f"{len(s.points)} points; missing {', '.join(missing)}"] * bool(missing)
        )


def entry(points, uid="1.2.3"):
    return {
        "studyUid": uid,
        "data": [{"instanceUid": uid + ".9", "annotation": [{"data": {"point": points}}]}],
    }


def pt(name="L1", coord=(10.0, 20.0), **tag):
    return {"coord": list(coord), "tag": {"identification": name, "vertebra": "v2", **tag}}


def test_problems_name_file_study_and_point_and_errors_raise():
    studies_ = parse_annotations([entry([pt(), pt(), pt("T11-T12", disc="v1")])], VOCAB, "f.json")
    (study,) = studies_.values()
    assert [p.identification for p in study.points] == ["L1"]
    kinds = [(p.kind, p.file, p.study, p.point) for p in study.problems]
    assert ("duplicate_point", "f.json", "1.2.3", "L1") in kinds
    assert ("unknown_identification", "f.json", "1.2.3", "T11-T12") in kinds
    assert study.problems[0].line().startswith("f.json, study 1.2.3, point ")
    with pytest.raises(AnnotationError, match=r"f.json: study 1.2.3, point L1: annotated twice"):
        parse_annotations([entry([pt(), pt(coord=(11.0, 20.0))])], VOCAB, "f.json")
    with pytest.raises(AnnotationError, match="listed twice"):
        parse_annotations([entry([pt()]), entry([pt()])], VOCAB, "f.json")
    # Predictions may hold several candidates for one identification.
    (pred,) = parse_annotations(
        [entry([pt(), pt(coord=(11.0, 20.0))])], VOCAB, "p.json", predictions=True
    ).values()
    assert len(pred.points) == 2 and pred.problems == []


def test_image_checks_report_points_outside_and_z_outside_the_series():
    points = [pt("L1", (-0.6, 3.0)), pt("L2", (63.5, 63.5)), {**pt("L3", (1.0, 1.0)), "zIndex": 5}]
    (study,) = parse_annotations([entry(points)], VOCAB, "f.json").values()
    problems = check_against_images({"1.2.3": study}, {"1.2.3": ImageFacts(64, 64, 5)}, "f.json")
    assert [(p.kind, p.point) for p in problems] == [
        ("outside_image", "L1"),
        ("z_outside_series", "L3"),
    ]
    assert "coord (-0.6, 3) lies outside the 64x64 image" in problems[0].message
    assert check_against_images({"1.2.3": study}, {}, "f.json") == []


def test_one_line_escapes_control_characters():
    assert one_line("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert one_line("plain: ok") == "plain: ok"
